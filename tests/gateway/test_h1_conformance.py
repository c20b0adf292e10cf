"""The relay's HTTP/1.1 client against the real servers a gateway meets: uvicorn with httptools
and with h11 (vLLM's own server), aiohttp's server, and nginx proxying to uvicorn (real vLLM is
tests/integration). Each answers the same paths (tests/conformance_servers.py); the client must
read each the same way, and the gateway must relay a stream from each byte for byte."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.process import free_port
from gateway.h1 import Pool
from tests.conformance_servers import BIG, CHUNKS
from tests.helpers import wait_until
from tests.servers import ROOT, answers, running_gateway

pytestmark = pytest.mark.servers
SERVERS = ["uvicorn-httptools", "uvicorn-h11", "aiohttp", "nginx"]
NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  client_max_body_size 8m;
  client_body_buffer_size 4m;  # in memory: the temp dir is not the worker user's
  proxy_temp_path {dir}/proxy;
  upstream app {{ server 127.0.0.1:{upstream}; keepalive 8; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_buffer_size 32k;  # the upstream's 16 KiB header (4 KiB by default: a 502)
      proxy_buffers 8 32k;
    }}
  }}
}}
"""


def launch(cmd: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module", params=SERVERS)
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    kind: str = request.param
    procs = []
    app_kind = "uvicorn-h11" if kind == "nginx" else kind
    port = free_port()
    procs.append(launch([sys.executable, "-m", "tests.conformance_servers", app_kind, str(port)]))
    url = f"http://127.0.0.1:{port}"
    if kind == "nginx":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"  # scripts/setup-env.sh installs it
        work = Path(tempfile.mkdtemp())
        proxy_port = free_port()
        conf = NGINX_CONF.format(dir=work, upstream=port, port=proxy_port)
        (work / "nginx.conf").write_text(conf)
        config = str(work / "nginx.conf")
        procs.append(launch([nginx, "-c", config, "-p", str(work), "-g", "daemon off;"]))
        url = f"http://127.0.0.1:{proxy_port}"
    try:
        wait_until(lambda: answers(f"{url}/len"), 30, f"{kind} to answer")
        yield url
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


async def test_a_content_length_body_on_a_kept_connection(server: str) -> None:
    pool = Pool(server)
    for _ in range(3):
        response = await pool.request("GET", "/len", [])
        assert response.status == 200 and await response.read() == b"hello"
        response.release()
    assert len(pool.open) == 1
    pool.close()


async def test_chunks_arrive_one_by_one(server: str) -> None:
    pool = Pool(server)
    response = await pool.request("GET", "/chunks", [])
    received = []
    while chunk := await response.readany():
        received.append(chunk)
    assert received == CHUNKS  # 50 ms apart: never merged, never split
    response.release()
    again = await pool.request("GET", "/len", [])
    assert await again.read() == b"hello" and len(pool.open) == 1
    pool.close()


async def test_204_big_headers_and_a_large_echo(server: str) -> None:
    pool = Pool(server)
    empty = await pool.request("GET", "/empty", [])
    assert empty.status == 204 and await empty.read() == b""
    empty.release()
    big = await pool.request("GET", "/big-header", [])
    assert (b"x-big", BIG) in [(k.lower(), v) for k, v in big.raw_headers]
    await big.read()
    big.release()
    payload = bytes(range(256)) * 4096  # 1 MiB
    echo = await pool.request(
        "POST", "/echo", [(b"Content-Type", b"application/octet-stream")], payload
    )
    assert await echo.read() == payload
    echo.release()
    pool.close()


def test_the_gateway_relays_a_stream_byte_for_byte(server: str) -> None:
    with (
        running_gateway([{"name": "m", "url": server}]) as gateway,
        httpx.stream(
            "POST",
            f"{gateway.url}/v1/chat/completions",
            json={"model": "m", "messages": [], "stream": True},
            timeout=10,
        ) as response,
    ):
        assert response.status_code == 200
        assert list(response.iter_raw()) == CHUNKS

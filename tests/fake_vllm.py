"""A fast fake vLLM server: vLLM's wire format, none of its work.

For load tests (so the gateway is what gets measured) and for faults a real server cannot be
made to show on demand. Never the only evidence that a feature works: the real-vLLM tests are.

    python tests/fake_vllm.py --port 9001 --served-model-name m [--chunks 16 --gap-ms 5]

It accepts `vllm serve`'s flags that the gateway passes (--model, --host, --api-key, ...), so
the supervisor can spawn it in tests as it spawns vLLM. A request may carry a `fake` object to
change one response: {"chunks": 3, "gap_ms": 50, "die_after": 2, "hang_after": 2, "hang": true,
"status": 500, "echo_headers": true, "set_cookie": "a=b", "redirect": "/elsewhere", "drop": true,
"die_after_head": true};
echo_headers answers with the headers and the URL (path and query) it received.
`GET /fake/stats` reports requests started, completed and aborted (client went away), the most
it had at once (`max_running`), and when the last abort was seen (`last_abort_us`, wall-clock
microseconds).
`--max-num-seqs N` (vLLM's flag) runs at most N generations at once, the rest wait first
come, first served (as vLLM's default scheduler does once its batch is full; /metrics reports
them as waiting); `--service-ms T` makes every non-streamed generation take T ms (a fixed service
time, whatever `chunks` says).
`--num-gpu-blocks N` adds vLLM's `vllm:cache_config_info` series (block size 16) to /metrics;
`--engine-core` starts a child process that, like vLLM's engine core, outlives a server killed
with SIGKILL. `--enable-sleep-mode` with `VLLM_SERVER_DEV_MODE=1` serves vLLM's sleep endpoints
(`--fail-wake`: /wake_up fails) and counts a `violation` in /fake/stats, loudly on stderr, when
put to sleep with a request in flight, asked to generate asleep, or woken from level 2 without
`reload_weights`. `--lora-modules name=path` serves adapters (listed with their parent);
with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True` it loads and unloads them as vLLM does (a path
containing "missing", or every path with `FAKE_VLLM_LORA_FAILS=1`, is not found).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httptools
import orjson


@dataclass
class Options:
    served_names: list[str]
    api_key: str | None = None
    chunks: int = 16
    gap_ms: float = 0.0
    max_model_len: int = 2048
    startup_delay: float = 0.0
    num_gpu_blocks: int | None = None
    adapters: dict[str, str] = field(default_factory=dict)  # LoRA name -> path
    runtime_lora: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING=True
    lora_fails: bool = False  # every runtime load fails (a replica that cannot read the path)
    drop_adapters_in_deep_sleep: bool = False  # FAKE_VLLM_DEEP_SLEEP_DROPS_ADAPTERS=1
    sleep_mode: bool = False  # --enable-sleep-mode with VLLM_SERVER_DEV_MODE=1, as vLLM wants
    fail_wake: bool = False
    asleep: int = 0  # the level it sleeps at; 0 awake
    weights: bool = True  # False from a level-2 sleep until reload_weights
    max_concurrency: int | None = None  # --max-num-seqs: generations at once; the rest wait
    service_ms: float = 0.0  # a non-streamed generation's fixed time (0: gap_ms x chunks)
    waiting: int = 0  # generations waiting for one of max_concurrency
    _slots: asyncio.Semaphore | None = None
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "started": 0,
            "max_running": 0,  # the most requests it had at once (started, not yet ended)
            "completed": 0,
            "aborted": 0,
            "sleeps": 0,
            "wakes": 0,
            "violations": 0,  # put to sleep mid-request, asked to generate asleep or unloaded
            "last_abort_us": 0,  # when the last abort was seen (wall clock)
        }
    )

    @property
    def running(self) -> int:
        return self.stats["started"] - self.stats["completed"] - self.stats["aborted"]

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One of `max_concurrency` generations (FIFO: asyncio's semaphore wakes in order)."""
        if self.max_concurrency is None:
            yield
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        try:
            yield
        finally:
            self._slots.release()


class _Request:
    __slots__ = ("body", "headers", "method", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()
        self.method = b""


class FakeVllmProtocol(asyncio.Protocol):
    def __init__(self, options: Options) -> None:
        self.options = options
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.request = _Request()
        self.task: asyncio.Task[None] | None = None
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(400, b'{"error":"bad request"}', keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.request = _Request()

    def on_url(self, url: bytes) -> None:
        self.request.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.request.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.request.body += body

    def on_message_complete(self) -> None:
        self.request.method = self.parser.get_method()
        self.task = asyncio.get_running_loop().create_task(self._handle(self.request))

    # handling
    async def _handle(self, req: _Request) -> None:
        try:
            await self._answer(req)
        except Exception as exc:  # vLLM answers a request it cannot handle with a 400
            if self.transport is not None and not self.transport.is_closing():
                self._write(400, _error(f"fake cannot handle this: {exc!r}", 400))

    async def _answer(self, req: _Request) -> None:
        path = req.url.split(b"?", 1)[0]
        opts = self.options
        if path == b"/health":
            return self._write(200, b"")
        if path == b"/fake/stats":
            return self._write(200, orjson.dumps(opts.stats))
        if opts.sleep_mode and path in _SLEEP_PATHS:
            return self._sleep_mode(path, req)
        if path == b"/metrics":  # the three load gauges vLLM exports, from this fake's own work
            running = opts.running
            cache = b""
            if opts.num_gpu_blocks is not None:
                cache = (
                    b'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="%d"} 1.0\n'
                )
                cache %= opts.num_gpu_blocks
            return self._write(
                200,
                b'vllm:num_requests_running{model_name="%s"} %d\n'
                b'vllm:num_requests_waiting{model_name="%s"} %d\n'
                b'vllm:kv_cache_usage_perc{model_name="%s"} 0.0\n'
                % (
                    opts.served_names[0].encode(),
                    running - opts.waiting,
                    opts.served_names[0].encode(),
                    opts.waiting,
                    opts.served_names[0].encode(),
                )
                + cache,
                content_type=b"text/plain; version=0.0.4",
            )
        authorized = (
            req.headers.get(b"authorization") == b"Bearer %s" % (opts.api_key or "").encode()
        )
        if opts.api_key and path.startswith(b"/v1") and not authorized:
            return self._write(401, b'{"error":"Unauthorized"}')
        if path == b"/v1/models":
            cards = [
                {
                    "id": n,
                    "object": "model",
                    "owned_by": "vllm",
                    "max_model_len": opts.max_model_len,
                }
                for n in opts.served_names
            ]
            cards += [
                {"id": a, "object": "model", "root": p, "parent": opts.served_names[0]}
                for a, p in opts.adapters.items()
            ]
            return self._write(200, orjson.dumps({"object": "list", "data": cards}))
        try:
            body: dict[str, Any] = orjson.loads(req.body) if req.body else {}
        except orjson.JSONDecodeError:
            return self._write(400, _error("invalid JSON", 400))
        if path in (b"/v1/load_lora_adapter", b"/v1/unload_lora_adapter"):
            return self._lora(path, body)
        if body.get("model") not in opts.served_names and body.get("model") not in opts.adapters:
            return self._write(404, _error(f"The model `{body.get('model')}` does not exist.", 404))
        fake = body.get("fake") or {}
        if fake.get("drop"):  # close without a word, like a server killed mid-request
            assert self.transport is not None
            self.transport.abort()
            return None
        if "status" in fake:
            return self._write(int(fake["status"]), _error("fake failure", int(fake["status"])))
        if "redirect" in fake:
            location = b"location: %s\r\n" % str(fake["redirect"]).encode()
            return self._write(307, b"", extra_headers=location)
        if fake.get("echo_headers"):
            headers = {k.decode(): v.decode() for k, v in req.headers.items()}
            echo = {"headers": headers, "model": body["model"], "url": req.url.decode()}
            cookie = str(fake.get("set_cookie", "")).encode()
            extra = b"set-cookie: %s\r\n" % cookie if cookie else b""
            return self._write(200, orjson.dumps(echo), extra_headers=extra)
        if opts.asleep or not opts.weights:  # vLLM would hang, or answer from no weights
            self._violation(f"asked for {path.decode()} while asleep or without weights")
            return self._write(500, _error("fake: generation while asleep", 500))
        opts.stats["started"] += 1
        opts.stats["max_running"] = max(opts.stats["max_running"], opts.running)
        try:
            async with opts.turn():
                await self._generate(path, body, fake)
            opts.stats["completed"] += 1
        except asyncio.CancelledError:
            opts.stats["aborted"] += 1
            opts.stats["last_abort_us"] = time.time_ns() // 1000  # wall clock, for load/

    async def _generate(self, path: bytes, body: dict[str, Any], fake: dict[str, Any]) -> None:
        opts = self.options
        if fake.get("hang"):
            await asyncio.sleep(3600)
        if path == b"/v1/chat/completions" and body.get("stream"):
            await self._stream(body, fake)
        elif path == b"/v1/chat/completions" and fake.get("die_after_head"):
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 300\r\n\r\n")
            await asyncio.sleep(0.05)  # the head arrives alone
            self.transport.abort()
            raise asyncio.CancelledError
        elif path == b"/v1/chat/completions":
            gap_ms = fake.get("gap_ms", opts.gap_ms) * self._chunks(fake)
            await self._sleep((opts.service_ms or gap_ms) / 1000)
            self._write(200, _chat_completion(body["model"], self._chunks(fake)))
        elif path == b"/v1/embeddings":
            self._write(200, _embeddings(body))
        elif path in (b"/v1/rerank", b"/rerank"):
            self._write(200, _rerank(body))
        else:
            self._write(404, b'{"detail":"Not Found"}')

    def _sleep_mode(self, path: bytes, req: _Request) -> None:
        """vLLM's dev endpoints, with the order a level-2 wake needs."""
        opts, query = self.options, req.url.partition(b"?")[2].decode()
        if path == b"/is_sleeping":
            return self._write(200, orjson.dumps({"is_sleeping": bool(opts.asleep)}))
        if path == b"/sleep":
            if opts.running:
                self._violation(f"put to sleep with {opts.running} requests in flight")
            opts.asleep = 2 if "level=2" in query else 1
            opts.weights = opts.asleep == 1
            if opts.asleep == 2 and opts.drop_adapters_in_deep_sleep:
                opts.adapters = {}  # what the gateway must give back when it wakes the server
            opts.stats["sleeps"] += 1
            return self._write(200, b"")
        if path == b"/collective_rpc":
            if orjson.loads(req.body or b"{}").get("method") == "reload_weights":
                opts.weights = True
            return self._write(200, b'{"results":[null]}')
        if opts.fail_wake:  # /wake_up
            return self._write(500, _error("fake: cannot wake", 500))
        if "tags=weights" not in query:  # a full wake, or the KV cache after the weights
            if not opts.weights:
                self._violation("woke from level 2 without reload_weights")
            opts.asleep = 0
            opts.stats["wakes"] += 1
        return self._write(200, b"")

    def _lora(self, path: bytes, body: dict[str, Any]) -> None:
        """vLLM's runtime LoRA endpoints, with its answers: a path "missing" is not found."""
        opts, name = self.options, str(body.get("lora_name", ""))
        if not opts.runtime_lora:
            return self._write(404, b'{"detail":"Not Found"}')
        if path == b"/v1/unload_lora_adapter":
            if opts.adapters.pop(name, None) is None:
                return self._write(404, _error(f"The lora adapter '{name}' cannot be found.", 404))
            return self._write(200, b"Success: LoRA adapter unloaded", content_type=b"text/plain")
        if name in opts.adapters:
            return self._write(
                400, _error(f"The lora adapter '{name}' has already been loaded.", 400)
            )
        lora_path = str(body.get("lora_path", ""))
        if "missing" in lora_path or opts.lora_fails:
            return self._write(404, _error(f"No adapter found for {lora_path}", 404))
        opts.adapters[name] = lora_path
        return self._write(200, b"Success: LoRA adapter added", content_type=b"text/plain")

    def _violation(self, what: str) -> None:
        self.options.stats["violations"] += 1
        print(f"FAKE VLLM VIOLATION: {what}", file=sys.stderr, flush=True)

    def _chunks(self, fake: dict[str, Any]) -> int:
        return int(fake.get("chunks", self.options.chunks))

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    async def _stream(self, body: dict[str, Any], fake: dict[str, Any]) -> None:
        assert self.transport is not None
        model, chunks = body["model"], self._chunks(fake)
        gap = float(fake.get("gap_ms", self.options.gap_ms)) / 1000
        die_after = fake.get("die_after")
        hang_after = fake.get("hang_after")
        self.transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        head = (
            b'{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":%d,"model":"%s",'
            b'"choices":[{"index":0,"delta":{"content":"' % (int(time.time()), model.encode())
        )
        for i in range(chunks):
            if die_after is not None and i >= int(die_after):
                self.transport.abort()  # a backend dying mid-stream
                raise asyncio.CancelledError
            if hang_after is not None and i >= int(hang_after):
                await asyncio.sleep(3600)  # a backend that stops sending
            await self._sleep(gap)
            if self.closed:
                raise asyncio.CancelledError
            event = b"data: " + head + b'tok"},"logprobs":null,"finish_reason":null}]}\n\n'
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        tail = b"data: [DONE]\n\n"
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = orjson.dumps(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 8,
                        "total_tokens": 8 + chunks,
                        "completion_tokens": chunks,
                    },
                }
            )
            tail = b"data: " + usage + b"\n\n" + tail
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))

    def _write(
        self,
        status: int,
        body: bytes,
        keep_alive: bool = True,
        content_type: bytes = b"application/json",
        extra_headers: bytes = b"",
    ) -> None:
        if self.transport is None or self.closed:
            return
        reason = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found"}
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, reason.get(status, b"Error"), content_type, len(body), extra_headers, body)
        )
        if not keep_alive:
            self.transport.close()


_SLEEP_PATHS = frozenset({b"/sleep", b"/wake_up", b"/is_sleeping", b"/collective_rpc"})


def _error(message: str, status: int) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    )


def _chat_completion(model: str, tokens: int) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "tok" * tokens},
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens},
        }
    )


def _embeddings(body: dict[str, Any]) -> bytes:
    inputs = body.get("input", "")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    data = [
        {"index": i, "object": "embedding", "embedding": [0.1, 0.2, 0.3, 0.4]}
        for i in range(len(inputs))
    ]
    return orjson.dumps(
        {
            "object": "list",
            "model": body["model"],
            "data": data,
            "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
        }
    )


def _rerank(body: dict[str, Any]) -> bytes:
    docs = body.get("documents", [])
    results = [
        {"index": i, "document": {"text": d}, "relevance_score": 1.0 / (i + 1)}
        for i, d in enumerate(docs)
    ]
    return orjson.dumps({"id": "rerank-fake", "model": body["model"], "results": results})


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Options]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_pos", nargs="?")
    parser.add_argument("--model", default="fake")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--uds", help="listen on this unix socket instead")
    parser.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))  # as vLLM
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--gap-ms", type=float, default=0.0)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--startup-delay", type=float, default=0.0, help="seconds before listening")
    parser.add_argument("--num-gpu-blocks", type=int, help="report this KV cache in /metrics")
    parser.add_argument("--engine-core", action="store_true", help="start a long-lived child")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--fail-wake", action="store_true", help="/wake_up answers 500")
    parser.add_argument("--lora-modules", nargs="+", default=[], help="name=path ...")
    parser.add_argument("--max-num-seqs", type=int, help="generations at once; the rest wait")
    parser.add_argument("--service-ms", type=float, default=0.0, help="each generation's time")
    args, _unknown = parser.parse_known_args(argv)  # ignore other vLLM flags
    options = Options(
        served_names=args.served_model_name or [args.model_pos or args.model],
        api_key=args.api_key,
        chunks=args.chunks,
        gap_ms=args.gap_ms,
        max_model_len=args.max_model_len,
        startup_delay=args.startup_delay,
        num_gpu_blocks=args.num_gpu_blocks,
        sleep_mode=args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1",
        fail_wake=args.fail_wake,
        adapters=dict(m.split("=", 1) for m in args.lora_modules),
        runtime_lora=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") == "True",
        lora_fails=os.environ.get("FAKE_VLLM_LORA_FAILS") == "1",
        drop_adapters_in_deep_sleep=os.environ.get("FAKE_VLLM_DEEP_SLEEP_DROPS_ADAPTERS") == "1",
        max_concurrency=args.max_num_seqs,
        service_ms=args.service_ms,
    )
    return args, options


async def serve(host: str, port: int, options: Options, uds: str | None = None) -> None:
    if options.startup_delay:
        await asyncio.sleep(options.startup_delay)
    loop = asyncio.get_running_loop()
    server: asyncio.AbstractServer
    if uds:  # as vLLM's --uds: host and port are ignored
        server = await loop.create_unix_server(lambda: FakeVllmProtocol(options), uds)
    else:
        server = await loop.create_server(
            lambda: FakeVllmProtocol(options), host, port, backlog=4096
        )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake vLLM serving {options.served_names} on http://{host}:{port}", flush=True)
    await stop.wait()
    server.close()  # exit at once, open keep-alive connections or not, as vLLM does


def main(argv: list[str] | None = None) -> None:
    args, options = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if os.environ.get("FAKE_VLLM_EXIT_AT_START"):
        sys.exit(int(os.environ["FAKE_VLLM_EXIT_AT_START"]))
    if args.engine_core:  # vLLM's engine core: same process group, no death signal
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    asyncio.run(serve(args.host, args.port, options, args.uds))


if __name__ == "__main__":
    main()

"""vLLM's sleep mode, spoken over HTTP: the calls that put a server to sleep and wake it.

A server started with `--enable-sleep-mode` and `VLLM_SERVER_DEV_MODE=1` serves these dev
endpoints (without any key: vLLM's `--api-key` guards only its API paths; the gateway never
relays them, see ``gateway.routing``):

    POST /sleep?level=1    weights copied to host memory, KV cache freed (wakes fast)
    POST /sleep?level=2    weights and KV cache dropped (sleeps fast; waking reloads weights)
    GET  /is_sleeping      {"is_sleeping": true | false}
    POST /wake_up          everything back (after level 1)
    POST /wake_up?tags=weights, POST /collective_rpc {"method": "reload_weights"},
    POST /wake_up?tags=kv_cache    the same after level 2

Every call is confirmed by ``/is_sleeping``: vLLM has answered 200 to a sleep it did not
survive.
"""

from __future__ import annotations

import httpx

from backends.errors import SleepModeError

LEVELS = (1, 2)
SLEEP_MODE_FLAG = "enable-sleep-mode"
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


async def put_to_sleep(client: httpx.AsyncClient, url: str, level: int, timeout: float) -> None:
    await _call(client, "POST", f"{url}/sleep", timeout, params={"level": str(level)})
    if not await is_sleeping(client, url):
        raise SleepModeError(f"{url} answered /sleep but /is_sleeping says it is awake")


async def wake_up(client: httpx.AsyncClient, url: str, level: int, timeout: float) -> None:
    if level == 2:  # the weights were dropped: make room for them, reload, then the KV cache
        await _call(client, "POST", f"{url}/wake_up", timeout, params={"tags": "weights"})
        await _call(
            client, "POST", f"{url}/collective_rpc", timeout, json={"method": "reload_weights"}
        )
        await _call(client, "POST", f"{url}/wake_up", timeout, params={"tags": "kv_cache"})
    else:
        await _call(client, "POST", f"{url}/wake_up", timeout)
    if await is_sleeping(client, url):
        raise SleepModeError(f"{url} answered /wake_up but /is_sleeping says it still sleeps")


async def is_sleeping(client: httpx.AsyncClient, url: str) -> bool:
    response = await _call(client, "GET", f"{url}/is_sleeping", 10.0)
    try:
        return bool(response.json()["is_sleeping"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SleepModeError(f"{url}/is_sleeping answered {response.text[:200]!r}") from exc


async def _call(
    client: httpx.AsyncClient, method: str, url: str, timeout: float, **kwargs: object
) -> httpx.Response:
    try:
        # The call's own timeout, but the client's connect timeout (the config's).
        limit = httpx.Timeout(timeout, connect=client.timeout.connect)
        response = await client.request(method, url, timeout=limit, **kwargs)  # type: ignore[arg-type]
    except httpx.HTTPError as exc:
        raise SleepModeError(f"{method} {url}: {exc!r}") from exc
    if response.status_code != 200:
        raise SleepModeError(
            f"{method} {url} answered {response.status_code}: {response.text[:200]}"
        )
    return response

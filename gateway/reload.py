"""Reloading the config in place: `kill -HUP`, `POST /admin/reload`, or, with `watch_config`,
a change of the file (once two looks agree, as for the keys file).

The whole file is read and validated first, and the plan made (``gateway.reload_plan``); a file
that does not validate, or a plan that is refused, changes nothing: the reason is logged,
answered (400, every problem listed) and counted. Otherwise the plan is applied model by model
(``gateway.runtime``): new models start, routes and in-place settings are swapped in for new
requests, removed models drain and stop, changed models restart one replica at a time. One
reload at a time: a second waits for the first. Each is one access-log line.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from backends.signals import Signal
from gateway.config_file import ConfigError, load_settings
from gateway.errors import InvalidRequest
from gateway.file_watch import Settled
from gateway.keys import KeyRing, key_ring
from gateway.reload_plan import ReloadPlan, plan_reload
from gateway.runtime import Runtime, drain_timeout
from gateway.settings import GatewaySettings

log = logging.getLogger("vllm_gateway.reload")
RESULTS = ("applied", "rejected", "dry_run")
WATCH_INTERVAL = 1.0  # seconds between looks at the config file, with `watch_config`


class ConfigRejected(InvalidRequest):
    """A reload whose file does not validate, or whose plan cannot be applied."""

    code = "config_rejected"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("The config was not reloaded: " + "; ".join(problems))
        self.problems = problems


class Reloader:
    def __init__(
        self,
        runtime: Runtime,
        path: str | Path | None,
        overrides: Mapping[str, Any] | None = None,
        gpu_count: int | None = None,
    ) -> None:
        """``path``: the config file (None: a gateway built from settings, which only reloads
        its keys file); ``overrides``: what the command line set over the file (host, port);
        ``gpu_count``: the GPUs plans are checked against (None: ask the driver)."""
        self.runtime = runtime
        self.path = Path(path) if path is not None else None
        self.overrides = dict(overrides or {})
        self.gpu_count = gpu_count
        self.generation = 1
        self.digest = _digest(self.path)
        self.last: dict[str, Any] | None = None  # when, by whom, the result, what changed
        self.counts = dict.fromkeys(RESULTS, 0)
        self.applied = Signal()  # fires after each reload that changed something
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self._watch: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._follow(self.runtime.settings.watch_config)

    def _follow(self, watch: bool) -> None:
        """Watch the file from now on (or stop), as `watch_config` says."""
        if watch and self._watch is None and self.path is not None:
            self._watch = asyncio.create_task(self._watch_file(Settled(self.path)))
        elif not watch and self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def stop(self) -> None:
        tasks = [t for t in (self._watch, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def reload_soon(self, by: str) -> None:
        """For a signal handler, which cannot await: a rejection is logged and counted."""
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(self._quietly(by))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _quietly(self, by: str) -> object:
        try:
            return await self.reload(by)
        except ConfigRejected:
            return None  # logged and counted by reload

    async def reload(self, by: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Read, check, and (unless ``dry_run``) apply the config; the plan as a document.
        ConfigRejected when nothing may change."""
        async with self._lock:
            began = time.monotonic()
            if self.path is None:
                await self.runtime.keys.reload()
                return {"generation": self.generation, "models": [], "refused": []}
            try:
                new = await asyncio.to_thread(load_settings, self.path, **self.overrides)
            except ConfigError as exc:
                raise self._rejected(by, exc.problems, began) from None
            plan = plan_reload(self.runtime.settings, new, self.gpu_count)
            if plan.refused:
                raise self._rejected(by, plan.refused, began)
            if dry_run:
                self._done(by, "dry_run", plan, began)
                return {"dry_run": True, "generation": self.generation, **plan.document()}
            try:
                keys = key_ring(new)
            except ConfigError as exc:  # its keys file does not validate
                raise self._rejected(by, exc.problems, began) from None
            await self._apply(new, plan, keys)
            self._follow(new.watch_config)
            self.generation += 1
            self.applied.fire()
            self.digest = _digest(self.path)
            self._done(by, "applied", plan, began)
            return {"generation": self.generation, **plan.document()}

    async def _apply(self, new: GatewaySettings, plan: ReloadPlan, keys: KeyRing) -> None:
        runtime, old = self.runtime, self.runtime.settings
        models = {m.name: m for m in new.models}
        for name in plan.of("start"):
            await runtime.add_model(models[name], new)
        await runtime.use(new, keys)  # routes: new models in, removed ones out; settings in place
        await asyncio.gather(
            *(runtime.remove_model(n, drain_timeout(old, n)) for n in plan.of("stop"))
        )
        for name in plan.of("restart"):
            log.info("%s: restarting for the new config", name)
            await runtime.restart_model(models[name], new)

    def _rejected(self, by: str, problems: list[str], began: float) -> ConfigRejected:
        log.error("config not reloaded (%s): %s", by, "; ".join(problems))
        self._record(by, "rejected", began, problems=problems)
        return ConfigRejected(problems)

    def _done(self, by: str, result: str, plan: ReloadPlan, began: float) -> None:
        changed = [c for c in plan.changes if c.action != "unchanged"]
        summary = ", ".join(f"{c.name}: {c.action}" for c in changed) or "nothing changed"
        log.info("config %s (%s): %s", result.replace("_", " "), by, summary)
        self._record(by, result, began, changes={c.name: c.action for c in changed})

    def _record(self, by: str, result: str, began: float, **details: Any) -> None:
        self.counts[result] += 1
        self.last = {"at": time.time(), "by": by, "result": result, **details}
        seconds = time.monotonic() - began
        self.runtime.telemetry.admin_action(by, "reload", "-", result, seconds)

    def document(self) -> dict[str, Any]:
        """For /status.json: the generation in force and the last reload."""
        return {"generation": self.generation, "sha256": self.digest, "last_reload": self.last}

    async def _watch_file(self, file: Settled) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            if file.look():
                await self._quietly("watch")


class ReloadCollector(Collector):
    """`vllm_gateway_config_reloads_total{result}`."""

    def __init__(self, reloader: Reloader) -> None:
        self.reloader = reloader

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "vllm_gateway_config_reloads", "Config reloads, by result", labels=["result"]
        )
        for result, count in self.reloader.counts.items():
            family.add_metric([result], count)
        yield family


def _digest(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None

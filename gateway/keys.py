"""API keys: who a request comes from, which models it may reach, and how fast.

Keys come from three places, all active at once: the config's `api_keys`, the environment
(VLLM_GATEWAY_API_KEYS, and VLLM_GATEWAY_MONITOR_KEYS for monitor keys, comma-separated) and an
optional keys file. Admin keys come from the config or the keys file only. Only SHA-256 digests are
kept in memory; a presented key is hashed and its digest looked up in a dict. That lookup's
timing can say something about a digest, never about a key (SHA-256 has no known preimage
attack), and unlike comparing against every key it costs the same for 3 keys or 20,000. The
keys file is re-read when it changes and on SIGHUP, so a key rotates without a restart; a file
that no longer validates leaves the previous keys in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.access_settings import KeySettings
from gateway.config_file import ConfigError, load_keys_file
from gateway.settings import GatewaySettings
from gateway.traffic.priorities import LAST, number

log = logging.getLogger("vllm_gateway.keys")

# Where the auth middleware leaves the caller's ApiKey for the layers below it.
SCOPE_KEY = "vllm_gateway.api_key"


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes
    models: frozenset[str] | None  # canonical model names; None: every model
    requests_per_minute: int | None = None
    max_concurrent: int | None = None
    admin: bool = False  # everything, /admin/* included
    monitor: bool = False  # the ops surfaces (metrics, status), read only
    max_wait: float | None = None  # seconds its requests wait for an on-demand model, unless
    # they say otherwise (x-vllm-gateway-max-wait)
    priority: int = 0  # where its requests wait in a queue: lower goes first
    priorities: tuple[int, int] = (0, LAST)  # first and last a request may ask for
    weight: float = 1.0  # its share of turns among keys of one priority

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.max_concurrent is not None


def digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class KeyRing:
    """The keys in force. ``canonical`` maps every model name and alias to its model's name."""

    def __init__(
        self,
        static: Iterable[ApiKey],
        canonical: Mapping[str, str],
        keys_file: str | Path | None = None,
        runtime_adapters: bool = False,
    ) -> None:
        """``runtime_adapters``: a key may name a model not configured, an adapter that may be
        loaded at runtime."""
        self._static = list(static)
        self._canonical = dict(canonical)
        self._any_name = runtime_adapters
        self._path = Path(keys_file) if keys_file is not None else None
        self._stamp: tuple[int, int, int] | None = None
        self._reloads: set[asyncio.Task[bool]] = set()
        self._settling: tuple[int, int, int] | None = None  # a change seen by the last look
        self._use(self._static)
        if self._path is not None:
            self._use(self._static + self._read_file(self._path))
            self._stamp = _stamp(self._path)

    @property
    def enabled(self) -> bool:
        """Whether keys are required at all: an empty keys file still locks the gateway."""
        return bool(self._static) or self._path is not None

    def identify(self, presented: bytes) -> ApiKey | None:
        return self._by_digest.get(digest(presented))

    def _use(self, keys: list[ApiKey]) -> None:
        self._keys = keys
        self._by_digest = {key.digest: key for key in keys}  # a repeated key: the last entry

    async def reload(self) -> bool:
        """Re-read the keys file; on a bad file keep the keys in force and say why.

        Read in a worker thread: a file of many thousands of keys takes a noticeable time to
        parse, which the event loop must not wait for. A file that changed while it was read is
        not applied; the watcher reads it again once it has settled.
        """
        if self._path is None:
            return False
        stamp = _stamp(self._path)
        if stamp is not None and stamp[1] == 0:
            # Truncated by a writer that has not written yet; `keys: []` revokes every key.
            log.warning("keys file is empty: taken as being written, previous keys stay")
            return False
        try:
            keys = await asyncio.to_thread(self._read_file, self._path)
        except ConfigError as exc:
            log.error("keys file not reloaded, previous keys stay: %s", exc)
            return False
        if _stamp(self._path) != stamp:
            log.info("keys file changed while it was read; reading it again once it settles")
            self._stamp = None
            return False
        self._use(self._static + keys)
        self._stamp = stamp
        log.info("keys file reloaded: %d keys", len(self._keys))
        return True

    def reload_soon(self) -> None:
        """For a signal handler, which cannot await."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def watch(self, interval: float = 1.0) -> None:
        """Reload when the keys file changes (mtime, size or inode: editors and rename)."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(interval)
            await self.look()

    async def look(self) -> None:
        """One look at the keys file. A change is applied once two looks in a row agree, so a
        file still being written (truncated, half-written) is not taken for the new keys.
        Replacing the file by a rename is the way to make a change in one step."""
        assert self._path is not None
        stamp = _stamp(self._path)
        if stamp is None or stamp == self._stamp:
            return
        if stamp == self._settling:
            self._stamp = stamp  # a file that does not validate is not read again until it changes
            await self.reload()
        self._settling = stamp

    def _read_file(self, path: Path) -> list[ApiKey]:
        entries = load_keys_file(path).keys
        known = None if self._any_name else self._canonical
        problems = _problems(entries, known, taken={k.name for k in self._static})
        if problems:
            raise ConfigError(str(path), problems)
        return [api_key(entry, self._canonical) for entry in entries]


def key_ring(settings: GatewaySettings) -> KeyRing:
    """The keys of a config. Raises ConfigError for a keys file that does not validate."""
    canonical = settings.canonical_names
    static = [api_key(entry, canonical) for entry in settings.api_keys]
    return KeyRing(static, canonical, settings.keys_file, settings.runtime_adapters)


def api_key(entry: KeySettings, canonical: Mapping[str, str]) -> ApiKey:
    secret = (
        digest(entry.key.get_secret_value())
        if entry.key is not None
        else bytes.fromhex(entry.sha256 or "")
    )
    # A name the config does not know may be a runtime adapter's: it stands for itself.
    models = None if entry.models is None else frozenset(canonical.get(m, m) for m in entry.models)
    return ApiKey(
        entry.name,
        secret,
        models,
        entry.requests_per_minute,
        entry.max_concurrent,
        admin=entry.admin,
        monitor=entry.monitor or entry.admin,
        max_wait=entry.max_wait,
        priority=number(entry.priority),
        priorities=entry.priorities,
        weight=entry.weight,
    )


def _problems(
    entries: list[KeySettings], canonical: Mapping[str, str] | None, taken: set[str]
) -> list[str]:
    """``canonical`` None: any model name goes (it may be a runtime adapter's)."""
    problems = []
    seen = set(taken)
    for entry in entries:
        if entry.name in seen:
            problems.append(f"keys.{entry.name}: the name is used twice")
        seen.add(entry.name)
        problems += [
            f"keys.{entry.name}: model {m!r} is not configured"
            for m in entry.models or []
            if canonical is not None and m not in canonical
        ]
    return problems


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)

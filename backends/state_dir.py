"""What a restarted gateway needs to find the servers the last one left running.

One JSON file per spawned server, written when it starts and removed when it is ended on
purpose: its process group (the reaper's pid), that process's start time (so a reused pid is
never mistaken for it), where it listens, its backend key, and a hash of what it was started
with, and, for an on-demand server put to sleep, the level it sleeps at (a wake needs it).
The directory is the gateway's own (0700) and each file 0600: a record holds a key.
A record is written to a temporary file and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from backends.errors import BackendError

RECORD_SUFFIX = ".json"


class StateDirInUse(BackendError):
    """Another gateway holds this state directory: it would adopt or end that one's servers."""


@dataclass(frozen=True)
class ServerRecord:
    label: str  # the server's label: model name, with `#replica` when it has several
    pgid: int  # the reaper's pid, which leads the server's whole process group
    start_time: int  # the reaper's start time, /proc's clock ticks since boot
    api_key: str
    command_hash: str
    port: int | None = None  # a TCP server on 127.0.0.1
    uds: str | None = None  # or a server on a unix socket
    asleep_level: int = 0  # an on-demand server put to sleep: the level it sleeps at; 0 awake

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" if self.uds is None else "http://backend"


def command_hash(command: Sequence[str], environment: Mapping[str, str]) -> str:
    """A hash of what a server was started with, less what changes at every start (its
    address and key: pass the command with placeholders). ``environment`` is what the config
    sets (the model's `env` and its GPUs), not the gateway's whole environment, which differs
    between two shells without changing the server."""
    text = json.dumps([list(command), sorted(environment.items())], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class StateDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: int | None = None

    def _make(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)  # made by an older gateway, or by mkdir under a umask

    def lock(self) -> None:
        """Hold the directory while this gateway runs (the kernel lets go when it dies, even
        by SIGKILL); StateDirInUse if another live gateway holds it."""
        if self._lock is not None:
            return
        self._make()
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirInUse(
                f"{self.path} is used by another running gateway: give each gateway its own "
                "`state_dir` (or `log_dir`)"
            ) from None
        self._lock = fd

    def unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _file(self, label: str) -> Path:
        return self.path / (quote(label, safe="#") + RECORD_SUFFIX)  # a name may hold "/"

    def save(self, record: ServerRecord) -> None:
        self._make()
        target = self._file(record.label)
        temporary = target.with_suffix(".tmp")
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(record), out)
        os.replace(temporary, target)

    def remove(self, label: str) -> None:
        self._file(label).unlink(missing_ok=True)

    def records(self) -> list[ServerRecord]:
        """Every readable record; a file that is not one (cut short, edited) is dropped."""
        found = []
        for path in sorted(self.path.glob("*" + RECORD_SUFFIX)):
            try:
                found.append(ServerRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                with contextlib.suppress(OSError):
                    path.unlink()
        return found

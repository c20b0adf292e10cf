"""Noticing that a file changed, once it has settled: the keys file and the config.

A change counts once two looks in a row agree, so a file still being written (truncated,
half-written) is not taken for the new one. Replacing a file by a rename is the way to make a
change in one step.
"""

from __future__ import annotations

import os
from pathlib import Path

Stamp = tuple[int, int, int]  # mtime (ns), size, inode: editors that rename change the inode


def stamp(path: Path) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class Settled:
    """Says, look by look, whether a file has changed since it was last taken and settled."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.taken: Stamp | None = stamp(path)  # what was read last
        self._settling: Stamp | None = None  # a change seen by the last look

    def look(self) -> bool:
        """True once for each change that two looks in a row agree on; it is then taken (a
        file that does not validate is not read again until it changes)."""
        now = stamp(self.path)
        if now is None or now == self.taken:
            return False
        settled = now == self._settling
        if settled:
            self.taken = now
        self._settling = now
        return settled

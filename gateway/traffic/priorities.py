"""Request priorities: a few names for the integers they stand for, and the header that asks
for one.

A priority is an integer in vLLM's sense: the lower goes first (a model whose servers run
`--scheduling-policy priority` gets the same number in the body's `priority`, so vLLM's
scheduler agrees with the gateway's queue). The names cover what most configs need.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from gateway.errors import InvalidPriority

PRIORITY_HEADER = b"x-vllm-gateway-priority"
NAMES = {"interactive": -10, "default": 0, "batch": 10}
FIRST, LAST = -1000, 1000  # the integers a priority may be


def _known(priority: int | str) -> int | str:
    if isinstance(priority, str) and priority not in NAMES:
        raise ValueError(f"a priority is one of {', '.join(NAMES)} or an integer")
    if isinstance(priority, int) and not FIRST <= priority <= LAST:
        raise ValueError(f"an integer priority lies from {FIRST} to {LAST}")
    return priority


# What the config accepts for a priority: a name, or an integer from FIRST to LAST.
PriorityValue = Annotated[int | str, AfterValidator(_known)]


def number(priority: PriorityValue) -> int:
    """The integer a configured priority stands for."""
    return NAMES[priority] if isinstance(priority, str) else priority


def parse(raw: bytes) -> int:
    """The priority a header asks for: a name or an integer; InvalidPriority otherwise."""
    text = raw.decode("latin-1").strip().lower()
    if text in NAMES:
        return NAMES[text]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not FIRST <= value <= LAST:
        raise InvalidPriority(
            f"{PRIORITY_HEADER.decode()} must be one of {', '.join(NAMES)} or an integer "
            f"from {FIRST} to {LAST} (lower goes first); got {text[:40]!r}."
        )
    return value


def describe(priority: int) -> str:
    """A priority as people read it: its name, if it has one."""
    return next((name for name, value in NAMES.items() if value == priority), str(priority))

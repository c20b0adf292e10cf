"""Waiting for a server the benchmarks started: until a URL answers 200."""

from __future__ import annotations

import time

import httpx


def wait_http(url: str, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)

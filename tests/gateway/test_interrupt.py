"""How a relay learns that its client left (gateway.interrupt), without a server or a socket."""

from __future__ import annotations

from gateway.interrupt import ClientGone


def test_a_departure_before_anyone_listens_is_told_to_the_listener_at_once() -> None:
    """The connection can go before the relay has got as far as listening."""
    gone, told = ClientGone(), []
    gone.notify()
    gone.callback = lambda: told.append("gone")
    assert told == ["gone"]


def test_a_departure_is_told_once() -> None:
    gone, told = ClientGone(), []
    gone.callback = lambda: told.append("gone")
    gone.notify()
    gone.notify()
    assert told == ["gone"] and gone.left

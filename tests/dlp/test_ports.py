"""free_port: outside the ephemeral range and Ray's worker ports, bindable, never repeated."""

from __future__ import annotations

import socket

import pytest

from dlp import ports
from dlp.ports import LOW, ephemeral_range, free_port


def test_ports_are_outside_the_ephemeral_range_bindable_and_distinct() -> None:
    low, high = ephemeral_range()
    assert low <= high
    picked = [free_port() for _ in range(50)]
    assert len(set(picked)) == len(picked)
    for port in picked:
        assert LOW <= port < low
    with socket.socket() as s:
        s.bind(("", picked[0]))  # free on all interfaces, as a server would bind it


def test_a_port_in_use_is_not_handed_out(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as held:
        held.bind(("", 0))
        busy = held.getsockname()[1]
        held.listen()
        # a window holding only the busy port and one more: the other one comes back
        monkeypatch.setattr(ports, "LOW", busy)
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (busy + 2, busy + 3))
        monkeypatch.setattr(ports, "_handed_out", set())
        if not ports._bindable(busy + 1):
            pytest.skip("the neighbouring port is taken on this machine")
        assert free_port() == busy + 1


def test_an_empty_window_falls_back_to_an_os_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "ephemeral_range", lambda: (LOW, LOW + 100))
    monkeypatch.setattr(ports, "LOW", LOW + 100)
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))

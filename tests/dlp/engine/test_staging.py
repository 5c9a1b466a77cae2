"""StagingBuffer: named fields in one host and one device buffer, one copy."""

from __future__ import annotations

import numpy as np
import torch

from dlp.engine.staging import StagingBuffer


def test_fields_round_trip_through_one_upload():
    buf = StagingBuffer(
        {"tokens": (torch.long, 7), "scales": (torch.float32, 6), "flags": (torch.long, 3)},
        torch.device("cpu"),
    )
    buf.host("tokens")[:] = np.arange(7)
    buf.host("scales").reshape(2, 3)[1] = [0.5, -1.0, 2.0]
    buf.host("flags")[:] = [9, 8, 7]
    assert buf.device("tokens").tolist() == [0] * 7  # nothing sent yet
    buf.upload()
    assert buf.device("tokens").dtype == torch.long
    assert buf.device("tokens").tolist() == list(range(7))
    assert buf.device("scales").view(2, 3)[1].tolist() == [0.5, -1.0, 2.0]
    assert buf.device("scales").view(2, 3)[0].tolist() == [0.0, 0.0, 0.0]
    assert buf.device("flags").tolist() == [9, 8, 7]


def test_fields_do_not_overlap_and_views_are_stable():
    buf = StagingBuffer({"a": (torch.float32, 5), "b": (torch.long, 2)}, torch.device("cpu"))
    a, b = buf.device("a"), buf.device("b")
    assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
    assert b.data_ptr() >= a.data_ptr() + 5 * 4
    buf.host("a")[:] = 1.0
    buf.host("b")[:] = -1
    buf.upload()
    # The same device memory every time: captured graphs keep reading these addresses.
    assert buf.device("a").data_ptr() == a.data_ptr()
    assert a.tolist() == [1.0] * 5 and b.tolist() == [-1, -1]


def test_a_snapshot_upload_lets_the_host_buffer_change_at_once():
    """Overlapped steps queue the next upload before the last copy has run: a snapshot upload
    sends what the buffer held when it was called, through alternating transfer buffers."""
    buf = StagingBuffer({"tokens": (torch.long, 4)}, torch.device("cpu"))
    sent = []
    for step in range(5):
        buf.host("tokens")[:] = [step, step + 1, step + 2, step + 3]
        buf.upload(snapshot=True)
        buf.host("tokens")[:] = -1  # rewritten right after the call
        sent.append(buf.device("tokens").tolist())
    assert sent == [[s, s + 1, s + 2, s + 3] for s in range(5)]
    assert len(buf._spares) == 2 and buf._spares[0].data_ptr() != buf._spares[1].data_ptr()

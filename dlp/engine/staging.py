"""Inputs of a forward staged in one host buffer and sent over in one copy.

In a serving process every torch call releases the GIL, and getting it back while Ray's
threads run Python can take up to a switch interval. A prefill that built, padded and copied
its inputs tensor by tensor made ~15 such calls around one graph replay, and measured ~10 ms
more per call in the server than alone. Here the caller writes plain numpy views of a pinned
host buffer (no torch call, the GIL is kept) and :meth:`StagingBuffer.upload` sends the whole
buffer with one non-blocking copy into a device buffer whose views the captured graphs read.

The host buffer may be rewritten only after the copy has run, which a caller that reads each
forward's output back before the next one always waits for. A caller that queues the next
forward before the previous one has finished (overlapped decode steps) uploads a *snapshot*
instead: the host buffer is copied into one of two pinned transfer buffers (a plain memcpy of
a few KB) and the device copy reads that one, so the host buffer may be rewritten at once;
a transfer buffer is reused only after its previous copy has run (an event, two uploads back).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

_ALIGN = 16  # bytes: every field starts aligned for any dtype's view


class StagingBuffer:
    """Named flat fields (dtype, length) packed into one host and one device buffer."""

    def __init__(self, fields: Mapping[str, tuple[torch.dtype, int]], device: torch.device):
        self._layout: dict[str, tuple[torch.dtype, int, int]] = {}
        offset = 0
        for name, (dtype, numel) in fields.items():
            offset = -(-offset // _ALIGN) * _ALIGN
            size = torch.empty((), dtype=dtype).element_size() * numel
            self._layout[name] = (dtype, offset, size)
            offset += size
        nbytes = max(_ALIGN, -(-offset // _ALIGN) * _ALIGN)
        # Pinned memory makes the copy truly asynchronous; it needs a CUDA device.
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
        self._device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._host_np = {name: self._view(self._host, name).numpy() for name in self._layout}
        # Snapshot uploads: two pinned transfer buffers (made on first use) and, on CUDA, the
        # event of each one's last copy.
        self._spares: list[torch.Tensor] = []
        self._spare_done: list[torch.cuda.Event | None] = [None, None]
        self._next_spare = 0

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        dtype, offset, size = self._layout[name]
        return buf[offset : offset + size].view(dtype)

    def device(self, name: str) -> torch.Tensor:
        """The field on the device (flat; reshape a prefix for a bucket's shape)."""
        return self._view(self._device, name)

    def host(self, name: str) -> np.ndarray:
        """The field in the pinned host buffer, as a numpy array writes go straight into."""
        return self._host_np[name]

    def upload(self, snapshot: bool = False) -> None:
        """Every field to the device in one copy, queued on the current stream. With
        ``snapshot`` the copy reads a snapshot of the host buffer, which may then be rewritten
        before the copy has run."""
        if not snapshot:
            self._device.copy_(self._host, non_blocking=True)
            return
        on_cuda = self._device.is_cuda
        if not self._spares:
            self._spares = [torch.empty_like(self._host, pin_memory=on_cuda) for _ in "ab"]
        i = self._next_spare
        self._next_spare = 1 - i
        done = self._spare_done[i]
        if done is not None:
            done.synchronize()  # its copy was queued two uploads ago: normally long done
        self._spares[i].copy_(self._host)
        self._device.copy_(self._spares[i], non_blocking=True)
        if on_cuda:
            event = torch.cuda.Event()
            event.record()
            self._spare_done[i] = event

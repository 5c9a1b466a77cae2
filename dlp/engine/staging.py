"""Inputs of a forward staged in one host buffer and sent over in one copy.

In a serving process every torch call releases the GIL, and getting it back while Ray's
threads run Python can take up to a switch interval. A prefill that built, padded and copied
its inputs tensor by tensor made ~15 such calls around one graph replay, and measured ~10 ms
more per call in the server than alone. Here the caller writes plain numpy views of a pinned
host buffer (no torch call, the GIL is kept) and :meth:`StagingBuffer.upload` sends the whole
buffer with one non-blocking copy into a device buffer whose views the captured graphs read.

The host buffer may be rewritten only after the forward that read it has been synchronised
(the engine reads every forward's tokens back before the next one, so it always is).
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

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        dtype, offset, size = self._layout[name]
        return buf[offset : offset + size].view(dtype)

    def device(self, name: str) -> torch.Tensor:
        """The field on the device (flat; reshape a prefix for a bucket's shape)."""
        return self._view(self._device, name)

    def host(self, name: str) -> np.ndarray:
        """The field in the pinned host buffer, as a numpy array writes go straight into."""
        return self._host_np[name]

    def upload(self) -> None:
        """Every field to the device in one copy, queued on the current stream."""
        self._device.copy_(self._host, non_blocking=True)

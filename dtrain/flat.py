"""Many tensors as one flat buffer, for collectives that move one buffer faster than a list of tensors.

Gradients allocated as views that tile one 1-D buffer in order (``flat_views``; DDP's
``gradient_as_bucket_view``) are reduced as that buffer with no copy (``tiled_base`` finds it); any other
list is packed into a buffer kept between calls (``Packer``) and unpacked after. No collective here:
``dtrain.dist`` sums what these hand it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Alloc = Callable[[int, torch.dtype, torch.device], torch.Tensor]  # a zeroed 1-D buffer


def zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(numel, dtype=dtype, device=device)


def flat_views(like: Sequence[torch.Tensor], extra: int = 0, dtype: torch.dtype = torch.float32,
               alloc: Alloc = zeros) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Zeroed tensors shaped as ``like``, plus ``extra`` more elements, all views into one new buffer
    from ``alloc``. Returns ``(views, tail)``."""
    device = like[0].device if like else torch.device("cpu")
    buf = alloc(sum(t.numel() for t in like) + extra, dtype, device)
    views, offset = [], 0
    for t in like:
        views.append(buf[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views, buf[offset:]


def tiled_base(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The 1-D contiguous buffer that ``tensors`` tile exactly, in order and with no gap, if they do."""
    base = tensors[0]._base if tensors[0]._base is not None else tensors[0]
    if base.dim() != 1 or not base.is_contiguous():
        return None
    offset = base.storage_offset()
    for t in tensors:
        if (t is not base and t._base is not base) or not t.is_contiguous() or t.storage_offset() != offset:
            return None
        offset += t.numel()
    return base if offset == base.storage_offset() + base.numel() else None


class Packer:
    """Packs lists of tensors of one dtype and device into buffers kept by name between calls."""

    def __init__(self, alloc: Alloc = zeros):
        self._alloc = alloc
        self._buffers: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    def pack(self, tensors: Sequence[torch.Tensor], name: str) -> torch.Tensor:
        """``tensors`` (one dtype and device) laid end to end in ``name``'s buffer."""
        dtype, dev = tensors[0].dtype, tensors[0].device
        numel = sum(t.numel() for t in tensors)
        buf = self._buffers.get((name, dtype, dev))
        if buf is None or buf.numel() != numel:
            buf = self._buffers[(name, dtype, dev)] = self._alloc(numel, dtype, dev)
        torch.cat([t.reshape(-1) for t in tensors], out=buf)
        return buf

    @staticmethod
    def unpack(buf: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``buf`` back into ``tensors``, as ``pack`` laid them out."""
        offset = 0
        for t in tensors:
            t.copy_(buf[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()

    def clear(self) -> None:
        self._buffers.clear()

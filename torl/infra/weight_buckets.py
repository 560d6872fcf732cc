"""Buckets for streaming weights from the learner to the engines: which tensors travel together, and their bytes.

A push broadcasts the model in buckets of about ``bucket_bytes``: each bucket is the tensors' bytes laid end to end
in one uint8 buffer, so one collective call moves many small tensors (norms, biases) and no process ever holds more
than one bucket beyond its model. Both ends compute the same plan from the same metadata (names, dtypes, shapes in
the sender's order), so only the metadata crosses the control plane; the bytes cross the collective group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorMeta:
    """One tensor of a push as the receiver must rebuild it."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices of ``metas`` grouped in order into buckets of at most ``bucket_bytes`` (a bigger tensor goes alone).

    Order is kept so a sender can fill a bucket while iterating its parameters layer by layer (an FSDP gather per
    tensor) without looking ahead.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, meta in enumerate(metas):
        size = meta.nbytes
        if current and filled + size > bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += size
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes end to end in one flat uint8 CPU buffer (the unit one broadcast moves)."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    if len(parts) == 1:
        return parts[0]  # a tensor bigger than a bucket travels alone: its own bytes, not a copy of them
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack(buffer: torch.Tensor, metas: Sequence[TensorMeta]) -> list[torch.Tensor]:
    """Views of ``buffer`` shaped and typed as ``metas`` (the inverse of ``pack``); raises when the sizes disagree."""
    total = sum(m.nbytes for m in metas)
    if buffer.numel() != total:
        raise ValueError(f"bucket holds {buffer.numel()} bytes but its tensors need {total}")
    out, at = [], 0
    for m in metas:
        out.append(buffer[at : at + m.nbytes].view(m.dtype).view(m.shape))
        at += m.nbytes
    return out


def bucket_bytes_of(metas: Sequence[TensorMeta], bucket: Sequence[int]) -> int:
    return sum(metas[i].nbytes for i in bucket)

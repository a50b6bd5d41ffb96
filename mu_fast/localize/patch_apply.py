"""Batched patch apply: copy groups of features (heads, neurons, layer outputs) of another run's
activations into chosen rows of a batched forward.

``patch_apply`` dispatches between the Triton kernel (``mu_fast.kernels.patch_apply``) and
``patch_apply_reference`` (plain PyTorch). For every patch q, at every position t with
``pos_mask[src_rows[q], t]``: ``x[dst_rows[q], t, group q] = other[src_rows[q], t, group q]``.
"""

from __future__ import annotations

import torch

from mu_fast.localize.attribution_reduce import resolve_backend


def patch_apply_reference(
    x: torch.Tensor,
    other: torch.Tensor,
    dst_rows: torch.Tensor,
    src_rows: torch.Tensor,
    groups: torch.Tensor,
    group_size: int,
    pos_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch patch apply on ``x [R, T, F]`` in place from ``other [B, T, F]``; returns ``x``."""
    R, T, F = x.shape
    x4 = x.view(R, T, F // group_size, group_size)
    o4 = other.view(other.shape[0], T, F // group_size, group_size)
    src = o4[src_rows, :, groups, :]  # [Q, T, S]
    if pos_mask is not None:
        src = torch.where(pos_mask.bool()[src_rows][:, :, None], src, x4[dst_rows, :, groups, :])
    x4[dst_rows, :, groups, :] = src
    return x


def patch_apply(
    x: torch.Tensor,
    other: torch.Tensor,
    dst_rows: torch.Tensor,
    src_rows: torch.Tensor,
    groups: torch.Tensor,
    group_size: int,
    pos_mask: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Patch ``x [R, T, F]`` in place from ``other [B, T, F]``: dst_rows / src_rows / groups are ``[Q]``
    int64; group q covers features ``groups[q]·group_size`` to ``(groups[q]+1)·group_size``. pos_mask:
    ``[B, T]`` bool (positions to patch, indexed by source row) or None for all. Returns ``x``."""
    if backend != "torch" and resolve_backend(backend, x.device) == "triton" and x.is_contiguous():
        from mu_fast.kernels.patch_apply import patch_apply_triton

        return patch_apply_triton(x, other.contiguous(), dst_rows, src_rows, groups, group_size, pos_mask)
    return patch_apply_reference(x, other, dst_rows, src_rows, groups, group_size, pos_mask)

"""Batched patch apply: copy one group of features of another run's activation into chosen batch rows.

For each patch q (Q in total), at every position t with pos_mask[src_row[q], t] set:

    x[dst_row[q], t, g·S:(g+1)·S] = other[src_row[q], t, g·S:(g+1)·S],   g = group[q]

x: ``[R, T, F]`` activations of the batched forward (R = K variants × B prompts), patched in place;
other: ``[B, T, F]`` the other run's activations at the same site; group size S = d_head for a head on the
``o_proj`` input, 1 for a neuron on the ``down_proj`` input, d_model for a layer output. Each launch reads
and writes 2 × Q × T × S elements; rows and groups not named are never touched.

Design and limits: a program copies one patch's [T·S] slab block by block with int64 offsets, so many
(variant, component) pairs at one site take one launch; overlapping patches of the same row and group are
allowed only when they copy the same values (which is the case for one patch list per site).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per program: large enough to amortise index math, small enough for many programs at batch 1.
BLOCK = 1024


@triton.jit
def _patch_apply_kernel(
    x_ptr,
    other_ptr,
    dst_row_ptr,
    src_row_ptr,
    group_ptr,
    pos_mask_ptr,
    n_pos,
    n_feat,
    group_size,
    HAS_POS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    q = tl.program_id(0)
    block = tl.program_id(1).to(tl.int64)
    dst = tl.load(dst_row_ptr + q).to(tl.int64)
    src = tl.load(src_row_ptr + q).to(tl.int64)
    grp = tl.load(group_ptr + q).to(tl.int64)
    e = block * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_pos * group_size
    t = e // group_size
    s = e % group_size
    if HAS_POS_MASK:
        keep = tl.load(pos_mask_ptr + src * n_pos + t, mask=mask, other=0) != 0
        mask = mask & keep
    col = grp * group_size + s
    vals = tl.load(other_ptr + (src * n_pos + t) * n_feat + col, mask=mask)
    tl.store(x_ptr + (dst * n_pos + t) * n_feat + col, vals, mask=mask)


def patch_apply_triton(
    x: torch.Tensor,
    other: torch.Tensor,
    dst_rows: torch.Tensor,
    src_rows: torch.Tensor,
    groups: torch.Tensor,
    group_size: int,
    pos_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy ``other[src_rows[q], :, group q]`` into ``x[dst_rows[q], :, group q]`` in place; returns ``x``.

    x: ``[R, T, F]`` and other: ``[B, T, F]``, contiguous, same dtype and device. dst_rows / src_rows /
    groups: ``[Q]`` integer tensors on that device. pos_mask: ``[B, T]`` (indexed by src row) or None for
    all positions.
    """
    if x.dim() != 3 or other.dim() != 3 or x.shape[1:] != other.shape[1:]:
        raise ValueError(f"x [R, T, F] and other [B, T, F] must share T and F; got {tuple(x.shape)} and {tuple(other.shape)}")
    if x.dtype != other.dtype or x.device != other.device:
        raise ValueError(f"x and other must share dtype and device; got {x.dtype}/{x.device} and {other.dtype}/{other.device}")
    if not (x.is_contiguous() and other.is_contiguous()):
        raise ValueError("x and other must be contiguous")
    _, T, F = x.shape
    if group_size <= 0 or F % group_size:
        raise ValueError(f"group_size={group_size} must divide the feature size {F}")
    n = dst_rows.numel()
    if src_rows.numel() != n or groups.numel() != n:
        raise ValueError(f"dst_rows, src_rows and groups must have equal lengths; got {n}, {src_rows.numel()}, {groups.numel()}")
    if any(t.device != x.device for t in (dst_rows, src_rows, groups)):
        raise ValueError(f"dst_rows, src_rows and groups must be on {x.device}")
    if pos_mask is not None:
        if pos_mask.shape != (other.shape[0], T) or pos_mask.device != x.device:
            raise ValueError(f"pos_mask must be [B, T] = {(other.shape[0], T)} on {x.device}; got {tuple(pos_mask.shape)}")
        pos_mask = pos_mask.to(torch.int8).contiguous()
    if n == 0 or T == 0:
        return x
    grid = (n, triton.cdiv(T * group_size, BLOCK))
    _patch_apply_kernel[grid](
        x,
        other,
        dst_rows.contiguous(),
        src_rows.contiguous(),
        groups.contiguous(),
        pos_mask if pos_mask is not None else dst_rows,
        T,
        F,
        group_size,
        HAS_POS_MASK=pos_mask is not None,
        BLOCK=BLOCK,
    )
    return x

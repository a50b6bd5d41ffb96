"""Attribution reduce: per-row, per-group sums of gradient × activation difference.

    out[b, j] += Σ_t valid[b, t] · Σ_{s < S} grad[b, t, j·S + s] · delta[b, t, j·S + s]

grad, delta: ``[B, T, F]`` (F = G·S) in the model dtype; valid: ``[B, T]`` int8 (padding excluded) or None;
out: ``[B, G]`` float32/float64, accumulated in place. A group is an attention head (S = d_head on the
``o_proj`` input), an MLP neuron (S = 1 on the ``down_proj`` input) or a whole layer output (S = d_model).

Each launch reads grad and delta once (2 × element size bytes per element) and writes B·G scores; it is
called from a backward hook, which returns the gradient unchanged, so no gradient is ever stored.

Design and limits: a program owns one row and a block of BLOCK_F features and walks a slice of the
positions in [BLOCK_T, BLOCK_F] tiles, accumulating in the output dtype. When S is a power of two up to
``MAX_WHOLE_GROUP`` a block holds whole groups and is reduced with a reshape; otherwise (e.g. d_model =
3584) a block of at most S features touches at most two groups, reduced with two masked sums. Positions
are split over several programs when B × feature blocks alone would leave the GPU idle (batch 1, long
prompts); those programs, and the two-group case, combine with fp32/fp64 atomics, so results are not
bit-deterministic then (``t_splits=1`` with a power-of-two S restores determinism).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tiles of ~4k elements keep the fp32 accumulator at ~16 registers/thread with 8 warps.
TILE_ELEMENTS = 4096
# Largest power-of-two group (head dim) reduced with a reshape inside one block.
MAX_WHOLE_GROUP = 1024
# Programs wanted per launch before positions are split (≈ 4 waves on a 132-SM H100).
TARGET_PROGRAMS = 512


@triton.jit
def _attribution_reduce_kernel(
    grad_ptr,
    delta_ptr,
    valid_ptr,
    out_ptr,
    n_pos,
    n_feat,
    n_groups,
    group_size,
    pos_per_split,
    HAS_VALID: tl.constexpr,
    WHOLE_GROUPS: tl.constexpr,
    GROUP: tl.constexpr,
    USE_ATOMIC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    fblock = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    offs_f = fblock * BLOCK_F + tl.arange(0, BLOCK_F)
    fmask = offs_f < n_feat
    t_start = split * pos_per_split
    t_end = tl.minimum(t_start + pos_per_split, n_pos)
    acc_dtype = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_T, BLOCK_F], dtype=acc_dtype)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < t_end
        if HAS_VALID:
            keep = tl.load(valid_ptr + row * n_pos + offs_t, mask=tmask, other=0) != 0
            tmask = tmask & keep
        m2 = tmask[:, None] & fmask[None, :]
        offs = (row * n_pos + offs_t[:, None]) * n_feat + offs_f[None, :]
        g = tl.load(grad_ptr + offs, mask=m2, other=0.0).to(acc_dtype)
        d = tl.load(delta_ptr + offs, mask=m2, other=0.0).to(acc_dtype)
        # where() rather than relying on other=0: a NaN gradient at a padded position must not leak in.
        acc += tl.where(m2, g * d, 0.0)
    colsum = tl.sum(acc, axis=0)
    if WHOLE_GROUPS:
        per_group = tl.sum(tl.reshape(colsum, (BLOCK_F // GROUP, GROUP)), axis=1)
        offs_g = fblock * (BLOCK_F // GROUP) + tl.arange(0, BLOCK_F // GROUP)
        gmask = offs_g < n_groups
        if USE_ATOMIC:
            tl.atomic_add(out_ptr + row * n_groups + offs_g, per_group, mask=gmask)
        else:
            prev = tl.load(out_ptr + row * n_groups + offs_g, mask=gmask, other=0.0)
            tl.store(out_ptr + row * n_groups + offs_g, prev + per_group, mask=gmask)
    else:
        first = (fblock * BLOCK_F) // group_size
        boundary = (first + 1) * group_size
        in_first = offs_f < boundary
        s0 = tl.sum(tl.where(in_first, colsum, 0.0), axis=0)
        s1 = tl.sum(tl.where(in_first, 0.0, colsum), axis=0)
        tl.atomic_add(out_ptr + row * n_groups + first, s0)
        tl.atomic_add(out_ptr + row * n_groups + first + 1, s1, mask=first + 1 < n_groups)


def _prev_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def attribution_reduce_triton(
    grad: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
    t_splits: int | None = None,
) -> torch.Tensor:
    """``out[b, j] += Σ_t valid[b,t] Σ_s grad[b,t,j·S+s]·delta[b,t,j·S+s]`` in place; returns ``out``.

    grad, delta: ``[B, T, F]`` contiguous, same dtype and device. out: ``[B, F // group_size]`` float32 or
    float64, contiguous. valid: ``[B, T]`` int8/bool or None (every position counts). t_splits: programs
    per row along the positions (None: chosen from the launch size).
    """
    if grad.dim() != 3 or grad.shape != delta.shape:
        raise ValueError(f"grad and delta must both be [B, T, F]; got {tuple(grad.shape)} and {tuple(delta.shape)}")
    if grad.dtype != delta.dtype or grad.device != delta.device:
        raise ValueError(f"grad and delta must share dtype and device; got {grad.dtype}/{grad.device} and {delta.dtype}/{delta.device}")
    if not (grad.is_contiguous() and delta.is_contiguous() and out.is_contiguous()):
        raise ValueError("grad, delta and out must be contiguous; call .contiguous() on the caller side")
    B, T, F = grad.shape
    if group_size <= 0 or F % group_size:
        raise ValueError(f"group_size={group_size} must divide the feature size {F}")
    G = F // group_size
    if out.shape != (B, G) or out.dtype not in (torch.float32, torch.float64) or out.device != grad.device:
        raise ValueError(f"out must be a float32/float64 [B, G] = {(B, G)} tensor on {grad.device}; got {tuple(out.shape)} {out.dtype} on {out.device}")
    if valid is not None:
        if valid.shape != (B, T) or valid.device != grad.device:
            raise ValueError(f"valid must be [B, T] = {(B, T)} on {grad.device}; got {tuple(valid.shape)} on {valid.device}")
        valid = valid.to(torch.int8).contiguous()
    if B == 0 or T == 0 or F == 0:
        return out
    whole = group_size & (group_size - 1) == 0 and group_size <= MAX_WHOLE_GROUP
    if whole:
        block_f = max(group_size, min(512, triton.next_power_of_2(F)))
    else:
        block_f = min(MAX_WHOLE_GROUP, _prev_pow2(group_size))
    block_t = max(1, min(TILE_ELEMENTS // block_f, triton.next_power_of_2(T)))
    n_fblocks = triton.cdiv(F, block_f)
    if t_splits is None:
        t_splits = max(1, min(triton.cdiv(T, block_t), triton.cdiv(TARGET_PROGRAMS, B * n_fblocks)))
    t_splits = max(1, min(int(t_splits), T))
    pos_per_split = triton.cdiv(triton.cdiv(T, t_splits), block_t) * block_t
    t_splits = triton.cdiv(T, pos_per_split)
    grid = (B, n_fblocks, t_splits)
    _attribution_reduce_kernel[grid](
        grad,
        delta,
        valid if valid is not None else grad,
        out,
        T,
        F,
        G,
        group_size,
        pos_per_split,
        HAS_VALID=valid is not None,
        WHOLE_GROUPS=whole,
        GROUP=group_size if whole else 1,
        USE_ATOMIC=t_splits > 1,
        BLOCK_T=block_t,
        BLOCK_F=block_f,
        num_warps=8 if block_t * block_f >= 4096 else 4,
    )
    return out

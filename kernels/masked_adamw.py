"""Fused sparse-masked AdamW in Triton: one launch updates the active elements of every tensor of a dtype.

Math per active element (fp32; t = the parameter's step + 1; AdamW with decoupled decay, dense semantics on the
active set; the coefficients are per parameter slot, written by ``_adamw_scalars_kernel``):
    g = grad · clip · (−1 if maximize else 1)
    p = p · (1 − lr·wd)
    m = β1·m + (1 − β1)·g ;  v = β2·v + (1 − β2)·g²
    p = p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + ε)
Work is cut into tiles (mu_fast/optim/segments.py): one program per tile; a tile's row gives the parameter
slot, its segment geometry and its state offset. Parameter and gradient base addresses come from an int64
table ``addr[slot] = (param address, grad address or 0)`` built by the caller, so any number of tensors is
covered by one launch without kernel-argument limits. With compact gradients the gradient is read from the
fp32 compact buffer at the state offset instead.

Bytes per active element (bf16 p/g, fp32 m/v): read p 2, g 2, m 4, v 4; write p 2, m 4, v 4 = 22 B; with an
fp32 master copy, p is not read and the master is read and written (+8 B: 28 B); compact grads are fp32
(+2 B). The optional statistics pass (sum of squares for clipping and the non-finite check) reads g once
more. Limit: column selections of row-major weights are strided runs (one element per row for a single
neuron column), so such tiles move one 32-byte sector per element; row and head selections are contiguous.

Launches per step: ``grad_sumsq`` (optional; fp64 sums of squares, so no finite gradient overflows them),
``adamw_scalars`` (one program), ``masked_adamw_update``. The learning rate, bias corrections, gradient scale and
each parameter's apply flag (0: no gradient, or a skipped step; its tiles touch nothing) are device values: no
host sync, graph capturable. bf16 results are rounded to nearest even on the fp32 bits before the store, the
rounding the GPU's conversion does, because the CPU interpreter's conversion truncates.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Module constants read inside @triton.jit code must be tl.constexpr objects: a compiled (GPU) kernel may not read
# plain Python globals (the CPU interpreter allows it; tests/optim/test_triton_compile.py lowers every kernel to
# TTIR on the CPU to catch that).
_c = tl.constexpr
# Tile row fields; keep in sync with mu_fast/optim/segments.py.
_SLOT, _GROUP, _KIND, _BASE, _RUN_LEN, _RUN_STRIDE, _K0, _COUNT, _STATE0 = (_c(i) for i in range(9))
_TILE_FIELDS = _c(9)
# Coefficient table columns (per parameter slot) and control vector entries, written by _adamw_scalars_kernel;
# hyperparameter columns (per param group). Keep in sync with mu_fast/optim/bucket.py.
(C_BETA1, C_BETA2, C_EPS, C_DECAY, C_STEP_SIZE, C_INV_SQRT_BC2, C_ONE_MINUS_BETA1, C_ONE_MINUS_BETA2, C_GRAD_SCALE,
 C_APPLY) = (_c(i) for i in range(10))
COEF_FIELDS = _c(10)
K_SKIP, K_CLIP, K_NORM, K_SKIPPED = (_c(i) for i in range(4))
CONTROL_FIELDS = _c(4)
H_LR, H_BETA1, H_BETA2, H_EPS, H_WD, H_MAX_NORM, H_GRAD_SIGN = (_c(i) for i in range(7))
HYPER_FIELDS = _c(7)
_FP64_MAX = _c(1.7976931348623157e308)
# A 4096-element tile moves ~90 KB (bf16 p/g, fp32 m/v): long enough to hide the per-tile header loads.
SCALARS_BLOCK = 1024


def num_warps_for(tile: int) -> int:
    """Warps per program: about 512 elements per warp keeps each thread's ~10 live fp32 vectors in registers."""
    return min(16, max(4, tile // 512))


@triton.jit
def _tile_elements(tiles_ptr, index_ptr, t, j):
    """Slot, group, flat offsets into the parameter, state offsets and validity of tile ``t``'s elements ``j``.

    ``j``: int32 positions inside the tile, any shape (``tl.arange(0, TILE)``, or [blocks, 256] for 8-bit state).
    """
    row = tiles_ptr + t * _TILE_FIELDS
    slot = tl.load(row + _SLOT)
    group = tl.load(row + _GROUP)
    kind = tl.load(row + _KIND)
    base = tl.load(row + _BASE)
    run_len = tl.load(row + _RUN_LEN)
    stride = tl.load(row + _RUN_STRIDE)
    k0 = tl.load(row + _K0)
    count = tl.load(row + _COUNT)
    state0 = tl.load(row + _STATE0)
    valid = j < count
    # Position inside the run in int32 (segments are < 2**31 elements): one scalar int64 division per tile.
    r0 = k0 // run_len
    local = (k0 - r0 * run_len).to(tl.int32) + j
    run_len32 = run_len.to(tl.int32)
    r = local // run_len32
    c = local - r * run_len32
    rows = (r0 + r.to(tl.int64)) * stride
    # kind 0 strided runs, 1 indexed elements (index[base + k]), 2 gathered columns (row + index[base + column]).
    idx_at = tl.where(kind == 1, base + k0 + j, base + c)
    idx = tl.load(index_ptr + idx_at, mask=tl.where(kind != 0, valid, False), other=0).to(tl.int64)
    flat = tl.where(kind == 0, base + rows + c.to(tl.int64), tl.where(kind == 1, idx, rows + idx))
    state = state0 + k0 + j
    return slot, group, flat, state, valid


@triton.jit
def _load_grad(addr_ptr, cgrad_ptr, like_ptr, slot, flat, state, valid, COMPACT_GRAD: tl.constexpr):
    if COMPACT_GRAD:
        g = tl.load(cgrad_ptr + state, mask=valid, other=0.0)
    else:
        g_addr = tl.load(addr_ptr + 2 * slot + 1)
        g_ptr = g_addr.to(like_ptr.dtype)
        # A parameter without .grad (address 0) counts as a zero gradient.
        g = tl.load(g_ptr + flat, mask=tl.where(g_addr != 0, valid, False), other=0.0).to(tl.float32)
    return g


@triton.jit
def _store_rounded(ptr, x, mask):
    """Store fp32 ``x`` into ``ptr``'s element type, rounded to nearest even.

    bf16 is rounded on the fp32 bits (add 0x7FFF plus the lowest kept bit, keep the high half; NaN becomes the
    canonical 0x7FC0, like torch's cast): the GPU's conversion rounds so, the CPU interpreter's truncates.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        half = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        half = tl.where(x != x, 0x7FC0, half)
        tl.store(ptr, half.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sumsq_kernel(tiles_ptr, index_ptr, addr_ptr, cgrad_ptr, like_ptr, partial_ptr, TILE: tl.constexpr,
                       COMPACT_GRAD: tl.constexpr):
    # fp64 squares: a finite gradient (< 3.4e38) never overflows them, so only NaN/inf trips the skip.
    t = tl.program_id(0)
    slot, group, flat, state, valid = _tile_elements(tiles_ptr, index_ptr, t, tl.arange(0, TILE))
    g = _load_grad(addr_ptr, cgrad_ptr, like_ptr, slot, flat, state, valid, COMPACT_GRAD).to(tl.float64)
    tl.store(partial_ptr + t, tl.sum(g * g, axis=0))


@triton.jit
def _adamw_scalars_kernel(hyper_ptr, group_ptr, step_ptr, present_ptr, n_slots, partial_ptr, n_partial, coef_ptr,
                          control_ptr, HAS_STATS: tl.constexpr, CHECK_FINITE: tl.constexpr, BLOCK: tl.constexpr):
    # One program: reduce the per-tile fp64 sums of squares in a fixed order (deterministic), then write one
    # coefficient row per parameter slot from the slot's own step count and its group's hyperparameters (fp64).
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    if HAS_STATS:
        for start in range(0, n_partial, BLOCK):
            acc += tl.load(partial_ptr + start + offs, mask=start + offs < n_partial, other=0.0)
    total = tl.sum(acc, axis=0)
    norm = tl.sqrt(total)
    skip = tl.full([], 0.0, tl.float32)
    if CHECK_FINITE:
        skip = tl.where(total <= _FP64_MAX, 0.0, 1.0).to(tl.float32)  # NaN or inf
    max_norm = tl.load(hyper_ptr + H_MAX_NORM)
    clip = tl.full([], 1.0, tl.float64)
    if HAS_STATS:
        clip = tl.where(max_norm > 0, tl.minimum(max_norm / (norm + 1e-6), 1.0), 1.0).to(tl.float64)
    tl.store(control_ptr + K_SKIP, skip)
    tl.store(control_ptr + K_CLIP, clip.to(tl.float32))
    tl.store(control_ptr + K_NORM, norm.to(tl.float32))
    tl.store(control_ptr + K_SKIPPED, tl.load(control_ptr + K_SKIPPED) + skip)
    keep = 1.0 - skip
    for start in range(0, n_slots, BLOCK):
        s = start + offs
        ok = s < n_slots
        h = hyper_ptr + tl.load(group_ptr + s, mask=ok, other=0) * HYPER_FIELDS
        lr = tl.load(h + H_LR, mask=ok, other=0.0)
        beta1 = tl.load(h + H_BETA1, mask=ok, other=0.5)  # lanes past the last slot: any beta whose log is finite
        beta2 = tl.load(h + H_BETA2, mask=ok, other=0.5)
        step = tl.load(step_ptr + s, mask=ok, other=0.0)
        t = step + 1.0
        bc1 = 1.0 - tl.exp(t * tl.log(beta1))
        bc2 = 1.0 - tl.exp(t * tl.log(beta2))
        apply = tl.load(present_ptr + s, mask=ok, other=0.0) * keep
        c = coef_ptr + s * COEF_FIELDS
        tl.store(c + C_BETA1, beta1.to(tl.float32), mask=ok)
        tl.store(c + C_BETA2, beta2.to(tl.float32), mask=ok)
        tl.store(c + C_EPS, tl.load(h + H_EPS, mask=ok, other=0.0).to(tl.float32), mask=ok)
        tl.store(c + C_DECAY, (1.0 - lr * tl.load(h + H_WD, mask=ok, other=0.0)).to(tl.float32), mask=ok)
        tl.store(c + C_STEP_SIZE, (lr / bc1).to(tl.float32), mask=ok)
        tl.store(c + C_INV_SQRT_BC2, (1.0 / tl.sqrt(bc2)).to(tl.float32), mask=ok)
        # 1 - beta in fp64: fp32(0.999) is off by 1e-8, which is 1.3e-5 of 1 - 0.999.
        tl.store(c + C_ONE_MINUS_BETA1, (1.0 - beta1).to(tl.float32), mask=ok)
        tl.store(c + C_ONE_MINUS_BETA2, (1.0 - beta2).to(tl.float32), mask=ok)
        tl.store(c + C_GRAD_SCALE, (clip * tl.load(h + H_GRAD_SIGN, mask=ok, other=1.0)).to(tl.float32), mask=ok)
        tl.store(c + C_APPLY, apply, mask=ok)
        tl.store(step_ptr + s, step + apply.to(tl.float64), mask=ok)


@triton.jit
def _masked_adamw_kernel(tiles_ptr, index_ptr, addr_ptr, cgrad_ptr, like_ptr, m_ptr, v_ptr, master_ptr, coef_ptr,
                         TILE: tl.constexpr, COMPACT_GRAD: tl.constexpr, HAS_MASTER: tl.constexpr):
    t = tl.program_id(0)
    slot, group, flat, state, valid = _tile_elements(tiles_ptr, index_ptr, t, tl.arange(0, TILE))
    c = coef_ptr + slot * COEF_FIELDS
    # A parameter without a gradient, or a skipped step, masks every access: nothing is read-modify-written.
    valid = tl.where(tl.load(c + C_APPLY) != 0.0, valid, False)
    scale = tl.load(c + C_GRAD_SCALE)
    beta1 = tl.load(c + C_BETA1)
    beta2 = tl.load(c + C_BETA2)
    eps = tl.load(c + C_EPS)
    decay = tl.load(c + C_DECAY)
    step_size = tl.load(c + C_STEP_SIZE)
    inv_sqrt_bc2 = tl.load(c + C_INV_SQRT_BC2)
    one_minus_beta1 = tl.load(c + C_ONE_MINUS_BETA1)
    one_minus_beta2 = tl.load(c + C_ONE_MINUS_BETA2)

    p_ptr = tl.load(addr_ptr + 2 * slot).to(like_ptr.dtype)
    g = _load_grad(addr_ptr, cgrad_ptr, like_ptr, slot, flat, state, valid, COMPACT_GRAD) * scale
    if HAS_MASTER:
        p = tl.load(master_ptr + state, mask=valid, other=0.0)
    else:
        p = tl.load(p_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + state, mask=valid, other=0.0)
    v = tl.load(v_ptr + state, mask=valid, other=0.0)

    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p - step_size * tl.div_rn(m, denom)

    tl.store(m_ptr + state, m, mask=valid)
    tl.store(v_ptr + state, v, mask=valid)
    if HAS_MASTER:
        tl.store(master_ptr + state, p, mask=valid)
    _store_rounded(p_ptr + flat, p, valid)


@triton.jit
def _gather_grad_kernel(tiles_ptr, index_ptr, grad_ptr, cgrad_ptr, tile_begin, TILE: tl.constexpr,
                        ACCUMULATE: tl.constexpr):
    t = tile_begin + tl.program_id(0)
    slot, group, flat, state, valid = _tile_elements(tiles_ptr, index_ptr, t, tl.arange(0, TILE))
    g = tl.load(grad_ptr + flat, mask=valid, other=0.0).to(tl.float32)
    if ACCUMULATE:
        g += tl.load(cgrad_ptr + state, mask=valid, other=0.0)
    tl.store(cgrad_ptr + state, g, mask=valid)


# ----------------------------------------------------------------------------------------------- launchers
def _check(name: str, tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if tensor.dtype != dtype or tensor.device != device or not tensor.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous {dtype} tensor on {device}; got {tensor.dtype} on {tensor.device}"
            f"{'' if tensor.is_contiguous() else ' (non-contiguous)'}"
        )


def grad_sumsq_triton(tiles: torch.Tensor, index: torch.Tensor, addr: torch.Tensor, compact_grad: torch.Tensor | None,
                      like: torch.Tensor, partial: torch.Tensor, tile: int) -> None:
    """Write each tile's sum of squared gradients into ``partial[n_tiles]`` (fp64)."""
    n_tiles = tiles.shape[0]
    _check("partial", partial, torch.float64, tiles.device)
    if n_tiles == 0:
        return
    cgrad = compact_grad if compact_grad is not None else partial
    _grad_sumsq_kernel[(n_tiles,)](tiles, index, addr, cgrad, like, partial, TILE=tile,
                                   COMPACT_GRAD=compact_grad is not None, num_warps=num_warps_for(tile))


def adamw_scalars_triton(hyper: torch.Tensor, slot_group: torch.Tensor, slot_step: torch.Tensor,
                         present: torch.Tensor, partial: torch.Tensor, coef: torch.Tensor, control: torch.Tensor,
                         has_stats: bool, check_finite: bool) -> None:
    """Per-step scalars: ``coef[S, COEF_FIELDS]`` (fp32, one row per parameter slot) and ``control[CONTROL_FIELDS]``
    (fp32; its skipped-steps entry accumulates). ``hyper`` fp64 ``[G, HYPER_FIELDS]``; ``slot_group`` int64 ``[S]``;
    ``slot_step`` fp64 ``[S]`` (advanced in place for each slot that is updated); ``present`` fp32 ``[S]`` (1: the
    slot has a gradient this step); ``partial`` fp64 per-tile sums of squares."""
    device = hyper.device
    _check("hyper", hyper, torch.float64, device)
    _check("slot_group", slot_group, torch.int64, device)
    _check("slot_step", slot_step, torch.float64, device)
    _check("present", present, torch.float32, device)
    _check("partial", partial, torch.float64, device)
    _check("coef", coef, torch.float32, device)
    _check("control", control, torch.float32, device)
    n_slots = slot_group.numel()
    if slot_step.numel() != n_slots or present.numel() != n_slots or coef.numel() < n_slots * COEF_FIELDS:
        raise ValueError(f"slot_step, present and coef must cover {n_slots} slots; got {slot_step.numel()}, "
                         f"{present.numel()} and {coef.numel()} values")
    _adamw_scalars_kernel[(1,)](hyper, slot_group, slot_step, present, n_slots, partial, partial.numel(), coef,
                                control, HAS_STATS=has_stats, CHECK_FINITE=check_finite, BLOCK=SCALARS_BLOCK)


def masked_adamw_update_triton(tiles: torch.Tensor, index: torch.Tensor, addr: torch.Tensor,
                               compact_grad: torch.Tensor | None, like: torch.Tensor, exp_avg: torch.Tensor,
                               exp_avg_sq: torch.Tensor, master: torch.Tensor | None, coef: torch.Tensor,
                               tile: int) -> None:
    """Update every tile in place: parameters (through ``addr``), fp32 ``exp_avg``/``exp_avg_sq``/``master`` ``[S]``;
    ``coef``: fp32 ``[n_slots, COEF_FIELDS]``, the rows of this bucket's slots."""
    device = tiles.device
    for name, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("coef", coef)):
        _check(name, t, torch.float32, device)
    if master is not None:
        _check("master", master, torch.float32, device)
    if tiles.shape[0] == 0:
        return
    cgrad = compact_grad if compact_grad is not None else exp_avg
    _masked_adamw_kernel[(tiles.shape[0],)](
        tiles, index, addr, cgrad, like, exp_avg, exp_avg_sq, master if master is not None else exp_avg, coef,
        TILE=tile, COMPACT_GRAD=compact_grad is not None, HAS_MASTER=master is not None,
        num_warps=num_warps_for(tile),
    )


def gather_grad_triton(tiles: torch.Tensor, index: torch.Tensor, grad: torch.Tensor, compact_grad: torch.Tensor,
                       tile_begin: int, tile_end: int, tile: int, accumulate: bool) -> None:
    """``compact_grad[state] (+)= grad.flat[flat]`` for the tiles ``[tile_begin, tile_end)`` of one parameter."""
    _check("compact_grad", compact_grad, torch.float32, tiles.device)
    if not grad.is_contiguous():
        raise ValueError(f"grad must be contiguous; got strides {grad.stride()} for shape {tuple(grad.shape)}")
    if tile_end > tile_begin:
        _gather_grad_kernel[(tile_end - tile_begin,)](tiles, index, grad, compact_grad, tile_begin, TILE=tile,
                                                      ACCUMULATE=accumulate, num_warps=num_warps_for(tile))

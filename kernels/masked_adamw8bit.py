"""Fused sparse-masked AdamW with 8-bit block-quantized moments (the bitsandbytes blockwise scheme), in Triton.

Same update as kernels/masked_adamw.py, but m and v live as uint8 codes over the compact state buffer, in blocks
of 256 elements with one fp32 absmax per block and moment (signed dynamic map for m, unsigned for v; see
mu_fast/optim/quantize8.py). Per tile of whole blocks: dequantize (``qmap[code] · absmax``), update in fp32,
update the parameter with the fresh fp32 moments, take each block's new absmax, re-quantize by an 8-step binary
search over the 255 map midpoints (nearest code, ties to the lower one), store codes and absmax.

Bytes per active element (bf16 p/g): read p 2, g 2, m 1, v 1; write p 2, m 1, v 1; plus 2·4/256 absmax read and
written ≈ 10.06 B. The segment table aligns every segment to 256 state elements, so a tile never splits a block;
padding elements are masked (never read or written) and count as 0 for the absmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mu_fast.kernels.masked_adamw import (
    C_APPLY,
    C_BETA1,
    C_BETA2,
    C_DECAY,
    C_EPS,
    C_GRAD_SCALE,
    C_INV_SQRT_BC2,
    C_ONE_MINUS_BETA1,
    C_ONE_MINUS_BETA2,
    C_STEP_SIZE,
    COEF_FIELDS,
    _check,
    _load_grad,
    _store_rounded,
    num_warps_for,
    _tile_elements,
)

QBLOCK = 256  # Python-side value
_QB = tl.constexpr(QBLOCK)  # the same inside @triton.jit code (see kernels/masked_adamw.py)


@triton.jit
def _quantize(x, absmax, mids_ptr):
    """Nearest code of ``x / absmax`` (per block row) in a sorted map, from its midpoints table (+inf last)."""
    safe = tl.where(absmax > 0, absmax, 1.0)
    normed = tl.div_rn(x, safe[:, None])
    pos = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        step = 128 >> i
        mid = tl.load(mids_ptr + pos + (step - 1))
        pos = tl.where(mid < normed, pos + step, pos)
    return pos.to(tl.uint8)


@triton.jit
def _masked_adamw8bit_kernel(tiles_ptr, index_ptr, addr_ptr, cgrad_ptr, like_ptr, cm_ptr, cv_ptr, am_ptr, av_ptr,
                             qmap_m_ptr, qmap_v_ptr, mids_m_ptr, mids_v_ptr, master_ptr, coef_ptr,
                             BLOCKS: tl.constexpr, COMPACT_GRAD: tl.constexpr, HAS_MASTER: tl.constexpr):
    t = tl.program_id(0)
    b = tl.arange(0, BLOCKS)
    e = tl.arange(0, _QB)
    j = b[:, None] * _QB + e[None, :]  # [BLOCKS, _QB] positions inside the tile
    slot, group, flat, state, valid = _tile_elements(tiles_ptr, index_ptr, t, j)
    c = coef_ptr + slot * COEF_FIELDS
    # No gradient for this parameter, or a skipped step: every access masked (blocks never span two parameters).
    valid = tl.where(tl.load(c + C_APPLY) != 0.0, valid, False)
    block_id = tl.min(state, axis=1) // _QB  # the tile starts on a block boundary
    block_valid = tl.max(valid.to(tl.int32), axis=1) > 0
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
    code_m = tl.load(cm_ptr + state, mask=valid, other=0).to(tl.int32)
    code_v = tl.load(cv_ptr + state, mask=valid, other=0).to(tl.int32)
    absmax_m = tl.load(am_ptr + block_id, mask=block_valid, other=0.0)
    absmax_v = tl.load(av_ptr + block_id, mask=block_valid, other=0.0)
    m = tl.load(qmap_m_ptr + code_m) * absmax_m[:, None]
    v = tl.load(qmap_v_ptr + code_v) * absmax_v[:, None]

    p = p * decay
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * g * g
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    p = p - step_size * tl.div_rn(m, denom)

    m = tl.where(valid, m, 0.0)
    v = tl.where(valid, v, 0.0)
    p = tl.where(valid, p, 0.0)  # masked lanes hold garbage (dequantized code 0 over eps), never stored
    new_absmax_m = tl.max(tl.abs(m), axis=1)
    new_absmax_v = tl.max(v, axis=1)
    tl.store(cm_ptr + state, _quantize(m, new_absmax_m, mids_m_ptr), mask=valid)
    tl.store(cv_ptr + state, _quantize(v, new_absmax_v, mids_v_ptr), mask=valid)
    tl.store(am_ptr + block_id, new_absmax_m, mask=block_valid)
    tl.store(av_ptr + block_id, new_absmax_v, mask=block_valid)
    if HAS_MASTER:
        tl.store(master_ptr + state, p, mask=valid)
    _store_rounded(p_ptr + flat, p, valid)


def masked_adamw8bit_update_triton(tiles: torch.Tensor, index: torch.Tensor, addr: torch.Tensor,
                                   compact_grad: torch.Tensor | None, like: torch.Tensor, codes_m: torch.Tensor,
                                   codes_v: torch.Tensor, absmax_m: torch.Tensor, absmax_v: torch.Tensor,
                                   qmap_m: torch.Tensor, qmap_v: torch.Tensor, mids_m: torch.Tensor,
                                   mids_v: torch.Tensor, master: torch.Tensor | None, coef: torch.Tensor,
                                   tile: int) -> None:
    """Update every tile in place. codes uint8 ``[S]``, absmax fp32 ``[S/256]``, maps and midpoints fp32 ``[256]``."""
    device = tiles.device
    if tile % QBLOCK:
        raise ValueError(f"8-bit state needs tiles of whole {QBLOCK}-element blocks; got tile={tile}")
    _check("codes_m", codes_m, torch.uint8, device)
    _check("codes_v", codes_v, torch.uint8, device)
    for name, t in (("absmax_m", absmax_m), ("absmax_v", absmax_v), ("qmap_m", qmap_m), ("qmap_v", qmap_v),
                    ("mids_m", mids_m), ("mids_v", mids_v), ("coef", coef)):
        _check(name, t, torch.float32, device)
    if master is not None:
        _check("master", master, torch.float32, device)
    if tiles.shape[0] == 0:
        return
    cgrad = compact_grad if compact_grad is not None else absmax_m
    _masked_adamw8bit_kernel[(tiles.shape[0],)](
        tiles, index, addr, cgrad, like, codes_m, codes_v, absmax_m, absmax_v, qmap_m, qmap_v, mids_m, mids_v,
        master if master is not None else absmax_m, coef,
        BLOCKS=tile // QBLOCK, COMPACT_GRAD=compact_grad is not None, HAS_MASTER=master is not None,
        num_warps=num_warps_for(tile),
    )

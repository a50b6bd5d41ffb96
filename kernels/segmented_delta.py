"""Segmented sparse-delta add: every group's structured delta over its own rows of one batch, in one launch.

G groups own disjoint row ranges ``[lo_g, hi_g)`` of ``x [N, d_in]`` and ``y [N, d_out]``; group g selects the
indices ``index[sel_lo_g:sel_hi_g]`` (s_g of them, distinct) and holds a compact delta ``D_g`` (row-major at
``delta[delta_lo_g:]``). Two kinds:

* rows (neuron rows of up / gate, q/k/v head rows): ``D_g [s_g, d_in]``, ``y[r, idx_j] += Σ_i x[r, i]·D_g[j, i]``
* cols (neuron columns of down, heads of o_proj):    ``D_g [d_out, s_g]``, ``y[r, o] += Σ_j x[r, idx_j]·D_g[o, j]``

Backward: ``grad_x`` is the same segmented product with ``D_g`` untransposed, gathered / scattered the other way
(rows: ``grad_x[r, i] = Σ_j gy[r, idx_j]·D_g[j, i]``; cols: ``grad_x[r, idx_j] = Σ_o gy[r, o]·D_g[o, j]``), and
``grad_D_g`` is a segmented outer-product reduction over the group's rows (rows: ``Σ_r gy[r, idx_j]·x[r, i]``;
cols: ``Σ_r gy[r, o]·x[r, idx_j]``).

Design: one kernel, ``_segmented_gemm_kernel``, computes ``C[rows_g, n] += A[rows_g, k] @ B_g[k, n]`` with the
k columns of A optionally gathered through the group's indices and the n columns of C optionally scattered
through them (forward and grad_x); ``_segmented_outer_kernel`` computes ``out_g = P[rows_g]^T @ Q[rows_g]`` with
one side gathered (grad_D). The grid is (n tiles, row tiles, groups) sized by the largest group; tiles past a
group's own extent do nothing. Every output element is written by one program (disjoint rows, distinct indices
within a group), so no atomics. Accumulation is fp32 (fp64 for fp64 inputs); fp32 products use IEEE precision
(no TF32), so the kernel matches torch's default fp32 matmul up to summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile sizes (rows of the batch, output columns, reduction chunk): 64x64x32 on a GPU; 32x32x32 on the CPU
# interpreter, where a program's cost grows with its tile and tests use small shapes.
GPU_BLOCKS = (64, 64, 32)
INTERPRETER_BLOCKS = (32, 32, 32)
META_FIELDS = 5  # per group: row_lo, row_hi, sel_lo, sel_hi, delta_lo


@triton.jit
def _segmented_gemm_kernel(
    a_ptr, d_ptr, c_ptr, index_ptr, meta_ptr,
    a_stride, c_stride, dim_k, dim_n, d_cols,
    GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, TRANS_D: tl.constexpr, D_COLS_IS_SEL: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # C[rows_g, n] += A[rows_g, k] @ B_g[k, n], B_g[k, n] = D_g[n, k] (TRANS_D) or D_g[k, n]; D_g row-major with
    # d_cols columns (s_g when D_COLS_IS_SEL). k runs over s_g when A is gathered, else dim_k; n likewise.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    row_lo = tl.load(meta_ptr + g * 5)
    row_hi = tl.load(meta_ptr + g * 5 + 1)
    sel_lo = tl.load(meta_ptr + g * 5 + 2)
    sel_hi = tl.load(meta_ptr + g * 5 + 3)
    delta_lo = tl.load(meta_ptr + g * 5 + 4)
    n_sel = sel_hi - sel_lo
    size_k = n_sel if GATHER_A else dim_k
    size_n = n_sel if SCATTER_C else dim_n
    ld = n_sel if D_COLS_IS_SEL else d_cols
    m_start = row_lo + pid_m * BLOCK_M
    n_start = pid_n * BLOCK_N
    if (m_start < row_hi) & (n_start < size_n):
        rows = m_start + tl.arange(0, BLOCK_M)
        m_mask = rows < row_hi
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < size_n
        if SCATTER_C:
            c_cols = tl.load(index_ptr + sel_lo + offs_n, mask=n_mask, other=0)
        else:
            c_cols = offs_n.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, size_k, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < size_k
            if GATHER_A:
                a_cols = tl.load(index_ptr + sel_lo + offs_k, mask=k_mask, other=0)
            else:
                a_cols = offs_k.to(tl.int64)
            a = tl.load(a_ptr + rows[:, None] * a_stride + a_cols[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if TRANS_D:
                d_offs = offs_n[None, :].to(tl.int64) * ld + offs_k[:, None]
            else:
                d_offs = offs_k[:, None].to(tl.int64) * ld + offs_n[None, :]
            d = tl.load(d_ptr + delta_lo + d_offs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, d, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
        c_offs = rows[:, None] * c_stride + c_cols[None, :]
        c_mask = m_mask[:, None] & n_mask[None, :]
        c = tl.load(c_ptr + c_offs, mask=c_mask, other=0.0)
        tl.store(c_ptr + c_offs, (c.to(ACC_DTYPE) + acc).to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _segmented_outer_kernel(
    p_ptr, q_ptr, out_ptr, index_ptr, meta_ptr,
    p_stride, q_stride, dim_a, dim_b,
    GATHER_P: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # out_g[a, b] = Σ_{r in rows_g} P[r, pa]·Q[r, qb], out_g row-major [size_a, size_b] at delta_lo; exactly one
    # of P's columns (GATHER_P, size_a = s_g) or Q's columns (size_b = s_g) is gathered through the indices.
    pid_b = tl.program_id(0)
    pid_a = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    row_lo = tl.load(meta_ptr + g * 5)
    row_hi = tl.load(meta_ptr + g * 5 + 1)
    sel_lo = tl.load(meta_ptr + g * 5 + 2)
    sel_hi = tl.load(meta_ptr + g * 5 + 3)
    delta_lo = tl.load(meta_ptr + g * 5 + 4)
    n_sel = sel_hi - sel_lo
    size_a = n_sel if GATHER_P else dim_a
    size_b = dim_b if GATHER_P else n_sel
    a_start = pid_a * BLOCK_A
    b_start = pid_b * BLOCK_B
    if (a_start < size_a) & (b_start < size_b):
        offs_a = a_start + tl.arange(0, BLOCK_A)
        a_mask = offs_a < size_a
        offs_b = b_start + tl.arange(0, BLOCK_B)
        b_mask = offs_b < size_b
        if GATHER_P:
            p_cols = tl.load(index_ptr + sel_lo + offs_a, mask=a_mask, other=0)
            q_cols = offs_b.to(tl.int64)
        else:
            p_cols = offs_a.to(tl.int64)
            q_cols = tl.load(index_ptr + sel_lo + offs_b, mask=b_mask, other=0)
        acc = tl.zeros((BLOCK_A, BLOCK_B), dtype=ACC_DTYPE)
        for r0 in range(row_lo, row_hi, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            r_mask = rows < row_hi
            pt = tl.load(p_ptr + rows[None, :] * p_stride + p_cols[:, None],
                         mask=a_mask[:, None] & r_mask[None, :], other=0.0)  # P^T tile [BLOCK_A, BLOCK_R]
            q = tl.load(q_ptr + rows[:, None] * q_stride + q_cols[None, :],
                        mask=r_mask[:, None] & b_mask[None, :], other=0.0)
            acc = tl.dot(pt, q, acc, input_precision="ieee", out_dtype=ACC_DTYPE)
        out_offs = delta_lo + offs_a[:, None].to(tl.int64) * size_b + offs_b[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=a_mask[:, None] & b_mask[None, :])


def _check(kind: str, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, meta: torch.Tensor,
           delta: torch.Tensor) -> None:
    if kind not in ("rows", "cols"):
        raise ValueError(f"kind must be 'rows' or 'cols'; got {kind!r}")
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x [N, d_in] and y [N, d_out] must share N; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float16/bfloat16/float32/float64; got {x.dtype}")
    if y.dtype != x.dtype or delta.dtype != x.dtype:
        raise ValueError(f"x, y and delta must share a dtype; got {x.dtype}, {y.dtype}, {delta.dtype}")
    tensors = (x, y, index, meta, delta)
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"all tensors must be on one device; got {sorted({str(t.device) for t in tensors})}")
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("x, y, index, meta and delta must be contiguous")
    if index.dtype != torch.int64 or meta.dtype != torch.int64:
        raise ValueError(f"index and meta must be int64; got {index.dtype} and {meta.dtype}")
    if meta.dim() != 2 or meta.shape[1] != META_FIELDS or delta.dim() != 1 or index.dim() != 1:
        raise ValueError(f"meta must be [G, {META_FIELDS}], index and delta 1-D; got {tuple(meta.shape)}, "
                         f"{tuple(index.shape)}, {tuple(delta.shape)}")


def _blocks(x: torch.Tensor) -> tuple[int, int, int]:
    return GPU_BLOCKS if x.is_cuda else INTERPRETER_BLOCKS


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32


def segmented_delta_forward_(y: torch.Tensor, x: torch.Tensor, kind: str, index: torch.Tensor, meta: torch.Tensor,
                             delta: torch.Tensor, max_rows: int, max_sel: int) -> torch.Tensor:
    """Add every group's delta product into ``y [N, d_out]`` in place (see the module docstring); returns ``y``.

    x: ``[N, d_in]``; index: concatenated int64 selections; meta: ``[G, 5]`` int64 rows (row_lo, row_hi, sel_lo,
    sel_hi, delta_lo); delta: the concatenated row-major compact deltas; max_rows / max_sel: the largest group's
    row count and selection size (they size the grid).
    """
    _check(kind, x, y, index, meta, delta)
    G = meta.shape[0]
    rows = kind == "rows"
    width = max_sel if rows else y.shape[1]
    if G == 0 or max_rows == 0 or width == 0 or max_sel == 0:
        return y
    BLOCK_M, BLOCK_N, BLOCK_K = _blocks(x)
    grid = (triton.cdiv(width, BLOCK_N), triton.cdiv(max_rows, BLOCK_M), G)
    _segmented_gemm_kernel[grid](
        x, delta, y, index, meta, x.stride(0), y.stride(0), x.shape[1], y.shape[1], x.shape[1],
        GATHER_A=not rows, SCATTER_C=rows, TRANS_D=True, D_COLS_IS_SEL=not rows, ACC_DTYPE=_acc_dtype(x.dtype),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )
    return y


def segmented_delta_backward(grad_y: torch.Tensor, x: torch.Tensor, kind: str, index: torch.Tensor,
                             meta: torch.Tensor, delta: torch.Tensor, max_rows: int, max_sel: int,
                             need_x: bool = True, need_delta: bool = True
                             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_x [N, d_in], grad_delta like delta)`` of the delta part for ``grad_y [N, d_out]`` (each None when
    not needed). Rows outside every group get zero ``grad_x``; so does every column no group selects (cols)."""
    _check(kind, x, grad_y, index, meta, delta)
    G = meta.shape[0]
    rows = kind == "rows"
    d_in, d_out = x.shape[1], grad_y.shape[1]
    acc = _acc_dtype(x.dtype)
    grad_x = torch.zeros_like(x) if need_x else None
    grad_delta = torch.zeros_like(delta) if need_delta else None
    if G == 0 or max_rows == 0 or max_sel == 0:
        return grad_x, grad_delta
    BLOCK_M, BLOCK_N, BLOCK_K = _blocks(x)
    if need_x:
        width = d_in if rows else max_sel
        grid = (triton.cdiv(width, BLOCK_N), triton.cdiv(max_rows, BLOCK_M), G)
        _segmented_gemm_kernel[grid](
            grad_y, delta, grad_x, index, meta, grad_y.stride(0), grad_x.stride(0), d_out, d_in, d_in,
            GATHER_A=rows, SCATTER_C=not rows, TRANS_D=False, D_COLS_IS_SEL=not rows, ACC_DTYPE=acc,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        )
    if need_delta:
        size_a, size_b = (max_sel, d_in) if rows else (d_out, max_sel)
        grid = (triton.cdiv(size_b, BLOCK_N), triton.cdiv(size_a, BLOCK_M), G)
        _segmented_outer_kernel[grid](
            grad_y, x, grad_delta, index, meta, grad_y.stride(0), x.stride(0), d_out, d_in,
            GATHER_P=rows, ACC_DTYPE=acc, BLOCK_A=BLOCK_M, BLOCK_B=BLOCK_N, BLOCK_R=BLOCK_K,
        )
    return grad_x, grad_delta

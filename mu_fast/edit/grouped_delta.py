"""Segmented sparse-delta add: G groups of batch rows, each with its own structured delta, in one call.

``segmented_delta_add(y, x, groups, kind, indices, deltas)`` returns ``y`` plus, for every group g (rows
``lo_g:hi_g`` along dim 0 of ``x`` and ``y``) that has a block (``indices[g]`` not None):

* ``kind="rows"``: ``y[lo:hi, ..., idx_g] += x[lo:hi] · D_g^T`` with ``D_g [len(idx_g), d_in]``
* ``kind="cols"``: ``y[lo:hi] += x[lo:hi, ..., idx_g] · D_g^T`` with ``D_g [d_out, len(idx_g)]``

Rows outside every group, and groups without a block, pass ``y`` through. Differentiable in ``y``, ``x`` and
every ``D_g``. This is the SGMV-like step of ``BatchedDeltas`` (``mu_fast.edit.batched``): its rows / columns
blocks of one module, over all groups of a batch.

Backends: ``triton`` (``mu_fast.kernels.segmented_delta``: one launch for all groups forward, two backward, as an
autograd Function) and ``torch`` (``segmented_delta_add_reference``: the per-group loop of ``index_add`` /
``index_select`` and ``F.linear``, the plain reference). ``auto`` picks triton for CUDA tensors when Triton
imports, torch otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from mu_fast._ext import TRITON_OR_TORCH, resolve_triton_backend

BACKENDS = TRITON_OR_TORCH
resolve_backend = resolve_triton_backend  # auto: triton on CUDA tensors when Triton runs, else torch
KINDS = ("rows", "cols")


def segmented_delta_add_reference(y: torch.Tensor, x: torch.Tensor, groups: Sequence[tuple[int, int]], kind: str,
                                  indices: Sequence[torch.Tensor | None], deltas: Sequence[torch.Tensor | None]
                                  ) -> torch.Tensor:
    """Plain-PyTorch ``segmented_delta_add``: one ``index_add`` / ``index_select`` and ``F.linear`` per group."""
    pieces, at = [], 0
    for (lo, hi), index, delta in zip(groups, indices, deltas, strict=True):
        if index is None or hi == lo:
            continue
        if lo > at:
            pieces.append(y[at:lo])
        yk, xk = y[lo:hi], x[lo:hi]
        if kind == "rows":
            pieces.append(yk.index_add(-1, index, F.linear(xk, delta)))
        else:
            pieces.append(yk + F.linear(xk.index_select(-1, index), delta))
        at = hi
    if at == 0:
        return y
    if at < y.shape[0]:
        pieces.append(y[at:])
    return torch.cat(pieces, 0)


class _SegmentedDeltaAdd(torch.autograd.Function):
    """The Triton path: ``y + segmented delta products`` over flattened rows, backward by the same kernels."""

    @staticmethod
    def forward(ctx, y, x, delta, index, meta, kind, max_rows, max_sel):  # noqa: ANN001, ANN205 - autograd's API
        from mu_fast.kernels.segmented_delta import segmented_delta_forward_

        out = y.clone()
        segmented_delta_forward_(out, x, kind, index, meta, delta, max_rows, max_sel)
        ctx.save_for_backward(x, delta, index, meta)
        ctx.kind, ctx.max_rows, ctx.max_sel = kind, max_rows, max_sel
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        from mu_fast.kernels.segmented_delta import segmented_delta_backward

        x, delta, index, meta = ctx.saved_tensors
        need_x, need_delta = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_x = grad_delta = None
        if need_x or need_delta:
            grad_x, grad_delta = segmented_delta_backward(grad_out.contiguous(), x, ctx.kind, index, meta, delta,
                                                          ctx.max_rows, ctx.max_sel, need_x, need_delta)
        return grad_out, grad_x, grad_delta, None, None, None, None, None


def _validate(y: torch.Tensor, x: torch.Tensor, groups: Sequence[tuple[int, int]], kind: str,
              indices: Sequence[torch.Tensor | None], deltas: Sequence[torch.Tensor | None], check_indices: bool
              ) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    if not (len(groups) == len(indices) == len(deltas)):
        raise ValueError(f"groups, indices and deltas must have one entry per group; got {len(groups)}, "
                         f"{len(indices)}, {len(deltas)}")
    if x.dim() < 2 or y.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"x [B, ..., d_in] and y [B, ..., d_out] must share leading dims; got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if not x.dtype.is_floating_point or y.dtype != x.dtype:
        raise ValueError(f"x and y must share a floating dtype; got {x.dtype} and {y.dtype}")
    d_in, d_out = x.shape[-1], y.shape[-1]
    at = 0
    for g, ((lo, hi), index, delta) in enumerate(zip(groups, indices, deltas, strict=True)):
        if not at <= lo <= hi <= x.shape[0]:
            raise ValueError(f"group {g} rows [{lo}, {hi}) must lie in [0, {x.shape[0]}], in order, without overlap")
        at = hi
        if (index is None) != (delta is None):
            raise ValueError(f"group {g}: indices and deltas must both be given or both be None")
        if index is None:
            continue
        if index.dim() != 1 or index.dtype != torch.int64:
            raise ValueError(f"group {g}: indices must be a 1-D int64 tensor; got {index.dtype} {tuple(index.shape)}")
        want = (len(index), d_in) if kind == "rows" else (d_out, len(index))
        if tuple(delta.shape) != want:
            raise ValueError(f"group {g}: a {kind} delta must be {want} for {len(index)} indices; got "
                             f"{tuple(delta.shape)}")
        if delta.dtype != x.dtype:
            raise ValueError(f"group {g}: delta dtype {delta.dtype} differs from x's {x.dtype}")
        if delta.device != x.device or index.device != x.device or y.device != x.device:
            raise ValueError(f"group {g}: x, y, indices and deltas must be on one device; got x on {x.device}, "
                             f"y on {y.device}, indices on {index.device}, delta on {delta.device}")
        if check_indices and len(index):
            limit = d_out if kind == "rows" else d_in
            lo_i, hi_i, distinct = int(index.min()), int(index.max()), len(torch.unique(index)) == len(index)
            if lo_i < 0 or hi_i >= limit:
                raise ValueError(f"group {g}: indices must lie in [0, {limit}) ({kind} of a {d_out}x{d_in} weight); "
                                 f"got {lo_i}..{hi_i}")
            if not distinct:
                raise ValueError(f"group {g}: indices must be distinct (a Mask's selections are)")


def segmented_delta_add(y: torch.Tensor, x: torch.Tensor, groups: Sequence[tuple[int, int]], kind: str,
                        indices: Sequence[torch.Tensor | None], deltas: Sequence[torch.Tensor | None], *,
                        backend: str = "auto", check_indices: bool = True) -> torch.Tensor:
    """``y`` plus every group's structured delta product (module docstring); a new tensor, differentiable.

    y: ``[B, ..., d_out]``, x: ``[B, ..., d_in]`` (same leading dims, same floating dtype); groups: per group its
    ``(lo, hi)`` rows along dim 0, in order, disjoint; indices[g]: 1-D int64 distinct rows of the output
    (``kind="rows"``) or columns of the input (``kind="cols"``), or None when group g has no block here;
    deltas[g]: ``[len(idx), d_in]`` (rows) or ``[d_out, len(idx)]`` (cols), or None. check_indices: verify
    the indices' range and distinctness (one host sync per group; callers with validated masks pass False).
    backend: ``auto`` | ``triton`` | ``torch``.
    """
    _validate(y, x, groups, kind, indices, deltas, check_indices)
    if resolve_backend(backend, x.device) == "torch":
        return segmented_delta_add_reference(y, x, groups, kind, indices, deltas)
    per_row = x[:1].numel() // x.shape[-1] if x.shape[0] else 1  # positions per batch row
    live = [(lo, hi, i, d) for (lo, hi), i, d in zip(groups, indices, deltas, strict=True)
            if i is not None and hi > lo and len(i)]
    if not live:
        return y
    meta, sel_at, delta_at = [], 0, 0
    for lo, hi, index, delta in live:
        meta.append((lo * per_row, hi * per_row, sel_at, sel_at + len(index), delta_at))
        sel_at, delta_at = sel_at + len(index), delta_at + delta.numel()
    index = torch.cat([i for _, _, i, _ in live])
    delta = torch.cat([d.reshape(-1) for _, _, _, d in live])
    meta_t = torch.tensor(meta, dtype=torch.int64).to(x.device, non_blocking=True)
    max_rows = max(hi - lo for lo, hi, *_ in meta)
    max_sel = max(len(i) for _, _, i, _ in live)
    out = _SegmentedDeltaAdd.apply(y.reshape(-1, y.shape[-1]).contiguous(), x.reshape(-1, x.shape[-1]).contiguous(),
                                   delta, index.contiguous(), meta_t, kind, max_rows, max_sel)
    return out.view(y.shape)

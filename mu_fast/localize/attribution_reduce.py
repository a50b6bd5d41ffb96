"""Per-row, per-group sums of gradient × activation difference: the attribution-patching reduction.

``attribution_reduce`` dispatches between the Triton kernel (``mu_fast.kernels.attribution_reduce``) and
``attribution_reduce_reference`` (plain PyTorch, any dtype and device). Both accumulate into ``out`` in place:

    out[b, j] += Σ_t valid[b, t] · Σ_{s<S} grad[b, t, j·S + s] · delta[b, t, j·S + s]
"""

from __future__ import annotations

import torch

from mu_fast._ext import TRITON_OR_TORCH, resolve_triton_backend

BACKENDS = TRITON_OR_TORCH
resolve_backend = resolve_triton_backend  # auto: triton on CUDA tensors when Triton runs, else torch


def attribution_reduce_reference(
    grad: torch.Tensor, delta: torch.Tensor, out: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain-PyTorch reduction in ``out.dtype``; grad, delta ``[B, T, F]``, out ``[B, F // group_size]``."""
    B, T, F = grad.shape
    prod = grad.to(out.dtype) * delta.to(out.dtype)
    if valid is not None:
        prod = torch.where(valid.bool()[:, :, None], prod, torch.zeros((), dtype=out.dtype, device=out.device))
    out += prod.sum(1).view(B, F // group_size, group_size).sum(-1)
    return out


def attribution_reduce(
    grad: torch.Tensor,
    delta: torch.Tensor,
    out: torch.Tensor,
    group_size: int,
    valid: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Accumulate per-group ``grad · delta`` sums into ``out [B, G]`` (float32/float64) and return it.

    grad, delta: ``[B, T, F]`` with F = G · group_size; valid: ``[B, T]`` (False at padding) or None.
    backend: ``auto`` (Triton on CUDA, else torch), ``triton`` or ``torch``.
    """
    if backend != "torch" and resolve_backend(backend, grad.device) == "triton":
        from mu_fast.kernels.attribution_reduce import attribution_reduce_triton

        return attribution_reduce_triton(grad.contiguous(), delta.contiguous(), out, group_size, valid)
    return attribution_reduce_reference(grad, delta, out, group_size, valid)

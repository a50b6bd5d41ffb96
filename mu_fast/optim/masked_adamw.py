"""Masked AdamW: the plain-PyTorch reference and the functional step; the table layouts and the compact state of
one bucket are in ``mu_fast.optim.bucket`` (and importable from here).

Semantics (every backend): dense AdamW restricted to the active set. Every active element of a parameter that has
a gradient gets the AdamW update, also where that gradient is zero: this is not lazy Adam. A parameter without a
gradient is skipped as torch's AdamW skips it (no moment decay, no weight decay, no write; its own step count
does not advance), unless the caller marks it present (``missing_grad="zero"``: a missing gradient counts as
zero). Step counts and bias corrections are per parameter, as in torch. Weight decay is decoupled and applied
to active elements only. Inactive elements are never read-modify-written: they stay bit-identical whatever the
gradient holds, NaN included. All arithmetic is fp32 (hyperparameters and bias corrections fp64), the moments
are fp32 or 8-bit block-quantized, and an optional fp32 master copy keeps small updates of bf16 parameters.

Backends (mu_fast/optim/backends.py: torch, triton, cpu, cuda), one method each (``grad_sumsq``, ``scalars``,
``update``, ``gather``) over the same segment table (mu_fast/optim/segments.py). ``grad_sumsq`` sums squares in
fp64, so a finite gradient never overflows the statistic that decides the non-finite skip (an fp32 sum overflows
at |g| ≈ 1.8e19). ``scalars`` writes one coefficient row per parameter slot (its group's hyperparameters, its own
bias corrections, the gradient scale = clip factor × −1 for ``maximize``, and whether it is updated at all);
``update`` reads the row of each tile's slot. ``masked_adamw_reference`` is the same formula on compact vectors,
readable and usable in fp64: the tests' oracle. On the CPU (``cpu`` backend), dense gradients of scattered (single
column or element) selections are gathered once per step by the statistics pass into a compact fp32 buffer
(``CompactBucket.gathered_grad``, 4 B per active element, not counted in ``state_bytes``) that the update reads, so
the scattered gradient is read once instead of twice; the result is bit-identical.
"""

from __future__ import annotations

import math

import torch

from mu_fast.optim.bucket import (  # noqa: F401 (the layouts and the bucket: importable from here as before)
    BACKENDS, COEF_FIELDS, CONTROL_FIELDS, C_APPLY, C_BETA1, C_BETA2, C_DECAY, C_EPS, C_GRAD_SCALE, C_INV_SQRT_BC2,
    C_ONE_MINUS_BETA1, C_ONE_MINUS_BETA2, C_STEP_SIZE, FP64_MAX, HYPER_FIELDS, H_BETA1, H_BETA2, H_EPS, H_GRAD_SIGN,
    H_LR, H_MAX_NORM, H_WD, K_CLIP, K_NORM, K_SKIP, K_SKIPPED, CompactBucket,
)


def masked_adamw_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    step: int | torch.Tensor,
    grad_scale: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step on the compact active elements: returns new (param, exp_avg, exp_avg_sq).

    param, grad, exp_avg, exp_avg_sq: ``[n]`` in the compute dtype (fp32, or fp64 for a reference run).
    step: the step number after this update (1 on the first step). grad_scale multiplies the gradient
    (the clipping factor). Decoupled decay: ``param ← param·(1 − lr·wd)`` before the moment update (torch order).
    """
    g = grad * grad_scale
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    param = param * (1 - lr * weight_decay)
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    denom = exp_avg_sq.sqrt() / math.sqrt(bc2) + eps if not torch.is_tensor(bc2) else exp_avg_sq.sqrt() / bc2.sqrt() + eps
    param = param - (lr / bc1) * exp_avg / denom
    return param, exp_avg, exp_avg_sq


def check_grads(bucket: CompactBucket, grads: list[torch.Tensor | None]) -> bool:
    """Raise ``ValueError`` when a gradient's shape, dtype, device or layout does not match its parameter;
    return whether every parameter has a gradient (one pass: this runs every step)."""
    complete = True
    for slot, (p, g) in enumerate(zip(bucket.params, grads)):
        if g is None:
            complete = False
        elif g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or not g.is_contiguous():
            check_grad(bucket, slot, g)
    return complete


def check_grad(bucket: CompactBucket, slot: int, g: torch.Tensor) -> None:
    """``check_grads`` for the gradient ``g`` of one slot."""
    p = bucket.params[slot]
    if g.shape == p.shape and g.dtype == p.dtype and g.device == p.device and g.is_contiguous():
        return
    name = bucket.table.slots[slot].name
    if g.layout != torch.strided:
        raise ValueError(
            f"gradient of {name!r} is sparse ({g.layout}); MaskedAdamW needs dense gradients: build the module "
            "that makes it with sparse=False (e.g. torch.nn.Embedding(..., sparse=False)), or densify it "
            "(p.grad = p.grad.to_dense()) before step()"
        )
    raise ValueError(
        f"gradient of {name!r} is {g.dtype} {tuple(g.shape)} on {g.device}"
        f"{'' if g.is_contiguous() else ' (non-contiguous)'}; expected a contiguous {p.dtype} "
        f"{tuple(p.shape)} on {p.device} like the parameter"
    )


def to_device(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, copied without a host sync (pinned memory on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@torch.no_grad()
def masked_adamw_step(
    bucket: CompactBucket,
    grads: list[torch.Tensor | None] | None,
    hyper: torch.Tensor,
    step: torch.Tensor,
    *,
    max_grad_norm: float | None = None,
    nonfinite: str = "skip",
    missing_grad: str = "skip",
    backend: str = "auto",
) -> torch.Tensor:
    """One masked AdamW step over a bucket, functional form of ``MaskedAdamW.step`` (no host sync).

    grads: one dense gradient (or None) per parameter of ``bucket``, or None with ``bucket.compact_grad`` (then
    ``bucket.grad_seen`` says which parameters have a gradient). hyper: fp64 ``[G, HYPER_FIELDS]`` per param group
    (lr, beta1, beta2, eps, weight_decay, max_grad_norm, grad sign: 1, or -1 to maximize), on the bucket's device;
    its max_grad_norm column is overwritten. step: fp64 ``[n_params]`` steps taken per parameter (advanced in
    place for each parameter updated). max_grad_norm: clip the active gradients to this global norm (None: no
    clipping). nonfinite: "skip" (a non-finite active gradient makes the step a no-op, decided on device) or
    "ignore". missing_grad: "skip" (a parameter without a gradient is left untouched) or "zero" (it counts as a
    zero gradient). Returns the control vector fp32 ``[4]``: (skipped, clip factor, active-gradient norm, skipped).
    """
    if nonfinite not in ("skip", "ignore"):
        raise ValueError(f"nonfinite must be 'skip' or 'ignore' here (the optimizer adds 'raise'); got {nonfinite!r}")
    if missing_grad not in ("skip", "zero"):
        raise ValueError(f"missing_grad must be 'skip' or 'zero'; got {missing_grad!r}")
    n = len(bucket.params)
    if step.dtype != torch.float64 or step.numel() != n:
        raise ValueError(f"step must hold one float64 step count per parameter ({n}); got {step.dtype} {tuple(step.shape)}")
    from mu_fast.optim.backends import select_backend

    impl = select_backend(bucket.device, backend)
    bucket.check_params()
    grads = list(grads) if grads is not None else [None] * n
    if bucket.compact_grad is None:
        check_grads(bucket, grads)
        present = [float(g is not None) for g in grads]
    else:
        present = [float(b) for b in bucket.grad_seen]
    if missing_grad == "zero":
        present = [1.0] * n
    device = bucket.device
    hyper[:, H_MAX_NORM] = float(max_grad_norm) if max_grad_norm is not None else 0.0
    has_stats = nonfinite == "skip" or max_grad_norm is not None
    partial = torch.zeros(max(bucket.table.n_tiles, 1), dtype=torch.float64, device=device)
    if has_stats:
        impl.grad_sumsq(bucket, grads, partial)
    coef = torch.zeros(n, COEF_FIELDS, dtype=torch.float32, device=device)
    control = torch.zeros(CONTROL_FIELDS, dtype=torch.float32, device=device)
    impl.scalars(hyper, to_device(bucket.slot_groups(), torch.int64, device), step.view(-1),
                 to_device(present, torch.float32, device), partial, coef, control, has_stats, nonfinite == "skip")
    impl.update(bucket, grads, coef)
    return control

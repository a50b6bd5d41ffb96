"""Per-step values moved between host and device without a host sync, for ``MaskedAdamW.step``.

Hyperparameter rows and the which-parameters-have-gradients flags go up only when they change (pinned staging
on CUDA); the skipped-steps counter comes down lazily (a non-blocking copy every ``SKIP_POLL_EVERY`` steps,
read once it has landed) so the first skipped step can be warned about without stalling the host.

``opt`` is always the ``MaskedAdamW`` whose step this serves, typed as its base class ``torch.optim.Optimizer``: this
module sits below ``mu_fast.optim.optimizer``, which imports it, and imports nothing from there.
"""

from __future__ import annotations

import warnings

import torch
from torch.optim import Optimizer

from mu_fast.optim import _groups
from mu_fast.optim.masked_adamw import K_SKIPPED, to_device

SKIP_POLL_EVERY = 16  # CUDA: steps between non-blocking reads of the skipped-steps counter


def write_hyper(opt: Optimizer) -> None:
    """Upload the per-group hyperparameter rows when they change (tensor learning rates: every step, on device)."""
    rows, tensor_lrs = [], []
    max_norm = float(opt._pending_clip if opt._pending_clip is not None else (opt.max_grad_norm or 0.0))
    for gi, g in enumerate(opt.param_groups):
        if g.get("amsgrad") or g.get("differentiable") or g.get("decoupled_weight_decay") is False:
            _groups.check_group(g)  # an option switched on in place after construction: refuse it
        lr = g["lr"]
        if isinstance(lr, torch.Tensor):
            tensor_lrs.append((gi, lr))
            lr = 0.0
        rows.append((float(lr), float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]),
                     float(g["weight_decay"]), max_norm, -1.0 if g.get("maximize") else 1.0))
    capturing = opt.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if tuple(rows) != opt._hyper_key and not capturing:
        host = stage_hyper(opt, rows)
        if host is not opt._hyper:
            opt._hyper.copy_(host, non_blocking=True)
        if opt._hyper_event is not None:
            opt._hyper_event.record(torch.cuda.current_stream(opt.device))
        opt._hyper_key = tuple(rows)
    for gi, lr in tensor_lrs:
        opt._hyper[gi, 0].copy_(lr.reshape(()))


def stage_hyper(opt: Optimizer, rows: list[tuple[float, ...]]) -> torch.Tensor:
    """Host copy of the hyperparameter rows for the upload to the device.

    On CUDA: one persistent pinned buffer, rewritten in place when the copy that last read it has finished
    (a non-blocking event query; the previous step's upload has finished long before in any real loop), so a
    step whose learning rate changes costs no pinned allocation. Only when that copy is still in flight does
    it fall back to a fresh pinned tensor, so the host never waits and an in-flight copy is never overwritten.
    """
    if opt.device.type == "cpu":  # synchronous: the device tensor itself can be rewritten
        opt._hyper.numpy()[:] = rows
        return opt._hyper
    if opt.device.type != "cuda":
        return torch.tensor(rows, dtype=torch.float64)
    if opt._hyper_host is None:  # reset by _build whenever _hyper is reallocated
        opt._hyper_host = torch.empty(opt._hyper.shape, dtype=torch.float64).pin_memory()
        opt._hyper_event = torch.cuda.Event()
    elif not opt._hyper_event.query():
        return torch.tensor(rows, dtype=torch.float64).pin_memory()
    opt._hyper_host.numpy()[:] = rows
    return opt._hyper_host


def stage_present(opt: Optimizer, grads: list[list[torch.Tensor | None]]) -> None:
    """Upload which parameters have a gradient this step, only when that changes (``missing_grad="skip"``)."""
    if opt.missing_grad == "zero":
        return
    if opt.compact_grads:
        key = b"".join(b.grad_seen for b in opt._buckets)
    elif all(opt._complete):
        key = opt._all_present
    else:  # (list.count(None) would compare tensors with ==: microseconds each)
        key = bytes(g is not None for gs in grads for g in gs)
    if key == opt._present_key:
        return
    if opt.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "which parameters have a gradient changed during CUDA-graph capture; run one eager step with the "
            "same parameters having gradients before capturing"
        )
    opt._present.copy_(to_device(list(key), torch.float32, opt.device), non_blocking=True)
    opt._present_key = key


def poll_skips(opt: Optimizer) -> None:
    """Warn about the first skipped step without a host sync: on the CPU read the counter, on CUDA read a
    pinned copy of it issued every ``SKIP_POLL_EVERY`` steps once that copy has landed."""
    if opt.device.type == "cpu":
        n = float(opt._control_np[K_SKIPPED])
        if n:
            warn_skipped(opt, int(n))
        return
    if opt.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return
    if opt._skip_event is not None:
        if not opt._skip_event.query():
            return
        opt._skip_event = None
        if opt._skip_host[0]:
            warn_skipped(opt, int(opt._skip_host[0]))
            return
    opt._skip_polls += 1
    if opt._skip_polls % SKIP_POLL_EVERY == 1:
        opt._skip_host.copy_(opt._control[K_SKIPPED : K_SKIPPED + 1], non_blocking=True)
        opt._skip_event = torch.cuda.Event()
        opt._skip_event.record(torch.cuda.current_stream(opt.device))


def warn_skipped(opt: Optimizer, n: int) -> None:
    """The one warning about skipped steps (``n`` so far)."""
    opt._skip_warned = True
    warnings.warn(
        f"MaskedAdamW skipped {n} step(s) so far because an active gradient was NaN/inf (nothing was updated "
        "in those steps); opt.skipped_steps counts them, nonfinite='raise' stops at the first one",
        RuntimeWarning, stacklevel=2,
    )

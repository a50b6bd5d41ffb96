"""The paper's editing / unlearning losses (authors_repo.md §3.3), on logits at the last prompt token only.

* inject (editing): cross-entropy over the full vocabulary toward the new target's label token;
* unlearn: −log(1 − p_true) (HarmBench form), zeroed per example once log p_true < threshold (−5), so it saturates;
* maintain: cross-entropy toward the true label.
All take ``logits [B, V]`` (float32) and ``labels [B]`` int64 and return a scalar: the mean over the batch
(``reduction="mean"``) or the sum (``"sum"``; micro-batched steps divide the sums by the whole batch's size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """fp32 logits (fp64 stays fp64, for references)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    return values.mean() if reduction == "mean" else values.sum()


def inject_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE toward ``targets`` over the full vocabulary (mean or sum over the batch)."""
    return _reduce(F.cross_entropy(_wide(logits), targets, reduction="none"), reduction)


def maintain_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """CE toward the true ``labels`` (mean or sum over the batch)."""
    return _reduce(F.cross_entropy(_wide(logits), labels, reduction="none"), reduction)


def unlearn_loss(logits: torch.Tensor, labels: torch.Tensor, threshold: float = -5.0, reduction: str = "mean") -> torch.Tensor:
    """−log(1 − p_label) per example, 0 for examples whose log p_label < ``threshold``; mean or sum over the batch.

    log(1 − p) is computed as ``log(−expm1(log p))``, stable for p near 0 and near 1.
    """
    logp = torch.log_softmax(_wide(logits), dim=-1).gather(1, labels[:, None]).squeeze(1)
    log_one_minus_p = torch.log(-torch.expm1(logp.clamp(max=-1e-7)))
    active = (logp >= threshold).to(logp.dtype)
    return _reduce(-(log_one_minus_p * active), reduction)

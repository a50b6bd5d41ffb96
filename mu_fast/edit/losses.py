"""The paper's editing / unlearning losses (authors_repo.md §3.3), on logits at the last prompt token only.

* inject (editing): cross-entropy over the full vocabulary toward the new target's label token;
* unlearn: −log(1 − p_true) (HarmBench form), zeroed per example once log p_true < threshold (−5), so it saturates;
* maintain: cross-entropy toward the true label.
All take ``logits [B, V]`` (float32) and ``labels [B]`` int64 and return a scalar mean over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inject_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE toward ``targets`` over the full vocabulary."""
    return F.cross_entropy(logits.float(), targets)


def maintain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE toward the true ``labels``."""
    return F.cross_entropy(logits.float(), labels)


def unlearn_loss(logits: torch.Tensor, labels: torch.Tensor, threshold: float = -5.0) -> torch.Tensor:
    """Mean over the batch of −log(1 − p_label), with examples whose log p_label < ``threshold`` contributing 0.

    log(1 − p) is computed as ``log(−expm1(log p))``, stable for p near 0 and near 1.
    """
    logp = torch.log_softmax(logits.float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
    log_one_minus_p = torch.log(-torch.expm1(logp.clamp(max=-1e-7)))
    active = (logp >= threshold).to(logp.dtype)
    return -(log_one_minus_p * active).mean()

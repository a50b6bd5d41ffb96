"""Localized editing and unlearning: the paper's losses, the packed-batch training loop, and edit deltas."""

from mu_fast.edit.delta import EditDelta, apply_delta, base_checksum, extract_delta
from mu_fast.edit.loop import EditConfig, EditResult, EditStep, changed_elements, edit, snapshot
from mu_fast.edit.losses import inject_loss, maintain_loss, unlearn_loss

__all__ = [
    "EditConfig", "EditDelta", "EditResult", "EditStep", "apply_delta", "base_checksum", "changed_elements", "edit",
    "extract_delta", "inject_loss", "maintain_loss", "snapshot", "unlearn_loss",
]

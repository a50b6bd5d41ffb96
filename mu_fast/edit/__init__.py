"""Localized editing and unlearning: the paper's losses and the packed-batch training loop."""

from mu_fast.edit.loop import EditConfig, EditResult, EditStep, changed_elements, edit, snapshot
from mu_fast.edit.losses import inject_loss, maintain_loss, unlearn_loss

__all__ = ["EditConfig", "EditResult", "EditStep", "changed_elements", "edit", "inject_loss", "maintain_loss", "snapshot", "unlearn_loss"]

"""Localized editing and unlearning: the paper's losses, the packed-batch training loop, sequential
(partition by partition) editing, and edit deltas."""

from mu_fast.edit.batched import BatchedDeltas, BatchedEdit, edit_batched
from mu_fast.edit.delta import EditDelta, apply_delta, base_checksum, extract_delta
from mu_fast.edit.loop import EditConfig, EditResult, EditStep, changed_elements, edit, snapshot
from mu_fast.edit.losses import inject_loss, maintain_loss, unlearn_loss
from mu_fast.edit.sequential import all_facts_task, sequential_edit

__all__ = [
    "BatchedDeltas", "BatchedEdit", "EditConfig", "EditDelta", "EditResult", "EditStep", "all_facts_task", "apply_delta",
    "base_checksum", "changed_elements", "edit", "edit_batched", "extract_delta", "inject_loss", "maintain_loss", "sequential_edit", "snapshot", "unlearn_loss",
]

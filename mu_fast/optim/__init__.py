"""Masked optimizers: AdamW over the active elements of a ``Mask`` with compact (optionally 8-bit) state.

``MaskedAdamW`` is the drop-in ``torch.optim.Optimizer``; ``masked_adamw_step`` the functional step over one
``CompactBucket``; ``masked_adamw_reference`` the plain formula; ``SegmentTable`` the layout every backend reads.
"""

from __future__ import annotations

from mu_fast.optim.backends import backend_availability, select_backend
from mu_fast.optim.masked_adamw import BACKENDS, CompactBucket, masked_adamw_reference, masked_adamw_step
from mu_fast.optim.optimizer import MaskedAdamW
from mu_fast.optim.segments import SegmentTable

__all__ = [
    "BACKENDS",
    "CompactBucket",
    "MaskedAdamW",
    "SegmentTable",
    "backend_availability",
    "masked_adamw_reference",
    "masked_adamw_step",
    "select_backend",
]

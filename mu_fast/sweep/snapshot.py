"""Undo an edit by restoring only the elements its mask selects, and check that nothing else changed.

``MaskedSnapshot.take(model, mask)`` copies the masked elements of each masked parameter (``compact``: whole
tensors, selected rows / columns, or selected elements), so its memory and time are proportional to the mask, not
the model; ``restore(model)`` writes them back in place, bit for bit (the copies keep the parameter's dtype).
The edit loop changes only masked elements (``mu_fast.edit.loop``), and the relearning attack and probes leave the
model as they found it, so restoring the masked elements returns the model to its loaded state.

``fingerprint(model)`` is a cheap whole-model check that this held: per parameter, the int64 sum of its bits (each
element reinterpreted as an integer). The sweep takes it once per loaded model and compares after a failed run (a
failure may leave the model half-changed), reloading the model if it differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mu_fast.edit.delta import compact, scatter_
from mu_fast.masks import Mask

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class MaskedSnapshot:
    """The masked elements of a model at one moment: ``values[name]`` 1-D, the parameter's dtype and device."""

    mask: Mask
    values: dict[str, torch.Tensor]

    @classmethod
    def take(cls, model: torch.nn.Module, mask: Mask) -> MaskedSnapshot:
        params = dict(model.named_parameters())
        missing = [n for n in mask if n not in params]
        if missing:
            raise ValueError(f"the mask names {missing[0]!r}, which the model does not have; localize on this model")
        with torch.no_grad():
            values = {name: compact(params[name], sel).clone() for name, sel in mask.items()}
        return cls(mask, values)

    @property
    def numel(self) -> int:
        """Elements held (equals ``mask.param_count()``)."""
        return sum(v.numel() for v in self.values.values())

    def restore(self, model: torch.nn.Module) -> None:
        """Write the held elements back into ``model`` in place (only the masked elements are written)."""
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, selection in self.mask.items():
                scatter_(params[name], selection, self.values[name])


def fingerprint(model: torch.nn.Module) -> dict[str, int]:
    """Per parameter, the int64 sum of its elements' bit patterns: equal fingerprints mean (almost surely) equal
    weights; any single changed element changes it."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.device.type == "meta" or p.element_size() not in _INT or p.is_complex():
                continue
            bits = p.detach().contiguous().view(_INT[p.element_size()])
            out[name] = int(bits.sum(dtype=torch.int64))
    return out

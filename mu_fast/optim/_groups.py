"""Parameter groups of ``MaskedAdamW``: torch AdamW's group options, distinct parameters, masks from group specs.

Kept apart from optimizer.py: everything here runs when groups are added or masks set, never inside ``step()``
(except ``check_group``'s refusals, which ``step()`` re-checks only for groups edited in place).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mu_fast.masks import Mask, Selection

# torch.optim.AdamW's group options and their defaults. foreach / fused / capturable only say how torch's AdamW
# should run; MaskedAdamW always runs its own fused kernels, which never sync the host and can be captured in a
# CUDA graph, so any value is accepted and has no effect. maximize is honoured; the rest must keep the default.
TORCH_ADAMW_OPTIONS: dict[str, Any] = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                                           differentiable=False, fused=None, decoupled_weight_decay=True)


def check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Raise ``ValueError`` for an AdamW hyperparameter out of range."""
    lr_value = float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
    if not lr_value >= 0:
        raise ValueError(f"lr must be ≥ 0; got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1); got {betas}")
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0; got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be ≥ 0; got {weight_decay}")


def check_group(group: Mapping[str, Any]) -> None:
    """Raise for a group option MaskedAdamW cannot honour, naming the option and the fix.

    Keys unknown to torch's AdamW pass: LR schedulers and trainers keep their own keys in param groups.
    """
    check_hyper(group.get("lr", 1e-3), group.get("betas", (0.9, 0.999)), group.get("eps", 1e-8),
                group.get("weight_decay", 1e-2))
    if group.get("amsgrad"):
        raise ValueError(
            "param group option amsgrad=True is not supported by MaskedAdamW (it would keep a third buffer, the "
            "running maximum of the second moment); use amsgrad=False, or torch.optim.AdamW for AMSGrad"
        )
    if group.get("differentiable"):
        raise ValueError(
            "param group option differentiable=True is not supported: MaskedAdamW's step runs outside autograd; "
            "use differentiable=False, or torch.optim.AdamW to differentiate through the optimizer step"
        )
    if group.get("decoupled_weight_decay", True) is False:
        raise ValueError(
            "param group option decoupled_weight_decay=False (Adam's L2 penalty) is not supported: MaskedAdamW "
            "applies AdamW's decoupled weight decay; use decoupled_weight_decay=True, or add the L2 term to the loss"
        )
    if not isinstance(group.get("maximize", False), bool):
        raise TypeError(f"param group option maximize must be True or False; got {group['maximize']!r}")


def check_distinct(named: list[tuple[str, torch.Tensor]]) -> None:
    """Raise ``ValueError`` when a tensor is passed twice, or two parameters share memory: either would be
    updated twice per step."""
    seen: dict[int, str] = {}
    for name, p in named:
        if id(p) in seen:
            raise ValueError(
                f"parameters {seen[id(p)]!r} and {name!r} are the same tensor, which would be updated twice per "
                "step; pass each tensor once (tied weights: list the shared parameter once)"
            )
        seen[id(p)] = name
    spans = sorted((str(p.device), p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), name)
                   for name, p in named if p.numel())
    for (dev_a, _, end_a, name_a), (dev_b, start_b, _, name_b) in zip(spans, spans[1:]):
        if dev_a == dev_b and start_b < end_a:
            raise ValueError(
                f"parameters {name_a!r} and {name_b!r} share memory (views of one tensor), so the shared elements "
                "would be updated twice per step; pass the underlying tensor once instead"
            )


def group_mask_mapping(params: list[torch.Tensor], spec: Any) -> Mapping[Any, Any]:
    """A param group's ``"mask"`` entry as a mapping for ``resolve_mask``.

    spec: "whole", a ``Selection`` or a bool tensor (for every parameter of the group), a list with one such
    entry per parameter, or a mapping (a ``Mask``, or name / parameter -> entry).
    """
    if isinstance(spec, Mapping):
        return spec
    if isinstance(spec, (list, tuple)):
        if len(spec) != len(params):
            raise ValueError(f"a param group's 'mask' list needs one entry per parameter ({len(params)}); got {len(spec)}")
        return dict(zip(params, spec))
    return {p: spec for p in params}


def resolve_mask(named: list[tuple[str, torch.Tensor]], mask: Mask | Mapping[Any, Any] | None) -> Mask:
    """``mask`` (a ``Mask``, a mapping from name / position / parameter to a selection, or None: every parameter
    whole) as a ``Mask`` checked against the parameters ``named`` (names, shapes, no empty selection)."""
    by_name = dict(named)
    if len(by_name) != len(named):
        raise ValueError("parameter names must be unique across param groups")
    if mask is None:
        resolved = Mask()
        for name, p in named:
            resolved.add(name, p.shape)
    elif isinstance(mask, Mask):
        resolved = mask
    elif isinstance(mask, Mapping):
        position = {id(p): n for n, p in named}
        resolved = Mask()
        for key, value in mask.items():
            name = position.get(id(key)) if isinstance(key, torch.Tensor) else str(key)
            if name is None or name not in by_name:
                raise ValueError(f"mask key {key if not isinstance(key, torch.Tensor) else tuple(key.shape)} is not one of the optimizer's parameters")
            shape = tuple(by_name[name].shape)
            # Mask.add validates the entry (kind, integer indices, dtype, shape, meta device) and drops an empty one.
            if isinstance(value, Selection):
                resolved.add(name, shape, value.kind, value.index)
            elif isinstance(value, torch.Tensor):
                resolved.add(name, shape, "elements", value)
            elif value == "whole":
                resolved.add(name, shape)
            else:
                raise TypeError(f"mask value for {name!r} must be a Selection, a bool tensor or 'whole'; got {type(value).__name__}")
            if name not in resolved:
                raise ValueError(_empty(name))
    else:
        raise TypeError(f"mask must be a Mask, a mapping or None; got {type(mask).__name__}")
    for name in resolved:
        if name not in by_name:
            raise ValueError(
                f"mask names parameter {name!r}, which this optimizer was not given; pass it (e.g. "
                "mask.trainable_parameters(model)) or drop it from the mask"
            )
        if tuple(by_name[name].shape) != resolved.shape(name):
            raise ValueError(f"mask for {name!r} has shape {resolved.shape(name)} but the parameter has {tuple(by_name[name].shape)}")
    return resolved


def check_covered(named: list[tuple[str, torch.Tensor]], mask: Mask) -> None:
    """Raise ``ValueError`` when a parameter has no entry in ``mask``."""
    missing = [n for n, _ in named if n not in mask]
    if missing:
        raise ValueError(
            f"parameters {missing[:5]}{'...' if len(missing) > 5 else ''} are not in the mask; pass only masked "
            "parameters (mask.trainable_parameters(model)) or add them to the mask (a Mask drops a selection "
            "with no elements: select at least one element, or leave the parameter out)"
        )


def _empty(name: str) -> str:
    return (f"mask entry for {name!r} selects no elements; select at least one element, or leave {name!r} out of "
            "the optimizer's parameters (an empty selection would never train it)")

"""How many edit configurations train together in one pass (``mu_fast.edit.batched``) within a device budget.

A batched edit of K configurations over one frozen model holds, on the device:

* **once**: every weight of the model, frozen, in bf16 (the batched edit never writes the weights and never makes
  their ``.grad``; it refuses quantized layers), and the workspace (``WORKSPACE_BYTES``);
* **per configuration k**: its state, exactly as ``BatchedDeltas`` lays it out: per selected element its values and
  their base values in the parameter's dtype, two AdamW moments in fp32 (persistent), and during a step its delta
  and the delta's gradient in the parameter's dtype (``state_bytes``);
* **per group in a pass**: the tensors a group of rows saves for the backward, its logits and the caching
  allocator's share of them: what one edit's largest pass (facts or LM) adds over its optimizer step in
  ``mu_fast.memory.estimate``, at that configuration's batch. Groups in one forward record their graph from the
  lowest masked layer of *any* of them, so this term is estimated for the union of the K masks.

``plan_batch`` returns the largest K (up to ``k_max``, taking the configurations in the order given) with
``fixed + Σ_k state_k + activations ≤ budget``, then the most groups per forward/backward (``edit_batched``'s
``groups_per_pass``, at most K) that the rest of the budget holds, and what one more configuration would need. At
7-9B with the paper's batch one group's activations are tens of GB (Llama-3-8B, 4 masked layers: 40 GB of an 80 GB
budget), so K configurations share the device one group per pass; on small models the whole batch runs in one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mu_fast.masks import Mask
from mu_fast.memory.estimate import WORKSPACE_BYTES, Settings, estimate, rounded
from mu_fast.memory.shapes import BatchShape, ModelShape, gb, parse_budget, resolve_config

MOMENT_BYTES = 4  # fp32 AdamW moments of bf16 / fp32 values (BatchedDeltas: torch.promote_types(dtype, float32))
PARAM_BYTES = 2  # bf16 values, base values, delta and gradient (the dtype 7-9B models load in)


def state_bytes(n_elements: int, param_bytes: int = PARAM_BYTES, moment_bytes: int = MOMENT_BYTES) -> int:
    """Bytes one configuration with ``n_elements`` selected elements adds to a batched edit: values, base values and
    two moments (persistent) plus a delta and its gradient during the step (``BatchedDeltas``' layout)."""
    return rounded(n_elements * param_bytes) * 4 + rounded(n_elements * moment_bytes) * 2


@dataclass
class BatchPlan:
    """What fits: ``k`` configurations, trained ``groups_per_pass`` groups per forward/backward (``edit_batched``'s
    argument: every configuration's state stays on the device, but only that many groups' activations live at once);
    ``fixed`` (weights + workspace, bytes), ``state`` (bytes of each configuration's state, in order),
    ``activations`` (bytes of one group's activations, logits and allocator share), ``total`` (the planned peak),
    ``device_bytes`` (the budget), ``next_needs`` (state bytes the (k+1)-th configuration would add; None when all
    given fit or ``k_max`` stopped it)."""

    model: str
    k: int
    groups_per_pass: int
    fixed: int
    state: list[int]
    activations: int
    total: int
    device_bytes: int
    k_max: int
    next_needs: int | None = None

    def format(self) -> str:
        lines = [f"batched edit plan: {self.model}: {self.k} configuration(s), {self.groups_per_pass} per pass, within "
                 f"{gb(self.device_bytes)}",
                 f"  once             {gb(self.fixed)}  frozen bf16 weights + workspace",
                 f"  per group        {gb(self.activations)}  activations, logits, allocator share (union of the masks)",
                 f"  per config       {gb(min(self.state[:self.k]))} - {gb(max(self.state[:self.k]))}  values, base, 2 "
                 "fp32 moments, delta + gradient per selected element",
                 f"  peak             {gb(self.total)}"]
        if self.next_needs is not None:
            lines.append(f"  one more needs   {gb(self.next_needs)} (headroom {gb(self.device_bytes - self.total)})")
        return "\n".join(lines)


def plan_batch(model_config: Any, masks: Sequence[Mask], edit_config: Any = None, device_bytes: int | str | None = None,
               batch: BatchShape | None = None, k_max: int = 64) -> BatchPlan:
    """The number of configurations (``masks[i]`` with ``edit_config``'s batch) that train together within
    ``device_bytes`` (bytes or "80GB"; module docstring for the byte model). Raises ``ValueError`` (one line) when
    not even one fits, naming what it needs."""
    from mu_fast.edit.loop import EditConfig

    budget = parse_budget(device_bytes)
    if budget is None:
        raise ValueError("plan_batch needs device_bytes (e.g. '80GB', or torch.cuda.mem_get_info()[0])")
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be a positive integer; got {k_max!r}")
    masks = list(masks)
    if not masks or any(not isinstance(m, Mask) or len(m) == 0 for m in masks):
        raise ValueError("plan_batch needs one non-empty Mask per configuration (mu_fast.masks.Mask)")
    config = resolve_config(model_config)
    shape = ModelShape.from_config(config)
    for m in masks:
        m.check_model(config, model_config if isinstance(model_config, str) else None)
    cfg = edit_config if edit_config is not None else EditConfig()
    if batch is None:
        batch = BatchShape(n_maintain=cfg.maintain_batch, n_lm=cfg.lm_batch if cfg.lm_coef else 0,
                           lm_tokens=cfg.lm_max_tokens)
    union = masks[0]
    for m in masks[1:]:
        union = union.union(m)
    e = estimate(shape, union, Settings(frozen="bf16", compact_grads=True), batch)
    b = e.breakdown
    fixed = b["frozen_weights"] + b["masked_weights"] + b["workspace"]
    # the largest pass over the optimizer step's moment (what the passes add to the weights and the edit's own
    # optimizer state, which the batched edit replaces by ``state``), plus the allocator's share of the pass
    passes = [v for p, v in e.phases.items() if p != "step"]
    activations = max(passes, default=e.phases["step"]) - e.phases["step"] + b["allocator"]
    state = [state_bytes(m.param_count()) for m in masks]
    name = getattr(config, "_name_or_path", "") or shape.arch
    model = f"{name} ({shape.arch}, {shape.n_layers} layers)"
    k, stored = 0, 0
    for cost in state[:k_max]:  # at least one group's activations beside every configuration's state
        if fixed + stored + cost + activations > budget:
            break
        k, stored = k + 1, stored + cost
    if k == 0:
        need = f"{math.ceil((fixed + state[0] + activations) / 1e7) / 100:.2f}"
        raise ValueError(f"{model}: one configuration of this batched edit needs {need} GB ({gb(fixed)} weights and "
                         f"workspace + {gb(state[0] + activations)} for the configuration); budget is {gb(budget)}: "
                         "raise the budget, shrink the batch, or run the edit alone (mu_fast.memory.plan plans "
                         "micro-batches)")
    groups = max(1, min(k, (budget - fixed - stored) // max(activations, 1)))
    total = fixed + stored + groups * activations
    next_needs = state[k] if k < min(len(state), k_max) else None
    return BatchPlan(model, k, int(groups), fixed, state, activations, total, budget, k_max, next_needs)

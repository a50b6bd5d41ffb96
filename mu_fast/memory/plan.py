"""The memory plan: the cheapest edit settings whose estimated peak fits a device budget.

``plan`` enumerates candidate settings, orders them by an estimate of the step time they cost, and returns the
first whose peak (``mu_fast.memory.estimate``) fits. The time order, cheapest first:

* frozen precision (only when ``frozen=None``): bf16, then int8, then nf4 — a quality order (quantized frozen
  weights change the function being trained), so it outranks every time cost below;
* gradient checkpointing adds the recompute of one forward of every layer it covers (those from the lowest
  trainable one up; ``CHECKPOINT_FROM_EMBEDDINGS`` would extend it to every layer, with their backward too, if the
  embedding output required grad, which EditStep prevents);
* each extra micro-batch pass (facts or LM) adds ``MICRO_BATCH_COST`` (a pass re-reads every weight and launches
  every kernel again; the FLOPs are the same);
* 8-bit MaskedAdamW moments add ``STATE8_COST`` (a slightly slower step and quantized moments);
* each halving of the LM-head chunk below the automatic size adds ``CHUNK_COST`` (more, smaller head matmuls);
* compact gradients cost nothing measurable: with ``compact_grads=None`` the plan takes whichever needs less memory.
Ties go to the smaller peak. The costs are documented guesses of relative time, to be replaced by GPU timings; the
report shows them as "step time ×", the time of one step over that of a plain step (one pass each, no checkpointing),
the frozen precision's rank left out. The peak each candidate is judged by is reserved bytes: the tensors plus the
caching allocator's share (``mu_fast.memory.allocator``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from mu_fast.masks import Mask
from mu_fast.memory.estimate import CATEGORIES, CHECKPOINT_FROM_EMBEDDINGS, WORKSPACE_BYTES, MaskLayout, Settings, estimate
from mu_fast.memory.shapes import BatchShape, ModelShape, gb, parse_budget, resolve_config

FROZEN_ORDER = ("bf16", "int8", "nf4")
FROZEN_COST = {"bf16": 0.0, "int8": 100.0, "nf4": 200.0}
MICRO_BATCH_COST = 0.02
STATE8_COST = 0.03
CHUNK_COST = 0.005
TERMS = {
    "frozen_weights": "parameters the mask does not name, in the frozen precision",
    "masked_weights": "the masked parameters, whole, bf16",
    "gradients": "dense bf16 .grad of masked parameters, or the fp32 compact buffer + one transient",
    "optimizer_state": "AdamW moments (+ master, segment tables, step temporaries)",
    "activations": "tensors saved for backward + one layer's backward working set",
    "logits": "LM-head outputs at read positions / one LM chunk, with their gradients",
    "workspace": "dequantized frozen weight (int8/nf4), cuBLAS workspaces and kernel scratch",
    "allocator": "reserved by torch's caching allocator beyond the tensors (segments, fragmentation)",
}


@dataclass(frozen=True)
class Candidate:
    """One setting considered: its cost (the planner's order: ``step_time`` plus the frozen precision's rank),
    estimated peak (bytes) and whether it fits."""

    settings: Settings
    cost: float
    total: int
    fits: bool

    @property
    def step_time(self) -> float:
        """Estimated time of one step relative to a plain step (one pass each, no checkpointing, bf16 frozen
        weights = 1.0); the frozen precision's rank is a quality order, not a time, and is left out."""
        return self.cost - FROZEN_COST[self.settings.frozen]


@dataclass
class MemoryPlan:
    """The chosen settings for an edit and their estimated peak.

    breakdown: bytes per term at the peak (the keys of ``TERMS``); total: the peak, in bytes the caching allocator
    reserves (``max_memory_reserved``; ``total - breakdown["allocator"]`` is what its tensors allocate); phase: where it is
    reached ("facts", "lm" or "step"); phases: each phase's peak; settings: the chosen knobs (``frozen`` is the
    loader's, the rest are ``EditConfig`` fields); candidates: what was estimated, in the order tried;
    device_bytes: the budget (None: no budget, the given settings were estimated as they are).
    """

    model: str
    settings: Settings
    breakdown: dict[str, int]
    total: int
    phase: str
    phases: dict[str, int]
    batch: BatchShape
    base_config: Any
    device_bytes: int | None = None
    candidates: list[Candidate] = field(default_factory=list)
    trainable_elements: int = 0
    vocab: int = 0

    @property
    def lm_chunk(self) -> int:
        """Positions per LM-head chunk the edit runs: the chosen ``lm_chunk_tokens``, else the automatic size."""
        from mu_fast.models.forward import lm_chunk_tokens

        return self.settings.lm_chunk_tokens or lm_chunk_tokens(self.vocab)

    def describe_chunk(self) -> str:
        """``LM head in chunks of N positions (chosen | automatic: ...)``."""
        from mu_fast.models.forward import LM_CHUNK_BYTES

        how = "chosen" if self.settings.lm_chunk_tokens else f"automatic: at most {LM_CHUNK_BYTES >> 20} MiB of fp32 logits"
        return f"LM head in chunks of {self.lm_chunk} positions ({how})"

    @property
    def frozen(self) -> str:
        return self.settings.frozen

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.total <= self.device_bytes

    @property
    def tensor_total(self) -> int:
        """The peak without the stated workspace constant and the allocator's slack: what a fake-tensor trace of the
        step counts (``total`` is reserved bytes: ``torch.cuda.max_memory_reserved``)."""
        return self.total - WORKSPACE_BYTES - self.breakdown.get("allocator", 0)

    def edit_config(self) -> Any:
        """The given ``EditConfig`` with the chosen memory settings applied."""
        st = self.settings
        masked = st.optimizer in ("auto", "masked")
        return dataclasses.replace(
            self.base_config, grad_checkpointing=st.grad_checkpointing, micro_batch=st.micro_batch,
            lm_micro_batch=st.lm_micro_batch, state_bits=st.state_bits if masked else 32,
            master_weights=st.master_weights and masked, compact_grads=st.compact_grads if masked else None,
            optimizer=st.optimizer, lm_chunk_tokens=st.lm_chunk_tokens)

    def describe_settings(self) -> str:
        return describe(self.settings)

    def table(self) -> Any:
        """A rich Table of the breakdown."""
        from rich.table import Table

        title = f"memory plan: {self.model}, {self.trainable_elements:,} trainable elements"
        table = Table(title=title, title_justify="left")
        table.add_column("term")
        table.add_column("GB", justify="right")
        table.add_column("what")
        for key in CATEGORIES:
            table.add_row(key.replace("_", " "), f"{self.breakdown.get(key, 0) / 1e9:.2f}", TERMS[key])
        table.add_row("peak", f"[bold]{self.total / 1e9:.2f}[/bold]", f"in the {self.phase} phase "
                      + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in self.phases.items()))
        if self.device_bytes is not None:
            table.add_row("budget", f"{self.device_bytes / 1e9:.2f}",
                          f"headroom {(self.device_bytes - self.total) / 1e9:.2f} GB")
        return table

    def format(self) -> str:
        """The plan as plain text (one line per term, then the settings)."""
        lines = [f"memory plan: {self.model}, {self.trainable_elements:,} trainable elements, batch "
                 f"{self.batch.n_forget}+{self.batch.n_maintain} facts × {self.batch.fact_tokens} tokens, "
                 f"{self.batch.n_lm} texts × {self.batch.lm_tokens} tokens"]
        lines += [f"  {k.replace('_', ' '):16s} {self.breakdown.get(k, 0) / 1e9:8.2f} GB  {TERMS[k]}" for k in CATEGORIES]
        lines.append(f"  {'peak':16s} {self.total / 1e9:8.2f} GB  in the {self.phase} phase")
        if self.device_bytes is not None:
            lines.append(f"  {'budget':16s} {self.device_bytes / 1e9:8.2f} GB  headroom "
                         f"{(self.device_bytes - self.total) / 1e9:.2f} GB")
        lines.append(f"  settings: {describe(self.settings)}; {self.describe_chunk()}")
        return "\n".join(lines)


def describe(st: Settings) -> str:
    """Settings as ``frozen=nf4, checkpointing, micro_batch=16, ...`` (defaults left out)."""
    parts = [f"frozen={st.frozen}", "checkpointing" if st.grad_checkpointing else "no checkpointing"]
    for name in ("micro_batch", "lm_micro_batch", "lm_chunk_tokens"):
        if getattr(st, name) is not None:
            parts.append(f"{name}={getattr(st, name)}")
    parts.append(f"optimizer={st.optimizer}")
    if st.optimizer in ("auto", "masked"):
        parts.append(f"state_bits={st.state_bits}")
        parts += ["master_weights"] * st.master_weights
        parts.append("compact_grads" if st.compact_grads else "dense grads")
    return ", ".join(parts)


def plan_report(plan: MemoryPlan, candidates: int = 8) -> Any:
    """A rich renderable: the breakdown, then the last ``candidates`` settings tried (the chosen one last)."""
    from rich.console import Group
    from rich.table import Table

    tried = Table(title="settings tried (cheapest first; step time: × a plain step, estimated)", title_justify="left")
    for col, justify in (("settings", "left"), ("step time ×", "right"), ("peak GB", "right"), ("fits", "center")):
        tried.add_column(col, justify=justify)
    for c in plan.candidates[-candidates:]:
        tried.add_row(describe(c.settings), f"{c.step_time:.2f}", f"{c.total / 1e9:.2f}", "yes" if c.fits else "no")
    return Group(plan.table(), f"settings: {describe(plan.settings)}; {plan.describe_chunk()}", tried)


# --------------------------------------------------------------------------------------------------- planning
def step_cost(st: Settings, shape: ModelShape, layout: MaskLayout, batch: BatchShape) -> float:
    """Relative time of one step with ``st`` (1.0 = one pass each, no checkpointing); see the module docstring."""
    low = layout.lowest(shape.n_layers)
    above, below = shape.n_layers - low, low
    cost = 1.0 + FROZEN_COST[st.frozen]
    if st.grad_checkpointing:
        covered, extra_backward = (shape.n_layers, below) if CHECKPOINT_FROM_EMBEDDINGS else (above, 0)
        cost += (covered + 2 * extra_backward) / max(3 * above + below, 1)
    cost += MICRO_BATCH_COST * (math.ceil(batch.n_facts / (st.micro_batch or batch.n_facts)) - 1)
    if batch.n_lm:
        cost += MICRO_BATCH_COST * (math.ceil(batch.n_lm / (st.lm_micro_batch or batch.n_lm)) - 1)
    cost += STATE8_COST * (st.state_bits == 8)
    if st.lm_chunk_tokens is not None:
        from mu_fast.models.forward import lm_chunk_tokens

        cost += CHUNK_COST * max(0.0, math.log2(lm_chunk_tokens(shape.vocab) / st.lm_chunk_tokens))
    return cost


def _splits(n: int) -> list[int | None]:
    """None (one pass) and the sizes that cut ``n`` rows into 2, 4, 8, ... passes, down to one row."""
    out: list[int | None] = [None]
    k = 2
    while True:
        size = math.ceil(n / k)
        if size < (out[-1] or n):
            out.append(size)
        if size == 1:
            return out
        k *= 2


def candidates(shape: ModelShape, mask: Mask, base: Settings, frozen: tuple[str, ...], batch: BatchShape,
               compact_choices: tuple[bool, ...]) -> list[Settings]:
    """Every setting the planner may choose (``base`` supplies optimizer and master_weights)."""
    from mu_fast.models.forward import lm_chunk_tokens

    auto = lm_chunk_tokens(shape.vocab)
    chunks = [None] + [auto >> k for k in range(1, 8) if (auto >> k) >= 16]
    bits = (32, 8) if base.optimizer in ("auto", "masked") else (32,)
    lm_splits = _splits(batch.n_lm) if batch.n_lm else [None]
    return [dataclasses.replace(base, frozen=f, grad_checkpointing=ck, micro_batch=mb, lm_micro_batch=lmb,
                                state_bits=b, compact_grads=cg, lm_chunk_tokens=ch)
            for f in frozen for ck in (False, True) for mb in _splits(batch.n_facts) for lmb in lm_splits
            for b in bits for cg in compact_choices for ch in chunks]


def plan(model_config: Any, mask: Mask, edit_config: Any = None, frozen: str | None = None,
         device_bytes: int | str | None = None, batch: BatchShape | None = None) -> MemoryPlan:
    """Plan the memory of an edit of ``mask`` on a model of ``model_config`` (a transformers config or a shipped
    model name).

    edit_config: an ``EditConfig`` whose optimizer, master_weights and (if set) compact_grads are kept; its other
    memory fields are what the plan chooses. frozen: "bf16" | "int8" | "nf4", or None (bf16, else int8, else nf4).
    device_bytes: the budget (bytes, or "24GB" / "24GiB" / "12000MB": a string needs a unit): what torch's caching
    allocator may reserve, which the CUDA context (a few hundred MB, outside torch's counters) does not count in;
    on a whole GPU, ``torch.cuda.mem_get_info()[0]`` right after CUDA initialises. The peak it is compared with
    is reserved bytes (the ``allocator`` term, ``mu_fast.memory.allocator``). None estimates the settings of
    ``edit_config`` as given. batch: the per-step batch (default: 64 forget prompts + the config's maintain and LM
    batches, ``BatchShape``). Raises ``ValueError`` (one line) naming the smallest budget when nothing fits.
    """
    from mu_fast.edit.loop import EditConfig, uses_compact_grads

    budget = parse_budget(device_bytes)
    if frozen is not None and frozen not in FROZEN_ORDER:
        raise ValueError(f"frozen={frozen!r}; choose one of {FROZEN_ORDER} or None (the planner picks)")
    if not isinstance(mask, Mask) or len(mask) == 0:
        raise ValueError("plan needs a non-empty Mask (mu_fast.masks.Mask); localize first or load one with Mask.load")
    config = resolve_config(model_config)
    shape = ModelShape.from_config(config)
    mask.check_model(config, model_config if isinstance(model_config, str) else None)
    _check_mask(mask, config)
    base_config = edit_config if edit_config is not None else EditConfig()
    partial = [name for name in mask if mask[name].kind != "whole"]
    if partial and base_config.optimizer == "bnb8bit":
        raise ValueError(f"optimizer='bnb8bit' trains whole matrices, but the mask selects only part of {partial[0]!r}; "
                         "use optimizer='masked' with state_bits=8 for partial masks")
    if batch is None:
        batch = BatchShape(n_maintain=base_config.maintain_batch, n_lm=base_config.lm_batch if base_config.lm_coef else 0,
                           lm_tokens=base_config.lm_max_tokens)
    layout = MaskLayout.of(mask)
    given = Settings(frozen=frozen or "bf16", grad_checkpointing=base_config.grad_checkpointing,
                     micro_batch=base_config.micro_batch, lm_micro_batch=base_config.lm_micro_batch,
                     state_bits=base_config.state_bits, master_weights=base_config.master_weights,
                     compact_grads=uses_compact_grads(mask, base_config), optimizer=base_config.optimizer,
                     lm_chunk_tokens=base_config.lm_chunk_tokens)
    name = getattr(config, "_name_or_path", "") or shape.arch
    make = dict(model=f"{name} ({shape.arch}, {shape.n_layers} layers)", batch=batch, base_config=base_config,
                trainable_elements=mask.param_count(), vocab=shape.vocab)
    if budget is None:
        e = estimate(shape, mask, given, batch)
        return MemoryPlan(settings=given, breakdown=e.breakdown, total=e.total, phase=e.phase, phases=e.phases, **make)
    allowed = (frozen,) if frozen else FROZEN_ORDER
    masked_optimizer = base_config.optimizer in ("auto", "masked")
    if not masked_optimizer:
        compact: tuple[bool, ...] = (False,)
    else:
        compact = (False, True) if base_config.compact_grads is None else (base_config.compact_grads,)
    cache: dict = {}
    pool = candidates(shape, mask, given, allowed, batch, compact)
    tried: list[Candidate] = []
    smallest = None
    small_chunk = min((s.lm_chunk_tokens for s in pool if s.lm_chunk_tokens), default=None)
    for f in allowed:  # the smallest setting of each precision first: skip a precision that cannot fit
        floor = min((s for s in pool if s.frozen == f and _is_extreme(s, batch, small_chunk)),
                    key=lambda s: estimate(shape, mask, s, batch, cache=cache).total)
        floor_total = estimate(shape, mask, floor, batch, cache=cache).total
        if smallest is None or floor_total < smallest[1]:
            smallest = (floor, floor_total)
        if floor_total > budget:
            continue
        ranked = sorted((s for s in pool if s.frozen == f), key=lambda s: step_cost(s, shape, layout, batch))
        for i, st in enumerate(ranked):
            e = estimate(shape, mask, st, batch, cache=cache)
            cost = step_cost(st, shape, layout, batch)
            tried.append(Candidate(st, cost, e.total, e.total <= budget))
            if e.total <= budget:  # among equal costs, the smaller peak
                ties = [s for s in ranked[i:] if step_cost(s, shape, layout, batch) == cost]
                best = min(ties, key=lambda s: estimate(shape, mask, s, batch, cache=cache).total)
                e = estimate(shape, mask, best, batch, cache=cache)
                return MemoryPlan(settings=best, breakdown=e.breakdown, total=e.total, phase=e.phase,
                                  phases=e.phases, device_bytes=budget, candidates=tried, **make)
    assert smallest is not None
    need = f"{math.ceil(smallest[1] / 1e7) / 100:.2f}"
    raise ValueError(
        f"{make['model']} with this mask ({mask.param_count():,} trainable elements) needs at least {need} GB with "
        f"the smallest setting ({describe(smallest[0])}); budget is {gb(budget)}: raise --budget to {need}GB or "
        f"more, or train fewer parameters or a smaller batch{', or use frozen=nf4' if frozen in ('bf16', 'int8') else ''}"
    )


def _is_extreme(st: Settings, batch: BatchShape, small_chunk: int | None) -> bool:
    """The most memory-frugal value of every knob whose memory falls monotonically (checkpointing, micro-batches of
    one row, the smallest LM chunk, 8-bit state); compact gradients are not monotone and stay free."""
    return (st.grad_checkpointing and st.micro_batch == 1 and (st.lm_micro_batch == 1 or batch.n_lm <= 1)
            and st.lm_chunk_tokens == small_chunk and (st.state_bits == 8 or st.optimizer not in ("auto", "masked")))


def _check_mask(mask: Mask, config: Any) -> None:
    """ValueError when a masked name or shape does not belong to the model of ``config``."""
    from mu_fast.memory.estimate import _param_tensors

    shape = ModelShape.from_config(config)
    known = {n: s for n, s, _ in _param_tensors(shape)}
    for name in mask:
        if name.endswith("norm.weight") or "layernorm" in name:
            continue
        if name not in known:
            raise ValueError(f"mask names {name!r}, which a {shape.arch} model of {shape.n_layers} layers does not have; "
                             "build the mask for this model (a mask for another architecture?)")
        if tuple(mask.shape(name)) != tuple(known[name]):
            raise ValueError(f"mask has {name!r} of shape {mask.shape(name)}, but this model's is {known[name]}; "
                             "build the mask for this model's config")

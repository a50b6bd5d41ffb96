"""Runs trained together: K runs of one (model, task, evaluations) as one unit of work (``mu_fast.edit.batched``).

``group(runs, size)`` turns the pending runs into units: runs that share the model, the task and the evaluation
settings, whose edits ``edit_batched`` supports (``batchable``), are packed in order into ``RunBatch`` es of up to
``size``; every other run (a sequence, a run whose edit uses 8-bit state, master weights, micro-batches, gradient
checkpointing or bitsandbytes' optimizer) and a lone leftover stays a single run. A batch is executed by
``ModelSession.execute_batch``: one batched edit over the frozen model, the formats of every run scored in one
batched pass, then each run's other evaluations on its own variant, one store record per run, sent as each finishes, with the same run id and fields as the run alone, plus
``batch`` (its size and index). Executors treat a batch as a unit that sends ``parts`` records and goes on after a
failed one (``ends_on_failure`` is False: each run of it fails or succeeds on its own).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from mu_fast.sweep.spec import RunConfig

# EditConfig settings the batched edit does not implement (mu_fast.edit.batched): such runs run alone.
UNBATCHED = {"state_bits": (8,), "master_weights": (True,), "grad_checkpointing": (True,),
             "optimizer": ("bnb8bit",)}


def batchable(run: RunConfig) -> bool:
    """Whether ``run`` can train in a batch: a single run whose edit settings ``edit_batched`` supports."""
    if run.kind != "single":
        return False
    edit = run.edit
    if any(edit.get(name) in values for name, values in UNBATCHED.items()):
        return False
    return edit.get("micro_batch") is None and edit.get("lm_micro_batch") is None


def batch_key(run: RunConfig) -> str:
    """Runs with equal keys may share a batch (one model, one task, one set of evaluations)."""
    return json.dumps([run.model, run.task, run.evaluations], sort_keys=True)


class RunBatch:
    """Several runs executed as one unit (module docstring). Behaves as a run to the schedulers and executors."""

    kind = "batch"
    streams = True
    ends_on_failure = False

    def __init__(self, runs: Iterable[RunConfig]):
        self.runs = list(runs)
        if len(self.runs) < 2:
            raise ValueError("a batch holds at least 2 runs")

    @property
    def model_key(self) -> str:
        return self.runs[0].model_key

    @property
    def run_id(self) -> str:
        return "batch:" + "+".join(r.run_id for r in self.runs)

    @property
    def parts(self) -> int:
        return len(self.runs)

    def part(self, index: int) -> RunConfig:
        return self.runs[index]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "batch", "runs": [r.to_dict() for r in self.runs]}

    def label(self) -> str:
        return " + ".join(r.label() for r in self.runs)


def group(runs: Iterable[RunConfig], size: int) -> list[RunConfig | RunBatch]:
    """The units of ``runs`` for batches of up to ``size`` (module docstring); order kept within each key."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"batch size must be a positive integer; got {size!r}")
    runs = list(runs)
    if size == 1:
        return list(runs)
    units: list[RunConfig | RunBatch] = []
    open_: dict[str, list[RunConfig]] = {}
    order: list[str] = []
    for run in runs:
        if not batchable(run):
            units.append(run)
            continue
        key = batch_key(run)
        if key not in open_:
            open_[key] = []
            order.append(key)
        open_[key].append(run)
    for key in order:
        members = open_[key]
        for i in range(0, len(members), size):
            chunk = members[i:i + size]
            units.append(chunk[0] if len(chunk) == 1 else RunBatch(chunk))
    return units


def device_plan(model: Any, masks: list[Any], configs: list[Any], device: Any) -> tuple[int, int | None]:
    """``(configurations per batched edit, groups per forward/backward)`` for a unit's runs on ``device``.

    On a GPU: what ``mu_fast.memory.plan_batch`` fits in the memory torch can use there (free plus what its caching
    allocator already holds, the loaded model included), as many groups per pass as the rest holds (None: all). On a
    CPU (a batch asked for by number): all of them, one group per forward/backward with one shared optimizer step
    (all groups in one pass measured 0.71-0.89x the runs alone there: benchmarks/bench_batched_edit.py). A model whose
    shapes the planner cannot read gets the whole unit, one group per pass; where not even one configuration fits, 1
    (each run alone)."""
    if getattr(device, "type", str(device)) != "cuda":
        return len(masks), 1
    import torch

    from mu_fast.memory.batch import plan_batch

    budget = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)
    try:
        p = plan_batch(model.config, masks, configs[0], device_bytes=budget, k_max=len(masks))
    except ValueError:  # not even one configuration fits a batched edit: each run alone (its edit plans its memory)
        return 1, 1
    except (TypeError, KeyError, AttributeError):
        return len(masks), 1
    return p.k, (None if p.groups_per_pass >= p.k else p.groups_per_pass)

"""``dry_run(spec)``: the expanded runs, what the store already holds, and the estimated time and memory.

Time per run, per (model, method): the mean ``timings.total`` of that model and method's ``ok`` records in the store
when it has any (``measured``), else of that model's records, else a stated guess (``guess``): for the organism
``ORGANISM_STEP_SECONDS`` per edit or relearning step plus ``ORGANISM_RUN_SECONDS`` (measured on a busy 2-core
CPU, 1 torch thread, CI organism); for 7-9B models ``LARGE_STEP_SECONDS`` per step plus ``LARGE_EVAL_SECONDS``
(guesses for one H100-class GPU, to be replaced by measurements). Each model adds one load
(``LARGE_LOAD_SECONDS`` / the measured ``session.load_seconds``) per worker that holds it.

Memory, per (model, method): ``mu_fast.memory.plan`` of the run's EditConfig with a stand-in mask (localizations
are not known before the model loads): the paper's selection for ``paper:*`` methods, every MLP for ``all_mlps``,
every attention and MLP block for ``nonlocalized``, and otherwise the paper budget's size as whole MLP layers (the
paper's FLU layer count for its models, else an eighth of the layers). The organism needs well under 1 GB. An
organism that is not cached yet adds its training time (``ORGANISM_TRAIN_SECONDS``). The store's path is printed.
"""

from __future__ import annotations

import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mu_fast.sweep.spec import RunConfig, expand, load_spec, paper_model_of

ORGANISM_STEP_SECONDS = 0.12
ORGANISM_RUN_SECONDS = 1.5
ORGANISM_LOAD_SECONDS = 6.0
# Training an organism that is not cached yet (README / mu_fast.organism: measured on this 2-core CPU).
ORGANISM_TRAIN_SECONDS = {"ci": 40.0, "demo": 100.0}
ORGANISM_MEMORY = "organism: well under 1 GB"
LARGE_STEP_SECONDS = 1.0
LARGE_EVAL_SECONDS = 60.0
LARGE_LOAD_SECONDS = 90.0


@dataclass
class DryRun:
    """The runs, which are pending, estimated seconds and peak memory (bytes or None) per model and method."""

    runs: list[RunConfig]
    pending: list[RunConfig]
    seconds: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    memory: dict[tuple[str, str], tuple[int | None, str]] = field(default_factory=dict)
    load_seconds: dict[str, float] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)  # organisms not in the cache yet

    @property
    def total_seconds(self) -> float:
        per_run = sum(self.seconds[(r.model["ref"], r.method)][0] for r in self.pending)
        models = {r.model["ref"] for r in self.pending}
        loads = sum(self.load_seconds.get(m, 0.0) + self.train_seconds.get(m, 0.0) for m in models)
        return per_run + loads

    def format(self, width: int = 100) -> str:
        lines = [f"{len(self.runs)} runs, {len(self.runs) - len(self.pending)} already stored, {len(self.pending)} to run; "
                 f"estimated {_duration(self.total_seconds)} on one worker"]
        lines.append(f"{'model':28s} {'method':14s} {'runs':>5s} {'s/run':>8s} {'source':9s} {'peak memory':>12s}")
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for r in self.pending:
            counts[(r.model["ref"], r.method)] += 1
        for (model, method), (sec, source) in self.seconds.items():
            mem, how = self.memory.get((model, method), (None, ""))
            mem_text = "?" if mem is None else f"{mem / 1e9:.2f} GB"
            if how == ORGANISM_MEMORY:
                mem_text, how = "< 1 GB", ""
            name = model if len(model) <= 28 else "…" + model[-27:]
            line = f"{name:28s} {method:14s} {counts[(model, method)]:5d} {sec:8.1f} {source:9s} {mem_text:>12s}"
            # the note goes on its own line when it would not fit beside the columns (it is never cut)
            lines += [f"{line} {how}".rstrip()] if len(line) + 1 + len(how) <= width else [line, f"{'':>{len(line) - 12}}{how}"]
        for model, seconds in self.train_seconds.items():
            lines.append(f"{model} is not trained yet: training it first adds about {_duration(seconds)} (once; "
                         "included in the estimate)")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _steps(run: RunConfig) -> int:
    relearn = run.evaluations.get("relearn") or {}
    return int(run.edit["steps"]) + int(relearn.get("steps", 0))


def _guess(run: RunConfig) -> float:
    if run.model["kind"] == "organism":
        return ORGANISM_RUN_SECONDS + ORGANISM_STEP_SECONDS * _steps(run)
    return LARGE_EVAL_SECONDS + LARGE_STEP_SECONDS * _steps(run)


def _model_config(ref: Mapping[str, Any]) -> Any:
    """The transformers config of a model without its weights, or None (a hub model that is not shipped)."""
    from mu_fast.models.shipped import shipped_config, shipped_name

    if ref["kind"] == "checkpoint":
        import transformers

        return transformers.AutoConfig.from_pretrained(ref["ref"])
    try:
        return shipped_config(shipped_name(str(ref["ref"]).removeprefix("random:")))
    except ValueError:
        return None


def _stand_in_mask(run: RunConfig, table: Any) -> tuple[Any, str]:
    from mu_fast.masks import Mask
    from mu_fast.models.sites import Component

    L = table.n_layers
    if run.method == "nonlocalized":
        comps, how = [Component(k, i) for i in range(L) for k in ("attn", "mlp")], "every block"
    elif run.method == "all_mlps":
        comps, how = [Component("mlp", i) for i in range(L)], "every MLP"
    else:
        paper = paper_model_of(run.model)
        if run.method.startswith("paper:") and paper:
            from mu_fast.localize.paper_graphs import paper_localization

            comps = paper_localization(paper, run.task["dataset"], run.method.split(":", 1)[1])
            how = "the paper's selection"
        else:
            if paper:
                from mu_fast.localize.paper_graphs import paper_flu_layers

                k = len(paper_flu_layers(paper, "sports" if run.task["dataset"] != "counterfact" else "counterfact"))
            else:
                k = max(1, L // 8)
            comps, how = [Component("mlp", i) for i in range(k)], f"stand-in: {k} MLP layers"
    return Mask.from_components(table, comps), how


def _memory(run: RunConfig) -> tuple[int | None, str]:
    if run.model["kind"] == "organism":
        return None, ORGANISM_MEMORY
    try:
        from mu_fast.edit.loop import EditConfig
        from mu_fast.memory import plan
        from mu_fast.models.sites import SiteTable

        config = _model_config(run.model)
        if config is None:
            return None, "no config offline"
        mask, how = _stand_in_mask(run, SiteTable(config))
        edit = EditConfig(**{**run.edit, "betas": tuple(run.edit["betas"])})
        return plan(config, mask, edit).total, how
    except Exception as err:  # noqa: BLE001 - an estimate that cannot be made is reported, not fatal
        return None, f"not estimated ({type(err).__name__}: {str(err)[:60]})"


def _organism_cached(ref: str) -> bool:
    """Whether the organism ``organism:<preset>`` is in the cache (else loading it trains it first)."""
    from mu_fast.organism import OrganismConfig, checkpoint_dir

    preset = ref.split(":", 1)[1] if ":" in ref else "demo"
    return (checkpoint_dir(getattr(OrganismConfig, preset)()) / "config.json").is_file()


def dry_run(spec: str | os.PathLike | Mapping[str, Any], vars: Mapping[str, Any] | None = None,
            store: str | os.PathLike | None = None, print_fn: Callable[[str], None] | None = print) -> DryRun:
    """Expand ``spec`` and estimate it (module docstring) without loading any model; print the summary with
    ``print_fn`` (None: silent) and return the ``DryRun``."""
    from mu_fast.sweep.engine import pending_runs, store_path
    from mu_fast.sweep.store import Store

    data = load_spec(spec, vars)
    runs = expand(data)
    st = Store(store_path(data, store))
    pending = pending_runs(runs, st)
    measured: dict[tuple[str, str], list[float]] = defaultdict(list)
    by_model: dict[str, list[float]] = defaultdict(list)
    loads: dict[str, list[float]] = defaultdict(list)
    for record in st.latest().values():
        config, total = record["config"], (record.get("timings") or {}).get("total")
        ref = config["model"].get("ref") if isinstance(config.get("model"), Mapping) else None
        if record.get("status") != "ok" or ref is None or not isinstance(total, (int, float)):
            continue  # only whole ok records measure (a damaged one is left out)
        measured[(ref, config.get("method"))].append(total)
        by_model[ref].append(total)
        session = record.get("session") or {}
        if session.get("runs_before") == 0 and isinstance(session.get("load_seconds"), (int, float)):
            loads[ref].append(session["load_seconds"])
    out = DryRun(runs, pending)
    for r in runs:
        key = (r.model["ref"], r.method)
        if key not in out.seconds:
            if measured.get(key):
                out.seconds[key] = (statistics.mean(measured[key]), "measured")
            elif by_model.get(key[0]):
                out.seconds[key] = (statistics.mean(by_model[key[0]]), "measured")
            else:
                out.seconds[key] = (_guess(r), "guess")
            out.memory[key] = _memory(r)
        if r.model["ref"] not in out.load_seconds:
            if r.model["kind"] == "organism" and not _organism_cached(r.model["ref"]):
                out.train_seconds[r.model["ref"]] = ORGANISM_TRAIN_SECONDS.get(r.model["ref"].split(":")[-1], 100.0)
            guess = ORGANISM_LOAD_SECONDS if r.model["kind"] == "organism" else LARGE_LOAD_SECONDS
            out.load_seconds[r.model["ref"]] = statistics.mean(loads[r.model["ref"]]) if loads.get(r.model["ref"]) else guess
    if print_fn is not None:
        print_fn(out.format())
        held = len(st.latest()) if st.path.is_file() else 0
        print_fn(f"store: {st.path} ({f'{held} runs recorded' if held else 'new'})")
        for r in pending:
            print_fn(f"  {r.run_id}  {r.model['ref']}  {r.task['dataset']}:{r.task['forget_split']}:"
                     f"{r.task['inject_label']}  {r.label()}  seed={r.seed}")
    return out

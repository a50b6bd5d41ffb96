"""Sweep specs: read (YAML file, YAML text or dict), checked before anything loads, expanded to runs with stable ids.

A spec (every key but ``models``, ``tasks`` and ``methods`` is optional)::

    name: ci_organism
    vars: {model: "organism:ci"}     # ${model} in any string; load_spec(..., vars={"model": ...}) overrides
    models: ["${model}"]             # organism[:ci], a checkpoint folder, a hub id, random:<shipped name>,
                                     # or {name: ..., dtype: bf16, tokenizer: <folder>, paper_model: gemma-2-9b}
    tasks:
      - dataset: organism            # organism | sports | counterfact
        forget_splits: [first_16_unsplit]
        inject_labels: [random_without_golf]      # "None": unlearning (log(1-p)); CounterFact: target_false only
        maintain_split: split
        lm_texts: null               # sports / counterfact: a text file or "pile" (the LM retain loss); cf_model:
    methods: [flu, atp, random]      # mu_fast.localize.METHODS (not manual), or paper:<ap|ct|ap_mlps|ct_mlps|flu>
    budget: paper                    # the paper's (FLU layers x MLP size), an int, or a list (an axis)
    edit:
      preset: organism               # mu_fast.sweep.presets
      lr: [1.0e-3, 3.0e-3]           # any EditConfig field; a list is an axis (betas: a list of pairs)
      steps: 10
      groups: {broad: {lr: 3.0e-4}}  # per method group (lookup / tracing / broad): overrides, axes allowed
      methods: {flu: {lr: 2.0e-3}}   # per method: overrides after the group's (e.g. the lr rule's choices)
    seeds: [0, 1]
    evaluations: {formats: all, relearn: {steps: 4, lr: 1.0e-3, lora_rank: 16}, probes: true}
    store: sweeps/ci.jsonl
    kind: single                     # single (default) | sequential (below)
    partitions: 4                    # kind: sequential only
    batch: auto                      # runs trained together (mu_fast.sweep.batches): auto (default), a number, 1 = alone; not hashed

A run's EditConfig: the preset's fields for the method's group, then ``edit``'s fields, then ``edit.groups[group]``,
then ``edit.methods[method]``;
then one point of the grid (the product of every list-valued field, in field order); ``seed`` is the run's seed.

Run id (``RunConfig.run_id``): 16 hex digits of sha256 over the canonical JSON (sorted keys) of ``RUN_FORMAT`` and
the resolved model (reference, kind, dtype, organism hash, tokenizer, paper model), task (dataset, forget split, inject
label, maintain split, LM texts, CounterFact table), method, budget (None for methods that take none), seed, every
EditConfig field and every evaluation setting. Not included: the spec's name, vars, store path, the executor and
anything about the machine (those are provenance). Integer values of float fields are stored as floats, so
``lr: 1`` and ``lr: 1.0`` are one run. Runs that resolve to the same id are run once.

Run kinds (``kind:``). ``single`` (the default): a run is one localize -> edit -> evaluate of one forget set, one
store record. ``sequential``: a run is a *sequence* of partition edits of one method on one model (the paper's
sequential CounterFact runs, authors_repo.md §3.6): the task's forget facts (``first_64_unsplit``: the first 64)
are split into ``partitions`` partitions (4 of 16: 0_16, 16_32, 32_48, 48_64;
``mu_fast.data.counterfact_sequential_tasks``) edited in turn, each with its own mask
(``mu_fast.paper_protocol.paper_sequential_masks``: the paper's selection of that range, or the baseline drawn for
it with seed ``seed + p``), optimizer and schedule (EditConfig seed ``seed + p``), the model not restored between
partitions; after each partition every partition's facts are evaluated, and after the last one the other
evaluations (relearning, probes, registered ones) run once on all facts. Only ``tasks`` of ``dataset:
counterfact`` with forget split ``first_64_unsplit``, ``partitions: 4`` (the ranges whose localizations ship),
``budget: paper`` (each partition its own) and the methods ``SEQUENTIAL_METHODS`` (paper:<selection> and the
baselines random, random_mlps, all_mlps, nonlocalized), on a model with a paper model, are accepted. A sequence
has a run id as any run (its identity adds ``kind`` and ``partitions``), and each of its steps (partition edits)
has its own: the sequence's identity plus ``step`` (0-based), ``RunConfig.step_run(k)``. A sequence writes one
store record per step (``mu_fast.sweep.session.ModelSession.execute_sequence``), so a sequence is finished when
every step is recorded; ``RunConfig.replay`` (not hashed) is how many recorded steps a resumed sequence replays.

Checked when the spec is read, before any model loads: every key, name and number (EditConfig fields: positive
steps, batches and lr, non-negative coefficients, betas in [0, 1); evaluation settings: ``mu_fast.sweep.evaluations``),
the evaluation formats against every task's dataset, and the variables: a ``${var}`` nobody sets is an error, and so
is a variable passed (``--var NAME=VALUE``, ``vars=``) that the spec never uses (a typo). Duplicates are errors
alike in every list (models, tasks, methods, budgets, seeds, a grid axis such as ``lr``, formats), naming the
duplicate: a repeated value would otherwise run the same runs twice or be merged silently.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mu_fast.sweep.evaluations import resolve_evaluations
from mu_fast.sweep.presets import GROUPS, preset_groups
from mu_fast.sweep.checks import check_formats, check_unique, edit_value_in_range
from mu_fast.sweep.refs import (
    as_list,
    check_keys,
    close_hint,
    paper_model_of,
    resolve_model,
    resolve_tasks,
    spec_error,
)

RUN_FORMAT = 1
SPEC_KEYS = ("name", "vars", "models", "tasks", "methods", "budget", "edit", "presets", "seeds", "evaluations", "store",
             "kind", "partitions", "batch")
KINDS = ("single", "sequential")
BUDGET_METHODS = ("atp", "ct", "atp_mlps", "ct_mlps", "random")
PAPER_METHODS = ("ap", "ct", "ap_mlps", "ct_mlps", "flu")
SEQUENTIAL_METHODS = tuple(f"paper:{m}" for m in ("flu", "ap", "ct", "ap_mlps", "ct_mlps")) + (
    "random", "random_mlps", "all_mlps", "nonlocalized")  # mu_fast.paper_protocol.METHODS, without importing it
SEQUENTIAL_PARTITIONS = 4
SEQUENTIAL_FORGET_SPLIT = "first_64_unsplit"
PAPER_GROUP = {"flu": "lookup", "ap_mlps": "lookup", "ct_mlps": "lookup", "ap": "tracing", "ct": "tracing"}
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class RunConfig:
    """One run, fully resolved. ``axes``: the grid values that set it apart (for reports; not hashed). ``kind``,
    ``partitions``: the run kind (module docstring); ``step``: a sequence's step (its records' configs; None for
    the sequence itself); ``replay``: the recorded steps a resumed sequence replays first (not hashed)."""

    model: dict[str, Any]
    task: dict[str, Any]
    method: str
    budget: int | None
    seed: int
    edit: dict[str, Any]
    evaluations: dict[str, Any]
    group: str
    axes: dict[str, Any] = field(default_factory=dict)
    kind: str = "single"
    partitions: int | None = None
    step: int | None = None
    replay: int = 0

    def identity(self) -> dict[str, Any]:
        """What the run id hashes (module docstring); a single run's is what it was before run kinds existed."""
        out = {"format": RUN_FORMAT, "model": self.model, "task": self.task, "method": self.method,
               "budget": self.budget, "seed": self.seed, "edit": self.edit, "evaluations": self.evaluations}
        if self.kind != "single":
            out.update(kind=self.kind, partitions=self.partitions)
        if self.step is not None:
            out["step"] = self.step
        return out

    @property
    def sequential(self) -> bool:
        return self.kind == "sequential"

    @property
    def steps(self) -> int:
        """Store records a finished run has: its partitions for a sequence, else 1."""
        return int(self.partitions) if self.sequential and self.step is None else 1

    # A unit of work as the executors see it (``mu_fast.sweep.batches.RunBatch`` is the other kind): how many records
    # it sends, which run each is of, and whether a failed one ends it (a sequence's later steps need the earlier).
    @property
    def streams(self) -> bool:
        return self.sequential

    ends_on_failure = True

    @property
    def parts(self) -> int:
        return self.steps

    def part(self, index: int) -> RunConfig:
        return self.step_run(index) if self.sequential else self

    def step_run(self, step: int) -> RunConfig:
        """Step ``step`` (0-based) of this sequence: the config (and run id) of that step's record."""
        if not self.sequential or self.step is not None:
            raise ValueError(f"run {self.run_id} is not a sequence; only kind: sequential runs have steps")
        if not 0 <= step < self.steps:
            raise ValueError(f"step {step} of a sequence of {self.steps} steps; steps are 0..{self.steps - 1}")
        return dataclasses.replace(self, step=step, replay=0)

    def sequence(self) -> RunConfig:
        """The sequence a step belongs to (itself for a sequence or a single run)."""
        return dataclasses.replace(self, step=None, replay=0)

    @property
    def run_id(self) -> str:
        payload = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def model_key(self) -> str:
        """Runs with equal keys share one loaded model."""
        return json.dumps(self.model, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields and ``run_id``; a single run's keys are what they were before run kinds existed; a
        step's add ``sequence_id``; ``replay`` only where not 0."""
        data = {"run_id": self.run_id, **dataclasses.asdict(self)}
        if not self.replay:
            del data["replay"]
        if not self.sequential:
            for name in ("kind", "partitions", "step"):
                del data[name]
        elif self.step is not None:
            data["sequence_id"] = self.sequence().run_id
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunConfig:
        return cls(**{f.name: copy.deepcopy(data[f.name]) for f in dataclasses.fields(cls) if f.name in data})

    def label(self) -> str:
        """``method`` plus the grid values, e.g. ``flu lr=0.001`` (a sequence's step: ``step=2``)."""
        step = [] if self.step is None else [f"step={self.step}"]
        return " ".join([self.method, *(f"{k}={v}" for k, v in sorted(self.axes.items())), *step])


# ------------------------------------------------------------------------------------------------ reading
def load_spec(spec: str | os.PathLike | Mapping[str, Any], vars: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec as a dict with ``${var}`` substituted: from a dict, a YAML file path, or YAML text."""
    if isinstance(spec, Mapping):
        data = copy.deepcopy(dict(spec))
    else:
        import yaml

        text = str(spec)
        path = Path(text).expanduser()
        if isinstance(spec, os.PathLike) or (("\n" not in text) and text.endswith((".yaml", ".yml", ".json"))):
            if not path.is_file():
                raise FileNotFoundError(f"spec file {str(path)!r} does not exist; pass a YAML spec path, YAML text or a dict")
            text = path.read_text()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            first = " ".join(str(err).split())
            raise ValueError(f"spec: not valid YAML ({first}); fix the syntax") from None
        if not isinstance(data, dict):
            raise ValueError(f"spec: the top level must be a mapping of keys ({', '.join(SPEC_KEYS)}); got {type(data).__name__}")
    given = dict(vars or {})
    if given:
        used = sorted(spec_variables(data))
        for name in given:
            if name not in used:
                uses = (f"its variables are {', '.join(used)} (--var NAME=VALUE)" if used else
                        f"it has no variables: drop --var {name}")
                raise spec_error("vars", f"--var {name}=... is given but the spec never uses ${{{name}}}"
                                 f"{close_hint(name, used)}; {uses}")
    values = {**dict(data.get("vars") or {}), **given}
    return _substitute(data, values, "")


def spec_variables(value: Any) -> set[str]:
    """The names of every ``${var}`` a spec uses (its ``vars:`` block aside)."""
    if isinstance(value, str):
        return set(_VAR.findall(value))
    if isinstance(value, Mapping):
        return {n for k, v in value.items() if k != "vars" for n in spec_variables(v)}
    if isinstance(value, list):
        return {n for v in value for n in spec_variables(v)}
    return set()


def _substitute(value: Any, values: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, str):
        whole = _VAR.fullmatch(value)
        for name in _VAR.findall(value):
            if name not in values:
                raise spec_error(where or "vars", f"${{{name}}} is not defined; add {name}: under the spec's vars: or "
                                 f"pass --var {name}=VALUE (Python: vars={{'{name}': ...}})")
        if whole:
            return values[whole.group(1)]
        return _VAR.sub(lambda m: str(values[m.group(1)]), value)
    if isinstance(value, Mapping):
        return {k: (v if k == "vars" else _substitute(v, values, f"{where}.{k}".lstrip("."))) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, values, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


# ------------------------------------------------------------------------------------------------ edit grid
def _edit_fields() -> dict[str, Any]:
    import typing

    from mu_fast.edit.loop import EditConfig

    hints = typing.get_type_hints(EditConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(EditConfig)}


def _coerce(name: str, value: Any, kind: Any, where: str) -> Any:
    """``value`` as the EditConfig field ``name`` wants it (YAML reads 1e-3 as a string)."""
    text = str(kind)
    if name == "betas":
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise spec_error(where, f"betas is a pair [beta1, beta2]; got {value!r}")
        try:
            betas = [float(v) for v in value]
        except (TypeError, ValueError):
            raise spec_error(where, f"betas is a pair of numbers; got {value!r}") from None
        if not all(0.0 <= b < 1.0 for b in betas):
            raise spec_error(where, f"betas must each be in [0, 1), e.g. [0.9, 0.999]; got {value!r}")
        return betas
    if value is None:
        if "None" not in text:
            raise spec_error(where, f"{name} cannot be null")
        return None
    if kind is bool or text.startswith("bool"):
        if not isinstance(value, bool):
            raise spec_error(where, f"{name} must be true or false; got {value!r}")
        return value
    if kind is float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise spec_error(where, f"{name} must be a number; got {value!r}") from None
        return edit_value_in_range(name, number, where)
    if kind is int or text.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise spec_error(where, f"{name} must be an integer; got {value!r}")
        return edit_value_in_range(name, value, where)
    if kind is str and not isinstance(value, str):
        raise spec_error(where, f"{name} must be a string; got {value!r}")
    return value


def _axes(settings: Mapping[str, Any], fields: Mapping[str, Any], where: str) -> dict[str, list[Any]]:
    """Each field's values (one for a scalar, several for a list: an axis), coerced."""
    out = {}
    for name, value in settings.items():
        if name == "seed":
            raise spec_error(f"{where}.seed", "a run's seed comes from seeds:; remove seed from edit")
        if name not in fields:
            raise spec_error(f"{where}", f"unknown EditConfig field {name!r}{close_hint(name, fields)}; fields: {', '.join(fields)}")
        is_axis = isinstance(value, list) and (name != "betas" or (value and isinstance(value[0], (list, tuple))))
        values = value if is_axis else [value]
        if not values:
            raise spec_error(f"{where}.{name}", "an empty list gives an empty grid; give at least one value")
        out[name] = [_coerce(name, v, fields[name], f"{where}.{name}") for v in values]
        check_unique(f"{where}.{name}", out[name])
    return out


def edit_grid(edit: Mapping[str, Any], group: str, presets: Mapping[str, Any] | None,
              method: str | None = None) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``[(EditConfig fields, axis values)]`` of one method group: preset, then edit's fields, then the group's, then
    (with ``method``) the method's own (``edit.methods``)."""
    fields = _edit_fields()
    edit = dict(edit or {})
    groups = dict(edit.pop("groups", None) or {})
    per_method = dict(edit.pop("methods", None) or {})
    for g in groups:
        if g not in GROUPS:
            raise spec_error("edit.groups", f"unknown method group {g!r}; groups are {', '.join(GROUPS)}")
        _axes(dict(groups[g] or {}), fields, f"edit.groups.{g}")  # checked even where no method of the group runs
    base = preset_groups(str(edit.pop("preset", "default")), presets)[group]
    axes = {k: [_coerce(k, v, fields[k], f"edit.preset.{k}")] for k, v in base.items() if k in fields and k != "seed"}
    axes.update(_axes(edit, fields, "edit"))
    axes.update(_axes(dict(groups.get(group) or {}), fields, f"edit.groups.{group}"))
    if method is not None:
        axes.update(_axes(dict(per_method.get(method) or {}), fields, f"edit.methods.{method}"))
    names = sorted(axes)
    varying = [n for n in names if len(axes[n]) > 1]
    out = []
    for point in itertools.product(*(axes[n] for n in names)):
        settings = dict(zip(names, point))
        out.append((settings, {n: settings[n] for n in varying}))
    return out


def resolved_edit(settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Every EditConfig field (defaults filled in, checked by EditConfig itself) as JSON-ready values."""
    from mu_fast.edit.loop import EditConfig

    try:
        config = EditConfig(**{**settings, "seed": seed})
    except (TypeError, ValueError) as err:
        raise spec_error("edit", f"{err}") from None
    data = dataclasses.asdict(config)
    data["betas"] = list(data["betas"])
    return data


# ------------------------------------------------------------------------------------------------ expansion
def method_group(method: str) -> str:
    from mu_fast.sweep.presets import METHOD_GROUP

    if method.startswith("paper:"):
        return PAPER_GROUP[method.split(":", 1)[1]]
    return METHOD_GROUP.get(method, "lookup")


def _check_methods(methods: Any, models: list[dict[str, Any]], tasks: list[dict[str, Any]]) -> list[str]:
    from mu_fast.localize import METHODS

    if not isinstance(methods, list) or not methods:
        raise spec_error("methods", "give a non-empty list of localization methods, e.g. [flu, atp, ct]")
    usable = [m for m in METHODS if m != "manual"]
    for m in methods:
        if isinstance(m, str) and m.startswith("paper:"):
            kind = m.split(":", 1)[1]
            if kind not in PAPER_METHODS:
                raise spec_error("methods", f"{m!r}: the paper's selections are paper:{', paper:'.join(PAPER_METHODS)}")
            missing = [x["ref"] for x in models if paper_model_of(x) is None]
            if missing:
                raise spec_error("methods", f"{m} needs a paper model (gemma-7b, gemma-2-9b, llama-3-8b); {missing[0]} is "
                            "none: add paper_model: to its models entry")
            if any(t["dataset"] == "organism" for t in tasks):
                raise spec_error("methods", f"{m} is the paper's selection for its own models, not for the organism")
        elif m not in usable:
            raise spec_error("methods", f"unknown method {m!r}{close_hint(m, usable)}; use {', '.join(usable)} or paper:<method>")
    check_unique("methods", methods)
    return list(methods)


def _check_budgets(value: Any) -> list[int | None]:
    out = []
    for b in as_list(value):
        if b in (None, "paper"):
            out.append(None)
        elif isinstance(b, int) and not isinstance(b, bool) and b > 0:
            out.append(b)
        else:
            raise spec_error("budget", f"{b!r}: use paper (FLU layers x MLP size), a positive parameter count, or a list")
    check_unique("budget", out, lambda b: "paper" if b is None else repr(b))
    return out


def validate(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a loaded spec (``load_spec``) and return its resolved parts; ``ValueError`` naming the key and the fix."""
    check_keys("top level", spec, SPEC_KEYS)
    models_in = spec.get("models")
    if not isinstance(models_in, list) or not models_in:
        raise spec_error("models", "give a non-empty list of models, e.g. [organism:ci]")
    models = [resolve_model(m, f"models[{i}]") for i, m in enumerate(models_in)]
    check_unique("models", models, lambda m: f"model {m['ref']!r}")
    tasks_in = spec.get("tasks")
    if not isinstance(tasks_in, list) or not tasks_in:
        raise spec_error("tasks", "give a non-empty list of tasks, e.g. [{dataset: organism, forget_splits: [first_16_unsplit]}]")
    tasks = [t for i, entry in enumerate(tasks_in) for t in resolve_tasks(entry, f"tasks[{i}]", models)]
    check_unique("tasks", tasks, lambda t: f"task {t['dataset']}:{t['forget_split']}:{t['inject_label']}")
    methods = _check_methods(spec.get("methods"), models, tasks)
    budgets = _check_budgets(spec.get("budget", "paper"))
    seeds = as_list(spec.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise spec_error("seeds", f"give a non-empty list of non-negative integers; got {spec.get('seeds')!r}")
    check_unique("seeds", seeds)
    edit = spec.get("edit") or {}
    if not isinstance(edit, Mapping):
        raise spec_error("edit", f"a mapping of EditConfig fields, preset: and groups:; got {edit!r}")
    presets = spec.get("presets") or {}
    if not isinstance(presets, Mapping) or not all(isinstance(v, Mapping) for v in presets.values()):
        raise spec_error("presets", "a mapping {name: {group: {field: value}}}")
    per_method = edit.get("methods") or {}
    if not isinstance(per_method, Mapping) or not all(isinstance(v, Mapping) for v in per_method.values()):
        raise spec_error("edit.methods", f"a mapping {{method: {{field: value}}}}; got {per_method!r}")
    unknown = sorted(set(per_method) - set(methods))
    if unknown:
        raise spec_error("edit.methods", f"settings for {unknown[0]!r}, which is not among methods {methods}; add it "
                         "to methods: or drop its entry")
    grids = {m: edit_grid(edit, method_group(m), presets, m) for m in methods}
    evaluations = resolve_evaluations(spec.get("evaluations"))
    check_formats(evaluations["formats"], tasks)
    for task in tasks:
        lm = any(settings.get("lm_coef", 1.0) for g in grids.values() for settings, _ in g)
        if lm and task["dataset"] not in ("organism", "memory") and "lm_texts" not in task:
            raise spec_error("tasks", f"{task['dataset']} has no LM texts for the LM retain loss (lm_coef > 0); add "
                        "lm_texts: <text file or pile> to the task, or set edit: {lm_coef: 0}")
    store = spec.get("store")
    if store is not None and not isinstance(store, str):
        raise spec_error("store", f"a file path for the results (JSON lines); got {store!r}")
    kind, partitions = _check_kind(spec, models, tasks, methods, budgets)
    batch = spec.get("batch", "auto")
    if batch != "auto" and (not isinstance(batch, int) or isinstance(batch, bool) or batch < 1):
        raise spec_error("batch", f"runs trained together (mu_fast.sweep.batches): a positive integer or auto; got "
                         f"{batch!r}")
    return {"name": str(spec.get("name", "sweep")), "models": models, "tasks": tasks, "methods": methods,
            "budgets": budgets, "seeds": seeds, "grids": grids, "evaluations": evaluations, "store": store,
            "kind": kind, "partitions": partitions, "batch": batch}


def _check_kind(spec: Mapping[str, Any], models: list[dict[str, Any]], tasks: list[dict[str, Any]],
                methods: list[str], budgets: list[int | None]) -> tuple[str, int | None]:
    """``(kind, partitions)`` of a spec (module docstring: run kinds); what a sequential spec cannot run is refused."""
    kind = spec.get("kind", "single")
    if kind not in KINDS:
        raise spec_error("kind", f"{kind!r}{close_hint(kind, KINDS)}; use single (one edit per run) or sequential "
                         "(partitions edited in turn)")
    if kind == "single":
        if spec.get("partitions") is not None:
            raise spec_error("partitions", "partitions: is for kind: sequential; add kind: sequential or drop it")
        return kind, None
    partitions = spec.get("partitions", SEQUENTIAL_PARTITIONS)
    if partitions != SEQUENTIAL_PARTITIONS or isinstance(partitions, bool):
        raise spec_error("partitions", f"{partitions!r}: a sequence edits the paper's {SEQUENTIAL_PARTITIONS} "
                         "partitions (0_16, 16_32, 32_48, 48_64), the ranges whose localizations ship; set "
                         f"partitions: {SEQUENTIAL_PARTITIONS}")
    for task in tasks:
        if task["dataset"] != "counterfact" or task["forget_split"] != SEQUENTIAL_FORGET_SPLIT:
            raise spec_error("tasks", f"kind: sequential edits CounterFact's first 64 facts in partitions; got "
                             f"{task['dataset']}:{task['forget_split']}: use dataset: counterfact, forget_splits: "
                             f"[{SEQUENTIAL_FORGET_SPLIT}]")
    for method in methods:
        if method not in SEQUENTIAL_METHODS:
            raise spec_error("methods", f"{method!r} has no per-partition localization; kind: sequential runs "
                             f"{', '.join(SEQUENTIAL_METHODS)}")
    if budgets != [None]:
        raise spec_error("budget", "kind: sequential takes each partition's own paper budget; drop budget: or set "
                         "budget: paper")
    missing = [m["ref"] for m in models if paper_model_of(m) is None]
    if missing:
        raise spec_error("models", f"kind: sequential needs a paper model (gemma-7b, gemma-2-9b, llama-3-8b) for the "
                         f"partitions' localizations; {missing[0]} is none: add paper_model: to its models entry")
    return kind, partitions


def expand(spec: str | os.PathLike | Mapping[str, Any], vars: Mapping[str, Any] | None = None) -> list[RunConfig]:
    """Every run of ``spec`` in a fixed order (model, task, method, budget, grid point, seed), each once (a
    sequential spec's runs are sequences: ``RunConfig.step_run`` gives their steps)."""
    parts = validate(load_spec(spec, vars))
    runs: dict[str, RunConfig] = {}
    for model in parts["models"]:
        for task in parts["tasks"]:
            for method in parts["methods"]:
                group = method_group(method)
                budgets = parts["budgets"] if method in BUDGET_METHODS else [None]
                for budget in budgets:
                    for settings, axes in parts["grids"][method]:
                        for seed in parts["seeds"]:
                            labels = dict(axes, **({"budget": budget} if len(budgets) > 1 else {}))
                            run = RunConfig(model, task, method, budget, seed, resolved_edit(settings, seed),
                                            parts["evaluations"], group, labels, kind=parts["kind"],
                                            partitions=parts["partitions"])
                            runs.setdefault(run.run_id, run)
    return list(runs.values())

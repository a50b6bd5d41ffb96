"""The end-to-end job: localize → edit → evaluate, for several localization methods, with a report.

``edit_and_evaluate`` is the work of one run after its localization: edit the model in place under the mask, then
the evaluations (formats, relearning attack, latent probes, registered ones) and the summary numbers. It is the one
per-run body of both ``compare_localizations`` (the demo and ``mu-fast run``: each method edits a deep copy) and the
sweep engine (``mu_fast.sweep.session``: the model is restored from a masked snapshot after each run).

``compare_localizations`` runs every method on a fresh copy of the model (so each method starts from the same
weights), writes one JSON per method as soon as it finishes (atomically; a rerun with ``resume=True`` skips
methods whose result exists for the same model, settings and package versions), then the summary table and the
plots. Before any method runs it checks that the model knows the facts (``mu_fast.evaluate.known_facts``).
results.json carries the provenance block (``mu_fast.provenance``: versions, threads, CPU kernels, model identity)
and a legend.

Named presets: the per-group edit settings are ``mu_fast.sweep.presets`` (``organism``: the lr rule's choices,
``mu_fast.organism.lr_choice``), the evaluation options ``RUN_PRESETS`` (``mu-fast run --preset``,
``mu_fast.cli.options.run_settings``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mu_fast.aggregate import (  # noqa: F401 (same_selection_notes: part of this module's interface)
    DEMO_COLUMNS,
    RunsBar,
    Stages as _Stages,
    aggregate_runs,
    paired_comparison,
    paired_lines,
    paired_verdicts,
    run_file,
    same_selection_notes,
    selection_lines,
)
from mu_fast.edit.loop import EditConfig, edit
from mu_fast.provenance import model_identity, numerics, provenance_block
from mu_fast.report import (
    legend,
    plot_localization_map,
    plot_probe_accuracy,
    plot_robustness,
    print_table,
    write_json,
)

# The paper tunes lr / forget coefficient per group of methods (authors_repo.md §3.4): fact-lookup-sized MLP
# selections, output-tracing and random selections, and the broad selections. Values below are for the organism.
METHOD_GROUP = {
    "flu": "lookup", "flu_attn": "lookup", "random_mlps": "lookup", "atp_mlps": "lookup", "ct_mlps": "lookup",
    "atp": "tracing", "ct": "tracing", "random": "tracing",
    "all_mlps": "broad", "nonlocalized": "broad", "manual": "lookup",
}
DEMO_METHODS = ("flu", "flu_attn", "atp", "ct", "random", "random_mlps", "all_mlps", "nonlocalized")
# The organism's edit settings are no longer hand-tuned per group: every method's lr comes from one rule applied to
# a sweep on a validation forget set (mu_fast.organism.lr_choice; the per-group ``organism`` preset reads it).


@dataclass
class RunOptions:
    """What to evaluate after each edit, and at what cost. relearn_settings / probe_settings: further keywords of
    ``relearn_attack`` (lora_alpha, batch_size, ...) / ``latent_probes`` (steps, position, ...); formats: None = all."""

    relearn: bool = True
    relearn_steps: int = 20
    relearn_lr: float = 2e-4
    relearn_rank: int = 512
    probes: bool = True
    eval_batch_size: int = 64
    seed: int = 0
    relearn_settings: dict[str, Any] = field(default_factory=dict)
    probe_settings: dict[str, Any] = field(default_factory=dict)
    formats: list[str] | None = None

    def evaluations(self) -> dict[str, Any]:
        """The resolved evaluation settings ``edit_and_evaluate`` takes (the sweep spec's ``evaluations:`` form)."""
        from mu_fast.sweep.evaluations import resolve_evaluations

        relearn = {**self.relearn_settings, "steps": self.relearn_steps, "lr": self.relearn_lr,
                   "lora_rank": self.relearn_rank}
        return resolve_evaluations({"formats": self.formats or "all", "batch_size": self.eval_batch_size,
                                    "relearn": relearn if self.relearn else False,
                                    "probes": dict(self.probe_settings) if self.probes else False})


# The organism's relearning attack: at the paper's lr 2e-4 (tuned for 7-9B models) 20 LoRA steps moved held-out
# forget accuracy by at most 0.05 for every method on the demo organism, so the attack told them apart only at a
# higher lr (1e-3: flu 0.17 -> 0.64, nonlocalized 0.02 -> 0.40). d_model is 64, so rank 16 is already a quarter
# of full rank (64 gave the same accuracies within 0.02).
ORGANISM_RUN_OPTIONS = RunOptions(relearn_lr=1e-3, relearn_rank=16)
# Evaluation options of the named presets; the edit settings of every preset are in mu_fast.sweep.presets. The
# paper's presets evaluate with the paper's relearning protocol (RunOptions' defaults).
RUN_PRESETS = {"default": RunOptions(), "organism": ORGANISM_RUN_OPTIONS}


def summarize(loc_summary: Mapping[str, Any], evals: Mapping[str, Any], relearn: Mapping[str, Any] | None,
              probes: Mapping[str, Any] | None, seconds: float) -> dict[str, Any]:
    """The headline numbers of one method, named as in the report table."""

    def get(fmt: str, split: str, key: str) -> float | None:
        value = evals.get(fmt, {}).get(split, {}).get(key)
        return None if value is None else float(value)

    out: dict[str, Any] = {"trainable_params": loc_summary["trainable_params"], "seconds": seconds}
    forget_acc = get("normal", "forget", "acc")
    out["forget_err"] = None if forget_acc is None else 1.0 - forget_acc
    out["edit_acc"] = get("normal", "forget", "edit_acc")
    out["maintain_acc"] = get("normal", "maintain", "acc")
    out["qa_edit_acc"] = get("qa", "forget", "edit_acc")
    mcq = get("mcq", "forget", "acc")
    out["mcq_forget_err"] = None if mcq is None else 1.0 - mcq
    out["mcq_edit_acc"] = get("mcq", "forget", "edit_acc")
    out["paraphrase_edit_acc"] = get("paraphrase", "forget", "edit_acc")
    out["neighborhood_edit_err"] = get("neighborhood", "forget", "edit_error")
    # A second attribute of the same (edited) subjects, where the task has one (the organism's home city):
    # collateral damage the sport metrics cannot see.
    out["other_attr_acc"] = get("city", "forget", "acc")
    if relearn:
        out["relearn_acc"] = float(relearn["final"]["normal"]["acc"])
        if "mcq" in relearn["final"]:
            out["relearn_mcq_acc"] = float(relearn["final"]["mcq"]["acc"])
    if probes and probes.get("forget_acc_true"):
        # Is the true attribute still linearly decodable anywhere past the embeddings?
        out["probe_true_acc"] = float(max(probes["forget_acc_true"][1:]))
    return {k: v for k, v in out.items() if v is not None}


def settings_hash(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_finite(what: str, values: Mapping[str, Any], step: Any = None) -> None:
    """``FloatingPointError`` when a number in ``values`` is NaN or infinite (a diverged edit)."""
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            where = f" at step {step}" if step is not None else ""
            raise FloatingPointError(f"{what} {key} is {value}{where}; the edit diverged: lower lr or forget_coef")


def edit_and_evaluate(
    model: Any,
    tokenizer: Any,
    task: Any,
    loc: Any,
    config: EditConfig,
    evaluations: Mapping[str, Any],
    seed: int = 0,
    progress: bool = False,
    stages: _Stages | None = None,
    timings: dict[str, float] | None = None,
    started: float | None = None,
) -> dict[str, Any]:
    """One run after its localization ``loc``: edit ``model`` in place under ``loc.mask``, then evaluate it.

    evaluations: resolved settings (``RunOptions.evaluations()`` or a sweep run's ``evaluations``): ``formats``
    (None: all), ``batch_size``, ``relearn`` / ``probes`` (None, or the keywords of ``relearn_attack`` /
    ``latent_probes``; relearning is scored at steps 0, steps // 2 and steps) and ``extra`` (registered evaluations,
    ``mu_fast.sweep.evaluations``). stages: a progress bar advanced after each stage; timings: filled with seconds
    per stage; started: when the run began (``time.perf_counter()``; default now), for ``summary["seconds"]``.
    Returns ``{"edit", "evals", "relearn", "latent_probes", <extra names>..., "summary"}``. The caller undoes the
    edit (a deep copy, or ``mu_fast.sweep.snapshot``). ``FloatingPointError`` when the edit diverges.
    """
    from mu_fast.evaluate import evaluate_task, latent_probes, relearn_attack

    timings = {} if timings is None else timings
    started = time.perf_counter() if started is None else started
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = now - t
        t = now
        if stages is not None:
            stages.next()

    edited = edit(model, tokenizer, task, loc.mask, config, progress=progress)
    for row in edited.history:
        check_finite("edit", row, row.get("step"))
    lap("edit")
    out: dict[str, Any] = {
        "edit": {"optimizer": edited.optimizer, "seconds": edited.seconds, "config": edited.config,
                 "history": edited.history, "trainable_elements": edited.trainable_elements},
        "evals": evaluate_task(model, tokenizer, task, formats=evaluations["formats"],
                               batch_size=evaluations["batch_size"]),
    }
    lap("evaluate")
    relearn = None
    if evaluations.get("relearn") is not None:
        settings = dict(evaluations["relearn"])
        steps = settings["steps"]
        relearn = relearn_attack(model, tokenizer, task, seed=seed, eval_batch_size=evaluations["batch_size"],
                                 progress=progress, eval_at=tuple(sorted({0, steps // 2, steps})), **settings)
        lap("relearn")
    probes = None
    if evaluations.get("probes") is not None and task.classes:
        probes = latent_probes(model, tokenizer, task, batch_size=evaluations["batch_size"], **evaluations["probes"])
        lap("probes")
    out["relearn"], out["latent_probes"] = relearn, probes
    if evaluations.get("extra"):
        from mu_fast.sweep.evaluations import REGISTRY

        for name, settings in evaluations["extra"].items():
            out[name] = REGISTRY[name].fn(model, tokenizer, task, settings, seed)
            lap(name)
    out["summary"] = summarize(loc.summary(), out["evals"], relearn, probes, time.perf_counter() - started)
    check_finite("metric", out["summary"])
    return out


def compare_localizations(
    model: Any,
    tokenizer: Any,
    task: Any,
    methods: Sequence[str] = DEMO_METHODS,
    edit_configs: Mapping[str, EditConfig] | None = None,
    options: RunOptions | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = True,
    title: str | None = None,
    allow_unknown_facts: bool = False,
    provenance: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    task_info: Mapping[str, Any] | None = None,
    show_table: bool | None = None,
    seeds: Sequence[int] | None = None,
    extra: Mapping[str, Any] | None = None,
    workers: int = 1,
    threads: int = 1,
) -> dict[str, Any]:
    """Localize, edit and evaluate ``task`` once per method and seed; return ``{"methods": {m: aggregate},
    "summary": {m: means}, "summary_std": {m: stds}, ...}``.

    seeds: every seeded step draws anew per seed (FLU's probes, AtP/CT's corruption noise, random selections, the
    edit's batch order, the relearning attack, the latent probes); default ``(options.seed,)``. Each method's
    aggregate (``mu_fast.aggregate.aggregate_runs``) holds the mean and sample std of every summary number over the
    seeds, the components each seed selected and every seed's full record under ``runs``. One JSON per method and
    seed is written as soon as it finishes (``<method>.json`` for one seed, ``<method>.seed<S>.json`` otherwise).
    extra: further fields of results.json (e.g. the demo's learning-rate choice). workers > 1: the runs go to that
    many worker processes (``mu_fast.pipeline_workers``; one torch thread each): each run is seeded and starts from
    the same weights, so the numbers do not depend on which worker ran it. threads: torch threads per worker process.

    edit_configs: per method (default: ``EditConfig()`` for all). The model is never modified: each method
    edits a deep copy (``edit_and_evaluate``). Raises ``UnknownFactsError`` before any method when the model does
    not know the facts (prompts with unknown tokens, training-format accuracy near chance) unless
    ``allow_unknown_facts`` (then it warns). provenance: extra fields of results.json's provenance block (e.g.
    ``{"organism": {...}}``); identity: the model identity (``mu_fast.provenance.model_identity``; default: from the
    model's config); task_info: ``{"dataset", "forget_split", "inject_label"}`` for reports. show_table: print the
    table (default: ``progress``).
    """
    from mu_fast.evaluate import evaluate_task
    from mu_fast.evaluate.known_facts import check_known_facts
    from mu_fast.localize.flu import flu_localize
    from mu_fast.models.sites import SiteTable

    options = options or RunOptions()
    evaluations = options.evaluations()
    seeds = [int(s) for s in (seeds if seeds is not None else (options.seed,))]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one; got {seeds}")
    edit_configs = dict(edit_configs or {})
    out = Path(out_dir) if out_dir else None
    table = SiteTable(model)
    start = time.perf_counter()
    if identity is None:
        identity = model_identity(str(getattr(model.config, "_name_or_path", "") or table.arch), model=model)
    device = model.get_input_embeddings().weight.device
    block = provenance_block(model=identity, device=device, **dict(provenance or {}))
    stages = _Stages(progress)
    stages.start("before", ("evaluate", "check facts", "FLU probes"))
    baseline = evaluate_task(model, tokenizer, task, batch_size=options.eval_batch_size)
    stages.next()
    known = check_known_facts(model, tokenizer, task, baseline=baseline)
    known.require(allow=allow_unknown_facts)
    stages.next()
    flus = {seeds[0]: flu_localize(model, tokenizer, task, seed=seeds[0])}
    stages.close()
    flu = flus[seeds[0]]
    results: dict[str, Any] = {"task": task.name, "task_info": dict(task_info or {}), "model": table.arch,
                               "flu": {**flu.to_dict(), "enrichment": flu.enrichment_shares()}, "before": baseline, "known_facts": known.to_dict(),
                               "seed": seeds[0], "seeds": seeds, "provenance": block, "legend": legend(),
                               "methods": {}, **dict(extra or {})}
    # The model, versions and kernels are part of the settings: a result computed under others is recomputed.
    model_key = {k: identity.get(k) for k in ("ref", "config_hash", "organism_hash", "path", "revision", "dtype")}
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in methods}
    bar = RunsBar(progress, len(methods) * len(seeds))
    todo = []
    for seed in seeds:
        if seed not in flus:  # the FLU probes are seeded too: FLU's layers (and random-MLPs' count) per seed
            flus[seed] = flu_localize(model, tokenizer, task, seed=seed)
        seed_options = replace(options, seed=seed)
        for method in methods:
            base = edit_configs.get(method, EditConfig())
            config = replace(base, seed=base.seed + seed)  # batch order: one more thing each seed draws anew
            key = settings_hash(task.name, method, asdict(config), asdict(seed_options), flus[seed].layers,
                                numerics(block), model_key)
            path = out / run_file(method, seed, len(seeds)) if out else None
            if resume and path is not None and path.exists():
                saved = json.loads(path.read_text())
                if saved.get("settings_hash") == key:
                    runs[method][seed] = saved
                    bar.done(method, seed)
                    continue
            todo.append((method, seed, config, key, path))

    def finish(method: str, seed: int, key: str, path: Path | None, run: dict[str, Any]) -> None:
        record = {"settings_hash": key, "seed": seed, "flu_layers": flus[seed].layers, **run,
                  "provenance": provenance_block(model=identity, device=device, **dict(provenance or {}))}
        runs[method][seed] = record
        if path is not None:
            write_json(path, record)
        bar.done(method, seed)

    if workers > 1 and len(todo) > 1:
        from mu_fast.pipeline_workers import run_in_workers

        jobs = [(method, seed, config, flus[seed], evaluations) for method, seed, config, _, _ in todo]
        for index, run in run_in_workers(model, tokenizer, task, jobs, workers, threads=threads,
                                         run=localize_edit_evaluate):
            method, seed, _, key, path = todo[index]
            finish(method, seed, key, path, run)
    else:
        for method, seed, config, key, path in todo:
            run = localize_edit_evaluate(model, tokenizer, task, table, method, seed, flus[seed], config,
                                         evaluations, progress, stages)
            finish(method, seed, key, path, run)
    bar.close()
    results["flu_by_seed"] = {str(s): f.layers for s, f in flus.items()}
    results["methods"] = {m: aggregate_runs(runs[m], table.n_layers) for m in methods}
    results["seconds"] = time.perf_counter() - start
    summaries = {m: r["summary"] for m, r in results["methods"].items()}
    stds = {m: r["std"] for m, r in results["methods"].items()}
    results["summary"], results["summary_std"] = summaries, stds
    results["notes"] = same_selection_notes({m: r["runs"][str(seeds[0])] for m, r in results["methods"].items()})
    reference = "flu" if "flu" in methods else methods[0]
    if len(seeds) > 1 and len(methods) > 1:  # same seeds = same data order, relearning draws, probe inits
        results["paired"] = paired_comparison(runs, reference)
    if out is not None:
        write_json(out / "results.json", results)
        plot_probe_accuracy(
            {"before layer": flu.acc_pre.tolist(), "after attention": flu.acc_mid.tolist(), "after MLP": flu.acc_post.tolist()},
            out / "probe_accuracy.png", chance=flu.chance, selected=flu.layers,
        )
        plot_localization_map({m: r["layer_fractions"] for m, r in results["methods"].items()}, table.n_layers,
                              out / "localization_map.png", n_seeds=len(seeds), enrichment=flu.enrichment_shares())
        plot_robustness(summaries, out / "robustness.png", stds=stds, before=before_summary(baseline))
    if progress if show_table is None else show_table:
        before_row = {BEFORE_ROW: before_summary(baseline)}
        columns = DEMO_COLUMNS if len(seeds) > 1 else None
        heading = title or f"{task.name}: localized editing compared"
        if len(seeds) > 1:
            heading += f" · mean±std over {len(seeds)} seeds"
        print_table({**before_row, **summaries}, heading, stds=stds, columns=columns)
        for line in selection_lines(results["methods"], len(seeds)):
            print(line)
        for note in results["notes"]:
            print(f"note: {note}")
        if results.get("paired"):
            for line in paired_lines(results["paired"]) + paired_verdicts(results["paired"]):
                print(line)
    return results


def localize_edit_evaluate(model: Any, tokenizer: Any, task: Any, table: Any, method: str, seed: int, flu: Any,
                           config: EditConfig, evaluations: Mapping[str, Any], progress: bool = False,
                           stages: _Stages | None = None) -> dict[str, Any]:
    """One method at one seed on a deep copy of ``model``: its localization, ``edit_and_evaluate`` and the
    record's fields (``localization``, ``layer_fractions``, the run's results, ``timings``, ``summary``)."""
    from mu_fast.localize import localize

    stages = stages or _Stages(False)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    stages.start(f"{method} seed {seed}", ("localize", "edit", "evaluate",
                                           *(("relearn",) if evaluations.get("relearn") is not None else ()),
                                           *(("probes",) if evaluations.get("probes") is not None and task.classes else ())))
    loc = localize(method, model, tokenizer, task, flu=flu, seed=seed)
    timings["localize"] = time.perf_counter() - t0
    stages.next()
    edited = copy.deepcopy(model)
    run = edit_and_evaluate(edited, tokenizer, task, loc, config, evaluations, seed=seed, progress=progress,
                            stages=stages, timings=timings, started=t0)
    stages.close()
    del edited
    summary = run.pop("summary")
    return {"localization": loc.summary(), "layer_fractions": loc.layer_fractions(table), **run,
            "localize_seconds": timings["localize"], "timings": timings, "summary": summary}


def before_summary(evals: Mapping[str, Any]) -> dict[str, Any]:
    """The unedited model's row: ``summarize`` of its evaluation, without the per-run fields (params, seconds)."""
    before = summarize({"trainable_params": 0}, evals, None, None, 0.0)
    before.pop("seconds")  # nothing ran: a dash, not "0.0"
    return before


BEFORE_ROW = "(before edit)"

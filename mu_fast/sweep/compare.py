"""Localization methods compared on one model and task, over seeds: the demo's and ``mu-fast run``'s job as a sweep.

``compare(model, tokenizer, task, methods, configs, options, out_dir, seeds)`` checks that the model knows the facts,
then writes a sweep spec (one run per method and seed: the method's EditConfig, the options' evaluations) and runs it
with the sweep engine (``mu_fast.sweep.engine.run``) into ``out_dir/runs.jsonl``. The model and task are the caller's
(``mu_fast.sweep.provided``: named in the spec by their reference and the weights' digest, so a rerun finds its runs
in the store and other weights never do); executors are the engine's (``local``, ``processes``, ``ray``), so a killed
comparison resumes where it stopped and recomputes nothing that finished, and runs on Ray like any sweep.

``comparison(records)`` folds a store's records into the report: per method the mean ± std of every summary number
over the seeds (``mu_fast.aggregate.aggregate_runs``), the spread of what each seed selected, every method against
FLU on the same seeds (paired t intervals, Holm), notes on methods that selected the same components. ``print_report``
prints it in the demo's layout and ``write_report`` writes results.json and the plots; ``mu-fast report`` on a
comparison's store prints the same table.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STORE_NAME = "runs.jsonl"


# ------------------------------------------------------------------------------------------------ the spec
def edit_settings(config: Any) -> dict[str, Any]:
    """An EditConfig as a spec's ``edit.methods.<m>`` entry (every field but the seed, which the run's seed sets)."""
    data = dataclasses.asdict(config)
    data.pop("seed")
    data["betas"] = list(data["betas"])
    return data


def comparison_spec(model_entry: Mapping[str, Any], task_entry: Mapping[str, Any], methods: Sequence[str],
                    configs: Mapping[str, Any], evaluations: Mapping[str, Any], seeds: Sequence[int],
                    store: str | os.PathLike, name: str = "compare") -> dict[str, Any]:
    """The sweep spec of a comparison: ``configs`` ``{method: EditConfig}`` (seed 0: the run's seed is the edit's),
    ``evaluations`` a spec's ``evaluations:`` (``RunOptions.spec_evaluations``)."""
    for method in methods:
        if configs[method].seed != 0:
            raise ValueError(f"{method}'s EditConfig has seed={configs[method].seed}; a comparison sets each run's "
                             "seed from seeds=, so leave EditConfig.seed at 0")
    return {"name": name, "models": [dict(model_entry)], "tasks": [dict(task_entry)], "methods": list(methods),
            "budget": "paper", "edit": {"preset": "default", "methods": {m: edit_settings(configs[m]) for m in methods}},
            "seeds": [int(s) for s in seeds], "evaluations": dict(evaluations), "store": str(store)}


def model_entry_of(model: Any, name: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """The spec's ``models:`` entry for a model in memory: ``name`` (a reference it was loaded from: organism, a
    folder, a hub id) or ``memory:<architecture>``, with the digest of its weights as they are now."""
    from mu_fast.sweep.provided import weights_digest

    if dtype is None:
        dtype = {"torch.float64": "fp64", "torch.float32": "fp32", "torch.bfloat16": "bf16",
                 "torch.float16": "fp16"}.get(str(next(model.parameters()).dtype), "fp32")
    if name is None:
        name = "memory:" + str(getattr(model.config, "model_type", type(model).__name__))
    return {"name": name, "dtype": dtype, "digest": weights_digest(model)}


def task_entry_of(task: Any, ref: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The spec's ``tasks:`` entry: ``ref`` (dataset, forget split, inject label, ...) where the task was built from
    one, else the task itself by name and digest (``dataset: memory``)."""
    if ref is not None:
        return dict(ref)
    from mu_fast.sweep.provided import task_digest

    return {"dataset": "memory", "name": task.name, "digest": task_digest(task)}


# ------------------------------------------------------------------------------------------------ running
def compare(
    model: Any,
    tokenizer: Any,
    task: Any,
    methods: Sequence[str],
    configs: Mapping[str, Any],
    options: Any,
    out_dir: str | os.PathLike,
    seeds: Sequence[int] = (0,),
    *,
    model_name: str | None = None,
    model_info: Mapping[str, Any] | None = None,
    dtype: str | None = None,
    task_ref: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    task_info: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    executor: str = "local",
    workers: int | None = None,
    threads: int | None = None,
    ray_address: str | None = None,
    fresh: bool = False,
    progress: bool = True,
    allow_unknown_facts: bool = False,
    batch: int | str = "auto",
) -> dict[str, Any]:
    """Run the comparison (module docstring) and return its report (``comparison`` with the driver's parts: the
    unedited model's evaluation, the known-facts check, FLU's probe curves, provenance). The caller's model is left
    as it was (each run is undone from a masked snapshot). fresh: set the store aside (renamed, never deleted) and
    run everything again. batch: runs trained together (``mu_fast.sweep.batches``; ``auto``, the default: batches on
    a GPU, each alone on a CPU; 1: each alone)."""
    from mu_fast import sweep
    from mu_fast.evaluate import evaluate_task
    from mu_fast.evaluate.known_facts import check_known_facts
    from mu_fast.models.sites import SiteTable
    from mu_fast.provenance import model_identity, provenance_block
    from mu_fast.sweep.provided import Provided, task_key, withdraw
    from mu_fast.sweep.refs import resolve_model, resolve_tasks

    start = time.perf_counter()
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct integers, at least one; got {seeds}")
    methods = list(methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = out / STORE_NAME
    model_entry = model_entry_of(model, model_name, dtype)
    task_entry = task_entry_of(task, task_ref)
    spec = comparison_spec(model_entry, task_entry, methods, configs, options.spec_evaluations(), seeds, store)
    runs = sweep.expand(spec)  # checks the spec before any slow work
    model_ref = resolve_model(model_entry, "models[0]")
    task_ref_resolved = resolve_tasks(task_entry, "tasks[0]", [model_ref])[0]
    table = SiteTable(model)
    if identity is None:
        identity = model_identity(str(getattr(model.config, "_name_or_path", "") or table.arch), model=model)
    device = model.get_input_embeddings().weight.device
    block = provenance_block(model=identity, device=device, **dict(provenance or {}))

    baseline = evaluate_task(model, tokenizer, task, batch_size=options.eval_batch_size)
    known = check_known_facts(model, tokenizer, task, baseline=baseline)
    known.require(allow=allow_unknown_facts)
    from mu_fast.localize.flu import flu_localize

    flu = flu_localize(model, tokenizer, task, seed=seeds[0])  # its probe curves: the report's first plot

    if fresh and store.exists():
        aside = store.with_name(f"{store.stem}.{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        store.rename(aside)
        if progress:
            print(f"--fresh: the earlier runs are kept in {aside}; running every run again", flush=True)
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    setup = Provided(model_ref, model, tokenizer, dict(model_info or {}), {task_key(task_ref_resolved): task})
    local = executor == "local"
    try:
        sweep.run(spec, store=store, executor=executor, workers=workers, threads=None if local else (threads or 1),
                  ray_address=ray_address, setup=setup, progress=progress, batch=batch)
    finally:
        withdraw(model_ref, [task_ref_resolved])
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    wanted = {r.run_id for r in runs}
    records = [r for r in sweep.load_results(store, status=None) if r.get("run_id") in wanted]
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        first = failed[0]
        config = first.get("config", {})
        raise RuntimeError(f"{len(failed)} of {len(runs)} runs failed; first: {config.get('method')} seed "
                           f"{config.get('seed')}: {first.get('error', {}).get('message')} (all in {store}; fix "
                           "the cause and run again: finished runs are kept, failed ones are retried with --fresh)")
    results = comparison(records, table.n_layers)
    results.update({"task": task.name, "task_info": dict(task_info or {}), "model": table.arch, "before": baseline,
                    "known_facts": known.to_dict(), "seed": seeds[0], "seeds": seeds, "provenance": block,
                    "store": str(store), **dict(extra or {})})
    from mu_fast.report import legend

    results["legend"] = legend()
    results["flu"] = {**flu.to_dict(), "enrichment": flu.enrichment_shares()}
    results["seconds"] = time.perf_counter() - start
    write_report(results, out, flu, table.n_layers)
    return results


# ------------------------------------------------------------------------------------------------ the report
def pipeline_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A store record in the shape of one method's run in results.json: ``summary`` (the record's metrics),
    ``localization``, ``layer_fractions``, ``flu_layers``, ``edit``, the evaluations' results, ``timings``,
    ``provenance``, ``run_id``, ``seed``."""
    loc = dict(record.get("localization") or {})
    return {"run_id": record["run_id"], "seed": record["config"]["seed"], "flu_layers": loc.get("flu_layers"),
            "localization": loc, "layer_fractions": loc.get("layer_fractions", {}), "edit": record.get("edit"),
            **dict(record.get("results") or {}), "timings": record.get("timings"), "summary": record["metrics"],
            "provenance": record.get("provenance")}


def is_comparison(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether ``records`` are one comparison: one model and task, each method at one edit setting over seeds."""
    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        return False
    import json

    try:
        keys = {json.dumps([r["config"]["model"], r["config"]["task"], r["config"]["evaluations"]], sort_keys=True)
                for r in ok}
        per_method: dict[str, set[str]] = {}
        for r in ok:
            c = r["config"]
            settings = [{k: v for k, v in c["edit"].items() if k != "seed"}, c["budget"], c.get("kind", "single")]
            per_method.setdefault(c["method"], set()).add(json.dumps(settings, sort_keys=True))
            if r.get("metrics") is None or c.get("kind", "single") != "single":
                return False
    except (KeyError, TypeError, AttributeError):  # records of another shape (not written by the engine)
        return False
    return len(keys) == 1 and all(len(v) == 1 for v in per_method.values())


def comparison(records: Sequence[Mapping[str, Any]], n_layers: int | None = None) -> dict[str, Any]:
    """The report of one comparison's store records (``is_comparison``): ``{"methods": {m: aggregate}, "summary",
    "summary_std", "notes", "paired" (several seeds and methods), "flu_by_seed", "before_summary"}``."""
    from mu_fast.aggregate import aggregate_runs, paired_comparison, same_selection_notes

    ok = [r for r in records if r.get("status") == "ok"]
    if not ok:
        raise ValueError("no finished run to report")
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for r in ok:
        runs.setdefault(r["config"]["method"], {})[int(r["config"]["seed"])] = pipeline_record(r)
    methods = [m for m in dict.fromkeys(r["config"]["method"] for r in ok)]
    if n_layers is None:
        n_layers = max(len(next(iter(runs[m].values()))["layer_fractions"].get("mlp", [])) for m in methods)
    seeds = sorted({s for m in methods for s in runs[m]})
    out: dict[str, Any] = {"methods": {m: aggregate_runs(runs[m], n_layers) for m in methods}}
    out["summary"] = {m: a["summary"] for m, a in out["methods"].items()}
    out["summary_std"] = {m: a["std"] for m, a in out["methods"].items()}
    first = {m: a["runs"][str(min(runs[m]))] for m, a in out["methods"].items()}
    out["notes"] = same_selection_notes(first)
    flu_by_seed = {}
    for m in methods:
        for s, r in runs[m].items():
            if r.get("flu_layers") is not None:
                flu_by_seed.setdefault(str(s), r["flu_layers"])
    out["flu_by_seed"] = dict(sorted(flu_by_seed.items(), key=lambda kv: int(kv[0])))
    out["n_seeds"] = len(seeds)
    out["before_summary"] = dict(ok[0].get("before") or {})
    reference = "flu" if "flu" in methods else methods[0]
    if len(seeds) > 1 and len(methods) > 1:
        out["paired"] = paired_comparison(runs, reference)
    return out


def report_lines(results: Mapping[str, Any], title: str, before: Mapping[str, Any] | None = None) -> str:
    """The table (with the unedited model's row) and its legend, the spread of selections, notes and the paired
    comparison."""
    from mu_fast.aggregate import DEMO_COLUMNS, paired_lines, paired_verdicts, selection_lines
    from mu_fast.report import format_legend, format_table
    from mu_fast.sweep.one_run import BEFORE_ROW

    n = results["n_seeds"]
    heading = title + (f" · mean±std over {n} seeds" if n > 1 else "")
    before = results["before_summary"] if before is None else before
    rows = {BEFORE_ROW: before, **results["summary"]}
    lines = [format_table(rows, heading, stds=results["summary_std"], columns=DEMO_COLUMNS if n > 1 else None),
             format_legend()]
    lines += selection_lines(results["methods"], n)
    lines += [f"note: {note}" for note in results["notes"]]
    if results.get("paired"):
        lines += paired_lines(results["paired"]) + paired_verdicts(results["paired"])
    return "\n".join(lines)


def write_report(results: Mapping[str, Any], out: Path, flu: Any, n_layers: int) -> None:
    """results.json and the plots (probe accuracy per layer when ``flu`` is given, localization map, robustness)."""
    from mu_fast.report import plot_localization_map, plot_probe_accuracy, plot_robustness, write_json
    from mu_fast.sweep.one_run import before_summary

    write_json(out / "results.json", results)
    if flu is not None:
        plot_probe_accuracy({"before layer": flu.acc_pre.tolist(), "after attention": flu.acc_mid.tolist(),
                             "after MLP": flu.acc_post.tolist()}, out / "probe_accuracy.png", chance=flu.chance,
                            selected=flu.layers)
    plot_localization_map({m: r["layer_fractions"] for m, r in results["methods"].items()}, n_layers,
                          out / "localization_map.png", n_seeds=results["n_seeds"],
                          enrichment=(results.get("flu") or {}).get("enrichment"))
    plot_robustness(results["summary"], out / "robustness.png", stds=results["summary_std"],
                    before=before_summary(results["before"]) if "before" in results else results["before_summary"])

"""``mu-fast run`` (the demo's job on any model), ``mu-fast sweep`` (a sweep spec) and ``mu-fast report`` (a sweep's
table and plots). Registered on ``mu_fast.cli.app``.

``run`` localizes, edits and evaluates a task once per method and seed (``mu_fast.pipeline.compare_localizations``;
``--seeds 0,1,2`` gives mean ± std, ``--workers`` runs them in worker processes) and writes the demo's report:
results.json, one JSON per method (and seed), the table and the plots. The edit settings come from a named
``--preset`` (``mu_fast.sweep.presets``: ``organism`` the demo's settings with the lr rule's choice per group,
``default`` the paper's loop, ``paper_sports:<model>:<experiment>`` the paper's per-model ones; without it
``organism`` for the organism, else ``default``: ``mu_fast.cli_options.default_preset``), each field overridable by
its flag (``mu_fast.cli_options``); methods whose edits left forget accuracy where it was get a closing warning.
``--preset paper`` runs the authors' whole protocol instead (``mu_fast.cli_paper``). ``demo`` (``mu_fast.cli_demo``)
is ``run`` on the organism with every method's lr chosen by one rule.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from mu_fast.cli_common import (
    ALLOW_UNKNOWN,
    CF_MODEL_HELP,
    CLI_METHODS,
    DATASET_HELP,
    DATASETS,
    DTYPE_NAMES,
    FORGET_SPLIT_HELP,
    INJECT_LABEL_HELP,
    MODEL_HELP,
    console,
    dataset_task,
    identity_of,
    load_model_ref,
    organism_task_of,
)
from mu_fast.cli_options import (
    check_edit_values,
    check_flag_values,
    default_preset,
    edit_flags,
    no_effect_warning,
    probe_flags,
    relearn_flags,
    unmoved,
    with_flags,
)
from mu_fast.preflight import (
    check_choice,
    check_positive,
    check_task_options,
    check_writable,
    resolve_model,
    writing_output,
)

EXECUTORS = ("local", "processes", "gpus", "ray")
DEMO_METHODS = "flu,atp,ct,random,random_mlps,all_mlps,nonlocalized"


def parse_methods(methods: str) -> list[str]:
    """``flu,atp`` -> ``["flu", "atp"]``, each checked."""
    out = [m.strip() for m in methods.split(",") if m.strip()]
    if not out:
        raise ValueError("--methods is empty; pass a comma-separated list such as flu,atp,ct")
    for method in out:
        check_choice("--methods entry", method, CLI_METHODS)
    return out


def run_settings(preset: str, methods: list[str], settings: Mapping[str, Any], relearn: bool, probes: bool,
                 relearn_settings: Mapping[str, Any], probe_settings: Mapping[str, Any],
                 edit_preset: str | None = None) -> tuple[dict[str, Any], Any]:
    """``({method: EditConfig}, RunOptions)`` of ``--preset`` with the given flags over it; every value is checked
    (errors name the flag) before anything loads. edit_preset: take the edit settings from this preset instead
    (the evaluation options still from ``preset``)."""
    from mu_fast.cli_options import edit_config
    from mu_fast.pipeline import METHOD_GROUP, RUN_PRESETS
    from mu_fast.sweep.presets import preset_groups

    settings = check_edit_values(settings)
    for given, wanted, what in ((relearn_settings, relearn, "relearn"), (probe_settings, probes, "probe")):
        if given and not wanted:
            raise ValueError(f"--{what}-{next(iter(given)).replace('_', '-')} sets the {what} evaluation; drop it or "
                             f"drop --no-{'probes' if what == 'probe' else 'relearn'}")
    check_flag_values(relearn_settings, "relearn")
    check_flag_values(probe_settings, "probe")
    try:
        groups = preset_groups(edit_preset or preset)
    except ValueError as err:
        raise ValueError(str(err).replace("spec: edit.preset: ", "--preset: ").replace(
            ", or a name defined under presets:", "")) from None
    configs = {m: edit_config(groups[METHOD_GROUP.get(m, "lookup")], settings) for m in methods}
    options = replace(RUN_PRESETS.get(preset, RUN_PRESETS["default"]), relearn=relearn, probes=probes)
    relearn_settings = dict(relearn_settings)
    for key, field in (("steps", "relearn_steps"), ("lr", "relearn_lr"), ("lora_rank", "relearn_rank")):
        if key in relearn_settings:
            options = replace(options, **{field: relearn_settings.pop(key)})
    return configs, replace(options, relearn_settings=relearn_settings, probe_settings=dict(probe_settings))


def report_run(model: Any, tokenizer: Any, task: Any, methods: list[str], configs: Mapping[str, Any], options: Any,
               out: Path, fresh: bool, title: str, identity: Mapping[str, Any], task_info: Mapping[str, Any],
               allow_unknown_facts: bool, provenance: Mapping[str, Any] | None = None,
               seeds: list[int] | None = None, extra: Mapping[str, Any] | None = None,
               workers: int = 1, threads: int = 1) -> dict[str, Any]:
    """``compare_localizations`` with the command line's report lines; the LM retain loss is off without texts.
    seeds: every method over these seeds (mean ± std); extra: more fields of results.json (the demo's lr choice)."""
    from mu_fast.pipeline import compare_localizations

    if not task.lm_texts:
        configs = {m: replace(c, lm_coef=0.0) for m, c in configs.items()}
    results = compare_localizations(model, tokenizer, task, methods, configs, options, out_dir=out, resume=not fresh,
                                    title=title, allow_unknown_facts=allow_unknown_facts, provenance=provenance,
                                    identity=identity, task_info=task_info, seeds=seeds, extra=extra,
                                    workers=workers, threads=threads)
    screen = console()
    block = results["provenance"]
    versions = ", ".join(f"{k} {v}" for k, v in block["versions"].items() if v)
    host = block["host"]
    flu = results["flu"]
    by_seed = {tuple(v) for v in results.get("flu_by_seed", {}).values()}
    screen.print(f"FLU layers (probe gain at the subject's last token): {flu['layers']}"
                 + (" (" + ", ".join(f"seed {k}: {v}" for k, v in results["flu_by_seed"].items()
                                     if v != flu["layers"]) + ")" if len(by_seed) > 1 else "")
                 + (f"; attention the probe implicates: {flu.get('attn_layers')}" if flu.get("attn_layers") else "")
                 + (f"; attention's share of the probe's rise: {share:.2f}"
                    if (share := (flu.get("enrichment") or {}).get("attn_share")) is not None else ""))
    cpu = host.get("cpu") or {}
    where = host["processor"] + (f" ({cpu['vendor']} family {cpu['family']} model {cpu['model']})"
                                 if cpu.get("family") else "")
    screen.print(f"versions: {versions}; {host['cpu_capability']} kernels, {host['torch_threads']} torch thread(s) on "
                 f"{where} (all in results.json)", highlight=False)
    screen.print(f"report: {out}/ (results.json, probe_accuracy.png, localization_map.png, robustness.png)")
    return results


@with_flags("probe_settings", probe_flags())
@with_flags("relearn_settings", relearn_flags())
@with_flags("settings", edit_flags(exclude=("seed",)))  # run's --seeds sets the edit's seed per run
def run_cmd(
    model: str = typer.Argument(..., help=MODEL_HELP),
    dataset: str = typer.Option("organism", help=DATASET_HELP),
    forget_split: str = typer.Option("first_16_unsplit", help=FORGET_SPLIT_HELP),
    inject_label: str = typer.Option("random_without_golf", help=INJECT_LABEL_HELP),
    cf_model: str | None = typer.Option(None, help=CF_MODEL_HELP),
    lm_texts: str | None = typer.Option(None, help="text/jsonl file (or 'pile' online) for the LM retain loss"),
    methods: str = typer.Option(DEMO_METHODS, help="comma-separated localization methods"),
    preset: str | None = typer.Option(None, help="edit settings the flags override: default (the paper's loop), organism (the demo's, tuned on the organism), paper_sports:<model>:<forget_16|forget_64|sport_golf>, paper_cf:<model>:<experiment>; paper: the authors' whole protocol (--experiment, mu_fast.cli_paper). Default: organism for the organism and models saved from it, else default"),
    out: Path = typer.Option(Path("reports/run"), help="report folder (JSON + plots); finished methods are reused"),
    relearn: bool = typer.Option(True, help="run the relearning attack (settings: --relearn-*)"),
    probes: bool = typer.Option(True, help="run the latent-knowledge probes (settings: --probe-*)"),
    fresh: bool = typer.Option(False, help="recompute every method even if its result exists"),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32 (the organism: always fp32)"),
    allow_unknown_facts: bool = typer.Option(False, ALLOW_UNKNOWN, help="run even if the model does not know the facts"),
    experiment: str | None = typer.Option(None, help="--preset paper: forget_16, forget_64, sport_golf (sports), forget_64_sequential (counterfact)"),
    paper_model: str | None = typer.Option(None, help="--preset paper: gemma-7b, gemma-2-9b or llama-3-8b (default: from MODEL's name or config.json)"),
    seeds: str = typer.Option("0", help="seeds of everything random, e.g. 0,1,2: every method runs once per seed and the table shows mean ± std (the authors ran one)"),
    workers: int = typer.Option(1, help="worker processes for the runs (one torch thread each; same numbers as one process)"),
    paper_evals: str = typer.Option("all", help="--preset paper: the authors' extra evaluations to run: all, none or softprompt,capability"),
    mmlu_add_bos: bool | None = typer.Option(None, "--mmlu-add-bos/--no-mmlu-add-bos", show_default=False, help="--preset paper: lm-eval MMLU/SciQ requests with / without the BOS token (default: the authors' lm-eval 0.4.4, BOS for Gemma only)"),
    dry_run: bool = typer.Option(False, help="--preset paper: print the runs with the authors' settings; load nothing"),
    seed: str | None = typer.Option(None, "--seed", hidden=True),  # refused: --seeds is run's one seed option
    settings: dict[str, Any] | None = None,
    relearn_settings: dict[str, Any] | None = None,
    probe_settings: dict[str, Any] | None = None,
) -> None:
    """Localize / edit / evaluate MODEL with every method and compare them (the demo's report, on any model).
    Every EditConfig field has a flag of its name; --relearn-* / --probe-* set the evaluations.
    --preset paper runs the authors' protocol instead (mu_fast.cli_paper; flags that change it warn)."""
    t0 = time.perf_counter()
    if seed is not None:
        raise ValueError(f"--seed is not an option of run: pass --seeds {seed} (each seed sets the localization's, "
                         "the random baselines' and the edit's data order; --seeds 0,1,2 runs several)")
    if preset == "paper":
        from mu_fast.cli_paper import run_paper

        return run_paper(model, dataset, experiment, paper_model, methods, DEMO_METHODS, lm_texts, seeds, out, dry_run,
                         fresh, dtype, relearn, probes, paper_evals, settings or {}, relearn_settings or {},
                         probe_settings or {}, {"forget_split": forget_split, "inject_label": inject_label,
                                                "cf_model": cf_model}, mmlu_add_bos)
    if experiment or paper_model or dry_run or paper_evals != "all" or mmlu_add_bos is not None:
        raise ValueError("--experiment, --paper-model, --paper-evals, --(no-)mmlu-add-bos and --dry-run are options of "
                         "--preset paper; add --preset paper or drop them")
    from mu_fast.cli_demo import parse_seeds

    preset = preset or default_preset(model)
    seed_list = parse_seeds(seeds)
    check_positive("--workers", workers, integer=True)
    method_list = parse_methods(methods)
    check_choice("--dtype", dtype, DTYPE_NAMES)
    configs, options = run_settings(preset, method_list, settings or {}, relearn, probes, relearn_settings or {},
                                    probe_settings or {})
    check_writable("--out", out, folder=True)
    ref = resolve_model(model)
    check_task_options(dataset, ref, forget_split, inject_label, cf_model, DATASETS)
    task = dataset_task(dataset, forget_split, inject_label, cf_model, lm_texts) if dataset != "organism" else None
    m, tok, info = load_model_ref(ref, dtype)
    if task is None:
        task = organism_task_of(info, forget_split, inject_label, tok, ref)
        if lm_texts:
            from mu_fast.data import load_lm_texts

            task.lm_texts = load_lm_texts(lm_texts, n=2048, seed=0)
    provenance = None
    if info.get("organism") is not None:
        org = info["organism"]
        provenance = {"organism": {"preset": ref.value, "config_hash": org.config.config_hash(), "path": str(org.path)}}
    with writing_output("--out", out, "every run finished before is kept in --out; run again with the same "
                                      "options to resume"):
        results = report_run(m, tok, task, method_list, configs, options, out, fresh,
                             f"{model}, {dataset} {forget_split}, {inject_label}", identity_of(ref, info, m, dtype),
                             {"dataset": dataset, "forget_split": forget_split, "inject_label": inject_label},
                             allow_unknown_facts, provenance, seeds=seed_list, workers=workers)
    console().print(f"total {time.perf_counter() - t0:.1f} s")
    before = results["before"]["normal"]["forget"]["acc"]
    idle = [m for m in method_list if "forget_err" in results["summary"].get(m, {})
            and unmoved(before, 1.0 - results["summary"][m]["forget_err"])]
    if idle:
        what = ("the edit of " if len(idle) == 1 else "the edits of ") + ", ".join(idle)
        print("mu-fast: warning: " + no_effect_warning(what, [configs[m].lr for m in idle], preset, model),
              file=sys.stderr)


def sweep_cmd(
    spec: Path = typer.Argument(..., help="a sweep spec (YAML), e.g. specs/ci_organism.yaml"),
    out: Path | None = typer.Option(None, help="the results store (JSON lines; default: the spec's store:, else sweeps/<name>.jsonl)"),
    dry_run: bool = typer.Option(False, help="print the expanded runs with estimated time and memory; run nothing"),
    retry_failed: bool = typer.Option(False, help="run again the runs whose record says failed"),
    executor: str = typer.Option("local", help="local (this process), processes (worker processes), gpus (one worker per GPU) or ray (Ray actors)"),
    workers: int | None = typer.Option(None, help="workers for processes / ray (default 2, or the Ray cluster's GPUs)"),
    ray_address: str | None = typer.Option(None, help="an existing Ray cluster (auto, or host:port of `ray start --head`); default: a local one"),
    threads: int | None = typer.Option(None, help="torch CPU threads per worker"),
    var: list[str] | None = typer.Option(None, help="set a spec variable (its vars:), e.g. --var model=google/gemma-2-9b; repeatable"),
) -> None:
    """Run every run of a sweep spec the store does not hold yet (a killed sweep resumes where it stopped)."""
    import mu_fast.sweep as sweep
    from mu_fast.preflight import check_positive

    check_choice("--executor", executor, EXECUTORS)
    check_positive("--workers", workers, integer=True)
    check_positive("--threads", threads, integer=True)
    if not spec.is_file():
        raise FileNotFoundError(f"SPEC {str(spec)!r} does not exist; pass a sweep spec file such as "
                                "specs/ci_organism.yaml")
    if ray_address is not None and executor != "ray":
        raise ValueError(f"--ray-address is for --executor ray; add --executor ray (not {executor})")
    if out is not None and out.is_dir():
        raise IsADirectoryError(f"--out {str(out)!r} is a folder; pass the store's file path, e.g. {out}/sweep.jsonl")
    variables = parse_vars(var or [])
    from mu_fast.sweep.engine import store_path
    from mu_fast.sweep.spec import load_spec

    store = store_path(load_spec(spec, variables), out)
    store_option = "--out" if out is not None else f"store: of {spec.name}"
    fix = None if out is not None else "pass --out FILE or change store: in the spec"
    if dry_run:
        sweep.dry_run(spec, vars=variables, store=out, print_fn=print)
        return
    from mu_fast.sweep.engine import SweepInterrupted

    check_writable(store_option, store, append=True, fix=fix)
    try:
        with writing_output(store_option, store, "every run stored before is kept; free space or fix the path, then "
                                                 "run again to resume"):
            result = sweep.run(spec, vars=variables, store=out, executor=executor, retry_failed=retry_failed,
                               workers=workers, ray_address=ray_address, threads=threads)
    except SweepInterrupted as err:  # Ctrl-C: one line, not click's "Aborted!" (the store keeps every finished run)
        print(f"mu-fast: {err}", file=sys.stderr)
        raise SystemExit(130) from None
    console().print(str(result), highlight=False)
    if result.failed:
        console().print("failed runs are kept in the store; fix the cause and rerun with --retry-failed")


def parse_vars(items: list[str]) -> dict[str, str]:
    """``["model=google/gemma-2-9b"]`` -> ``{"model": "google/gemma-2-9b"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--var {item!r}: write NAME=VALUE, e.g. --var model=google/gemma-2-9b")
        out[key.strip()] = value
    return out


def report_cmd(
    results: Path = typer.Argument(..., help="a sweep store (.jsonl) or a folder holding one"),
    out: Path | None = typer.Option(None, help="folder for table.txt and the plots (default: <store>_report/)"),
) -> None:
    """Print a sweep's tables in the paper's layout (mean ± std over seeds) and write them with the plots."""
    from mu_fast.sweep.report import write_report

    store = _store_file(results)
    folder = out if out is not None else store.with_name(store.stem + "_report")
    check_writable("--out", folder, folder=True)
    from mu_fast.sweep.store import load_results

    records = load_results(store)
    if not records:
        raise ValueError(f"{store} holds no finished run; run the sweep first (mu-fast sweep SPEC --out {store})")
    with writing_output("--out", folder, "the store is unchanged; nothing else was written"):
        written = write_report(records, folder)
    print(written["text"])
    from mu_fast.report import format_legend
    from mu_fast.sweep.report import COLUMN_LEGEND

    print(format_legend(columns=COLUMN_LEGEND, components=False))
    console().print(f"report: {folder}/ (table.txt, {len(written['plots'])} plots)")


def _store_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        stores = sorted(path.glob("*.jsonl"))
        if len(stores) == 1:
            return stores[0]
        what = "no" if not stores else f"{len(stores)}"
        raise FileNotFoundError(f"RESULTS {str(path)!r} holds {what} .jsonl stores; pass the store file itself")
    raise FileNotFoundError(f"RESULTS {str(path)!r} does not exist; pass a sweep's store (mu-fast sweep --out FILE)")


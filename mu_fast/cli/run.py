"""``mu-fast run``: the demo's job on any model. Registered on ``mu_fast.cli.app``.

``run`` localizes, edits and evaluates a task once per method and seed (``mu_fast.sweep.compare`` through ``mu_fast.pipeline.compare_localizations``: a sweep;
``--seeds 0,1,2`` gives mean ± std, ``--workers`` runs them in worker processes) and writes the demo's report:
results.json, one JSON per method (and seed), the table and the plots. The edit settings come from a named
``--preset`` (``mu_fast.sweep.presets``: ``organism`` the demo's settings with the lr rule's choice per group,
``default`` the paper's loop, ``paper_sports:<model>:<experiment>`` the paper's per-model ones; without it
``organism`` for the organism, else ``default``: ``mu_fast.cli.options.default_preset``), each field overridable by
its flag (``mu_fast.cli.options``); methods whose edits left forget accuracy where it was get a closing warning.
``--preset paper`` runs the authors' whole protocol instead (``mu_fast.cli.paper``). ``demo`` (``mu_fast.cli.demo``)
is ``run`` on the organism with every method's lr chosen by one rule.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from mu_fast.cli.common import (
    ALLOW_UNKNOWN,
    CF_MODEL_HELP,
    DATASET_HELP,
    DATASETS,
    BATCH_HELP,
    DTYPE_NAMES,
    FORGET_SPLIT_HELP,
    INJECT_LABEL_HELP,
    MODEL_HELP,
    console,
    dataset_task,
    identity_of,
    load_model_ref,
    parse_batch,
    organism_task_of,
    parse_methods,
    parse_seeds,
    report_run,
)
from mu_fast.cli.options import (
    default_preset,
    edit_flags,
    no_effect_warning,
    probe_flags,
    relearn_flags,
    run_settings,
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

DEMO_METHODS = "flu,atp,ct,random,random_mlps,all_mlps,nonlocalized"


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
    preset: str | None = typer.Option(None, help="edit settings the flags override: default (the paper's loop), organism (the demo's, tuned on the organism), paper_sports:<model>:<forget_16|forget_64|sport_golf>, paper_cf:<model>:<experiment>; paper: the authors' whole protocol (--experiment, mu_fast.cli.paper). Default: organism for the organism and models saved from it, else default"),
    out: Path = typer.Option(Path("reports/run"), help="report folder (JSON + plots); finished methods are reused"),
    relearn: bool = typer.Option(True, help="run the relearning attack (settings: --relearn-*)"),
    probes: bool = typer.Option(True, help="run the latent-knowledge probes (settings: --probe-*)"),
    fresh: bool = typer.Option(False, help="recompute every method even if its result exists"),
    dtype: str = typer.Option("bf16", help="bf16, fp16 or fp32 (the organism: always fp32)"),
    allow_unknown_facts: bool = typer.Option(False, ALLOW_UNKNOWN, help="run even if the model does not know the facts"),
    experiment: str | None = typer.Option(None, help="--preset paper: forget_16, forget_64, sport_golf (sports), forget_64_sequential (counterfact)"),
    paper_model: str | None = typer.Option(None, help="--preset paper: gemma-7b, gemma-2-9b or llama-3-8b (default: from MODEL's name or config.json)"),
    seeds: str = typer.Option("0", help="seeds of everything random, e.g. 0,1,2: every method runs once per seed and the table shows mean ± std (the authors ran one)"),
    workers: int = typer.Option(1, help="worker processes (or Ray actors) for the runs (one torch thread each; same numbers as one process)"),
    executor: str | None = typer.Option(None, help="where the runs go: local (this process), processes (--workers worker processes) or ray (Ray actors; --ray-address). Default: processes with --workers > 1, else local"),
    ray_address: str | None = typer.Option(None, help="--executor ray: an existing cluster (auto, or host:port); default a local one"),
    batch: str = typer.Option("auto", help=BATCH_HELP),
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
    --preset paper runs the authors' protocol instead (mu_fast.cli.paper; flags that change it warn)."""
    t0 = time.perf_counter()
    if seed is not None:
        raise ValueError(f"--seed is not an option of run: pass --seeds {seed} (each seed sets the localization's, "
                         "the random baselines' and the edit's data order; --seeds 0,1,2 runs several)")
    if preset == "paper":
        from mu_fast.cli.paper import run_paper

        return run_paper(model, dataset, experiment, paper_model, methods, DEMO_METHODS, lm_texts, seeds, out, dry_run,
                         fresh, dtype, relearn, probes, paper_evals, settings or {}, relearn_settings or {},
                         probe_settings or {}, {"forget_split": forget_split, "inject_label": inject_label,
                                                "cf_model": cf_model}, mmlu_add_bos)
    if experiment or paper_model or dry_run or paper_evals != "all" or mmlu_add_bos is not None:
        raise ValueError("--experiment, --paper-model, --paper-evals, --(no-)mmlu-add-bos and --dry-run are options of "
                         "--preset paper; add --preset paper or drop them")
    preset = preset or default_preset(model)
    seed_list = parse_seeds(seeds)
    check_positive("--workers", workers, integer=True)
    if executor is not None:
        check_choice("--executor", executor, ("local", "processes", "ray"))
    if ray_address is not None and executor != "ray":
        raise ValueError("--ray-address is an option of --executor ray; add --executor ray or drop it")
    batch_size = parse_batch(batch)
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
                             allow_unknown_facts, provenance, seeds=seed_list, workers=workers, executor=executor,
                             ray_address=ray_address, batch=batch_size, **sweep_names(ref, info, dataset, forget_split, inject_label,
                                                                    cf_model, lm_texts))
    console().print(f"total {time.perf_counter() - t0:.1f} s")
    _warn_unmoved(results, method_list, configs, preset, model)


def sweep_names(ref: Any, info: dict[str, Any], dataset: str, forget_split: str, inject_label: str,
                cf_model: str | None, lm_texts: str | None) -> dict[str, Any]:
    """How the sweep store names MODEL and the task: the reference MODEL was loaded from (an organism, a folder, a hub
    id) and the task's dataset / split / label, where the spec can name them; otherwise (a folder saved from the
    organism, random weights) the model and task by digest (``mu_fast.sweep.provided``)."""
    from mu_fast.cli.common import model_name

    names: dict[str, Any] = {"model_info": info}
    if ref.kind in ("organism", "local", "hub") and not ref.organism:
        names["model_name"] = model_name(ref)
        task = {"dataset": dataset, "forget_split": forget_split, "inject_label": inject_label}
        if dataset == "counterfact" and cf_model:
            task["cf_model"] = cf_model
        if lm_texts and dataset != "organism":
            task["lm_texts"] = lm_texts
        if (dataset != "counterfact" or cf_model) and not (lm_texts and dataset == "organism"):
            names["task_ref"] = task  # (the organism's task with LM texts has no spec form: named by digest)
    return names


def _warn_unmoved(results: dict[str, Any], method_list: list[str], configs: dict[str, Any], preset: str,
                  model: str) -> None:
    before = results["before"]["normal"]["forget"]["acc"]
    idle = [m for m in method_list if "forget_err" in results["summary"].get(m, {})
            and unmoved(before, 1.0 - results["summary"][m]["forget_err"])]
    if idle:
        what = ("the edit of " if len(idle) == 1 else "the edits of ") + ", ".join(idle)
        print("mu-fast: warning: " + no_effect_warning(what, [configs[m].lr for m in idle], preset, model),
              file=sys.stderr)

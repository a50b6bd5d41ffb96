"""``mu-fast demo``: the model organism, every localization method over several seeds, learning rates by one rule.

1. Load the organism (``OrganismConfig.demo()``: its sport lookup spans several MLPs), shipped as weights with a
   checksum (``mu_fast.organism.shipped``); ``--retrain-organism`` trains it anew here instead.
2. Learning rates: per method, the one ``mu_fast.organism.lr_choice`` chose by the stated rule on a validation
   forget set (the committed choice when its key matches; otherwise, or with ``--choose-lr``, the rule's sweep runs
   first through the sweep engine and its choice is written to the report folder).
3. Every method over ``--seeds`` as a sweep (``mu_fast.sweep.compare``): the runs go to the sweep engine's executor
   (``--executor processes`` with ``--workers`` by default, ``local``, or ``ray``) and into ``--out/runs.jsonl``, so a
   killed demo started again recomputes nothing that finished; then mean ± std per method, paired intervals against
   FLU, the spread of selections and plots with error bars, from the store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from mu_fast.cli.common import BATCH_HELP, DATASETS, console, parse_batch, parse_methods, parse_seeds, report_run
from mu_fast.cli.options import check_edit_values, edit_flags, probe_flags, relearn_flags, run_settings, with_flags
from mu_fast.preflight import ModelRef, check_choice, check_positive, check_task_options

DEMO_METHODS = "flu,flu_attn,atp,ct,random,random_mlps,all_mlps,nonlocalized"


@with_flags("probe_settings", probe_flags())
@with_flags("relearn_settings", relearn_flags())
@with_flags("settings", edit_flags(exclude=("seed",)))  # --seeds sets the edit's seed per run
def demo_cmd(
    out: Path = typer.Option(Path("reports/demo"), help="report folder (JSON + plots); finished runs are reused"),
    preset: str = typer.Option("demo", help="organism preset: demo (the multilayer-lookup organism, 1-2 minutes to train) or ci (150 athletes, under a minute)"),
    forget_split: str = typer.Option("first_64_unsplit", help="forget split, as in the paper"),
    methods: str = typer.Option(DEMO_METHODS, help="comma-separated localization methods"),
    seeds: str = typer.Option("0,1,2,3,4", help="seeds of everything random (localization noise, random baselines, batch order, relearning, probes)"),
    edit_preset: str = typer.Option("organism", help="organism: every method's lr chosen by the lr rule (mu_fast.organism.lr_choice); or a preset of `mu-fast run --preset` (default, paper_sports:...)"),
    choose_lr: bool = typer.Option(False, help="run the lr rule's sweep even if a stored choice matches"),
    retrain_organism: bool = typer.Option(False, help="train the organism here instead of loading the shipped weights (minutes; another CPU trains another organism)"),
    lr_grid: str | None = typer.Option(None, help="learning rates the rule chooses from, comma-separated (default: mu_fast.organism.lr_choice.LR_GRID)"),
    relearn: bool = typer.Option(True, help="run the relearning attack (settings: --relearn-*)"),
    probes: bool = typer.Option(True, help="run the latent-knowledge probes (settings: --probe-*)"),
    executor: str = typer.Option("processes", help="where the runs go: processes (--workers worker processes), local (this process) or ray (Ray actors; --ray-address)"),
    ray_address: str | None = typer.Option(None, help="--executor ray: an existing cluster (auto, or host:port); default a local one"),
    batch: str = typer.Option("auto", help=BATCH_HELP),
    workers: int = typer.Option(2, help="worker processes or Ray actors for the runs (the numbers do not depend on it)"),
    threads: int = typer.Option(1, help="torch threads per process (the table does not depend on it: checked with 1 and 2)"),
    fresh: bool = typer.Option(False, help="recompute every run even if its result exists"),
    portable: bool = typer.Option(False, "--portable-kernels/--native-kernels", help="--portable-kernels: torch's baseline x86-64 kernels, MKL's reproducible path (slower; the table is the same with either: mu_fast.determinism)"),
    seed: str | None = typer.Option(None, "--seed", hidden=True),  # refused: --seeds is the demo's one seed option
    settings: dict[str, Any] | None = None,
    relearn_settings: dict[str, Any] | None = None,
    probe_settings: dict[str, Any] | None = None,
) -> None:
    """Load the model organism, then localize / edit / evaluate it with every method over several seeds,
    each method at the learning rate one rule chose for it. Every EditConfig field has a flag of its name."""
    from mu_fast.determinism import use_portable_kernels

    t0 = time.perf_counter()
    wanted = portable
    portable = use_portable_kernels() if wanted else False  # before torch is imported
    if seed is not None:
        raise ValueError(f"--seed is not an option of demo: pass --seeds {seed} (each seed sets the localization's, "
                         "the edit's, the relearning's and the probes' draws)")
    check_choice("--preset", preset, ("demo", "ci"))
    check_choice("--executor", executor, ("processes", "local", "ray"))
    batch_size = parse_batch(batch)
    if ray_address is not None and executor != "ray":
        raise ValueError("--ray-address is an option of --executor ray; add --executor ray or drop it")
    method_list = parse_methods(methods)
    seed_list = parse_seeds(seeds)
    grid = parse_grid(lr_grid)
    check_positive("--workers", workers, integer=True)
    check_positive("--threads", threads, integer=True)
    flags = check_edit_values(settings or {})
    if "lr" in flags and edit_preset == "organism":
        raise ValueError("--lr would override every method's chosen learning rate; drop it (the lr rule chooses "
                         "them) or pass --edit-preset default to set one lr for all")
    # With the organism preset the edit settings come from the lr rule's choice (below), after the organism loads.
    configs, options = run_settings(edit_preset, method_list, flags, relearn, probes, relearn_settings or {},
                                    probe_settings or {}, edit_preset="default" if edit_preset == "organism" else None)
    check_task_options("organism", ModelRef("organism", preset), forget_split, "random_without_golf", None, DATASETS)
    from mu_fast.preflight import check_writable

    check_writable("--out", out, folder=True)

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # default one: 2 threads stall on a loaded 2-core machine
    try:
        _demo(out, preset, forget_split, method_list, seed_list, edit_preset, flags, configs, options, choose_lr,
              grid, workers, fresh, portable, wanted, t0, retrain_organism, threads, executor, ray_address, batch_size)
    finally:
        torch.set_num_threads(before)


def _demo(out: Path, preset: str, forget_split: str, method_list: list[str], seeds: list[int], edit_preset: str,
          flags: dict[str, Any], configs: dict[str, Any], options: Any, choose_lr: bool, grid: tuple[float, ...] | None,
          workers: int, fresh: bool, portable: bool, wanted: bool, t0: float, retrain: bool = False,
          threads: int = 1, executor: str = "processes", ray_address: str | None = None,
          batch: int | str = "auto") -> None:
    from mu_fast.organism import OrganismConfig, load_organism, organism_task
    from mu_fast.provenance import model_identity

    screen = console()
    screen.rule("[bold]mu_fast demo: the model organism")
    if wanted and not portable:
        screen.print("kernels: this CPU's own (torch was loaded before --portable-kernels could take effect)",
                     highlight=False)
    org = load_organism(getattr(OrganismConfig, preset)(), progress=True, retrain=retrain)
    t_org = time.perf_counter() - t0
    accuracy = {k: round(v, 3) for k, v in org.report.get("accuracy", {}).items()}
    where = {"shipped": "shipped weights, checksums verified", "cache": f"trained earlier, cached in {org.path}",
             "trained": f"trained now, cached in {org.path}"}[org.source]
    screen.print(f"organism ({where}) ready in {t_org:.1f} s; argmax accuracy per format: {json.dumps(accuracy)}",
                 highlight=False)
    from mu_fast.models.precision import to_float64
    from mu_fast.organism.lr_choice import DEMO_DTYPE

    assert DEMO_DTYPE == "fp64"
    org.model = to_float64(org.model)  # the same numbers on every CPU (lr_choice.DEMO_DTYPE, mu_fast.models.precision)
    lr_choice = None
    if edit_preset == "organism":
        lr_choice = demo_lr_choice(org, preset, method_list, out, choose_lr, flags, grid, workers)
        from mu_fast.organism.lr_choice import edit_configs

        configs = edit_configs(lr_choice, method_list)
        screen.print(lr_lines(lr_choice, method_list), highlight=False)
    task = organism_task(org.facts, forget_split=forget_split, inject_label="random_without_golf", tokenizer=org.tokenizer)
    provenance = {"organism": {"preset": preset, "config_hash": org.config.config_hash(), "path": str(org.path),
                               "source": org.source,
                               "trained_with": org.report.get("versions"),
                               "train_threads": org.report.get("train", {}).get("threads")}}
    identity = model_identity(f"organism:{preset}", {"organism": org}, org.model, DEMO_DTYPE)
    t_runs = time.perf_counter()
    report_run(org.model, org.tokenizer, task, method_list, configs, options, out, fresh,
               f"organism ({preset}), {forget_split}, edit to a random other sport", identity,
               {"dataset": "organism", "forget_split": forget_split, "inject_label": "random_without_golf"}, False,
               provenance, seeds=seeds, extra={"lr_choice": lr_choice} if lr_choice else None, workers=workers,
               threads=threads, executor=executor, ray_address=ray_address, model_name=f"organism:{preset}",
               model_info={"organism": org}, batch=batch,
               task_ref={"dataset": "organism", "forget_split": forget_split, "inject_label": "random_without_golf"})
    kernels = "portable" if portable else "native"
    screen.print(f"kernels: {kernels}; total {time.perf_counter() - t0:.1f} s (organism {t_org:.1f} s, "
                 f"{len(method_list)} methods × {len(seeds)} seeds {time.perf_counter() - t_runs:.1f} s)")


def parse_grid(text: str | None) -> tuple[float, ...] | None:
    """``"1e-3,5e-3"`` -> ``(0.001, 0.005)`` (ascending, distinct, positive); None for the default grid."""
    if text is None:
        return None
    try:
        grid = tuple(sorted({float(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"--lr-grid {text!r} is not a comma-separated list of numbers; pass e.g. --lr-grid 1e-3,5e-3") from None
    if not grid or grid[0] <= 0:
        raise ValueError(f"--lr-grid {text!r} needs positive learning rates, at least one; pass e.g. --lr-grid 1e-3,5e-3")
    return grid


def demo_lr_choice(org: Any, preset: str, methods: list[str], out: Path, choose_lr: bool,
                   flags: dict[str, Any], grid: tuple[float, ...] | None, workers: int = 1) -> dict[str, Any]:
    """The lr rule's choice for this organism, these methods and these settings (``BASE_EDIT`` with the edit flags
    over it): the committed one, or the report folder's from an earlier run, if made under the same key; else run the
    rule's sweep now (``choose_demo_lrs``) and keep it in ``out/lr_choice.json``."""
    from mu_fast.organism.lr_choice import BASE_EDIT, DEMO_RULE, LR_GRID, choice_key, choose_demo_lrs, load_lr_choice
    from mu_fast.report import write_json

    base = {**BASE_EDIT, **flags}
    grid = grid or LR_GRID
    key = choice_key(org.config.config_hash(), methods, base=base, grid=grid)
    local = out / "lr_choice.json"
    if not choose_lr:
        found = load_lr_choice(key) or load_lr_choice(key, local)  # the shipped choice, else this folder's
        if found is not None:
            return found
    screen = console()
    screen.print(f"choosing learning rates by the rule: {DEMO_RULE.describe()}", highlight=False)
    ref = "organism" if preset == "demo" else f"organism:{preset}"
    choice = choose_demo_lrs(ref, org.config.config_hash(), methods, out / "lr_sweep.jsonl", base=base, grid=grid,
                             workers=workers, organism=None if org.source == "shipped" else org)
    write_json(local, choice)
    screen.print(f"lr choice written to {local} (copy it over mu_fast/organism/demo_lr_choice.json to ship it)")
    return choice


def lr_lines(choice: dict[str, Any], methods: list[str]) -> str:
    """Two lines: the rule, then each method's lr (``*`` where the rule fell back: target not reached / floor)."""
    parts = []
    for method in methods:
        c = choice["choices"][method]
        mark = ("" if c["reason"].startswith("smallest") else "*") + ("~" if c.get("near_edge") else "")
        parts.append(f"{method} {c['lr']:g}{mark}")
    text = f"learning rates ({choice['rule']}): " + ", ".join(parts)
    if any("*" in p for p in parts):
        text += " (* = no lr met the target; the rule's fallback, see results.json lr_choice)"
    if any("~" in p for p in parts):
        text += " (~ = near the edge: a mean within the margin or its interval of a threshold)"
    return text

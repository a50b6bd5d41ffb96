"""K edited variants evaluated in one batched pass (``evaluate_task_variants``) against K ``evaluate_task`` calls,
each under ``deltas.variant(k)``: the format + MCQ evaluation of a sweep batch (``ModelSession.execute_batch``); and
the latent probes' features the same way (``probe_features_variants`` against K ``probe_features``; the probe fits,
per run either way, are not timed).

Setup as ``bench_sweep``'s grid: the CI organism (``organism:ci``, fp32), forget split first_16_unsplit, the
sweep's localizations of 4 methods (flu, atp, random, all_mlps) x 2 lrs = K=8 runs, trained together by
``edit_batched`` (``--steps``, default 5; not timed), every format of the task (``formats: all``), eval batch size
64. One torch thread; ``--pairs`` interleaved (K single, batched) pairs timed in thread CPU time (time descheduled
on a shared machine is not counted) and wall time; the medians and the median per-pair ratio single / batched are
written to ``benchmarks/results/<device>/bench_eval_variants.json`` with the CPU or GPU name.

Measured (benchmarks/results/CPU/bench_eval_variants.json, AMD EPYC, 2 shared cores, 1 thread, 7 pairs, CPU time):
formats (301 prompts per variant in 6 formats x 2 splits) K single 0.72 s, batched 0.64 s, 1.12x; probe features
(123 prompts per variant, 2 sets) K single 0.26 s, batched 0.27 s, 0.93x. Rows per forward are the same in both
forms (64: 8 prompts x 8 variants in the batched pass); our reading (not profiled): the batched pass gains where a
set is smaller than a batch (most of the formats' 12 sets: one forward instead of 8) and loses a little where the
per-run forwards are already full (the probes' 107 maintain prompts; a whole-weight mask costs one GEMM per group). Formats at ``--batch-size 512`` (64 prompts x
8; 3 pairs, not stored): 1.23x.

Run: ``python benchmarks/bench_eval_variants.py [--pairs 5] [--steps 5] [--batch-size 64]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, context, device_slug  # noqa: E402

METHODS = ("flu", "atp", "random", "all_mlps")
LRS = (3e-3, 1e-2)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def organism_batch(steps: int, device: str, evaluations: dict) -> tuple:
    """``(runs, model, tokenizer, task, deltas)``: the K = 8 sweep runs (METHODS x LRS, seed 0) on the CI organism,
    localized as the sweep does and edited together (``edit_batched``) for ``steps`` steps."""
    from mu_fast import sweep
    from mu_fast.edit.batched import edit_batched
    from mu_fast.edit.loop import EditConfig
    from mu_fast.sweep.session import ModelSession

    spec = {"name": "bench_variants", "models": ["organism:ci"],
            "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"],
                       "inject_labels": ["random_without_golf"]}],
            "methods": list(METHODS), "edit": {"preset": "default", "steps": steps, "lr": list(LRS)}, "seeds": [0],
            "evaluations": evaluations}
    runs = sweep.expand(spec)
    session = ModelSession(runs[0].model, device)
    model, tokenizer = session.model, session.tokenizer
    task = session.task(runs[0].task)
    masks = [session.localization(run, task)[0].mask for run in runs]
    configs = [EditConfig(**{**run.edit, "betas": tuple(run.edit["betas"])}) for run in runs]
    return runs, model, tokenizer, task, edit_batched(model, tokenizer, task, masks, configs).deltas


def timed(fn) -> tuple:
    """``(fn(), thread CPU seconds, wall seconds)``, synchronizing CUDA around it."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    cpu, wall = time.thread_time(), time.perf_counter()
    result = fn()
    sync()
    return result, time.thread_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from mu_fast.evaluate import evaluate_task, evaluate_task_variants, task_prompt_sets
    from mu_fast.evaluate.probes import probe_features, probe_features_variants

    runs, model, tokenizer, task, deltas = organism_batch(
        args.steps, args.device, {"formats": "all", "batch_size": args.batch_size, "relearn": False, "probes": False})
    formats, batch_size = runs[0].evaluations["formats"], runs[0].evaluations["batch_size"]

    def single() -> list:
        out = []
        for k in range(len(deltas)):
            with deltas.variant(k):
                out.append(evaluate_task(model, tokenizer, task, formats=formats, batch_size=batch_size))
        return out

    def batched() -> list:
        return evaluate_task_variants(model, tokenizer, task, deltas, formats=formats, batch_size=batch_size)

    def probes_single() -> list:
        out = []
        for k in range(len(deltas)):
            with deltas.variant(k):
                out.append(probe_features(model, tokenizer, task, batch_size=batch_size))
        return out

    def probes_batched() -> list:
        return probe_features_variants(model, tokenizer, task, deltas, batch_size=batch_size)

    worst = 0.0  # the two forms agree (fp32: float summation order only)
    a, b = single(), batched()  # warm-up, and the check
    for x, y in zip(a, b, strict=True):
        for fmt in x:
            for split in x[fmt]:
                worst = max(worst, abs(x[fmt][split]["acc"] - y[fmt][split]["acc"]))
    probes_single(), probes_batched()  # warm-up
    rows: dict[str, list[float]] = {f"{name}_{clock}": [] for name in ("single", "batched", "probes_single",
                                                                       "probes_batched") for clock in ("cpu", "wall")}
    for _ in range(args.pairs):
        for name, fn in (("single", single), ("batched", batched), ("probes_single", probes_single),
                         ("probes_batched", probes_batched)):
            _, cpu, wall = timed(fn)
            rows[f"{name}_cpu"].append(cpu)
            rows[f"{name}_wall"].append(wall)
    ratios = [s / b for s, b in zip(rows["single_cpu"], rows["batched_cpu"], strict=True)]
    probe_ratios = [s / b for s, b in zip(rows["probes_single_cpu"], rows["probes_batched_cpu"], strict=True)]
    prompts = sum(len(ps) for ps in task_prompt_sets(task, formats).values())
    result = {
        "context": context(), "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
        "device": str(model.device), "K": len(deltas), "methods": list(METHODS), "lrs": list(LRS),
        "formats": sorted({f for f in a[0]}), "prompts_per_variant": prompts, "batch_size": batch_size,
        "edit_steps": args.steps, "pairs": args.pairs, "max_abs_acc_difference": worst,
        **{f"median_{k}_s": statistics.median(v) for k, v in rows.items()}, "raw": rows,
        "speedup_single_over_batched_cpu_time": statistics.median(ratios),
        "probe_prompts_per_variant": len(task.maintain_train) + len(task.forget_test),
        "probe_features_speedup_single_over_batched_cpu_time": statistics.median(probe_ratios),
    }
    out = RESULTS / device_slug() / "bench_eval_variants.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw", "context")}, indent=1))


if __name__ == "__main__":
    main()

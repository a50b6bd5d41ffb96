"""Runs per hour: the sweep engine against the naive way (one CLI process chain per run), side by side, same work.

The grid: the CI organism (``organism:ci``), forget split first_16_unsplit edited to a random other sport,
localizations flu / atp / random / all_mlps x lr 1e-3 / 3e-3 / 1e-2 / 3e-2 (16 runs), seed 0, ``--steps`` edit steps (default 20), every
other edit setting at its EditConfig default (what ``mu-fast edit`` trains with), every evaluation format, and with
``--relearn`` / ``--probes`` the relearning attack and latent probes at their defaults (what ``mu-fast evaluate
--relearn --probes`` runs).

* sweep: one process (``python -c "mu_fast.sweep.run(spec)"``, local executor), timed from process start to exit:
  imports, one model load, cached localizations and tasks, masked restore between runs.
* batched (``--batch K``, default 16: the whole grid in one batch): the same process with ``batch=K``: the runs'
  edits trained together over the frozen model (``mu_fast.sweep.batches``, ``mu_fast.edit.batched``), then each run's
  evaluations on its own variant.
* naive: per run, three processes as a user would chain them: ``mu-fast localize organism:ci --method M --out MASK``,
  ``mu-fast edit organism:ci --mask MASK --steps S --lr LR --preset default --dtype fp32 --out DELTA`` (the
  sweep's preset: on the organism ``edit`` defaults to ``organism``, whose other settings differ) and ``mu-fast evaluate
  organism:ci --delta DELTA [--relearn] [--probes] --out JSON``.
What differs, besides the process structure: ``mu-fast edit`` and ``evaluate`` also check that the model knows the
facts (one evaluation pass each); ``evaluate`` applies a saved delta instead of keeping the edited weights in memory;
the sweep also stores provenance per run. Both run with one torch thread (``OMP_NUM_THREADS=1``; the machine is
shared). The forget accuracies of both are printed side by side as a check that they did the same edits.

Run:  python benchmarks/bench_sweep.py [--steps 20] [--relearn] [--probes] [--naive-runs N]
(``--naive-runs N``: time N chains spread evenly over the grid; runs/hour is then N / their time.)
Writes benchmarks/results/<device>/bench_sweep_steps<S>[_relearn][_probes].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, context, device_slug  # noqa: E402

METHODS = ("flu", "atp", "random", "all_mlps")
LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def spec(steps: int, relearn: bool, probes: bool, store: Path) -> dict:
    return {
        "name": "bench_sweep", "models": ["organism:ci"],
        "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"], "inject_labels": ["random_without_golf"]}],
        "methods": list(METHODS), "edit": {"preset": "default", "steps": steps, "lr": list(LRS)}, "seeds": [0],
        "evaluations": {"formats": "all", "batch_size": 64, "relearn": relearn, "probes": probes}, "store": str(store),
    }


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return env


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def run_sweep(sweep_spec: dict, env: dict[str, str], batch: int = 1) -> float:
    code = ("import json, sys, torch; torch.set_num_threads(1); import mu_fast.sweep as s; "
            f"r = s.run(json.loads(sys.argv[1]), progress=False, threads=1, batch={batch}); "
            "assert r.failed == 0, [x.get('error') for x in r.records]")
    return timed([sys.executable, "-c", code, json.dumps(sweep_spec)], env)


def run_naive(work: Path, n_runs: int, steps: int, relearn: bool, probes: bool, env: dict[str, str]) -> tuple[float, dict]:
    cli = [sys.executable, "-m", "mu_fast.cli"]
    total, accs = 0.0, {}
    grid = [(method, lr) for method in METHODS for lr in LRS]
    chosen = [grid[round(i * len(grid) / n_runs)] for i in range(n_runs)] if n_runs < len(grid) else grid
    for method, lr in chosen:
        tag = f"{method}_{lr:g}"
        total += timed([*cli, "localize", "organism:ci", "--method", method, "--out", str(work / tag / "mask")], env)
        total += timed([*cli, "edit", "organism:ci", "--mask", str(work / tag / "mask"), "--steps", str(steps),
                        "--lr", str(lr), "--preset", "default", "--dtype", "fp32", "--out", str(work / tag / "delta")], env)
        extra = (["--relearn"] if relearn else []) + (["--probes"] if probes else [])
        total += timed([*cli, "evaluate", "organism:ci", "--delta", str(work / tag / "delta"), *extra,
                        "--out", str(work / tag / "eval.json")], env)
        accs[tag] = json.loads((work / tag / "eval.json").read_text())["formats"]["normal"]["forget"]["acc"]
    return total, accs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--relearn", action="store_true")
    parser.add_argument("--probes", action="store_true")
    parser.add_argument("--naive-runs", type=int, default=len(METHODS) * len(LRS))
    parser.add_argument("--batch", type=int, default=len(METHODS) * len(LRS))
    args = parser.parse_args()
    env = environment()
    import mu_fast.sweep as sweep

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        store = work / "sweep.jsonl"
        sweep_spec = spec(args.steps, args.relearn, args.probes, store)
        runs = sweep.expand(sweep_spec)
        # Train / cache the organism once, outside both timings.
        subprocess.run([sys.executable, "-c", "import mu_fast.models.loading as m; m.load_model('organism:ci')"],
                       env=env, check=True, capture_output=True)
        sweep_seconds = run_sweep(sweep_spec, env)
        records = {(r["config"]["method"], r["config"]["edit"]["lr"]): r for r in sweep.load_results(store)}
        batched_store = work / "batched.jsonl"
        batched_seconds = run_sweep({**sweep_spec, "store": str(batched_store)}, env, args.batch)
        batched = {(r["config"]["method"], r["config"]["edit"]["lr"]): r for r in sweep.load_results(batched_store)}
        naive_seconds, naive_accs = run_naive(work, args.naive_runs, args.steps, args.relearn, args.probes, env)
    sweep_rate = len(runs) / sweep_seconds * 3600
    naive_rate = len(naive_accs) / naive_seconds * 3600
    checks = {}
    for tag, acc in naive_accs.items():
        method, lr = tag.rsplit("_", 1)
        sweep_acc = records[(method, float(lr))]["results"]["evals"]["normal"]["forget"]["acc"]
        checks[tag] = {"naive_forget_acc": acc, "sweep_forget_acc": sweep_acc,
                       "batched_forget_acc": batched[(method, float(lr))]["results"]["evals"]["normal"]["forget"]["acc"]}
    result = {
        "context": context(),
        "settings": {"model": "organism:ci", "methods": METHODS, "lrs": LRS, "steps": args.steps,
                     "relearn": args.relearn, "probes": args.probes, "threads": 1},
        "sweep": {"runs": len(runs), "seconds": sweep_seconds, "runs_per_hour": sweep_rate},
        "naive": {"runs": len(naive_accs), "seconds": naive_seconds, "runs_per_hour": naive_rate},
        "batched": {"runs": len(runs), "batch": args.batch, "seconds": batched_seconds,
                    "runs_per_hour": len(runs) / batched_seconds * 3600},
        "ratio": sweep_rate / naive_rate,
        "batched_vs_naive": len(runs) / batched_seconds * 3600 / naive_rate,
        "batched_vs_sweep": sweep_seconds / batched_seconds,
        "same_work_check": checks,
    }
    print(f"sweep engine: {len(runs)} runs in {sweep_seconds:.1f} s = {sweep_rate:,.0f} runs/hour")
    print(f"naive chain:  {len(naive_accs)} runs in {naive_seconds:.1f} s = {naive_rate:,.0f} runs/hour")
    print(f"batched (K={args.batch}): {len(runs)} runs in {batched_seconds:.1f} s = "
          f"{len(runs) / batched_seconds * 3600:,.0f} runs/hour")
    print(f"ratio: {sweep_rate / naive_rate:.1f}x, batched {result['batched_vs_naive']:.1f}x the naive chain and "
          f"{result['batched_vs_sweep']:.2f}x the unbatched engine (steps {args.steps}, relearn {args.relearn}, "
          f"probes {args.probes})")
    for tag, c in checks.items():
        print(f"  {tag:16s} forget acc naive {c['naive_forget_acc']:.4f}  sweep {c['sweep_forget_acc']:.4f}  "
              f"batched {c['batched_forget_acc']:.4f}")
    suffix = f"_steps{args.steps}" + ("_relearn" if args.relearn else "") + ("_probes" if args.probes else "")
    out = RESULTS / device_slug() / f"bench_sweep{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

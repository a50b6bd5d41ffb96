"""Where a sweep run's time goes on this CPU, and the fastest a sweep of them could possibly be.

The K-runs issue assumed the organism's edit step is ~0.4 GFLOP, so most of a run would be launch and Python
overhead that training K runs in one pass could remove. This script measures it, on bench_sweep's grid (the CI
organism, forget split first_16_unsplit, ``--preset default``: 16 forget + 64 maintain prompts and 64 LM texts per
step), one torch thread, fp32:

* per method: the FLOPs of one edit step (``torch.utils.flop_counter.FlopCounterMode``: matmuls and attention,
  forward and backward), its median wall time over ``--steps`` steps, hence the achieved GFLOP/s;
* the share of one step spent in ``aten::mm`` (``torch.profiler``) and the fp32 GEMM rate of this core at the
  step's shapes (``[tokens, 64] x [64, 256]`` and friends) and at 1024^3 (the peak);
* the floor: the FLOPs of bench_sweep's 16 runs x 20 steps at that peak, plus the measured model load, against the
  naive chain's measured time (``benchmarks/results/<device>/bench_sweep_steps20.json``): the largest ratio any
  implementation of the same arithmetic could reach on this CPU. Batching K runs over one frozen model keeps every
  FLOP (each run's rows still pass through every layer above its mask), so it cannot beat that floor here.

Run: ``python benchmarks/step_anatomy.py [--steps 6]``. Writes benchmarks/results/<device>/step_anatomy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.bench_sweep import LRS, METHODS, spec  # noqa: E402
from benchmarks.common import RESULTS, context, device_slug  # noqa: E402

GEMM_SHAPES = [(2048, 64, 256), (2048, 256, 64), (2048, 64, 64), (2048, 64, 486), (1024, 1024, 1024)]


def gemm_rate(m: int, k: int, n: int, reps: int = 50) -> float:
    """GFLOP/s of an fp32 ``[m, k] @ [k, n]`` on this thread (median of 5 timings of ``reps`` products)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        times.append((time.perf_counter() - t) / reps)
    return 2 * m * k * n / statistics.median(times) / 1e9


@contextmanager
def watched_steps(record: dict):
    """Time every ``EditStep.step``; count the FLOPs of the third and profile the fourth (each run once more)."""
    import mu_fast.edit.loop as loop
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    plain = loop.EditStep.step

    def step(self, *args, **kwargs):
        t = time.perf_counter()
        out = plain(self, *args, **kwargs)
        record.setdefault("seconds", []).append(time.perf_counter() - t)
        n = len(record["seconds"])
        if n == 3:
            with FlopCounterMode(display=False) as counter:
                plain(self, *args, **kwargs)
            record["flops"] = counter.get_total_flops()
        elif n == 4:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                plain(self, *args, **kwargs)
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events)
            mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
            record["mm_share"] = mm / total
        return out

    loop.EditStep.step = step
    try:
        yield
    finally:
        loop.EditStep.step = plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="edit steps per method (at least 5)")
    args = parser.parse_args()
    if args.steps < 5:
        parser.error("--steps must be at least 5 (steps 3 and 4 are counted and profiled)")
    torch.set_num_threads(1)
    import mu_fast.sweep as sweep
    from mu_fast.provenance import cpu_identity

    t = time.perf_counter()
    from mu_fast.models.loading import load_model

    load_model("organism:ci")
    load_seconds = time.perf_counter() - t
    methods = {}
    for method in METHODS:
        record: dict = {}
        with tempfile.TemporaryDirectory() as tmp, watched_steps(record):
            one = spec(args.steps, False, False, Path(tmp) / "runs.jsonl")
            one["methods"], one["edit"]["lr"] = [method], [LRS[2]]
            result = sweep.run(one, progress=False, threads=1, batch=1)
            assert result.failed == 0
        timed = [s for i, s in enumerate(record["seconds"]) if i not in (0, 2, 3)]  # first step: warm-up
        seconds = statistics.median(timed)
        methods[method] = {"flops_per_step": record["flops"], "seconds_per_step": seconds,
                           "gflops_per_second": record["flops"] / seconds / 1e9, "mm_share": record["mm_share"]}
        print(f"{method:9s} {record['flops'] / 1e9:5.2f} GFLOP/step  {seconds * 1e3:6.1f} ms/step  "
              f"{record['flops'] / seconds / 1e9:5.1f} GFLOP/s  matmuls {100 * record['mm_share']:.0f}% of the step")
    rates = {f"{m}x{k}x{n}": gemm_rate(m, k, n) for m, k, n in GEMM_SHAPES}
    peak = max(rates.values())
    print("fp32 GEMM GFLOP/s on this thread: " + ", ".join(f"{s} {r:.0f}" for s, r in rates.items()))
    floor = {}
    bench = RESULTS / device_slug() / "bench_sweep_steps20.json"
    if bench.exists():
        measured = json.loads(bench.read_text())
        flops = sum(m["flops_per_step"] for m in methods.values()) * len(LRS) * 20  # 16 runs x 20 steps
        best = load_seconds + flops / (peak * 1e9)
        floor = {"bench_sweep": str(bench.relative_to(REPO)), "grid_flops": flops, "load_seconds": load_seconds,
                 "floor_seconds": best, "naive_seconds": measured["naive"]["seconds"],
                 "sweep_seconds": measured["sweep"]["seconds"], "max_ratio_vs_naive": measured["naive"]["seconds"] / best,
                 "measured_ratio_vs_naive": measured["ratio"]}
        print(f"bench_sweep's 16 runs x 20 steps: {flops / 1e9:.0f} GFLOP of edit steps; at the {peak:.0f} GFLOP/s "
              f"peak plus the {load_seconds:.1f} s load that is {best:.1f} s at best, against the naive chain's "
              f"{measured['naive']['seconds']:.0f} s: at most {floor['max_ratio_vs_naive']:.1f}x (the engine "
              f"measured {measured['ratio']:.1f}x), evaluations left out")
    out = RESULTS / device_slug() / "step_anatomy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"context": context(), "cpu": cpu_identity(), "threads": 1, "steps": args.steps,
                               "lr": LRS[2], "methods": methods, "gemm_gflops": rates, "floor": floor}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""K relearning attacks trained together (``relearn_attack_variants``: K LoRA adapters over one frozen model, one
forward/backward per step for all K) against K ``relearn_attack`` calls, each under ``deltas.variant(k)``: the
relearning of a sweep batch (``ModelSession.execute_batch``).

Setup as ``bench_eval_variants``: the CI organism (``organism:ci``, fp32), forget split first_16_unsplit, the
sweep's localizations of 4 methods (flu, atp, random, all_mlps) x 2 lrs = K=8 runs, trained together by
``edit_batched`` (``--steps``, default 5; not timed); the organism's relearning settings
(``mu_fast.sweep.one_run.ORGANISM_RUN_OPTIONS``: 20 steps, lr 1e-3, rank 16, the rest ``relearn_attack``'s defaults,
scored at steps 0, 10, 20), run seeds 0..K-1. One torch thread; ``--pairs`` interleaved (K single, batched) pairs
timed in thread CPU time (time descheduled on a shared machine is not counted) and wall time; the medians and the
median per-pair ratio single / batched are written to ``benchmarks/results/<device>/bench_relearn_variants.json``
with the CPU or GPU name, and the largest difference of any loss or accuracy between the two forms.

Run: ``python benchmarks/bench_relearn_variants.py [--pairs 3] [--steps 5] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_eval_variants import LRS, METHODS, cpu_model, organism_batch, timed  # noqa: E402
from benchmarks.common import RESULTS, context, device_slug  # noqa: E402


def largest_difference(a: list[dict], b: list[dict]) -> float:
    """Largest |difference| of any loss or non-count evaluation number between two lists of attack results."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for p, q in zip(x["losses"], y["losses"], strict=True):
            worst = max([worst] + [abs(p[k] - q[k]) for k in p if p[k] == p[k]])
        for step, sets in x["evals"].items():
            for what, metrics in sets.items():
                for key, value in metrics.items():
                    if isinstance(value, float):
                        worst = max(worst, abs(value - y["evals"][step][what][key]))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from mu_fast.evaluate import relearn_attack, relearn_attack_variants
    from mu_fast.sweep.one_run import ORGANISM_RUN_OPTIONS

    _, model, tokenizer, task, deltas = organism_batch(
        args.steps, args.device, {"formats": ["normal"], "batch_size": 64, "relearn": False, "probes": False})
    relearn = dict(ORGANISM_RUN_OPTIONS.evaluations()["relearn"])
    steps = relearn["steps"]
    settings = {**relearn, "eval_at": tuple(sorted({0, steps // 2, steps})), "eval_batch_size": 64}
    seeds = list(range(len(deltas)))

    def single() -> list:
        out = []
        for k, seed in enumerate(seeds):
            with deltas.variant(k):
                out.append(relearn_attack(model, tokenizer, task, seed=seed, **settings))
        return out

    def batched() -> list:
        return relearn_attack_variants(model, tokenizer, task, deltas, seeds, **settings)

    worst = largest_difference(single(), batched())  # warm-up, and the check (fp32: summation order only)
    rows: dict[str, list[float]] = {f"{name}_{clock}": [] for name in ("single", "batched")
                                    for clock in ("cpu", "wall")}
    for _ in range(args.pairs):
        for name, fn in (("single", single), ("batched", batched)):
            _, cpu, wall = timed(fn)
            rows[f"{name}_cpu"].append(cpu)
            rows[f"{name}_wall"].append(wall)
            print(name, f"cpu {cpu:.2f} s, wall {wall:.2f} s", flush=True)
    ratios = [s / b for s, b in zip(rows["single_cpu"], rows["batched_cpu"], strict=True)]
    result = {
        "context": context(), "cpu_model": cpu_model(), "torch_threads": torch.get_num_threads(),
        "device": str(model.device), "K": len(deltas), "methods": list(METHODS), "lrs": list(LRS),
        "relearn_settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()},
        "seeds": seeds, "edit_steps": args.steps, "pairs": args.pairs, "max_abs_difference": worst,
        **{f"median_{k}_s": statistics.median(v) for k, v in rows.items()}, "raw": rows,
        "speedup_single_over_batched_cpu_time": statistics.median(ratios),
    }
    out = RESULTS / device_slug() / "bench_relearn_variants.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("raw", "context")}, indent=1))


if __name__ == "__main__":
    main()

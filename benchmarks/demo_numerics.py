"""How much the demo's numbers depend on the CPU's kernels and threads, next to how much they depend on the seed.

Runs ``mu-fast demo`` (the shipped organism, the committed learning-rate choice) once per setting: portable or
native kernels × 1 torch thread in 2 worker processes or 2 torch threads in one process. Then compares every
seed's every number between settings (the numerics spread: what differs between CPUs, by proxy on one CPU),
checks that the printed tables are identical, and puts the spread next to the seed standard deviations. Writes
``benchmarks/results/CPU/demo_numerics.json``.

    python benchmarks/demo_numerics.py                 # about 4 demo runs: 15-25 minutes on 2 idle cores
    python benchmarks/demo_numerics.py --compare-only  # only the comparison of runs already in --work
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "portable_1thread_2workers": ["--portable-kernels", "--workers", "2", "--threads", "1"],
    "native_1thread_2workers": ["--native-kernels", "--workers", "2", "--threads", "1"],
    "native_2threads_1process": ["--native-kernels", "--workers", "1", "--threads", "2"],
    "portable_2threads_1process": ["--portable-kernels", "--workers", "1", "--threads", "2"],
}


def table_of(output: str) -> str:
    """The printed table: from its title line to the line before the legend."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("organism (demo)"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("Columns") or not lines[i].strip())
    return "\n".join(lines[start:end])


def per_seed(results: dict) -> dict[str, float]:
    """Every number of every seed's summary, keyed ``method/seed/metric`` (timings left out)."""
    out = {}
    for method, agg in results["methods"].items():
        for seed, run in agg["runs"].items():
            for key, value in run["summary"].items():
                if isinstance(value, (int, float)) and key != "seconds":
                    out[f"{method}/{seed}/{key}"] = float(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mu_fast_demo_numerics"))
    parser.add_argument("--compare-only", action="store_true")
    args = parser.parse_args()
    runs = {}
    for name, flags in SETTINGS.items():
        out = args.work / name
        log = args.work / f"{name}.log"
        if not args.compare_only:
            out.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            done = subprocess.run([str(Path(sys.executable).with_name("mu-fast")), "demo", "--out", str(out), "--fresh",
                                   *flags], cwd=REPO, capture_output=True, text=True)
            log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
            if done.returncode:
                raise SystemExit(f"{name} failed; see {log}")
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        results = json.loads((out / "results.json").read_text())
        runs[name] = {"table": table_of(log.read_text()), "numbers": per_seed(results),
                      "host": results["provenance"]["host"], "seconds": results.get("seconds"),
                      "stds": results["summary_std"]}
    base_name = next(iter(runs))
    base = runs[base_name]
    diffs = {}
    for name, run in runs.items():
        common = set(base["numbers"]) & set(run["numbers"])
        worst = max(common, key=lambda k: abs(base["numbers"][k] - run["numbers"][k]))
        diffs[name] = {"same_table": run["table"] == base["table"], "max_abs_diff": abs(base["numbers"][worst] -
                       run["numbers"][worst]), "where": worst, "n_numbers": len(common)}
    seed_stds = [v for stds in base["stds"].values() for k, v in stds.items()
                 if isinstance(v, (int, float)) and k not in ("seconds", "trainable_params") and math.isfinite(v)]
    report = {"reference": base_name, "settings": {k: SETTINGS[k] for k in runs}, "vs_reference": diffs,
              "seed_std": {"min": min(seed_stds), "median": sorted(seed_stds)[len(seed_stds) // 2],
                           "max": max(seed_stds)},
              "hosts": {k: {"processor": r["host"].get("processor"), "cpu_capability": r["host"].get("cpu_capability"),
                            "torch_threads": r["host"].get("torch_threads"), "kernel_env": r["host"].get("kernel_env")}
                        for k, r in runs.items()},
              "table": base["table"], "date": time.strftime("%Y-%m-%d")}
    from mu_fast.provenance import provenance_block

    report["provenance"] = provenance_block()
    path = REPO / "benchmarks" / "results" / "CPU" / "demo_numerics.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    for name, d in diffs.items():
        print(f"{name}: same table {d['same_table']}, max |difference| {d['max_abs_diff']:.2e} ({d['where']})")
    print(f"seed std of the table's numbers: {report['seed_std']}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()

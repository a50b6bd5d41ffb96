"""Print ratio tables from the pytest-benchmark JSON files under benchmarks/results/<device>/.

Convention shared by every suite: each benchmark sets ``benchmark.group`` (one workload) and
``benchmark.extra_info`` with ``impl`` (what ran), ``role`` ("ours" | "peer" | "roofline") and any physics
(``gbps``, ``pct_roofline``, ``tflops``, ``pct_6n``, ``peak_mb``, ``state_bytes``). Within a group the table
shows each implementation's median time and its speed relative to the fastest peer ("× best peer" > 1 means
faster than that peer).

Usage: python benchmarks/print_tables.py [results_dir] [--device SUBSTRING]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PHYSICS = ("gbps", "pct_roofline", "tflops", "pct_6n", "tokens_per_s", "peak_mb", "state_mb")


def load(results: Path, device_filter: str | None) -> list[tuple[str, str, dict]]:
    rows = []
    for path in sorted(results.glob("*/*.json")):
        data = json.loads(path.read_text())
        device = path.parent.name
        if device_filter and device_filter.lower() not in device.lower():
            continue
        for bench in data.get("benchmarks", []):
            rows.append((device, path.stem, bench))
    return rows


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="?", default=str(RESULTS))
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    rows = load(Path(args.results), args.device)
    if not rows:
        print(f"no benchmark results under {args.results}; run `make bench` (or a suite with --benchmark-json)")
        return
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for device, suite, bench in rows:
        groups[(device, suite, bench.get("group") or bench["name"])].append(bench)
    for (device, suite, group), benches in groups.items():
        peers = [b for b in benches if b.get("extra_info", {}).get("role") == "peer"]
        best_peer = min(peers, key=lambda b: b["stats"]["median"]) if peers else None
        print(f"\n[{device}] {suite} :: {group}")
        header = f"  {'impl':<52} {'median':>10} {'× best peer':>12}  physics"
        print(header)
        print("  " + "-" * (len(header) + 20))
        for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
            info = bench.get("extra_info", {})
            median = bench["stats"]["median"]
            ratio = best_peer["stats"]["median"] / median if best_peer else float("nan")
            physics = ", ".join(f"{k}={info[k]:.3g}" if isinstance(info[k], float) else f"{k}={info[k]}" for k in PHYSICS if k in info)
            name = info.get("impl", bench["name"])
            role = info.get("role", "?")
            print(f"  {name[:44]:<44} ({role:<4}) {fmt_time(median):>10} {ratio:>11.2f}×  {physics}")


if __name__ == "__main__":
    main()

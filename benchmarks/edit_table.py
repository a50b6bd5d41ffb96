"""The edit benchmark's table: mu_fast against the authors' recipe per (model, localization), with memory.

    python benchmarks/edit_table.py ROWS.jsonl|bench_edit*.json ...     print the table
    python benchmarks/edit_table.py --merge OUT.json A.json B.json ...  merge pytest-benchmark JSONs (one per model)

The speed ratio divides the authors' median seconds per step (bf16, same model and localization, same run) by
mu_fast's; ``edit_s`` is mu_fast's measured whole edit (MU_FAST_EDIT_STEPS steps); the authors' 50-step time is
not measured (``s/step × 50`` would be an extrapolation, so it is not printed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows_of(path: Path) -> list[dict]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return [b["extra_info"] for b in json.loads(text).get("benchmarks", [])]


def merge(out: Path, inputs: list[Path]) -> None:
    merged: dict | None = None
    for path in inputs:
        if not path.exists() or not path.stat().st_size:
            continue
        data = json.loads(path.read_text())
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
    if merged is not None:
        out.write_text(json.dumps(merged, indent=1))
        print(f"merged {len(merged['benchmarks'])} rows into {out}")


def gb(value: float | None) -> str:
    return "—" if value is None else f"{value * 2**20 / 1e9:.1f}"


def table(rows: list[dict]) -> str:
    authors = {(r["model"], r["method"]): r["s_per_step"] for r in rows if r.get("recipe") == "authors"}
    lines = [f"{'model':<12} {'loc':<7} {'frozen':<6} {'recipe':<8} {'s/step':>8} {'edit s':>8} {'peak GB':>8} "
             f"{'plan GB':>8} {'peak/plan':>9} {'× authors':>9}  settings"]
    for r in sorted(rows, key=lambda r: (r["model"], r["method"], r["recipe"] != "mu_fast", r["frozen"])):
        ref = authors.get((r["model"], r["method"]))
        ratio = f"{ref / r['s_per_step']:.1f}×" if ref and r["recipe"] == "mu_fast" else ""
        plan = r.get("plan_bytes")
        settings = r.get("settings") or {}
        short = ", ".join(f"{k}={v}" for k, v in settings.items() if v not in (None, False) and k != "optimizer")
        lines.append(
            f"{r['model']:<12} {r['method']:<7} {r['frozen']:<6} {r['recipe']:<8} {r['s_per_step']:>8.3f} "
            f"{'' if r.get('edit_s') is None else format(r['edit_s'], '.1f'):>8} {gb(r.get('peak_mb')):>8} "
            f"{'—' if plan is None else format(plan / 1e9, '.1f'):>8} "
            f"{'' if r.get('peak_vs_plan') is None else format(r['peak_vs_plan'], '.2f'):>9} {ratio:>9}  {short}"
        )
    if rows:
        lines.append(f"device {rows[0].get('device')}, torch {rows[0].get('torch')}, commit {rows[0].get('commit')}, "
                     f"steps: mu_fast FLU {max((r['steps'] for r in rows if r['recipe'] == 'mu_fast'), default=0)}, "
                     f"authors {max((r['steps'] for r in rows if r['recipe'] == 'authors'), default=0)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--merge", type=Path, default=None, help="write the merged pytest-benchmark JSON here")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.paths)
        return
    rows = [row for path in args.paths if path.exists() for row in rows_of(path)]
    print(table(rows) if rows else "no edit benchmark rows")


if __name__ == "__main__":
    main()

"""How each method's answer in the demo moves between its chosen learning rate and the grid's neighbours.

The lr rule (``mu_fast.organism.lr_choice``) picks one rate per method from ``LR_GRID``; a method's robustness
numbers could owe more to that pick than to its localization. This runs the demo's whole comparison (the shipped
organism, first_64, every evaluation, the demo's seeds) at each method's next-lower and next-higher grid rate and
writes, per method and rate, the mean ± std of the table's numbers over the seeds next to the chosen rate's (read
from a finished ``mu-fast demo`` report) to ``benchmarks/results/CPU/demo_lr_neighbours.json`` and a markdown
table beside it.

    mu-fast demo --out reports/demo && python benchmarks/demo_lr_neighbours.py --demo reports/demo
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
COLUMNS = ("forget_err", "maintain_acc", "mcq_forget_err", "relearn_acc", "probe_true_acc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", type=Path, default=REPO / "reports" / "demo", help="a finished mu-fast demo report")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mu_fast_lr_neighbours"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from mu_fast.organism import OrganismConfig, load_organism, organism_task
    from mu_fast.organism.lr_choice import LR_GRID
    from mu_fast.pipeline import ORGANISM_RUN_OPTIONS, compare_localizations
    from mu_fast.provenance import provenance_block
    from mu_fast.edit import EditConfig

    demo = json.loads((args.demo / "results.json").read_text())
    choice, seeds, methods = demo["lr_choice"], demo["seeds"], list(demo["methods"])
    org = load_organism(OrganismConfig.demo(), progress=False)
    task = organism_task(org.facts, forget_split=demo["task_info"]["forget_split"], inject_label="random_without_golf",
                         tokenizer=org.tokenizer)
    grid = list(LR_GRID)
    rows: dict[str, dict[str, dict]] = {m: {} for m in methods}
    for method in methods:
        chosen = choice["choices"][method]["lr"]
        agg = demo["methods"][method]
        rows[method][f"{chosen:g}"] = {"role": "chosen", "mean": {k: agg["summary"].get(k) for k in COLUMNS},
                                       "std": {k: agg["std"].get(k) for k in COLUMNS}}
    t0 = time.perf_counter()
    for side, step in (("lower", -1), ("higher", 1)):
        configs, chosen_lrs = {}, {}
        for method in methods:
            i = grid.index(choice["choices"][method]["lr"]) + step
            if 0 <= i < len(grid):
                configs[method] = EditConfig(**{**choice["base_edit"], "lr": grid[i]})
                chosen_lrs[method] = grid[i]
        if not configs:
            continue
        result = compare_localizations(org.model, org.tokenizer, task, list(configs), configs, ORGANISM_RUN_OPTIONS,
                                       out_dir=args.work / side, progress=True, seeds=seeds, workers=args.workers,
                                       show_table=False)
        for method, lr in chosen_lrs.items():
            agg = result["methods"][method]
            rows[method][f"{lr:g}"] = {"role": side, "mean": {k: agg["summary"].get(k) for k in COLUMNS},
                                       "std": {k: agg["std"].get(k) for k in COLUMNS}}
    out = {"seeds": seeds, "grid": grid, "columns": list(COLUMNS), "methods": rows,
           "seconds": time.perf_counter() - t0, "provenance": provenance_block()}
    path = REPO / "benchmarks" / "results" / "CPU" / "demo_lr_neighbours.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    lines = ["| method | lr | " + " | ".join(COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]
    for method, by_lr in rows.items():
        for lr, row in sorted(by_lr.items(), key=lambda kv: float(kv[0])):
            cells = []
            for k in COLUMNS:
                mean, std = row["mean"].get(k), row["std"].get(k)
                cells.append("—" if mean is None else f"{mean:.2f}±{std:.2f}" if std is not None else f"{mean:.2f}")
            mark = " (chosen)" if row["role"] == "chosen" else ""
            lines.append(f"| {method} | {lr}{mark} | " + " | ".join(cells) + " |")
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

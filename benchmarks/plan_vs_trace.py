"""The memory plan against a fake-tensor trace of the real edit step, for the paper's models and localizations.

    python benchmarks/plan_vs_trace.py                       # 3 models × FLU/AP/CT/random × bf16 (24 GB) / nf4 (12 GB)
    python benchmarks/plan_vs_trace.py --models gemma-2-9b --masks flu --frozen bf16 --layers 8

For each row the plan chooses settings for the budget (24 GB with bf16 frozen weights, 12 GB with nf4), then the
step those settings describe is traced on fake tensors (mu_fast.memory.trace) at the paper's batch. nf4 rows are
traced with bf16 frozen weights (bitsandbytes layers do not run on fake tensors) and the traced frozen-weight term
is replaced by the plan's nf4 bytes and dequantized weight: their ratio checks every other term.

Two checks per row: ``ratio`` = the plan's tensor bytes / the traced tensor peak (allocated bytes), and
``reserved_ratio`` = the plan's reserved bytes (its total without the stated cuBLAS workspace) / the reserved peak
that the trace's allocation sequence reaches in ``mu_fast.memory.allocator`` (torch's caching allocator, default
settings); ``reserved_min_bytes`` is the smallest capacity that sequence runs in (cached segments released on
demand, as torch does before it reports out of memory).

Writes JSON with provenance to benchmarks/results/CPU/plan_vs_trace.json (device "CPU trace": no device memory is
measured). Full depth takes 1-2.5 minutes per trace on 2 cores, about 30 minutes for the 20 rows. The record names
the commit it measured, so commit mu_fast/memory and mu_fast/edit first (the script refuses uncommitted changes
there unless --allow-dirty), then commit the JSON: tests/test_memory_results.py fails when the JSON is older than
the code it measures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, context  # noqa: E402
from mu_fast.masks import Mask  # noqa: E402
from mu_fast.memory import WORKSPACE_BYTES, BatchShape, plan  # noqa: E402
from mu_fast.memory.allocator import replay, smallest_capacity  # noqa: E402
from mu_fast.memory.trace import trace_peak  # noqa: E402
from mu_fast.models.sites import SiteTable  # noqa: E402

MODELS = {"gemma-2-9b": "gemma2-9b", "llama-3-8b": "llama3-8b", "gemma-7b": "gemma-7b"}
BUDGETS = {"bf16": "24GB", "nf4": "12GB"}
MEASURED = ("mu_fast/memory", "mu_fast/edit")  # the code a record measures (tests/test_memory_results.py)


def model_config(name: str, layers: int | None) -> Any:
    """The shipped config when ``mu_fast.models.shipped_config`` exists, else the same shapes from REAL_SHAPES
    (Gemma ties its embeddings, as the hub configs do)."""
    overrides = {} if layers is None else {"num_hidden_layers": layers}
    try:
        from mu_fast.models import shipped_config  # type: ignore[attr-defined]
    except ImportError:
        from mu_fast.models.tiny import REAL_SHAPES, make_config

        shapes = dict(REAL_SHAPES[MODELS[name]])
        arch = shapes.pop("arch")
        config = make_config(arch, **{"tie_word_embeddings": arch.startswith("gemma"), **shapes, **overrides})
        config._attn_implementation = None
        return config
    return shipped_config(name, **overrides)


def localization(name: str, method: str, config: Any) -> Mask:
    from mu_fast.localize.baselines import random_matrices
    from mu_fast.localize.paper_graphs import paper_localization, paper_localization_budget

    table = SiteTable(config)
    if method == "random":
        comps = random_matrices(table, paper_localization_budget(name, "sports"), seed=0)
    else:
        comps = paper_localization(name, "sports", method)
    comps = [c for c in comps if c.layer < table.n_layers]  # --layers cuts deeper components
    if not comps:
        raise ValueError(f"no {method} component of {name} lies in the first {table.n_layers} layers")
    return Mask.from_components(table, comps)


def row(name: str, method: str, frozen: str, layers: int | None) -> dict[str, Any]:
    config = model_config(name, layers)
    out: dict[str, Any] = {"model": name, "mask": method, "frozen": frozen, "budget": BUDGETS[frozen],
                           "layers": config.num_hidden_layers}
    try:
        mask = localization(name, method, config)
        out["trainable"] = mask.param_count()
        chosen = plan(config, mask, device_bytes=BUDGETS[frozen], frozen=frozen, batch=BatchShape())
    except ValueError as err:
        return {**out, "error": str(err)}
    start = time.perf_counter()
    traced = trace_peak(config, mask, chosen.edit_config(), batch=BatchShape(), events=True)
    seconds = time.perf_counter() - start
    allocator = replay(traced.events)
    # the analytic frozen terms in place of the traced bf16 ones (0 for bf16 rows)
    swap = chosen.breakdown["frozen_weights"] - traced.breakdown["frozen_weights"]
    swap += chosen.breakdown["workspace"] - WORKSPACE_BYTES
    peak, reserved = traced.peak + swap, allocator.peak_reserved + swap
    plan_reserved = chosen.total - WORKSPACE_BYTES
    return {**out, "settings": chosen.describe_settings(), "lm_chunk": chosen.lm_chunk,
            "plan_bytes": chosen.total, "plan_tensor_bytes": chosen.tensor_total, "trace_bytes": peak,
            "ratio": chosen.tensor_total / peak, "plan_reserved_bytes": plan_reserved, "reserved_bytes": reserved,
            "reserved_min_bytes": smallest_capacity(traced.events) + swap, "reserved_ratio": plan_reserved / reserved,
            "plan_phase": chosen.phase, "trace_phase": traced.phase, "plan_breakdown": chosen.breakdown,
            "trace_breakdown": traced.breakdown, "trace_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--masks", nargs="+", default=["flu", "ap", "ct", "random"], choices=["flu", "ap", "ct", "random"])
    parser.add_argument("--frozen", nargs="+", default=["bf16", "nf4"], choices=list(BUDGETS))
    parser.add_argument("--layers", type=int, default=None, help="cut every model to this many layers (quick runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "CPU" / "plan_vs_trace.json")
    parser.add_argument("--allow-dirty", action="store_true", help=f"run with uncommitted changes in {', '.join(MEASURED)}")
    args = parser.parse_args()
    dirty = uncommitted(MEASURED)
    if dirty and not args.allow_dirty:
        sys.exit(f"uncommitted changes in {', '.join(dirty)}: commit them first (the record names the commit it "
                 "measured), or pass --allow-dirty for a record that is not committed")
    rows = []
    print(f"{'model':11s} {'mask':6s} {'frozen':6s} {'plan GB':>8s} {'trace GB':>9s} {'ratio':>6s} {'reserved':>8s} "
          f"{'model':>6s} {'ratio':>6s} {'trace s':>7s}  settings")
    for name in args.models:
        for method in args.masks:
            for frozen in args.frozen:
                r = row(name, method, frozen, args.layers)
                rows.append(r)
                if "error" in r:
                    print(f"{name:11s} {method:6s} {frozen:6s} no plan: {r['error']}")
                else:
                    print(f"{name:11s} {method:6s} {frozen:6s} {r['plan_tensor_bytes'] / 1e9:8.2f} {r['trace_bytes'] / 1e9:9.2f} "
                          f"{r['ratio']:6.3f} {r['plan_reserved_bytes'] / 1e9:8.2f} {r['reserved_bytes'] / 1e9:6.2f} "
                          f"{r['reserved_ratio']:6.3f} {r['trace_seconds']:7.0f}  {r['settings']}", flush=True)
    info = {**context(), "device": "CPU trace (fake tensors; no device memory measured)", "measured": list(MEASURED),
            "dirty": dirty, "batch": BatchShape().__dict__, "workspace_bytes": WORKSPACE_BYTES,
            "note": "plan_tensor_bytes = plan total minus the stated workspace constant and the allocator term; "
            "plan_reserved_bytes = plan total minus the workspace constant; reserved_bytes = the trace's allocation "
            "sequence replayed through mu_fast.memory.allocator; nf4 rows trace bf16 frozen weights and substitute "
            "the plan's nf4 frozen bytes", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1, default=str) + "\n")
    print(f"for the README: {readme_summary(rows)}")
    print(f"wrote {args.out}: commit it (git add {args.out})")


def readme_summary(rows: list[dict[str, Any]]) -> str:
    """The README's sentence on a record (tests/test_memory_results.py checks the README quotes it)."""
    done = [r for r in rows if "error" not in r]
    if not done:
        return "no row planned"
    ratio, reserved = [r["ratio"] for r in done], [r.get("reserved_ratio", float("nan")) for r in done]
    return (f"plan / trace = {min(ratio):.3f}–{max(ratio):.3f}, plan reserved / allocator model = "
            f"{min(reserved):.3f}–{max(reserved):.3f} over {len(done)} rows")


def uncommitted(paths: tuple[str, ...]) -> list[str]:
    """The files under ``paths`` with uncommitted changes ([] outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=RESULTS.parent.parent,
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line[3:] for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


if __name__ == "__main__":
    main()

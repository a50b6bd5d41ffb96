"""The memory plan against a fake-tensor trace of the real edit step, for the paper's models and localizations.

    python benchmarks/plan_vs_trace.py                       # 3 models × FLU/AP/CT/random × bf16 (24 GB) / nf4 (12 GB)
    python benchmarks/plan_vs_trace.py --models gemma-2-9b --masks flu --frozen bf16 --layers 8

For each row the plan chooses settings for the budget (24 GB with bf16 frozen weights, 12 GB with nf4), then the
step those settings describe is traced on fake tensors (mu_fast.memory.trace) at the paper's batch. nf4 rows are
traced with bf16 frozen weights (bitsandbytes layers do not run on fake tensors) and the traced frozen-weight term
is replaced by the plan's nf4 bytes and dequantized weight: their ratio checks every other term. Writes JSON with
provenance to benchmarks/results/CPU/plan_vs_trace.json (device "CPU trace": no device memory is measured).
Full depth takes 1-2.5 minutes per trace on 2 cores.
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
from mu_fast.memory.trace import trace_peak  # noqa: E402
from mu_fast.models.sites import SiteTable  # noqa: E402

MODELS = {"gemma-2-9b": "gemma2-9b", "llama-3-8b": "llama3-8b", "gemma-7b": "gemma-7b"}
BUDGETS = {"bf16": "24GB", "nf4": "12GB"}


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
    traced = trace_peak(config, mask, chosen.edit_config(), batch=BatchShape())
    peak = traced.peak
    if frozen != "bf16":  # the analytic frozen terms in place of the traced bf16 ones
        peak += chosen.breakdown["frozen_weights"] - traced.breakdown["frozen_weights"]
        peak += chosen.breakdown["workspace"] - WORKSPACE_BYTES
    return {**out, "settings": chosen.describe_settings(), "plan_bytes": chosen.total, "plan_tensor_bytes":
            chosen.tensor_total, "trace_bytes": peak, "ratio": chosen.tensor_total / peak, "plan_phase": chosen.phase,
            "trace_phase": traced.phase, "plan_breakdown": chosen.breakdown, "trace_breakdown": traced.breakdown,
            "trace_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--masks", nargs="+", default=["flu", "ap", "ct", "random"], choices=["flu", "ap", "ct", "random"])
    parser.add_argument("--frozen", nargs="+", default=["bf16", "nf4"], choices=list(BUDGETS))
    parser.add_argument("--layers", type=int, default=None, help="cut every model to this many layers (quick runs)")
    parser.add_argument("--out", type=Path, default=RESULTS / "CPU" / "plan_vs_trace.json")
    args = parser.parse_args()
    rows = []
    print(f"{'model':11s} {'mask':6s} {'frozen':6s} {'plan GB':>8s} {'trace GB':>9s} {'ratio':>6s} {'trace s':>7s}  settings")
    for name in args.models:
        for method in args.masks:
            for frozen in args.frozen:
                r = row(name, method, frozen, args.layers)
                rows.append(r)
                if "error" in r:
                    print(f"{name:11s} {method:6s} {frozen:6s} no plan: {r['error']}")
                else:
                    print(f"{name:11s} {method:6s} {frozen:6s} {r['plan_tensor_bytes'] / 1e9:8.2f} {r['trace_bytes'] / 1e9:9.2f} "
                          f"{r['ratio']:6.3f} {r['trace_seconds']:7.0f}  {r['settings']}", flush=True)
    info = {**context(), "device": "CPU trace (fake tensors; no device memory measured)", "batch": BatchShape().__dict__,
            "workspace_bytes": WORKSPACE_BYTES, "note": "plan_tensor_bytes = plan total minus the stated workspace "
            "constant; nf4 rows trace bf16 frozen weights and substitute the plan's nf4 frozen bytes", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(info, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

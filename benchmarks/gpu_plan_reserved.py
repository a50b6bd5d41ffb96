"""The memory plan against the GPU's own allocator: peak reserved and allocated bytes of real edit steps, the budget
as a hard cap, and the caching-allocator model replayed on the real allocation sequence.

    python benchmarks/gpu_plan_reserved.py OUT.json [--rows gemma-2-9b:flu:bf16,gemma-2-9b:flu:nf4] [--steps 2]

Per row (random weights of a shipped config built on the GPU, the paper's sports localization, the paper's batch with
fact prompts of 16-32 tokens, as benchmarks/bench_edit.py):
1. the plan for the row's budget (24 GB with bf16 frozen weights, 12 GB with nf4);
2. ``--steps`` edit steps with torch's allocation history recorded: ``torch.cuda.max_memory_reserved`` against the
   plan's total (reserved bytes) and ``max_memory_allocated`` against the plan without its allocator term; the
   recorded sequence (model build included) replayed through ``mu_fast.memory.allocator`` against the real reserved
   peak, which checks the allocator model itself;
3. ``--steps`` more steps with the caching allocator capped at the budget (``set_per_process_memory_fraction``):
   "ok" or "out of memory". The cap counts what torch reserves; the CUDA context is outside it, as outside the plan.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import context  # noqa: E402
from benchmarks.edit_recipes import MuFastRecipe, masked_module_names, random_step_batch  # noqa: E402

BUDGETS = {"bf16": "24GB", "int8": "16GB", "nf4": "12GB"}


def replay_trace(entries: list[dict[str, Any]], mark: int) -> dict[str, int]:
    """The allocator model over torch's recorded trace: its peaks from entry ``mark`` on (where the real peak stats
    were reset), and the real segment bytes the trace shows for comparison."""
    from mu_fast.memory.allocator import CachingAllocatorModel

    model, live, last = CachingAllocatorModel(), {}, None
    for i, entry in enumerate(entries):
        if i == mark:
            model.peak_reserved, model.peak_allocated = model.reserved, model.allocated
        action = entry["action"]
        if action == "alloc" and entry["size"]:
            live[entry["addr"]] = model.malloc(entry["size"])
        elif action == "free_completed" and entry["addr"] in live:
            model.free(live.pop(entry["addr"]))
        elif action == "segment_free" and last != "segment_free":  # empty_cache or a release before an OOM
            model.release_cached()
        last = action
    return {"model_peak_reserved": model.peak_reserved, "model_peak_allocated": model.peak_allocated,
            "model_segments": model.segments}


def run_row(name: str, method: str, frozen: str, steps: int) -> dict[str, Any]:
    from mu_fast.edit.loop import EditConfig
    from mu_fast.localize.paper_graphs import paper_localization
    from mu_fast.masks import Mask
    from mu_fast.memory import BatchShape, plan
    from mu_fast.memory.shapes import parse_budget
    from mu_fast.models import build_random_model, shipped_config
    from mu_fast.models.sites import SiteTable

    config = shipped_config(name)
    mask = Mask.from_components(SiteTable(config), paper_localization(name, "sports", method))
    budget = parse_budget(BUDGETS[frozen])
    shape = BatchShape(fact_tokens=32)  # random_step_batch pads its 16-32-token prompts to the longest
    chosen = plan(config, mask, EditConfig(steps=50, lr=1e-5), frozen=frozen, device_bytes=budget, batch=shape)
    out: dict[str, Any] = {"model": name, "mask": method, "frozen": frozen, "budget": budget,
                           "settings": chosen.describe_settings(), "lm_chunk": chosen.lm_chunk, "plan_bytes": chosen.total,
                           "plan_allocated_bytes": chosen.total - chosen.breakdown["allocator"],
                           "plan_breakdown": chosen.breakdown}
    data = random_step_batch(config.vocab_size, forget=64, maintain=64, lm=64, lm_tokens=100, seed=0)
    recording = True
    try:
        torch.cuda.memory._record_memory_history(enabled="all", context=None, stacks="python", max_entries=10**7)
    except Exception as err:  # noqa: BLE001 - an older torch: the peaks are still measured
        recording, out["record_error"] = False, f"{type(err).__name__}: {err}"
    start = time.perf_counter()
    net = build_random_model(config, device="cuda", dtype=torch.bfloat16, frozen=frozen,
                             trainable_modules=masked_module_names(mask), seed=0)
    torch.cuda.synchronize()
    out["build_s"] = round(time.perf_counter() - start, 1)
    mark = len(torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]) if recording else 0
    torch.cuda.reset_peak_memory_stats()
    runner = MuFastRecipe(net, mask, chosen.edit_config(), data)
    try:
        for _ in range(steps):
            runner.step()
        torch.cuda.synchronize()
        out["status"] = "ok"
    except torch.cuda.OutOfMemoryError as err:
        out["status"] = f"out of memory: {str(err)[:300]}"
    finally:
        runner.close()
    out["peak_reserved"], out["peak_allocated"] = torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
    out["reserved_vs_plan"] = out["peak_reserved"] / chosen.total
    out["allocated_vs_plan"] = out["peak_allocated"] / out["plan_allocated_bytes"]
    if recording:
        entries = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        out.update(replay_trace(entries, mark))
        out["model_matches_reserved"] = out["model_peak_reserved"] == out["peak_reserved"]
        del entries
    # the budget as a hard cap on what the caching allocator may reserve
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
    torch.cuda.reset_peak_memory_stats()
    try:
        capped = MuFastRecipe(net, mask, chosen.edit_config(), data)
        try:
            for _ in range(steps):
                capped.step()
            torch.cuda.synchronize()
            out["capped"] = "ok"
        finally:
            capped.close()
    except torch.cuda.OutOfMemoryError as err:
        out["capped"] = f"out of memory: {str(err)[:300]}"
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    out["capped_peak_reserved"] = torch.cuda.max_memory_reserved()
    del net
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", default="gemma-2-9b:flu:bf16,gemma-2-9b:flu:nf4",
                        help="model:localization:frozen, comma-separated")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    rows = []
    for spec in args.rows.split(","):
        name, method, frozen = spec.split(":")
        try:
            row = run_row(name, method, frozen, args.steps)
        except ImportError as err:  # bitsandbytes missing for a quantized row
            row = {"model": name, "mask": method, "frozen": frozen, "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        keys = ("status", "capped", "peak_reserved", "plan_bytes", "reserved_vs_plan", "peak_allocated",
                "plan_allocated_bytes", "allocated_vs_plan", "model_peak_reserved", "model_matches_reserved", "error")
        print(spec, {k: row[k] for k in keys if k in row}, flush=True)
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")  # the allocator model is of the defaults (unset)
        args.out.write_text(json.dumps({**context(), "alloc_conf": conf, "rows": rows}, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

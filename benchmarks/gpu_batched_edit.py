"""K edit configurations at 7-9B shapes on a GPU: one ``edit_batched`` step of K against K single ``edit`` steps.

GPU_OWED row 11 (issue 20). Per model shape (Gemma-2-9B, Llama-3-8B; random weights, bf16, ``--layers`` layers of
the real width so it fits beside the other rows), a mask of attention heads (2 heads in each of layers 1-2) and MLP
neurons (256 neurons in each of layers 1-2), the task of ``bench_batched_edit`` (16 forget facts, 128 maintain, 64
LM texts), ``--steps`` steps; K = 1, 4, 8, 16 configurations with different lrs and seeds. Timed with CUDA
synchronization: K single ``edit`` calls (each on the base weights, restored in between, outside the timing) and one
``edit_batched``; s/step of each, their ratio, and ``max_memory_allocated`` of each (the batched run's growth with K
is the per-configuration memory: deltas, their state and activations), ``max_memory_reserved`` beside
``mu_fast.memory.plan_batch``'s peak for the same K in one pass (``plan_total_bytes``, at the task's batch shape:
how well the plan that sizes ``batch: auto`` predicts it), and the batched step again with ``groups_per_pass=1``
(what the plan picks when one group's activations fill the device). Writes ``--out`` (JSON lines, one per row).

Smoke run on a CPU: ``python benchmarks/gpu_batched_edit.py --device cpu --layers 1 --ks 1,2 --steps 1 --shapes
llama-3-8b`` (slow; shape checks only, the times mean nothing there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    from benchmarks.bench_batched_edit import LRS, _task_and_tokenizer
    from benchmarks.common import context
    from mu_fast.edit.batched import edit_batched
    from mu_fast.edit.loop import EditConfig, edit
    from mu_fast.masks import Mask
    from mu_fast.memory import BatchShape, plan_batch
    from mu_fast.models.random_model import build_random_model
    from mu_fast.models.sites import Component, SiteTable

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("batched_edit_rows.jsonl"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ks", default="1,4,8,16")
    parser.add_argument("--shapes", default="gemma-2-9b,llama-3-8b")
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds; rows not started by then are skipped")
    args = parser.parse_args()
    start = time.perf_counter()
    task, tok = _task_and_tokenizer()
    where = context()
    for shape in args.shapes.split(","):
        model = build_random_model(shape, device=args.device, dtype=torch.bfloat16, layers=args.layers)
        table = SiteTable(model)
        g = torch.Generator().manual_seed(0)
        d_mlp = table.component_size(Component("mlp", 1)) // (3 * model.config.hidden_size)
        comps = [Component("attn", L, h) for L in (1, 2) for h in (0, 1)]
        comps += [Component("mlp", L, i) for L in (1, 2) for i in torch.randperm(d_mlp, generator=g)[:256].tolist()]
        mask = Mask.from_components(table, comps)
        base = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point}
        for K in [int(k) for k in args.ks.split(",")]:
            if time.perf_counter() - start > args.deadline:
                print(f"{shape} K={K}: skipped (deadline)", flush=True)
                continue
            configs = [EditConfig(steps=args.steps, lr=LRS[k % len(LRS)], seed=k, optimizer="torch")
                       for k in range(K)]
            row = {"shape": shape, "layers": args.layers, "K": K, "steps": args.steps,
                   "masked_elements": mask.param_count(), "context": where}
            try:
                single = 0.0
                if args.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                for config in configs:
                    _sync(args.device)
                    t0 = time.perf_counter()
                    edit(model, tok, task, mask, config, progress=False)
                    _sync(args.device)
                    single += time.perf_counter() - t0
                    with torch.no_grad():
                        for n, p in model.named_parameters():
                            if n in base:
                                p.copy_(base[n])
                if args.device == "cuda":
                    row["single_peak_bytes"] = torch.cuda.max_memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                _sync(args.device)
                t0 = time.perf_counter()
                edit_batched(model, tok, task, [mask] * K, configs)
                _sync(args.device)
                batched = time.perf_counter() - t0
                if args.device == "cuda":
                    row["batched_peak_bytes"] = torch.cuda.max_memory_allocated()
                    row["batched_reserved_bytes"] = torch.cuda.max_memory_reserved()
                lm_tokens = max(len(tok(t)["input_ids"]) for t in task.lm_texts)
                planned = plan_batch(model.config, [mask] * K, configs[0], device_bytes=10**15, k_max=K,
                                     batch=BatchShape(n_forget=len(task.forget_train), n_maintain=64, fact_tokens=16,
                                                      n_lm=64, lm_tokens=lm_tokens))
                row["plan_total_bytes"], row["plan_state_bytes"] = planned.total, planned.state[0]
                _sync(args.device)
                t0 = time.perf_counter()
                edit_batched(model, tok, task, [mask] * K, configs, groups_per_pass=1)
                _sync(args.device)
                row["pass1_seconds_per_step"] = (time.perf_counter() - t0) / args.steps
                row.update(single_seconds_per_step=single / args.steps, batched_seconds_per_step=batched / args.steps,
                           ratio=single / batched)
                print(f"{shape} K={K}: K single steps {single / args.steps:.3f} s, one batched step "
                      f"{batched / args.steps:.3f} s, ratio {single / batched:.2f}x", flush=True)
            except Exception as err:  # noqa: BLE001 - recorded, the next row runs
                row["error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"{shape} K={K}: {row['error']}", flush=True)
                if args.device == "cuda":
                    torch.cuda.empty_cache()
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model, base
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

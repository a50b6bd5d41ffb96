"""Segmented sparse-delta add on a GPU: one Triton launch for K groups against the torch per-group loop.

GPU_OWED row 12 (the K-runs issue's kernel). What ``BatchedDeltas`` does per masked module and step, at 7-9B
widths: K groups of ``--tokens`` rows each (default 64 prompts x 20 tokens), per group its own compact delta over
its own selection:

* ``up_rows``:   up_proj 4096 -> 14336, rows (MLP neurons) at 5% and 20% of 14336
* ``down_cols``: down_proj 14336 -> 4096, columns (MLP neurons) at 5% of 14336
* ``o_cols``:    o_proj 4096 -> 4096, columns of 4 heads of 128

K = 1, 4, 8, 16; bf16 (``--dtypes``). Per row: median milliseconds (CUDA events, ``--iters`` timed calls after
warm-up) of ``segmented_delta_add`` with ``backend="triton"`` and ``backend="torch"``, forward only and forward +
backward (grads of x and of every delta), the frozen GEMM over all rows for scale, and the largest difference of
the two backends' forward outputs. Writes ``benchmarks/results/<device>/segmented_delta.json`` (``--out``).

Run: ``python benchmarks/gpu_segmented_delta.py`` (about a minute on an H100). Without CUDA it prints why and
exits 0. Smoke run on a CPU (the Triton interpreter; shape and code checks only, the times mean nothing there):
``python benchmarks/gpu_segmented_delta.py --device cpu --shrink 64 --ks 1,2 --iters 1 --tokens 8 --dtypes float32
--out /tmp/segmented_delta.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name: (d_in, d_out, kind, selection sizes to try)
CASES = {
    "up_rows": (4096, 14336, "rows", (717, 2867)),  # 5%, 20% of the neurons
    "down_cols": (14336, 4096, "cols", (717,)),
    "o_cols": (4096, 4096, "cols", (512,)),  # 4 heads x 128
}


def _median_ms(fn, iters: int, device: torch.device) -> float:
    for _ in range(1 if device.type == "cpu" else 3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cpu":
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _row(case: str, sel: int, K: int, dtype: torch.dtype, tokens: int, iters: int, dev: torch.device,
         shrink: int) -> dict:
    from mu_fast.edit.grouped_delta import segmented_delta_add

    d_in, d_out, kind, _ = CASES[case]
    d_in, d_out, sel = d_in // shrink, d_out // shrink, max(1, sel // shrink)
    g = torch.Generator(device="cpu").manual_seed(0)
    limit = d_out if kind == "rows" else d_in
    groups = [(k * tokens, (k + 1) * tokens) for k in range(K)]
    indices = [torch.randperm(limit, generator=g)[:sel].sort().values.to(dev) for _ in range(K)]
    shape = (sel, d_in) if kind == "rows" else (d_out, sel)
    deltas = [(0.01 * torch.randn(shape, generator=g)).to(dev, dtype).requires_grad_() for _ in range(K)]
    x = torch.randn(K * tokens, d_in, generator=g).to(dev, dtype).requires_grad_()
    weight = (0.02 * torch.randn(d_out, d_in, generator=g)).to(dev, dtype)
    y = torch.nn.functional.linear(x.detach(), weight)
    grad = torch.randn_like(y)

    def forward(backend: str) -> torch.Tensor:
        return segmented_delta_add(y, x, groups, kind, indices, deltas, backend=backend, check_indices=False)

    def train(backend: str) -> None:
        torch.autograd.grad(forward(backend), [x, *deltas], grad)

    row = {"case": case, "kind": kind, "d_in": d_in, "d_out": d_out, "selected": sel, "K": K, "rows_per_group": tokens,
           "dtype": str(dtype).replace("torch.", "")}
    with torch.no_grad():
        diff = (forward("triton").float() - forward("torch").float()).abs().max().item()
        row["frozen_gemm_ms"] = _median_ms(lambda: torch.nn.functional.linear(x, weight), iters, dev)
        row["forward_ms"] = {b: _median_ms(lambda b=b: forward(b), iters, dev) for b in ("triton", "torch")}
    row["forward_backward_ms"] = {b: _median_ms(lambda b=b: train(b), iters, dev) for b in ("triton", "torch")}
    row["max_abs_diff_triton_vs_torch"] = diff
    row["speedup_forward"] = row["forward_ms"]["torch"] / row["forward_ms"]["triton"]
    row["speedup_forward_backward"] = row["forward_backward_ms"]["torch"] / row["forward_backward_ms"]["triton"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<device>/segmented_delta.json")
    parser.add_argument("--ks", default="1,4,8,16")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--dtypes", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=64 * 20, help="rows per group (prompts x tokens)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--deadline", type=float, default=150.0, help="seconds; rows not started by then are skipped")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run under the Triton interpreter")
    parser.add_argument("--shrink", type=int, default=1, help="divide widths and selections by this (smoke runs)")
    args = parser.parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    elif not torch.cuda.is_available():
        print("gpu_segmented_delta: no CUDA device here; nothing measured (run it on a GPU machine)")
        return 0
    from benchmarks.common import RESULTS, context, device_slug
    from mu_fast._ext import triton_status

    ok, why = triton_status()
    if not ok:
        print(f"gpu_segmented_delta: Triton unavailable ({why}); nothing measured")
        return 0
    out = args.out or RESULTS / device_slug() / "segmented_delta.json"
    start, rows = time.perf_counter(), []
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        for case in args.cases.split(","):
            for sel in CASES[case][3]:
                for K in [int(k) for k in args.ks.split(",")]:
                    label = f"{case} sel={sel} K={K} {dtype}"
                    if time.perf_counter() - start > args.deadline:
                        print(f"{label}: skipped (deadline)", flush=True)
                        continue
                    try:
                        row = _row(case, sel, K, dtype, args.tokens, args.iters, torch.device(args.device),
                                   args.shrink)
                        print(f"{label}: fwd triton {row['forward_ms']['triton']:.3f} ms, torch "
                              f"{row['forward_ms']['torch']:.3f} ms ({row['speedup_forward']:.2f}x); fwd+bwd "
                              f"{row['forward_backward_ms']['triton']:.3f} / {row['forward_backward_ms']['torch']:.3f} ms "
                              f"({row['speedup_forward_backward']:.2f}x); frozen GEMM {row['frozen_gemm_ms']:.3f} ms; "
                              f"max diff {row['max_abs_diff_triton_vs_torch']:.2e}", flush=True)
                    except Exception as err:  # noqa: BLE001 - recorded, the next row runs
                        row = {"case": case, "selected": sel, "K": K, "error": f"{type(err).__name__}: {err}"[:500]}
                        print(f"{label}: {row['error']}", flush=True)
                    rows.append(row)
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"context": context(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

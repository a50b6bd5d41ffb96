"""Where a MaskedAdamW step's time goes: host enqueue time, device kernel time, CUDA-graph replay, tile size.

``bench_optim.py`` times a step the way a loop that syncs every step sees it (host time + launch latency + kernels).
This script splits that number, for the same workloads (``bench_optim._workload``: Llama-3-8B shapes, bf16, 5%):

* ``sync_us``: median of ``step(); synchronize()`` (what bench_optim reports);
* ``host_us``: median time for ``step()`` to return on an idle GPU (Python, dispatch and launches; no sync);
* ``loop_us``: per step over 30 back-to-back steps with one sync at the end (a training loop's view:
  max(host, device) when the two overlap);
* ``graph_us``: per step over back-to-back replays of the step captured in a CUDA graph (device time plus
  the graph's own launch gaps), timed with CUDA events;
* ``kernels``: per-kernel device time per step from torch.profiler (CUDA activity only);
* ``pct_copy_graph``: modeled bytes / ``graph_us`` as % of the copy bandwidth: ``dst.copy_(src)`` over the
  byte count of our fp32-state step, the faster of its eager (synced) and graph-replay timings.

Peers under the same graph timing: the selected units sliced into contiguous parameters + torch AdamW fused
(``capturable=True``), and torch AdamW fused over the full tensors with masked gradients. A tile-size sweep
(``tile=``) of the CUDA backend shows whether the default (4096) is the right work unit.

Run on the GPU machine from the repository root (``benchmarks/gpu_optim.sh`` does): ``python
benchmarks/profile_optim.py --out DIR``; writes ``profile_optim.json`` (+ a printed table) to DIR and to
benchmarks/results/<device>/. ``--smoke`` runs a tiny CPU version (the logic only; no GPU number).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_optim as bo  # noqa: E402
from benchmarks.common import RESULTS, context, device_slug  # noqa: E402
from mu_fast.optim import MaskedAdamW, backend_availability  # noqa: E402

GPU = torch.cuda.is_available()
SWEEP_BACKEND = "cuda" if GPU else "cpu"  # the tile-size sweep


def _sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def _median_us(fn, reps: int, sync_each: bool) -> float:
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        if sync_each:
            _sync()
        times.append(time.perf_counter() - t0)
    _sync()
    return 1e6 * statistics.median(times)


def _loop_us(fn, reps: int = 30) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return 1e6 * (time.perf_counter() - t0) / reps


def _graph_us(fn, reps: int = 50, warmup: int = 3) -> float | None:
    """Capture ``fn`` (already warmed up eagerly) in a CUDA graph; per-replay time with CUDA events."""
    if not GPU:
        return None
    replay = bo._captured(fn, warmup)  # warm-up calls on the capture stream, then the capture
    for _ in range(warmup):
        replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        replay()
    end.record()
    torch.cuda.synchronize()
    return 1e3 * start.elapsed_time(end) / reps


def _kernels(fn, reps: int = 10) -> dict[str, float]:
    """Device time per step (µs) of each kernel, from torch.profiler; {} where the profiler gives nothing."""
    if not GPU:
        return {}
    from torch.profiler import ProfilerActivity, profile

    _sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        _sync()
    out = {}
    for evt in prof.key_averages():
        t = getattr(evt, "self_device_time_total", None)
        if t is None:
            t = getattr(evt, "self_cuda_time_total", 0.0)
        if t:
            out[evt.key[:90]] = round(float(t) / reps, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _copy_graph_us(nbytes: int) -> tuple[float | None, float]:
    n = max(1, nbytes // 2)
    src, dst = torch.empty(n, dtype=torch.uint8, device=bo.DEVICE), torch.empty(n, dtype=torch.uint8, device=bo.DEVICE)
    fn = lambda: dst.copy_(src)  # noqa: E731
    for _ in range(3):
        fn()
    sync_us = _median_us(fn, 10, True)
    graph = _graph_us(fn)
    del src, dst
    return graph, sync_us


def _record(rows: list[dict], out: Path, **row) -> None:
    rows.append(row)
    (out / "profile_optim.json").write_text(json.dumps({"context": context(), "rows": rows}, indent=1))
    f = lambda key, width, digits=1: f"{row[key]:{width}.{digits}f}" if row.get(key) is not None else " " * (width - 1) + "-"  # noqa: E731
    print(f"  {row['impl']:<44} sync {f('sync_us', 9)}  host {f('host_us', 8)}  loop {f('loop_us', 9)}"
          f"  graph {f('graph_us', 9)} µs  {f('pct_copy_graph', 5)}% copy  {row.get('error', '')}", flush=True)


def _measure(fn, nbytes: int, copy_graph: float | None, copy_bytes: int, kernels: bool) -> dict:
    for _ in range(3):
        fn()
    row = {"sync_us": _median_us(fn, 20, True), "host_us": _median_us(fn, 20, False), "loop_us": _loop_us(fn)}
    row["graph_us"] = _graph_us(fn)
    if kernels:
        row["kernels"] = _kernels(fn)
    row["bytes"] = nbytes
    if row["graph_us"] and copy_graph:  # the copy moved copy_bytes; this step moves nbytes
        row["pct_copy_graph"] = 100.0 * (nbytes / copy_bytes) * copy_graph / row["graph_us"]
    return row


def profile_case(case, rows: list[dict], out: Path, tiles: list[int], configs) -> None:
    structure = case[2]
    group = bo._group(*case)
    print(f"\n{group}", flush=True)
    params, mask = bo._workload(*case)
    nbytes = bo._bytes_ours(mask, False, 32)
    copy_graph, copy_sync = _copy_graph_us(nbytes)
    # The roofline: the faster of the two copy timings (a captured copy of GBs ran slower than the eager one on the
    # H200), so no row is flattered by a slow reference.
    copy_ref = min(x for x in (copy_graph, copy_sync) if x)
    _record(rows, out, group=group, impl="copy_ (our bytes)", role="roofline", bytes=nbytes, sync_us=copy_sync,
            graph_us=copy_graph, pct_copy_graph=100.0 * copy_ref / copy_graph if copy_graph else None)
    for backend, bits, nonfinite, tile in configs + [(SWEEP_BACKEND, 32, "skip", t) for t in tiles]:
        impl = f"MaskedAdamW[{backend}{',8bit' if bits == 8 else ''}{',no-check' if nonfinite == 'ignore' else ''}" \
               f"{f',tile={tile}' if tile != bo_default_tile() else ''}]"
        if backend_availability(bo.DEVICE)[backend] != "available":
            _record(rows, out, group=group, impl=impl, role="ours", error=backend_availability(bo.DEVICE)[backend][:200])
            continue
        try:
            opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=1e-4, weight_decay=0.0, backend=backend, state_bits=bits,
                              nonfinite=nonfinite, tile=tile)
            row = _measure(opt.step, bo._bytes_ours(mask, False, bits, stats=nonfinite != "ignore"), copy_ref,
                           nbytes, kernels=tile == bo_default_tile())
            _record(rows, out, group=group, impl=impl, role="ours", tile=tile, state_mb=opt.state_bytes() / 2**20, **row)
            del opt
        except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not cost the other rows
            traceback.print_exc()
            _record(rows, out, group=group, impl=impl, role="ours", error=f"{type(exc).__name__}: {exc}"[:300])
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()
    e = torch.finfo(bo.DTYPE).bits // 8
    for peer in ("slice+torch-fused", "torch-fused"):
        if peer == "slice+torch-fused" and structure == "random":
            continue
        try:
            trained = [params[n] for n in mask]
            if peer == "slice+torch-fused":
                trained = bo.sliced_params(params, mask)
            elif not bo._fits({n: params[n] for n in mask}, 3 * e):
                continue
            lr = torch.tensor(1e-4, device=bo.DEVICE) if GPU else 1e-4
            opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0, fused=True, capturable=GPU)
            row = _measure(opt.step, sum(t.numel() for t in trained) * 7 * e, copy_ref, nbytes, kernels=False)
            impl = "slice params + torch AdamW fused" if peer == "slice+torch-fused" else "torch AdamW fused (dense, masked grads)"
            _record(rows, out, group=group, impl=impl, role="peer", **row)
            del opt, trained
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            _record(rows, out, group=group, impl=peer, role="peer", error=f"{type(exc).__name__}: {exc}"[:300])
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()


def bo_default_tile() -> int:
    from mu_fast.optim.segments import DEFAULT_TILE

    return DEFAULT_TILE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="folder for profile_optim.json (also copied to benchmarks/results)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run: checks the script, measures nothing useful")
    parser.add_argument("--no-models", action="store_true", help="skip the whole-model cases")
    args = parser.parse_args()
    if args.smoke:
        bo.SHAPES["tiny"] = (64, 224, 64, 16, 16, 2)
        cases = [("tiny", 1, s, 0.05) for s in ("heads", "rows", "cols", "random")] + [("tiny", 2, "rows", 0.05)]
        configs, tiles = [("cpu", 32, "skip", 4096), ("torch", 32, "skip", 4096)], [2048]
    else:
        if not GPU:
            raise SystemExit("profile_optim.py measures the GPU; use --smoke to check it on the CPU")
        cases = [("llama3-8b", 1, s, 0.05) for s in ("rows", "heads", "cols", "random")]
        if not args.no_models:
            cases += [("llama3-8b", 32, "rows", 0.05), ("llama3-8b", 32, "heads", 0.05)]
        configs = [("cuda", 32, "skip", 4096), ("cuda", 32, "ignore", 4096), ("cuda", 8, "skip", 4096),
                   ("triton", 32, "skip", 4096)]
        tiles = [2048, 8192, 16384]
    out = Path(args.out or RESULTS / device_slug())
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for case in cases:
        case_tiles = tiles if case[2] in ("rows", "heads") else []
        profile_case(case, rows, out, case_tiles, configs)
        bo._CACHE.clear()
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()
    if not args.smoke:
        dest = RESULTS / device_slug()
        dest.mkdir(parents=True, exist_ok=True)
        if dest.resolve() != out.resolve():
            (dest / "profile_optim.json").write_text((out / "profile_optim.json").read_text())


if __name__ == "__main__":
    main()

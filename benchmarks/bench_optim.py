"""MaskedAdamW step time against its peers over the same localized tensors, with the copy roofline.

Workloads: the weight matrices (q, k, v, o, gate, up, down) of one layer and of whole models with the shapes of
Llama-3-8B and Gemma-2-9B (random weights), masks of each structure and density (mu_fast.masks.Mask). On the CPU
the shapes are scaled (hidden /4) and parameters are fp32; on a GPU they are full size and bf16.

Per workload group (pytest-benchmark ``group``), one result per implementation:
* ours: ``MaskedAdamW`` per backend (+ fp32 master, + 8-bit state on the GPU);
* peers: torch AdamW fused / foreach over the full tensors with masked gradients (the common practice), the
  selected units copied into contiguous parameters + torch fused (S2FT-style; structured masks only),
  bitsandbytes AdamW8bit and torchao AdamW8bit when importable (skipped otherwise);
* roofline: ``dst.copy_(src)`` moving the bytes our step must move.
Every step includes a cosine LR scheduler step (the LR changes every step) and ends with a device sync.
``extra_info``: impl, role, modeled bytes per step, achieved GB/s, % of the measured copy bandwidth, optimizer
state MB, peak MB (GPU), plus the context (device, versions, commit, date).

On the CPU, ``test_one_thread`` also times the single-columns 5% case at one torch thread with interleaved pairs
(benchmarks/notes_optim_cpu.md; ``-k one_thread --benchmark-json benchmarks/results/CPU/bench_optim_1thread.json``).

Run: ``pytest benchmarks/bench_optim.py --benchmark-only --benchmark-json benchmarks/results/<device>/bench_optim.json``
(``common.device_slug()`` names the device folder; CPU results go to benchmarks/results/CPU/).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from benchmarks.common import context, peak_bytes, reset_peak, sync
from mu_fast.masks import Mask
from mu_fast.optim import MaskedAdamW, backend_availability

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPE = torch.bfloat16 if GPU else torch.float32
ROUNDS, WARMUP = (10, 3) if GPU else (5, 1)
# (hidden, ffn, q width, kv width, head_dim, layers); q/k/v/o/gate/up/down as in HF Linear weights [out, in].
SHAPES = {
    "llama3-8b": (4096, 14336, 4096, 1024, 128, 32),
    "gemma2-9b": (3584, 14336, 4096, 2048, 256, 42),
    "llama3-8b/4": (1024, 3584, 1024, 256, 128, 32),  # CPU scale: hidden, ffn and head count / 4
}
if GPU:
    WORKLOADS = [("llama3-8b", 1), ("llama3-8b", 32), ("gemma2-9b", 42)]
else:
    WORKLOADS = [("llama3-8b/4", 1), ("llama3-8b/4", 4)]
STRUCTURE_CASES = [("heads", d) for d in (0.01, 0.05, 0.25, 1.0)] + [(s, 0.05) for s in ("whole", "rows", "cols", "random")]


def _matrices(arch: str, layers: int) -> dict[str, tuple[int, int]]:
    d, ffn, q, kv, _, _ = SHAPES[arch]
    shapes = {"q": (q, d), "k": (kv, d), "v": (kv, d), "o": (d, q), "gate": (ffn, d), "up": (ffn, d), "down": (d, ffn)}
    return {f"{layer}.{m}": s for layer in range(layers) for m, s in shapes.items()}


def _mask(arch: str, layers: int, structure: str, density: float, gen: torch.Generator) -> Mask:
    """``density`` of the units of every matrix (heads: heads + neurons; whole: of the matrices)."""
    d, ffn, q, kv, hd, _ = SHAPES[arch]
    mats = _matrices(arch, layers)
    mask = Mask()
    pick = lambda n: torch.randperm(n, generator=gen)[: max(1, round(density * n))].sort().values  # noqa: E731
    if structure == "whole":
        names = list(mats)
        for i in pick(len(names)).tolist():
            mask.add(names[i], mats[names[i]])
        return mask
    for layer in range(layers):
        if structure == "heads":
            heads, neurons = pick(q // hd), pick(ffn)
            span = (heads[:, None] * hd + torch.arange(hd)).flatten()
            groups = torch.unique(heads // ((q // hd) // (kv // hd)))
            kv_span = (groups[:, None] * hd + torch.arange(hd)).flatten()
            for m, kind, idx in (("q", "rows", span), ("o", "cols", span), ("k", "rows", kv_span), ("v", "rows", kv_span),
                                 ("gate", "rows", neurons), ("up", "rows", neurons), ("down", "cols", neurons)):
                mask.add(f"{layer}.{m}", mats[f"{layer}.{m}"], kind, idx)
            continue
        for m in ("q", "k", "v", "o", "gate", "up", "down"):
            name, shape = f"{layer}.{m}", mats[f"{layer}.{m}"]
            if structure == "random":
                mask.add(name, shape, "elements", torch.rand(shape, generator=gen) < density)
            else:
                mask.add(name, shape, structure, pick(shape[0] if structure == "rows" else shape[1]))
    return mask


_CACHE: dict = {}


def _workload(arch: str, layers: int, structure: str, density: float):
    """Parameters (with masked gradients) and the mask of one case; the last case is kept for the next test."""
    key = (arch, layers, structure, density)
    if key not in _CACHE:
        _CACHE.clear()  # free the previous case before allocating (whole 9B models are ~33 GB with grads)
        if GPU:
            torch.cuda.empty_cache()
        _CACHE[key] = _build_workload(*key)
    return _CACHE[key]


def _build_workload(arch: str, layers: int, structure: str, density: float):
    gen = torch.Generator().manual_seed(0)
    mask = _mask(arch, layers, structure, density, gen)
    params = {n: torch.nn.Parameter(torch.randn(s, dtype=DTYPE, device=DEVICE) * 0.02) for n, s in _matrices(arch, layers).items()}
    for n, p in params.items():
        g = torch.randn_like(p) * 1e-3
        p.grad = g * mask.dense(n, DEVICE) if n in mask else None
    return params, mask


def _bytes_ours(mask: Mask, master: bool, bits: int, stats: bool = True) -> int:
    """Modeled bytes per step: stats pass reads g (unless ``stats`` is off: nonfinite="ignore", no clipping);
    update reads g, p (or master), m, v; writes p, m, v (+ master)."""
    e = torch.finfo(DTYPE).bits // 8
    state = 1 + 4 / 256 if bits == 8 else 4
    per = (e if stats else 0) + e + (4 if master else e) + 2 * state + e + 2 * state + (4 if master else 0)
    return int(mask.param_count() * per)


def _bytes_dense(params: dict) -> int:
    e = torch.finfo(DTYPE).bits // 8
    return sum(p.numel() for p in params.values() if p.grad is not None) * 7 * e  # fused: read p, g, m, v; write p, m, v


_COPY_GBPS: dict[int, float] = {}
COPY_CAP = 4 << 30  # bytes of traffic: copy bandwidth is flat beyond a few hundred MB; whole-model cases move ~100 GB


def _copy_gbps(nbytes: int) -> float:
    """Measured copy bandwidth (read + write bytes per second) for ``min(nbytes, COPY_CAP)`` bytes of traffic,
    halved until the two buffers fit in free GPU memory (the dense peers of whole models hold ~100 GB)."""
    nbytes = min(nbytes, COPY_CAP)
    if GPU:
        torch.cuda.empty_cache()
        while nbytes > 1 << 20 and nbytes > 0.8 * torch.cuda.mem_get_info()[0]:
            nbytes //= 2
    if nbytes not in _COPY_GBPS:
        n = max(1, nbytes // 2)
        src, dst = torch.empty(n, dtype=torch.uint8, device=DEVICE), torch.empty(n, dtype=torch.uint8, device=DEVICE)
        for _ in range(3):
            dst.copy_(src)
        sync()
        import time

        reps = 10
        t0 = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        sync()
        _COPY_GBPS[nbytes] = 2 * n * reps / (time.perf_counter() - t0) / 1e9
        del src, dst
    return _COPY_GBPS[nbytes]


def _run(benchmark, group: str, impl: str, role: str, step, nbytes: int, state_bytes: int | None) -> None:
    def timed():
        step()
        sync()

    try:
        for _ in range(WARMUP):
            timed()
    except torch.OutOfMemoryError as exc:  # a dense peer's state for a whole model: record why, keep the session
        if GPU:
            torch.cuda.empty_cache()
        pytest.skip(f"{impl}: out of GPU memory ({str(exc).splitlines()[0][:200]})")
    reset_peak()
    benchmark.group = group
    benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    peak = peak_bytes()  # before the copy-bandwidth probe allocates its buffers
    seconds = benchmark.stats.stats.median
    gbps = nbytes / seconds / 1e9
    info = {"impl": impl, "role": role, "bytes_per_step": nbytes, "gbps": gbps, "load_avg_1min": os.getloadavg()[0],
            **context()}
    if state_bytes is not None:
        info["state_mb"] = state_bytes / 2**20
    if peak is not None:
        info["peak_mb"] = peak / 2**20
    benchmark.extra_info.update(info)
    benchmark.extra_info["pct_roofline"] = 100.0 * gbps / _copy_gbps(nbytes)


def _with_schedule(opt, base_lr: float = 1e-4, period: int = 1000):
    """Step, then set a cosine learning rate (a float, or in place for tensor learning rates as torchao wants)."""
    t = [0]

    def step():
        opt.step()
        t[0] += 1
        lr = base_lr * 0.5 * (1 + math.cos(math.pi * (t[0] % period) / period))
        for group in opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    return step


def _fits(params, bytes_per_param: int) -> bool:
    if not GPU:
        return True
    need = sum(p.numel() for p in params.values()) * bytes_per_param
    return need < torch.cuda.mem_get_info()[0] * 0.9


QUICK = os.environ.get("MU_FAST_BENCH_QUICK") == "1"
if QUICK:  # the GPU script's short run: the 5% structures only
    STRUCTURE_CASES = [(s, 0.05) for s in ("heads", "rows", "cols", "random")]
CASES = [(a, l, s, d) for a, l in WORKLOADS for s, d in (STRUCTURE_CASES if l == 1 else [("heads", 0.05)])]
# (backend, master weights, state bits, nonfinite): "ignore" drops the statistics pass (no clipping either), as
# torch's AdamW does; it is timed for the fp32-state CUDA backend only, to show what that pass costs.
OURS = [("cuda", False, 32, "skip"), ("cuda", False, 32, "ignore"), ("triton", False, 32, "skip"),
        ("cuda", True, 32, "skip"), ("cuda", False, 8, "skip"), ("triton", False, 8, "skip"),
        ("torch", False, 32, "skip")] if GPU else [("cpu", False, 32, "skip"), ("cpu", False, 8, "skip"),
                                                    ("torch", False, 32, "skip")]
PEERS = ["torch-fused", "torch-foreach", "slice+torch-fused", "bnb-adamw8bit", "torchao-adamw8bit", "copy"]
if QUICK and GPU:  # the GPU script's short run: drop what earlier runs measured and no target depends on
    OURS = [o for o in OURS if o[0] != "torch"]
    PEERS = [p for p in PEERS if p != "torch-foreach"]


def _group(arch, layers, structure, density):
    return f"{arch} x{layers} layer{'s' if layers > 1 else ''} {structure} {density:.0%}"


def _case_id(case):
    return f"{case[0]}-x{case[1]}-{case[2]}-{case[3]}"


@pytest.mark.parametrize("backend,master,bits,nonfinite", OURS, ids=lambda v: str(v))
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_masked_adamw(benchmark, case, backend, master, bits, nonfinite):
    arch, layers, structure, density = case
    if backend == "torch" and (layers > 1 or (structure, density) != ("heads", 0.05)):
        pytest.skip("the torch reference backend is timed on the one-layer heads-5% case only")
    if backend_availability(DEVICE)[backend] != "available":
        pytest.skip(f"backend {backend}: {backend_availability(DEVICE)[backend]}")
    params, mask = _workload(arch, layers, structure, density)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=1e-4, weight_decay=0.0, backend=backend,
                      master_weights=master,
                      state_bits=bits, nonfinite=nonfinite)
    impl = f"MaskedAdamW[{backend}{',master' if master else ''}{',8bit' if bits == 8 else ''}" \
           f"{',no-check' if nonfinite == 'ignore' else ''}]"
    _run(benchmark, _group(*case), impl, "ours", _with_schedule(opt),
         _bytes_ours(mask, master, bits, stats=nonfinite != "ignore"), opt.state_bytes())


def sliced_params(params: dict, mask: Mask) -> list[torch.nn.Parameter]:
    """The S2FT-style peer's parameters: each tensor's selected rows / columns copied into a contiguous parameter
    (with a random gradient). Row/column/whole selections only."""
    slices = []
    for n in mask:
        sel, p = mask[n], params[n]
        index = sel.index.to(DEVICE) if sel.kind != "whole" else None
        sliced = p.detach() if index is None else (p.detach()[index] if sel.kind == "rows" else p.detach()[:, index])
        s = torch.nn.Parameter(sliced.contiguous())
        s.grad = torch.randn_like(s) * 1e-3
        slices.append(s)
    return slices


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_peer(benchmark, case, peer):
    arch, layers, structure, density = case
    params, mask = _workload(arch, layers, structure, density)
    trained = [params[n] for n in mask]
    group = _group(*case)
    if peer == "copy":
        nbytes = _bytes_ours(mask, False, 32)
        n = max(1, nbytes // 2)
        src, dst = torch.empty(n, dtype=torch.uint8, device=DEVICE), torch.empty(n, dtype=torch.uint8, device=DEVICE)
        _run(benchmark, group, "copy_ (our bytes)", "roofline", lambda: dst.copy_(src), nbytes, None)
        return
    if peer in ("torch-fused", "torch-foreach"):
        if not _fits({n: params[n] for n in mask}, 3 * torch.finfo(DTYPE).bits // 8):  # m, v + foreach temporaries
            pytest.skip("dense state for every trained tensor does not fit in free GPU memory")
        kw = {"fused": True} if peer == "torch-fused" else {"foreach": True}
        opt = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.0, **kw)
        _run(benchmark, group, f"torch AdamW {peer.split('-')[1]} (dense, masked grads)", "peer", _with_schedule(opt),
             _bytes_dense({n: params[n] for n in mask}), None)
        benchmark.extra_info["state_mb"] = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                                               if torch.is_tensor(t)) / 2**20
        return
    if peer == "slice+torch-fused":
        if structure == "random":
            pytest.skip("S2FT-style slicing needs row/column structure")
        slices = sliced_params(params, mask)
        opt = torch.optim.AdamW(slices, lr=1e-4, weight_decay=0.0, fused=True)
        e = torch.finfo(DTYPE).bits // 8
        _run(benchmark, group, "slice params + torch AdamW fused", "peer", _with_schedule(opt),
             sum(s.numel() for s in slices) * 7 * e, None)
        return
    if not GPU:
        pytest.skip(f"{peer} is timed on the GPU")
    if not _fits({n: params[n] for n in mask}, 3):
        pytest.skip("dense 8-bit state does not fit in free GPU memory")
    try:
        if peer == "bnb-adamw8bit":
            import bitsandbytes as bnb

            opt = bnb.optim.AdamW8bit(trained, lr=1e-4, weight_decay=0.0)
        else:
            import torchao.optim as ao

            opt = ao.AdamW8bit(trained, lr=torch.tensor(1e-4, device=DEVICE), weight_decay=0.0)
    except Exception as exc:  # noqa: BLE001 - an optional peer may fail to import or load its native library
        pytest.skip(f"{peer} unavailable: {type(exc).__name__}: {exc}"[:300])
    e = torch.finfo(DTYPE).bits // 8
    _run(benchmark, group, f"{peer} (dense, masked grads)", "peer", _with_schedule(opt),
         int(sum(p.numel() for p in trained) * (4 * e + 4 + 8 / 256)), None)




def _captured(step_fn, warmup: int = 3):
    """``step_fn`` captured in a CUDA graph after ``warmup`` eager calls on the capture stream; returns replay."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step_fn()
        with torch.cuda.graph(graph, stream=stream):
            step_fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph.replay


@pytest.mark.parametrize("impl", ["ours-cuda", "slice+torch-fused"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_graph_captured(benchmark, case, impl):
    """The step captured in a CUDA graph and replayed (host time gone: what a captured training step costs), ours
    against the slice-params peer captured the same way (torch AdamW fused, capturable). The cosine learning
    rate is a device tensor updated outside the graph, as a captured loop does it."""
    if not GPU:
        pytest.skip("CUDA graphs need a GPU")
    arch, layers, structure, density = case
    params, mask = _workload(arch, layers, structure, density)
    lr = torch.tensor(1e-4, device=DEVICE)
    if impl == "ours-cuda":
        if backend_availability(DEVICE)["cuda"] != "available":
            pytest.skip(f"backend cuda: {backend_availability(DEVICE)['cuda']}")
        opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=lr, weight_decay=0.0, backend="cuda")
        name, role, nbytes, state = "MaskedAdamW[cuda,graph]", "ours", _bytes_ours(mask, False, 32), opt.state_bytes()
    else:
        if structure == "random":
            pytest.skip("S2FT-style slicing needs row/column structure")
        slices = sliced_params(params, mask)
        opt = torch.optim.AdamW(slices, lr=lr, weight_decay=0.0, fused=True, capturable=True)
        e = torch.finfo(DTYPE).bits // 8
        name, role, nbytes, state = "slice params + torch AdamW fused (graph)", "peer", \
            sum(s.numel() for s in slices) * 7 * e, None
    replay = _captured(opt.step)
    t = [0]

    def step():
        t[0] += 1
        lr.fill_(1e-4 * 0.5 * (1 + math.cos(math.pi * (t[0] % 1000) / 1000)))
        replay()

    _run(benchmark, _group(*case), name, role, step, nbytes, state)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_compact_grads(benchmark, case):
    """``compact_grads=True`` as a training step uses it: ``zero_grad`` (zeroes the compact buffer), the
    post-accumulate-grad hooks' gathers of each dense gradient's active part (run here by hand, since no backward
    runs), then ``step()``, which reads the compact fp32 gradient instead of the dense one (once per pass instead of
    one scattered access per element)."""
    backend = "cuda" if GPU else "cpu"
    if backend_availability(DEVICE)[backend] != "available":
        pytest.skip(f"backend {backend}: {backend_availability(DEVICE)[backend]}")
    arch, layers, structure, density = case
    params, mask = _workload(arch, layers, structure, density)
    named = [(n, params[n]) for n in mask]
    opt = MaskedAdamW(named, mask=mask, lr=1e-4, weight_decay=0.0, backend=backend, compact_grads=True)
    slots = [(opt._impls[bi], opt._buckets[bi], slot, p) for n, p in named for bi, slot in [opt._where[id(p)]]]
    step = _with_schedule(opt)

    def train_step():
        for bucket in opt._buckets:
            bucket.compact_grad.zero_()
        for impl, bucket, slot, p in slots:  # what the hooks do during backward
            impl.gather(bucket, slot, p.grad, bucket.compact_grad, True)
        step()

    e = torch.finfo(DTYPE).bits // 8
    # zero (4) + gather (read g, read-modify-write the compact fp32 gradient: e + 8) + statistics pass (4)
    # + update (compact g 4, p read/write 2e, m/v 16): 3e + 36 bytes per active element
    nbytes = int(mask.param_count() * (3 * e + 36))
    _run(benchmark, _group(*case), f"MaskedAdamW[{backend},compact grads incl. gather]", "ours", train_step, nbytes,
         opt.state_bytes())


# The CPU case followed across machines (benchmarks/notes_optim_cpu.md): single columns 5%, fp32, hidden/4 Llama shapes,
# one layer, one torch thread.
ONE_THREAD_CASES = [] if GPU else [("llama3-8b/4", 1, "cols", 0.05)]
PAIRS = 40  # interleaved (ours, torch fused) step pairs


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


@pytest.mark.parametrize("impl", ["MaskedAdamW[cpu]", "torch-fused"])
@pytest.mark.parametrize("case", ONE_THREAD_CASES, ids=_case_id)
def test_one_thread(benchmark, case, impl):
    """One torch thread: MaskedAdamW[cpu] against torch AdamW fused (dense, masked gradients), weight decay off on
    both. Before the timed rounds of ``impl``, ``PAIRS`` step pairs run alternately, ours then torch's, timed in
    thread CPU time (time spent descheduled on a shared machine is not counted; other jobs' use of the caches and
    memory still is, for both alike); ``extra_info`` records their medians, the median of the per-pair ratios
    (``interleaved_speedup``: torch fused time / ours) and the CPU model."""
    import statistics
    import time

    if backend_availability(DEVICE)["cpu"] != "available":
        pytest.skip(f"backend cpu: {backend_availability(DEVICE)['cpu']}")
    arch, layers, structure, density = case
    params, mask = _workload(arch, layers, structure, density)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ours = _with_schedule(MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=1e-4, weight_decay=0.0,
                                          backend="cpu"))
        theirs = _with_schedule(torch.optim.AdamW([params[n] for n in mask], lr=1e-4, weight_decay=0.0, fused=True))

        def seconds(step) -> float:
            t0 = time.thread_time()
            step()
            return time.thread_time() - t0

        for _ in range(3):
            seconds(ours), seconds(theirs)
        pairs = [(seconds(ours), seconds(theirs)) for _ in range(PAIRS)]
        mine = impl == "MaskedAdamW[cpu]"
        nbytes = _bytes_ours(mask, False, 32) if mine else _bytes_dense({n: params[n] for n in mask})
        _run(benchmark, f"{_group(*case)} 1 thread", impl, "ours" if mine else "peer", ours if mine else theirs,
             nbytes, None)
    finally:
        torch.set_num_threads(threads)
    benchmark.extra_info.update(
        threads=1, cpu_model=_cpu_model(), interleaved_pairs=PAIRS, interleaved_clock="thread_time",
        interleaved_ours_ms=1e3 * statistics.median(a for a, _ in pairs),
        interleaved_torch_fused_ms=1e3 * statistics.median(b for _, b in pairs),
        interleaved_speedup=statistics.median(b / a for a, b in pairs))

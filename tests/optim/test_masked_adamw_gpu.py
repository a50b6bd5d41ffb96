"""GPU-only checks of MaskedAdamW (skipped without CUDA): the cuda and triton backends against the fp64 oracle over
the full dtype × density × structure matrix, 8-bit state, no host sync in step(), CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.optim import MaskedAdamW, backend_availability
from tests.optim._oracle import DENSITIES, STRUCTURES, DenseOracle, assert_matches_oracle, fresh_grads, make_mask, make_params
from tests.optim.test_masked_adamw_8bit import assert_8bit_codes_exact

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")
pytestmark = requires_cuda
GPU_BACKENDS = ["cuda", "triton"]
DTYPES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16_master": (torch.bfloat16, True)}
BIG = {"w_odd": (1037, 529), "w_q": (512, 384), "w_o": (384, 512), "bias": (529,), "w_3d": (16, 40, 3)}


def _need(backend: str) -> None:
    why = backend_availability("cuda")[backend]
    if why != "available":
        pytest.fail(f"GPU backend {backend!r} unavailable on a CUDA machine: {why}")


def _three_steps_match_the_oracle(params, cpu_params, mask, backend, master, rng):
    """Three steps of MaskedAdamW on the GPU ``params`` (copies of ``cpu_params``) against the fp64 oracle."""
    before = {n: p.detach().clone() for n, p in cpu_params.items()}
    oracle = DenseOracle(cpu_params, mask, master=master)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=1e-2, weight_decay=0.1, backend=backend,
                      master_weights=master)
    for _ in range(3):
        grads = fresh_grads(cpu_params, mask, rng)
        for n in mask:
            params[n].grad = grads[n].cuda()
        opt.step()
        oracle.step(grads, 1e-2, weight_decay=0.1)
    assert_matches_oracle({n: p.detach().cpu() for n, p in params.items()}, before, oracle, mask, 3, 1e-2)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"density={d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("state_bits", [32])
def test_gpu_backend_matches_fp64_oracle(backend, dtype, density, structure, state_bits, rng):
    _need(backend)
    dt, master = DTYPES[dtype]
    cpu_params = make_params(dt, rng, BIG)
    mask = make_mask(cpu_params, structure, density, rng)
    params = {n: torch.nn.Parameter(p.detach().cuda()) for n, p in cpu_params.items()}
    _three_steps_match_the_oracle(params, cpu_params, mask, backend, master, rng)


def _gpu_copy(p: torch.Tensor, offset: int) -> torch.nn.Parameter:
    """``p`` on the GPU, viewed ``offset`` elements into its storage (offset 1: not 16-byte aligned)."""
    storage = torch.empty(p.numel() + offset, dtype=p.dtype, device="cuda")
    view = storage[offset:].view(p.shape)
    view.copy_(p.detach())
    return torch.nn.Parameter(view)


EIGHT_BIT_CASES = [("heads", 0.3, False, 0), ("rows", 0.05, False, 0), ("cols", 0.05, False, 0),
                   ("random", 0.05, False, 0), ("whole", 0.5, False, 0), ("heads", 0.3, True, 0),
                   ("heads", 0.3, False, 1)]


@pytest.mark.parametrize("structure,density,master,offset", EIGHT_BIT_CASES,
                         ids=[f"{s}-{d}{'-master' if m else ''}{'-misaligned' if o else ''}" for s, d, m, o in EIGHT_BIT_CASES])
@pytest.mark.parametrize("compact", [False, True], ids=["dense_grads", "compact_grads"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_8bit_and_compact_match_the_cpu_reference_backend(backend, dtype, compact, structure, density, master,
                                                               offset, rng):
    """Same optimizer on the GPU backend and on the CPU torch reference: 8-bit codes within one code, params close.
    Structures cover the CUDA 8-bit kernel's vector path (row blocks, head blocks, whole tensors) and its element
    path (scattered columns, element masks, odd shapes, parameters viewed off 16-byte alignment)."""
    _need(backend)
    if master and dtype == torch.float32:
        pytest.skip("master weights apply to bf16/fp16 parameters")
    cpu_params = make_params(dtype, rng, BIG)
    mask = make_mask(cpu_params, structure, density, rng)
    gpu_params = {n: _gpu_copy(p, offset) for n, p in cpu_params.items()}
    kw = dict(mask=mask, lr=1e-2, state_bits=8, compact_grads=compact, master_weights=master)
    ref = MaskedAdamW([(n, cpu_params[n]) for n in mask], backend="torch", **kw)
    gpu = MaskedAdamW([(n, gpu_params[n]) for n in mask], backend=backend, **kw)
    for _ in range(3):
        grads = fresh_grads(cpu_params, mask, rng, poison=False)
        for n in mask:
            cpu_params[n].grad, gpu_params[n].grad = grads[n].clone(), grads[n].cuda()
        if compact:  # the hooks only fire in backward; gather by hand here
            for opt, ps in ((ref, cpu_params), (gpu, gpu_params)):
                for n in mask:
                    b, s = opt._where[id(ps[n])]
                    opt._impls[b].gather(opt._buckets[b], s, ps[n].grad, opt._buckets[b].compact_grad, True)
                    ps[n].grad = None
        ref.step()
        gpu.step()
        ref.zero_grad()
        gpu.zero_grad()
    for n in mask:
        torch.testing.assert_close(gpu_params[n].detach().cpu().float(), cpu_params[n].detach().float(),
                                   rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    for codes in ("exp_avg", "exp_avg_sq"):
        diff = (getattr(gpu._buckets[0], codes).cpu().long() - getattr(ref._buckets[0], codes).long()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.02, codes
    if master:
        torch.testing.assert_close(gpu._buckets[0].master.cpu(), ref._buckets[0].master, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_8bit_codes_are_exact_at_midpoints_and_their_neighbours(backend):
    """The CPU test of the same name for the GPU kernels: codes bit-exact against the reference quantizer at every
    midpoint, its float neighbours, zeros and denormals (IEEE division: no fast-math slip at a tie)."""
    _need(backend)
    assert_8bit_codes_exact(backend, "cuda")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_step_does_not_sync_the_host(backend, rng):
    _need(backend)
    params = {n: torch.nn.Parameter(p.cuda()) for n, p in make_params(torch.bfloat16, rng, BIG).items()}
    mask = make_mask(params, "rows", 0.05, rng)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=1e-3, backend=backend, master_weights=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for n in mask:
        params[n].grad = torch.randn_like(params[n])
    opt.step()  # warm-up: compiles kernels, uploads addresses, initializes the master copy
    sched.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            opt.clip_grad_norm_(1.0)
            opt.step()
            sched.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_replays_the_eager_trajectory(backend, rng):
    _need(backend)
    cpu_params = make_params(torch.float32, rng, BIG)
    mask = make_mask(cpu_params, "cols", 0.1, rng)
    grads = [fresh_grads(cpu_params, mask, rng, poison=False) for _ in range(4)]
    results = []
    for mode in ("eager", "graph"):
        params = {n: torch.nn.Parameter(p.detach().cuda()) for n, p in cpu_params.items()}
        lr = torch.tensor(1e-2, device="cuda")
        opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=lr, backend=backend)
        static = {n: torch.zeros_like(params[n]) for n in mask}
        for n in mask:
            params[n].grad = static[n]
        for n in mask:
            static[n].copy_(grads[0][n])
        opt.step()  # eager warm-up step (also the first step of both trajectories)
        graph = torch.cuda.CUDAGraph()
        if mode == "graph":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.cuda.graph(graph):
                opt.step()
            torch.cuda.current_stream().wait_stream(stream)
        for i, g in enumerate(grads[1:]):
            lr.fill_(1e-2 * (0.5 ** (i + 1)))  # a tensor learning rate changes inside the graph too
            for n in mask:
                static[n].copy_(g[n])
            graph.replay() if mode == "graph" else opt.step()
        torch.cuda.synchronize()
        results.append({n: params[n].detach().cpu() for n in mask})
    for n in mask:
        assert torch.equal(results[0][n], results[1][n]), n


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned_view"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "bf16_master"])
def test_cuda_vector_and_scalar_paths_match_fp64_oracle(dtype, offset, rng):
    """Aligned row blocks and column runs take the CUDA vector path; a parameter viewed at a 1-element offset of its
    storage (not 16-byte aligned) must fall back to the scalar path with the same results."""
    _need("cuda")
    dt, master = DTYPES[dtype]
    cpu_params = make_params(dt, rng, {"w_q": (256, 136), "w_o": (136, 256), "w_odd": (37, 29)})
    mask = Mask().add("w_q", (256, 136), "rows", list(range(64)) + list(range(200, 208)))  # head-like row blocks
    mask.add("w_o", (136, 256), "cols", list(range(16, 48)) + list(range(64, 72)))  # runs of 32 and 8 columns
    mask.add("w_odd", (37, 29), "rows", [3, 4, 10])  # 29-element rows: never vectorizable
    params = {n: _gpu_copy(p, offset) for n, p in cpu_params.items()}
    for n in params:
        assert (params[n].data_ptr() % 16 == 0) == (offset == 0)
    _three_steps_match_the_oracle(params, cpu_params, mask, "cuda", master, rng)

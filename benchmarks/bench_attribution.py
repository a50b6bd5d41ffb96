"""Attribution patching: mu_fast vs TransformerLens, nnsight and plain HF hooks, same run, same machine.

Workload (every implementation computes the same scores): denoising AtP of the logit difference at the last
position, for every attention head (z = o_proj input) and every MLP output, summed over B prompts of T
tokens. Before timing, each peer's head scores are compared with mu_fast's (Spearman ≥ 0.99 required).

* CPU: the organism's shape (4 layers, d=128, vocab 600; 80 prompts) and a small Llama-shaped model
  (8 layers, d=512, vocab 32k), random weights, fp32. Peers: plain HF hooks, TransformerLens
  TransformerBridge (the Attribution_Patching_Demo recipe and an expert names_filter version) and nnsight
  (its attribution-patching pattern), each when importable. Also the organism-sized causal_trace call.
* GPU: random-weight Llama-3-8B / Gemma-2-9B / Gemma-7B shapes in bf16, batches 1/32/128 at T = 24 and
  batch 8 at T = 512; mu_fast (Triton and torch kernels) vs plain HF hooks (TL/nnsight are not installed on
  the GPU machine). Physics: tokens/s, % of the 6·N FLOP/token limit at the measured bf16 GEMM peak, peak
  memory and its ratio to a plain forward+backward of the same batch, and the largest batch estimated from
  the measured per-row memory.

Run (GPU): python -m pytest benchmarks/bench_attribution.py --benchmark-only \
         --benchmark-json benchmarks/results/<device>/bench_attribution.json
Run (CPU): the same with --benchmark-timer time.process_time (one thread; MU_FAST_BENCH_THREADS overrides).
"""

from __future__ import annotations

import functools
import gc
import os
import time
import warnings
from typing import Any

import pytest
import torch

from benchmarks import attribution_peers as peers
from benchmarks.common import context, peak_bytes, reset_peak, sync
from mu_fast.localize.attribution import attribute
from mu_fast.localize.metrics import logit_diff
from mu_fast.models.tiny import REAL_SHAPES, make_config

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
CPU_MODELS = {
    "organism": dict(arch="llama", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=32, vocab_size=600),
    "small-llama": dict(arch="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, head_dim=64, vocab_size=32000),
}
CPU_CASES = [("organism", 80, 24), ("small-llama", 16, 24)]
GPU_MODELS = {name: REAL_SHAPES[name] for name in ("llama3-8b", "gemma2-9b", "gemma-7b")}
GPU_CASES = [(m, B, T) for m in GPU_MODELS for B, T in ((1, 24), (32, 24), (128, 24), (8, 512))]
ROUNDS = int(os.environ.get("MU_FAST_BENCH_ROUNDS", "3"))


if not GPU:
    # The CPU is shared with other jobs: one thread and --benchmark-timer time.process_time give CPU time that
    # does not depend on the load (recorded in context()["device"]).
    torch.set_num_threads(int(os.environ.get("MU_FAST_BENCH_THREADS", "1")))


@functools.lru_cache(maxsize=1 if GPU else 2)
def _model(name: str, copy: int = 0) -> Any:
    """Random-weight model (seed 0); ``copy`` > 0 builds an identical separate instance for wrappers that
    change the model they wrap (TransformerBridge switches it to eager attention)."""
    import transformers

    shape = dict((GPU_MODELS if GPU else CPU_MODELS)[name])
    arch = shape.pop("arch")
    # Eager attention where soft-capping needs it (Gemma-2); SDPA elsewhere, as a user would run them.
    impl = "eager" if arch == "gemma2" else "sdpa"
    if arch == "gemma2":
        shape.setdefault("sliding_window", 4096)  # Gemma-2-9B's window (make_config's tiny default is 16)
    config = make_config(arch, attn_implementation=impl, max_position_embeddings=1024, **shape)
    dtype = torch.bfloat16 if GPU else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


@functools.lru_cache(maxsize=1)
def peak_tflops() -> float:
    """Measured dense GEMM peak (bf16 on GPU; fp32 process time on the CPU's benchmark threads) that the
    6·N FLOP/token limit is taken against."""
    n = 8192 if GPU else 1536
    dtype = torch.bfloat16 if GPU else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        a @ a
    sync()
    reps = 20 if GPU else 5
    clock = time.perf_counter if GPU else time.process_time
    t = clock()
    for _ in range(reps):
        a @ a
    sync()
    return 2 * n**3 * reps / (clock() - t) / 1e12


def _inputs(model: Any, B: int, T: int) -> tuple[torch.Tensor, ...]:
    V = model.config.vocab_size
    gen = torch.Generator().manual_seed(B * 1000 + T)
    clean = torch.randint(3, V, (B, T), generator=gen)
    corrupt = clean.clone()
    corrupt[:, 2 : 2 + max(1, T // 8)] = torch.randint(3, V, (B, max(1, T // 8)), generator=gen)
    correct = torch.randint(3, V, (B,), generator=gen)
    wrong = torch.randint(3, V, (B, 2), generator=gen)
    return tuple(t.to(DEVICE) for t in (clean, corrupt, correct, wrong))


def _non_embedding_params(model: Any) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def _mu_fast(backend: str):
    def run(model: Any, clean, corrupt, correct, wrong) -> dict[str, torch.Tensor]:
        res = attribute(model, clean, corrupt, logit_diff(correct, wrong, None), sites=("head", "mlp"), reduce="sum", backend=backend)
        return {"heads": res.heads, "mlp": res.mlp}

    return run


def _tokenizer(V: int) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(V)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t0", add_bos_token=True, name_or_path="bench")


@functools.lru_cache(maxsize=1)
def _wrapped(kind: str, name: str) -> Any:
    """A TransformerBridge or nnsight LanguageModel around an identical copy of the HF model."""
    model = _model(name, copy=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "tl":
            tl = pytest.importorskip("transformer_lens")
            return tl.TransformerBridge.boot_transformers(f"bench-{name}", hf_model=model, tokenizer=_tokenizer(model.config.vocab_size))
        nnsight = pytest.importorskip("nnsight")
        return nnsight.LanguageModel(model, tokenizer=_tokenizer(model.config.vocab_size))


def _impls() -> list[tuple[str, str, Any, str | None]]:
    """(impl name, role, function, wrapper kind)."""
    out = [("mu_fast triton", "ours", _mu_fast("triton"), None)] if GPU else []
    out += [("mu_fast torch", "ours", _mu_fast("torch"), None)]
    # The reference path is the oracle on the GPU (run once per case), timed on the CPU only.
    out += [] if GPU else [("mu_fast reference", "ours", _mu_fast("reference"), None)]
    out += [("plain HF hooks", "peer", peers.plain_hf_hooks, None)]
    if not GPU:
        out += [
            ("TL bridge tutorial", "peer", peers.tl_tutorial, "tl"),
            ("TL bridge expert", "peer", peers.tl_expert, "tl"),
            ("nnsight docs", "peer", peers.nnsight_docs, "nnsight"),
        ]
    return out


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from mu_fast.localize.verify import spearman

    return spearman(a.flatten().double().cpu(), b.flatten().double().cpu())


def _fwd_bwd_peak(model: Any, clean: torch.Tensor) -> int | None:
    """Peak memory of a plain forward + input-gradient backward of the same batch (the ≤ 1.5× reference)."""
    if not GPU:
        return None
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        reset_peak()
        embeds = model.get_input_embeddings()(clean).detach().requires_grad_(True)
        hidden = model.model(inputs_embeds=embeds).last_hidden_state
        model.lm_head(hidden[:, -1]).float().sum().backward()
        sync()
        return peak_bytes()
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


CASES = GPU_CASES if GPU else CPU_CASES
# Case-major order, so each model is built once and the previous one is freed before the next.
PARAMS = [(case, impl) for case in CASES for impl in _impls()]
_per_case: dict[tuple, dict[str, Any]] = {}
_current: str | None = None


def _case_reference(model: Any, case: tuple, inputs: tuple) -> dict[str, Any]:
    """mu_fast's reference scores and the plain forward+backward peak, once per case."""
    if case not in _per_case:
        _per_case.clear()
        _per_case[case] = {"scores": _mu_fast("reference")(model, *inputs), "fwd_bwd_peak": _fwd_bwd_peak(model, inputs[0])}
    return _per_case[case]


@pytest.mark.parametrize("case,impl", PARAMS, ids=[f"{c[0]}-B{c[1]}-T{c[2]}-{i[0].replace(' ', '_')}" for c, i in PARAMS])
def test_atp_heads_mlp(benchmark, case, impl):
    name, B, T = case
    label, role, fn, wrapper = impl
    global _current
    if GPU and _current not in (None, name):  # free the previous model before building the next
        _model.cache_clear()
        _per_case.clear()
        gc.collect()
        torch.cuda.empty_cache()
    _current = name
    model = _model(name)
    target = _wrapped(wrapper, name) if wrapper else model
    inputs = _inputs(model, B, T)
    try:
        ref = _case_reference(model, case, inputs)
        weights = torch.cuda.memory_allocated() if GPU else 0
        reset_peak()
        scores = fn(target, *inputs)
        sync()
    except torch.cuda.OutOfMemoryError:
        pytest.skip(f"{label} runs out of GPU memory at B={B}, T={T}")
    peak = peak_bytes()
    rho = _spearman(scores["heads"], ref["scores"]["heads"])
    rel = float((scores["heads"].float() - ref["scores"]["heads"].float()).norm() / ref["scores"]["heads"].float().norm())
    assert rho >= 0.99, f"{label} head scores disagree with mu_fast's reference (Spearman {rho:.4f})"
    benchmark.group = f"atp heads+mlp {name} B={B} T={T}"
    benchmark.pedantic(lambda: (fn(target, *inputs), sync()), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    tokens_per_s = B * T / median
    N = _non_embedding_params(model)
    info = dict(impl=label, role=role, model=name, batch=B, tokens=T, tokens_per_s=tokens_per_s,
                spearman_vs_reference=rho, rel_err_vs_reference=rel, non_embedding_params=N,
                peak_tflops_measured=peak_tflops(), pct_6n=100 * tokens_per_s * 6 * N / (peak_tflops() * 1e12), **context())
    if GPU and peak is not None:
        ref_peak = ref["fwd_bwd_peak"]
        info.update(
            peak_mb=peak / 2**20, fwd_bwd_peak_mb=ref_peak / 2**20, peak_vs_fwd_bwd=peak / ref_peak,
            act_peak_vs_fwd_bwd=(peak - weights) / max(ref_peak - weights, 1),  # memory above the weights
        )
        free = torch.cuda.get_device_properties(0).total_memory - weights
        info["est_max_batch"] = int(B * free / max(peak - weights, 1))  # from the measured memory per row
    benchmark.extra_info.update(info)


@pytest.mark.skipif(GPU, reason="the organism-sized causal_trace call is a CPU pipeline workload")
def test_causal_trace_organism(benchmark):
    from mu_fast.data.base import pad_batch
    from mu_fast.localize.causal_tracing import causal_trace

    model = _model("organism")
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 600, (int(n),), generator=gen).tolist() for n in torch.randint(10, 31, (80,), generator=gen)]
    batch = pad_batch(ids, 0)
    answers = torch.randint(3, 600, (80,), generator=gen)
    span = dict(subject_first=torch.full((80,), 2), subject_last=torch.full((80,), 4))
    benchmark.group = "causal_trace organism (80 prompts, heads+mlp)"
    benchmark.pedantic(lambda: causal_trace(model, batch, sites=("head", "mlp"), answer_ids=answers, **span), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    tokens = int(batch.attention_mask.sum())
    benchmark.extra_info.update(impl="mu_fast causal_trace", role="ours", tokens_per_s=tokens / benchmark.stats.stats.median, **context())

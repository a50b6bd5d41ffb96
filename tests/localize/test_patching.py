"""Batched exact patching (attribute(method="exact"), verify) against one-patch-at-a-time forwards."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from mu_fast.data.base import pad_batch
from mu_fast.localize.attribution import attribute
from mu_fast.localize.metrics import logit_diff, logprob
from mu_fast.models.sites import SiteTable
from mu_fast.models.tiny import make_tiny_model

V = 97


@functools.lru_cache(maxsize=None)
def tiny(arch: str, init: float = 0.25):
    impl = "eager" if arch == "gemma2" else "sdpa"
    return make_tiny_model(arch, seed=5, dtype=torch.float64, initializer_range=init, attn_implementation=impl)


def make_pair(rng, lengths=(6, 4, 5)):
    clean = [torch.randint(3, V, (n,), generator=rng).tolist() for n in lengths]
    corrupt = [[int(torch.randint(3, V, (1,), generator=rng)) if t in (1, 2) else x for t, x in enumerate(s)] for s in clean]
    B = len(lengths)
    return clean, corrupt, torch.randint(3, V, (B,), generator=rng), torch.randint(3, V, (B, 3), generator=rng)


def site_of(table: SiteTable, kind: str, layer: int):
    return {
        "head": (table.module_path(layer, "o"), "input", table.head_dim),
        "neuron": (table.module_path(layer, "down"), "input", 1),
        "mlp": (table.mlp_path(layer), "output", table.d_model),
        "attn": (table.module_path(layer, "o"), "output", table.d_model),
        "layer": (table.layer_path(layer), "output", table.d_model),
    }[kind]


def run(model, batch, metric, hooks=()):
    handles = []
    for path, io, fn in hooks:
        module = model.get_submodule(path)
        if io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a, fn=fn: (fn(a[0]), *a[1:])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, fn=fn: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)))
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(batch.input_ids.shape[0])
    return metric(out.logits[rows, batch.last_pos].double(), rows, batch)


def one_at_a_time(model, base, other, metric, kind, layer, group):
    """M(base with one unit's activation taken from other at every real position) − M(base), per prompt."""
    path, io, size = site_of(SiteTable(model), kind, layer)
    got = {}
    run(model, other, metric, [(path, io, lambda x: got.setdefault("a", x.clone()))])
    cols = slice(group * size, (group + 1) * size)
    real = base.attention_mask.bool()

    def patch(x):
        x = x.clone()
        x[..., cols] = torch.where(real[:, :, None], got["a"][..., cols], x[..., cols])
        return x

    return run(model, base, metric, [(path, io, patch)]) - run(model, base, metric)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2", "qwen2", "mistral"])
def test_batched_exact_equals_one_at_a_time(arch, rng):
    model = tiny(arch)
    table = SiteTable(model)
    clean, corrupt, correct, wrong = make_pair(rng)
    metric = logit_diff(correct, wrong, normalize=None)
    kinds = ("head", "neuron", "mlp", "attn", "layer")
    res = attribute(model, clean, corrupt, metric, sites=kinds, method="exact", direction="noise", max_rows=64)
    base, other = pad_batch(clean, 0), pad_batch(corrupt, 0)
    units = [("head", L, h) for L in range(table.n_layers) for h in range(table.n_heads)]
    units += [("neuron", 1, 0), ("neuron", 0, 29), ("mlp", 0, 0), ("mlp", 1, 0), ("attn", 1, 0), ("layer", 0, 0)]
    for kind, layer, group in units:
        expect = one_at_a_time(model, base, other, metric, kind, layer, group)
        key = {"head": "heads", "neuron": "neurons"}.get(kind, kind)
        got = res.per_prompt[key][:, layer, group] if kind in ("head", "neuron") else res.per_prompt[key][:, layer]
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-11, msg=f"{kind}{layer}.{group}")


def test_exact_chunking_and_backends_agree(rng):
    model = tiny("llama")
    clean, corrupt, correct, wrong = make_pair(rng)
    metric = logprob(correct)
    kinds = ("head", "neuron", "mlp")
    big = attribute(model, clean, corrupt, metric, sites=kinds, method="exact", max_rows=4096)
    small = attribute(model, clean, corrupt, metric, sites=kinds, method="exact", max_rows=16, micro_batch=2)
    # Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py).
    target = copy.deepcopy(model).to("cuda") if torch.cuda.is_available() else model
    tri = attribute(target, clean, corrupt, metric, sites=("head",), method="exact", backend="triton")
    for key in big.per_prompt:
        torch.testing.assert_close(small.per_prompt[key], big.per_prompt[key], rtol=1e-9, atol=1e-12)
    rtol = 1e-5 if torch.cuda.is_available() else 1e-9  # CUDA rounds the fp32 RMSNorm differently
    for key in tri.per_prompt:
        torch.testing.assert_close(tri.per_prompt[key].cpu(), big.per_prompt[key], rtol=rtol, atol=1e-12 + rtol * float(big.per_prompt[key].abs().max()))


def test_exact_layer_output_patch_is_total_effect(rng):
    # Patching the whole residual stream after the last layer at every position makes the base run the other
    # run: the effect is exactly M(other) − M(base), i.e. −1 for the normalised noising metric.
    model = tiny("gemma2")
    clean, corrupt, correct, wrong = make_pair(rng)
    res = attribute(model, clean, corrupt, logit_diff(correct, wrong, normalize="prompt"), sites=("layer",), method="exact", direction="noise")
    torch.testing.assert_close(res.per_prompt["layer"][:, -1], torch.full((3,), -1.0, dtype=torch.float64), rtol=0, atol=1e-6)


def test_verify_exact_result_is_perfect_and_atp_ranks_well(rng):
    clean, corrupt, correct, wrong = make_pair(rng)
    metric = logit_diff(correct, wrong)
    model = tiny("llama")
    exact = attribute(model, clean, corrupt, metric, sites=("head", "mlp"), method="exact")
    report = exact.verify(k=4, n_random=4)
    assert report.spearman == pytest.approx(1.0) and report.topk_recall == 1.0 and report.sign_agreement == 1.0
    torch.testing.assert_close(report.attribution, report.exact, rtol=1e-9, atol=1e-12)
    assert len(report.labels) == 8 and report.labels[0] == exact.topk(1)[0][0]
    # Near-linear weights: first-order attribution ranks units like exact patching.
    linear = tiny("llama", init=0.02)
    atp = attribute(linear, clean, corrupt, metric, sites=("head", "neuron", "mlp"))
    report = atp.verify(k=10, n_random=20)
    assert report.spearman > 0.95 and report.topk_recall >= 0.8 and report.sign_agreement >= 0.9


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefix_reuse_equals_full_forwards(arch, rng):
    from mu_fast.localize.patching import capture_sites, patched_metric_values
    from mu_fast.localize.sites_hooks import resolve_sites

    model = tiny(arch)
    table = SiteTable(model)
    clean, corrupt, correct, wrong = make_pair(rng)
    side = "right" if arch == "gemma2" else "left"  # fp64 + eager + left padding gives NaN in transformers 5
    base, other = pad_batch(clean, 0, side=side), pad_batch(corrupt, 0, side=side)
    sites = resolve_sites(table, ("head", "mlp", "layer"))
    acts, _ = capture_sites(model, other, sites)
    variants = [[], [("layer", 1, 0)], [("head", 1, 2), ("mlp", 0, 0)], [("head", 0, 1)], [], [("mlp", 1, 0)]]
    noise = torch.randn(3, base.input_ids.shape[1], table.d_model, generator=rng, dtype=torch.float64) * 0.1
    metric = logprob(correct)
    kw = dict(rows=torch.arange(3), pos_mask=other.attention_mask.bool(), embed_fn=lambda e: e + noise, max_rows=6)
    full = patched_metric_values(model, table, base, acts, variants, metric, reuse_prefix=False, **kw)
    reuse = patched_metric_values(model, table, base, acts, variants, metric, reuse_prefix=True, **kw)
    torch.testing.assert_close(reuse, full, rtol=1e-9, atol=1e-11)
    assert not torch.allclose(full[1], full[0])

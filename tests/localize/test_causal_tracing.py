"""causal_trace() and the corruptions, against one-restoration-at-a-time forwards with the same noise."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mu_fast.data.base import PromptSet, TokenizedPrompts, pad_batch
from mu_fast.localize.causal_tracing import _noise_seed, causal_trace
from mu_fast.localize.corrupt import noise_scale, replace_subject_tokens, subject_mask, subject_noise
from mu_fast.models.sites import SiteTable
from mu_fast.models.tiny import make_tiny_model

V = 97


@functools.lru_cache(maxsize=None)
def tiny(arch: str):
    impl = "eager" if arch == "gemma2" else "sdpa"
    return make_tiny_model(arch, seed=7, dtype=torch.float64, initializer_range=0.4, attn_implementation=impl)


def prompts(rng, lengths=(7, 5, 6)):
    ids = [torch.randint(3, V, (n,), generator=rng).tolist() for n in lengths]
    first = torch.tensor([1, 1, 2])[: len(lengths)]
    last = torch.tensor([3, 2, 3])[: len(lengths)]
    answers = torch.randint(3, V, (len(lengths),), generator=rng)
    return ids, first, last, answers


def forward_prob(model, batch, answers, embed_add=None, hook=None):
    handles = []
    if embed_add is not None:
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + embed_add))
    if hook is not None:
        module, io, fn = hook
        if io == "input":
            handles.append(module.register_forward_pre_hook(lambda m, a: (fn(a[0]), *a[1:])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, out: fn(out)))
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits[torch.arange(batch.input_ids.shape[0]), batch.last_pos].double()
    return torch.softmax(logits, -1)[torch.arange(len(answers)), answers]


@pytest.mark.parametrize("arch,noise", [("llama", "3sigma"), ("gemma2", "sqrt3sigma")])
def test_causal_trace_equals_one_restoration_at_a_time(arch, noise, rng):
    model = tiny(arch)
    table = SiteTable(model)
    ids, first, last, answers = prompts(rng)
    batch = pad_batch(ids, 0)
    res = causal_trace(model, batch, sites=("head", "mlp"), noise=noise, samples=2, seed=11, answer_ids=answers, subject_first=first, subject_last=last, max_rows=16)
    # Independent σ: std of all subject-token embedding entries.
    mask = subject_mask(batch, first, last)
    with torch.no_grad():
        emb = model.get_input_embeddings()(batch.input_ids)
    sigma = float(emb[mask].std())
    scale = 3 * sigma if noise == "3sigma" else math.sqrt(3 * sigma)
    assert res.info["noise_scale"] == pytest.approx(scale, rel=1e-12)
    B, T = batch.input_ids.shape
    noises = [torch.cat([subject_noise((1, T, table.d_model), mask[i : i + 1], scale, _noise_seed(11, i, s), emb.dtype, "cpu") for i in range(B)]) for s in range(2)]
    p_clean = forward_prob(model, batch, answers)
    p_corr = sum(forward_prob(model, batch, answers, embed_add=n) for n in noises) / 2
    torch.testing.assert_close(res.clean_metric, p_clean, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(res.corrupt_metric, p_corr, rtol=1e-10, atol=1e-13)
    real = batch.attention_mask.bool()
    for kind, layer, group in [("head", 0, 2), ("head", 1, 0), ("mlp", 0, 0), ("mlp", 1, 0)]:
        path = table.module_path(layer, "o") if kind == "head" else table.mlp_path(layer)
        io, size = ("input", table.head_dim) if kind == "head" else ("output", table.d_model)
        clean_act = {}
        forward_prob(model, batch, answers, hook=(model.get_submodule(path), io, lambda x: clean_act.setdefault("a", x.clone())))
        cols = slice(group * size, (group + 1) * size)

        def restore(x):
            x = x.clone()
            x[..., cols] = torch.where(real[:, :, None], clean_act["a"][..., cols], x[..., cols])
            return x

        p = sum(forward_prob(model, batch, answers, embed_add=n, hook=(model.get_submodule(path), io, restore)) for n in noises) / 2
        expect = (p - p_corr) / (p_clean - p_corr)
        got = res.per_prompt["heads"][:, layer, group] if kind == "head" else res.per_prompt["mlp"][:, layer]
        torch.testing.assert_close(got, expect, rtol=1e-8, atol=1e-10, msg=f"{kind}{layer}.{group}")


def test_restoring_a_layer_output_everywhere_restores_clean(rng):
    model = tiny("qwen2")
    ids, first, last, answers = prompts(rng)
    res = causal_trace(model, pad_batch(ids, 0, side="left"), sites=("layer",), answer_ids=answers, subject_first=first, subject_last=last)
    torch.testing.assert_close(res.per_prompt["layer"], torch.ones(3, model.config.num_hidden_layers, dtype=torch.float64), rtol=0, atol=1e-7)


def test_restoration_positions(rng):
    model = tiny("llama")
    ids, first, last, answers = prompts(rng)
    kw = dict(sites=("layer",), answer_ids=answers, subject_first=first, subject_last=last, seed=2)
    at_last = causal_trace(model, pad_batch(ids, 0), positions="last", **kw)
    at_subject = causal_trace(model, pad_batch(ids, 0), positions="subject_last", **kw)
    # The final layer's output at the answer position is all the logits read: restoring it restores p_clean.
    torch.testing.assert_close(at_last.per_prompt["layer"][:, -1], torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-7)
    # Earlier layers restored at one position leave the other noised subject tokens in place.
    assert not torch.allclose(at_subject.per_prompt["layer"][:, 0], torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="positions"):
        causal_trace(model, pad_batch(ids, 0), positions="first", **kw)


def test_chunking_seed_and_tokenized_prompts(rng):
    model = tiny("mistral")
    ids, first, last, answers = prompts(rng)
    tp = TokenizedPrompts(ids, answers, None, None, None, None, last, PromptSet(["p"] * 3, ["a"] * 3), first)
    a = causal_trace(model, tp, sites=("head", "mlp"), seed=3)
    b = causal_trace(model, tp, sites=("head", "mlp"), seed=3, micro_batch=1, max_rows=7)
    c = causal_trace(model, tp, sites=("head", "mlp"), seed=4)
    for key in a.per_prompt:
        torch.testing.assert_close(b.per_prompt[key], a.per_prompt[key], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(a.corrupt_metric, c.corrupt_metric)
    assert a.method == "causal_tracing" and a.heads.shape == (2, 4) and a.mlp.shape == (2,)
    with pytest.raises(ValueError, match="subject spans"):
        causal_trace(model, pad_batch(ids, 0), answer_ids=answers)
    with pytest.raises(ValueError, match="noise"):
        causal_trace(model, tp, noise="5sigma")


def test_noise_rules_and_subject_mask():
    assert noise_scale("3sigma", 0.5) == 1.5
    assert noise_scale("sqrt3sigma", 0.5) == pytest.approx(math.sqrt(1.5))
    assert noise_scale(0.7, 123.0) == 0.7
    batch = pad_batch([[5, 6, 7, 8], [9, 10]], 0, side="left")
    mask = subject_mask(batch, torch.tensor([1, 0]), torch.tensor([2, 0]))
    assert mask.tolist() == [[False, True, True, False], [False, False, True, False]]


def test_replace_subject_tokens(rng):
    ids, first, last, _ = prompts(rng)
    out = replace_subject_tokens(ids, vocab_size=V, seed=1, subject_first=first, subject_last=last)
    again = replace_subject_tokens(ids, vocab_size=V, seed=1, subject_first=first, subject_last=last)
    assert out == again
    pool = [3, 4, 5]
    picked = replace_subject_tokens(ids, candidates=pool, seed=2, subject_first=first, subject_last=last)
    for seq, new, new_pool, a, b in zip(ids, out, picked, first.tolist(), last.tolist(), strict=True):
        assert len(new) == len(seq)
        for t, (x, y, z) in enumerate(zip(seq, new, new_pool, strict=True)):
            if a <= t <= b:
                assert y != x and z != x and z in pool
            else:
                assert y == x and z == x
    with pytest.raises(ValueError, match="outside"):
        replace_subject_tokens([[1, 2]], vocab_size=V, subject_first=[1], subject_last=[4])

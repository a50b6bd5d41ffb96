"""causal_trace_grid() against a brute force written here: one prompt, one noise draw, one (position, layer
window) restoration per plain forward; plus its plot, its token-kind summary and verify() on causal traces."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from mu_fast.data.base import pad_batch
from mu_fast.localize.causal_trace_grid import TOKEN_KINDS, causal_trace_grid
from mu_fast.localize.causal_tracing import _noise_seed, causal_trace
from mu_fast.models.sites import SiteTable
from mu_fast.models.tiny import make_tiny_model

V = 97


@functools.lru_cache(maxsize=None)
def tiny(arch: str):
    impl = "eager" if arch == "gemma2" else "sdpa"  # fp64 + eager + left padding gives NaN in transformers 5
    return make_tiny_model(arch, seed=7, dtype=torch.float64, initializer_range=0.4, attn_implementation=impl, num_hidden_layers=4)


def prompts(rng, lengths=(7, 5, 6)):
    ids = [torch.randint(3, V, (n,), generator=rng).tolist() for n in lengths]
    return ids, [1, 0, 2][: len(ids)], [3, 2, 3][: len(ids)], torch.randint(3, V, (len(ids),), generator=rng)


def module_of(table: SiteTable, kind: str, layer: int) -> str:
    return {"layer": table.layer_path(layer), "mlp": table.mlp_path(layer), "attn": table.module_path(layer, "o")}[kind]


def p_answer(model, ids, answer, embed_add=None, hooks=()):
    """Mean over noise draws of p(answer) at the last token of one unpadded prompt: embed_add ``[S, n, d]``
    (one row per draw; None: one clean row); hooks: (module path, fn(output tensor) -> tensor)."""
    handles = []
    rows = 1 if embed_add is None else embed_add.shape[0]
    if embed_add is not None:
        handles.append(model.get_input_embeddings().register_forward_hook(lambda m, a, out: out + embed_add))
    for path, fn in hooks:
        def post(m, a, out, fn=fn):
            return (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out)

        handles.append(model.get_submodule(path).register_forward_hook(post))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids] * rows)).logits[:, -1].double()
    finally:
        for h in handles:
            h.remove()
    return float(torch.softmax(logits, -1)[:, answer].mean())


def brute_force_grid(model, ids, first, last, answers, kind, window, samples, seed, scale):
    """``[B, T, L]`` restored p (NaN beyond each prompt), p_clean [B], p_corrupt [B]: every cell its own forwards."""
    table = SiteTable(model)
    L, d = table.n_layers, table.d_model
    T = max(len(s) for s in ids)
    restored = torch.full((len(ids), T, L), float("nan"), dtype=torch.float64)
    p_clean, p_corr = torch.zeros(len(ids), dtype=torch.float64), torch.zeros(len(ids), dtype=torch.float64)
    for i, seq in enumerate(ids):
        n = len(seq)
        clean = {}
        hooks = [(module_of(table, kind, m), lambda x, m=m: clean.setdefault(m, x.clone())) for m in range(L)]
        p_clean[i] = p_answer(model, seq, answers[i], hooks=hooks)
        noises = []
        for s in range(samples):
            z = torch.randn((1, n, d), generator=torch.Generator().manual_seed(_noise_seed(seed, i, s)), dtype=torch.float64) * scale
            z[:, : first[i]] = 0
            z[:, last[i] + 1 :] = 0
            noises.append(z)
        noise = torch.cat(noises)  # [samples, n, d]: the draws run side by side, each row its own corrupted run
        p_corr[i] = p_answer(model, seq, answers[i], embed_add=noise)
        for t in range(n):
            for l in range(L):
                layers = range(max(0, l - window // 2), min(L, l + math.ceil(window / 2)))

                def restore(x, m):
                    x = x.clone()
                    x[:, t] = clean[m][:, t]
                    return x

                hooks = [(module_of(table, kind, m), lambda x, m=m: restore(x, m)) for m in layers]
                restored[i, t, l] = p_answer(model, seq, answers[i], embed_add=noise, hooks=hooks)
    return restored, p_clean, p_corr


@pytest.mark.parametrize(
    "arch,kind,window,side,samples",
    [("llama", "layer", 1, "left", 2), ("qwen2", "mlp", 3, "left", 1), ("gemma2", "attn", 2, "right", 1), ("mistral", "mlp", 10, "right", 1)],
    ids=str,
)
def test_grid_equals_brute_force_fp64(arch, kind, window, side, samples, rng):
    model = tiny(arch)
    ids, first, last, answers = prompts(rng, lengths=(6, 4, 5))
    batch = pad_batch(ids, 0, side=side)
    grid = causal_trace_grid(
        model, batch, kind=kind, window=window, samples=samples, seed=5, answer_ids=answers, subject_first=first, subject_last=last, max_rows=24
    )
    # σ of the noise rule, independently: std of all subject-token embedding entries (the embedding module's
    # output, which Gemma scales by sqrt(d)).
    with torch.no_grad():
        emb = [model.get_input_embeddings()(torch.tensor(s[a : b + 1])).flatten() for s, a, b in zip(ids, first, last)]
    sigma = float(torch.cat(emb).std())
    assert grid.info["noise_scale"] == pytest.approx(3 * sigma, rel=1e-12)
    restored, p_clean, p_corr = brute_force_grid(model, ids, first, last, answers.tolist(), kind, window, samples, 5, 3 * sigma)
    # fp64 throughout: the batched grid matched the one-cell-per-forward brute force to ~1e-15 relative
    # (max abs 1.4e-17 on p ~ 0.1); the tolerance leaves room for other BLAS reduction orders.
    tol = dict(rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grid.clean_metric, p_clean, **tol)
    torch.testing.assert_close(grid.corrupt_metric, p_corr, **tol)
    torch.testing.assert_close(grid.restored, restored, equal_nan=True, **tol)
    assert grid.effects.shape == (3, 6, 4) and grid.prompt(1).shape == (4, 4)
    torch.testing.assert_close(grid.prompt(1), restored[1, :4] - p_corr[1], **tol)
    # The same noise as causal_trace: the same corrupted run.
    ct = causal_trace(model, batch, sites=("mlp",), samples=samples, seed=5, answer_ids=answers, subject_first=first, subject_last=last)
    torch.testing.assert_close(ct.corrupt_metric, grid.corrupt_metric, rtol=1e-9, atol=1e-12)


def test_grid_chunking_normalisation_and_token_kinds(rng):
    model = tiny("llama")
    ids, first, last, answers = prompts(rng, lengths=(7, 5, 6))
    kw = dict(kind="mlp", window=2, seed=1, answer_ids=answers, subject_first=first, subject_last=last)
    whole = causal_trace_grid(model, pad_batch(ids, 0), **kw)
    chunked = causal_trace_grid(model, pad_batch(ids, 0, side="left"), max_rows=3, micro_batch=1, **kw)
    torch.testing.assert_close(chunked.restored, whole.restored, rtol=1e-9, atol=1e-12, equal_nan=True)
    norm = causal_trace_grid(model, pad_batch(ids, 0), normalize="prompt", **kw)
    gap = (whole.clean_metric - whole.corrupt_metric)[:, None, None]
    torch.testing.assert_close(norm.effects, whole.effects / gap, equal_nan=True)
    # Last layer's hidden state at the last token is all the logits read: restoring it restores p_clean.
    layer = causal_trace_grid(model, pad_batch(ids, 0), kind="layer", normalize="prompt", seed=1, answer_ids=answers, subject_first=first, subject_last=last)
    for i, n in enumerate((7, 5, 6)):
        assert float(layer.prompt(i)[n - 1, -1]) == pytest.approx(1.0, abs=1e-9)
        assert bool((layer.prompt(i)[: first[i]].abs() <= 1e-12).all())  # tokens before the subject are not noised
    kinds, summary = whole.by_token_kind()
    assert kinds == TOKEN_KINDS and summary.shape == (7, 4)
    e = whole.effects
    torch.testing.assert_close(summary[TOKEN_KINDS.index("last")], torch.stack([e[0, 6], e[1, 4], e[2, 5]]).mean(0))
    torch.testing.assert_close(summary[TOKEN_KINDS.index("last subject")], torch.stack([e[0, 3], e[1, 2], e[2, 3]]).mean(0))
    with pytest.raises(ValueError, match="kind must be one of"):
        causal_trace_grid(model, pad_batch(ids, 0), kind="head", answer_ids=answers, subject_first=first, subject_last=last)
    with pytest.raises(ValueError, match="window must be a positive"):
        causal_trace_grid(model, pad_batch(ids, 0), window=0, answer_ids=answers, subject_first=first, subject_last=last)


def test_plot_causal_trace(tmp_path, rng):
    from mu_fast.localize.causal_tracing_plot import plot_causal_trace

    model = tiny("llama")
    ids, first, last, answers = prompts(rng)
    grid = causal_trace_grid(model, pad_batch(ids, 0), kind="attn", window=3, answer_ids=answers, subject_first=first, subject_last=last)
    path = tmp_path / "trace.png"
    fig = plot_causal_trace(grid, prompt=2, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"{t}*" if first[2] <= i <= last[2] else str(t) for i, t in enumerate(ids[2])]
    drawn = torch.as_tensor(ax.collections[0].get_array()).reshape(6, 4)
    torch.testing.assert_close(drawn, grid.prompt(2))
    with pytest.raises(ValueError, match="out of range"):
        plot_causal_trace(grid, prompt=3)


@pytest.mark.parametrize("positions", ["all", "subject_last"])
def test_verify_causal_trace_result(positions, rng):
    model = tiny("qwen2")
    ids, first, last, answers = prompts(rng)
    res = causal_trace(
        model, pad_batch(ids, 0, side="left"), sites=("head", "mlp"), samples=2, seed=2, answer_ids=answers,
        subject_first=first, subject_last=last, positions=positions, max_rows=20,
    )
    report = res.verify(k=5, n_random=4)
    assert len(report.labels) == 9 and report.labels[0] == res.topk(1)[0][0]
    torch.testing.assert_close(report.exact, report.attribution, rtol=1e-8, atol=1e-10)
    assert report.topk_recall == 1.0 and report.sign_agreement == 1.0
    # Wrong traced scores are caught: verify re-measures the restorations, it does not read the scores back.
    for key in res.per_prompt:
        res.per_prompt[key] *= -1
    flipped = res.verify(k=5, n_random=4)
    assert flipped.labels == report.labels
    torch.testing.assert_close(flipped.exact, report.exact, rtol=1e-12, atol=1e-14)
    assert flipped.sign_agreement == 0.0 and flipped.spearman == pytest.approx(-1.0)

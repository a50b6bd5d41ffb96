"""``noise="sqrt3sigma_per_prompt"``: the authors' causal-tracing noise, each prompt scaled by sqrt(3σ) of its *own*
subject-token embeddings (their localizer's ``get_embedding_std``), checked against forwards with independently
built noise; the pooled ``sqrt3sigma`` stays as it was."""

from __future__ import annotations

import math

import pytest
import torch

from mu_fast.data.base import pad_batch
from mu_fast.localize.causal_trace_grid import causal_trace_grid
from mu_fast.localize.causal_tracing import _noise_seed, causal_trace
from mu_fast.localize.corrupt import subject_mask, subject_noise
from mu_fast.models.sites import SiteTable
from tests.localize.test_causal_tracing import forward_prob, prompts, tiny


def per_prompt_sigmas(model, batch, first, last) -> list[float]:
    """σ_i: std of all embedding entries of prompt i's subject tokens (one prompt at a time)."""
    with torch.no_grad():
        emb = model.get_input_embeddings()(batch.input_ids)
    mask = subject_mask(batch, first, last)
    return [float(emb[i][mask[i]].std()) for i in range(batch.input_ids.shape[0])]


@pytest.mark.parametrize("samples", [1, 2])
def test_per_prompt_noise_equals_independent_forwards(samples, rng):
    model = tiny("llama")
    table = SiteTable(model)
    ids, first, last, answers = prompts(rng)
    batch = pad_batch(ids, 0)
    res = causal_trace(model, batch, sites=("mlp",), noise="sqrt3sigma_per_prompt", samples=samples, seed=5,
                       answer_ids=answers, subject_first=first, subject_last=last, max_rows=4)
    sigmas = per_prompt_sigmas(model, batch, first, last)
    scales = [math.sqrt(3 * s) for s in sigmas]
    assert len(set(scales)) == len(scales)  # the prompts' σ differ, so pooling would change them
    assert res.info["noise_scale"] == pytest.approx(scales, rel=1e-12)
    assert res.info["embedding_std"] == pytest.approx(sigmas, rel=1e-12)
    B, T = batch.input_ids.shape
    mask = subject_mask(batch, first, last)
    dtype = next(model.parameters()).dtype
    noises = [torch.cat([subject_noise((1, T, table.d_model), mask[i : i + 1], scales[i], _noise_seed(5, i, s), dtype, "cpu")
                         for i in range(B)]) for s in range(samples)]
    p_clean = forward_prob(model, batch, answers)
    p_corr = sum(forward_prob(model, batch, answers, embed_add=n) for n in noises) / samples
    torch.testing.assert_close(res.corrupt_metric, p_corr, rtol=1e-10, atol=1e-13)
    # One restoration (MLP 1's clean output at every real position) in the per-prompt noised runs.
    module = model.get_submodule(table.mlp_path(1))
    clean = {}
    forward_prob(model, batch, answers, hook=(module, "output", lambda x: clean.setdefault("a", x.clone())))
    real = batch.attention_mask.bool()[:, :, None]
    restored = sum(forward_prob(model, batch, answers, embed_add=n,
                                hook=(module, "output", lambda x: torch.where(real, clean["a"], x))) for n in noises) / samples
    want = ((restored - p_corr) / (p_clean - p_corr)).mean()
    torch.testing.assert_close(res.mlp[1].double(), want, rtol=1e-8, atol=1e-11)
    # The grid draws the same per-prompt noise for the same seed.
    grid = causal_trace_grid(model, batch, noise="sqrt3sigma_per_prompt", samples=samples, seed=5, answer_ids=answers,
                             subject_first=first, subject_last=last)
    torch.testing.assert_close(grid.corrupt_metric, res.corrupt_metric, rtol=1e-10, atol=1e-13)


def test_pooled_rule_is_unchanged_and_per_prompt_takes_no_sigma(rng):
    model = tiny("llama")
    ids, first, last, answers = prompts(rng)
    batch = pad_batch(ids, 0)
    kwargs = dict(answer_ids=answers, subject_first=first, subject_last=last, sites=("mlp",), seed=3)
    pooled = causal_trace(model, batch, noise="sqrt3sigma", **kwargs)
    mask = subject_mask(batch, first, last)
    with torch.no_grad():
        sigma = float(model.get_input_embeddings()(batch.input_ids)[mask].std())
    assert pooled.info["noise_scale"] == pytest.approx(math.sqrt(3 * sigma), rel=1e-12)
    per_prompt = causal_trace(model, batch, noise="sqrt3sigma_per_prompt", **kwargs)
    assert not torch.allclose(per_prompt.corrupt_metric, pooled.corrupt_metric)
    with pytest.raises(ValueError, match="own subject tokens; drop embedding_std"):
        causal_trace(model, batch, noise="sqrt3sigma_per_prompt", embedding_std=0.3, **kwargs)

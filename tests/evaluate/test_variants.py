"""evaluate_task_variants / probe_features_variants: the K configurations of a BatchedDeltas scored (or their probe
features collected) in one forward per batch equal ``evaluate_task`` (``latent_probes``) under ``deltas.variant(k)``
for every k, format and split (probe setting, position and padding).

fp64 models: the batched forward adds x·D to x·W0 (or multiplies by W0 + D for a whole weight) where the variant
multiplies by the written weight, so the numbers differ only by float summation order (~1e-16); 1e-9 catches any
wrong row, group or configuration. Argmax fields are compared exactly (ties have probability zero here).
"""

from __future__ import annotations

import pytest
import torch

from mu_fast.edit.batched import BatchedDeltas
from mu_fast.evaluate import evaluate_task, evaluate_task_variants, prompt_scores, prompt_scores_variants
from mu_fast.evaluate.formats import tokenized_set
from mu_fast.evaluate.linear_probes import collect_hidden, collect_hidden_variants
from mu_fast.evaluate.metrics import variant_prompts_per_batch
from mu_fast.evaluate.probes import latent_probes, probe_features, probe_features_variants
from tests._tiny_task import STRUCTURE_NAMES, structured_masks

TOL = 1e-9
STRUCTURES = STRUCTURE_NAMES
_masks = structured_masks  # three configurations' masks of one structure


def _deltas(model: torch.nn.Module, structure: str, seed: int) -> BatchedDeltas:
    """A BatchedDeltas over ``model`` whose configurations hold random edits large enough to move every metric."""
    gen = torch.Generator().manual_seed(seed)
    deltas = BatchedDeltas(model, _masks(model, structure, gen))
    noise = torch.randn(deltas.numel, generator=gen, dtype=deltas.values.dtype)
    deltas.values = deltas.base + 0.5 * noise * deltas.base.abs().mean()
    return deltas


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), where
    for fmt in want:
        assert set(got[fmt]) == set(want[fmt]), (where, fmt)
        for split, metrics in want[fmt].items():
            assert set(got[fmt][split]) == set(metrics), (where, fmt, split)
            for key, value in metrics.items():
                other = got[fmt][split][key]
                if value is None or key == "n":
                    assert other == value, (where, fmt, split, key)
                else:
                    assert other == pytest.approx(value, abs=TOL), (where, fmt, split, key)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases in the head and whole masks
def test_every_variant_equals_its_single_evaluation(tokenizer, make_model, make_task, structure, arch):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh edits each run; named in the failure
    model = make_model(arch, seed=seed % 1000, dtype=torch.float64, num_hidden_layers=3)
    task = make_task(n_athletes=30, n_forget=9, dataset="sports", seed=seed % 97)
    deltas = _deltas(model, structure, seed)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batched = evaluate_task_variants(model, tokenizer, task, deltas, batch_size=7)  # 7 // 3 = 2 prompts per forward
    assert len(batched) == len(deltas)
    for n, p in model.named_parameters():  # nothing written into the model, and its own forwards back
        assert torch.equal(p, before[n]), n
    assert not any("forward" in m.__dict__ for m in model.modules())
    changed = 0.0
    plain = evaluate_task(model, tokenizer, task, batch_size=7)
    for k in range(len(deltas)):
        with deltas.variant(k):
            want = evaluate_task(model, tokenizer, task, batch_size=7)
        _assert_same(batched[k], want, f"seed {seed}, configuration {k}")
        changed = max(changed, abs(want["normal"]["forget"]["acc"] - plain["normal"]["forget"]["acc"]))
        assert {"normal", "mcq", "paraphrase", "neighborhood"} <= set(batched[k])
    assert changed > 1e-6  # the edits move the metrics, so a configuration mixed up would show


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_per_prompt_scores_without_choices_any_batch(tokenizer, make_model, make_task, batch_size):
    """CounterFact-style sets (full-vocabulary scores), batch sizes below, at and above K: every per-prompt score."""
    model = make_model("llama", seed=3, dtype=torch.float64, num_hidden_layers=3)
    task = make_task(n_athletes=20, n_forget=7, dataset="counterfact", seed=2)
    deltas = _deltas(model, "mixed", seed=5)
    tok = tokenized_set(tokenizer, task, task.forget_test)
    got = prompt_scores_variants(model, tok, deltas, batch_size=batch_size)
    for k, scores in enumerate(got):
        with deltas.variant(k):
            want = prompt_scores(model, tok, batch_size=batch_size)
        for field in ("p_true", "p_edit", "logprob_true"):
            torch.testing.assert_close(getattr(scores, field), getattr(want, field), rtol=0, atol=TOL)
        assert torch.equal(scores.argmax_true, want.argmax_true) and torch.equal(scores.argmax_edit, want.argmax_edit)
        assert torch.equal(scores.fact_ids, want.fact_ids) and scores.edit_over_choices == want.edit_over_choices


def test_rows_per_forward_and_refusals(tokenizer, make_model, make_task):
    assert variant_prompts_per_batch(64, 8) == 8 and variant_prompts_per_batch(5, 8) == 1
    with pytest.raises(ValueError, match="batch_size and variants"):
        variant_prompts_per_batch(0, 8)
    model = make_model("llama", seed=1, dtype=torch.float64, num_hidden_layers=3)
    other = make_model("llama", seed=2, dtype=torch.float64, num_hidden_layers=3)
    task = make_task(n_athletes=12, n_forget=4, seed=1)
    deltas = _deltas(model, "rows", seed=1)
    with pytest.raises(ValueError, match="another model"):
        evaluate_task_variants(other, tokenizer, task, deltas)
    with deltas.variant(0), pytest.raises(ValueError, match="restore"):
        evaluate_task_variants(model, tokenizer, task, deltas, formats=["normal"])


@pytest.mark.parametrize("structure", ["heads", "whole", "mixed"])
@pytest.mark.parametrize("position", ["last", "subject_last"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_probe_features_of_every_variant(tokenizer, make_model, make_task, structure, position, padding):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    model = make_model("qwen2", seed=seed % 1000, dtype=torch.float64, num_hidden_layers=3)
    task = make_task(n_athletes=24, n_forget=6, seed=seed % 89)
    deltas = _deltas(model, structure, seed)
    tok = tokenized_set(tokenizer, task, task.maintain_train)
    got = collect_hidden_variants(model, tok, deltas, position, batch_size=5, padding=padding)
    assert not any("forward" in m.__dict__ for m in model.modules())
    plain = collect_hidden(model, tok, position, batch_size=5, padding=padding)
    for k, features in enumerate(got):
        with deltas.variant(k):
            want = collect_hidden(model, tok, position, batch_size=5, padding=padding)
        assert features.shape == want.shape and features.dtype == want.dtype
        torch.testing.assert_close(features, want, rtol=0, atol=TOL, msg=f"seed {seed}, configuration {k}")
        assert (want - plain).abs().max() > 1e-6  # every configuration moves the residual stream


def _same_probes(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), where
    for key, value in want.items():
        if isinstance(value, list) and value and isinstance(value[0], float):
            assert got[key] == pytest.approx(value, abs=TOL), (where, key)
        else:
            assert got[key] == value, (where, key)


@pytest.mark.parametrize("setting", ["standardized", "paper"])
def test_latent_probes_from_variant_features(tokenizer, make_model, make_task, setting):
    model = make_model("llama", seed=8, dtype=torch.float64, num_hidden_layers=3)
    task = make_task(n_athletes=30, n_forget=8, seed=4)
    deltas = _deltas(model, "mixed", seed=9)
    kwargs = {"steps": 20} if setting == "standardized" else {"probe_backend": "torch"}
    features = probe_features_variants(model, tokenizer, task, deltas, batch_size=7, setting=setting)
    for k, pair in enumerate(features):
        with deltas.variant(k):
            want = latent_probes(model, tokenizer, task, batch_size=7, setting=setting, **kwargs)
            alone = probe_features(model, tokenizer, task, batch_size=7, setting=setting)
        for a, b in zip(pair, alone, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)
        _same_probes(latent_probes(model, tokenizer, task, batch_size=7, setting=setting, features=pair, **kwargs),
                     want, f"{setting}, configuration {k}")
    with pytest.raises(ValueError, match="features must be"):
        latent_probes(model, tokenizer, task, setting=setting, features=(features[0][1], features[0][0]), **kwargs)

"""relearn_attack_variants: K LoRA relearning attacks trained together equal ``relearn_attack`` under
``deltas.variant(k)`` for every configuration, loss and evaluation leaf.

fp64 models: the batched forward adds x·D to x·W0 and pads the K groups to one length, so the numbers differ only
by float summation order (~1e-15 after a few steps); 1e-9 catches any wrong row, group, dropout mask or optimizer.
Argmax fields are compared exactly (ties have probability zero here).
"""

from __future__ import annotations

import pytest
import torch

from mu_fast.evaluate import relearn_attack, relearn_attack_variants
from tests.evaluate.test_variants import _deltas

TOL = 1e-9
FAST = dict(steps=3, lr=1e-2, eval_at=(0, 1, 3), batch_size=6, lm_batch_size=3, lora_rank=8)


def _assert_same(got: dict, want: dict, where: str) -> None:
    assert set(got) == set(want), where
    for key, value in want.items():
        if key not in ("losses", "evals", "final"):
            assert got[key] == value, (where, key)
    assert len(got["losses"]) == len(want["losses"]), where
    for step, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True)):
        assert set(a) == set(b), where
        for key in b:
            assert a[key] == pytest.approx(b[key], abs=TOL, nan_ok=True), (where, step, key)
    assert list(got["evals"]) == list(want["evals"]), where
    for step, sets in want["evals"].items():
        assert list(got["evals"][step]) == list(sets), (where, step)
        for what, metrics in sets.items():
            for key, value in metrics.items():
                other = got["evals"][step][what][key]
                if value is None or key == "n" or "argmax" in key:
                    assert other == value, (where, step, what, key)
                else:
                    assert other == pytest.approx(value, abs=TOL), (where, step, what, key)
    assert got["final"] == got["evals"][max(got["evals"])], where


def _snapshot(model: torch.nn.Module) -> dict:
    return {"params": {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            "training": model.training}


def _assert_restored(model: torch.nn.Module, before: dict) -> None:
    for name, p in model.named_parameters():
        value, requires_grad = before["params"][name]
        assert torch.equal(p.detach(), value) and p.requires_grad == requires_grad, name
        assert p.grad is None, name
    assert model.training == before["training"]
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("structure", ["rows", "cols", "heads", "whole", "mixed"])
def test_every_variant_equals_its_single_attack(tokenizer, make_model, make_task, structure):
    seed = int(torch.randint(0, 2**31 - 1, ()))  # fresh edits each run; named in the failure
    model = make_model("llama", seed=seed % 1000, dtype=torch.float64, num_hidden_layers=3, initializer_range=0.3)
    model.model.embed_tokens.weight.requires_grad_(False)  # a caller's own flags come back as they were
    model.train(structure == "rows")
    task = make_task(n_athletes=30, n_forget=8, dataset="sports", seed=seed % 97)
    deltas = _deltas(model, structure, seed)
    seeds = [seed % 7, seed % 7 + 1, seed % 7]  # two configurations share a seed (same adapters and masks drawn)
    before, rng = _snapshot(model), torch.get_rng_state()
    got = relearn_attack_variants(model, tokenizer, task, deltas, seeds, **FAST)
    _assert_restored(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert len(got) == 3
    for k, s in enumerate(seeds):
        with deltas.variant(k):
            want = relearn_attack(model, tokenizer, task, seed=s, **FAST)
        _assert_same(got[k], want, f"seed {seed}, configuration {k}")
    assert got[0]["losses"][-1]["relearn"] != pytest.approx(got[2]["losses"][-1]["relearn"], abs=1e-6)


def test_counterfact_without_lm_texts_and_fallback(tokenizer, make_model, make_task):
    """No LM term (lm nan, the result says why), a split task; score_in_train_mode runs per variant, still equal."""
    model = make_model("llama", seed=4, dtype=torch.float64, num_hidden_layers=3, initializer_range=0.3)
    task = make_task(n_athletes=24, n_forget=8, split=True, dataset="counterfact", seed=5, lm_texts=False)
    deltas = _deltas(model, "mixed", seed=9)
    for extra in ({}, {"score_in_train_mode": True}):
        settings = {**FAST, "steps": 2, "eval_at": (0, 2), **extra}
        got = relearn_attack_variants(model, tokenizer, task, deltas, [1, 2, 3], **settings)
        for k, s in enumerate([1, 2, 3]):
            with deltas.variant(k):
                want = relearn_attack(model, tokenizer, task, seed=s, **settings)
            _assert_same(got[k], want, f"configuration {k}, {extra}")
            assert not got[k]["lm_text"]["used"]


def test_refusals(tokenizer, make_model, make_task):
    model = make_model("llama", seed=1, dtype=torch.float64, num_hidden_layers=3)
    other = make_model("llama", seed=2, dtype=torch.float64, num_hidden_layers=3)
    task = make_task(n_athletes=12, n_forget=4, seed=1)
    deltas = _deltas(model, "rows", seed=1)
    with pytest.raises(ValueError, match="another model"):
        relearn_attack_variants(other, tokenizer, task, deltas, [0, 1, 2])
    with pytest.raises(ValueError, match="one seed per configuration"):
        relearn_attack_variants(model, tokenizer, task, deltas, [0, 1])
    with pytest.raises(ValueError, match="eval_at"):
        relearn_attack_variants(model, tokenizer, task, deltas, [0, 1, 2], steps=2, eval_at=(3,))


def test_adapters_of_unequal_groups(make_model):
    """MultiLora over groups of unequal sizes (the per-group path) gives each group's rows what its adapter and
    delta give them alone (the one-group, batched-GEMM path)."""
    from mu_fast.data.base import pad_batch
    from mu_fast.evaluate.metrics import attached
    from mu_fast.evaluate.relearn_variants import MultiLora, peft_initial_adapters
    from mu_fast.models.forward import gathered_logits

    model = make_model("llama", seed=2, dtype=torch.float64, num_hidden_layers=3)
    deltas = _deltas(model, "mixed", seed=3)
    gen = torch.Generator().manual_seed(0)
    init, scale, state = peft_initial_adapters(model, 4, 8.0, 0.0, seed=1)
    weights = [{n: (a + 0.1 * torch.randn(a.shape, generator=gen, dtype=a.dtype),
                    0.1 * torch.randn(b.shape, generator=gen, dtype=b.dtype)) for n, (a, b) in init.items()}
               for _ in range(3)]
    adapters = MultiLora(model, deltas, weights, scale, 0.0, [state] * 3)
    seqs = [torch.randint(4, 20, (int(n),), generator=gen).tolist() for n in torch.randint(2, 7, (9,), generator=gen)]
    batch = pad_batch(seqs, 0)
    segments = [(2, 0, 2), (0, 2, 7), (1, 7, 9)]
    delta = deltas.values - deltas.base
    try:
        with torch.no_grad(), attached(deltas):
            with deltas.groups(segments, delta):
                together = gathered_logits(model, batch)
            for k, lo, hi in segments:
                with deltas.groups([(k, 0, hi - lo)], delta):
                    alone = gathered_logits(model, pad_batch(seqs[lo:hi], 0))
                torch.testing.assert_close(together[lo:hi], alone, rtol=0, atol=TOL)
    finally:
        adapters.remove()
    assert not any(m._forward_hooks for m in model.modules())

"""The soft-prompt attack: the authors' module exactly (init, projection, attention), where it hooks, batched =
sequential, the model untouched, and that it recovers edited facts on the CI organism."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mu_fast.data.base import pad_batch, tokenize_prompts
from mu_fast.evaluate.softprompt import (
    SoftPromptAdversaries,
    _EpochBatches,
    attached,
    paper_schedule,
    softprompt_attack,
)
from mu_fast.models.forward import gathered_logits


def reference_modules(d: int, seed: int, length: int = 15):
    """The authors' UniversalSoftPromptAdversary parts, built in their order under manual_seed(seed)."""
    torch.manual_seed(seed)
    keys, values = torch.empty(length, d), torch.empty(length, d)
    torch.nn.init.kaiming_uniform_(keys)
    torch.nn.init.kaiming_uniform_(values)
    query = torch.nn.Linear(d, d, bias=False)
    attention = torch.nn.MultiheadAttention(d, num_heads=1, batch_first=True, bias=False)
    return keys, values, query, attention


def test_init_matches_the_authors_module_and_shapes():
    d = 24
    adv = SoftPromptAdversaries(d, seeds=[5, 7])
    assert adv.keys.shape == adv.values.shape == (2, 15, d)
    assert adv.query.shape == adv.out_proj.shape == (2, d, d) and adv.in_proj.shape == (2, 3 * d, d)
    assert all(p.dtype == torch.float32 for p in adv.parameters())
    assert sum(p.numel() for p in adv.parameters()) == 2 * (5 * d * d + 2 * 15 * d)
    for a, seed in enumerate([5, 7]):
        keys, values, query, attention = reference_modules(d, seed)
        # kaiming rows have norm about sqrt(2) < 6, so the initial projection changes nothing
        assert torch.equal(adv.keys[a], keys) and torch.equal(adv.values[a], values)
        assert torch.equal(adv.query[a], query.weight) and torch.equal(adv.in_proj[a], attention.in_proj_weight)
        assert torch.equal(adv.out_proj[a], attention.out_proj.weight)


def test_projection_caps_row_norms_at_eps(rng):
    adv = SoftPromptAdversaries(16, seeds=[0, 1, 2], eps=6.0)
    with torch.no_grad():
        adv.keys.copy_(torch.randn(adv.keys.shape, generator=rng) * 3.0)  # norms ~12: most rows above eps
        adv.keys[0, 0] = 0.1 * adv.keys[0, 0] / adv.keys[0, 0].norm()      # one row well inside the ball
    before = adv.keys.detach().clone()
    adv.project_()
    norms = adv.keys.norm(dim=-1)
    assert bool((norms <= 6.0 * (1 + 1e-6)).all())
    big = before.norm(dim=-1) > 6.0
    assert big.sum() > 10
    assert torch.allclose(norms[big], torch.full_like(norms[big], 6.0), rtol=1e-6)
    direction = torch.nn.functional.cosine_similarity(adv.keys[big], before[big], dim=-1)
    assert torch.allclose(direction, torch.ones_like(direction), atol=1e-6)
    assert torch.equal(adv.keys[~big], before[~big])


def test_forward_equals_torch_multihead_attention(rng):
    d, A, b, T = 12, 3, 2, 5
    adv = SoftPromptAdversaries(d, seeds=[1, 2, 3], dtype=torch.float64)
    x = torch.randn(A * b, T, d, generator=rng, dtype=torch.float64)
    stacked = adv(x)
    for a in range(A):
        query = torch.nn.Linear(d, d, bias=False).double()
        attention = torch.nn.MultiheadAttention(d, 1, batch_first=True, bias=False).double()
        with torch.no_grad():
            query.weight.copy_(adv.query[a]), attention.in_proj_weight.copy_(adv.in_proj[a])
            attention.out_proj.weight.copy_(adv.out_proj[a])
        rows = x[a * b : (a + 1) * b]
        keys, values = adv.keys[a].expand(b, -1, -1), adv.values[a].expand(b, -1, -1)
        expected = rows + attention(query(rows), keys, values, need_weights=False)[0]
        torch.testing.assert_close(stacked[a * b : (a + 1) * b], expected, rtol=1e-12, atol=1e-12)
        adv.active = a  # one adversary applied to every row
        torch.testing.assert_close(adv(rows), expected, rtol=1e-12, atol=1e-12)
        adv.active = None
    with pytest.raises(ValueError, match="cannot be split"):
        adv(x[:4])


def test_epoch_batches_are_a_restarting_shuffled_loader():
    stream = _EpochBatches(5, 2, torch.Generator().manual_seed(0))
    epoch = [stream.next() for _ in range(3)]
    assert [len(b) for b in epoch] == [2, 2, 1] and sorted(sum(epoch, [])) == list(range(5))  # drop_last=False
    assert sorted(sum([stream.next() for _ in range(3)], [])) == list(range(5))


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_hook_site_and_zero_values_are_exact(tokenizer, make_model, make_task, arch, rng):
    """With V = 0 the attention adds exactly 0, so logits are bit-identical to the plain model's; with V ≠ 0 the
    perturbation is added to the embedding rows *before* Gemma's sqrt(d) scaling, as under transformers 4.44."""
    model = make_model(arch, seed=3)
    tok = tokenize_prompts(tokenizer, make_task(n_athletes=12, n_forget=4).forget_test)
    batch = pad_batch(tok.input_ids, 0)
    with torch.no_grad():
        plain = gathered_logits(model, batch)
        adv = SoftPromptAdversaries(model.config.hidden_size, seeds=[0])
        adv.active = 0
        adv.values.zero_()
        with attached(model, adv):
            assert torch.equal(gathered_logits(model, batch), plain)
        adv.values.copy_(torch.randn(adv.values.shape, generator=rng))
        embedding = model.get_input_embeddings()
        seen = {}

        def record(module, args, kwargs):
            seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

        handle = model.model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
        with attached(model, adv):
            gathered_logits(model, batch)
        handle.remove()
        raw = embedding.weight[batch.input_ids]
        scale = math.sqrt(model.config.hidden_size) if arch == "gemma" else 1.0
        expected = (raw + adv.delta(raw)) * torch.tensor(scale, dtype=raw.dtype)
        torch.testing.assert_close(seen["h"], expected, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(seen["h"], embedding(batch.input_ids))
    assert not embedding._forward_hooks  # removed on exit
    with pytest.raises(RuntimeError, match="boom"), attached(model, adv):
        raise RuntimeError("boom")
    assert not embedding._forward_hooks  # and on an exception


def test_batched_equals_sequential_and_model_is_untouched(tokenizer, make_model, make_task):
    model = make_model("llama", seed=2, dtype=torch.float64, initializer_range=0.3)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # the caller's flags come back as they were
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    task = make_task(n_athletes=30, n_forget=10, seed=4)
    args = dict(n_attacks=2, steps=4, batch_size=3, lr=1e-2, seed=1, progress=False)
    batched = softprompt_attack(model, tokenizer, task, batched=True, **args)
    alone = softprompt_attack(model, tokenizer, task, batched=False, **args)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name][0]) and p.requires_grad == before[name][1], name
        assert p.grad is None
    assert not model.get_input_embeddings()._forward_hooks
    assert batched["settings"]["adversary_dtype"] == "float64"
    for a, b in zip(batched["attacks"], alone["attacks"], strict=True):
        assert a["seed"] == b["seed"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)
        assert a["forget"]["acc"] == pytest.approx(b["forget"]["acc"], rel=1e-9)
    l0, l1 = batched["attacks"][0]["loss"], batched["attacks"][1]["loss"]
    assert l0 != l1  # independent attacks: their own init and data order
    assert batched["no_attack"]["forget"]["acc"] != batched["attacks"][0]["forget"]["acc"]


def test_paper_schedule(make_model, make_task):
    llama, gemma2 = make_model("llama"), make_model("gemma2")
    sports, cf = make_task(), make_task(dataset="counterfact")
    assert paper_schedule(llama, sports) == (128, 16)
    assert paper_schedule(gemma2, sports) == (256, 8)
    assert paper_schedule(gemma2, cf) == (128, 16)


def test_attack_recovers_edited_facts_on_the_organism(ci_organism):
    """Edit the organism's first 16 athletes, then attack: the adversary, trained toward the true sports of 8 of
    them, lifts the other 8 too (measured with 4 attacks x 30 steps at lr 3e-3: 0.25 -> 0.61-0.72)."""
    from mu_fast.edit import EditConfig, edit
    from mu_fast.masks import Mask
    from mu_fast.models.sites import Component, SiteTable
    from mu_fast.organism.task import organism_task

    model = copy.deepcopy(ci_organism.model)
    task = organism_task(ci_organism.facts, "first_16_unsplit")
    mask = Mask.from_components(SiteTable(model), [Component("mlp", 0), Component("mlp", 1)])
    edit(model, ci_organism.tokenizer, task, mask,
         EditConfig(steps=20, lr=3e-3, lm_coef=0.0, optimizer="torch"), progress=False)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = softprompt_attack(model, ci_organism.tokenizer, task, n_attacks=2, steps=20, lr=3e-3, progress=False)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    settings = result["settings"]
    assert (settings["n_train"], settings["n_held_out"], settings["steps"]) == (8, 8, 20)
    before = result["no_attack"]["forget"]
    assert before["edit_acc"] > before["acc"]  # the edit holds without the attack
    assert result["mean"]["forget_acc"] > before["acc"] + 0.15, (before, result["mean"])
    assert result["mean"]["train_acc"] > result["no_attack"]["train"]["acc"] + 0.3
    for attack in result["attacks"]:
        assert attack["final_loss"] < 0.5 * attack["loss"][0]

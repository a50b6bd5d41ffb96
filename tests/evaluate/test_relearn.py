"""The relearning attack: halves, held-out recovery, the CounterFact bug flag, the caller's model untouched."""

from __future__ import annotations

import pytest
import torch

from mu_fast.data.base import tokenize_prompts
from mu_fast.evaluate import relearn_attack, relearn_halves
from mu_fast.evaluate.relearn import (
    MODE_FALSE_BUG,
    MODE_TRUE,
    effective_lora_rank,
    held_out_format_set,
    training_labels,
)

# A tiny random model needs a larger lr than the paper's 2e-4, and a larger init than 0.02: with lm_head rows of
# norm 0.02*sqrt(32) no hidden state can move a logit by more than ~1 nat.
FAST = dict(steps=16, lr=1e-2, eval_at=(0, 8, 16), batch_size=16)
INIT = dict(initializer_range=0.3)


def snapshot(model):
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
        "modules": {n: type(m) for n, m in model.named_modules()},
        "training": model.training,
        "attrs": set(vars(model)),
    }


def assert_unchanged(model, before):
    params = dict(model.named_parameters())
    assert set(params) == set(before["params"])
    for name, p in params.items():
        obj, value, requires_grad = before["params"][name]
        assert p is obj, name
        assert torch.equal(p.detach(), value), name
        assert p.requires_grad == requires_grad, name
    assert {n: type(m) for n, m in model.named_modules()} == before["modules"]
    assert model.training == before["training"]
    assert set(vars(model)) == before["attrs"]
    assert all(p.grad is None for p in model.parameters())


def test_halves(make_task):
    unsplit = make_task(n_athletes=30, n_forget=9, split=False)
    held, relearn, held_set = relearn_halves(unsplit)
    assert held == list(range(4, 9))
    assert list(relearn.prompts) == list(unsplit.forget_test.prompts[:4])
    assert list(held_set.prompts) == list(unsplit.forget_test.prompts[4:])
    mcq = held_out_format_set(unsplit, "mcq", held)
    assert list(mcq.subjects) == list(held_set.subjects)
    split = make_task(n_athletes=30, n_forget=10, split=True)
    held, relearn, held_set = relearn_halves(split)
    assert held is None and relearn is split.forget_train and held_set is split.forget_test
    assert held_out_format_set(split, "mcq", held) is split.formats["mcq"]["forget"]


def test_held_out_format_selection_by_fact_ids(make_task):
    """Paraphrases (2 prompts per fact) follow the held-out facts through their fact ids."""
    task = make_task(n_athletes=30, n_forget=8)
    held, _, held_set = relearn_halves(task)
    para = held_out_format_set(task, "paraphrase", held)
    assert len(para) == 2 * len(held_set)
    assert set(para.fact_ids) == set(held_set.fact_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_relearning_recovers_held_out_facts_and_leaves_model_unchanged(tokenizer, make_model, make_task, dtype):
    model = make_model("llama", seed=1, dtype=dtype, **INIT)
    model.model.embed_tokens.weight.requires_grad_(False)  # a caller's own flags must come back as they were
    before = snapshot(model)
    task = make_task(n_athletes=60, n_forget=16, seed=21)
    result = relearn_attack(model, tokenizer, task, seed=3, **FAST)
    assert_unchanged(model, before)
    assert result["mode"] == MODE_TRUE and not result["dataset_is_counterfact"]
    assert result["n_relearn"] == 8 and result["n_held_out"] == 8
    assert result["lora_rank"] == effective_lora_rank(model, 512) == 16  # k/v projections are 32 -> 16
    assert sorted(result["evals"]) == [0, 8, 16]
    assert set(result["evals"][0]) == {"normal", "mcq", "maintain"}
    assert len(result["losses"]) == 16
    first, last = result["evals"][0]["normal"], result["final"]["normal"]
    # The name's last syllable decides the sport: relearning on half the athletes (and on the maintain set)
    # teaches the rule and lifts the held-out athletes (measured: 0.34 -> 0.7).
    assert last["acc"] > first["acc"] + 0.2, (first, last)
    assert result["losses"][-1]["relearn"] < result["losses"][0]["relearn"]
    # The caller's model still scores as before.
    again = relearn_attack(model, tokenizer, task, seed=3, **{**FAST, "steps": 0, "eval_at": (0,)})
    assert again["evals"][0] == result["evals"][0]
    assert_unchanged(model, before)


def test_counterfact_bug_flag_flips_the_target(tokenizer, make_model, make_task):
    task = make_task(n_athletes=60, n_forget=16, dataset="counterfact", seed=22)
    model = make_model("llama", seed=2, **INIT)
    before = snapshot(model)
    correct = relearn_attack(model, tokenizer, task, seed=0, **FAST)
    buggy = relearn_attack(model, tokenizer, task, seed=0, cf_target_false_bug=True, **FAST)
    assert_unchanged(model, before)
    assert correct["mode"] == MODE_TRUE and buggy["mode"] == MODE_FALSE_BUG
    assert correct["dataset_is_counterfact"] and buggy["dataset_is_counterfact"]
    assert "mcq" in correct["final"]
    c, b = correct["final"]["normal"], buggy["final"]["normal"]
    # Edit answers follow a rule too (the next sport), so the buggy mode learns *them* on held-out facts
    # (measured: correct mode true/edit 0.65/0.07, buggy mode 0.24/0.36; before 0.005/0.003).
    assert c["acc"] > c["edit_acc"] + 0.2, c
    assert b["edit_acc"] > b["acc"], b
    assert b["edit_acc"] > c["edit_acc"] + 0.1 and c["acc"] > b["acc"] + 0.2, (c, b)
    assert buggy["final"]["maintain"]["acc"] < correct["final"]["maintain"]["acc"]


def test_training_labels(tokenizer, make_task):
    task = make_task(dataset="counterfact")
    tok = tokenize_prompts(tokenizer, task.maintain_train)
    assert torch.equal(training_labels(task.maintain_train, tok, False, "maintain"), tok.answer_ids)
    assert torch.equal(training_labels(task.maintain_train, tok, True, "maintain"), tok.edit_ids)
    assert not torch.equal(tok.answer_ids, tok.edit_ids)


def test_errors(tokenizer, make_model, make_task):
    model = make_model("llama")
    with pytest.raises(ValueError, match="not CounterFact"):
        relearn_attack(model, tokenizer, make_task(dataset="sports"), cf_target_false_bug=True, steps=1, eval_at=(0,))
    with pytest.raises(ValueError, match="eval_at"):
        relearn_attack(model, tokenizer, make_task(), steps=5, eval_at=(0, 10))
    small = make_model("llama", vocab_size=40)  # the toy tokenizer's ids reach 54
    with pytest.raises(ValueError, match="tokenizer that belongs to this model"):
        relearn_attack(small, tokenizer, make_task(), steps=1, eval_at=(0,))
    one = make_task(n_athletes=20, n_forget=1)
    with pytest.raises(ValueError, match=">= 2"):
        relearn_attack(model, tokenizer, one, steps=1, eval_at=(0,))


def test_deterministic_for_a_seed(tokenizer, make_model, make_task):
    task = make_task(n_athletes=40, n_forget=8, seed=5)
    model = make_model("llama", seed=4)
    args = dict(steps=3, lr=1e-2, eval_at=(3,), batch_size=8)
    a = relearn_attack(model, tokenizer, task, seed=7, **args)
    b = relearn_attack(model, tokenizer, task, seed=7, progress=True, **args)
    c = relearn_attack(model, tokenizer, task, seed=8, **args)
    assert a["losses"] == b["losses"] and a["final"] == b["final"]
    assert a["losses"] != c["losses"]


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_relearning_on_cuda(tokenizer, make_model, make_task, dtype):
    """On the GPU (bf16 base weights: peft keeps the adapters in fp32) the attack learns and the caller's model
    is bit-identical afterwards; the CUDA RNG state is restored too."""
    model = make_model("llama", seed=1, dtype=dtype, **INIT).cuda()
    before = snapshot(model)
    rng_state = torch.cuda.get_rng_state()
    task = make_task(n_athletes=60, n_forget=16, seed=21)
    result = relearn_attack(model, tokenizer, task, seed=3, **FAST)
    assert_unchanged(model, before)
    assert torch.equal(torch.cuda.get_rng_state(), rng_state)
    first, last = result["evals"][0]["normal"], result["final"]["normal"]
    assert last["acc"] > first["acc"] + 0.2, (first, last)

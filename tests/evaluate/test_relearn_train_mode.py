"""``relearn_attack(score_in_train_mode=True)``: the authors scored after relearning steps 10 and 20 with their LoRA
dropout modules still in train mode (peft creates them so; their loop never called ``eval()``). The option scores
the steps after 0 that way, and only then; the default scores with dropout off. Checked on which dropout is live
when each score is taken, and on the scores themselves."""

from __future__ import annotations

import pytest
import torch

import mu_fast.evaluate.relearn as relearn_module
from mu_fast.evaluate import relearn_attack
from tests.evaluate.test_relearn import assert_unchanged, snapshot

FAST = dict(steps=4, lr=1e-2, eval_at=(0, 2, 4), batch_size=8, lm_batch_size=2)


def dropout_state_per_score(model, monkeypatch, **kwargs) -> tuple[list[bool], dict]:
    """For each prompt_scores call: whether any LoRA dropout still drops in eval mode (prompt_scores scores in eval
    mode), and the attack's result."""
    seen = []
    original = relearn_module.prompt_scores

    def spy(m, tokenized, batch_size=64):
        was = m.training
        m.eval()
        probe = torch.ones(4, 64)
        with torch.no_grad():
            seen.append(any(
                not torch.equal(d(probe), probe)
                for module in m.modules() if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict)
                for d in module.lora_dropout.values() if isinstance(d, (torch.nn.Dropout, relearn_module.PortableDropout))
            ))
        m.train(was)
        return original(m, tokenized, batch_size=batch_size)

    monkeypatch.setattr(relearn_module, "prompt_scores", spy)
    result = relearn_attack(model, kwargs.pop("tokenizer"), kwargs.pop("task"), **FAST, **kwargs)
    return seen, result


@pytest.mark.parametrize("train_mode", [False, True])
def test_lora_dropout_is_live_only_when_asked_and_after_step_0(train_mode, make_model, make_task, tokenizer, monkeypatch):
    task = make_task(n_athletes=24, n_forget=8)
    model = make_model("llama", seed=1, initializer_range=0.3)
    before = snapshot(model)
    seen, result = dropout_state_per_score(model, monkeypatch, tokenizer=tokenizer, task=task, lora_dropout=0.5,
                                           score_in_train_mode=train_mode)
    n_sets = len(result["evals"][0])  # normal, maintain, mcq: one prompt_scores call each per evaluated step
    per_step = [any(seen[i : i + n_sets]) for i in range(0, len(seen), n_sets)]
    assert per_step == [False, train_mode, train_mode]  # steps 0, 2, 4
    assert result["scored_in_train_mode"] is train_mode
    assert_unchanged(model, before)  # the swapped dropouts leave nothing behind


def test_train_mode_scores_differ_and_step_0_does_not(make_model, make_task, tokenizer):
    task = make_task(n_athletes=24, n_forget=8)
    runs = {}
    for train_mode in (False, True):
        model = make_model("llama", seed=1, initializer_range=0.3)
        runs[train_mode] = relearn_attack(model, tokenizer, task, **FAST, lora_dropout=0.5,
                                          score_in_train_mode=train_mode)
    off, on = runs[False]["evals"], runs[True]["evals"]
    assert off[0] == on[0]  # before training the adapters are zero: dropout changes nothing
    assert runs[False]["losses"][:2] == runs[True]["losses"][:2]  # same training up to the first train-mode score
    assert off[2]["normal"]["acc"] != on[2]["normal"]["acc"]  # then dropout noise enters the score

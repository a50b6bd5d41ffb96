"""Relearning as the authors ran it: the held-out MCQ without the system prompt, the LM term's 8 × 2 texts of 128
tokens per step, and a result that says whether the LM term ran (and why not)."""

from __future__ import annotations

import pytest

import mu_fast.evaluate.relearn as relearn
from mu_fast.data.base import tokenize_prompts
from mu_fast.data.sports import load_sports_task, sports_prompt
from mu_fast.evaluate import relearn_attack
from mu_fast.evaluate.metrics import prompt_scores, set_accuracy
from mu_fast.evaluate.relearn import relearn_halves, relearn_mcq_set


@pytest.fixture(scope="module")
def sports_task(data_dir):
    return load_sports_task("first_16_unsplit", data_dir=data_dir)  # system_prompt=True: the deep eval's formats


def test_held_out_mcq_is_rebuilt_without_the_system_prompt(sports_task):
    held, _, held_set = relearn_halves(sports_task)
    with_sys = sports_task.formats["mcq"]["forget"]
    assert "helpful chatbot" in with_sys.prompts[0]
    mcq, description = relearn_mcq_set(sports_task, held)
    athletes = list(held_set.subjects)
    assert list(mcq.prompts) == [sports_prompt(a, "mcq", system_prompt=False) for a in athletes]
    assert not any("helpful chatbot" in p for p in mcq.prompts) and "without the system prompt" in description
    assert list(mcq.answers) == [with_sys.answers[i] for i in held] and mcq.choices == with_sys.choices
    kept, _ = relearn_mcq_set(sports_task, held, system_prompt=True)
    assert list(kept.prompts) == [with_sys.prompts[i] for i in held]


def test_relearn_scores_the_no_system_prompt_mcq(sports_task, tokenizer, make_model):
    model = make_model("llama", seed=3, initializer_range=0.3)
    result = relearn_attack(model, tokenizer, sports_task, steps=0, eval_at=(0,))
    held, _, _ = relearn_halves(sports_task)
    no_sys, _ = relearn_mcq_set(sports_task, held)
    with_sys = sports_task.formats["mcq"]["forget"].subset(held)
    expected = set_accuracy(prompt_scores(model, tokenize_prompts(tokenizer, no_sys)))
    other = set_accuracy(prompt_scores(model, tokenize_prompts(tokenizer, with_sys)))
    assert expected["acc"] != pytest.approx(other["acc"])  # the two templates score differently on this model
    assert result["evals"][0]["mcq"] == pytest.approx(expected)
    assert "without the system prompt" in result["mcq_format"]


def test_lm_term_is_8x2_texts_of_128_tokens(tokenizer, make_model, make_task, monkeypatch):
    shapes = []

    def record(model, batch, *args, **kwargs):
        shapes.append(tuple(batch.input_ids.shape))
        return 0.0

    monkeypatch.setattr(relearn, "lm_loss_backward", record)
    task = make_task(n_athletes=30, n_forget=8)
    task.lm_texts = [" ".join(["Fact"] * 300), " ".join(["golf"] * 200), "Tiger Woods plays golf"]
    result = relearn_attack(make_model("llama"), tokenizer, task, steps=2, eval_at=(2,), lr=1e-3)
    assert shapes == [(16, 128), (16, 128)]
    assert result["lm_text"] == {"used": True, "n_texts": 3, "max_tokens": 128, "source": "task.lm_texts", "batch_size": 16}


def test_lm_term_off_is_reported(tokenizer, make_model, make_task):
    result = relearn_attack(make_model("llama"), tokenizer, make_task(n_athletes=20, n_forget=4, lm_texts=False),
                            steps=1, eval_at=(1,), lr=1e-3)
    status = result["lm_text"]
    assert status["used"] is False and status["n_texts"] == 0 and status["batch_size"] == 0
    assert "task.lm_texts is empty" in status["reason"] and "resolve_lm_texts" in status["reason"]
    assert all(loss["lm"] != loss["lm"] for loss in result["losses"])  # NaN: no LM term ran

"""evaluate_task: every format and split, composed from prompt_scores; tokenization once per set."""

from __future__ import annotations

import pytest
import torch

import mu_fast.evaluate.formats as formats_module
from mu_fast.data.base import tokenize_prompts
from mu_fast.evaluate import evaluate_task, prompt_scores, set_accuracy, tokenize_task


@pytest.mark.parametrize("split", [False, True], ids=["unsplit", "split"])
@pytest.mark.parametrize("dataset", ["sports", "counterfact"])
def test_every_format_equals_its_prompt_scores(tokenizer, make_model, make_task, split, dataset):
    model = make_model("llama", seed=11)
    task = make_task(n_athletes=30, n_forget=8, split=split, dataset=dataset, seed=6)
    result = evaluate_task(model, tokenizer, task, batch_size=5)
    assert set(result) == {"normal", "mcq", "paraphrase", "neighborhood"}
    expected_sets = {("normal", "forget"): task.forget_test, ("normal", "maintain"): task.maintain_test}
    for fmt in ("mcq", "paraphrase", "neighborhood"):
        for part in ("forget", "maintain"):
            expected_sets[(fmt, part)] = task.formats[fmt][part]
    for (fmt, part), prompt_set in expected_sets.items():
        scores = prompt_scores(model, tokenize_prompts(tokenizer, prompt_set), batch_size=64)
        want = set_accuracy(scores)
        got = result[fmt][part]
        assert got["n"] == len(prompt_set)
        for key in ("acc", "argmax_acc", "edit_acc", "edit_argmax_acc", "ce"):
            assert got[key] == pytest.approx(want[key], abs=1e-6), (fmt, part, key)
    # Paraphrases: two prompts per fact, averaged over prompts.
    assert result["paraphrase"]["forget"]["n"] == 2 * len(task.forget_test)
    assert result["neighborhood"]["forget"]["edit_error"] == result["neighborhood"]["forget"]["edit_acc"]
    assert "edit_error" not in result["normal"]["forget"]


def test_tokenizes_each_set_once(tokenizer, make_model, make_task, monkeypatch):
    calls: list[str] = []
    real = formats_module.tokenize_prompts

    def counting(tok, prompt_set):
        calls.append(prompt_set.name)
        return real(tok, prompt_set)

    monkeypatch.setattr(formats_module, "tokenize_prompts", counting)
    model = make_model("llama", seed=1)
    task = make_task(n_athletes=24, n_forget=6, seed=7)
    first = evaluate_task(model, tokenizer, task)
    n_sets = len(calls)
    assert n_sets == 8  # normal, mcq, paraphrase, neighborhood x forget, maintain
    second = evaluate_task(model, tokenizer, task)
    assert len(calls) == n_sets
    assert first == second


def test_precomputed_tokenizations_are_used(tokenizer, make_model, make_task, monkeypatch):
    task = make_task(n_athletes=24, n_forget=6, seed=8)
    tokenized = {
        key: tokenize_prompts(tokenizer, ps)
        for key, ps in formats_module.task_prompt_sets(task, ["normal", "mcq"]).items()
    }

    def refuse(*args, **kwargs):
        raise AssertionError("tokenize_prompts called although tokenizations were passed in")

    monkeypatch.setattr(formats_module, "tokenize_prompts", refuse)
    result = evaluate_task(make_model("llama"), tokenizer, task, formats=["normal", "mcq"], tokenized=tokenized)
    assert set(result) == {"normal", "mcq"}


def test_cache_is_per_tokenizer(tokenizer, build_tokenizer, make_task):
    task = make_task(n_athletes=24, n_forget=6, seed=9)
    first = tokenize_task(tokenizer, task, ["normal"])
    again = tokenize_task(tokenizer, task, ["normal"])
    other = tokenize_task(build_tokenizer(), task, ["normal"])
    assert all(first[k] is again[k] for k in first)
    assert all(first[k] is not other[k] for k in first)


def test_format_selection_and_errors(tokenizer, make_model, make_task):
    model = make_model("llama")
    task = make_task(n_athletes=24, n_forget=6, seed=10)
    result = evaluate_task(model, tokenizer, task, formats=["paraphrase"], progress=True)
    assert set(result) == {"paraphrase"}
    with pytest.raises(ValueError, match="not in task"):
        evaluate_task(model, tokenizer, task, formats=["mmlu"])
    task.formats["empty"] = {"forget": task.forget_test.subset([])}
    with pytest.raises(ValueError, match="empty"):
        evaluate_task(model, tokenizer, task, formats=["empty"])


def test_unlearning_task_has_no_edit_metrics(tokenizer, make_model, make_task):
    from dataclasses import replace

    task = make_task(n_athletes=24, n_forget=6, seed=12)
    strip = lambda ps: replace(ps, edit_answers=None)  # noqa: E731
    task = type(task)(
        name="unlearn",
        forget_train=strip(task.forget_train),
        forget_test=strip(task.forget_test),
        maintain_train=task.maintain_train,
        maintain_test=task.maintain_test,
        unlearn=True,
    )
    result = evaluate_task(make_model("llama"), tokenizer, task)
    assert result["normal"]["forget"]["edit_acc"] is None
    assert result["normal"]["maintain"]["edit_acc"] is not None
    assert torch.isfinite(torch.tensor(result["normal"]["forget"]["acc"]))

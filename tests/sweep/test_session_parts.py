"""Session helpers that need no organism: the memoizing tokenizer gives what the tokenizer gives, once."""

from __future__ import annotations

import copy

from mu_fast.data.base import tokenize_prompts
from mu_fast.sweep.session import CachedTokenizer
from tests._tiny_task import tiny_task, word_tokenizer


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self):
        return len(self.tokenizer)


def test_cached_tokenizer_returns_the_same_tokens_and_calls_once():
    plain = word_tokenizer()
    counting = CountingTokenizer(word_tokenizer())
    cached = CachedTokenizer(counting)
    task = tiny_task()
    first = tokenize_prompts(cached, task.forget_train)
    calls = counting.calls
    second = tokenize_prompts(cached, task.forget_train)
    assert counting.calls == calls  # every call of the second tokenization was a cache hit
    reference = tokenize_prompts(plain, task.forget_train)
    for got in (first, second):
        assert got.input_ids == reference.input_ids and got.answer_ids.equal(reference.answer_ids)
        assert got.subject_last.equal(reference.subject_last)
    assert cached("some filler text", add_special_tokens=False)["input_ids"] == plain("some filler text",
                                                                                        add_special_tokens=False)["input_ids"]
    assert cached.pad_token_id == plain.pad_token_id and len(cached) == len(plain)
    cached.padding_side = "left"  # attribute writes reach the tokenizer
    assert counting.padding_side == "left"
    assert copy.copy(cached)("golf")["input_ids"] == plain("golf")["input_ids"]


def test_the_organism_loads_in_the_spec_dtype():
    """``models: [{name: organism, dtype: fp64}]`` (the demo's lr rule) runs on float64 weights, not the float32 ones."""
    import torch

    from mu_fast.sweep.refs import resolve_model
    from mu_fast.sweep.session import load_sweep_model

    for dtype, want in (("fp64", torch.float64), (None, torch.float32)):
        ref = resolve_model({"name": "organism:ci", **({"dtype": dtype} if dtype else {})}, "models[0]")
        model, _, _ = load_sweep_model(ref)
        assert {p.dtype for p in model.parameters()} == {want}, dtype

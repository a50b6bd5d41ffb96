"""``capability_eval(add_bos=...)``: the BOS token of lm-eval's requests. The authors' lm-eval 0.4.4 sent none for
non-Gemma models and one for Gemma (``add_bos="paper"``); the installed lm-eval follows the tokenizer, whose default
here (as Llama-3's) adds it. Checked on the token ids that reach the model."""

from __future__ import annotations

import pytest

pytest.importorskip("lm_eval", reason="lm-eval not installed (requirements.txt lists it)")

from mu_fast.evaluate.capability import capability_eval  # noqa: E402
from tests.evaluate.test_capability import CHOICES, FIRST, LAST, offline, write_task  # noqa: E402,F401 (fixture)

BOS = 1  # the tiny tokenizer's <s>, which its post-processor prepends by default


def first_tokens(model, tokenizer, task_dir, add_bos) -> tuple[set[int], dict]:
    """The first token id of every sequence the model is run on, and the result's settings."""
    seen: set[int] = set()

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.update(ids[:, 0].tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = capability_eval(model, tokenizer, tasks=("mu_fast_tiny_mc",), task_dir=task_dir, batch_size=4,
                                 add_bos=add_bos, bootstrap_iters=0)
    finally:
        handle.remove()
    return seen, result["settings"]


@pytest.mark.parametrize("arch, add_bos, with_bos", [
    ("llama", None, True),       # the installed lm-eval: the tokenizer's default (adds BOS)
    ("llama", True, True),
    ("llama", False, False),
    ("llama", "paper", False),   # lm-eval 0.4.4: no special tokens for a non-Gemma model
    ("gemma", "paper", True),    # ... and a BOS token for the Gemma family
    ("gemma2", "paper", True),
])
def test_add_bos_reaches_the_model(arch, add_bos, with_bos, tokenizer, make_model, tmp_path, offline):
    questions = [{"question": f"Fact : {f} {last} plays the sport of", "choices": CHOICES, "answer": i % 4}
                 for i, (f, last) in enumerate((f, last) for f in FIRST[:3] for last in LAST)]
    write_task(tmp_path, questions)
    model = make_model(arch, seed=0)
    seen, settings = first_tokens(model, tokenizer, tmp_path, add_bos)
    assert seen and ((seen == {BOS}) if with_bos else (BOS not in seen)), seen
    assert settings["add_bos"] == add_bos
    assert settings["add_bos_token"] == ("tokenizer default" if add_bos is None else with_bos)


def test_bad_add_bos_is_refused_before_lm_eval(tokenizer, make_model):
    with pytest.raises(ValueError, match="add_bos='yes'"):
        capability_eval(make_model("llama"), tokenizer, tasks=("mmlu",), add_bos="yes")

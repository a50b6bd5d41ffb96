"""lm-eval integration: a small multiple-choice task in lm-eval's own YAML format, written here to tmp_path, run on the
in-memory model; its accuracy must equal an independent computation with mu_fast's own scoring. Offline, a dataset
that is not cached is a one-line error naming the task and the fix."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval not installed (requirements.txt lists it)")

from mu_fast.data.base import PromptSet, tokenize_prompts  # noqa: E402
from mu_fast.evaluate.capability import TINY_MMLU_TASK, _build, capability_eval  # noqa: E402
from mu_fast.evaluate.metrics import prompt_scores  # noqa: E402

CHOICES = ["football", "baseball", "basketball", "golf"]
FIRST = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "ta"]
LAST = ["bo", "da", "fe"]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: the environment variables, and the module-level copies huggingface_hub / datasets took at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def write_task(folder, questions, name="mu_fast_tiny_mc", dataset_path="json"):
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in questions))
    kwargs = (f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'cache'}\n"
              if dataset_path == "json" else "")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: {dataset_path}\n{kwargs}test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )


def independent_scores(model, tokenizer, questions):
    """Per question: argmax of the choices' log-likelihood (acc) and of log-likelihood per byte (acc_norm), from
    mu_fast's own last-token scoring (every choice is one token after the question)."""
    prompts = PromptSet([q["question"] for q in questions], [" " + q["choices"][q["answer"]] for q in questions],
                        choices=[" " + c for c in CHOICES], label_token="first")
    tok = tokenize_prompts(tokenizer, prompts)
    scores = prompt_scores(model, tok)
    with torch.no_grad():
        from mu_fast.data.base import pad_batch
        from mu_fast.models.forward import gathered_logits

        logp = torch.log_softmax(gathered_logits(model, pad_batch(tok.input_ids, 0)), -1)[:, tok.choice_ids].double()
    answers = torch.tensor([q["answer"] for q in questions])
    bytes_ = torch.tensor([len(" " + c) for c in CHOICES], dtype=torch.float64)
    acc = (logp.argmax(-1) == answers).double().mean().item()
    acc_norm = ((logp / bytes_).argmax(-1) == answers).double().mean().item()
    assert acc == pytest.approx(scores.argmax_true.double().mean().item())
    return acc, acc_norm


def test_local_task_matches_independent_scoring(tokenizer, make_model, tmp_path, offline):
    rng = random.Random(0)
    questions = [{"question": f"Fact : {f} {last} plays the sport of", "choices": CHOICES, "answer": rng.randrange(4)}
                 for f in FIRST for last in LAST]
    write_task(tmp_path, questions)
    model = make_model("llama", seed=0, initializer_range=0.3)
    model.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    result = capability_eval(model, tokenizer, tasks=("mu_fast_tiny_mc",), task_dir=tmp_path, batch_size=5)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert model.training  # restored after lm-eval's eval()
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    row = result["tasks"]["mu_fast_tiny_mc"]
    assert set(row) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
    assert row["n"] == len(questions) == 24
    acc, acc_norm = independent_scores(model, tokenizer, questions)
    assert 0 < acc < 1 and acc_norm != acc  # the check can tell the two metrics and a wrong scoring apart
    assert row["acc"] == pytest.approx(acc, abs=1e-12)
    assert row["acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    assert row["acc_stderr"] == pytest.approx((acc * (1 - acc) / (len(questions) - 1)) ** 0.5, rel=1e-9)
    assert result["settings"]["tasks"] == ["mu_fast_tiny_mc"] and result["settings"]["num_fewshot"] == 0
    assert result["settings"]["lm_eval_version"].startswith("0.4")
    # The model's current (edited) weights are what is scored: change them and the numbers follow.
    with torch.no_grad():
        model.lm_head.weight.mul_(-1)
    flipped = capability_eval(model, tokenizer, tasks=["mu_fast_tiny_mc"], task_dir=tmp_path, batch_size=5, limit=6)
    assert flipped["tasks"]["mu_fast_tiny_mc"]["n"] == 6
    assert flipped["tasks"]["mu_fast_tiny_mc"]["acc"] == pytest.approx(independent_scores(model, tokenizer, questions[:6])[0])


def test_missing_dataset_offline_is_one_clear_error(tokenizer, make_model, tmp_path, offline):
    write_task(tmp_path, [{"question": "x", "choices": CHOICES, "answer": 0}], name="needs_the_hub",
               dataset_path="mu-fast-tests/no-such-dataset")
    model = make_model("llama")
    with pytest.raises(RuntimeError, match=r"task 'needs_the_hub'.*run once online.*task_dir") as info:
        capability_eval(model, tokenizer, tasks=["needs_the_hub"], task_dir=tmp_path)
    assert "\n" not in str(info.value)


def test_unknown_task_and_bad_arguments(tokenizer, make_model, tmp_path):
    from lm_eval.tasks import TaskManager

    write_task(tmp_path, [{"question": "x", "choices": CHOICES, "answer": 0}])
    local = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(ValueError, match=r"no task or group 'mu_fast_tiny_mx'.*did you mean \['mu_fast_tiny_mc'\]"):
        _build(local, "mu_fast_tiny_mx")
    model = make_model("llama")
    with pytest.raises(ValueError, match="task_dir"):
        capability_eval(model, tokenizer, tasks=["x"], task_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="tasks is empty"):
        capability_eval(model, tokenizer, tasks=[])


def test_tiny_mmlu_is_the_authors_argmax_accuracy():
    # The authors' in-loop tinyMMLU: input_formatted, argmax over " A".." D", plain accuracy (not lm-eval's IRT acc_norm).
    assert TINY_MMLU_TASK["dataset_path"] == "tinyBenchmarks/tinyMMLU"
    assert TINY_MMLU_TASK["doc_to_text"] == "{{input_formatted}}" and TINY_MMLU_TASK["doc_to_choice"] == list("ABCD")
    assert TINY_MMLU_TASK["metric_list"] == [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]


def test_sweep_capability_without_offline_data_is_skipped_with_the_reason(tokenizer, make_model, tmp_path, offline):
    """The registered sweep evaluation turns a dataset that is not available offline into a skipped result."""
    from mu_fast.sweep.evaluations import resolve_evaluations
    from mu_fast.sweep.protocol_evaluations import run_capability

    write_task(tmp_path, [{"question": "x", "choices": CHOICES, "answer": 0}], name="hub_only",
               dataset_path="mu-fast-tests/no-such-dataset")
    settings = resolve_evaluations({"capability": {"tasks": "hub_only", "task_dir": str(tmp_path)}})["extra"]["capability"]
    out = run_capability(make_model("llama"), tokenizer, None, settings, 0)
    assert out["metrics"] == {} and "task 'hub_only'" in out["skipped"] and "run once online" in out["skipped"]

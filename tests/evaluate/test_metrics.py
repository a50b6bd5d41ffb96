"""prompt_scores / set_accuracy against a brute-force per-prompt computation."""

from __future__ import annotations

import copy

import pytest
import torch

from mu_fast.data.base import PromptSet, tokenize_prompts
from mu_fast.evaluate import prompt_scores, set_accuracy

FP32_TOL = 100 * torch.finfo(torch.float32).eps  # both paths end in fp32 logits; only summation order differs


def brute_force(model, tokenized):
    """Per prompt, unbatched: the full model forward, fp64 softmax over the choices / the full vocabulary."""
    out = {"p_true": [], "p_edit": [], "argmax_true": [], "argmax_edit": [], "logprob_true": []}
    choices = tokenized.choice_ids
    with torch.no_grad():
        for i, ids in enumerate(tokenized.input_ids):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
            logp = torch.log_softmax(logits, -1)
            t = int(tokenized.answer_ids[i])
            out["logprob_true"].append(float(logp[t]))
            if choices is not None:
                p = torch.softmax(logits[choices], -1)
                out["p_true"].append(float(p[tokenized.answer_choice[i]]))
                out["argmax_true"].append(int(p.argmax()) == int(tokenized.answer_choice[i]))
            else:
                out["p_true"].append(float(logp[t].exp()))
                out["argmax_true"].append(int(logits.argmax()) == t)
            if tokenized.edit_ids is not None:
                if tokenized.edit_choice is not None:
                    out["p_edit"].append(float(p[tokenized.edit_choice[i]]))
                    out["argmax_edit"].append(int(p.argmax()) == int(tokenized.edit_choice[i]))
                else:
                    e = int(tokenized.edit_ids[i])
                    out["p_edit"].append(float(logp[e].exp()))
                    out["argmax_edit"].append(int(logits.argmax()) == e)
    return {
        k: torch.tensor(v, dtype=torch.float64 if k.startswith(("p_", "log")) else torch.bool) for k, v in out.items()
    }


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("dataset", ["sports", "counterfact"])
@pytest.mark.parametrize("fmt", ["normal", "mcq", "paraphrase"])
def test_scores_match_brute_force_fp32(tokenizer, make_model, make_task, arch, dataset, fmt):
    model = make_model(arch, seed=3)
    task = make_task(n_athletes=30, n_forget=9, dataset=dataset, seed=1)
    tok = tokenize_prompts(tokenizer, task.formats[fmt]["forget"])
    got = prompt_scores(model, tok, batch_size=4)
    ref = brute_force(model, tok)
    for key in ("p_true", "p_edit", "logprob_true"):
        torch.testing.assert_close(getattr(got, key).double(), ref[key], atol=FP32_TOL, rtol=FP32_TOL)
    assert torch.equal(got.argmax_true, ref["argmax_true"])
    assert torch.equal(got.argmax_edit, ref["argmax_edit"])
    assert got.edit_over_choices == (tok.choice_ids is not None)
    assert torch.equal(got.fact_ids, torch.tensor(list(task.formats[fmt]["forget"].fact_ids)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_scores_low_and_high_precision(tokenizer, make_model, make_task, dtype):
    """Batched scores of a bf16/fp64 model: error vs an fp64 unbatched reference of the same weights is at most
    2x the error of the unbatched path at the model's own precision (plus one ulp of fp32 for fp64 models,
    whose eager softmax runs in fp32)."""
    model = make_model("llama", seed=5, dtype=dtype)
    ref_model = copy.deepcopy(model).double()
    task = make_task(n_athletes=30, n_forget=12, seed=2)
    tok = tokenize_prompts(tokenizer, task.forget_test)
    got = prompt_scores(model, tok, batch_size=5)
    single = brute_force(model, tok)
    ref = brute_force(ref_model, tok)
    for key in ("p_true", "p_edit"):
        err_batched = (getattr(got, key).double() - ref[key]).abs().max()
        err_single = (single[key] - ref[key]).abs().max()
        assert err_batched <= 2 * err_single + FP32_TOL, (key, float(err_batched), float(err_single))


def test_batching_and_order_do_not_change_scores(tokenizer, make_model, make_task):
    model = make_model("llama", seed=7)
    task = make_task(n_athletes=36, n_forget=6, seed=3)
    tok = tokenize_prompts(tokenizer, task.formats["paraphrase"]["maintain"])  # mixed prompt lengths
    base = prompt_scores(model, tok, batch_size=len(tok))
    perm = torch.randperm(len(tok), generator=torch.Generator().manual_seed(0)).tolist()
    for batch_size in (1, 3, 7):
        other = prompt_scores(model, tok, batch_size=batch_size)
        torch.testing.assert_close(other.p_true, base.p_true, atol=FP32_TOL, rtol=FP32_TOL)
        torch.testing.assert_close(other.logprob_true, base.logprob_true, atol=FP32_TOL, rtol=FP32_TOL)
    permuted = prompt_scores(model, tok.subset(perm), batch_size=4)
    torch.testing.assert_close(permuted.p_true, base.p_true[perm], atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(permuted.p_edit, base.p_edit[perm], atol=FP32_TOL, rtol=FP32_TOL)


def test_edit_outside_choices_scores_over_full_vocab(tokenizer, make_model, make_task):
    """Choices cover the true answers but not the edit answer ' golf': the edit falls back to the full vocabulary."""
    model = make_model("llama", seed=1)
    names = ["ka bo", "lo fe", "mi hu"]
    ps = PromptSet(
        [f"Fact : {n} plays the sport of" for n in names],
        [" football", " baseball", " basketball"],
        [" golf"] * 3,
        [" football", " baseball", " basketball"],
        names,
        None,
        "last",
        name="golf_edit",
    )
    tok = tokenize_prompts(tokenizer, ps)
    got = prompt_scores(model, tok)
    ref = brute_force(model, tok)
    assert not got.edit_over_choices
    torch.testing.assert_close(got.p_edit.double(), ref["p_edit"], atol=FP32_TOL, rtol=FP32_TOL)
    torch.testing.assert_close(got.p_true.double(), ref["p_true"], atol=FP32_TOL, rtol=FP32_TOL)


def test_set_accuracy_averages_and_unlearning_sets(tokenizer, make_model, make_task):
    model = make_model("llama", seed=2)
    task = make_task(n_athletes=24, n_forget=8, seed=4)
    ps = task.forget_test
    no_edit = PromptSet(
        ps.prompts, ps.answers, None, ps.choices, ps.subjects, ps.fact_ids, ps.label_token, name="unlearn"
    )
    scores = prompt_scores(model, tokenize_prompts(tokenizer, no_edit))
    acc = set_accuracy(scores)
    assert acc["n"] == len(ps)
    assert acc["acc"] == pytest.approx(float(scores.p_true.double().mean()))
    assert acc["argmax_acc"] == pytest.approx(float(scores.argmax_true.double().mean()))
    assert acc["ce"] == pytest.approx(-float(scores.logprob_true.double().mean()))
    assert acc["edit_acc"] is None and acc["edit_argmax_acc"] is None
    assert scores.p_edit is None
    assert 0.0 < acc["acc"] < 1.0


def test_model_state_is_restored(tokenizer, make_model, make_task):
    model = make_model("llama").train()
    tok = tokenize_prompts(tokenizer, make_task(seed=5).forget_test)
    prompt_scores(model, tok)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_empty_set_raises(tokenizer, make_model, make_task):
    model = make_model()
    tok = tokenize_prompts(tokenizer, make_task().forget_test)
    with pytest.raises(ValueError, match="empty"):
        prompt_scores(model, tok.subset([]))


def test_mismatched_tokenizer_raises(tokenizer, make_model, build_tokenizer):
    bigger = build_tokenizer(extra_words=tuple(f"w{i}" for i in range(20)) + ("zzz",))
    model = make_model()  # vocabulary of the smaller tokenizer
    ps = PromptSet(["Fact : ka bo plays the sport of zzz"], [" football"], name="foreign")
    tok = tokenize_prompts(bigger, ps)
    with pytest.raises(ValueError, match="tokenizer that belongs to this model"):
        prompt_scores(model, tok)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")


@requires_cuda
@pytest.mark.parametrize("fmt", ["normal", "mcq"])
def test_scores_on_cuda_match_cpu(tokenizer, make_model, make_task, fmt):
    """Same weights on the GPU: fp32 scores equal the CPU's up to fp32 summation-order noise (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_model("gemma2", seed=3)
    tok = tokenize_prompts(tokenizer, make_task(n_athletes=30, n_forget=9, seed=1).formats[fmt]["forget"])
    cpu = prompt_scores(model, tok, batch_size=4)
    gpu = prompt_scores(copy.deepcopy(model).cuda(), tok, batch_size=4)
    assert gpu.p_true.device.type == "cpu"
    for key in ("p_true", "p_edit", "logprob_true"):
        torch.testing.assert_close(getattr(gpu, key), getattr(cpu, key), atol=FP32_TOL, rtol=FP32_TOL)

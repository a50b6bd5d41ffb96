"""Bad inputs and non-finite metrics: attribute(), causal_trace() and verify() raise one clear error (naming the
offending index or value and the fix) before any forward, instead of an IndexError or NaN scores."""

from __future__ import annotations

import functools

import pytest
import torch

from mu_fast.data.base import Batch, pad_batch
from mu_fast.localize.attribution import attribute
from mu_fast.localize.causal_tracing import causal_trace
from mu_fast.localize.metrics import logit_diff, prob
from mu_fast.models.tiny import make_tiny_model

V = 97
METHODS = ["atp", "eap-ig", "exact"]


@functools.lru_cache(maxsize=None)
def tiny(attn: str = "sdpa", dtype: torch.dtype = torch.float64):
    return make_tiny_model("llama", seed=4, dtype=dtype, initializer_range=0.25, attn_implementation=attn)


def make_pair(rng, lengths=(6, 4, 5)):
    clean = [torch.randint(5, V, (n,), generator=rng).tolist() for n in lengths]
    corrupt = [[int(torch.randint(5, V, (1,), generator=rng)) if t in (1, 2) else x for t, x in enumerate(s)] for s in clean]
    B = len(lengths)
    return clean, corrupt, torch.randint(5, V, (B,), generator=rng), torch.randint(5, V, (B, 2), generator=rng)


class ForwardCounter:
    """Counts forwards of a model (embedding calls) so that a test can assert an error came before any."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.get_input_embeddings().register_forward_pre_hook(lambda *a: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def raises_before_forward(model, match, fn, exc=ValueError):
    with ForwardCounter(model) as counter, pytest.raises(exc, match=match):
        fn()
    assert counter.calls == 0, f"{counter.calls} forward(s) ran before the error"


# ------------------------------------------------------------------ non-finite metrics
@pytest.mark.parametrize("method", METHODS)
def test_fp64_eager_padding_nan_names_runs_prompts_and_fix(method, rng):
    model = tiny("eager")
    clean, corrupt, correct, wrong = make_pair(rng)
    left = pad_batch(clean, 0, side="left")
    with torch.no_grad():
        logits = model(input_ids=left.input_ids, attention_mask=left.attention_mask, position_ids=left.position_ids).logits
    plain_nan = torch.isnan(logits[torch.arange(3), left.last_pos]).any(-1)
    if not bool(plain_nan.any()):
        pytest.skip("this transformers version gives no NaN for fp64 eager attention with padding")
    idx = plain_nan.nonzero().flatten().tolist()
    n = len(idx)
    msg = rf"clean run's metric is NaN/inf for {n} of 3 prompts \(indices \[{', '.join(map(str, idx))}\]\).*corrupt run.*sdpa.*float32.*no padding"
    with pytest.raises(RuntimeError, match=msg):
        attribute(model, clean, corrupt, logit_diff(correct, wrong), sites=("head", "mlp"), method=method, padding_side="left")
    with pytest.raises(RuntimeError, match=r"causal_trace: the clean run's metric is NaN/inf.*noised run.*sdpa"):
        causal_trace(model, left, answer_ids=correct, subject_first=[1, 1, 1], subject_last=[2, 2, 2])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_nonfinite_corrupt_metric_names_the_corrupt_run(method, direction, rng):
    model = tiny()
    clean, corrupt, correct, wrong = make_pair(rng)
    corrupt[2][1] = 4  # token 4 appears only in corrupt prompt 2; the metric is inf there

    def metric(logits, batch, rows):
        value = logits[torch.arange(len(rows)), correct[rows]]
        return torch.where((batch.input_ids == 4).any(1), torch.full_like(value, float("inf")), value)

    with pytest.raises(RuntimeError, match=r"the corrupt run's metric is NaN/inf for 1 of 3 prompts \(indices \[2\]\)") as err:
        attribute(model, clean, corrupt, metric, sites=("head",), method=method, direction=direction)
    assert "clean run" not in str(err.value)


def test_nonfinite_gradient_with_finite_metrics_is_an_error(rng):
    model = tiny()
    clean, corrupt, correct, wrong = make_pair(rng)

    def metric(logits, batch, rows):
        own = logits[torch.arange(len(rows)), correct[rows]]
        # value 0 · sqrt(0) = 0, but its gradient is 0 · inf = NaN
        return own + 0 * torch.sqrt(own - own.detach())

    with pytest.raises(RuntimeError, match=r"scores of 3 of 3 prompts .* are NaN/inf although both runs' metrics are finite"):
        attribute(model, clean, corrupt, metric, sites=("head", "mlp"), method="atp")


def test_causal_trace_nonfinite_metric_names_prompt(rng):
    model = tiny()
    clean, _, correct, _ = make_pair(rng)

    def metric(logits, batch, rows):
        value = torch.softmax(logits, -1)[torch.arange(len(rows)), correct[rows]]
        return torch.where(rows == 1, torch.full_like(value, float("nan")), value)

    with pytest.raises(RuntimeError, match=r"causal_trace: the clean run's metric is NaN/inf for 1 of 3 prompts \(indices \[1\]\)"):
        causal_trace(model, pad_batch(clean, 0), metric=metric, subject_first=[1, 1, 1], subject_last=[2, 2, 2])


def test_verify_nonfinite_patched_metric(rng):
    model = tiny()
    clean, corrupt, correct, _ = make_pair(rng)
    broken = {"now": False}

    def metric(logits, batch, rows):
        value = logits[torch.arange(len(rows)), correct[rows]]
        return value * float("nan") if broken["now"] else value

    res = attribute(model, clean, corrupt, metric, sites=("head",), method="atp")
    broken["now"] = True
    with pytest.raises(RuntimeError, match=r"verify \(atp\): the base run's metric is NaN/inf for 3 of 3 prompts.*sdpa"):
        res.verify(k=2, n_random=0)


# ------------------------------------------------------------------ inputs, before any forward
@pytest.mark.parametrize("method", METHODS)
def test_attribute_bad_inputs_raise_before_forward(method, rng):
    model = tiny()
    clean, corrupt, correct, wrong = make_pair(rng)
    ok = logit_diff(correct, wrong)

    def call(c=clean, k=corrupt, metric=ok):
        return lambda: attribute(model, c, k, metric, sites=("head", "mlp"), method=method)

    bad_ids = [list(s) for s in clean]
    bad_ids[1][2] = V + 23
    raises_before_forward(model, rf"clean: token id {V + 23} at prompt 1, position 2 .*outside the model's vocabulary \[0, {V}\)", call(c=bad_ids))
    neg = [list(s) for s in corrupt]
    neg[0][0] = -1
    raises_before_forward(model, r"corrupt: token id -1 at prompt 0, position 0", call(k=neg))
    big = correct.clone()
    big[1] = V
    raises_before_forward(model, rf"correct\[1\] = {V} is outside the model's vocabulary \[0, {V}\)", call(metric=logit_diff(big, wrong)))
    low = wrong.clone()
    low[2, 1] = -3
    raises_before_forward(model, r"incorrect\[2, 1\] = -3 is outside", call(metric=logit_diff(correct, low)))
    raises_before_forward(model, rf"answer\[1\] = {V + 1} is outside", call(metric=prob(torch.tensor([5, V + 1, 6]))))
    raises_before_forward(model, r"clean: no prompts given", lambda: attribute(model, [], [], ok, method=method))
    raises_before_forward(model, r"clean has 3 prompts and corrupt has 2", call(k=corrupt[:2]))
    shorter = [corrupt[0][:-1], corrupt[1], corrupt[2]]  # padded width differs too (6 vs 5 columns)
    raises_before_forward(model, r"prompt 0: clean and corrupt have different lengths \(6 vs 5 tokens\)", call(k=shorter))
    raises_before_forward(model, r"corrupt: prompt\(s\) \[1\] have no tokens", call(k=[corrupt[0], [], corrupt[2]]))


def _batch(ids, last_pos):
    b = pad_batch(ids, 0)
    return Batch(b.input_ids, b.attention_mask, b.position_ids, torch.as_tensor(last_pos))


def test_answer_positions_out_of_range_or_on_padding(rng):
    model = tiny()
    clean, corrupt, correct, wrong = make_pair(rng)  # lengths 6, 4, 5: padded width 6
    metric = logit_diff(correct, wrong)
    good = pad_batch(clean, 0).last_pos.tolist()
    for last, match in [
        ([good[0], 6, good[2]], r"clean: answer position last_pos\[1\] = 6 is outside the row's 6 columns \[0, 6\)"),
        ([good[0], good[1], -1], r"last_pos\[2\] = -1 is outside"),
        ([good[0], 5, good[2]], r"clean: answer position last_pos\[1\] = 5 points at padding"),
    ]:
        raises_before_forward(model, match, lambda last=last: attribute(model, _batch(clean, last), _batch(corrupt, last), metric))
        raises_before_forward(
            model, match.replace("clean", "prompts"),
            lambda last=last: causal_trace(model, _batch(clean, last), answer_ids=correct, subject_first=[1, 1, 1], subject_last=[2, 2, 2]),
        )
    # An answer position inside the prompt but before its end is allowed (a metric read mid-prompt).
    inner = [3, 2, 2]
    res = attribute(model, _batch(clean, inner), _batch(corrupt, inner), logit_diff(correct, wrong, None), sites=("mlp",))
    assert torch.isfinite(res.mlp).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_trace_subject_span_errors(side, rng):
    model = tiny()
    clean, _, correct, _ = make_pair(rng)  # lengths 6, 4, 5
    batch = pad_batch(clean, 0, side=side)
    for first, last, match in [
        ([1, 1, 1], [2, 4, 2], r"prompt 1: subject span 1..4 is outside the prompt's 4 real tokens"),
        ([1, 1, 5], [2, 2, 5], r"prompt 2: subject span 5..5 is outside the prompt's 5 real tokens"),
        ([-1, 1, 1], [2, 2, 2], r"prompt 0: subject span -1..2 is outside"),
        ([1, 3, 1], [2, 2, 2], r"prompt 1: subject span 3..2 is empty"),
        ([1, 1], [2, 2], r"subject_first / subject_last must be \[3\]"),
    ]:
        raises_before_forward(model, match, lambda f=first, la=last: causal_trace(model, batch, answer_ids=correct, subject_first=f, subject_last=la))
    raises_before_forward(model, rf"prob: answer\[0\] = {V} is outside", lambda: causal_trace(model, batch, answer_ids=[V, 5, 6], subject_first=[1, 1, 1], subject_last=[2, 2, 2]))
    raises_before_forward(model, r"prompts: token id 200 at prompt 0", lambda: causal_trace(model, [[200, 5, 6]], answer_ids=[5], subject_first=[0], subject_last=[1]))
    raises_before_forward(model, r"prompts: no prompts given", lambda: causal_trace(model, [], answer_ids=[], subject_first=[], subject_last=[]))
    raises_before_forward(model, r"unknown|noise must be", lambda: causal_trace(model, batch, noise="5sigma", answer_ids=correct, subject_first=[1, 1, 1], subject_last=[2, 2, 2]))


def test_causal_trace_is_independent_of_padding_side_and_chunking(rng):
    model = tiny()
    clean, _, correct, _ = make_pair(rng, lengths=(7, 4, 6, 5))
    kw = dict(sites=("head", "mlp"), answer_ids=correct, subject_first=[1, 0, 2, 1], subject_last=[3, 1, 4, 2], samples=2, seed=5)
    right = causal_trace(model, pad_batch(clean, 0, side="right"), **kw)
    left = causal_trace(model, pad_batch(clean, 0, side="left"), **kw)
    alone = causal_trace(model, pad_batch(clean, 0, side="left"), micro_batch=1, **kw)
    for res in (left, alone):
        torch.testing.assert_close(res.corrupt_metric, right.corrupt_metric, rtol=1e-9, atol=1e-12)
        for key in right.per_prompt:
            torch.testing.assert_close(res.per_prompt[key], right.per_prompt[key], rtol=1e-8, atol=1e-10)

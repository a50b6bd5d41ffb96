"""MaskedAdamW where a drop-in for torch.optim.AdamW is expected: default hyperparameters, copy.deepcopy and pickle,
the optimizer hooks torch offers (state-dict, load-state-dict, step), and mask entries it must refuse."""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch

from mu_fast.masks import Selection
from mu_fast.optim import MaskedAdamW, backend_availability
from tests.optim._oracle import fresh_grads, make_mask, make_params

FAST = [b for b in ("cpu", "torch") if backend_availability("cpu")[b] == "available"]


# ------------------------------------------------------------------------------------------------ defaults
def test_default_hyperparameters_are_torch_adamws():
    ours, theirs = inspect.signature(MaskedAdamW).parameters, inspect.signature(torch.optim.AdamW).parameters
    for name in ("lr", "betas", "eps", "weight_decay", "maximize"):
        assert ours[name].default == theirs[name].default, name


@pytest.mark.parametrize("backend", FAST)
def test_same_kwargs_give_torch_adamws_weights(backend, rng):
    """No weight_decay given on either side: the weights after a few steps agree (they did not while ours
    defaulted to 0 and torch's to 0.01: a relative gap of lr * 0.01 per step)."""
    init = [torch.randn(6, 5, generator=rng), torch.randn(7, generator=rng)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(3)]
    runs = []
    for make in (lambda ps: MaskedAdamW(ps, lr=0.1, backend=backend), lambda ps: torch.optim.AdamW(ps, lr=0.1)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        runs.append(params)
    for ours, theirs in zip(*runs):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- deepcopy, pickle
def _copies(how, params, opt):
    if how == "deepcopy":
        return copy.deepcopy((params, opt))
    return pickle.loads(pickle.dumps((params, opt)))


def _backward(params, mask, rng):
    """Gradients through autograd (so compact-gradient hooks run): d/dp of sum(p * r) is r."""
    coeffs = fresh_grads(params, mask, rng)
    return lambda ps: sum((ps[n] * coeffs[n]).sum() for n in mask).backward()


COPY_CASES = [(b, d, s, c) for b in FAST for d in ("fp32", "bf16_master") for s in (32, 8) for c in (False, True)]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend,dtype,state_bits,compact", COPY_CASES)
def test_a_copy_steps_exactly_as_the_original(how, backend, dtype, state_bits, compact, rng):
    dtype, master = {"fp32": (torch.float32, False), "bf16_master": (torch.bfloat16, True)}[dtype]
    params = make_params(dtype, rng)
    mask = make_mask(params, "cols", 0.3, rng)
    params = {n: params[n] for n in mask}
    opt = MaskedAdamW(list(params.items()), mask=mask, lr=1e-2, weight_decay=0.1, backend=backend,
                      master_weights=master, state_bits=state_bits, compact_grads=compact, tile=256)
    for _ in range(2):
        opt.zero_grad()
        _backward(params, mask, rng)(params)
        opt.step()
    opt.zero_grad()
    backward = _backward(params, mask, rng)
    backward(params)  # pending gradients (compact: already gathered into the buffer) travel with the copy
    opt.clip_grad_norm_(0.5)  # and so does a pending clip
    params2, opt2 = _copies(how, params, opt)
    assert all(params2[n] is not params[n] for n in params) and opt2.param_groups[0]["params"][0] is params2[next(iter(params))]
    for n in params:  # torch copies a Parameter without its .grad; the compact buffer is the optimizer's own
        assert params2[n].grad is None
        params2[n].grad = None if params[n].grad is None else params[n].grad.clone()
    for ps, o in ((params, opt), (params2, opt2)):
        o.step()
        o.zero_grad()
        backward(ps)
        o.step()
    for n in params:
        assert torch.equal(params[n], params2[n]), n
    for b, b2 in zip(opt._buckets, opt2._buckets):
        for key, value in b.state_tensors().items():
            assert torch.equal(value, b2.state_tensors()[key]), key
    assert torch.equal(opt._slot_step, opt2._slot_step)


def test_a_copy_made_before_the_first_step_reads_its_own_master(rng):
    params = make_params(torch.bfloat16, rng)
    mask = make_mask(params, "rows", 0.5, rng)
    params = {n: params[n] for n in mask}
    opt = MaskedAdamW(list(params.items()), mask=mask, lr=1e-2, master_weights=True, backend=FAST[0])
    params2, opt2 = copy.deepcopy((params, opt))
    grads = fresh_grads(params, mask, rng)
    for ps, o in ((params, opt), (params2, opt2)):
        for n in mask:
            ps[n].grad = grads[n].clone()
        o.step()
    assert all(torch.equal(params[n], params2[n]) for n in params)


@pytest.mark.parametrize("backend", FAST)
def test_state_dict_saved_before_the_first_step_does_not_zero_the_master(backend, rng):
    """A bf16 master copy is read from the parameters at the first step; a state_dict saved before it held the
    unread (zero) buffer, and loading it set the parameters to about zero."""
    params = make_params(torch.bfloat16, rng)
    mask = make_mask(params, "rows", 0.5, rng)
    twins = {n: torch.nn.Parameter(params[n].detach().clone()) for n in mask}
    opts = [MaskedAdamW([(n, ps[n]) for n in mask], mask=mask, lr=1e-2, master_weights=True, backend=backend)
            for ps in (params, twins)]
    opts[1].load_state_dict(opts[0].state_dict())
    grads = fresh_grads(params, mask, rng)
    for ps, o in zip((params, twins), opts):
        for n in mask:
            ps[n].grad = grads[n].clone()
        o.step()
    assert all(torch.equal(params[n], twins[n]) for n in mask)


# -------------------------------------------------------------------------------------------------- hooks
def _small(rng, **kw):
    w = torch.nn.Parameter(torch.randn(6, 4, generator=rng))
    return w, MaskedAdamW([("w", w)], mask={"w": Selection("rows", torch.tensor([1, 4]))}, lr=1e-2, **kw)


def test_load_state_dict_hooks_run(rng):
    w, opt = _small(rng)
    w.grad = torch.ones_like(w)
    opt.step()
    saved = opt.state_dict()
    _, fresh = _small(rng)
    calls = []

    def pre(optimizer, state_dict):
        calls.append(("pre", optimizer))
        state_dict = dict(state_dict, param_groups=[dict(g, lr=0.5) for g in state_dict["param_groups"]])
        return state_dict  # a returned dict is the one loaded

    fresh.register_load_state_dict_pre_hook(pre)
    fresh.register_load_state_dict_post_hook(lambda optimizer: calls.append(("post", optimizer)))
    fresh.load_state_dict(saved)
    assert calls == [("pre", fresh), ("post", fresh)]
    assert fresh.param_groups[0]["lr"] == 0.5 and saved["param_groups"][0]["lr"] == 1e-2
    assert float(fresh.state[fresh.param_groups[0]["params"][0]]["step"]) == 1


def test_state_dict_and_step_hooks_run(rng):
    w, opt = _small(rng)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: dict(sd, extra=1))
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("step_post"))
    w.grad = torch.ones_like(w)
    opt.step()
    assert opt.state_dict()["extra"] == 1
    assert calls == ["step_pre", "step_post", "sd_pre"]


# ------------------------------------------------------------------------------------------- mask entries
@pytest.mark.parametrize("value,match", [
    (Selection("rows", torch.tensor([1.7, 0.2])), r"row indices for 'w' must be integers; got torch.float32 values such as 1.7, 0.2"),
    (Selection("cols", torch.tensor([True, False, True, False])), r"column indices for 'w' must be integers; got torch.bool"),
    (torch.zeros(6, 4, dtype=torch.bool, device="meta"), r"element mask for 'w' is on the meta device"),
    (Selection("rows", torch.tensor([1, 2], device="meta")), r"row index tensor for 'w' is on the meta device"),
])
def test_mask_entries_that_cannot_be_read_are_refused(value, match, rng):
    w = torch.nn.Parameter(torch.randn(6, 4, generator=rng))
    with pytest.raises(ValueError, match=match):
        MaskedAdamW([("w", w)], mask={"w": value})


def test_an_unknown_selection_kind_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"selection kind 'diag' is not one of \('whole', 'rows', 'cols', 'elements'\)"):
        Selection("diag", None)

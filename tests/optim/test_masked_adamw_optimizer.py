"""MaskedAdamW as a torch.optim.Optimizer: schedulers, state_dict round-trip, non-finite policy, clipping,
compact gradients, mask changes and user errors."""

from __future__ import annotations

import io

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.optim import MaskedAdamW, backend_availability
from tests.optim._oracle import DenseOracle, assert_matches_oracle, fresh_grads, make_mask, make_params

FAST = [b for b in ("cpu", "torch") if backend_availability("cpu")[b] == "available"]
ALL = FAST + (["triton"] if backend_availability("cpu")["triton"] == "available" else [])


def _setup(rng, dtype=torch.float32, structure="rows", density=0.5, **kw):
    params = make_params(dtype, rng)
    mask = make_mask(params, structure, density, rng)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, **kw)
    return params, mask, opt


def _apply(params, mask, grads):
    for n in mask:
        params[n].grad = grads[n].clone()


def _snapshot(params, opt):
    state = {k: v.clone() for b in opt._buckets for k, v in b.state_tensors().items()}
    return {n: p.detach().clone() for n, p in params.items()}, state, opt._slot_step.clone()


@pytest.mark.parametrize("backend", FAST)
def test_cosine_schedule_changes_lr_every_step(backend, rng):
    params, mask, opt = _setup(rng, lr=3e-2, weight_decay=0.05, backend=backend)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    before = {n: p.detach().clone() for n, p in params.items()}
    oracle = DenseOracle(params, mask)
    for _ in range(4):
        lr = opt.param_groups[0]["lr"]
        grads = fresh_grads(params, mask, rng)
        _apply(params, mask, grads)
        opt.step()
        sched.step()
        oracle.step(grads, lr, weight_decay=0.05)
    assert opt.param_groups[0]["lr"] < 3e-2
    assert_matches_oracle(params, before, oracle, mask, 4, 3e-2)


ROUND_TRIP = [(b, d, s) for b in FAST for d in ("fp32", "bf16_master") for s in (32, 8)]
ROUND_TRIP += [("triton", "fp32", 32)] if "triton" in ALL else []  # interpreter budget; the full set runs on GPU


@pytest.mark.parametrize("backend,dtype,state_bits", ROUND_TRIP)
def test_state_dict_round_trip_gives_identical_trajectory(backend, dtype, state_bits, rng):
    dtype, master = {"fp32": (torch.float32, False), "bf16_master": (torch.bfloat16, True)}[dtype]
    kw = dict(lr=1e-2, weight_decay=0.1, backend=backend, master_weights=master, state_bits=state_bits,
              tile=1024 if backend == "triton" else 256)
    params, mask, opt = _setup(rng, dtype, "cols", 0.5, **kw)
    grads = [fresh_grads(params, mask, rng) for _ in range(4)]
    for g in grads[:2]:
        _apply(params, mask, g)
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    twin = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    for g in grads[2:]:
        _apply(params, mask, g)
        opt.step()
    twin_opt = MaskedAdamW([(n, twin[n]) for n in mask], mask=mask, **kw)
    buffer.seek(0)
    twin_opt.load_state_dict(torch.load(buffer, weights_only=False))
    for g in grads[2:]:
        _apply(twin, mask, g)
        twin_opt.step()
    for n in params:
        assert torch.equal(params[n].detach(), twin[n].detach()), n
    for a, b in zip(opt._buckets, twin_opt._buckets):
        for key, value in a.state_tensors().items():
            assert torch.equal(value, b.state_tensors()[key]), key
    assert torch.equal(opt._slot_step, twin_opt._slot_step)


def test_state_dict_from_another_mask_is_refused(rng):
    params, mask, opt = _setup(rng, structure="rows")
    other = make_mask(params, "rows", 0.5, rng)
    other_opt = MaskedAdamW([(n, params[n]) for n in other], mask=other)
    if [n for n in other] == [n for n in mask] and all(other[n] == mask[n] for n in mask):
        pytest.skip("the random masks coincide")
    with pytest.raises(ValueError, match="different mask|param groups"):
        other_opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_active_gradient_skips_the_step(backend, bad, rng):
    params, mask, opt = _setup(rng, lr=1e-2, weight_decay=0.1, backend=backend, tile=1024)
    _apply(params, mask, fresh_grads(params, mask, rng))
    opt.step()
    grads = fresh_grads(params, mask, rng)
    name = next(iter(mask))
    grads[name][mask.dense(name)] = bad  # poison the active gradient of one parameter
    _apply(params, mask, grads)
    before_p, before_state, before_step = _snapshot(params, opt)
    opt.step()
    after_p, after_state, after_step = _snapshot(params, opt)
    assert all(torch.equal(before_p[n], after_p[n]) for n in params)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert torch.equal(before_step, after_step)
    _apply(params, mask, fresh_grads(params, mask, rng))
    opt.step()  # a finite step afterwards proceeds
    assert not torch.equal(params[name].detach(), after_p[name]) and bool((opt._slot_step == 2.0).all())


def test_nonfinite_raise_policy_raises_and_changes_nothing(rng):
    params, mask, opt = _setup(rng, nonfinite="raise")
    grads = fresh_grads(params, mask, rng)
    name = list(mask)[-1]
    grads[name][mask.dense(name)] = float("nan")
    _apply(params, mask, grads)
    before_p, before_state, _ = _snapshot(params, opt)
    with pytest.raises(FloatingPointError, match=name):
        opt.step()
    after_p, after_state, _ = _snapshot(params, opt)
    assert all(torch.equal(before_p[n], after_p[n]) for n in params)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)


@pytest.mark.parametrize("backend", ALL)
def test_clip_grad_norm_matches_torch_over_active_grads(backend, rng):
    params, mask, opt = _setup(rng, torch.float32, "cols", 0.5, lr=1e-2, weight_decay=0.0, backend=backend, tile=1024)
    before = {n: p.detach().clone() for n, p in params.items()}
    oracle = DenseOracle(params, mask)
    for max_norm in (0.5, 1e6):  # clipping active, then inactive
        grads = fresh_grads(params, mask, rng, poison=False)
        masked = [(grads[n] * mask.dense(n)).double() for n in mask]
        expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in masked]))
        _apply(params, mask, grads)
        norm = opt.clip_grad_norm_(max_norm)
        torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)
        opt.step()
        oracle.step(grads, 1e-2, grad_scale=min(1.0, max_norm / (float(expected) + 1e-6)))
    assert_matches_oracle(params, before, oracle, mask, 2, 1e-2)


def test_max_grad_norm_argument_clips_every_step(rng):
    params, mask, opt = _setup(rng, lr=1e-2, weight_decay=0.0, max_grad_norm=0.25)
    before = {n: p.detach().clone() for n, p in params.items()}
    oracle = DenseOracle(params, mask)
    for _ in range(2):
        grads = fresh_grads(params, mask, rng)
        norm = float(torch.sqrt(sum(((grads[n].double() * mask.dense(n)) ** 2).nan_to_num(0).sum() for n in mask)))
        _apply(params, mask, grads)
        opt.step()
        oracle.step(grads, 1e-2, grad_scale=min(1.0, 0.25 / (norm + 1e-6)))
    assert_matches_oracle(params, before, oracle, mask, 2, 1e-2)


@pytest.mark.parametrize("backend", FAST)
def test_compact_grads_free_dense_grads_and_accumulate(backend, rng):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 5))
    twin = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 5))
    twin.load_state_dict(model.state_dict())
    names = dict(model.named_parameters())
    mask = Mask().add("0.weight", names["0.weight"].shape, "rows", [1, 5, 6, 7]).add(
        "2.weight", names["2.weight"].shape, "cols", [0, 3, 4, 19]).add("2.bias", names["2.bias"].shape)
    compact = MaskedAdamW(mask.trainable_parameters(model), mask=mask, lr=1e-2, compact_grads=True, backend=backend)
    dense = MaskedAdamW(mask.trainable_parameters(twin), mask=mask, lr=1e-2, backend=backend)
    batches = [torch.randn(6, 12, generator=rng) for _ in range(4)]
    for step in range(2):
        for opt, net in ((compact, model), (dense, twin)):
            opt.zero_grad(set_to_none=True)
            for x in batches[2 * step : 2 * step + 2]:  # two micro-batches accumulate
                net(x).square().mean().backward()
            if opt is compact:
                assert all(p.grad is None for _, p in mask.trainable_parameters(model))
            opt.step()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(a, b, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-7, msg=n)


@pytest.mark.parametrize("state_bits", [32, 8])
def test_set_mask_migrates_state_of_elements_active_in_both(state_bits, rng):
    params = make_params(torch.float32, rng)
    shape = params["w_odd"].shape
    old = Mask().add("w_odd", shape, "rows", [0, 1, 2, 3]).add("w_q", params["w_q"].shape)
    new = Mask().add("w_odd", shape, "rows", [2, 3, 4]).add("bias", params["bias"].shape)
    opt = MaskedAdamW([(n, params[n]) for n in ("w_odd", "w_q", "bias")], mask=old.union(Mask().add("bias", (29,), "rows", [0])),
                      lr=1e-2, state_bits=state_bits, tile=256)
    for _ in range(2):
        _apply(params, opt.mask, fresh_grads(params, opt.mask, rng))
        opt.step()
    m_before = opt._buckets[0].table.indices(0)[0], _exp_avg(opt, "w_odd")
    frozen = params["w_q"].detach().clone()
    opt.set_mask(new)
    flat_new, m_new = opt._buckets[0].table.indices(0)[0], _exp_avg(opt, "w_odd")
    kept = torch.isin(flat_new, m_before[0])
    row_len = shape[1]
    assert torch.equal(kept, flat_new < 4 * row_len)  # rows 2, 3 kept; row 4 is new
    old_pos = torch.searchsorted(m_before[0], flat_new[kept])
    tol = 0 if state_bits == 32 else 0.02 * float(m_before[1].abs().max())  # 8-bit: re-quantized per block
    assert float((m_new[kept] - m_before[1][old_pos]).abs().max()) <= tol
    assert bool((m_new[~kept] == 0).all())
    _apply(params, new, fresh_grads(params, new, rng))
    params["w_q"].grad = torch.randn(params["w_q"].shape)
    opt.step()
    assert torch.equal(params["w_q"].detach(), frozen)  # dropped from the mask: frozen


def _exp_avg(opt, name):
    from mu_fast.optim._state import read_slot

    for b in opt._buckets:
        for slot, info in enumerate(b.table.slots):
            if info.name == name:
                return read_slot(b, slot)["exp_avg"]
    raise KeyError(name)


def test_plain_parameters_and_mapping_masks(rng):
    a = torch.nn.Parameter(torch.randn(5, 4, generator=rng))
    b = torch.nn.Parameter(torch.randn(3, generator=rng))
    active = torch.zeros(5, 4, dtype=torch.bool)
    active[1, 2] = active[4, 0] = True
    opt = MaskedAdamW([a, b], mask={a: active, 1: "whole"}, lr=0.1)
    before_a = a.detach().clone()
    a.grad, b.grad = torch.ones(5, 4), torch.ones(3)
    opt.step()
    assert torch.equal(a.detach()[~active], before_a[~active]) and not torch.equal(a.detach()[active], before_a[active])
    assert opt.mask.param_count() == 2 + 3


def test_user_errors_name_the_problem(rng):
    params = make_params(torch.float32, rng)
    mask = Mask().add("w_odd", params["w_odd"].shape, "rows", [0])
    with pytest.raises(ValueError, match="not in the mask"):
        MaskedAdamW(list(params.items()), mask=mask)
    with pytest.raises(ValueError, match="was not given"):
        MaskedAdamW([("w_q", params["w_q"])], mask=Mask().add("w_q", (48, 24)).add("nope", (3,)))
    with pytest.raises(ValueError, match=r"has shape \(4, 4\)"):
        MaskedAdamW([("w_q", params["w_q"])], mask=Mask().add("w_q", (4, 4)))
    with pytest.raises(TypeError, match="int64"):  # float64 is supported (tests/optim/test_masked_adamw_fp64.py)
        MaskedAdamW([("x", torch.nn.Parameter(torch.zeros(3, dtype=torch.int64), requires_grad=False))])
    with pytest.raises(ValueError, match="backend must be one of"):
        MaskedAdamW([("w_q", params["w_q"])], backend="fast")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        MaskedAdamW([("w_q", params["w_q"])], backend="cuda")
    with pytest.raises(ValueError, match="betas"):
        MaskedAdamW([("w_q", params["w_q"])], betas=(0.9, 1.5))
    opt = MaskedAdamW([("w_q", params["w_q"])])
    params["w_q"].grad = torch.zeros(24, 48).t()  # right shape, transposed layout
    with pytest.raises(ValueError, match="gradient of 'w_q'.*non-contiguous"):
        opt.step()


def test_state_is_compact(rng):
    params = make_params(torch.bfloat16, rng)
    mask = make_mask(params, "rows", 0.05, rng)
    opt32 = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, master_weights=True)
    opt8 = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, state_bits=8)
    active = mask.param_count()
    assert opt32.state_bytes() <= 12 * (active + 64 * len(mask))  # m, v, master fp32 + per-param alignment
    assert opt8.state_bytes() <= (2 + 8 / 256) * (active + 256 * 3 * len(mask))  # + block padding per segment
    assert opt32.state_bytes() < 12 * sum(p.numel() for p in params.values()) / 4


@pytest.mark.parametrize("backend", ALL)
def test_nonfinite_ignore_skips_the_check_and_matches_skip_on_finite_grads(backend, rng):
    params, mask, _ = _setup(rng)
    twin = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    opts = [MaskedAdamW([(n, ps[n]) for n in mask], mask=mask, lr=1e-2, nonfinite=policy, backend=backend, tile=1024)
            for ps, policy in ((params, "skip"), (twin, "ignore"))]
    for _ in range(2):
        grads = fresh_grads(params, mask, rng)
        for ps, opt in zip((params, twin), opts):
            _apply(ps, mask, grads)
            opt.step()
    for n in mask:
        assert torch.equal(params[n].detach(), twin[n].detach()), n
    grads = fresh_grads(params, mask, rng)
    name = next(iter(mask))
    grads[name][mask.dense(name)] = float("nan")
    _apply(twin, mask, grads)
    opts[1].step()  # "ignore": the NaN reaches the active elements, like torch's AdamW; inactive ones stay intact
    active = mask.dense(name)
    assert bool(torch.isnan(twin[name].detach()[active]).all())
    assert torch.equal(twin[name].detach()[~active], params[name].detach()[~active])

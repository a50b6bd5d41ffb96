"""MaskedAdamW as a drop-in for torch.optim.AdamW on whole-tensor masks: parameters without gradients (skipped, with
torch's per-parameter step counts), ``maximize``, and huge but finite gradients (applied, never skipped). Every
backend; on a CUDA machine also the cuda and triton GPU backends."""

from __future__ import annotations

import warnings

import pytest
import torch

from mu_fast.optim import CompactBucket, MaskedAdamW, backend_availability, masked_adamw_reference, masked_adamw_step
from mu_fast.optim.masked_adamw import HYPER_FIELDS

SHAPES = [(5, 7), (11,), (3, 4)]
USES_B = [False, True, True, False, True]  # the second parameter gets no gradient on steps 0 and 3
FP32_TOL = dict(rtol=2e-5, atol=1e-6)  # fp32 arithmetic against torch's fp32 AdamW over 5 steps


def backend_devices() -> list:
    """(backend, device) pairs: the CPU backends, plus cuda and triton on CUDA tensors when a GPU is present."""
    pairs = [pytest.param(b, "cpu", id=f"{b}-cpu") for b in ("cpu", "torch", "triton")
             if backend_availability("cpu")[b] == "available"]
    if torch.cuda.is_available():
        pairs += [pytest.param(b, "cuda", id=f"{b}-cuda") for b in ("cuda", "triton")]
    return pairs


def need(backend: str, device: str) -> None:
    why = backend_availability(device)[backend]
    if why != "available":  # only CUDA pairs can get here: CPU pairs are listed when available
        pytest.fail(f"backend {backend!r} unavailable on {device}: {why}")


def _train(make_opt, device, init, xs, ys, uses_b=USES_B):
    """Five steps of a loss that uses b only on ``uses_b`` steps; c has requires_grad=False. Returns the optimizer,
    the parameters and their values after every step (on the CPU)."""
    a, b, c = (torch.nn.Parameter(t.clone().to(device)) for t in init)
    c.requires_grad_(False)
    opt = make_opt([a, b, c])
    trajectory = []
    for x, y, use_b in zip(xs, ys, uses_b):
        opt.zero_grad(set_to_none=True)
        loss = (a.sin() * x.to(device)).sum()
        if use_b:
            loss = loss + (b * b * y.to(device)).sum()
        loss.backward()
        opt.step()
        trajectory.append([p.detach().cpu().clone() for p in (a, b, c)])
    return opt, (a, b, c), trajectory


def _data(rng, n=len(USES_B)):
    init = [torch.randn(s, generator=rng) for s in SHAPES]
    return init, [torch.randn(SHAPES[0], generator=rng) for _ in range(n)], [torch.randn(SHAPES[1], generator=rng) for _ in range(n)]


@pytest.mark.parametrize("compact", [False, True], ids=["dense_grads", "compact_grads"])
@pytest.mark.parametrize("backend,device", backend_devices())
def test_parameters_without_gradients_are_skipped_like_torch(backend, device, compact, rng):
    """A parameter whose .grad is None on a step (unused in the loss), and one with requires_grad=False, are left
    untouched as torch's AdamW leaves them: same values every step, same per-parameter step counts."""
    need(backend, device)
    init, xs, ys = _data(rng)
    kw = dict(lr=1e-2, weight_decay=0.1)
    ours, ours_params, ours_traj = _train(lambda ps: MaskedAdamW(ps, backend=backend, compact_grads=compact, tile=256, **kw),
                                          device, init, xs, ys)
    ref, ref_params, ref_traj = _train(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw), "cpu", init, xs, ys)
    for step, (got, want) in enumerate(zip(ours_traj, ref_traj)):
        for name, g, w in zip("abc", got, want):
            torch.testing.assert_close(g, w, **FP32_TOL, msg=lambda m: f"step {step}, parameter {name}: {m}")
    assert torch.equal(ours_traj[-1][2], init[2])  # requires_grad=False: bit-identical
    for p, q in zip(ours_params[:2], ref_params[:2]):
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"])
    assert float(ours.state[ours_params[2]]["step"]) == 0.0 and ref_params[2] not in ref.state


@pytest.mark.parametrize("backend,device", backend_devices())
def test_missing_grad_zero_keeps_the_zero_gradient_semantics(backend, device, rng):
    """missing_grad="zero": a parameter without .grad is updated with a zero gradient (its moments and weight decay
    move), all parameters on one step count: the fp64 reference fed zeros for the missing gradient."""
    need(backend, device)
    init, xs, ys = _data(rng)
    a, b = (torch.nn.Parameter(t.clone().to(device)) for t in init[:2])
    opt = MaskedAdamW([a, b], lr=1e-2, weight_decay=0.1, backend=backend, missing_grad="zero", tile=256)
    state = [[t.double(), torch.zeros_like(t, dtype=torch.float64), torch.zeros_like(t, dtype=torch.float64)] for t in init[:2]]
    for t, (x, y, use_b) in enumerate(zip(xs, ys, USES_B), start=1):
        grads = [x, y if use_b else None]
        a.grad, b.grad = (None if g is None else g.to(device) for g in grads)
        opt.step()
        for s, g in zip(state, grads):
            g64 = torch.zeros_like(s[0]) if g is None else g.double()
            s[:] = masked_adamw_reference(*s[:1], g64, *s[1:], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                          weight_decay=0.1, step=t)
    for p, s in zip((a, b), state):
        torch.testing.assert_close(p.detach().cpu().double(), s[0], rtol=1e-5, atol=1e-6)
        assert float(opt.state[p]["step"]) == len(USES_B)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_maximize_matches_torch_per_group(backend, device, rng):
    need(backend, device)
    init, xs, ys = _data(rng)
    uses_b = [True] * len(USES_B)

    def groups(ps):
        return [{"params": [ps[0]], "maximize": True}, {"params": [ps[1], ps[2]]}]

    kw = dict(lr=1e-2, weight_decay=0.1)
    _, _, ours = _train(lambda ps: MaskedAdamW(groups(ps), backend=backend, tile=256, **kw), device, init, xs, ys, uses_b)
    _, _, ref = _train(lambda ps: torch.optim.AdamW(groups(ps), foreach=False, **kw), "cpu", init, xs, ys, uses_b)
    for got, want in zip(ours, ref):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **FP32_TOL)


@pytest.mark.parametrize("clip", [False, True], ids=["no_clip", "clip"])
@pytest.mark.parametrize("backend,device", backend_devices())
def test_huge_finite_gradient_is_applied_and_clipped_exactly(backend, device, clip, rng):
    """A single gradient of 3e19 squares to 9e38, past fp32's 3.4e38: the non-finite check must not skip the step,
    and the clip norm must be the true one (the fp64 reference of the clipped step)."""
    need(backend, device)
    p0 = torch.randn(6, 40, generator=rng)
    g = torch.randn(6, 40, generator=rng) * 1e-3
    g[2, 5] = 3e19
    w = torch.nn.Parameter(p0.clone().to(device))
    opt = MaskedAdamW([w], lr=1e-2, weight_decay=0.1, backend=backend, tile=256)
    w.grad = g.to(device)
    scale = 1.0
    if clip:
        norm = opt.clip_grad_norm_(1.0)
        expected = torch.linalg.vector_norm(g.double())
        torch.testing.assert_close(norm.double().cpu(), expected, rtol=1e-6, atol=0)
        scale = min(1.0, 1.0 / (float(expected) + 1e-6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "skipped" warning either
        opt.step()
    assert opt.skipped_steps == 0 and float(opt.state[w]["step"]) == 1.0
    ref, _, _ = masked_adamw_reference(p0.double(), g.double(), torch.zeros(6, 40, dtype=torch.float64),
                                       torch.zeros(6, 40, dtype=torch.float64), lr=1e-2, beta1=0.9, beta2=0.999,
                                       eps=1e-8, weight_decay=0.1, step=1, grad_scale=scale)
    torch.testing.assert_close(w.detach().cpu().double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_devices())
def test_skipped_steps_are_counted_and_warned_once(backend, device, rng):
    """A NaN gradient skips the step: opt.skipped_steps counts it, and one RuntimeWarning says so (on the CPU at that
    step; on CUDA at a later step once the counter's copy has landed, or when the counter is read)."""
    need(backend, device)
    w = torch.nn.Parameter(torch.randn(4, 9, generator=rng).to(device))
    opt = MaskedAdamW([w], lr=1e-2, backend=backend, tile=256)
    bad = torch.randn(4, 9, generator=rng)
    bad[1, 1] = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        w.grad = torch.randn(4, 9, generator=rng).to(device)
        opt.step()
        w.grad = bad.to(device)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        w.grad = torch.randn(4, 9, generator=rng).to(device)
        opt.step()  # CUDA: finds the landed copy of the counter here, without a sync
        first = [c for c in caught if issubclass(c.category, RuntimeWarning) and "skipped" in str(c.message)]
        assert len(first) == 1 and "skipped 1 step" in str(first[0].message), [str(c.message) for c in caught]
        w.grad = bad.to(device)
        opt.step()
        assert opt.skipped_steps == 2
    assert len([c for c in caught if "skipped" in str(c.message)]) == 1
    assert float(opt.state[w]["step"]) == 2.0


@pytest.mark.parametrize("backend,device", backend_devices())
def test_functional_step_matches_the_optimizer(backend, device, rng):
    """masked_adamw_step over a bucket (per-parameter step counts, a missing gradient skipped, maximize in the
    hyperparameter row) gives the optimizer's result bit for bit."""
    init, xs, ys = _data(rng)
    twins = [[torch.nn.Parameter(t.clone().to(device)) for t in init[:2]] for _ in range(2)]
    opt = MaskedAdamW([{"params": twins[0], "maximize": True}], lr=1e-2, weight_decay=0.1, backend=backend, tile=256)
    bucket = opt._buckets[0]
    functional = CompactBucket.create(twins[1], bucket.table)
    step = torch.zeros(2, dtype=torch.float64, device=device)
    hyper = torch.tensor([[1e-2, 0.9, 0.999, 1e-8, 0.1, 0.0, -1.0]], dtype=torch.float64, device=device)
    assert hyper.shape[1] == HYPER_FIELDS
    for x, y, use_b in zip(xs, ys, USES_B):
        grads = [x.to(device), y.to(device) if use_b else None]
        for p, g in zip(twins[0], grads):
            p.grad = g
        opt.step()
        masked_adamw_step(functional, grads, hyper, step, backend=backend)
    for a, b in zip(*twins):
        assert torch.equal(a.detach(), b.detach())
    assert step.tolist() == [float(opt.state[p]["step"]) for p in twins[0]] == [5.0, 3.0]

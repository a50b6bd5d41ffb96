"""MaskedAdamW on float64 parameters: float64 moments and arithmetic (the torch backend), equal to the fp64 dense
oracle to float64 round-off for every mask structure, inactive elements bit-identical; the float32 backends and
8-bit state are refused with the fix. (The demo edits the organism in float64: mu_fast.organism.lr_choice.)"""

from __future__ import annotations

import pytest
import torch

from mu_fast.optim import MaskedAdamW
from tests.optim._oracle import STRUCTURES, DenseOracle, fresh_grads, make_mask, make_params


@pytest.mark.parametrize("compact", [False, True], ids=["dense_grads", "compact_grads"])
@pytest.mark.parametrize("structure", STRUCTURES)
def test_float64_matches_the_oracle_to_float64_roundoff(structure, compact, rng):
    params = make_params(torch.float64, rng)
    mask = make_mask(params, structure, 0.3, rng)
    before = {n: p.detach().clone() for n, p in params.items()}
    lr, wd, steps = 3e-2, 0.1, 4
    opt = MaskedAdamW([(n, p) for n, p in params.items() if n in mask], mask=mask, lr=lr, weight_decay=wd,
                      compact_grads=compact, max_grad_norm=1.0)
    oracle = DenseOracle(params, mask)
    for _ in range(steps):
        grads = fresh_grads(params, mask, rng)
        opt.zero_grad(set_to_none=True)
        # through backward, so compact gradients are gathered by their hooks: d/dp sum(p * g) = g (NaN/inf poison
        # in the inactive entries included)
        sum((p * grads[n]).sum() for n, p in params.items() if n in mask).backward()
        # the clip factor the optimizer applies: global norm over the active gradients, in float64
        norm = torch.sqrt(sum((grads[n][oracle.active[n]] ** 2).sum() for n in mask))
        opt.step()
        oracle.step(grads, lr, weight_decay=wd, grad_scale=min(1.0, float(1.0 / (norm + 1e-6))))
    for name, p in params.items():
        assert p.dtype == torch.float64
        if name not in mask:
            assert torch.equal(p.detach(), before[name])
            continue
        act = oracle.active[name]
        assert torch.equal(p.detach()[~act], before[name][~act]), f"{name}: an inactive element changed"
        # float64 throughout: a few ulp of float64, far below float32's 1e-7 (which a float32 moment would leave).
        torch.testing.assert_close(p.detach()[act], oracle.p[name][act], rtol=1e-12, atol=1e-13)
    state = opt.state[params[next(iter(mask))]]
    assert state["exp_avg"].dtype == torch.float64


def test_float64_refuses_float32_backends_and_8bit_state(rng):
    params = make_params(torch.float64, rng, {"w_odd": (37, 29), "w_q": (48, 24)})
    mask = make_mask(params, "rows", 0.3, rng)
    with pytest.raises(ValueError, match="backend='torch'"):
        MaskedAdamW(list(params.items()), mask=mask, backend="cpu")
    with pytest.raises(ValueError, match="state_bits=32"):
        MaskedAdamW(list(params.items()), mask=mask, state_bits=8)
    # a float64 model is trained by the torch backend when left to choose
    opt = MaskedAdamW(list(params.items()), mask=mask)
    assert {impl.name for impl in opt._impls} == {"torch"}

"""The compiled ops pass torch.library.opcheck (schema, fake tensors, dispatch) on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from mu_fast._ext import load_extension
from tests.optim._oracle import make_mask, make_params

pytestmark = pytest.mark.skipif(load_extension()[0] is None, reason="mu_fast._C not built (MU_FAST_BUILD_EXT=0)")


@pytest.mark.parametrize("state_bits", [32, 8])
def test_ops_pass_opcheck(state_bits, rng):
    from mu_fast.optim import MaskedAdamW
    from mu_fast.optim.backends import _index
    from mu_fast.optim.masked_adamw import COEF_FIELDS, CONTROL_FIELDS

    params = make_params(torch.bfloat16, rng)
    mask = make_mask(params, "random", 0.3, rng)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, state_bits=state_bits, backend="cpu",
                      master_weights=True, tile=256)
    b, ops = opt._buckets[0], torch.ops.mu_fast
    grads = [torch.randn(p.shape, generator=rng).to(p.dtype) for p in b.params]
    t, idx = b.table.tiles, _index(b.table)
    partial = torch.zeros(b.table.n_tiles, dtype=torch.float64)
    hyper = torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, 1.0]], dtype=torch.float64)
    n = len(b.params)
    group, step, present = torch.zeros(n, dtype=torch.int64), torch.zeros(n, dtype=torch.float64), torch.ones(n)
    coef, control = torch.zeros(n, COEF_FIELDS), torch.zeros(CONTROL_FIELDS)
    torch.library.opcheck(ops.masked_adamw_grad_sumsq, (grads, None, t, idx, partial))
    torch.library.opcheck(ops.masked_adamw_scalars, (hyper, group, step, present, partial, coef, control, True, True))
    if state_bits == 8:
        args = (b.params, grads, None, t, idx, b.exp_avg, b.exp_avg_sq, b.absmax_m, b.absmax_v, b.qmap_m, b.qmap_v,
                b.mids_m, b.mids_v, b.master, coef)
        torch.library.opcheck(ops.masked_adamw8bit_update, args)
    else:
        torch.library.opcheck(ops.masked_adamw_update, (b.params, grads, None, t, idx, b.exp_avg, b.exp_avg_sq, b.master, coef))
    info = b.table.slots[0]
    torch.library.opcheck(ops.masked_gather_grad, (grads[0], t, idx, info.tile_begin, info.tile_end, torch.zeros(b.table.state_numel), True))

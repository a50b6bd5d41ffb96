"""MaskedAdamW at the edges a user can reach: parameters changed under the optimizer (memory safety)."""

from __future__ import annotations

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.optim import MaskedAdamW, backend_availability

BACKENDS = [b for b in ("cpu", "triton", "torch") if backend_availability("cpu")[b] == "available"]


def _opt(backend, shape=(64, 32), compact_grads=False, **kw):
    w = torch.nn.Parameter(torch.randn(shape))
    mask = Mask().add("w", shape, "rows", list(range(shape[0] - 8, shape[0])))  # the last rows: past a smaller tensor
    opt = MaskedAdamW([("w", w)], mask=mask, lr=1e-2, backend=backend, compact_grads=compact_grads, **kw)
    return w, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["smaller", "other_shape", "dtype", "non_contiguous"])
def test_replaced_parameter_data_is_refused_before_any_write(backend, change):
    w, opt = _opt(backend)
    # A guard region around the replacement: the kernels would write into it if they trusted the old table.
    arena = torch.zeros(64 * 32 * 2)
    replacement = {
        "smaller": arena[: 16 * 32].view(16, 32),
        "other_shape": arena[: 64 * 32].view(32, 64),
        "dtype": torch.zeros(64, 32, dtype=torch.float64),
        "non_contiguous": arena[: 64 * 32].view(32, 64).t(),
    }[change]
    w.data = replacement
    w.grad = torch.ones_like(w)
    before = arena.clone()
    with pytest.raises(RuntimeError, match=r"'w' is now a.*built for a contiguous torch.float32 \(64, 32\).*new MaskedAdamW"):
        opt.step()
    assert torch.equal(arena, before), "the optimizer wrote into memory it does not own"


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_parameter_is_refused_by_the_compact_gradient_hook(backend):
    w, opt = _opt(backend, compact_grads=True)
    w.data = torch.zeros(16, 32)
    with pytest.raises(RuntimeError, match="'w' is now a"):
        (w * 2).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_shape_replacement_is_still_trained(backend):
    w, opt = _opt(backend)
    w.data = torch.zeros(64, 32)  # a new tensor of the same layout: the table still describes it
    w.grad = torch.ones_like(w)
    opt.step()
    assert bool((w.detach()[-8:] != 0).all()) and bool((w.detach()[:-8] == 0).all())

"""Low-precision parameters are stored rounded to nearest even, bit-exactly, on every backend.

The one-ulp tolerance of the oracle tests cannot tell round-to-nearest-even from truncation (the Triton CPU
interpreter truncates fp32 -> bf16, about half of all results). Here: with master weights the stored parameter
must be exactly ``master.to(dtype)``; without, the torch and triton backends (the same fp32 operations in the same
order, no fused multiply-add) must store exactly the fp32 result recomputed from the coefficients the step used,
rounded by torch's cast.
"""

from __future__ import annotations

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.optim import MaskedAdamW, backend_availability
from mu_fast.optim.masked_adamw import (
    C_BETA1,
    C_BETA2,
    C_DECAY,
    C_EPS,
    C_GRAD_SCALE,
    C_INV_SQRT_BC2,
    C_ONE_MINUS_BETA1,
    C_ONE_MINUS_BETA2,
    C_STEP_SIZE,
)
from tests.optim.test_masked_adamw_torch_parity import backend_devices, need

LOW = [torch.bfloat16, torch.float16]


def _params(dtype, device, rng):
    shapes = {"w": (24, 40), "b": (40,)}
    return {n: torch.nn.Parameter((torch.randn(s, generator=rng) * 3).to(dtype).to(device)) for n, s in shapes.items()}


def _mask(params):
    return Mask().add("w", params["w"].shape, "rows", [0, 1, 2, 5, 17, 23]).add("b", params["b"].shape)


@pytest.mark.parametrize("state_bits", [32, 8])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend,device", backend_devices())
def test_parameter_is_its_master_rounded_to_nearest_even(backend, device, dtype, state_bits, rng):
    need(backend, device)
    params = _params(dtype, device, rng)
    mask = _mask(params)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=3e-2, weight_decay=0.1, master_weights=True,
                      state_bits=state_bits, backend=backend, tile=256)
    bucket = opt._buckets[0]
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=rng).to(dtype).to(device)
        opt.step()
        for slot, p in enumerate(bucket.params):
            flat, state = bucket.table.indices(slot, device)
            stored = p.detach().reshape(-1)[flat].cpu()
            want = bucket.master[state].cpu().to(dtype)
            differ = int((stored.view(torch.int16) != want.view(torch.int16)).sum())
            assert differ == 0, f"{differ} of {flat.numel()} stored values are not the master rounded to nearest even"


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stored_parameter_is_the_fp32_result_rounded_to_nearest_even(backend, dtype, rng):
    """Recompute each step in fp32 with the step's own coefficients (same operation order as the kernels) and
    compare the stored bits with torch's round-to-nearest-even cast of that result."""
    if backend_availability("cpu")[backend] != "available":
        pytest.skip(f"{backend} on CPU tensors: {backend_availability('cpu')[backend]}")
    params = _params(dtype, "cpu", rng)
    mask = _mask(params)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=3e-2, weight_decay=0.1, backend=backend, tile=256)
    bucket = opt._buckets[0]
    for _ in range(2):
        grads = {n: torch.randn(p.shape, generator=rng).to(dtype) for n, p in params.items()}
        old = []
        for slot, p in enumerate(bucket.params):
            flat, state = bucket.table.indices(slot)
            old.append((p.detach().reshape(-1)[flat].float(), bucket.exp_avg[state].clone(),
                        bucket.exp_avg_sq[state].clone(), grads[bucket.table.slots[slot].name].reshape(-1)[flat].float()))
        for n, p in params.items():
            p.grad = grads[n]
        opt.step()
        for slot, (p_old, m, v, g) in enumerate(old):
            c = opt._coef_rows[0][slot]
            g = g * c[C_GRAD_SCALE]
            p32 = p_old * c[C_DECAY]
            m = c[C_BETA1] * m + c[C_ONE_MINUS_BETA1] * g
            v = c[C_BETA2] * v + c[C_ONE_MINUS_BETA2] * g * g
            p32 = p32 - c[C_STEP_SIZE] * (m / (v.sqrt() * c[C_INV_SQRT_BC2] + c[C_EPS]))
            flat, _ = bucket.table.indices(slot)
            stored = bucket.params[slot].detach().reshape(-1)[flat]
            want = p32.to(dtype)
            differ = int((stored.view(torch.int16) != want.view(torch.int16)).sum())
            assert differ == 0, f"{differ} of {flat.numel()} stored values differ from round-to-nearest-even"

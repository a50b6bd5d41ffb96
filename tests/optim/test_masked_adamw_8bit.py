"""8-bit block-quantized state: the quantizer against brute force, and each backend's 8-bit step against an fp64
step from the same dequantized state, re-quantized by the reference quantizer."""

from __future__ import annotations

import pytest
import torch

from mu_fast.optim import MaskedAdamW, backend_availability
from mu_fast.optim import quantize8
from mu_fast.optim._state import read_slot
from tests.optim._oracle import fresh_grads, make_mask, make_params

BACKENDS = [b for b in ("torch", "cpu", "triton") if backend_availability("cpu")[b] == "available"]


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dynamic_map_shape(signed):
    qmap = quantize8.dynamic_map(signed)
    assert qmap.shape == (256,) and bool((qmap[1:] > qmap[:-1]).all())  # sorted, distinct
    assert float(qmap.max()) == 1.0 and 0.0 in qmap.tolist()
    assert (float(qmap.min()) < -0.99) if signed else (float(qmap.min()) == 0.0)
    assert float(qmap[qmap > 0].min()) < 1e-6  # the dynamic exponent reaches 1e-7-scale magnitudes


@pytest.mark.parametrize("n_blocks", [1, 3])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_quantizer_picks_the_nearest_code(signed, n_blocks, rng):
    qmap = quantize8.dynamic_map(signed)
    x = torch.randn(256 * n_blocks, generator=rng) * torch.logspace(-6, 1, 256 * n_blocks)
    x = x if signed else x.abs()
    x[:256] = 0.0 if n_blocks > 1 else x[:256]  # an all-zero block when there are several
    codes, absmax = quantize8.quantize_blockwise(x, qmap)
    assert torch.equal(absmax, x.reshape(-1, 256).abs().amax(1))
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).repeat_interleave(256)
    brute = (qmap[None, :].double() - (x / safe).double()[:, None]).abs().argmin(1)
    dist_got = (qmap[codes.long()].double() - (x / safe).double()).abs()
    dist_best = (qmap[brute].double() - (x / safe).double()).abs()
    assert torch.allclose(dist_got, dist_best, rtol=0, atol=1e-7)  # nearest up to exact ties
    deq = quantize8.dequantize_blockwise(codes, absmax, qmap)
    half_gap = max(float((qmap[1:] - qmap[:-1]).max()) / 2, 1 + float(qmap[0]) if signed else 0.0)  # map ends at -0.99
    assert bool(((deq - x).abs() <= half_gap * safe * (1 + 1e-6)).all())


def _randomize_state(opt, rng):
    """Start from a non-trivial 8-bit state: random moments quantized into the buckets."""
    for b in opt._buckets:
        m = torch.randn(b.table.state_numel, generator=rng) * 1e-2
        v = torch.rand(b.table.state_numel, generator=rng) * 1e-3
        b.exp_avg.copy_(quantize8.quantize_blockwise(m, b.qmap_m)[0])
        b.absmax_m.copy_(quantize8.quantize_blockwise(m, b.qmap_m)[1])
        b.exp_avg_sq.copy_(quantize8.quantize_blockwise(v, b.qmap_v)[0])
        b.absmax_v.copy_(quantize8.quantize_blockwise(v, b.qmap_v)[1])


# bf16 8-bit Triton is left to the GPU tests (interpreter time).
EIGHT_BIT_CASES = [
    pytest.param(b, dt, s, id=f"{b}-{name}-{s}")
    for b in BACKENDS for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    for s in ("rows", "cols", "random") if not (b == "triton" and dt == torch.bfloat16)
]


@pytest.mark.parametrize("backend,dtype,structure", EIGHT_BIT_CASES)
def test_8bit_step_matches_reference_quantizer(backend, dtype, structure, rng):
    params = make_params(dtype, rng)
    mask = make_mask(params, structure, 0.5, rng)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=1e-2, weight_decay=0.1, state_bits=8,
                      backend=backend, tile=512)
    _randomize_state(opt, rng)
    opt._slot_step.fill_(4.0)
    bucket = opt._buckets[0]
    old = [read_slot(bucket, s) for s in range(len(bucket.params))]
    before = {n: p.detach().clone() for n, p in params.items()}
    grads = fresh_grads(params, mask, rng)
    for n in mask:
        params[n].grad = grads[n]
    opt.step()
    t, b1, b2, lr, wd, eps = 5, 0.9, 0.999, 1e-2, 0.1, 1e-8
    for slot, info in enumerate(bucket.table.slots):
        flat = old[slot]["flat"]
        g = grads[info.name].reshape(-1)[flat].double()
        m = b1 * old[slot]["exp_avg"].double() + (1 - b1) * g
        v = b2 * old[slot]["exp_avg_sq"].double() + (1 - b2) * g * g
        p0 = before[info.name].reshape(-1)[flat].double()
        p = p0 * (1 - lr * wd) - lr / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
        got = params[info.name].detach().reshape(-1)[flat].double()
        eps_dt = torch.finfo(dtype).eps
        assert bool(((got - p).abs() <= eps_dt * p.abs() + 16 * torch.finfo(torch.float32).eps * lr).all()), info.name
        inactive = torch.ones(info.numel, dtype=torch.bool)
        inactive[flat] = False
        assert torch.equal(params[info.name].detach().reshape(-1)[inactive], before[info.name].reshape(-1)[inactive])
        # New codes: the reference quantizer applied to the fp64 moments, up to one code where fp32 rounding of
        # x / absmax crosses a midpoint.
        lo, hi = info.state_begin, info.state_end
        _, state = bucket.table.indices(slot)
        for key, codes, qmap, values in (("m", bucket.exp_avg, bucket.qmap_m, m), ("v", bucket.exp_avg_sq, bucket.qmap_v, v)):
            dense = torch.zeros(hi - lo, dtype=torch.float32)
            dense[state - lo] = values.float()
            ref_codes, _ = quantize8.quantize_blockwise(dense, qmap)
            diff = (codes[lo:hi].long() - ref_codes.long()).abs()[state - lo]
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02, (info.name, key)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_8bit_padding_and_absmax_of_untouched_blocks(backend, rng):
    """Padding state elements stay at the code of zero; each block's absmax is its largest |moment| (which
    dequantizes to ±absmax, or to -0.993·absmax where the signed map's lowest entry stands in for -1)."""
    params = make_params(torch.float32, rng)
    mask = make_mask(params, "random", 0.05, rng)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, state_bits=8, backend=backend, tile=512)
    for n in mask:
        params[n].grad = torch.randn(params[n].shape, generator=rng)
    opt.step()
    b = opt._buckets[0]
    used = torch.zeros(b.table.state_numel, dtype=torch.bool)
    for slot in range(len(b.params)):
        used[b.table.indices(slot)[1]] = True
    assert bool((b.exp_avg[~used] == quantize8.code_of_zero(b.qmap_m)).all())
    m = quantize8.dequantize_blockwise(b.exp_avg, b.absmax_m, b.qmap_m)
    largest = m.reshape(-1, 256).abs().amax(1)
    assert bool((largest <= b.absmax_m).all()) and bool((largest >= -float(b.qmap_m[0]) * b.absmax_m).all())
    assert bool((b.absmax_m > 0).all())


def _edge_values(mids: torch.Tensor, signed: bool) -> torch.Tensor:
    """Every midpoint of a map and its float neighbours, zeros, denormals, 1.0 first in each block (absmax 1)."""
    m = mids[:-1]  # without the +inf sentinel
    inf = torch.tensor(float("inf"))
    vals = torch.cat([m, torch.nextafter(m, inf), torch.nextafter(m, -inf), torch.tensor([0.0, -0.0, 1e-45, 1e-39, 1e-30])])
    vals = vals[(vals.abs() <= 1) & ((vals >= 0) | signed)]
    n_blocks = -(-vals.numel() // 255)
    body = torch.zeros(n_blocks * 255)
    body[: vals.numel()] = vals
    blocks = torch.cat([torch.ones(n_blocks, 1), body.reshape(n_blocks, 255)], dim=1)  # 1.0 first: absmax 1, so
    return blocks.reshape(-1)  # the normalized value is the value itself, exactly


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_codes_are_exact_at_midpoints_and_their_neighbours(backend):
    """One step with beta1 = beta2 = 0 stores m = g and v = g·g exactly, so each backend's codes must equal the
    reference quantizer's (searchsorted over the midpoints) bit for bit, on the values where a table-driven or
    approximate search would slip: every midpoint, the floats either side of it, ±0 and denormals."""
    assert_8bit_codes_exact(backend, "cpu")


def assert_8bit_codes_exact(backend: str, device: str) -> None:
    """The check of the test above on ``device`` (the GPU tests call it for the CUDA and Triton kernels)."""
    qm, qv = quantize8.dynamic_map(True), quantize8.dynamic_map(False)
    g_m = _edge_values(quantize8.midpoints(qm), signed=True)
    g_v = _edge_values(quantize8.midpoints(qv).sqrt(), signed=False)  # v = g·g: aim g at the roots of v's midpoints
    g = torch.cat([g_m, g_v])
    param = torch.nn.Parameter(torch.zeros(g.numel(), device=device))
    opt = MaskedAdamW([("p", param)], mask={"p": "whole"}, lr=1e-3, betas=(0.0, 0.0), state_bits=8, backend=backend,
                      tile=512)
    param.grad = g.to(device)
    opt.step()
    b = opt._buckets[0]
    n = g.numel()
    want_m, _ = quantize8.quantize_blockwise(g, qm)
    want_v, _ = quantize8.quantize_blockwise(g * g, qv)
    assert torch.equal(b.exp_avg[:n].cpu(), want_m)
    assert torch.equal(b.exp_avg_sq[:n].cpu(), want_v)

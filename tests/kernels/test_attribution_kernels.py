"""Triton attribution kernels (reduce, patch apply) against their plain-PyTorch references.

On CPU they run under TRITON_INTERPRET=1 (set by tests/conftest.py) on tiny fp32/fp64 inputs.
"""

from __future__ import annotations

import pytest
import torch

from mu_fast.localize.attribution_reduce import attribution_reduce, attribution_reduce_reference
from mu_fast.localize.patch_apply import patch_apply, patch_apply_reference

pytest.importorskip("triton")
from mu_fast.kernels.attribution_reduce import attribution_reduce_triton  # noqa: E402
from mu_fast.kernels.patch_apply import patch_apply_triton  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, T, G, S): heads (power-of-two S), neurons (S = 1), odd head size, layer outputs with S larger than a block
# and not a power of two (the two-group path), a single row.
SHAPES = [(2, 5, 4, 8), (3, 7, 5, 12), (1, 9, 97, 1), (2, 3, 2, 1100), (2, 4, 1, 32), (1, 1, 3, 4)]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}xT{}xG{}xS{}".format(*s))
@pytest.mark.parametrize("t_splits", [None, 1, 3], ids=lambda t: f"splits={t}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("with_valid", [True, False], ids=["masked", "unmasked"])
def test_reduce_matches_fp64_reference(shape, t_splits, dtype, with_valid, rng):
    B, T, G, S = shape
    grad = torch.randn(B, T, G * S, generator=rng, dtype=torch.float64).to(dtype).to(DEVICE)
    delta = torch.randn(B, T, G * S, generator=rng, dtype=torch.float64).to(dtype).to(DEVICE)
    valid = (torch.rand(B, T, generator=rng) > 0.3).to(DEVICE) if with_valid else None
    if valid is not None:
        grad[~valid] = float("nan")  # padded positions must not leak, even as NaN
    start = torch.randn(B, G, generator=rng, dtype=torch.float64)
    out = start.to(dtype if dtype == torch.float64 else torch.float32).to(DEVICE).clone()
    attribution_reduce_triton(grad, delta, out, S, valid, t_splits=t_splits)
    ref = attribution_reduce_reference(grad.double().cpu(), delta.double().cpu(), start.clone(), S, None if valid is None else valid.cpu())
    # Sums of T·S products: error bound grows with the number of terms (fp32 accumulation).
    tol = 4 * _eps(out.dtype) * (T * S) * (grad.double().abs().nan_to_num() * delta.double().abs()).amax().item() + 1e-12
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=tol)


def test_reduce_bf16_inputs_upcast(rng):
    B, T, G, S = 2, 6, 3, 16
    grad = torch.randn(B, T, G * S, generator=rng).to(torch.bfloat16).to(DEVICE)
    delta = torch.randn(B, T, G * S, generator=rng).to(torch.bfloat16).to(DEVICE)
    out = torch.zeros(B, G, device=DEVICE)
    attribution_reduce_triton(grad, delta, out, S)
    ref = attribution_reduce_reference(grad.double().cpu(), delta.double().cpu(), torch.zeros(B, G, dtype=torch.float64), S)
    # bf16 inputs are exact in fp32; only the fp32 accumulation rounds.
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=8 * _eps(torch.float32) * T * S * 16)


def test_reduce_dispatcher_triton_equals_torch(rng):
    grad = torch.randn(2, 5, 12, generator=rng, device="cpu").to(DEVICE)
    delta = torch.randn(2, 5, 12, generator=rng, device="cpu").to(DEVICE)
    a = attribution_reduce(grad, delta, torch.zeros(2, 3, device=DEVICE), 4, backend="triton")
    b = attribution_reduce(grad, delta, torch.zeros(2, 3, device=DEVICE), 4, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_reduce_rejects_bad_shapes():
    g = torch.zeros(2, 3, 8)
    with pytest.raises(ValueError, match="group_size"):
        attribution_reduce_triton(g, g, torch.zeros(2, 3), 3)
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        attribution_reduce_triton(g, g, torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="same dtype|share dtype"):
        attribution_reduce_triton(g, g.double(), torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="contiguous"):
        attribution_reduce_triton(g.transpose(0, 1), g.transpose(0, 1), torch.zeros(3, 2), 4)


@pytest.mark.parametrize("S,G", [(8, 4), (1, 33), (12, 3), (40, 1)], ids=lambda v: str(v))
@pytest.mark.parametrize("with_mask", [True, False], ids=["pos_mask", "all_pos"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_patch_apply_matches_reference_bit_exact(S, G, with_mask, dtype, rng):
    B, K, T = 3, 4, 6
    x = torch.randn(K * B, T, G * S, generator=rng).to(dtype).to(DEVICE)
    other = torch.randn(B, T, G * S, generator=rng).to(dtype).to(DEVICE)
    slots = torch.randint(0, K, (5,), generator=rng)
    groups = torch.randint(0, G, (5,), generator=rng)
    dst = (slots[:, None] * B + torch.arange(B)[None]).flatten().to(DEVICE)
    src = torch.arange(B).repeat(5).to(DEVICE)
    grp = groups.repeat_interleave(B).to(DEVICE)
    pos = (torch.rand(B, T, generator=rng) > 0.4).to(DEVICE) if with_mask else None
    a, b = x.clone(), x.clone()
    patch_apply_triton(a, other, dst, src, grp, S, pos)
    patch_apply_reference(b, other, dst, src, grp, S, pos)
    assert torch.equal(a, b)
    # Elements outside the patched (row, group, position) set are untouched, bit for bit.
    touched = torch.zeros(K * B, T, G, dtype=torch.bool, device=DEVICE)
    for d, s_, g in zip(dst.tolist(), src.tolist(), grp.tolist(), strict=True):
        touched[d, :, g] |= pos[s_] if pos is not None else True
    keep = ~touched.repeat_interleave(S, dim=2)
    assert torch.equal(a[keep], x[keep])


def test_patch_apply_values_come_from_source_rows(rng):
    B, T, G, S = 2, 3, 2, 4
    x = torch.zeros(2 * B, T, G * S, device=DEVICE)
    other = torch.randn(B, T, G * S, generator=rng).to(DEVICE)
    dst = torch.tensor([2, 3], device=DEVICE)
    src = torch.tensor([1, 0], device=DEVICE)
    grp = torch.tensor([1, 0], device=DEVICE)
    patch_apply(x, other, dst, src, grp, S, backend="triton")
    assert torch.equal(x[2, :, 4:8], other[1, :, 4:8]) and torch.equal(x[3, :, 0:4], other[0, :, 0:4])
    assert torch.count_nonzero(x[:2]) == 0 and torch.count_nonzero(x[2, :, :4]) == 0 and torch.count_nonzero(x[3, :, 4:]) == 0


def test_patch_apply_rejects_bad_inputs():
    x, o = torch.zeros(4, 3, 8), torch.zeros(2, 3, 8)
    idx = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="group_size"):
        patch_apply_triton(x, o, idx, idx, idx, 3)
    with pytest.raises(ValueError, match="equal lengths"):
        patch_apply_triton(x, o, idx, idx[:1], idx, 4)
    with pytest.raises(ValueError, match="share T and F"):
        patch_apply_triton(x, torch.zeros(2, 4, 8), idx, idx, idx, 4)


@requires_cuda
@pytest.mark.parametrize("shape", [(8, 512, 16, 256), (1, 512, 14336, 1), (32, 24, 1, 3584), (4, 33, 32, 128)], ids=str)
def test_reduce_gpu_bf16_real_shapes(shape):
    B, T, G, S = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    grad = torch.randn(B, T, G * S, generator=gen, device="cuda").bfloat16()
    delta = torch.randn(B, T, G * S, generator=gen, device="cuda").bfloat16()
    valid = torch.rand(B, T, generator=gen, device="cuda") > 0.1
    out = torch.zeros(B, G, device="cuda")
    attribution_reduce_triton(grad, delta, out, S, valid)
    ref = attribution_reduce_reference(grad.double(), delta.double(), torch.zeros(B, G, dtype=torch.float64, device="cuda"), S, valid)
    torch_err = (attribution_reduce_reference(grad, delta, torch.zeros(B, G, device="cuda"), S, valid).double() - ref).abs().max()
    assert (out.double() - ref).abs().max() <= 2 * torch_err + 1e-3

"""segmented_delta_add: the Triton kernel (interpreter on CPU) against an fp64 reference, forward and backward.

Reference: ``segmented_delta_add_reference`` (the per-group torch loop) run on fp64 copies of the inputs, its
gradients by autograd. Tolerances from the dtype: fp64 1e-12, fp32 1e-5 · sqrt(reduction length) (relative to the
magnitude of the operands, which are O(1)). Outputs are poisoned: ``y`` holds NaN in the groups' rows where the
kernel must write, and every element no group touches must come back bit-exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from mu_fast.edit.grouped_delta import resolve_backend, segmented_delta_add, segmented_delta_add_reference
from tests.conftest import requires_cuda

DTYPES = [torch.float32, torch.float64]
KINDS = ["rows", "cols"]
# (rows per group along dim 0 (None: no block for that group), positions per row, d_in, d_out, selection sizes)
SHAPES = {
    "odd": ([3, None, 5, 2], 3, 37, 45, [5, 0, 33, 1]),
    "empty_group": ([2, 0, 4], 2, 16, 24, [3, 4, 7]),
    "single_row": ([1], 1, 19, 21, [1]),
    "wide": ([2, 3], 2, 70, 66, [40, 17]),
    "tiny": ([2, None, 1], 1, 4, 5, [2, 0, 1]),  # gradcheck: every element perturbed, so few of them
}


def _tol(dtype: torch.dtype, length: int) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-5 * math.sqrt(length)


def _case(shape: str, kind: str, dtype: torch.dtype, rng: torch.Generator):
    """Fresh random x, y, groups, indices and deltas; a None row count is a group without a block."""
    counts, T, d_in, d_out, sel = SHAPES[shape]
    groups, at = [], 0
    for c in counts:
        n = 2 if c is None else c
        groups.append((at, at + n))
        at += n
    limit = d_out if kind == "rows" else d_in
    indices = [None if c is None else torch.randperm(limit, generator=rng)[:s] for c, s in zip(counts, sel, strict=True)]
    deltas = [None if i is None else torch.randn((len(i), d_in) if kind == "rows" else (d_out, len(i)), generator=rng,
                                                 dtype=dtype) for i in indices]
    x = torch.randn(at, T, d_in, generator=rng, dtype=dtype)
    y = torch.randn(at, T, d_out, generator=rng, dtype=dtype)
    return x, y, groups, indices, deltas


def _written(y: torch.Tensor, groups, kind: str, indices) -> torch.Tensor:
    """Where some group's delta lands: its selected output columns (rows) or all its output columns (cols)."""
    where = torch.zeros(y.shape, dtype=torch.bool)
    for (lo, hi), index in zip(groups, indices, strict=True):
        if index is not None and len(index):
            if kind == "rows":
                where[lo:hi, ..., index] = True
            else:
                where[lo:hi] = True
    return where


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_and_gradients_match_fp64_reference(shape, kind, dtype, rng):
    x, y, groups, indices, deltas = _case(shape, kind, dtype, rng)
    # forward with y poisoned where the kernel must write: NaN there, the untouched elements bit-exact
    where = _written(y, groups, kind, indices)
    poisoned = y.masked_fill(where, float("nan"))
    out = segmented_delta_add(poisoned, x, groups, kind, indices, deltas, backend="triton")
    assert torch.equal(out[~where], y[~where])
    assert out[where].isnan().all()

    x_t = x.clone().requires_grad_()
    d_t = [None if d is None else d.clone().requires_grad_() for d in deltas]
    out = segmented_delta_add(y, x_t, groups, kind, indices, d_t, backend="triton")
    x_r = x.double().requires_grad_()
    d_r = [None if d is None else d.double().requires_grad_() for d in deltas]
    ref = segmented_delta_add_reference(y.double(), x_r, groups, kind, indices, d_r)
    length = max(x.shape[-1], max(len(i) for i in indices if i is not None))
    tol = _tol(dtype, length)
    assert out.dtype == dtype and out.shape == y.shape
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol)

    grad = torch.randn(y.shape, generator=rng, dtype=dtype)
    live_t = [x_t] + [d for d in d_t if d is not None]
    live_r = [x_r] + [d for d in d_r if d is not None]
    got = torch.autograd.grad(out, live_t, grad, allow_unused=True)
    want = torch.autograd.grad(ref, live_r, grad.double(), allow_unused=True)
    rows = max(hi - lo for lo, hi in groups) * x.shape[1]
    for name, g, w, t in zip(["x"] + [f"D{k}" for k in range(len(live_t) - 1)], got, want, live_t, strict=True):
        g = torch.zeros_like(t) if g is None else g  # a group without rows: its delta gets no gradient
        w = torch.zeros_like(t, dtype=torch.float64) if w is None else w
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), w, rtol=0, atol=_tol(dtype, max(rows, length)), msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_fp64(kind, rng):
    x, y, groups, indices, deltas = _case("tiny", kind, torch.float64, rng)
    x.requires_grad_()
    live = [d.requires_grad_() for d in deltas if d is not None]

    def f(x, *ds):
        it = iter(ds)
        return segmented_delta_add(y, x, groups, kind, indices, [None if d is None else next(it) for d in deltas],
                                   backend="triton")

    assert torch.autograd.gradcheck(f, (x, *live), eps=1e-6, atol=1e-8)


def test_torch_backend_is_the_reference_and_skips_groups_without_blocks(rng):
    x, y, groups, indices, deltas = _case("odd", "rows", torch.float64, rng)
    out = segmented_delta_add(y, x, groups, "rows", indices, deltas, backend="torch")
    assert torch.equal(out, segmented_delta_add_reference(y, x, groups, "rows", indices, deltas))
    lo, hi = groups[1]  # the group without a block passes y through
    assert torch.equal(out[lo:hi], y[lo:hi])
    none = segmented_delta_add(y, x, groups, "rows", [None] * 4, [None] * 4, backend="triton")
    assert torch.equal(none, y)


def test_backend_selection():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu) == "torch"
    assert resolve_backend("torch", cpu) == "torch"
    assert resolve_backend("triton", cpu) == "triton"  # the interpreter (conftest sets TRITON_INTERPRET=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", cpu)


def test_clear_errors(rng):
    x, y, groups, indices, deltas = _case("odd", "rows", torch.float64, rng)

    def call(**kw):
        args = dict(y=y, x=x, groups=groups, kind="rows", indices=indices, deltas=deltas) | kw
        return segmented_delta_add(**args, backend="torch")

    cases = [
        (dict(kind="heads"), "kind must be one of"),
        (dict(y=y[..., :-1].float()), "must share a floating dtype"),
        (dict(x=x[:-1]), "must share leading dims"),
        (dict(groups=groups[:-1]), "one entry per group"),
        (dict(groups=[(0, 3), (2, 5), (5, 10), (10, 12)]), "without overlap"),
        (dict(deltas=[deltas[0][:, :-1]] + deltas[1:]), r"group 0: a rows delta must be \(5, 37\)"),
        (dict(deltas=[deltas[0].float()] + deltas[1:]), "group 0: delta dtype torch.float32 differs"),
        (dict(indices=[indices[0].int()] + indices[1:]), "1-D int64"),
        (dict(indices=[torch.tensor([0, 1, 2, 3, 45])] + indices[1:]), r"indices must lie in \[0, 45\)"),
        (dict(indices=[torch.tensor([0, 1, 2, 3, 3])] + indices[1:]), "must be distinct"),
        (dict(deltas=[None] + deltas[1:]), "both be given or both be None"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**kw)


def test_batched_deltas_forward_triton_equals_torch(rng):
    """BatchedDeltas routes rows / cols blocks through segmented_delta_add: both backends give the same logits
    and the same delta gradients (tiny fp64 Llama, one group per configuration, mixed masks)."""
    from mu_fast.edit.batched import BatchedDeltas
    from mu_fast.masks import Mask
    from mu_fast.models.sites import Component, SiteTable
    from mu_fast.models.tiny import make_tiny_model

    model = make_tiny_model("llama", seed=3, vocab_size=40, num_hidden_layers=2, dtype=torch.float64)
    t = SiteTable(model)
    masks = [Mask.from_components(t, [Component("mlp", 1, 3), Component("attn", 0, 1)]),
             Mask.from_components(t, [Component("attn.o", 1)]),
             Mask().add(t.param_name(1, "down"), t.matrix_shape("down"), "cols", [0, 5, 9])]
    deltas = BatchedDeltas(model, masks)
    ids = torch.randint(0, 40, (5, 4), generator=rng)
    segments = [(0, 0, 2), (1, 2, 3), (2, 3, 5)]
    results = []
    for backend in ("torch", "triton"):
        delta = (0.1 * torch.randn(deltas.numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                 ).requires_grad_()
        deltas.delta_backend = backend
        deltas.attach()
        try:
            with deltas.groups(segments, delta):
                logits = model(ids).logits
        finally:
            deltas.detach()
        (grad,) = torch.autograd.grad(logits.square().sum(), delta)
        results.append((logits.detach(), grad))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=1e-10)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_auto_is_triton_and_matches_reference(kind, dtype, rng):
    x, y, groups, indices, deltas = _case("wide", kind, torch.float32, rng)
    dev = torch.device("cuda")
    assert resolve_backend("auto", dev) == "triton"
    args = [t.to(dev, dtype) for t in (y, x)]
    out = segmented_delta_add(*args, groups, kind, [i.to(dev) for i in indices],
                              [d.to(dev, dtype) for d in deltas])
    ref = segmented_delta_add_reference(y.double(), x.double(), groups, kind, indices, [d.double() for d in deltas])
    atol = 1e-4 if dtype == torch.float32 else 0.25  # bf16: inputs rounded to 8 bits, O(sqrt(70)) sums
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=atol)

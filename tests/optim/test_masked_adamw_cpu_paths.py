"""The C++ CPU backend's scattered-tile paths: gradients gathered once per step (statistics pass, then the update
reads them), and the software prefetch the compiled extension must actually contain (benchmarks/notes_optim_cpu.md)."""

from __future__ import annotations

import platform
import shutil
import subprocess

import pytest
import torch

from mu_fast.optim import MaskedAdamW, backend_availability
from mu_fast.optim.backends import ExtBackend
from tests.optim._oracle import fresh_grads, make_mask, make_params

pytestmark = pytest.mark.skipif(backend_availability("cpu")["cpu"] != "available",
                                reason=f"cpu backend: {backend_availability('cpu')['cpu']}")


def _run(structure, rng_seed, gathers_once, monkeypatch, steps=4, **kw):
    monkeypatch.setattr(ExtBackend, "_gathers_once", ExtBackend._gathers_once if gathers_once else (lambda self, b: False))
    rng = torch.Generator().manual_seed(rng_seed)
    params = make_params(kw.pop("dtype", torch.float32), rng)
    mask = make_mask(params, structure, 0.3, rng)
    opt = MaskedAdamW([(n, params[n]) for n in mask], mask=mask, lr=1e-2, weight_decay=0.1, backend="cpu", tile=256, **kw)
    names = list(mask)
    for step in range(steps):
        grads = fresh_grads(params, mask, rng)
        for i, n in enumerate(names):
            params[n].grad = None if (step + i) % 3 == 0 else grads[n].clone()  # some parameters without a gradient
        if step == 2:
            name = next(n for n in names if params[n].grad is not None)
            params[name].grad[mask.dense(name)] = float("nan")  # a skipped step (nonfinite="skip")
        opt.step()
    return params, opt


@pytest.mark.parametrize("structure", ["cols", "random"])  # scattered tiles (heads are runs of columns)
@pytest.mark.parametrize("missing_grad", ["skip", "zero"])
@pytest.mark.parametrize("state_bits,dtype", [(32, torch.float32), (8, torch.float32), (32, torch.bfloat16)])
def test_gradients_gathered_once_give_the_two_pass_result_bit_for_bit(structure, missing_grad, state_bits, dtype, monkeypatch):
    kw = dict(missing_grad=missing_grad, state_bits=state_bits, dtype=dtype, master_weights=dtype != torch.float32)
    once, opt = _run(structure, 7, True, monkeypatch, **kw)
    assert any(b.gathered_grad is not None for b in opt._buckets)  # the one-gather path ran
    twice, _ = _run(structure, 7, False, monkeypatch, **kw)
    for n in once:
        assert torch.equal(once[n], twice[n]), n


def test_gathered_gradients_are_not_reused_by_a_later_step(monkeypatch):
    """A statistics pass gathers this step's gradients for the update; a later step that runs no statistics pass
    (nonfinite="ignore", no clipping) must read its own gradients, not those left from a clip_grad_norm_ call."""
    rng = torch.Generator().manual_seed(3)
    params = make_params(torch.float32, rng)
    mask = make_mask(params, "cols", 0.3, rng)
    twins = {n: torch.nn.Parameter(params[n].detach().clone()) for n in mask}
    opts = [MaskedAdamW([(n, ps[n]) for n in mask], mask=mask, lr=1e-2, backend=b, nonfinite="ignore", tile=256)
            for ps, b in ((params, "cpu"), (twins, "torch"))]
    first, second = fresh_grads(params, mask, rng), fresh_grads(params, mask, rng)
    for ps, opt in zip((params, twins), opts):
        for n in mask:
            ps[n].grad = first[n].clone()
        opt.clip_grad_norm_(1e9)  # gathers `first` (cpu)
        opt.zero_grad()
        for n in mask:
            ps[n].grad = second[n].clone()
        opt.step()
    for n in mask:
        torch.testing.assert_close(params[n], twins[n], rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("objdump") is None,
                    reason="checks x86 prefetch instructions with objdump")
def test_the_extension_contains_its_software_prefetch():
    """The scattered-tile loops prefetch the next batch's cache lines. GCC deleted them (an out-of-line helper whose
    only effect was __builtin_prefetch counted as side-effect free), and nothing noticed for weeks."""
    import mu_fast._C as ext

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", ext.__file__], capture_output=True, text=True,
                             check=True).stdout
    assert sum(line.split()[1].startswith("prefetch") for line in listing.splitlines() if len(line.split()) > 1 and
               line.split()[0].endswith(":")) > 0, f"no prefetch instruction in {ext.__file__}: rebuild the extension"

"""Shared pieces of the optimizer tests: parameter sets with odd shapes, masks of each structure and density, and
an fp64 dense oracle of AdamW restricted to the active elements (independent of the segment machinery)."""

from __future__ import annotations

import math

import torch

from mu_fast.masks import Mask
from mu_fast.optim import masked_adamw_reference

# Odd shapes: a 2-D matrix of prime sizes, a q-like matrix (heads = blocks of 8 rows), an o-like matrix (heads =
# blocks of 8 columns), a bias, and a 3-D tensor (a column spans the trailing dimension).
SHAPES = {"w_odd": (37, 29), "w_q": (48, 24), "w_o": (24, 40), "bias": (29,), "w_3d": (6, 10, 3)}
HEAD = 8
STRUCTURES = ("whole", "rows", "cols", "heads", "random")
DENSITIES = (0.001, 0.05, 0.5, 1.0)
EPS = {dt: torch.finfo(dt).eps for dt in (torch.float32, torch.bfloat16, torch.float16)}  # one ulp at 1.0


def make_params(dtype: torch.dtype, rng: torch.Generator, shapes: dict = SHAPES) -> dict[str, torch.nn.Parameter]:
    return {n: torch.nn.Parameter(torch.randn(s, generator=rng).to(dtype)) for n, s in shapes.items()}


def _pick(n: int, density: float, rng: torch.Generator) -> list[int]:
    k = min(n, max(1, round(density * n)))
    return sorted(torch.randperm(n, generator=rng)[:k].tolist())


def make_mask(params: dict[str, torch.Tensor], structure: str, density: float, rng: torch.Generator) -> Mask:
    """A mask of one structure: ``density`` of the units (tensors, rows, columns, heads, elements), ≥ 1 unit each."""
    mask = Mask()
    names = list(params)
    if structure == "whole":
        for i in _pick(len(names), density, rng):
            mask.add(names[i], params[names[i]].shape)
        return mask
    for name, p in params.items():
        shape = tuple(p.shape)
        if structure == "random" or p.dim() == 1:
            dense = torch.rand(shape, generator=rng) < density
            if not dense.any():
                dense.view(-1)[int(torch.randint(0, dense.numel(), (1,), generator=rng))] = True
            mask.add(name, shape, "elements", dense)
        elif structure == "rows":
            mask.add(name, shape, "rows", _pick(shape[0], density, rng))
        elif structure == "cols":
            mask.add(name, shape, "cols", _pick(shape[1], density, rng))
        elif structure == "heads":
            dim = 0 if shape[0] % HEAD == 0 else (1 if shape[1] % HEAD == 0 else 0)
            unit = HEAD if shape[dim] % HEAD == 0 else 1
            heads = _pick(shape[dim] // unit, density, rng)
            mask.add(name, shape, "rows" if dim == 0 else "cols", [h * unit + i for h in heads for i in range(unit)])
        else:
            raise ValueError(structure)
    return mask


class DenseOracle:
    """fp64 AdamW on dense copies, updating only the masked elements (bf16/fp16 storage rounding emulated)."""

    def __init__(self, params: dict[str, torch.Tensor], mask: Mask, master: bool = False):
        self.dtype = next(iter(params.values())).dtype
        self.master = master and self.dtype != torch.float32
        self.active = {n: mask.dense(n) for n in mask}
        self.p = {n: params[n].detach().double().clone() for n in mask}
        self.m = {n: torch.zeros_like(self.p[n]) for n in mask}
        self.v = {n: torch.zeros_like(self.p[n]) for n in mask}
        self.t = 0

    def step(self, grads: dict[str, torch.Tensor | None], lr: float, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
             grad_scale: float = 1.0) -> None:
        self.t += 1
        for n, act in self.active.items():
            g = grads.get(n)
            g = torch.zeros_like(self.p[n]) if g is None else g.double()
            p, m, v = masked_adamw_reference(
                self.p[n][act], g[act], self.m[n][act], self.v[n][act], lr=lr, beta1=betas[0], beta2=betas[1],
                eps=eps, weight_decay=weight_decay, step=self.t, grad_scale=grad_scale,
            )
            if self.dtype != torch.float32 and not self.master:
                p = p.to(self.dtype).double()  # the parameter is stored in low precision every step
            self.p[n][act], self.m[n][act], self.v[n][act] = p, m, v

    def param(self, n: str) -> torch.Tensor:
        """The parameter as stored: rounded to the storage dtype."""
        return self.p[n].to(self.dtype)


def assert_matches_oracle(params: dict[str, torch.Tensor], before: dict[str, torch.Tensor], oracle: DenseOracle,
                          mask: Mask, steps: int, lr: float) -> None:
    """Active elements within a dtype-derived tolerance of the oracle; inactive elements bit-identical."""
    eps = EPS[oracle.dtype]
    for n, p in params.items():
        p = p.detach()
        if n not in mask:
            assert torch.equal(p, before[n]), f"{n}: parameter outside the mask changed"
            continue
        act = oracle.active[n]
        assert torch.equal(p[~act], before[n][~act]), f"{n}: an inactive element changed"
        ref = oracle.p[n][act]
        got = p[act].double()
        if oracle.dtype == torch.float32:
            # fp32 arithmetic: a few ulp of |p| per step, plus a few ulp of the update (~lr).
            tol = steps * 8 * eps * (ref.abs() + lr)
        else:
            # Low-precision storage: fp32 math may round to the neighbouring representable value (1 ulp) per
            # step where the fp64 value sits near a rounding boundary.
            tol = steps * eps * ref.abs().clamp(min=2.0**-14) + steps * 8 * torch.finfo(torch.float32).eps * lr
        err = (got - ref).abs()
        worst = int(torch.argmax(err - tol))
        assert bool((err <= tol).all()), (
            f"{n}: {int((err > tol).sum())} of {err.numel()} active elements off; worst got {got[worst]:.9g} "
            f"ref {ref[worst]:.9g} tol {tol[worst]:.3g}"
        )


def fresh_grads(params: dict[str, torch.Tensor], mask: Mask, rng: torch.Generator, poison: bool = True) -> dict[str, torch.Tensor]:
    """Random gradients; inactive entries hold NaN/inf (when ``poison``) to prove they are never read."""
    grads = {}
    for n, p in params.items():
        g = torch.randn(p.shape, generator=rng)
        if poison and n in mask:
            act = mask.dense(n)
            g[~act] = torch.tensor([float("nan"), float("inf")]).repeat(math.ceil((~act).sum().item() / 2))[: int((~act).sum())]
        grads[n] = g.to(p.dtype)
    return grads

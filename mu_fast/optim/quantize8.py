"""Block-wise 8-bit quantization of optimizer state (the bitsandbytes scheme), reference implementation.

A flat fp32 state buffer is cut into blocks of ``QBLOCK`` = 256 elements; each block stores one fp32
``absmax`` and one uint8 code per element. A code indexes a 256-entry *dynamic map* (Dettmers et al. 2021,
arXiv 2110.02861): the signed map for the first moment m, the unsigned map for the second moment v. The value
is ``qmap[code] * absmax``; quantization picks the nearest map entry to ``x / absmax``, found as the number of
map midpoints strictly below it (ties go to the lower code). The kernels do the same search over the same
``midpoints`` table, so kernel and reference pick the same code except where fp32 rounding of ``x / absmax``
lands exactly on a midpoint.
"""

from __future__ import annotations

from functools import lru_cache

import torch

QBLOCK = 256


@lru_cache(maxsize=4)
def _dynamic_map_cpu(signed: bool) -> torch.Tensor:
    # bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8): for exponent i the
    # fraction grid linspace(0.1, 1, n_i + 1) contributes its interval means scaled by 10^(i - 6).
    values: list[float] = []
    for i in range(7):
        n_items = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1.0, n_items + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0) * (10.0 ** (i - 6))
        values += means.tolist()
        if signed:
            values += (-means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256-entry dynamic quantization map, sorted ascending, float32 ``[256]`` in [-1, 1] (signed) or [0, 1]."""
    return _dynamic_map_cpu(bool(signed)).to(device)


def midpoints(qmap: torch.Tensor) -> torch.Tensor:
    """Search table for ``qmap``: float32 ``[256]``, the 255 midpoints of neighbouring entries then +inf."""
    mids = (qmap[:-1] + qmap[1:]) * 0.5
    return torch.cat([mids, mids.new_full((1,), float("inf"))]).contiguous()


def code_of_zero(qmap: torch.Tensor) -> int:
    """The code that dequantizes to exactly 0 (the initial state)."""
    return int(torch.nonzero(qmap == 0).flatten()[0])


def quantize_blockwise(x: torch.Tensor, qmap: torch.Tensor, block: int = QBLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a flat float tensor ``[n]`` (n a multiple of ``block``) to (uint8 codes ``[n]``, fp32 absmax ``[n/block]``).

    A block whose absmax is 0 is stored with absmax 0 and the codes of 0.
    """
    if x.dim() != 1 or x.numel() % block:
        raise ValueError(f"quantize_blockwise needs a flat tensor whose length is a multiple of {block}; got {tuple(x.shape)}")
    blocks = x.float().reshape(-1, block)
    absmax = blocks.abs().amax(dim=1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (blocks / safe[:, None]).reshape(-1)
    mids = midpoints(qmap.to(x.device, torch.float32))
    codes = torch.searchsorted(mids, normed.contiguous(), right=False)
    return codes.to(torch.uint8), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block: int = QBLOCK) -> torch.Tensor:
    """Inverse of ``quantize_blockwise``: fp32 ``[n]`` = ``qmap[codes] * absmax[block of each element]``."""
    values = qmap.to(codes.device, torch.float32)[codes.long()].reshape(-1, block)
    return (values * absmax.float()[:, None]).reshape(-1)

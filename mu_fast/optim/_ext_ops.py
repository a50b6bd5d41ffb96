"""Fake (meta) implementations of the ``torch.ops.mu_fast`` optimizer ops, for torch.compile and opcheck.

Imported by the ``cpu``/``cuda`` backends once ``mu_fast._C`` has loaded (the schemas live in
csrc/registration.cpp). Every op mutates its arguments in place and returns nothing, so the fakes only check
what can be checked without data.
"""

from __future__ import annotations

import torch

from mu_fast._ext import REBUILD_HINT, load_extension

_module, _why = load_extension()
if _module is None:
    raise ImportError(f"mu_fast._C is not available: {_why}. {REBUILD_HINT}")


def _check_tiles(tiles: torch.Tensor) -> None:
    torch._check(tiles.dim() == 2 and tiles.dtype == torch.int64, lambda: f"tiles must be int64 [n, 9]; got {tiles.dtype} {tuple(tiles.shape)}")


@torch.library.register_fake("mu_fast::masked_adamw_grad_sumsq")
def _grad_sumsq_fake(grads, compact_grad, tiles, index, partial) -> None:
    _check_tiles(tiles)
    torch._check(partial.dtype == torch.float64, lambda: f"partial must be float64; got {partial.dtype}")


@torch.library.register_fake("mu_fast::masked_adamw_scalars")
def _scalars_fake(hyper, slot_group, slot_step, present, partial, coef, control, has_stats, check_finite) -> None:
    torch._check(hyper.dtype == torch.float64 and slot_step.dtype == torch.float64,
                 lambda: "hyper and slot_step must be float64")
    torch._check(slot_group.dtype == torch.int64, lambda: f"slot_group must be int64; got {slot_group.dtype}")


@torch.library.register_fake("mu_fast::masked_adamw_update")
def _update_fake(params, grads, compact_grad, tiles, index, exp_avg, exp_avg_sq, master, coef) -> None:
    _check_tiles(tiles)
    torch._check(exp_avg.shape == exp_avg_sq.shape, lambda: "exp_avg and exp_avg_sq must have the same shape")


@torch.library.register_fake("mu_fast::masked_adamw8bit_update")
def _update8_fake(params, grads, compact_grad, tiles, index, codes_m, codes_v, absmax_m, absmax_v, qmap_m, qmap_v,
                  mids_m, mids_v, master, coef) -> None:
    _check_tiles(tiles)
    torch._check(codes_m.dtype == torch.uint8 and codes_v.dtype == torch.uint8, lambda: "8-bit codes must be uint8")


@torch.library.register_fake("mu_fast::masked_gather_grad")
def _gather_fake(grad, tiles, index, tile_begin, tile_end, compact_grad, accumulate) -> None:
    _check_tiles(tiles)

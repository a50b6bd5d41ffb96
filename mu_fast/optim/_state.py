"""State movement for ``MaskedAdamW``: migration between masks and ``load_state_dict``.

Kept apart from optimizer.py because it works element by element through ``SegmentTable.indices`` (8 B per
active element and index, materialized on the device): fine for a mask change or a checkpoint load, never
used inside ``step()``.

``opt`` is always a ``MaskedAdamW``, typed as its base class ``torch.optim.Optimizer``: this module sits below
``mu_fast.optim.optimizer``, which imports it, and imports nothing from there.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
from torch.optim import Optimizer

from mu_fast.optim import quantize8

if TYPE_CHECKING:
    from mu_fast.optim.bucket import CompactBucket


def read_slot(bucket: CompactBucket, slot: int) -> dict[str, torch.Tensor]:
    """fp32 ``[n_active]`` moments (and master) of one slot, in state order, dequantized if 8-bit."""
    flat, state = bucket.table.indices(slot, bucket.device)
    out = {"flat": flat}
    if bucket.state_bits == 8:
        info, qb = bucket.table.slots[slot], quantize8.QBLOCK
        lo, hi = info.state_begin, info.state_end
        for key, codes, absmax, qmap in (("exp_avg", bucket.exp_avg, bucket.absmax_m, bucket.qmap_m),
                                         ("exp_avg_sq", bucket.exp_avg_sq, bucket.absmax_v, bucket.qmap_v)):
            out[key] = quantize8.dequantize_blockwise(codes[lo:hi], absmax[lo // qb : hi // qb], qmap)[state - lo]
    else:
        out["exp_avg"], out["exp_avg_sq"] = bucket.exp_avg[state].clone(), bucket.exp_avg_sq[state].clone()
    if bucket.master is not None:
        out["master"] = bucket.master[state].clone()
    return out


def write_slot(bucket: CompactBucket, slot: int, values: dict[str, torch.Tensor]) -> None:
    """Inverse of ``read_slot`` (values in the slot's state order; 8-bit state is re-quantized)."""
    flat, state = bucket.table.indices(slot, bucket.device)
    if bucket.state_bits == 8:
        info, qb = bucket.table.slots[slot], quantize8.QBLOCK
        lo, hi = info.state_begin, info.state_end
        for key, codes, absmax, qmap in (("exp_avg", bucket.exp_avg, bucket.absmax_m, bucket.qmap_m),
                                         ("exp_avg_sq", bucket.exp_avg_sq, bucket.absmax_v, bucket.qmap_v)):
            dense = torch.zeros(hi - lo, dtype=torch.float32, device=bucket.device)
            dense[state - lo] = values[key]
            codes[lo:hi], absmax[lo // qb : hi // qb] = quantize8.quantize_blockwise(dense, qmap)
    else:
        bucket.exp_avg[state], bucket.exp_avg_sq[state] = values["exp_avg"], values["exp_avg_sq"]
    if bucket.master is not None:
        bucket.master[state] = values["master"]


def export_state(opt: Optimizer, moments: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Every parameter's state keyed by ``id(param)``: its step count and (with ``moments``) its moments and
    master values with the flat offsets they belong to."""
    out = {}
    for bi, b in enumerate(opt._buckets):
        for slot, p in enumerate(b.params):
            out[id(p)] = read_slot(b, slot) if moments else {}
            out[id(p)]["step"] = opt._slot_step[opt._slot_at[bi] + slot].clone()
    return out


def import_state(opt: Optimizer, saved: dict[int, dict[str, torch.Tensor]]) -> None:
    """Fill the (fresh, zero) buckets of ``opt`` from ``export_state`` output: matching elements keep their
    state, others start at zero moments; masters start from the parameter where no old master exists; each
    parameter keeps its step count (a parameter new to the optimizer starts at 0)."""
    for bi, bucket in enumerate(opt._buckets):
        for slot, p in enumerate(bucket.params):
            flat, _ = bucket.table.indices(slot, bucket.device)
            new = {"exp_avg": torch.zeros(flat.numel(), dtype=bucket.state_dtype, device=bucket.device)}
            new["exp_avg_sq"] = torch.zeros_like(new["exp_avg"])
            new["master"] = p.detach().reshape(-1)[flat].float()
            old = saved.get(id(p))
            if old is not None:
                opt._slot_step[opt._slot_at[bi] + slot].copy_(old["step"])
            if old is not None and "flat" in old:
                order = torch.argsort(old["flat"])
                sorted_flat = old["flat"][order]
                pos = torch.searchsorted(sorted_flat, flat).clamp(max=max(sorted_flat.numel() - 1, 0))
                hit = sorted_flat[pos] == flat if sorted_flat.numel() else torch.zeros_like(flat, dtype=torch.bool)
                src = order[pos[hit]]
                for key in ("exp_avg", "exp_avg_sq", "master"):
                    if key in old:
                        new[key][hit] = old[key][src]
            write_slot(bucket, slot, new)
        opt._master_ready[bi] = True


def load_masked_state(opt: Optimizer, state_dict: dict[str, Any]) -> None:
    """``MaskedAdamW.load_state_dict``: copy saved state into the compact buffers (no dtype casts)."""
    groups, saved_groups = opt.param_groups, state_dict["param_groups"]
    foreign = next((s for s in state_dict["state"].values() if "mask_key" not in s), None)
    if foreign is not None:
        adam = set(foreign) <= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        raise ValueError(
            f"this is a {'torch.optim.AdamW (or Adam)' if adam else 'another optimizer'}'s state_dict (state keys "
            f"{sorted(foreign)}), not a MaskedAdamW one: its state is dense and carries no mask. Load a state_dict "
            "saved by MaskedAdamW, or start MaskedAdamW without one (its moments start at zero)"
        )
    if len(groups) != len(saved_groups) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
        raise ValueError(
            f"state_dict has param groups of sizes {[len(s['params']) for s in saved_groups]}; this optimizer has "
            f"{[len(g['params']) for g in groups]}: load it into a MaskedAdamW built over the same parameters"
        )
    id_map = dict(zip(chain.from_iterable(s["params"] for s in saved_groups), chain.from_iterable(g["params"] for g in groups)))
    loaded_master: set[int] = set()
    for pid, saved in state_dict["state"].items():
        p = id_map.get(pid)
        ours = opt.state.get(p) if p is not None else None
        if ours is None:
            raise ValueError(f"state_dict holds state for parameter #{pid}, which this optimizer does not train")
        bi, slot = opt._where[id(p)]
        name = opt._buckets[bi].table.slots[slot].name
        if saved.get("mask_key") != ours["mask_key"]:
            raise ValueError(f"state for {name!r} was saved with a different mask (or shape); rebuild the optimizer with that mask")
        for key, view in ours.items():
            if key in ("step", "mask_key"):
                continue
            if key not in saved:
                if key == "master":
                    continue
                raise ValueError(f"state for {name!r} lacks {key!r}: saved with state_bits={'8' if 'exp_avg_codes' in saved else '32'}?")
            src = torch.as_tensor(saved[key])
            if src.shape != view.shape or src.dtype != view.dtype:
                raise ValueError(f"state {key!r} of {name!r} is {src.dtype} {tuple(src.shape)}; expected {view.dtype} {tuple(view.shape)}")
            view.copy_(src)
            if key == "master":
                loaded_master.add(bi)
        if "step" in saved:  # saved as a 0-d tensor per parameter (a [1] tensor shared by all, before)
            ours["step"].copy_(torch.as_tensor(saved["step"], dtype=torch.float64).reshape(()))
    for bi, bucket in enumerate(opt._buckets):
        opt._master_ready[bi] = bucket.master is None or bi in loaded_master
    for group, saved in zip(groups, saved_groups):
        for key, value in saved.items():
            if key not in ("params", "param_names"):
                group[key] = value
    opt._hyper_key = ()


# ------------------------------------------------------------------------------------- deepcopy and pickle
# What an optimizer is, beyond its param groups: the constructor's settings and the resolved mask. Everything
# else (buckets, segment tables, backend objects, state views, compact-gradient hooks, staging buffers) is laid
# out again from these by ``_build``, and then the buffers' values are copied in.
SETTINGS = ("state_bits", "master_weights", "compact_grads", "max_grad_norm", "nonfinite", "backend", "tile",
            "missing_grad", "_whole_by_default")
BUCKET_BUFFERS = ("exp_avg", "exp_avg_sq", "master", "compact_grad", "absmax_m", "absmax_v")
RUNNING = ("_slot_step", "_control", "_partial")  # per-optimizer device tensors whose values carry over
FLAGS = ("_master_ready", "_stats_ready", "_pending_clip", "_skip_warned", "_skip_polls")


def pickled_state(opt: Optimizer) -> dict[str, Any]:
    """``MaskedAdamW.__getstate__``: settings, param groups (with their parameters), mask and every buffer's values.

    ``copy.deepcopy`` copies this dict (parameters included, as for torch's optimizers) and ``pickle`` writes it;
    hooks registered on the optimizer are not carried, as in torch.
    """
    return {
        **{key: getattr(opt, key) for key in SETTINGS},
        "defaults": opt.defaults, "param_groups": opt.param_groups, "mask": opt.mask,
        "buckets": [{**{k: getattr(b, k) for k in BUCKET_BUFFERS if getattr(b, k) is not None},
                     "grad_seen": bytes(b.grad_seen)} for b in opt._buckets],
        **{key: getattr(opt, key) for key in RUNNING + FLAGS},
    }


def restore_pickled(opt: Optimizer, state: dict[str, Any]) -> None:
    """``MaskedAdamW.__setstate__``: lay the buckets out again over the (copied) parameters and fill them."""
    for key in SETTINGS:
        setattr(opt, key, state[key])
    opt._built, opt._group_masks = True, {}
    torch.optim.Optimizer.__setstate__(opt, {"defaults": state["defaults"], "state": defaultdict(dict),
                                             "param_groups": state["param_groups"]})
    opt._build(state["mask"])
    if len(opt._buckets) != len(state["buckets"]):
        raise RuntimeError(f"restoring a MaskedAdamW laid out {len(opt._buckets)} buckets for {len(state['buckets'])} saved")
    with torch.no_grad():
        for bucket, saved in zip(opt._buckets, state["buckets"]):
            for key in BUCKET_BUFFERS:
                if key in saved:
                    getattr(bucket, key).copy_(saved[key])
            bucket.grad_seen[:] = saved["grad_seen"]
        for key in RUNNING:
            getattr(opt, key).copy_(state[key])
    for key in FLAGS:
        setattr(opt, key, list(state[key]) if isinstance(state[key], list) else state[key])

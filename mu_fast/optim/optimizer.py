"""``MaskedAdamW``: a drop-in ``torch.optim.Optimizer`` that trains only the masked elements of its parameters.

    opt = MaskedAdamW(mask.trainable_parameters(model), mask=mask, lr=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    for batch in data:
        opt.zero_grad(set_to_none=True); loss(model, batch).backward()
        opt.clip_grad_norm_(1.0)            # optional: the norm of the active gradients, on device
        opt.step(); sched.step()

Semantics: dense AdamW restricted to the active set (mu_fast/optim/masked_adamw.py), weight_decay 0 by default.
State exists only for active elements (fp32 m/v, or 8-bit block-quantized with ``state_bits=8``; an fp32
master copy for bf16/fp16 parameters with ``master_weights=True``). Parameters of one device and dtype share one
compact buffer and one launch per step; the learning rate, bias corrections, clip factor and step count live on
the device, so ``step()`` does not sync the host (except ``nonfinite="raise"``).

Gradients: dense ``.grad`` by default (a parameter without ``.grad`` counts as a zero gradient: every active
element is updated every step). ``compact_grads=True`` registers a post-accumulate-grad hook per parameter that
adds the active part of ``.grad`` into an fp32 compact buffer and frees ``.grad`` at once, so full-size gradients
never accumulate; clip with ``opt.clip_grad_norm_`` or ``max_grad_norm`` then, since ``.grad`` is None.

Non-finite gradients: ``nonfinite="skip"`` (default) makes a step whose active gradients hold a NaN/inf (or
whose squared norm overflows fp32) a no-op, decided on the device: nothing is written and the step count does
not advance. ``"raise"`` syncs and raises ``FloatingPointError`` before anything is written. ``"ignore"`` skips
the check (and its read of the gradients) and lets NaN into the state, like torch's AdamW.

CUDA graphs: run one eager step first; inside a captured region only tensor-valued ``lr`` updates (e.g.
``group["lr"].fill_(x)``) take effect, float hyperparameters are those of the last eager step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from mu_fast.masks import Mask, Selection
from mu_fast.optim import quantize8
from mu_fast.optim.masked_adamw import (
    CONTROL_FIELDS,
    COEF_FIELDS,
    H_MAX_NORM,
    HYPER_FIELDS,
    K_SKIP,
    CompactBucket,
    check_grads,
    select_backend,
)
from mu_fast.optim.segments import DEFAULT_TILE, SegmentTable

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NONFINITE_POLICIES = ("skip", "raise", "ignore")


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW over the active elements of a ``Mask``; see the module docstring.

    params: ``model.named_parameters()``-style ``(name, param)`` pairs (names matched against ``mask``), plain
    parameters (named "0", "1", ... in order), or param-group dicts of either.
    mask: a ``Mask``; or a mapping from name / position / parameter to a ``Selection``, a bool tensor of the
    parameter's shape, or "whole"; or None (every parameter whole). Every parameter must be in the mask and
    every mask entry must be a parameter (``ValueError`` otherwise).
    lr, betas, eps, weight_decay: AdamW hyperparameters, per param group. state_bits: 32 or 8. master_weights:
    keep an fp32 copy of the active elements of bf16/fp16 parameters. compact_grads: see the module docstring.
    max_grad_norm: clip the active gradients to this global L2 norm every step. nonfinite: "skip" | "raise" |
    "ignore". backend: "auto" | "torch" | "triton" | "cpu" | "cuda". tile: elements per work tile.
    """

    def __init__(
        self,
        params: Iterable[Any],
        mask: Mask | Mapping[Any, Any] | None = None,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        state_bits: int = 32,
        master_weights: bool = False,
        compact_grads: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        backend: str = "auto",
        tile: int = DEFAULT_TILE,
    ):
        _check_hyper(lr, betas, eps, weight_decay)
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8; got {state_bits}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}; got {nonfinite!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None; got {max_grad_norm}")
        self.state_bits, self.master_weights, self.compact_grads = state_bits, master_weights, compact_grads
        self.max_grad_norm, self.nonfinite, self.backend, self.tile = max_grad_norm, nonfinite, backend, tile
        self._built = False
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._build(self._resolve_mask(mask, strict=True))
        self._built = True

    # ---------------------------------------------------------------------------------------------- setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``; after construction the new parameters must already be in the mask."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict; got {type(param_group).__name__}")
        group = dict(param_group)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if group["params"] and isinstance(group["params"][0], tuple):
            group["param_names"] = [name for name, _ in group["params"]]
            group["params"] = [p for _, p in group["params"]]
        _check_hyper(group.get("lr", 1e-3), group.get("betas", (0.9, 0.999)), group.get("eps", 1e-8),
                     group.get("weight_decay", 0.0))
        super().add_param_group(group)
        if getattr(self, "_built", False):
            self._rebuild(self.mask)

    def _named(self) -> list[tuple[str, torch.Tensor, int]]:
        out, position = [], 0
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [str(position + i) for i in range(len(group["params"]))]
            out += [(n, p, gi) for n, p in zip(names, group["params"])]
            position += len(group["params"])
        return out

    def _resolve_mask(self, mask: Mask | Mapping[Any, Any] | None, strict: bool) -> Mask:
        named = self._named()
        by_name = {n: p for n, p, _ in named}
        if len(by_name) != len(named):
            raise ValueError("parameter names must be unique across param groups")
        if mask is None:
            resolved = Mask()
            for name, p, _ in named:
                resolved.add(name, p.shape)
        elif isinstance(mask, Mask):
            resolved = mask
        elif isinstance(mask, Mapping):
            position = {id(p): n for n, p, _ in named}
            resolved = Mask()
            for key, value in mask.items():
                name = position.get(id(key)) if isinstance(key, torch.Tensor) else str(key)
                if name is None or name not in by_name:
                    raise ValueError(f"mask key {key if not isinstance(key, torch.Tensor) else tuple(key.shape)} is not one of the optimizer's parameters")
                shape = by_name[name].shape
                if isinstance(value, Selection):
                    resolved.add(name, shape, value.kind, value.index)
                elif isinstance(value, torch.Tensor):
                    resolved.add(name, shape, "elements", value)
                elif value == "whole":
                    resolved.add(name, shape)
                else:
                    raise TypeError(f"mask value for {name!r} must be a Selection, a bool tensor or 'whole'; got {type(value).__name__}")
        else:
            raise TypeError(f"mask must be a Mask, a mapping or None; got {type(mask).__name__}")
        for name in resolved:
            if name not in by_name:
                raise ValueError(
                    f"mask names parameter {name!r}, which this optimizer was not given; pass it (e.g. "
                    "mask.trainable_parameters(model)) or drop it from the mask"
                )
            if tuple(by_name[name].shape) != resolved.shape(name):
                raise ValueError(f"mask for {name!r} has shape {resolved.shape(name)} but the parameter has {tuple(by_name[name].shape)}")
        missing = [n for n in by_name if n not in resolved]
        if strict and missing:
            raise ValueError(
                f"parameters {missing[:5]}{'...' if len(missing) > 5 else ''} are not in the mask; pass only masked "
                "parameters (mask.trainable_parameters(model)) or add them to the mask"
            )
        return resolved

    def _build(self, mask: Mask) -> None:
        """Lay out buckets (one per dtype) with zero state for ``mask``, point ``self.state`` at them."""
        self.mask = mask
        named = [(n, p, g) for n, p, g in self._named() if n in mask]
        devices = {p.device for _, p, _ in named}
        if len(devices) > 1:
            raise ValueError(f"MaskedAdamW needs all parameters on one device; got {sorted(map(str, devices))}")
        for name, p, _ in named:
            if p.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"parameter {name!r} is {p.dtype}; MaskedAdamW supports {SUPPORTED_DTYPES}")
            if not p.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous (strides {p.stride()}); make it contiguous first")
        self.device = next(iter(devices)) if devices else torch.device("cpu")
        self._buckets: list[CompactBucket] = []
        self._impls = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, slot)
        align = quantize8.QBLOCK if self.state_bits == 8 else 1
        tile = self.tile if self.state_bits == 32 else max(quantize8.QBLOCK, self.tile // quantize8.QBLOCK * quantize8.QBLOCK)
        for dtype in dict.fromkeys(p.dtype for _, p, _ in named):
            members = [(n, p, g) for n, p, g in named if p.dtype == dtype]
            table = SegmentTable([(n, p.shape, mask[n], g) for n, p, g in members], tile=tile, align=align)
            bucket = CompactBucket.create([p for _, p, _ in members], table, state_bits=self.state_bits,
                                          master_weights=self.master_weights and dtype != torch.float32,
                                          compact_grads=self.compact_grads)
            for slot, (_, p, _) in enumerate(members):
                self._where[id(p)] = (len(self._buckets), slot)
            self._buckets.append(bucket)
            self._impls.append(select_backend(self.device, self.backend))
        n_groups = len(self.param_groups)
        f32, f64 = dict(dtype=torch.float32, device=self.device), dict(dtype=torch.float64, device=self.device)
        if not hasattr(self, "_step"):
            self._step = torch.zeros(1, **f64)
        self._hyper = torch.zeros(n_groups, HYPER_FIELDS, **f64)
        self._hyper_key: tuple = ()
        self._hyper_host: torch.Tensor | None = None  # pinned staging buffer (CUDA), see _stage_hyper
        self._hyper_event: torch.cuda.Event | None = None
        self._coef = torch.zeros(n_groups, COEF_FIELDS, **f32)
        self._control = torch.zeros(CONTROL_FIELDS, **f32)
        self._partial_at = [0]
        for b in self._buckets:
            self._partial_at.append(self._partial_at[-1] + b.table.n_tiles)
        self._partial = torch.zeros(max(self._partial_at[-1], 1), **f32)
        self._stats_ready, self._pending_clip = False, None
        self._master_ready = [b.master is None for b in self._buckets]
        self.state.clear()
        for b in self._buckets:
            for slot, p in enumerate(b.params):
                self.state[p] = self._state_views(b, slot)
        self._install_hooks()

    def _state_views(self, bucket: CompactBucket, slot: int) -> dict[str, Any]:
        info = bucket.table.slots[slot]
        lo, hi = info.state_begin, info.state_end
        views: dict[str, Any] = {"step": self._step, "mask_key": bucket.table.key(slot)}
        if bucket.state_bits == 8:
            qb = quantize8.QBLOCK
            views.update(exp_avg_codes=bucket.exp_avg[lo:hi], exp_avg_absmax=bucket.absmax_m[lo // qb : hi // qb],
                         exp_avg_sq_codes=bucket.exp_avg_sq[lo:hi], exp_avg_sq_absmax=bucket.absmax_v[lo // qb : hi // qb])
        else:
            views.update(exp_avg=bucket.exp_avg[lo:hi], exp_avg_sq=bucket.exp_avg_sq[lo:hi])
        if bucket.master is not None:
            views["master"] = bucket.master[lo:hi]
        return views

    def _install_hooks(self) -> None:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        if not self.compact_grads:
            return
        for bi, bucket in enumerate(self._buckets):
            for slot, p in enumerate(bucket.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._compact_hook(bi, slot)))

    def _compact_hook(self, bi: int, slot: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            bucket = self._buckets[bi]
            bucket.check_params((slot,))
            with torch.no_grad():
                self._impls[bi].gather(bucket, slot, param.grad, bucket.compact_grad, True)
            param.grad = None  # the dense gradient is freed here, per parameter, during backward

        return hook

    # ------------------------------------------------------------------------------------------- stepping
    def _write_hyper(self) -> None:
        rows, tensor_lrs = [], []
        for gi, g in enumerate(self.param_groups):
            lr = g["lr"]
            if isinstance(lr, torch.Tensor):
                tensor_lrs.append((gi, lr))
                lr = 0.0
            rows.append((float(lr), float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]), float(g["weight_decay"]), 0.0))
        max_norm = self._pending_clip if self._pending_clip is not None else (self.max_grad_norm or 0.0)
        rows = [r[:H_MAX_NORM] + (float(max_norm),) for r in rows]
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if tuple(rows) != self._hyper_key and not capturing:
            host = self._stage_hyper(rows)
            if host is not self._hyper:
                self._hyper.copy_(host, non_blocking=True)
            if self._hyper_event is not None:
                self._hyper_event.record(torch.cuda.current_stream(self.device))
            self._hyper_key = tuple(rows)
        for gi, lr in tensor_lrs:
            self._hyper[gi, 0].copy_(lr.reshape(()))

    def _stage_hyper(self, rows: list[tuple[float, ...]]) -> torch.Tensor:
        """Host copy of the hyperparameter rows for the upload to the device.

        On CUDA: one persistent pinned buffer, rewritten in place when the copy that last read it has finished
        (a non-blocking event query; the previous step's upload has finished long before in any real loop), so a
        step whose learning rate changes costs no pinned allocation. Only when that copy is still in flight does
        it fall back to a fresh pinned tensor, so the host never waits and an in-flight copy is never overwritten.
        """
        if self.device.type == "cpu":  # synchronous: the device tensor itself can be rewritten
            self._hyper.numpy()[:] = rows
            return self._hyper
        if self.device.type != "cuda":
            return torch.tensor(rows, dtype=torch.float64)
        if self._hyper_host is None:  # reset by _build whenever _hyper is reallocated
            self._hyper_host = torch.empty(self._hyper.shape, dtype=torch.float64).pin_memory()
            self._hyper_event = torch.cuda.Event()
        elif not self._hyper_event.query():
            return torch.tensor(rows, dtype=torch.float64).pin_memory()
        self._hyper_host.numpy()[:] = rows
        return self._hyper_host

    def _grads(self, bucket: CompactBucket) -> list[torch.Tensor | None]:
        bucket.check_params()
        if bucket.compact_grad is not None:
            return [None] * len(bucket.params)
        grads = [p.grad for p in bucket.params]
        check_grads(bucket, grads)
        return grads

    def _compute_stats(self, grads: list[list[torch.Tensor | None]] | None = None) -> None:
        for bi, bucket in enumerate(self._buckets):
            part = self._partial[self._partial_at[bi] : self._partial_at[bi + 1]]
            self._impls[bi].grad_sumsq(bucket, grads[bi] if grads is not None else self._grads(bucket), part)
        self._stats_ready = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the next ``step()``'s active gradients to global L2 norm ``max_norm``; returns the norm (device).

        Like ``torch.nn.utils.clip_grad_norm_`` over the active elements only (the clip factor
        ``min(1, max_norm / (norm + 1e-6))`` is folded into the update; ``.grad`` is not modified). Call it after
        backward and before ``step()``, with the gradients unchanged in between.
        """
        if norm_type != 2.0:
            raise ValueError(f"MaskedAdamW.clip_grad_norm_ supports norm_type=2 only; got {norm_type}")
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive; got {max_norm}")
        self._compute_stats()
        self._pending_clip = float(max_norm)
        return self._partial.sum().sqrt()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One masked AdamW step over all parameters (no host sync unless ``nonfinite="raise"``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._buckets:
            return loss
        self._init_master()
        self._write_hyper()
        clip = self._pending_clip is not None or self.max_grad_norm is not None
        has_stats = self.nonfinite != "ignore" or clip
        grads = [self._grads(b) for b in self._buckets]  # validated once per step, not per pass (host time)
        if has_stats and not self._stats_ready:
            self._compute_stats(grads)
        impl = self._impls[0]
        impl.scalars(self._hyper, self._step, self._partial, self._coef, self._control, has_stats, self.nonfinite != "ignore")
        self._stats_ready, self._pending_clip = False, None
        if self.nonfinite == "raise" and bool(self._control[K_SKIP].item()):
            raise FloatingPointError(f"non-finite active gradient in {self._nonfinite_names()}; nothing was updated")
        for bi, bucket in enumerate(self._buckets):
            self._impls[bi].update(bucket, grads[bi], self._coef, self._control)
        return loss

    def _nonfinite_names(self) -> list[str]:
        names = []
        for bucket in self._buckets:
            for slot, p in enumerate(bucket.params):
                flat, state = bucket.table.indices(slot, bucket.device)
                g = bucket.compact_grad[state] if bucket.compact_grad is not None else (p.grad.reshape(-1)[flat] if p.grad is not None else None)
                if g is not None and not bool(torch.isfinite(g).all()):
                    names.append(bucket.table.slots[slot].name)
        return names

    def _init_master(self) -> None:
        for bi, bucket in enumerate(self._buckets):
            if not self._master_ready[bi]:
                bucket.check_params()
                for slot, p in enumerate(bucket.params):
                    self._impls[bi].gather(bucket, slot, p.detach(), bucket.master, False)
                self._master_ready[bi] = True

    def reset_master(self) -> None:
        """Re-read the fp32 master copies from the parameters (after changing parameters outside the optimizer)."""
        self._master_ready = [b.master is None for b in self._buckets]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; also zeroes the compact gradient buffers."""
        super().zero_grad(set_to_none=set_to_none)
        for bucket in self._buckets:
            if bucket.compact_grad is not None:
                bucket.compact_grad.zero_()
        self._stats_ready = False

    # ----------------------------------------------------------------------------------- state and masks
    def state_bytes(self) -> int:
        """Bytes of persistent optimizer state (moments, absmax, master) on the device."""
        return sum(b.state_bytes() for b in self._buckets)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of a MaskedAdamW built over the same parameters and mask (``ValueError`` else)."""
        from mu_fast.optim._state import load_masked_state

        load_masked_state(self, state_dict)

    def set_mask(self, mask: Mask | Mapping[Any, Any], migrate: bool = True) -> None:
        """Train a new active set from the next step on.

        Elements active before and after keep their moments (and master value) when ``migrate``; newly active
        elements start from zero moments (master = current parameter value); parameters absent from the new
        mask are frozen and lose their state. ``migrate=False`` resets every moment. The step count is kept.
        """
        self._rebuild(self._resolve_mask(mask, strict=False), migrate)

    def _rebuild(self, mask: Mask, migrate: bool = True) -> None:
        from mu_fast.optim._state import export_state, import_state

        self._init_master()
        saved = export_state(self) if migrate else {}
        self._build(mask)
        import_state(self, saved)


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    lr_value = float(lr) if not isinstance(lr, torch.Tensor) else float(lr.detach().cpu())
    if not lr_value >= 0:
        raise ValueError(f"lr must be ≥ 0; got {lr}")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1); got {betas}")
    if not eps >= 0:
        raise ValueError(f"eps must be ≥ 0; got {eps}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be ≥ 0; got {weight_decay}")

"""``MaskedAdamW``: a drop-in ``torch.optim.Optimizer`` that trains only the masked elements of its parameters.

    opt = MaskedAdamW(mask.trainable_parameters(model), mask=mask, lr=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    for batch in data:
        opt.zero_grad(set_to_none=True); loss(model, batch).backward()
        opt.clip_grad_norm_(1.0)            # optional: the norm of the active gradients, on device
        opt.step(); sched.step()

Semantics: dense AdamW restricted to the active set (mu_fast/optim/masked_adamw.py). Defaults are torch.optim.AdamW's
(torch 2.13: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2), so the same keyword arguments give the same
weights; pass ``weight_decay=0.0`` for plain Adam on the active elements (the edit loop passes its own, 0 by default).
State exists only for active elements (fp32 m/v, or 8-bit block-quantized with ``state_bits=8``; an fp32
master copy for bf16/fp16 parameters with ``master_weights=True``). Parameters of one device and dtype share one
compact buffer and one launch per step; the learning rate, bias corrections, clip factor and step counts live on
the device, so ``step()`` does not sync the host (except ``nonfinite="raise"``).

Gradients: dense ``.grad`` by default. ``missing_grad="skip"`` (default) treats a parameter whose ``.grad`` is None
(e.g. ``requires_grad=False``, or unused in the forward) as torch's AdamW does: it is left untouched that step (no
moment decay, no weight decay) and its step count does not advance; step counts and bias corrections are per
parameter, like torch's ``state[p]["step"]``. ``missing_grad="zero"`` counts a missing gradient as zero instead
(every active element decays every step, all parameters share one step count). ``compact_grads=True`` registers
a post-accumulate-grad hook per parameter (with ``requires_grad``) that adds the active part of ``.grad`` into an
fp32 compact buffer and frees ``.grad`` at once, so full-size gradients never accumulate; a parameter counts as
having a gradient when its hook has fired since the last ``zero_grad(set_to_none=True)``. Clip with
``opt.clip_grad_norm_`` or ``max_grad_norm`` then, since ``.grad`` is None.

Non-finite gradients: ``nonfinite="skip"`` (default) makes a step whose active gradients hold a NaN/inf a no-op,
decided on the device: nothing is written and no step count advances. Squares are summed in fp64, so a finite
gradient, however large, never trips the check. ``opt.skipped_steps`` counts skipped steps (reading it syncs);
the first one also raises a ``RuntimeWarning``, found without a sync (on CUDA at a later step, or when the count
is read). ``"raise"`` syncs and raises ``FloatingPointError`` before anything is written. ``"ignore"`` skips the
check (and its read of the gradients) and lets NaN into the state, like torch's AdamW.

Param groups: torch AdamW's options are accepted: ``maximize`` is honoured (per group), ``foreach`` / ``fused`` /
``capturable`` are accepted and ignored (MaskedAdamW always runs its own fused, capturable kernels), ``amsgrad``,
``differentiable`` and ``decoupled_weight_decay=False`` are refused. A tensor passed twice is refused.
``add_param_group`` after construction takes the new parameters' selections from a ``"mask"`` key of the group
("whole", a ``Selection`` or bool tensor, one per parameter in a list, or a mapping like the ``mask`` argument);
without one, new parameters are whole when the optimizer was built with ``mask=None`` and refused otherwise. Such
an optimizer's ``state_dict`` loads into one built the same way (same groups, same masks).

Copies and hooks: ``copy.deepcopy`` and ``pickle`` carry the parameters (without ``.grad``, as torch copies a
Parameter), settings, mask and every state value (moments, master, compact gradients, step counts, a pending clip);
the copy lays out its own buffers and steps bit-identically. As in torch, hooks registered on the optimizer are not
copied. ``register_load_state_dict_pre_hook`` / ``_post_hook``, the state-dict hooks and the step hooks run as in
``torch.optim.Optimizer``.

CUDA graphs: run one eager step first; inside a captured region only tensor-valued ``lr`` updates (e.g.
``group["lr"].fill_(x)``) take effect, float hyperparameters are those of the last eager step, and which
parameters have gradients must not change.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch

from mu_fast.masks import Mask
from mu_fast.optim import _groups, _host, quantize8
from mu_fast.optim.backends import select_backend
from mu_fast.optim.masked_adamw import (
    CONTROL_FIELDS,
    COEF_FIELDS,
    HYPER_FIELDS,
    K_SKIP,
    K_SKIPPED,
    CompactBucket,
    check_grad,
    check_grads,
    to_device,
)
from mu_fast.optim.segments import DEFAULT_TILE, SegmentTable

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NONFINITE_POLICIES = ("skip", "raise", "ignore")
MISSING_GRAD_POLICIES = ("skip", "zero")


class MaskedAdamW(torch.optim.Optimizer):
    """AdamW over the active elements of a ``Mask``; see the module docstring.

    params: ``model.named_parameters()``-style ``(name, param)`` pairs (names matched against ``mask``), plain
    parameters (named "0", "1", ... in order), or param-group dicts of either (optionally with a "mask" key).
    mask: a ``Mask``; or a mapping from name / position / parameter to a ``Selection``, a bool tensor of the
    parameter's shape, or "whole"; or None (every parameter whole). Every parameter must be in the mask and
    every mask entry must be a parameter (``ValueError`` otherwise).
    lr, betas, eps, weight_decay, maximize: AdamW hyperparameters, per param group, with torch.optim.AdamW's
    defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2: decoupled decay of the active elements only;
    ``weight_decay=0.0`` turns it off). amsgrad, foreach, fused,
    capturable, differentiable: torch AdamW's options (see the module docstring). state_bits: 32 or 8.
    master_weights: keep an fp32 copy of the active elements of bf16/fp16 parameters. compact_grads: see the
    module docstring. max_grad_norm: clip the active gradients to this global L2 norm every step. nonfinite:
    "skip" | "raise" | "ignore". missing_grad: "skip" | "zero". backend: "auto" | "torch" | "triton" | "cpu" |
    "cuda". tile: elements per work tile.
    """

    def __init__(
        self,
        params: Iterable[Any],
        mask: Mask | Mapping[Any, Any] | None = None,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        maximize: bool = False,
        amsgrad: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        state_bits: int = 32,
        master_weights: bool = False,
        compact_grads: bool = False,
        max_grad_norm: float | None = None,
        nonfinite: str = "skip",
        missing_grad: str = "skip",
        backend: str = "auto",
        tile: int = DEFAULT_TILE,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        **{**_groups.TORCH_ADAMW_OPTIONS, **dict(maximize=maximize, amsgrad=amsgrad, foreach=foreach,
                                                                 fused=fused, capturable=capturable,
                                                                 differentiable=differentiable)})
        _groups.check_group(defaults)
        if state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8; got {state_bits}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}; got {nonfinite!r}")
        if missing_grad not in MISSING_GRAD_POLICIES:
            raise ValueError(f"missing_grad must be one of {MISSING_GRAD_POLICIES}; got {missing_grad!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None; got {max_grad_norm}")
        self.state_bits, self.master_weights, self.compact_grads = state_bits, master_weights, compact_grads
        self.max_grad_norm, self.nonfinite, self.backend, self.tile = max_grad_norm, nonfinite, backend, tile
        self.missing_grad = missing_grad
        self._built, self._group_masks, self._whole_by_default = False, {}, mask is None
        super().__init__(params, defaults)
        named = [(n, p) for n, p, _ in self._named()]
        resolved = _groups.resolve_mask(named, mask if mask is not None or not self._group_masks else
                                        {n: "whole" for n, p, g in self._named() if g not in self._group_masks})
        for gi, spec in self._group_masks.items():
            resolved = resolved.union(self._group_mask(gi, spec))
        _groups.check_covered(named, resolved)
        self._build(resolved)
        self._built, self._group_masks = True, {}

    # ---------------------------------------------------------------------------------------------- setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's ``add_param_group``. After construction the new parameters are trained with the selections of
        the group's ``"mask"`` key (see the module docstring); the other parameters keep their state."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict; got {type(param_group).__name__}")
        group = dict(param_group)
        spec = group.pop("mask", None)
        params = group["params"]
        group["params"] = [params] if isinstance(params, torch.Tensor) else list(params)
        if group["params"] and isinstance(group["params"][0], tuple):
            group["param_names"] = [name for name, _ in group["params"]]
            group["params"] = [p for _, p in group["params"]]
        _groups.check_group({**self.defaults, **group})
        start = sum(len(g["params"]) for g in self.param_groups)
        names = group.get("param_names") or [str(start + i) for i in range(len(group["params"]))]
        _groups.check_distinct([(n, p) for n, p, _ in self._named()] + list(zip(names, group["params"])))
        super().add_param_group(group)
        gi = len(self.param_groups) - 1
        if not self._built:
            if spec is not None:
                self._group_masks[gi] = spec
            return
        try:
            if spec is not None:
                extra = self._group_mask(gi, spec)
            elif self._whole_by_default:
                extra = self._group_mask(gi, "whole")
            else:
                raise ValueError(
                    f"parameters {names[:5]} of the new param group have no mask entry; give the group a 'mask' "
                    "key (e.g. {'params': [...], 'mask': 'whole'}, or a list of Selections / bool tensors, one per "
                    "parameter), or build the optimizer over every parameter and choose the trained ones with "
                    "opt.set_mask(...)"
                )
        except Exception:
            self.param_groups.pop()
            raise
        self._rebuild(self.mask.union(extra))

    def _group_mask(self, gi: int, spec: Any) -> Mask:
        """The selections a group's "mask" entry gives its parameters."""
        named = [(n, p) for n, p, g in self._named() if g == gi]
        mapping = _groups.group_mask_mapping([p for _, p in named], spec)
        return _groups.resolve_mask(named, dict(mapping) if isinstance(mapping, Mask) else mapping)

    def _named(self) -> list[tuple[str, torch.Tensor, int]]:
        out, position = [], 0
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names") or [str(position + i) for i in range(len(group["params"]))]
            out += [(n, p, gi) for n, p in zip(names, group["params"])]
            position += len(group["params"])
        return out

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
        # float64 parameters run on the torch backend, in float64 (moments, coefficients, update): the kernels are
        # float32 arithmetic. One float64 parameter puts the whole optimizer there (one set of step coefficients).
        wide = any(p.dtype == torch.float64 for _, p, _ in named)
        if wide and self.backend not in ("auto", "torch"):
            raise ValueError(f"backend={self.backend!r} computes in float32; float64 parameters run on the torch "
                             "backend: pass backend='torch' or 'auto'")
        backend = "torch" if wide else self.backend
        self._buckets: list[CompactBucket] = []
        self._impls = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket, slot)
        align = quantize8.QBLOCK if self.state_bits == 8 else 1
        tile = self.tile if self.state_bits == 32 else max(quantize8.QBLOCK, self.tile // quantize8.QBLOCK * quantize8.QBLOCK)
        for dtype in dict.fromkeys(p.dtype for _, p, _ in named):
            members = [(n, p, g) for n, p, g in named if p.dtype == dtype]
            table = SegmentTable([(n, p.shape, mask[n], g) for n, p, g in members], tile=tile, align=align)
            bucket = CompactBucket.create([p for _, p, _ in members], table, state_bits=self.state_bits,
                                          master_weights=self.master_weights and dtype in (torch.bfloat16, torch.float16),
                                          compact_grads=self.compact_grads)
            for slot, (_, p, _) in enumerate(members):
                self._where[id(p)] = (len(self._buckets), slot)
            self._buckets.append(bucket)
            self._impls.append(select_backend(self.device, backend))
        f32, f64 = dict(dtype=torch.float32, device=self.device), dict(dtype=torch.float64, device=self.device)
        # Per parameter slot, over all buckets (bucket bi owns rows _slot_at[bi]:_slot_at[bi + 1]).
        self._slot_at = [0]
        for b in self._buckets:
            self._slot_at.append(self._slot_at[-1] + len(b.params))
        n_slots = self._slot_at[-1]
        self._slot_group = to_device([g for b in self._buckets for g in b.slot_groups()], torch.int64, self.device)
        self._slot_step = torch.zeros(n_slots, **f64)
        self._present = torch.ones(n_slots, **f32)
        self._all_present = self._present_key = b"\x01" * n_slots
        self._coef = torch.zeros(n_slots, COEF_FIELDS, **(f64 if wide else f32))
        self._coef_rows = [self._coef[a:b] for a, b in zip(self._slot_at, self._slot_at[1:])]
        self._no_grads = [[None] * len(b.params) for b in self._buckets]
        self._complete = [True] * len(self._buckets)  # per bucket: every parameter had a .grad at the last _grads
        self._hyper = torch.zeros(len(self.param_groups), HYPER_FIELDS, **f64)
        self._hyper_key: tuple = ()
        self._hyper_host: torch.Tensor | None = None  # pinned staging buffer (CUDA), see _host.stage_hyper
        self._hyper_event: torch.cuda.Event | None = None
        if getattr(self, "_control", None) is None or self._control.device != self.device:
            self._control = torch.zeros(CONTROL_FIELDS, **f32)  # kept across rebuilds: it counts skipped steps
            self._skip_warned, self._skip_polls, self._skip_event = False, 0, None
            self._skip_host = torch.zeros(1, dtype=torch.float32, pin_memory=self.device.type == "cuda")
            self._control_np = self._control.numpy() if self.device.type == "cpu" else None
        self._partial_at = [0]
        for b in self._buckets:
            self._partial_at.append(self._partial_at[-1] + b.table.n_tiles)
        self._partial = torch.zeros(max(self._partial_at[-1], 1), **f64)
        self._stats_ready, self._pending_clip = False, None
        self._master_ready = [b.master is None for b in self._buckets]
        self.state.clear()
        for bi, b in enumerate(self._buckets):
            for slot, p in enumerate(b.params):
                self.state[p] = self._state_views(b, slot, self._slot_at[bi] + slot)
        self._install_hooks()

    def _state_views(self, bucket: CompactBucket, slot: int, row: int) -> dict[str, Any]:
        info = bucket.table.slots[slot]
        lo, hi = info.state_begin, info.state_end
        views: dict[str, Any] = {"step": self._slot_step[row], "mask_key": bucket.table.key(slot)}
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
        self._hooks, self._hookless = [], []
        if not self.compact_grads:
            return
        for bi, bucket in enumerate(self._buckets):
            for slot, p in enumerate(bucket.params):
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._compact_hook(bi, slot)))
                else:  # torch refuses a hook there; registered by _late_hooks once requires_grad is set
                    self._hookless.append((bi, slot))

    def _late_hooks(self) -> None:
        """Hooks for parameters that were built with ``requires_grad=False`` and require gradients now; a dense
        gradient they already hold is gathered as the hook would have."""
        for bi, slot in list(self._hookless):
            p = self._buckets[bi].params[slot]
            if p.requires_grad:
                self._hookless.remove((bi, slot))
                hook = self._compact_hook(bi, slot)
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))
                hook(p)

    def _compact_hook(self, bi: int, slot: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            bucket = self._buckets[bi]
            bucket.check_params((slot,))
            check_grad(bucket, slot, param.grad)
            with torch.no_grad():
                self._impls[bi].gather(bucket, slot, param.grad, bucket.compact_grad, True)  # marks grad_seen
            param.grad = None  # the dense gradient is freed here, per parameter, during backward

        return hook

    # ------------------------------------------------------------------------------------------- stepping
    def _grads(self, bi: int) -> list[torch.Tensor | None]:
        bucket = self._buckets[bi]
        bucket.check_params()
        if bucket.compact_grad is not None:
            if self._hookless:
                self._late_hooks()
            return self._no_grads[bi]
        grads = [p.grad for p in bucket.params]
        self._complete[bi] = check_grads(bucket, grads)
        return grads

    def _compute_stats(self, grads: list[list[torch.Tensor | None]] | None = None) -> None:
        for bi, bucket in enumerate(self._buckets):
            part = self._partial[self._partial_at[bi] : self._partial_at[bi + 1]]
            self._impls[bi].grad_sumsq(bucket, grads[bi] if grads is not None else self._grads(bi), part)
        self._stats_ready = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the next ``step()``'s active gradients to global L2 norm ``max_norm``; returns the norm (fp32, device).

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
        return self._partial.sum().sqrt().float()

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
        _host.write_hyper(self)
        clip = self._pending_clip is not None or self.max_grad_norm is not None
        has_stats = self.nonfinite != "ignore" or clip
        grads = [self._grads(bi) for bi in range(len(self._buckets))]  # validated once per step (host time)
        _host.stage_present(self, grads)
        if has_stats and not self._stats_ready:
            self._compute_stats(grads)
        self._impls[0].scalars(self._hyper, self._slot_group, self._slot_step, self._present, self._partial,
                               self._coef, self._control, has_stats, self.nonfinite != "ignore")
        self._stats_ready, self._pending_clip = False, None
        if self.nonfinite == "raise" and bool(self._control[K_SKIP].item()):
            raise FloatingPointError(f"non-finite active gradient in {self._nonfinite_names()}; nothing was updated")
        for bi, bucket in enumerate(self._buckets):
            self._impls[bi].update(bucket, grads[bi], self._coef_rows[bi])
        if not self._skip_warned and self.nonfinite == "skip":
            _host.poll_skips(self)
        return loss

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite active gradient since the optimizer was built (reads the device: a sync)."""
        n = int(self._control[K_SKIPPED].item())
        if n and not self._skip_warned:
            _host.warn_skipped(self, n)
        return n

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
        """torch's ``zero_grad``; also zeroes the compact gradient buffers (and, with ``set_to_none``, forgets
        which parameters had a gradient, as ``.grad = None`` does)."""
        super().zero_grad(set_to_none=set_to_none)
        for bucket in self._buckets:
            bucket.gathered_ready = False  # gradients gathered by a statistics pass (cpu backend) are stale now
            if bucket.compact_grad is not None:
                bucket.compact_grad.zero_()
                if set_to_none:
                    bucket.grad_seen[:] = bytes(len(bucket.grad_seen))
        self._stats_ready = False

    # ----------------------------------------------------------------------------------- state and masks
    def state_bytes(self) -> int:
        """Bytes of persistent optimizer state (moments, absmax, master) on the device."""
        return sum(b.state_bytes() for b in self._buckets)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` (its state-dict hooks run). A master copy not yet read from the parameters (no step
        since the optimizer was built) is left out, so loading the dict reads the parameters as a first step would."""
        unread = [p for bi, b in enumerate(self._buckets) if not self._master_ready[bi] for p in b.params]
        live = {p: self.state[p] for p in unread}
        for p in unread:  # torch's state_dict hands out the per-parameter dicts themselves: give it copies
            self.state[p] = {k: v for k, v in live[p].items() if k != "master"}
        try:
            return super().state_dict()
        finally:
            self.state.update(live)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of a MaskedAdamW built over the same parameters and mask (``ValueError`` else).

        As in torch, hooks from ``register_load_state_dict_pre_hook`` run first (one returning a dict replaces the
        one loaded) and those from ``register_load_state_dict_post_hook`` after loading."""
        from mu_fast.optim._state import load_masked_state

        state_dict = state_dict.copy()  # shallow, as torch does: a pre-hook may edit it in place
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        load_masked_state(self, state_dict)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        """For ``copy.deepcopy`` and ``pickle``: the parameters, settings, mask and state values (see ``_state``)."""
        from mu_fast.optim._state import pickled_state

        return pickled_state(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        from mu_fast.optim._state import restore_pickled

        restore_pickled(self, state)

    def set_mask(self, mask: Mask | Mapping[Any, Any], migrate: bool = True) -> None:
        """Train a new active set from the next step on.

        Elements active before and after keep their moments (and master value) when ``migrate``; newly active
        elements start from zero moments (master = current parameter value); parameters absent from the new
        mask are frozen and lose their state. ``migrate=False`` resets every moment. Each parameter keeps its
        step count; a parameter new to the optimizer's state starts at step 0.
        """
        resolved = _groups.resolve_mask([(n, p) for n, p, _ in self._named()], mask)
        self._whole_by_default = False
        self._rebuild(resolved, migrate)

    def _rebuild(self, mask: Mask, migrate: bool = True) -> None:
        from mu_fast.optim._state import export_state, import_state

        self._init_master()
        saved = export_state(self, moments=migrate)
        self._build(mask)
        import_state(self, saved)

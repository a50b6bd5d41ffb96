"""Masked AdamW: the plain-PyTorch reference, the compact state of one bucket, and the backend dispatcher.

Semantics (every backend): dense AdamW restricted to the active set. Every active element gets the AdamW update
every step, also with a zero (or absent) gradient: this is not lazy Adam. Weight decay is decoupled and applied
to active elements only. Inactive elements are never read-modify-written: they stay bit-identical whatever the
gradient holds, NaN included. All arithmetic is fp32 (hyperparameters and bias corrections fp64), the moments
are fp32 or 8-bit block-quantized, and an optional fp32 master copy keeps small updates of bf16 parameters.

Backends, one method each (``grad_sumsq``, ``scalars``, ``update``, ``gather``) over the same segment
table (mu_fast/optim/segments.py):
* ``torch``: plain PyTorch over the same table (gather the active elements, the fp32 update, scatter back);
  runs anywhere, slow. ``masked_adamw_reference`` is the same formula on compact vectors, readable and usable
  in fp64: the tests' oracle.
* ``triton``: kernels/masked_adamw.py and kernels/masked_adamw8bit.py (GPU, or CPU under TRITON_INTERPRET=1).
* ``cpu`` / ``cuda``: the C++ ops of ``mu_fast._C`` (csrc/).
``backend="auto"`` picks cuda, then triton, then torch for CUDA tensors, and cpu, then torch for CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mu_fast.optim import quantize8
from mu_fast.optim.segments import SegmentTable

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
# Column layouts shared with the kernels (kernels/masked_adamw.py, csrc/masked_adamw_common.h).
H_LR, H_BETA1, H_BETA2, H_EPS, H_WD, H_MAX_NORM = range(6)
HYPER_FIELDS = 6
C_BETA1, C_BETA2, C_EPS, C_DECAY, C_STEP_SIZE, C_INV_SQRT_BC2, C_ONE_MINUS_BETA1, C_ONE_MINUS_BETA2 = range(8)
COEF_FIELDS = 8
K_SKIP, K_CLIP, K_NORM = range(3)
CONTROL_FIELDS = 4


def masked_adamw_reference(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float | torch.Tensor,
    weight_decay: float | torch.Tensor,
    step: int | torch.Tensor,
    grad_scale: float | torch.Tensor = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step on the compact active elements: returns new (param, exp_avg, exp_avg_sq).

    param, grad, exp_avg, exp_avg_sq: ``[n]`` in the compute dtype (fp32, or fp64 for a reference run).
    step: the step number after this update (1 on the first step). grad_scale multiplies the gradient
    (the clipping factor). Decoupled decay: ``param ← param·(1 − lr·wd)`` before the moment update (torch order).
    """
    g = grad * grad_scale
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    param = param * (1 - lr * weight_decay)
    exp_avg = beta1 * exp_avg + (1 - beta1) * g
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
    denom = exp_avg_sq.sqrt() / math.sqrt(bc2) + eps if not torch.is_tensor(bc2) else exp_avg_sq.sqrt() / bc2.sqrt() + eps
    param = param - (lr / bc1) * exp_avg / denom
    return param, exp_avg, exp_avg_sq


@dataclass
class CompactBucket:
    """Parameters of one device and dtype with their compact optimizer state (``S = table.state_numel``).

    exp_avg / exp_avg_sq: fp32 ``[S]``, or uint8 codes ``[S]`` with absmax_m / absmax_v fp32 ``[S/256]``
    (state_bits=8). master: fp32 ``[S]`` or None. compact_grad: fp32 ``[S]`` or None (dense ``.grad`` used).
    """

    params: list[torch.Tensor]
    table: SegmentTable
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    master: torch.Tensor | None = None
    compact_grad: torch.Tensor | None = None
    absmax_m: torch.Tensor | None = None
    absmax_v: torch.Tensor | None = None
    qmap_m: torch.Tensor | None = None
    qmap_v: torch.Tensor | None = None
    mids_m: torch.Tensor | None = None
    mids_v: torch.Tensor | None = None
    _addr: torch.Tensor | None = field(default=None, repr=False)
    _addr_key: tuple = field(default=(), repr=False)
    _layout: tuple = field(default=(), repr=False)  # (dtype, device, shapes) the table was built for

    @classmethod
    def create(cls, params: list[torch.Tensor], table: SegmentTable, *, state_bits: int = 32,
               master_weights: bool = False, compact_grads: bool = False) -> CompactBucket:
        """Zero state for ``params`` laid out by ``table`` (moved to the params' device)."""
        device = params[0].device
        table.to(device)
        n = table.state_numel
        fp32 = dict(dtype=torch.float32, device=device)
        kw: dict = {}
        if state_bits == 8:
            if n % quantize8.QBLOCK:
                raise ValueError(f"8-bit state needs a table aligned to {quantize8.QBLOCK}; build it with align=256")
            for name, signed in (("m", True), ("v", False)):
                qmap = quantize8.dynamic_map(signed, device)
                kw[f"qmap_{name}"], kw[f"mids_{name}"] = qmap, quantize8.midpoints(qmap)
                kw[f"absmax_{name}"] = torch.zeros(n // quantize8.QBLOCK, **fp32)
            exp_avg = torch.full((n,), quantize8.code_of_zero(kw["qmap_m"]), dtype=torch.uint8, device=device)
            exp_avg_sq = torch.full((n,), quantize8.code_of_zero(kw["qmap_v"]), dtype=torch.uint8, device=device)
        elif state_bits == 32:
            exp_avg, exp_avg_sq = torch.zeros(n, **fp32), torch.zeros(n, **fp32)
        else:
            raise ValueError(f"state_bits must be 32 or 8; got {state_bits}")
        return cls(list(params), table, exp_avg, exp_avg_sq,
                   master=torch.zeros(n, **fp32) if master_weights else None,
                   compact_grad=torch.zeros(n, **fp32) if compact_grads else None, **kw)

    def __post_init__(self) -> None:
        self._layout = (self.params[0].dtype, self.params[0].device, tuple(torch.Size(s.shape) for s in self.table.slots))

    @property
    def state_bits(self) -> int:
        return 8 if self.exp_avg.dtype == torch.uint8 else 32

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The persistent state buffers (moments, absmax, master), by name."""
        names = ("exp_avg", "exp_avg_sq", "absmax_m", "absmax_v", "master")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def state_bytes(self) -> int:
        """Bytes of persistent optimizer state (moments, absmax, master; not the gradient buffer)."""
        return sum(t.numel() * t.element_size() for t in self.state_tensors().values())

    def check_params(self, slots: range | list[int] | tuple[int, ...] | None = None) -> None:
        """Raise ``RuntimeError`` when a parameter no longer has the shape, dtype, device or dense layout its
        segment table was built for (e.g. ``p.data`` was replaced after the optimizer was built).

        The kernels address parameters through the table's flat offsets, so a smaller tensor would be written
        past its end. Host metadata only, no device sync: about 0.4 µs per parameter per step on a CPU host.
        """
        dtype, device, shapes = self._layout
        for slot in range(len(self.params)) if slots is None else slots:
            p = self.params[slot]
            if p.shape != shapes[slot] or p.dtype != dtype or p.device != device or not p.is_contiguous():
                raise RuntimeError(_moved_param_message(self.table.slots[slot].name, p, shapes[slot], dtype, device))

    def address_table(self, grads: list[torch.Tensor | None]) -> torch.Tensor:
        """int64 ``[n_slots, 2]`` (param address, grad address or 0) on the device; rebuilt only when one moves."""
        key = tuple(p.data_ptr() for p in self.params) + tuple(0 if g is None else g.data_ptr() for g in grads)
        if key != self._addr_key:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "parameter or gradient addresses changed during CUDA-graph capture; run one eager step "
                    "with the same gradient buffers before capturing"
                )
            n = len(self.params)
            host = torch.tensor([key[i] if j == 0 else key[n + i] for i in range(n) for j in (0, 1)],
                                dtype=torch.int64).reshape(n, 2)
            if self.device.type == "cuda":
                host = host.pin_memory()
            self._addr, self._addr_key = host.to(self.device, non_blocking=True), key
        return self._addr


def _moved_param_message(name: str, p: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device) -> str:
    layout = "" if p.is_contiguous() else " non-contiguous"
    return (
        f"parameter {name!r} is now a{layout} {p.dtype} {tuple(p.shape)} tensor on {p.device}, but this MaskedAdamW "
        f"was built for a contiguous {dtype} {tuple(shape)} on {device} (was its .data replaced or resized?); "
        "build a new MaskedAdamW over the parameters as they are now (with a mask of their shapes), or "
        "restore the original tensors"
    )


def check_grads(bucket: CompactBucket, grads: list[torch.Tensor | None]) -> None:
    """Raise ``ValueError`` when a gradient's shape, dtype, device or layout does not match its parameter."""
    for slot, (p, g) in enumerate(zip(bucket.params, grads)):
        if g is None:
            continue
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or not g.is_contiguous():
            name = bucket.table.slots[slot].name
            raise ValueError(
                f"gradient of {name!r} is {g.dtype} {tuple(g.shape)} on {g.device}"
                f"{'' if g.is_contiguous() else ' (non-contiguous)'}; expected a contiguous {p.dtype} "
                f"{tuple(p.shape)} on {p.device} like the parameter"
            )


# ------------------------------------------------------------------------------------------ torch backend
class TorchBackend:
    """The reference backend: per parameter, gather the active elements, apply the reference, scatter back."""

    name = "torch"

    def grad_sumsq(self, bucket: CompactBucket, grads: list[torch.Tensor | None], partial: torch.Tensor) -> None:
        total = partial.new_zeros(())
        for slot in range(len(bucket.params)):
            g = self._grad(bucket, grads, slot)
            total = total + (g * g).sum()
        partial.zero_()
        if partial.numel():
            partial[0] = total

    def scalars(self, hyper: torch.Tensor, step: torch.Tensor, partial: torch.Tensor, coef: torch.Tensor,
                control: torch.Tensor, has_stats: bool, check_finite: bool) -> None:
        total = partial.sum() if has_stats else partial.new_zeros(())
        norm = total.sqrt()
        skip = (~torch.isfinite(total)).float() if check_finite else total.new_zeros(())
        max_norm = hyper[0, H_MAX_NORM].float()
        clip = torch.where(max_norm > 0, torch.clamp(max_norm / (norm + 1e-6), max=1.0), torch.ones_like(norm))
        control.copy_(torch.stack([skip, clip if has_stats else torch.ones_like(clip), norm, total.new_zeros(())]))
        t = step + 1
        bc1 = 1 - hyper[:, H_BETA1] ** t
        bc2 = 1 - hyper[:, H_BETA2] ** t
        coef.zero_()
        coef[:, C_BETA1], coef[:, C_BETA2], coef[:, C_EPS] = hyper[:, H_BETA1], hyper[:, H_BETA2], hyper[:, H_EPS]
        coef[:, C_DECAY] = 1 - hyper[:, H_LR] * hyper[:, H_WD]
        coef[:, C_STEP_SIZE] = hyper[:, H_LR] / bc1
        coef[:, C_INV_SQRT_BC2] = 1 / bc2.sqrt()
        # 1 - beta in fp64: fp32(0.999) is off by 1e-8, which is 1.3e-5 of 1 - 0.999.
        coef[:, C_ONE_MINUS_BETA1], coef[:, C_ONE_MINUS_BETA2] = 1 - hyper[:, H_BETA1], 1 - hyper[:, H_BETA2]
        step.add_(1 - skip.double())

    def update(self, bucket: CompactBucket, grads: list[torch.Tensor | None], coef: torch.Tensor,
               control: torch.Tensor) -> None:
        keep = control[K_SKIP] != 0
        for slot, param in enumerate(bucket.params):
            info = bucket.table.slots[slot]
            flat, state = bucket.table.indices(slot, param.device)
            c = coef[info.group]
            g = self._grad(bucket, grads, slot) * control[K_CLIP]
            p_flat = param.view(-1)
            p_old = bucket.master[state] if bucket.master is not None else p_flat[flat].float()
            if bucket.state_bits == 8:
                lo, hi = info.state_begin, info.state_end
                qb = quantize8.QBLOCK
                m_range = quantize8.dequantize_blockwise(bucket.exp_avg[lo:hi], bucket.absmax_m[lo // qb : hi // qb], bucket.qmap_m)
                v_range = quantize8.dequantize_blockwise(bucket.exp_avg_sq[lo:hi], bucket.absmax_v[lo // qb : hi // qb], bucket.qmap_v)
                m_old, v_old = m_range[state - lo], v_range[state - lo]
            else:
                m_old, v_old = bucket.exp_avg[state], bucket.exp_avg_sq[state]
            p = p_old * c[C_DECAY]
            m = c[C_BETA1] * m_old + c[C_ONE_MINUS_BETA1] * g
            v = c[C_BETA2] * v_old + c[C_ONE_MINUS_BETA2] * g * g
            p = p - c[C_STEP_SIZE] * (m / (v.sqrt() * c[C_INV_SQRT_BC2] + c[C_EPS]))
            p, m, v = (torch.where(keep, old, new) for old, new in ((p_old, p), (m_old, m), (v_old, v)))
            if bucket.state_bits == 8:
                m_range, v_range = torch.zeros_like(m_range), torch.zeros_like(v_range)
                m_range[state - lo], v_range[state - lo] = m, v
                for codes, absmax, values, qmap in ((bucket.exp_avg, bucket.absmax_m, m_range, bucket.qmap_m),
                                                    (bucket.exp_avg_sq, bucket.absmax_v, v_range, bucket.qmap_v)):
                    new_codes, new_absmax = quantize8.quantize_blockwise(values, qmap)
                    codes[lo:hi] = torch.where(keep, codes[lo:hi], new_codes)
                    absmax[lo // qb : hi // qb] = torch.where(keep, absmax[lo // qb : hi // qb], new_absmax)
            else:
                bucket.exp_avg[state], bucket.exp_avg_sq[state] = m, v
            if bucket.master is not None:
                bucket.master[state] = p
            p_flat.index_copy_(0, flat, torch.where(keep, p_flat[flat], p.to(param.dtype)))

    def gather(self, bucket: CompactBucket, slot: int, source: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        flat, state = bucket.table.indices(slot, source.device)
        values = source.reshape(-1)[flat].float()
        if accumulate:
            values = values + out[state]
        out[state] = values

    @staticmethod
    def _grad(bucket: CompactBucket, grads: list[torch.Tensor | None], slot: int) -> torch.Tensor:
        flat, state = bucket.table.indices(slot, bucket.device)
        if bucket.compact_grad is not None:
            return bucket.compact_grad[state]
        g = grads[slot]
        if g is None:
            return torch.zeros(flat.numel(), dtype=torch.float32, device=bucket.device)
        return g.reshape(-1)[flat].float()


# ----------------------------------------------------------------------------------------- triton backend
class TritonBackend:
    """kernels/masked_adamw.py and kernels/masked_adamw8bit.py."""

    name = "triton"

    def __init__(self) -> None:
        from mu_fast.kernels import masked_adamw as k32
        from mu_fast.kernels import masked_adamw8bit as k8

        self.k32, self.k8 = k32, k8

    def grad_sumsq(self, bucket: CompactBucket, grads: list[torch.Tensor | None], partial: torch.Tensor) -> None:
        t = bucket.table
        self.k32.grad_sumsq_triton(t.tiles, _index(t), bucket.address_table(grads), bucket.compact_grad,
                                   bucket.params[0], partial, t.tile)

    def scalars(self, hyper, step, partial, coef, control, has_stats, check_finite) -> None:
        self.k32.adamw_scalars_triton(hyper, step, partial, coef, control, has_stats, check_finite)

    def update(self, bucket: CompactBucket, grads: list[torch.Tensor | None], coef: torch.Tensor,
               control: torch.Tensor) -> None:
        t, b = bucket.table, bucket
        addr = b.address_table(grads)
        if b.state_bits == 8:
            self.k8.masked_adamw8bit_update_triton(t.tiles, _index(t), addr, b.compact_grad, b.params[0], b.exp_avg,
                                                   b.exp_avg_sq, b.absmax_m, b.absmax_v, b.qmap_m, b.qmap_v, b.mids_m,
                                                   b.mids_v, b.master, coef, control, t.tile)
        else:
            self.k32.masked_adamw_update_triton(t.tiles, _index(t), addr, b.compact_grad, b.params[0], b.exp_avg,
                                                b.exp_avg_sq, b.master, coef, control, t.tile)

    def gather(self, bucket: CompactBucket, slot: int, source: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        t, info = bucket.table, bucket.table.slots[slot]
        self.k32.gather_grad_triton(t.tiles, _index(t), source, out, info.tile_begin, info.tile_end, t.tile, accumulate)


# ------------------------------------------------------------------------------------ C++ / CUDA backends
class ExtBackend:
    """The ops of the compiled extension ``mu_fast._C`` (csrc/), for CPU or CUDA tensors."""

    def __init__(self, name: str) -> None:
        from mu_fast.optim import _ext_ops  # noqa: F401  (registers the fake implementations)

        self.name = name
        self.ops = torch.ops.mu_fast

    def grad_sumsq(self, bucket: CompactBucket, grads: list[torch.Tensor | None], partial: torch.Tensor) -> None:
        t = bucket.table
        self.ops.masked_adamw_grad_sumsq(_grads_arg(bucket, grads), bucket.compact_grad, t.tiles, _index(t), partial)

    def scalars(self, hyper, step, partial, coef, control, has_stats, check_finite) -> None:
        self.ops.masked_adamw_scalars(hyper, step, partial, coef, control, has_stats, check_finite)

    def update(self, bucket: CompactBucket, grads: list[torch.Tensor | None], coef: torch.Tensor,
               control: torch.Tensor) -> None:
        t, b = bucket.table, bucket
        if b.state_bits == 8:
            self.ops.masked_adamw8bit_update(b.params, _grads_arg(b, grads), b.compact_grad, t.tiles, _index(t),
                                             b.exp_avg, b.exp_avg_sq, b.absmax_m, b.absmax_v, b.qmap_m, b.qmap_v,
                                             b.mids_m, b.mids_v, b.master, coef, control)
        else:
            self.ops.masked_adamw_update(b.params, _grads_arg(b, grads), b.compact_grad, t.tiles, _index(t),
                                         b.exp_avg, b.exp_avg_sq, b.master, coef, control)

    def gather(self, bucket: CompactBucket, slot: int, source: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        t, info = bucket.table, bucket.table.slots[slot]
        self.ops.masked_gather_grad(source, t.tiles, _index(t), info.tile_begin, info.tile_end, out, accumulate)


def _index(table: SegmentTable) -> torch.Tensor:
    """The table's int32 index array, or a 1-element dummy (kernels need a valid pointer)."""
    if table.index.numel() == 0:
        table.index = torch.zeros(1, dtype=torch.int32, device=table.tiles.device)
    return table.index


def _grads_arg(bucket: CompactBucket, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [] if bucket.compact_grad is not None else list(grads)


# ---------------------------------------------------------------------------------------------- dispatch
_INSTANCES: dict[str, object] = {}


def backend_availability(device: torch.device | str) -> dict[str, str]:
    """For each backend name: "available" or why it cannot run on ``device``."""
    from mu_fast._ext import REBUILD_HINT, extension_has_cuda, load_extension, triton_status

    device = torch.device(device)
    module, why_ext = load_extension()
    ok_triton, why_triton = triton_status()
    on_cuda = device.type == "cuda"
    report = {"torch": "available"}
    if not ok_triton:
        report["triton"] = why_triton
    elif on_cuda == ("interpreter" in why_triton):
        report["triton"] = f"triton runs {why_triton}, which does not match {device.type} tensors"
    else:
        report["triton"] = "available"
    if module is None:
        report["cpu"] = report["cuda"] = why_ext
    else:
        report["cpu"] = "available" if not on_cuda else f"the cpu backend needs CPU tensors; got {device}"
        if not on_cuda:
            report["cuda"] = f"the cuda backend needs CUDA tensors; got {device}"
        elif not extension_has_cuda():
            report["cuda"] = f"mu_fast._C was built without CUDA; {REBUILD_HINT} with nvcc and a CUDA torch"
        else:
            report["cuda"] = "available"
    return report


def select_backend(device: torch.device | str, backend: str = "auto"):
    """The backend object for tensors on ``device``: the requested one (error if unavailable) or the best one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    report = backend_availability(device)
    if backend == "auto":
        order = ("cuda", "triton", "torch") if torch.device(device).type == "cuda" else ("cpu", "torch")
        backend = next(name for name in order if report[name] == "available")
    elif report[backend] != "available":
        raise RuntimeError(f"masked AdamW backend {backend!r} is unavailable: {report[backend]}")
    if backend not in _INSTANCES:
        _INSTANCES[backend] = {"torch": TorchBackend, "triton": TritonBackend}.get(backend, ExtBackend)(
            *(() if backend in ("torch", "triton") else (backend,))
        )
    return _INSTANCES[backend]


@torch.no_grad()
def masked_adamw_step(
    bucket: CompactBucket,
    grads: list[torch.Tensor | None] | None,
    hyper: torch.Tensor,
    step: torch.Tensor,
    *,
    max_grad_norm: float | None = None,
    nonfinite: str = "skip",
    backend: str = "auto",
) -> torch.Tensor:
    """One masked AdamW step over a bucket, functional form of ``MaskedAdamW.step`` (no host sync).

    grads: one dense gradient (or None) per parameter of ``bucket``, or None with ``bucket.compact_grad``.
    hyper: fp64 ``[G, 6]`` per param group (lr, beta1, beta2, eps, weight_decay, unused), on the bucket's device;
    its last column is overwritten with ``max_grad_norm``. step: fp64 ``[1]`` steps taken so far (advanced in
    place unless skipped). max_grad_norm: clip the active gradients to this global norm (None: no clipping).
    nonfinite: "skip" (a non-finite active gradient makes the step a no-op, decided on device) or "ignore".
    Returns the control vector fp32 ``[4]``: (skipped, clip factor, active-gradient norm, 0).
    """
    if nonfinite not in ("skip", "ignore"):
        raise ValueError(f"nonfinite must be 'skip' or 'ignore' here (the optimizer adds 'raise'); got {nonfinite!r}")
    impl = select_backend(bucket.device, backend)
    bucket.check_params()
    grads = list(grads) if grads is not None else [None] * len(bucket.params)
    if bucket.compact_grad is None:
        check_grads(bucket, grads)
    hyper[:, H_MAX_NORM] = float(max_grad_norm) if max_grad_norm is not None else 0.0
    has_stats = nonfinite == "skip" or max_grad_norm is not None
    partial = torch.zeros(max(bucket.table.n_tiles, 1), dtype=torch.float32, device=bucket.device)
    if has_stats:
        impl.grad_sumsq(bucket, grads, partial)
    coef = torch.zeros(hyper.shape[0], COEF_FIELDS, dtype=torch.float32, device=bucket.device)
    control = torch.zeros(CONTROL_FIELDS, dtype=torch.float32, device=bucket.device)
    impl.scalars(hyper, step, partial, coef, control, has_stats, nonfinite == "skip")
    impl.update(bucket, grads, coef, control)
    return control

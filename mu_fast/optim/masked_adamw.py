"""Masked AdamW: the plain-PyTorch reference, the table layouts, the compact state of one bucket, the functional step.

Semantics (every backend): dense AdamW restricted to the active set. Every active element of a parameter that has
a gradient gets the AdamW update, also where that gradient is zero: this is not lazy Adam. A parameter without a
gradient is skipped as torch's AdamW skips it (no moment decay, no weight decay, no write; its own step count
does not advance), unless the caller marks it present (``missing_grad="zero"``: a missing gradient counts as
zero). Step counts and bias corrections are per parameter, as in torch. Weight decay is decoupled and applied
to active elements only. Inactive elements are never read-modify-written: they stay bit-identical whatever the
gradient holds, NaN included. All arithmetic is fp32 (hyperparameters and bias corrections fp64), the moments
are fp32 or 8-bit block-quantized, and an optional fp32 master copy keeps small updates of bf16 parameters.

Backends (mu_fast/optim/backends.py: torch, triton, cpu, cuda), one method each (``grad_sumsq``, ``scalars``,
``update``, ``gather``) over the same segment table (mu_fast/optim/segments.py). ``grad_sumsq`` sums squares in
fp64, so a finite gradient never overflows the statistic that decides the non-finite skip (an fp32 sum overflows
at |g| ≈ 1.8e19). ``scalars`` writes one coefficient row per parameter slot (its group's hyperparameters, its own
bias corrections, the gradient scale = clip factor × −1 for ``maximize``, and whether it is updated at all);
``update`` reads the row of each tile's slot. ``masked_adamw_reference`` is the same formula on compact vectors,
readable and usable in fp64: the tests' oracle. On the CPU (``cpu`` backend), dense gradients of scattered (single
column or element) selections are gathered once per step by the statistics pass into a compact fp32 buffer
(``CompactBucket.gathered_grad``, 4 B per active element, not counted in ``state_bytes``) that the update reads, so
the scattered gradient is read once instead of twice; the result is bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mu_fast.optim import quantize8
from mu_fast.optim.segments import SegmentTable

BACKENDS = ("auto", "torch", "triton", "cpu", "cuda")
# Column layouts shared with the kernels (kernels/masked_adamw.py, csrc/masked_adamw_common.h). hyper: per param
# group; coef: per parameter slot; control: (skipped this step, clip factor, active-gradient norm, steps skipped
# so far: accumulated by every scalars call, never reset there).
H_LR, H_BETA1, H_BETA2, H_EPS, H_WD, H_MAX_NORM, H_GRAD_SIGN = range(7)
HYPER_FIELDS = 7
(C_BETA1, C_BETA2, C_EPS, C_DECAY, C_STEP_SIZE, C_INV_SQRT_BC2, C_ONE_MINUS_BETA1, C_ONE_MINUS_BETA2, C_GRAD_SCALE,
 C_APPLY) = range(10)
COEF_FIELDS = 10
K_SKIP, K_CLIP, K_NORM, K_SKIPPED = range(4)
CONTROL_FIELDS = 4
FP64_MAX = torch.finfo(torch.float64).max


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
    grad_seen: one byte per parameter, set when a backend's ``gather`` accumulates a gradient into
    ``compact_grad`` (cleared by the owner, e.g. ``MaskedAdamW.zero_grad``): with compact gradients, ``.grad`` is
    always None, and this says which parameters had a gradient since the buffer was last zeroed.
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
    grad_seen: bytearray = field(default_factory=bytearray, repr=False)
    # CPU backend only: this step's active gradients gathered once by the statistics pass, read again by the update
    # (backends.ExtBackend); ``gathered_ready`` says the update may use them (set by the pass, cleared by the update).
    gathered_grad: torch.Tensor | None = field(default=None, repr=False)
    gathered_ready: bool = field(default=False, repr=False)
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
        # float64 parameters keep float64 moments (the torch backend's reference arithmetic in float64); every other
        # dtype keeps float32 moments (or 8-bit codes).
        full = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        fp32 = dict(dtype=full, device=device)
        kw: dict = {}
        if state_bits == 8 and full == torch.float64:
            raise ValueError("8-bit optimizer state is for bf16 / fp16 / fp32 parameters; float64 parameters keep "
                             "float64 state: use state_bits=32")
        if state_bits == 8:
            if n % quantize8.QBLOCK:
                raise ValueError(f"8-bit state needs a table aligned to {quantize8.QBLOCK}; build it with align=256")
            for name, signed in (("m", True), ("v", False)):
                qmap = quantize8.dynamic_map(signed, device)
                kw[f"qmap_{name}"], kw[f"mids_{name}"] = qmap, quantize8.midpoints(qmap)
                kw[f"absmax_{name}"] = torch.zeros(n // quantize8.QBLOCK, dtype=torch.float32, device=device)
            exp_avg = torch.full((n,), quantize8.code_of_zero(kw["qmap_m"]), dtype=torch.uint8, device=device)
            exp_avg_sq = torch.full((n,), quantize8.code_of_zero(kw["qmap_v"]), dtype=torch.uint8, device=device)
        elif state_bits == 32:
            exp_avg, exp_avg_sq = torch.zeros(n, **fp32), torch.zeros(n, **fp32)
        else:
            raise ValueError(f"state_bits must be 32 or 8; got {state_bits}")
        return cls(list(params), table, exp_avg, exp_avg_sq,
                   master=torch.zeros(n, **fp32) if master_weights else None,
                   compact_grad=torch.zeros(n, **fp32) if compact_grads else None,
                   grad_seen=bytearray(len(params)), **kw)

    def slot_groups(self) -> list[int]:
        """The param-group index of each slot, in slot order."""
        return [info.group for info in self.table.slots]

    def __post_init__(self) -> None:
        self._layout = (self.params[0].dtype, self.params[0].device, tuple(torch.Size(s.shape) for s in self.table.slots))

    @property
    def state_bits(self) -> int:
        return 8 if self.exp_avg.dtype == torch.uint8 else 32

    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of the dequantized moments and of the update's arithmetic: float64 for float64 parameters,
        float32 otherwise."""
        return torch.float64 if self.params[0].dtype == torch.float64 else torch.float32

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


def check_grads(bucket: CompactBucket, grads: list[torch.Tensor | None]) -> bool:
    """Raise ``ValueError`` when a gradient's shape, dtype, device or layout does not match its parameter;
    return whether every parameter has a gradient (one pass: this runs every step)."""
    complete = True
    for slot, (p, g) in enumerate(zip(bucket.params, grads)):
        if g is None:
            complete = False
        elif g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or not g.is_contiguous():
            check_grad(bucket, slot, g)
    return complete


def check_grad(bucket: CompactBucket, slot: int, g: torch.Tensor) -> None:
    """``check_grads`` for the gradient ``g`` of one slot."""
    p = bucket.params[slot]
    if g.shape == p.shape and g.dtype == p.dtype and g.device == p.device and g.is_contiguous():
        return
    name = bucket.table.slots[slot].name
    if g.layout != torch.strided:
        raise ValueError(
            f"gradient of {name!r} is sparse ({g.layout}); MaskedAdamW needs dense gradients: build the module "
            "that makes it with sparse=False (e.g. torch.nn.Embedding(..., sparse=False)), or densify it "
            "(p.grad = p.grad.to_dense()) before step()"
        )
    raise ValueError(
        f"gradient of {name!r} is {g.dtype} {tuple(g.shape)} on {g.device}"
        f"{'' if g.is_contiguous() else ' (non-contiguous)'}; expected a contiguous {p.dtype} "
        f"{tuple(p.shape)} on {p.device} like the parameter"
    )


def to_device(values: list[float] | list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a tensor on ``device``, copied without a host sync (pinned memory on CUDA)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@torch.no_grad()
def masked_adamw_step(
    bucket: CompactBucket,
    grads: list[torch.Tensor | None] | None,
    hyper: torch.Tensor,
    step: torch.Tensor,
    *,
    max_grad_norm: float | None = None,
    nonfinite: str = "skip",
    missing_grad: str = "skip",
    backend: str = "auto",
) -> torch.Tensor:
    """One masked AdamW step over a bucket, functional form of ``MaskedAdamW.step`` (no host sync).

    grads: one dense gradient (or None) per parameter of ``bucket``, or None with ``bucket.compact_grad`` (then
    ``bucket.grad_seen`` says which parameters have a gradient). hyper: fp64 ``[G, HYPER_FIELDS]`` per param group
    (lr, beta1, beta2, eps, weight_decay, max_grad_norm, grad sign: 1, or -1 to maximize), on the bucket's device;
    its max_grad_norm column is overwritten. step: fp64 ``[n_params]`` steps taken per parameter (advanced in
    place for each parameter updated). max_grad_norm: clip the active gradients to this global norm (None: no
    clipping). nonfinite: "skip" (a non-finite active gradient makes the step a no-op, decided on device) or
    "ignore". missing_grad: "skip" (a parameter without a gradient is left untouched) or "zero" (it counts as a
    zero gradient). Returns the control vector fp32 ``[4]``: (skipped, clip factor, active-gradient norm, skipped).
    """
    if nonfinite not in ("skip", "ignore"):
        raise ValueError(f"nonfinite must be 'skip' or 'ignore' here (the optimizer adds 'raise'); got {nonfinite!r}")
    if missing_grad not in ("skip", "zero"):
        raise ValueError(f"missing_grad must be 'skip' or 'zero'; got {missing_grad!r}")
    n = len(bucket.params)
    if step.dtype != torch.float64 or step.numel() != n:
        raise ValueError(f"step must hold one float64 step count per parameter ({n}); got {step.dtype} {tuple(step.shape)}")
    from mu_fast.optim.backends import select_backend

    impl = select_backend(bucket.device, backend)
    bucket.check_params()
    grads = list(grads) if grads is not None else [None] * n
    if bucket.compact_grad is None:
        check_grads(bucket, grads)
        present = [float(g is not None) for g in grads]
    else:
        present = [float(b) for b in bucket.grad_seen]
    if missing_grad == "zero":
        present = [1.0] * n
    device = bucket.device
    hyper[:, H_MAX_NORM] = float(max_grad_norm) if max_grad_norm is not None else 0.0
    has_stats = nonfinite == "skip" or max_grad_norm is not None
    partial = torch.zeros(max(bucket.table.n_tiles, 1), dtype=torch.float64, device=device)
    if has_stats:
        impl.grad_sumsq(bucket, grads, partial)
    coef = torch.zeros(n, COEF_FIELDS, dtype=torch.float32, device=device)
    control = torch.zeros(CONTROL_FIELDS, dtype=torch.float32, device=device)
    impl.scalars(hyper, to_device(bucket.slot_groups(), torch.int64, device), step.view(-1),
                 to_device(present, torch.float32, device), partial, coef, control, has_stats, nonfinite == "skip")
    impl.update(bucket, grads, coef)
    return control

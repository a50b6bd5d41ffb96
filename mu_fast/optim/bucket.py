"""The table layouts every masked AdamW backend and kernel shares, and ``CompactBucket``: the compact optimizer state
of one bucket of parameters (one device and dtype).

The layouts are the columns of the per-group ``hyper`` rows (``H_*``), the per-slot ``coef`` rows (``C_*``) and the
``control`` vector (``K_*``), as kernels/masked_adamw.py and csrc/masked_adamw_common.h read them. The step itself and
its semantics are in ``mu_fast.optim.masked_adamw`` (which re-exports all of this), the backends in
``mu_fast.optim.backends``; both import this module, which imports neither.
"""

from __future__ import annotations

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

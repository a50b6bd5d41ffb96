"""The masked AdamW backends: each implements ``grad_sumsq``, ``scalars``, ``update`` and ``gather`` over a
``CompactBucket`` (semantics: mu_fast/optim/masked_adamw.py; table layouts: mu_fast/optim/bucket.py), and
``select_backend`` picks one.

* ``torch``: plain PyTorch over the same table (gather the active elements, the fp32 update, scatter back);
  runs anywhere, slow: the reference the kernels are checked against, and the one backend for float64 parameters
  (float64 moments and update).
* ``triton``: kernels/masked_adamw.py and kernels/masked_adamw8bit.py (GPU, or CPU under TRITON_INTERPRET=1).
* ``cpu`` / ``cuda``: the C++ ops of ``mu_fast._C`` (csrc/).
``backend="auto"`` picks cuda, then triton, then torch for CUDA tensors, and cpu, then torch for CPU tensors.
"""

from __future__ import annotations

import torch

from mu_fast.optim import quantize8
from mu_fast.optim.bucket import (
    BACKENDS,
    C_APPLY,
    C_BETA1,
    C_BETA2,
    C_DECAY,
    C_EPS,
    C_GRAD_SCALE,
    C_INV_SQRT_BC2,
    C_ONE_MINUS_BETA1,
    C_ONE_MINUS_BETA2,
    C_STEP_SIZE,
    FP64_MAX,
    H_BETA1,
    H_BETA2,
    H_EPS,
    H_GRAD_SIGN,
    H_LR,
    H_MAX_NORM,
    H_WD,
    K_CLIP,
    K_NORM,
    K_SKIP,
    K_SKIPPED,
    CompactBucket,
)
from mu_fast.optim.segments import SegmentTable


# ------------------------------------------------------------------------------------------ torch backend
class TorchBackend:
    """The reference backend: per parameter, gather the active elements, apply the reference, scatter back."""

    name = "torch"

    def grad_sumsq(self, bucket: CompactBucket, grads: list[torch.Tensor | None], partial: torch.Tensor) -> None:
        total = partial.new_zeros(())
        for slot in range(len(bucket.params)):
            g = self._grad(bucket, grads, slot).double()
            total = total + (g * g).sum()
        partial.zero_()
        if partial.numel():
            partial[0] = total

    def scalars(self, hyper: torch.Tensor, slot_group: torch.Tensor, slot_step: torch.Tensor, present: torch.Tensor,
                partial: torch.Tensor, coef: torch.Tensor, control: torch.Tensor, has_stats: bool,
                check_finite: bool) -> None:
        total = partial.sum() if has_stats else partial.new_zeros(())
        norm = total.sqrt()
        skip = (~(total <= FP64_MAX)).float() if check_finite else control.new_zeros(())
        max_norm = hyper[0, H_MAX_NORM]
        clip = torch.where(max_norm > 0, torch.clamp(max_norm / (norm + 1e-6), max=1.0), torch.ones_like(norm))
        clip = clip if has_stats else torch.ones_like(clip)
        control[K_SKIPPED] += skip
        control[K_SKIP], control[K_CLIP], control[K_NORM] = skip, clip.float(), norm.float()
        h = hyper[slot_group]
        t = slot_step + 1
        bc1 = 1 - h[:, H_BETA1] ** t
        bc2 = 1 - h[:, H_BETA2] ** t
        apply = present * (1 - skip)
        coef.zero_()
        coef[:, C_BETA1], coef[:, C_BETA2], coef[:, C_EPS] = h[:, H_BETA1], h[:, H_BETA2], h[:, H_EPS]
        coef[:, C_DECAY] = 1 - h[:, H_LR] * h[:, H_WD]
        coef[:, C_STEP_SIZE] = h[:, H_LR] / bc1
        coef[:, C_INV_SQRT_BC2] = 1 / bc2.sqrt()
        # 1 - beta in fp64: fp32(0.999) is off by 1e-8, which is 1.3e-5 of 1 - 0.999.
        coef[:, C_ONE_MINUS_BETA1], coef[:, C_ONE_MINUS_BETA2] = 1 - h[:, H_BETA1], 1 - h[:, H_BETA2]
        coef[:, C_GRAD_SCALE] = clip * h[:, H_GRAD_SIGN]
        coef[:, C_APPLY] = apply
        slot_step.add_(apply.double())

    def update(self, bucket: CompactBucket, grads: list[torch.Tensor | None], coef: torch.Tensor) -> None:
        for slot, param in enumerate(bucket.params):
            info = bucket.table.slots[slot]
            flat, state = bucket.table.indices(slot, param.device)
            c = coef[slot]
            keep = c[C_APPLY] == 0  # no gradient, or a skipped step: every value keeps its old bits
            g = self._grad(bucket, grads, slot) * c[C_GRAD_SCALE]
            p_flat = param.view(-1)
            p_old = bucket.master[state] if bucket.master is not None else p_flat[flat].to(bucket.state_dtype)
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
        values = source.reshape(-1)[flat].to(out.dtype)
        if accumulate:
            values = values + out[state]
        out[state] = values
        _mark_seen(bucket, slot, out)

    @staticmethod
    def _grad(bucket: CompactBucket, grads: list[torch.Tensor | None], slot: int) -> torch.Tensor:
        flat, state = bucket.table.indices(slot, bucket.device)
        if bucket.compact_grad is not None:
            return bucket.compact_grad[state]
        g = grads[slot]
        if g is None:
            return torch.zeros(flat.numel(), dtype=bucket.state_dtype, device=bucket.device)
        return g.reshape(-1)[flat].to(bucket.state_dtype)


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

    def scalars(self, hyper, slot_group, slot_step, present, partial, coef, control, has_stats, check_finite) -> None:
        self.k32.adamw_scalars_triton(hyper, slot_group, slot_step, present, partial, coef, control, has_stats,
                                      check_finite)

    def update(self, bucket: CompactBucket, grads: list[torch.Tensor | None], coef: torch.Tensor) -> None:
        t, b = bucket.table, bucket
        addr = b.address_table(grads)
        if b.state_bits == 8:
            self.k8.masked_adamw8bit_update_triton(t.tiles, _index(t), addr, b.compact_grad, b.params[0], b.exp_avg,
                                                   b.exp_avg_sq, b.absmax_m, b.absmax_v, b.qmap_m, b.qmap_v, b.mids_m,
                                                   b.mids_v, b.master, coef, t.tile)
        else:
            self.k32.masked_adamw_update_triton(t.tiles, _index(t), addr, b.compact_grad, b.params[0], b.exp_avg,
                                                b.exp_avg_sq, b.master, coef, t.tile)

    def gather(self, bucket: CompactBucket, slot: int, source: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        t, info = bucket.table, bucket.table.slots[slot]
        self.k32.gather_grad_triton(t.tiles, _index(t), source, out, info.tile_begin, info.tile_end, t.tile, accumulate)
        _mark_seen(bucket, slot, out)


# ------------------------------------------------------------------------------------ C++ / CUDA backends
class ExtBackend:
    """The ops of the compiled extension ``mu_fast._C`` (csrc/), for CPU or CUDA tensors."""

    def __init__(self, name: str) -> None:
        from mu_fast.optim import _ext_ops  # noqa: F401  (registers the fake implementations)

        self.name = name
        self.ops = torch.ops.mu_fast

    def grad_sumsq(self, bucket: CompactBucket, grads: list[torch.Tensor | None], partial: torch.Tensor) -> None:
        t = bucket.table
        if self._gathers_once(bucket):
            self._gather_grads(bucket, grads)
            self.ops.masked_adamw_grad_sumsq([], bucket.gathered_grad, t.tiles, _index(t), partial)
            return
        self.ops.masked_adamw_grad_sumsq(_grads_arg(bucket, grads), bucket.compact_grad, t.tiles, _index(t), partial)

    def _gathers_once(self, bucket: CompactBucket) -> bool:
        """On the CPU, dense gradients of a table with scattered (column or element) tiles are gathered once into a
        compact fp32 buffer (4 B per active element) that the statistics pass and the update both read, instead of
        gathering them in each pass: about 1.3x faster for 5% single columns (benchmarks/notes_optim_cpu.md)."""
        return self.name == "cpu" and bucket.compact_grad is None and bucket.table.gathered

    def _gather_grads(self, bucket: CompactBucket, grads: list[torch.Tensor | None]) -> None:
        t = bucket.table
        if bucket.gathered_grad is None:
            bucket.gathered_grad = torch.empty(t.state_numel, dtype=torch.float32, device=bucket.device)
        for slot, grad in enumerate(grads):
            info = t.slots[slot]
            if grad is None:  # counted as zero when missing_grad="zero"; not updated at all otherwise
                bucket.gathered_grad[info.state_begin : info.state_end].zero_()
            else:
                self.ops.masked_gather_grad(grad, t.tiles, _index(t), info.tile_begin, info.tile_end,
                                            bucket.gathered_grad, False)
        bucket.gathered_ready = True

    def scalars(self, hyper, slot_group, slot_step, present, partial, coef, control, has_stats, check_finite) -> None:
        self.ops.masked_adamw_scalars(hyper, slot_group, slot_step, present, partial, coef, control, has_stats,
                                      check_finite)

    def update(self, bucket: CompactBucket, grads: list[torch.Tensor | None], coef: torch.Tensor) -> None:
        t, b = bucket.table, bucket
        dense, compact = _grads_arg(b, grads), b.compact_grad
        if b.gathered_ready:  # this step's gradients, gathered by the statistics pass
            dense, compact, b.gathered_ready = [], b.gathered_grad, False
        if b.state_bits == 8:
            self.ops.masked_adamw8bit_update(b.params, dense, compact, t.tiles, _index(t), b.exp_avg, b.exp_avg_sq,
                                             b.absmax_m, b.absmax_v, b.qmap_m, b.qmap_v, b.mids_m, b.mids_v, b.master,
                                             coef)
        else:
            self.ops.masked_adamw_update(b.params, dense, compact, t.tiles, _index(t), b.exp_avg, b.exp_avg_sq,
                                         b.master, coef)

    def gather(self, bucket: CompactBucket, slot: int, source: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
        t, info = bucket.table, bucket.table.slots[slot]
        self.ops.masked_gather_grad(source, t.tiles, _index(t), info.tile_begin, info.tile_end, out, accumulate)
        _mark_seen(bucket, slot, out)


def _index(table: SegmentTable) -> torch.Tensor:
    """The table's int32 index array, or a 1-element dummy (kernels need a valid pointer)."""
    if table.index.numel() == 0:
        table.index = torch.zeros(1, dtype=torch.int32, device=table.tiles.device)
    return table.index


def _grads_arg(bucket: CompactBucket, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [] if bucket.compact_grad is not None else list(grads)


def _mark_seen(bucket: CompactBucket, slot: int, out: torch.Tensor) -> None:
    """A gradient gathered into the compact buffer: the slot has a gradient this step (see CompactBucket)."""
    if out is bucket.compact_grad:
        bucket.grad_seen[slot] = 1


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

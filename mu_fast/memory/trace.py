"""Trace one real edit step without allocating memory: the ground truth the plan is checked against.

The model is built under ``torch._subclasses.fake_tensor.FakeTensorMode`` (shapes, dtypes and autograd are real;
no storage is allocated), then ``EditStep.step`` runs on synthetic batches of the planned shape (twice for torch's
and bitsandbytes' AdamW, which allocate their state lazily in the first ``step()``). ``StorageTracker``, a
``TorchDispatchMode`` under the fake mode, sees every tensor every op creates; it keys each *storage* (views share
one), charges its bytes rounded up to the CUDA caching allocator's 512-byte granularity, and releases them through
a weakref finalizer when the storage dies. The running total's maximum is the traced peak, and the per-category
totals at that moment are its breakdown.

Why this and not ``torch.distributed._tools.mem_tracker.MemTracker`` (present in the installed torch, designed for
FakeTensorMode): its pre-forward hook registers a gradient hook on every parameter of every module it enters, which
raises on a parameter with ``requires_grad=False``, and an edit freezes almost all of them. Its categories
(parameter / activation / temp / optimizer) also could not separate frozen from masked weights, dense from compact
gradients, or logits from activations, which is what the plan is checked against term by term. On a model whose
parameters all train, the two agree (tests/test_memory.py).

What is traced and what is not:
* traced: frozen bf16 weights, masked weights, dense and compact gradients (post-accumulate hooks retag them),
  MaskedAdamW state (built from the real mask; its C++ ops run their registered fake implementations, which
  allocate nothing, as the fused kernels allocate nothing), torch AdamW state, activations, logits.
* not traced: bitsandbytes int8/nf4 frozen layers (``frozen`` must be "bf16": a ``Params4bit`` / ``Int8Params``
  cannot wrap a FakeTensor, ``_make_subclass`` refuses it; the plan accounts quantized bytes and the dequantized
  weight analytically), memory allocated *inside* one op (cuBLAS workspace, kernel scratch), fragmentation.
  The SegmentTable's tile and index tables are real tensors (built outside the fake mode because they are
  data-dependent; the tracker still sees them, as it sees every op).

The model and the EditStep are built inside the fake mode; the steps run outside it (fake tensors still dispatch
to it), so that the step's host-side count of LM targets runs on the real attention mask. Small tensors the step
makes from real inputs (targets, masks, position ids) are then real, and tracked like the rest.

Five things in MaskedAdamW do not run under FakeTensorMode and are patched for the trace only
(``_fake_friendly_optimizer``): the segment table, its state-dict key and the 8-bit code of zero are computed from
real tensors; the host views of its CPU tensors (``.numpy()``: hyperparameter staging, the skip counter) are
throwaway arrays; the check that no two parameters share memory is skipped (fake tensors have no addresses). Its kernels run
as the compiled extension's registered fake implementations (``mu_fast/optim/_ext_ops.py``; they check shapes and
allocate nothing, as the fused kernels allocate nothing), or, without the extension, as no-ops.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from mu_fast.edit.loop import EditConfig, EditStep
from mu_fast.masks import Mask
from mu_fast.memory.estimate import CATEGORIES

ALLOC_GRANULARITY = 512  # bytes; the CUDA caching allocator's minimum block


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOC_GRANULARITY) * ALLOC_GRANULARITY if nbytes else 0


class StorageTracker(TorchDispatchMode):
    """Live bytes per category of every storage created under it, with the peak and the breakdown at the peak.

    default: the category of a new storage (``retag`` moves one). vocab_size: storages whose last dimension is the
    vocabulary are counted as ``logits``.
    """

    def __init__(self, vocab_size: int | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.default = "activations"
        self.live: dict[int, tuple[weakref.ref, int, str]] = {}
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_breakdown = dict(self.current)
        self.peak_label = ""
        self.label = ""
        self.timeline: list[tuple[str, int]] | None = None  # (label, live bytes) after every op, when a list
        self.events: list[tuple[int, int]] | None = None  # (serial, bytes) per new storage, (serial, 0) per free
        self._serial = 0

    # ----------------------------------------------------------------------------------------------- storages
    def track(self, t: torch.Tensor, category: str | None = None) -> None:
        """Charge ``t``'s storage (once) to ``category`` (or the default); with a category, retag if present."""
        st = t.untyped_storage()
        key = id(st)
        entry = self.live.get(key)
        if entry is not None and entry[0]() is st:
            if category is not None and entry[2] != category:
                self._move(key, entry, category)
            return
        if category is None:
            category = "logits" if self.vocab_size and t.dim() and t.shape[-1] == self.vocab_size else self.default
        nbytes = _rounded(st.nbytes())
        self._serial += 1
        if self.events is not None and st.nbytes():
            self.events.append((self._serial, st.nbytes()))
        self.live[key] = (weakref.ref(st, lambda _, key=key: self._free(key)), nbytes, category, self._serial)
        self.current[category] += nbytes
        self.total += nbytes
        self._update_peak()

    def retag(self, t: torch.Tensor, category: str) -> None:
        self.track(t, category)

    def _move(self, key: int, entry: tuple[weakref.ref, int, str, int], category: str) -> None:
        ref, nbytes, old, serial = entry
        self.current[old] -= nbytes
        self.current[category] += nbytes
        self.live[key] = (ref, nbytes, category, serial)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current[entry[2]] -= entry[1]
            self.total -= entry[1]
            if self.events is not None and entry[1]:
                self.events.append((entry[3], 0))

    def _update_peak(self) -> None:
        if self.total > self.peak:
            self.peak = self.total
            self.peak_breakdown = dict(self.current)
            self.peak_label = self.label

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        if self.timeline is not None:
            self.timeline.append((f"{self.label}:{func.__name__}", self.total))
        return out

    @contextlib.contextmanager
    def phase(self, label: str, default: str | None = None):
        """Label allocations (and a peak reached) inside the block; optionally change the default category."""
        old = self.label, self.default
        self.label = label
        if default is not None:
            self.default = default
        try:
            yield
        finally:
            self.label, self.default = old


@dataclass
class TraceResult:
    """One traced edit step. peak: bytes (512-byte rounded storages); breakdown: bytes per category at the peak;
    phase: where the peak was reached ("facts", "lm", "step", ...); seconds: wall time of the trace (build + 2 steps)."""

    peak: int
    breakdown: dict[str, int]
    phase: str
    seconds: float
    steady: dict[str, int] = field(default_factory=dict)  # bytes per category after the last step
    timeline: list[tuple[str, int]] | None = None  # (phase:op, live bytes) after every op, if asked for
    events: list[tuple[int, int]] | None = None  # the allocation sequence, if asked for (``allocator.replay``)

    def allocator(self) -> Any:
        """The allocation sequence replayed through the caching-allocator model (``allocator.ReplayResult``)."""
        from mu_fast.memory.allocator import replay

        if self.events is None:
            raise ValueError("trace_peak(..., events=True) records the allocation sequence; this trace has none")
        return replay(self.events)

    def format(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.breakdown.items() if v)
        return f"traced peak {self.peak / 2**30:.2f} GiB in {self.phase} ({parts}) [{self.seconds:.1f} s]"


# ------------------------------------------------------------------------------------------- fake-mode glue
@contextlib.contextmanager
def _fake_friendly_optimizer():
    """Let MaskedAdamW build and step under FakeTensorMode (see the module docstring); restores on exit."""
    import numpy as np
    from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

    import mu_fast.optim.optimizer as optimizer_module
    from mu_fast.optim import _groups, quantize8

    def real(fn):
        def wrapper(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        return wrapper

    def host_view(tensor):  # a throwaway host array: staged rows go nowhere, polled counters read 0
        kinds = {torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32, torch.uint8: np.uint8}
        return np.zeros(tuple(tensor.shape), dtype=kinds.get(tensor.dtype, np.float32))

    def backend(device, name="auto"):
        try:
            return saved_select(device, "cpu")  # the compiled ops, whose fake kernels allocate nothing
        except RuntimeError:  # extension not built: kernels that allocate nothing, like the fused ones
            return _NoAllocBackend()

    with unset_fake_temporarily():
        quantize8.dynamic_map(True), quantize8.dynamic_map(False)  # fill the cache from real tensors
    table, saved_select = optimizer_module.SegmentTable, optimizer_module.select_backend
    saved = (table, table.key, quantize8.code_of_zero, saved_select, _groups.check_distinct)
    optimizer_module.SegmentTable = real(table)
    table.key = real(table.key)
    quantize8.code_of_zero = real(saved[2])
    optimizer_module.select_backend = backend
    _groups.check_distinct = lambda named: None  # fake tensors have no addresses to compare
    FakeTensor.numpy = host_view
    try:
        yield
    finally:
        (optimizer_module.SegmentTable, table.key, quantize8.code_of_zero, optimizer_module.select_backend,
         _groups.check_distinct) = saved
        del FakeTensor.numpy


class _NoAllocBackend:
    """MaskedAdamW's backend interface doing nothing: the fused kernels allocate no memory, so neither does this."""

    name = "no-alloc"

    def grad_sumsq(self, *args: Any) -> None:
        pass

    scalars = update = gather = grad_sumsq


def build_fake_model(config: Any, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A CausalLM of ``config`` whose tensors are fake (call inside an active FakeTensorMode), in eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def synthetic_batches(batch: Any, vocab_size: int) -> tuple[Any, Any | None]:
    """(fact batch, LM batch or None) of the planned shape. One row of each is a token shorter than the rest, so
    both carry padding and an attention mask, as real batches of prompts of varied length do."""
    from mu_fast.data.base import pad_batch

    def rows(n: int, length: int) -> list[list[int]]:
        ids = [[3 + (i + j) % (vocab_size - 3) for j in range(length)] for i in range(n)]
        if n > 1 and length > 2:
            ids[-1] = ids[-1][:-1]
        return ids

    facts = pad_batch(rows(batch.n_facts, batch.fact_tokens), 0)
    lm = pad_batch(rows(batch.n_lm, batch.lm_tokens), 0) if batch.n_lm else None
    return facts, lm


# ------------------------------------------------------------------------------------------------- the trace
def trace_peak(model_config: Any, mask: Mask, edit_config: Any = None, batch: Any = None, frozen: str = "bf16",
               steps: int | None = None, timeline: bool = False, events: bool = False) -> TraceResult:
    """Peak device bytes of ``steps`` edit steps of a model of ``model_config`` with fake weights (default: two
    for optimizers that allocate state lazily, else one: MaskedAdamW allocates its state when built).

    edit_config: an ``EditConfig`` (its memory settings are what is traced; default ``EditConfig()``); batch: a
    ``BatchShape`` (default the paper's). frozen must be "bf16": bitsandbytes layers are not traced (the plan adds
    their bytes analytically). events: record every storage's allocation and free, in order (``TraceResult.events``,
    for ``TraceResult.allocator``). Takes seconds for a tiny model and about a minute for a 42-layer 9B model (CPU).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mu_fast.memory.shapes import BatchShape, ModelShape, resolve_config

    if frozen != "bf16":
        raise ValueError(f"trace_peak traces bf16 frozen weights only (bitsandbytes layers do not run on fake tensors); "
                         f"got frozen={frozen!r}: trace with frozen='bf16' and compare the plan's frozen-weight term")
    config = resolve_config(model_config)
    shape = ModelShape.from_config(config)
    batch = batch or BatchShape()
    edit_config = edit_config or EditConfig()
    if steps is None:  # torch's and bitsandbytes' AdamW allocate their state in the first step
        steps = 1 if edit_config.optimizer in ("auto", "masked") else 2
    start = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = StorageTracker(vocab_size=shape.vocab)
    tracker.timeline = [] if timeline else None
    tracker.events = [] if events else None
    with fake:
        model = build_fake_model(config)
    mask.validate(model)
    with tracker:
        for name, p in model.named_parameters():
            tracker.track(p, "masked_weights" if name in mask else "frozen_weights")
        for b in model.buffers():
            tracker.track(b, "frozen_weights")
    handles = []
    for _, p in mask.trainable_parameters(model):
        handles.append(p.register_hook(lambda g: tracker.retag(g, "gradients")))
        handles.append(p.register_post_accumulate_grad_hook(
            lambda p: p.grad is not None and tracker.retag(p.grad, "gradients")))
    with fake, tracker, tracker.phase("build", default="optimizer_state"), _fake_friendly_optimizer():
        stepper = EditStep(model, mask, edit_config)
        _charge_optimizer(tracker, stepper.optimizer)
    facts, lm = synthetic_batches(batch, shape.vocab)
    targets = torch.arange(batch.n_facts) % shape.vocab
    embed = model.get_input_embeddings()
    handles.append(embed.register_forward_pre_hook(
        lambda m, args: setattr(tracker, "label", "facts" if args[0].shape[1] == facts.input_ids.shape[1] else "lm")))
    def before_step(*_: Any) -> None:
        tracker.label, tracker.default = "step", "optimizer_state"

    def after_step(*_: Any) -> None:
        tracker.default = "activations"

    handles += [register_optimizer_step_pre_hook(before_step), register_optimizer_step_post_hook(after_step)]
    try:
        with tracker, _fake_friendly_optimizer():
            for _ in range(steps):
                stepper.step(facts, batch.n_forget, targets[: batch.n_forget], targets[batch.n_forget :], lm)
        steady = dict(tracker.current)
    finally:
        for h in handles:
            h.remove()
        stepper.close()
    recorded, tracker.events = tracker.events, None  # frees after the trace (the fake model's) are not the step's
    return TraceResult(tracker.peak, tracker.peak_breakdown, tracker.peak_label, time.perf_counter() - start, steady,
                       tracker.timeline, recorded)


def _charge_optimizer(tracker: StorageTracker, optimizer: Any) -> None:
    """Retag MaskedAdamW's compact gradient buffers as gradients (its segment tables, built from real tensors while
    the tracker watched, are already charged to the optimizer)."""
    for bucket in getattr(optimizer, "_buckets", []):
        if bucket.compact_grad is not None:
            tracker.retag(bucket.compact_grad, "gradients")

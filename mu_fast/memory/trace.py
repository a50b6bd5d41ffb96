"""Trace one real edit step without allocating memory: the ground truth the plan is checked against.

The model is built under ``torch._subclasses.fake_tensor.FakeTensorMode`` (shapes, dtypes and autograd are real;
no storage is allocated), then ``EditStep.step`` runs twice on synthetic batches of the planned shape (twice
because torch's AdamW allocates its state lazily in the first ``step()``). ``StorageTracker``, a
``TorchDispatchMode`` under the fake mode, sees every tensor every op creates; it keys each *storage* (views share
one), charges its bytes rounded up to the CUDA caching allocator's 512-byte granularity, and releases them through
a weakref finalizer when the storage dies. The running total's maximum is the traced peak, and the per-category
totals at that moment are its breakdown.

Why this and not ``torch.distributed._tools.mem_tracker.MemTracker`` (which exists in the installed torch and
runs under FakeTensorMode): MemTracker does the same storage accounting but installs module hooks and deep-copies
per-module snapshots at every new peak (slow at 42 layers), and its categories (parameter / activation / temp /
optimizer) cannot separate frozen from masked weights, dense from compact gradients, or logits from activations,
which is what the plan needs to be checked term by term. Its totals agree with this tracker's
(tests/test_memory.py checks the peak on a tiny model).

What is traced and what is not:
* traced: frozen bf16 weights, masked weights, dense and compact gradients (post-accumulate hooks retag them),
  MaskedAdamW state (built from the real mask; its C++ ops run their registered fake implementations, which
  allocate nothing, as the fused kernels allocate nothing), torch AdamW state, activations, logits.
* not traced: bitsandbytes int8/nf4 frozen layers (``frozen`` must be "bf16"; the plan accounts quantized bytes
  analytically), memory allocated *inside* one op (cuBLAS workspace, kernel scratch), allocator fragmentation.
  The SegmentTable's tile and index tables are real tensors (built outside the fake mode because they are
  data-dependent) and are charged from their sizes.

Four things in MaskedAdamW do not run under FakeTensorMode and are patched for the trace only
(``_fake_friendly_optimizer``): the segment table, its state-dict key and the 8-bit code of zero are computed from
real tensors, and the host staging of hyperparameters (``.numpy()``) goes through a plain tensor.
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

from mu_fast.masks import Mask

CATEGORIES = ("frozen_weights", "masked_weights", "gradients", "optimizer_state", "activations", "logits", "workspace")
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
        self.live[key] = (weakref.ref(st, lambda _, key=key: self._free(key)), nbytes, category)
        self.current[category] += nbytes
        self.total += nbytes
        self._update_peak()

    def add_static(self, nbytes: int, category: str) -> None:
        """Charge bytes that live outside the fake mode (real tensors standing for device tensors)."""
        self.current[category] += _rounded(nbytes)
        self.total += _rounded(nbytes)
        self._update_peak()

    def retag(self, t: torch.Tensor, category: str) -> None:
        self.track(t, category)

    def _move(self, key: int, entry: tuple[weakref.ref, int, str], category: str) -> None:
        ref, nbytes, old = entry
        self.current[old] -= nbytes
        self.current[category] += nbytes
        self.live[key] = (ref, nbytes, category)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current[entry[2]] -= entry[1]
            self.total -= entry[1]

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

    def format(self) -> str:
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in self.breakdown.items() if v)
        return f"traced peak {self.peak / 2**30:.2f} GiB in {self.phase} ({parts}) [{self.seconds:.1f} s]"


# ------------------------------------------------------------------------------------------- fake-mode glue
@contextlib.contextmanager
def _fake_friendly_optimizer():
    """Let MaskedAdamW build and step under FakeTensorMode (see the module docstring); restores on exit."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    import mu_fast.optim.optimizer as optimizer_module
    from mu_fast.optim import MaskedAdamW, quantize8

    def real(fn):
        def wrapper(*args, **kwargs):
            with unset_fake_temporarily():
                return fn(*args, **kwargs)
        return wrapper

    def stage(self, rows):
        return torch.tensor(rows, dtype=torch.float64, device=self._hyper.device)

    with unset_fake_temporarily():
        quantize8.dynamic_map(True), quantize8.dynamic_map(False)  # fill the cache from real tensors
    table = optimizer_module.SegmentTable
    saved = (table, table.key, quantize8.code_of_zero, MaskedAdamW._stage_hyper)
    optimizer_module.SegmentTable = real(table)
    table.key = real(table.key)
    quantize8.code_of_zero = real(saved[2])
    MaskedAdamW._stage_hyper = stage
    try:
        yield
    finally:
        optimizer_module.SegmentTable, table.key, quantize8.code_of_zero, MaskedAdamW._stage_hyper = saved


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


class _StandInStep:
    """Temporary stand-in for ``mu_fast.edit.loop.EditStep`` (same interface) until the new loop lands on main."""

    def __init__(self, model: Any, mask: Mask, config: Any, optimizer_factory: Any = None):
        from mu_fast.optim import MaskedAdamW

        self.model, self.config = model, config
        named = mask.trainable_parameters(model)
        self.params = [p for _, p in named]
        partial = any(mask[n].kind != "whole" for n, _ in named)
        compact = partial if config.compact_grads is None else config.compact_grads
        if config.optimizer in ("auto", "masked"):
            self.optimizer = MaskedAdamW(named, mask=mask, lr=config.lr, state_bits=config.state_bits,
                                         master_weights=config.master_weights, compact_grads=compact)
        elif config.optimizer == "torch":
            self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        else:
            raise ValueError(f"the stand-in step cannot trace optimizer={config.optimizer!r}")
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.steps)
        if config.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.train()

    def step(self, facts, n_forget, forget_targets, maintain_labels, lm, unlearn=False):
        import torch.nn.functional as F

        from mu_fast.models.forward import gathered_logits, lm_loss_backward

        cfg = self.config
        n = facts.input_ids.shape[0]
        micro = cfg.micro_batch or n
        labels = torch.cat([forget_targets, maintain_labels])
        weights = torch.cat([torch.full((n_forget,), cfg.forget_coef / n_forget),
                             torch.full((n - n_forget,), cfg.maintain_coef / max(n - n_forget, 1))])
        for lo in range(0, n, micro):
            part = slice(lo, lo + micro)
            sub = type(facts)(facts.input_ids[part], facts.attention_mask[part], facts.position_ids[part], facts.last_pos[part])
            logits = gathered_logits(self.model, sub)
            loss = (F.cross_entropy(logits, labels[part], reduction="none") * weights[part]).sum()
            loss.backward()
            del logits, loss
        if lm is not None and cfg.lm_coef:
            mask = lm.attention_mask.bool()
            count = int((mask[:, :-1] & mask[:, 1:]).sum())
            n_lm = lm.input_ids.shape[0]
            lm_micro = cfg.lm_micro_batch or n_lm
            for lo in range(0, n_lm, lm_micro):
                part = slice(lo, lo + lm_micro)
                sub = type(lm)(lm.input_ids[part], lm.attention_mask[part], lm.position_ids[part], lm.last_pos[part])
                _lm_backward(self.model, sub, cfg.lm_coef, cfg.lm_chunk_tokens, count)
        clip = getattr(self.optimizer, "clip_grad_norm_", None)
        norm = clip(cfg.grad_clip) if clip else torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def close(self) -> None:
        pass


def _lm_backward(model, batch, coef, chunk_tokens, denominator):
    import torch.nn.functional as F

    from mu_fast.models.forward import head_logits, trunk_hidden

    hidden = trunk_hidden(model, batch)
    valid = batch.attention_mask[:, :-1].bool() & batch.attention_mask[:, 1:].bool()
    targets = torch.where(valid, batch.input_ids[:, 1:], torch.full_like(batch.input_ids[:, 1:], -100)).reshape(-1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens or max(16, 256 * 2**20 // (4 * model.get_output_embeddings().weight.shape[0]))
    leaf = h.detach().requires_grad_(True)
    for start in range(0, h.shape[0], chunk):
        part = slice(start, start + chunk)
        logits = head_logits(model, leaf[part]).float()
        loss = F.cross_entropy(logits, targets[part], reduction="sum", ignore_index=-100) / denominator
        (coef * loss).backward()
        del logits, loss
    if h.requires_grad:
        h.backward(leaf.grad)


# ------------------------------------------------------------------------------------------------- the trace
def _edit_step_class():
    try:
        from mu_fast.edit.loop import EditStep
    except ImportError:
        return _StandInStep
    return EditStep


def trace_peak(model_config: Any, mask: Mask, edit_config: Any = None, batch: Any = None, frozen: str = "bf16",
               steps: int = 2, timeline: bool = False) -> TraceResult:
    """Peak device bytes of ``steps`` edit steps (default 2) of a model of ``model_config`` with fake weights.

    edit_config: an ``EditConfig`` (its memory settings are what is traced; default ``EditConfig()``); batch: a
    ``BatchShape`` (default the paper's). frozen must be "bf16": bitsandbytes layers are not traced (the plan adds
    their bytes analytically). Takes seconds for a tiny model and about a minute for a 42-layer 9B model (CPU).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mu_fast.memory.shapes import BatchShape, ModelShape, resolve_config

    if frozen != "bf16":
        raise ValueError(f"trace_peak traces bf16 frozen weights only (bitsandbytes layers do not run on fake tensors); "
                         f"got frozen={frozen!r}: trace with frozen='bf16' and compare the plan's frozen-weight term")
    config = resolve_config(model_config)
    shape = ModelShape.from_config(config)
    batch = batch or BatchShape()
    if edit_config is None:
        from mu_fast.edit.loop import EditConfig

        edit_config = EditConfig()
    start = time.perf_counter()
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    tracker = StorageTracker(vocab_size=shape.vocab)
    tracker.timeline = [] if timeline else None
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
        stepper = _edit_step_class()(model, mask, edit_config)
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
    return TraceResult(tracker.peak, tracker.peak_breakdown, tracker.peak_label, time.perf_counter() - start, steady,
                       tracker.timeline)


def _charge_optimizer(tracker: StorageTracker, optimizer: Any) -> None:
    """Retag MaskedAdamW's compact gradient buffers as gradients; charge its (real) segment tables."""
    for bucket in getattr(optimizer, "_buckets", []):
        if bucket.compact_grad is not None:
            tracker.retag(bucket.compact_grad, "gradients")
        table = bucket.table
        tracker.add_static(table.tiles.numel() * table.tiles.element_size(), "optimizer_state")
        if table.index.numel() > 1:
            tracker.add_static(table.index.numel() * table.index.element_size(), "optimizer_state")

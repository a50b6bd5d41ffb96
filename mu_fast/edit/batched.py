"""K edit configurations of one (model, task) trained together over one frozen model.

``edit_batched(model, tokenizer, task, masks, configs)`` runs K edits that may differ in seed (data order), lr,
steps, betas / eps / weight decay, forget / maintain / LM coefficients, grad clip and mask. The model's weights are
never written during training: each configuration k holds, per masked parameter, the compact values ``V_k`` of the
elements its mask selects (the canonical order of ``mu_fast.edit.delta.compact``: rows, columns, head slices or whole
matrices), and the forward adds ``D_k = V_k − W0[sel_k]`` to its own rows of the batch only.

Per step (what ``edit`` does per configuration, done once for all of them):

* every live configuration builds its own packed batch exactly as ``edit`` (its own generator seeded with
  ``config.seed``: the same maintain / LM samples, in the same order); the K fact groups are concatenated (padded to
  a common length: right padding, so each row's logits are those of its own batch up to float summation order) and
  the K LM groups likewise;
* one forward over all groups (or ``groups_per_pass`` groups at a time): frozen modules run once; a masked
  ``nn.Linear`` runs its frozen GEMM once over all rows, then adds, per group k, ``x_k·D_k^T`` restricted to its
  selection (rows: ``y[..., rows] += x_k·D_k^T``; columns: ``y += x_k[..., cols]·D_k^T``; element masks: a dense
  scattered ``D_k``; biases likewise). Rows and columns blocks of all groups go through one
  ``segmented_delta_add`` call per kind (``mu_fast.edit.grouped_delta``: one Triton launch for all groups on CUDA,
  the per-group torch loop on a CPU, ``delta_backend`` overrides); element, bias and whole-weight blocks keep a
  per-group torch loop. A group whose mask holds the whole weight computes ``x_k·(W0 + D_k)^T`` instead (one GEMM
  rather than two), and then that module's frozen GEMM runs per group;
* per configuration the loss ``edit`` computes (forget / maintain sums over its own rows divided by its own row
  counts, its LM mean over its own targets, its own coefficients); one backward of their sum gives every ``D_k``
  its own gradient (groups never mix: each group's rows only see its own deltas);
* per configuration the gradient norm over its own compact gradient and clipping at its own ``grad_clip``
  (torch's ``clip_grad_norm_`` rule: factor ``min(1, clip / (norm + 1e-6))``);
* one vectorized AdamW update over the flat buffer holding every configuration's compact values: per-element
  lr (each configuration's own cosine schedule, the values of torch's ``CosineAnnealingLR`` over its ``steps``),
  weight decay applied to the full element ``W0 + D`` (as AdamW in ``edit`` decays the weight), betas, eps and bias
  corrections of its own step count: torch AdamW's formula (``adamw_update_`` below, tested against
  ``torch.optim.AdamW``).

A configuration whose ``steps`` are done leaves the batch (its values no longer change); the others continue.

Numerics: the values and their update live in the parameter's dtype with fp32 moments (fp64 for fp64 models), i.e.
``edit`` with ``optimizer="torch"`` (or MaskedAdamW without ``master_weights``) per configuration; for partial
selections the forward computes ``x·W0^T + x·D^T`` rather than ``x·(W0 + D)^T`` (equal up to float rounding). Not
supported (refused with a one-line error): 8-bit optimizer state, master weights, bitsandbytes, micro-batching,
gradient checkpointing, and masked parameters other than plain ``nn.Linear`` weights / biases.

Speed (``benchmarks/bench_batched_edit.py``, organism-sized Llama, AMD EPYC, 1 thread): no gain on this CPU. The
time of K single ``edit`` calls divided by that of one ``edit_batched`` of K was 0.85-0.89 (same mask, K = 4, 8) and
0.71-0.77 (mixed masks), i.e. the batched run was slower: the step is GEMM-bound, the K-fold activations fall out of
cache, and with mixed masks every group back-propagates down to the lowest masked layer of any group. ``groups_per_pass=1`` (one forward/backward per group, one shared
optimizer step) measured 0.96-1.11. The batched pass is meant for GPUs (one launch sequence for K groups); not
measured there yet.

Memory (measured by ``tests/edit/test_batched.py::test_memory_per_configuration``): per configuration with n
selected elements, persistent 4 buffers of n elements (values, their base values, two moments: 16 B per element in
fp32) plus per step a delta and its gradient (8 B per element) and its own activations; the frozen weights exist
once. On the 2-layer tiny Llama (d=32, d_mlp=48) with a mask of one MLP layer (4,608 elements) that is 73,728 B
persistent per configuration.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import Batch, FactTask, pad_batch, pad_id_of, tokenize_prompts
from mu_fast.edit.delta import EditDelta, compact
from mu_fast.edit.grouped_delta import segmented_delta_add
from mu_fast.edit.loop import EditConfig, EditResult, _cycle_batches
from mu_fast.edit.losses import inject_loss, maintain_loss, unlearn_loss
from mu_fast.masks import Mask
from mu_fast.models.forward import gathered_logits, head_logits, lm_chunk_tokens, lm_targets, trunk_hidden

OPTIMIZER_NAME = "batched AdamW"


@dataclass
class _Block:
    """Configuration ``config``'s compact values of one parameter: ``flat[start:stop]`` viewed as ``shape``."""

    config: int
    name: str
    module: str
    is_bias: bool
    kind: str  # whole | rows | cols | elements
    index: torch.Tensor | None  # rows / cols indices, or the bool element mask (on the model's device)
    shape: tuple[int, ...]
    start: int
    stop: int


class BatchedDeltas:
    """The K configurations' compact values over one frozen model, and the forwards that add them per batch group.

    ``values`` is one flat buffer (configuration-major: every block of configuration 0, then 1, ...);
    ``base`` holds the model's values at the same elements. ``delta(k)`` / ``edited(k)`` / ``to_edit_delta(k)``
    read configuration k; ``apply(k)`` writes it into the model and ``restore()`` puts the base back bit-exactly
    (``variant(k)`` does both around a block).
    """

    def __init__(self, model: torch.nn.Module, masks: Sequence[Mask]):
        self.model = model
        self.masks = list(masks)
        self.params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        self.blocks: list[_Block] = []
        offset = 0
        for k, mask in enumerate(self.masks):
            if len(mask) == 0:
                raise ValueError(f"mask {k} selects no parameters; localize first (mu_fast.localize) or drop that configuration")
            mask.validate(model)
            for name in self.params:  # model order, so every configuration's blocks follow one order
                if name not in mask:
                    continue
                module_name, _, attr = name.rpartition(".")
                module = modules.get(module_name)
                if type(module) is not torch.nn.Linear or attr not in ("weight", "bias"):  # noqa: E721 (subclasses: quantized)
                    raise ValueError(f"edit_batched adds deltas to plain nn.Linear weights and biases only, but mask {k} "
                                     f"selects {name!r} of a {type(module).__name__}; drop it from the mask, load the model "
                                     "unquantized, or use edit()")
                sel, param = mask[name], self.params[name]
                n = sel.numel(tuple(param.shape))
                if sel.kind == "whole":
                    shape, index = tuple(param.shape), None
                elif sel.kind == "rows":
                    index = sel.index.to(param.device)
                    shape = (len(index), *param.shape[1:])
                elif sel.kind == "cols":
                    index = sel.index.to(param.device)
                    shape = (param.shape[0], len(index))
                else:
                    index, shape = sel.index.to(param.device), (n,)
                self.blocks.append(_Block(k, name, module_name, attr == "bias", sel.kind, index, shape, offset, offset + n))
                offset += n
        dtypes = {self.params[b.name].dtype for b in self.blocks}
        devices = {self.params[b.name].device for b in self.blocks}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"masked parameters have several dtypes / devices ({sorted(map(str, dtypes | devices))}); "
                             "load the model in one dtype on one device")
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.numel = offset
        self.base = torch.cat([compact(self.params[b.name], self.masks[b.config][b.name]) for b in self.blocks])
        self.values = self.base.clone()
        wide = torch.promote_types(self.dtype, torch.float32)
        self.exp_avg = torch.zeros(self.numel, dtype=wide, device=self.device)  # AdamW moments, same layout
        self.exp_avg_sq = torch.zeros_like(self.exp_avg)
        self.config_of = torch.cat([torch.full((b.stop - b.start,), b.config, dtype=torch.int64) for b in self.blocks]
                                   ).to(self.device)
        self.by_module: dict[str, dict[int, list[_Block]]] = {}
        for b in self.blocks:
            self.by_module.setdefault(b.module, {}).setdefault(b.config, []).append(b)
        self._segments: list[tuple[int, int, int]] | None = None
        self._delta: torch.Tensor | None = None
        self._hooks: list[Any] = []
        self._applied: int | None = None
        self.delta_backend = "auto"  # segmented_delta_add's backend for rows / columns blocks (auto: triton on CUDA)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self.masks)

    def numel_of(self, k: int) -> int:
        """Selected elements of configuration k (all its parameters)."""
        return sum(b.stop - b.start for b in self.blocks if b.config == k)

    def state_bytes(self, k: int) -> int:
        """Persistent bytes configuration k adds: its values, their base values and its two moments."""
        n = self.numel_of(k)
        return n * (self.values.element_size() + self.base.element_size() + self.exp_avg.element_size()
                    + self.exp_avg_sq.element_size())

    def block_values(self, k: int, flat: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Configuration k's compact 1-D values per parameter (canonical order), from ``flat`` (default: the values)."""
        flat = self.values if flat is None else flat
        return {b.name: flat[b.start:b.stop] for b in self.blocks if b.config == k}

    def delta(self, k: int) -> dict[str, torch.Tensor]:
        """Configuration k's compact delta ``V_k − W0[sel_k]`` per parameter (1-D, canonical order)."""
        return {b.name: self.values[b.start:b.stop] - self.base[b.start:b.stop] for b in self.blocks if b.config == k}

    def to_edit_delta(self, k: int, provenance: dict[str, Any] | None = None) -> EditDelta:
        """Configuration k's trained values as an ``EditDelta`` (``apply_delta`` / ``save`` as after ``edit``)."""
        return EditDelta({n: v.clone() for n, v in self.block_values(k).items()}, self.masks[k], dict(provenance or {}))

    def edited(self, k: int) -> dict[str, torch.Tensor]:
        """Configuration k's full edited parameters (new tensors: the base with its selected elements replaced)."""
        from mu_fast.edit.delta import scatter_

        out = {}
        for name, values in self.block_values(k).items():
            weight = self.params[name].detach().clone()
            scatter_(weight, self.masks[k][name], values)
            out[name] = weight
        return out

    # ----------------------------------------------------------- apply / undo
    @torch.no_grad()
    def apply(self, k: int) -> None:
        """Write configuration k's values into the model (restoring any other applied configuration first)."""
        from mu_fast.edit.delta import scatter_

        if not 0 <= k < len(self):
            raise ValueError(f"configuration {k} does not exist; choose 0..{len(self) - 1}")
        self.restore()
        for name, values in self.block_values(k).items():
            scatter_(self.params[name], self.masks[k][name], values)
        self._applied = k

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base values back (bit-exact) where the applied configuration wrote; no-op when none is applied."""
        from mu_fast.edit.delta import scatter_

        if self._applied is None:
            return
        for name, values in self.block_values(self._applied, self.base).items():
            scatter_(self.params[name], self.masks[self._applied][name], values)
        self._applied = None

    @contextlib.contextmanager
    def variant(self, k: int) -> Iterator[torch.nn.Module]:
        """``with deltas.variant(k) as model:`` the model edited by configuration k inside, the base after."""
        self.apply(k)
        try:
            yield self.model
        finally:
            self.restore()

    # ------------------------------------------------------------- forwarding
    def attach(self) -> None:
        """Route the masked modules' forwards through ``_forward`` (the plain forward until ``groups`` is entered)."""
        if self._hooks:
            return
        modules = dict(self.model.named_modules())
        for name in self.by_module:
            module = modules[name]
            self._hooks.append((module, module.__dict__.get("forward")))
            module.forward = self._forward(name, module)

    def detach(self) -> None:
        """Give the masked modules their own forwards back."""
        for module, own in self._hooks:
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._hooks = []

    @contextlib.contextmanager
    def groups(self, segments: Sequence[tuple[int, int, int]], delta: torch.Tensor) -> Iterator[None]:
        """Inside, forward passes add ``delta`` (flat, like ``values``) per group: ``segments`` lists
        ``(config, first row, end row)`` of the batch, in row order and covering it."""
        if self._applied is not None:
            raise ValueError(f"configuration {self._applied} is applied to the model; restore() before a batched forward")
        self._segments, self._delta = list(segments), delta
        try:
            yield
        finally:
            self._segments = self._delta = None

    def _forward(self, module_name: str, module: torch.nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
        """The batched forward of one masked ``nn.Linear``: per group k, ``x_k·W0^T (+ b0)`` plus group k's blocks.
        Without a whole-weight block in any group the frozen GEMM runs once over every row; a group whose mask
        holds the whole weight computes ``x_k·(W0 + D_k)^T`` instead (one GEMM, not two)."""
        per_config = self.by_module[module_name]
        plain = type(module).forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            segments = self._segments
            if segments is None:
                return plain(module, x)
            if x.shape[0] != segments[-1][2]:
                raise ValueError(f"{module_name} got a batch of {x.shape[0]} rows but the groups cover "
                                 f"{segments[-1][2]}; run batched forwards with the batch first")
            blocks = [per_config.get(k, ()) for k, _, _ in segments]
            if not any(blocks):
                return plain(module, x)
            sizes = [hi - lo for _, lo, hi in segments]
            whole = [next((b for b in bl if b.kind == "whole" and not b.is_bias), None) for bl in blocks]
            if any(w is not None for w in whole):
                y = torch.cat([F.linear(xk, module.weight if w is None else module.weight + self._view(w), module.bias)
                               for xk, w in zip(x.split(sizes), whole, strict=True)], 0)
            else:
                y = plain(module, x)
            bounds = [(lo, hi) for _, lo, hi in segments]
            for kind in ("rows", "cols"):  # every group's rows / columns weight block in one segmented call
                picked = [next((b for b in bl if b.kind == kind and not b.is_bias), None) for bl in blocks]
                if any(b is not None for b in picked):
                    y = segmented_delta_add(y, x, bounds, kind, [None if b is None else b.index for b in picked],
                                            [None if b is None else self._view(b) for b in picked],
                                            backend=self.delta_backend, check_indices=False)
            rest = [[b for b in bl if b is not whole[i] and (b.is_bias or b.kind not in ("rows", "cols"))]
                    for i, bl in enumerate(blocks)]
            if not any(rest):
                return y
            ys, xs = list(y.split(sizes)), x.split(sizes)
            for i, bl in enumerate(rest):
                for b in bl:
                    ys[i] = _add_block(ys[i], xs[i], b, self._view(b))
            return torch.cat(ys, 0)

        return forward

    def _view(self, b: _Block) -> torch.Tensor:
        return self._delta[b.start:b.stop].view(b.shape)


def _add_block(y: torch.Tensor, x: torch.Tensor, b: _Block, d: torch.Tensor) -> torch.Tensor:
    """``y + (the selected part of) x·D^T`` for one block (a bias block adds D itself)."""
    if b.is_bias:
        if b.kind == "whole":
            return y + d
        return y.index_add(-1, b.index, d.expand(*y.shape[:-1], -1))  # rows (a Mask turns 1-D element masks into rows)
    if b.kind == "whole":
        return y + F.linear(x, d)
    if b.kind == "rows":
        return y.index_add(-1, b.index, F.linear(x, d))
    if b.kind == "cols":
        return y + F.linear(x.index_select(-1, b.index), d)
    dense = torch.zeros(b.index.shape, dtype=d.dtype, device=d.device).masked_scatter(b.index, d)
    return y + F.linear(x, dense)


# --------------------------------------------------------------------- AdamW
def adamw_update_(values: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
                  lr: torch.Tensor, weight_decay: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor,
                  eps: torch.Tensor, step: torch.Tensor, config_of: torch.Tensor, live: torch.Tensor) -> None:
    """One AdamW step of every live configuration over the flat compact buffers, in place (torch AdamW's formula).

    values / grad / exp_avg / exp_avg_sq: ``[n]`` flat buffers (values in the parameter dtype, moments wider);
    lr, weight_decay, beta1, beta2, eps: ``[K]`` fp64 per-configuration hyperparameters (lr: this step's scheduled
    value); step: ``[K]`` fp64 step numbers after this update (1 on the first); config_of: ``[n]`` int64 owner of each
    element; live: ``[K]`` bool, the configurations that take this step (the others' elements stay bit-identical).
    Per element: ``v ← v·(1 − lr·wd)``; ``m ← β1·m + (1−β1)·g``; ``s ← β2·s + (1−β2)·g²``;
    ``v ← v − lr/(1−β1^t) · m / (√s / √(1−β2^t) + eps)``.
    """
    wide = exp_avg.dtype
    per = torch.stack([1 - lr * weight_decay, 1 - beta1, beta2, 1 - beta2, lr / (1 - beta1**step),
                       (1 - beta2**step).sqrt(), eps, live.to(torch.float64)], 1).to(wide)[config_of]
    decay, one_minus_b1, b2, one_minus_b2, step_size, bc2_sqrt, eps_e, live_e = per.unbind(1)
    g = grad.to(wide)
    live_b = live_e.bool()
    new_m = exp_avg + (g - exp_avg) * one_minus_b1
    new_s = exp_avg_sq * b2 + g * g * one_minus_b2
    v = values.to(wide) * decay
    v = v - step_size * (new_m / (new_s.sqrt() / bc2_sqrt + eps_e))
    exp_avg.copy_(torch.where(live_b, new_m, exp_avg))
    exp_avg_sq.copy_(torch.where(live_b, new_s, exp_avg_sq))
    values.copy_(torch.where(live_b, v.to(values.dtype), values))


def cosine_lrs(lr: float, steps: int) -> list[float]:
    """The lr of each of ``steps`` steps under torch's ``CosineAnnealingLR(T_max=steps)`` (what ``edit`` uses),
    read from the scheduler itself so the values are bit-identical."""
    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(dummy, T_max=steps)
    out = []
    for _ in range(steps):
        out.append(dummy.param_groups[0]["lr"])
        dummy.step()
        sched.step()
    return out


# --------------------------------------------------------------------- edit
def _check_config(k: int, config: EditConfig) -> None:
    refused = {"optimizer='bnb8bit'": config.optimizer == "bnb8bit", "state_bits=8": config.state_bits != 32,
               "master_weights": config.master_weights, "micro_batch": config.micro_batch is not None,
               "lm_micro_batch": config.lm_micro_batch is not None, "grad_checkpointing": config.grad_checkpointing}
    bad = [name for name, on in refused.items() if on]
    if bad:
        raise ValueError(f"configuration {k} sets {', '.join(bad)}, which edit_batched does not support; "
                         "drop it (edit_batched keeps fp32 moments, no micro-batches) or run that configuration with edit()")


@dataclass
class BatchedEdit:
    """What ``edit_batched`` returns: one ``EditResult`` per configuration (``edit``'s fields; ``seconds`` is the
    wall time until that configuration's last step) and the trained ``deltas`` (``deltas.variant(k)``)."""

    results: list[EditResult]
    deltas: BatchedDeltas

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, k: int) -> EditResult:
        return self.results[k]


class _ConfigData:
    """One configuration's data stream, built exactly as ``edit`` builds it."""

    def __init__(self, config: EditConfig, tokenizer: Any, task: FactTask, forget: Any, maintain: Any):
        lm_ids = [tokenizer(t, add_special_tokens=True)["input_ids"][: config.lm_max_tokens] for t in task.lm_texts]
        self.lm_ids = [ids for ids in lm_ids if len(ids) >= 2]
        if config.lm_coef and not self.lm_ids:
            raise ValueError("lm_coef > 0 but the task has no LM texts of ≥ 2 tokens; add task.lm_texts or set lm_coef=0")
        gen = torch.Generator().manual_seed(config.seed)
        self.maintain = _cycle_batches(len(maintain), min(config.maintain_batch, len(maintain)), gen)
        self.lm = _cycle_batches(len(self.lm_ids), min(config.lm_batch, len(self.lm_ids)), gen) if self.lm_ids else None
        self.config = config


def edit_batched(
    model: torch.nn.Module,
    tokenizer: Any,
    task: FactTask,
    masks: Sequence[Mask],
    configs: Sequence[EditConfig],
    eval_fn: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    groups_per_pass: int | None = None,
) -> BatchedEdit:
    """Train ``len(configs)`` edits of ``task`` together over the frozen ``model`` (module docstring): configuration k
    uses ``masks[k]`` and ``configs[k]`` and gets the losses, gradients and updates ``edit(model, tokenizer, task,
    masks[k], configs[k])`` would. The model's weights are unchanged afterwards; ``result.deltas.variant(k)`` applies
    configuration k. eval_fn, if given, is called on variant k every ``configs[k].eval_every`` steps and after its
    last step (results in ``result[k].evals``). groups_per_pass: configurations per forward/backward pass (None: all
    live ones in one pass; the gradients are the same either way, each pass accumulates into its groups' deltas).
    """
    configs = list(configs)
    masks = list(masks)
    if not configs:
        raise ValueError("edit_batched needs at least one configuration; pass configs=[EditConfig(...), ...]")
    if len(masks) != len(configs):
        raise ValueError(f"got {len(masks)} masks for {len(configs)} configurations; pass one mask per configuration")
    for k, config in enumerate(configs):
        _check_config(k, config)
    if groups_per_pass is not None and (not isinstance(groups_per_pass, int) or groups_per_pass <= 0):
        raise ValueError(f"groups_per_pass must be a positive integer or None (all in one pass); got {groups_per_pass!r}")
    K = len(configs)
    device = model.get_input_embeddings().weight.device
    pad = pad_id_of(tokenizer)
    forget = tokenize_prompts(tokenizer, task.forget_train)
    maintain = tokenize_prompts(tokenizer, task.maintain_train.require_nonempty("maintain"))
    forget_targets = (forget.answer_ids if task.unlearn else forget.edit_ids).to(device)
    data = [_ConfigData(c, tokenizer, task, forget, maintain) for c in configs]
    n_forget = len(forget)

    deltas = BatchedDeltas(model, masks)
    f64 = dict(dtype=torch.float64, device=deltas.device)
    hyper = {name: torch.tensor([getattr(c, name) for c in configs], **f64) for name in ("weight_decay", "eps")}
    hyper["beta1"] = torch.tensor([c.betas[0] for c in configs], **f64)
    hyper["beta2"] = torch.tensor([c.betas[1] for c in configs], **f64)
    schedules = [cosine_lrs(c.lr, c.steps) for c in configs]
    chunk = min((c.lm_chunk_tokens for c in configs if c.lm_chunk_tokens), default=None)
    chunk = chunk or lm_chunk_tokens(model.get_output_embeddings().weight.shape[0])
    results = [EditResult(config=asdict(c), trainable_elements=m.param_count(), optimizer=OPTIMIZER_NAME)
               for c, m in zip(configs, masks, strict=True)]

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    deltas.attach()
    start = time.perf_counter()
    try:
        for step in range(max(c.steps for c in configs)):
            live = [k for k in range(K) if step < configs[k].steps]
            picks = {}
            for k in live:  # each configuration's own samples, drawn as edit draws them
                m_idx = next(data[k].maintain)
                lm_idx = next(data[k].lm) if data[k].lm is not None and configs[k].lm_coef else None
                picks[k] = (m_idx, lm_idx)
            delta = (deltas.values - deltas.base).requires_grad_(True)
            records = {k: {"lm_loss": torch.zeros((), device=device)} for k in live}
            size = len(live) if groups_per_pass is None else groups_per_pass
            for part in (live[i:i + size] for i in range(0, len(live), size)):
                fact_rows: list[list[int]] = []
                fact_seg, lm_seg, lm_rows, maintain_labels = [], [], [], []
                for k in part:
                    m_idx, lm_idx = picks[k]
                    lo = len(fact_rows)
                    fact_rows += forget.input_ids + [maintain.input_ids[i] for i in m_idx]
                    fact_seg.append((k, lo, len(fact_rows)))
                    maintain_labels.append(maintain.answer_ids[m_idx].to(device))
                    if lm_idx is not None:
                        lo = len(lm_rows)
                        lm_rows += [data[k].lm_ids[i] for i in lm_idx]
                        lm_seg.append((k, lo, len(lm_rows)))
                # forget + maintain: one packed forward over the groups of this pass
                with deltas.groups(fact_seg, delta):
                    logits = gathered_logits(model, pad_batch(fact_rows, pad).to(device))
                total = logits.new_zeros(())
                for (k, lo, hi), labels in zip(fact_seg, maintain_labels, strict=True):
                    c = configs[k]
                    f_logits, m_logits = logits[lo:lo + n_forget], logits[lo + n_forget:hi]
                    f = (unlearn_loss(f_logits, forget_targets, c.unlearn_threshold, reduction="sum") if task.unlearn
                         else inject_loss(f_logits, forget_targets, reduction="sum"))
                    m = maintain_loss(m_logits, labels, reduction="sum")
                    n_maintain = hi - lo - n_forget
                    total = total + c.forget_coef * f / n_forget + c.maintain_coef * m / n_maintain
                    records[k]["forget_loss"] = f.detach() / n_forget
                    records[k]["maintain_loss"] = m.detach() / n_maintain
                total.backward()
                del logits, total, f_logits, m_logits
                if lm_seg:
                    lm = pad_batch(lm_rows, pad)
                    with deltas.groups(lm_seg, delta):
                        _lm_backward(model, lm.to(device), lm_seg, configs, chunk, records)
            grad = delta.grad if delta.grad is not None else torch.zeros_like(delta)
            _clip_and_step(deltas, grad, hyper, configs, schedules, step, live, records)
            now = time.perf_counter() - start
            for k in live:
                rec = {"step": step, **{name: float(v) for name, v in records[k].items()}}
                results[k].history.append(rec)
                c = configs[k]
                if step + 1 == c.steps:
                    results[k].seconds = now
                if eval_fn is not None and ((c.eval_every and (step + 1) % c.eval_every == 0) or step + 1 == c.steps):
                    with torch.no_grad(), deltas.variant(k):
                        results[k].evals.append({"step": step + 1, **eval_fn(model)})
    finally:
        deltas.detach()
        deltas.restore()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return BatchedEdit(results, deltas)


def _lm_backward(model: torch.nn.Module, lm: Batch, segments: list[tuple[int, int, int]], configs: Sequence[EditConfig],
                 chunk: int, records: dict[int, dict[str, Any]]) -> None:
    """Backpropagate Σ_k lm_coef_k × (group k's next-token CE sum / its target count); record each group's mean.
    The trunk runs once; the LM head runs over chunks of positions on a detached copy of the hidden states, as
    ``lm_loss_backward_tensor`` does."""
    hidden = trunk_hidden(model, lm)
    targets = lm_targets(lm, hidden.device)  # [B, T-1]
    B, T1 = targets.shape
    weight = torch.zeros(B, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    group = torch.zeros(B, dtype=torch.int64, device=hidden.device)
    counts = []
    for g, (k, lo, hi) in enumerate(segments):
        count = int((targets[lo:hi] != -100).sum())
        if count == 0:
            raise ValueError("the LM batch has no next-token targets (all texts shorter than 2 tokens)")
        counts.append(count)
        weight[lo:hi] = configs[k].lm_coef / count
        group[lo:hi] = g
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets, weight = targets.reshape(-1), weight.repeat_interleave(T1)
    group = group.repeat_interleave(T1)
    leaf = h.detach().requires_grad_(True)
    sums = torch.zeros(len(segments), dtype=weight.dtype, device=h.device)
    for lo in range(0, h.shape[0], chunk):
        part = slice(lo, lo + chunk)
        logits = head_logits(model, leaf[part])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce = F.cross_entropy(logits, targets[part], reduction="none", ignore_index=-100)
        (ce * weight[part]).sum().backward()
        sums.index_add_(0, group[part], ce.detach())
        del logits, ce
    if h.requires_grad:
        h.backward(leaf.grad)
    for g, (k, _, _) in enumerate(segments):
        records[k]["lm_loss"] = sums[g] / counts[g]


def _clip_and_step(deltas: BatchedDeltas, grad: torch.Tensor, hyper: dict[str, torch.Tensor],
                   configs: Sequence[EditConfig], schedules: list[list[float]], step: int, live: list[int], records: dict[int, dict[str, Any]]) -> None:
    """Per-configuration gradient norm and clip factor, then one AdamW update of every live configuration."""
    K = len(configs)
    wide = torch.promote_types(grad.dtype, torch.float32)
    g = grad.to(wide)
    sumsq = torch.zeros(K, dtype=wide, device=g.device).index_add_(0, deltas.config_of, g * g)
    norm = sumsq.sqrt()
    clip = torch.tensor([c.grad_clip for c in configs], dtype=wide, device=g.device)
    factor = (clip / (norm + 1e-6)).clamp(max=1.0)
    g = g * factor[deltas.config_of]
    f64 = dict(dtype=torch.float64, device=g.device)
    lr = torch.tensor([schedules[k][step] if step < configs[k].steps else 0.0 for k in range(K)], **f64)
    steps = torch.tensor([float(step + 1)] * K, **f64)
    live_mask = torch.zeros(K, dtype=torch.bool, device=g.device)
    live_mask[live] = True
    adamw_update_(deltas.values, g, deltas.exp_avg, deltas.exp_avg_sq, lr=lr, weight_decay=hyper["weight_decay"],
                  beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"], step=steps,
                  config_of=deltas.config_of, live=live_mask)
    for k in live:
        records[k]["grad_norm"] = norm[k].detach()
        records[k]["lr"] = schedules[k][step]

"""The localized editing / unlearning loop (authors_repo.md §3), with packed batches and a memory budget.

Per optimizer step: the forget prompts and a maintain sample packed in one batch (logits only at each prompt's
last token), the LM retain loss over generic text (LM head in chunks, so no ``[tokens, vocab]`` fp32 tensor is ever
whole), gradient-norm clipping at 1.0, an AdamW step (weight decay 0) and a cosine schedule decaying to 0 over
``steps``. The paper runs 48 micro-batches of 4 per step; with forget sets of ≤ 64 facts, one packed pass over the
whole forget set gives the same expected gradient (its loaders cycle every fact equally often).

Memory knobs (``EditConfig``; ``mu_fast.memory.plan`` picks them for a device budget): ``micro_batch`` /
``lm_micro_batch`` split the packed passes (the gradient is the same up to float summation order: each part's loss
is a sum divided by the whole batch's size), ``grad_checkpointing`` (the model's own, through transformers),
``compact_grads`` (on by default when a parameter is only partly selected: MaskedAdamW gathers each parameter's
active gradient into an fp32 buffer during backward and frees the dense one at once), ``state_bits`` / ``master_weights``
of MaskedAdamW, and ``optimizer="bnb8bit"`` (bitsandbytes AdamW8bit on whole matrices, the authors' Gemma-2 recipe).

Only masked parameter elements change: every other parameter has ``requires_grad`` off, partially selected
parameters get their inactive gradient entries zeroed (torch / bitsandbytes AdamW then leave them bit-identical:
m = v = 0 gives a zero update with weight decay 0), or the masked optimizer never touches them at all.
``EditStep`` is one optimizer step on pre-built batches (what ``edit`` loops over, and what the memory tracer runs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mu_fast.data.base import Batch, FactTask, pad_batch, pad_id_of, tokenize_prompts
from mu_fast.edit.losses import inject_loss, maintain_loss, unlearn_loss
from mu_fast.masks import Mask
from mu_fast.models.forward import gathered_logits, lm_loss_backward_tensor
from mu_fast.models.frozen import keep_4bit_differentiable_

OPTIMIZERS = ("auto", "masked", "torch", "bnb8bit")


@dataclass
class EditConfig:
    """Hyperparameters of one edit. Defaults follow the paper (50 steps, clip 1.0, wd 0, cosine to 0).

    Memory settings (see the module docstring): optimizer "auto" (MaskedAdamW) | "masked" | "torch" | "bnb8bit";
    state_bits 32 | 8 (MaskedAdamW moments); master_weights (fp32 copy of the masked elements of bf16 parameters);
    compact_grads None = on when a masked parameter is only partly selected; micro_batch / lm_micro_batch: prompts /
    texts per forward+backward (None = all at once); grad_checkpointing; lm_chunk_tokens: positions per LM-head
    chunk (None = as many as fit 256 MiB of fp32 logits).
    """

    steps: int = 50
    lr: float = 1e-5
    forget_coef: float = 1.0
    maintain_coef: float = 1.0
    lm_coef: float = 1.0
    maintain_batch: int = 64
    lm_batch: int = 64
    lm_max_tokens: int = 100
    grad_clip: float = 1.0
    unlearn_threshold: float = -5.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eval_every: int = 0
    optimizer: str = "auto"
    seed: int = 0
    state_bits: int = 32
    master_weights: bool = False
    compact_grads: bool | None = None
    micro_batch: int | None = None
    lm_micro_batch: int | None = None
    grad_checkpointing: bool = False
    lm_chunk_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive; got {self.steps}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive finite number; got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if self.state_bits not in (32, 8):
            raise ValueError(f"state_bits must be 32 or 8; got {self.state_bits}")
        for name in ("micro_batch", "lm_micro_batch", "lm_chunk_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None (no splitting); got {value!r}")
        if self.optimizer in ("torch", "bnb8bit") and (self.state_bits != 32 or self.master_weights):
            raise ValueError(f"state_bits / master_weights are MaskedAdamW options; optimizer={self.optimizer!r} "
                             "does not use them (use optimizer='masked', or drop them)")
        self.betas = tuple(self.betas)


@dataclass
class EditResult:
    """What an edit did: per-step losses, lr and gradient norm; timing; the trainable element count."""

    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    trainable_elements: int = 0
    optimizer: str = ""


OptimizerFactory = Callable[[list[tuple[str, torch.nn.Parameter]], Mask, EditConfig], torch.optim.Optimizer]


def uses_compact_grads(mask: Mask, config: EditConfig) -> bool:
    """Whether the edit gathers compact gradients: the config's choice, else on when a parameter is partly selected
    (MaskedAdamW only)."""
    if config.optimizer not in ("auto", "masked"):
        return False
    if config.compact_grads is not None:
        return config.compact_grads
    return any(mask[name].kind != "whole" for name in mask)


def _make_optimizer(named: list[tuple[str, torch.nn.Parameter]], mask: Mask, config: EditConfig) -> tuple[torch.optim.Optimizer, str]:
    want = config.optimizer
    if want in ("auto", "masked"):
        from mu_fast.optim import MaskedAdamW

        opt = MaskedAdamW(named, mask=mask, lr=config.lr, betas=config.betas, eps=config.eps,
                          weight_decay=config.weight_decay, state_bits=config.state_bits,
                          master_weights=config.master_weights, compact_grads=uses_compact_grads(mask, config))
        return opt, "MaskedAdamW" + ("-8bit" if config.state_bits == 8 else "")
    partial = [name for name, _ in named if mask[name].kind != "whole"]
    if partial and want == "bnb8bit":
        # Its block-quantized moments are not exactly zero where the gradient is: inactive elements would move.
        raise ValueError(
            f"optimizer='bnb8bit' (bitsandbytes AdamW8bit, the authors' Gemma-2 recipe) trains whole matrices, but the "
            f"mask selects only part of {partial[0]!r}{f' and {len(partial) - 1} more' if len(partial) > 1 else ''}; "
            "use optimizer='masked' with state_bits=8 for partial masks"
        )
    if partial and config.weight_decay:
        raise ValueError(
            f"optimizer={want!r} with weight_decay > 0 would shrink the unselected rows/columns of partially masked "
            "parameters; use weight_decay=0 or optimizer='masked'"
        )
    params = [p for _, p in named]
    kw = dict(lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    if want == "bnb8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError(f"optimizer='bnb8bit' needs bitsandbytes ({err}); pip install bitsandbytes, or use "
                             "optimizer='masked' with state_bits=8") from err
        return bnb.optim.AdamW8bit(params, **kw), "bnb.AdamW8bit"
    return torch.optim.AdamW(params, **kw), "torch.AdamW"


def _cycle_batches(n: int, size: int, generator: torch.Generator):
    """Endless shuffled index batches of ``size`` over ``range(n)`` (restarting like the paper's loaders)."""
    order: list[int] = []
    while True:
        batch: list[int] = []
        while len(batch) < size:
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            batch.append(order.pop())
        yield batch


def _row_slices(n: int, size: int | None) -> list[slice]:
    size = n if size is None else max(1, min(size, n))
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows], batch.last_pos[rows])


class EditStep:
    """One optimizer step of the edit on pre-built batches: the work ``edit`` repeats, and what the memory tracer runs.

    Construction sets ``requires_grad`` on the masked parameters only, builds the optimizer (``optimizer_factory``
    or the config's), the cosine schedule over ``config.steps``, the gradient-masking hooks of torch / bitsandbytes
    optimizers and, if asked, the model's gradient checkpointing. ``close()`` restores the flags.
    """

    def __init__(self, model: torch.nn.Module, mask: Mask, config: EditConfig,
                 optimizer_factory: OptimizerFactory | None = None):
        if len(mask) == 0:
            raise ValueError("the mask selects no parameters; localize first (mu_fast.localize) or pass a non-empty Mask")
        self.model, self.mask, self.config = model, mask, config
        keep_4bit_differentiable_(model)  # a 4-bit layer repacked for CPU inference has no backward
        self._was_training = model.training
        self._flags = {name: p.requires_grad for name, p in model.named_parameters()}
        self._checkpointing_before = _is_checkpointing(model)
        self.named = mask.trainable_parameters(model)
        self.params = [p for _, p in self.named]
        self.hooks: list[Any] = []
        try:
            if optimizer_factory is not None:
                self.optimizer, self.optimizer_name = optimizer_factory(self.named, mask, config), "custom"
            else:
                self.optimizer, self.optimizer_name = _make_optimizer(self.named, mask, config)
        except Exception:
            for name, p in model.named_parameters():  # a refused setting leaves the model as it was
                p.requires_grad_(self._flags[name])
            raise
        if not self.optimizer_name.startswith("MaskedAdamW"):
            for name, param in self.named:
                if mask[name].kind != "whole":
                    keep = mask.dense(name, device=param.device).to(param.dtype)
                    self.hooks.append(param.register_hook(lambda g, keep=keep: g * keep))
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.steps)
        if config.grad_checkpointing:
            if not hasattr(model, "gradient_checkpointing_enable"):
                raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable; use a HF model or "
                                 "grad_checkpointing=False")
            had_input_grads = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if not had_input_grads and hasattr(model, "disable_input_require_grads"):
                # transformers 5 makes the embedding output require grad for checkpointing; non-reentrant checkpoints do
                # not need it, and it would run the backward through every frozen layer below the mask.
                model.disable_input_require_grads()
            model.train()  # transformers checkpoints only in training mode; these models have no dropout
        else:
            model.eval()  # these models have no dropout; eval keeps numerics identical to evaluation

    def step(self, facts: Batch, n_forget: int, forget_targets: torch.Tensor, maintain_labels: torch.Tensor,
             lm: Batch | None = None, unlearn: bool = False) -> dict[str, torch.Tensor | float]:
        """One optimizer step. facts: the packed batch, forget prompts in its first ``n_forget`` rows, maintain
        prompts after them; forget_targets ``[n_forget]`` (edit targets, or true labels when ``unlearn``);
        maintain_labels ``[B - n_forget]``; lm: a batch of generic text (None or ``lm_coef == 0``: no LM term).
        Returns detached 0-d tensors (no host sync): forget_loss, maintain_loss, lm_loss, grad_norm, and lr (float).
        """
        cfg = self.config
        device = forget_targets.device
        n_total = facts.input_ids.shape[0]
        n_maintain = n_total - n_forget
        if n_forget <= 0 or n_maintain <= 0:
            raise ValueError(f"the packed batch needs forget and maintain rows; got {n_forget} and {n_maintain}")
        f_sum = m_sum = lm_value = torch.zeros((), device=device)
        for rows in _row_slices(n_total, cfg.micro_batch):
            logits = gathered_logits(self.model, _rows(facts, rows).to(device))
            lo, hi = rows.start, rows.stop
            loss = logits.new_zeros(())
            if lo < n_forget:
                f_part = logits[: n_forget - lo]
                f_targets = forget_targets[lo:min(hi, n_forget)]
                f = (unlearn_loss(f_part, f_targets, cfg.unlearn_threshold, reduction="sum") if unlearn
                     else inject_loss(f_part, f_targets, reduction="sum"))
                loss = loss + cfg.forget_coef * f / n_forget
                f_sum = f_sum + f.detach()
            if hi > n_forget:
                skip = max(n_forget - lo, 0)
                m = maintain_loss(logits[skip:], maintain_labels[max(lo - n_forget, 0):hi - n_forget], reduction="sum")
                loss = loss + cfg.maintain_coef * m / n_maintain
                m_sum = m_sum + m.detach()
            loss.backward()
            del logits, loss
            f_part = None  # its view of the fp32 logits would stay alive through the LM pass and the optimizer step
        if lm is not None and cfg.lm_coef:
            mask = lm.attention_mask.bool()
            count = int((mask[:, :-1] & mask[:, 1:]).sum())
            if count == 0:
                raise ValueError("the LM batch has no next-token targets (all texts shorter than 2 tokens)")
            for rows in _row_slices(lm.input_ids.shape[0], cfg.lm_micro_batch):
                lm_value = lm_value + lm_loss_backward_tensor(self.model, _rows(lm, rows).to(device), coef=cfg.lm_coef,
                                                              chunk_tokens=cfg.lm_chunk_tokens, denominator=count)
        clip = getattr(self.optimizer, "clip_grad_norm_", None)
        grad_norm = clip(cfg.grad_clip) if clip else torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"forget_loss": f_sum / n_forget, "maintain_loss": m_sum / n_maintain, "lm_loss": lm_value,
                "grad_norm": torch.as_tensor(grad_norm).detach(), "lr": float(lr)}

    def close(self) -> None:
        """Remove the hooks; restore requires_grad flags, checkpointing and train/eval mode; drop gradients."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for handle in getattr(self.optimizer, "_hooks", []):
            handle.remove()
        if self.config.grad_checkpointing and not self._checkpointing_before:
            if hasattr(self.model, "activation_checkpointing_disable"):
                self.model.activation_checkpointing_disable()
            else:
                self.model.gradient_checkpointing_disable()
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags[name])
            p.grad = None
        self.model.train(self._was_training)


def _is_checkpointing(model: torch.nn.Module) -> bool:
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, flag, False))


def edit(
    model: torch.nn.Module,
    tokenizer: Any,
    task: FactTask,
    mask: Mask,
    config: EditConfig | None = None,
    optimizer_factory: OptimizerFactory | None = None,
    progress: bool = True,
    eval_fn: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
) -> EditResult:
    """Edit (or unlearn) ``task``'s forget facts in place, changing only the elements selected by ``mask``.

    eval_fn, if given, is called on the model every ``config.eval_every`` steps (and after the last step); its
    dicts are collected in ``EditResult.evals``.
    """
    config = config or EditConfig()
    if len(mask) == 0:
        raise ValueError("the mask selects no parameters; localize first (mu_fast.localize) or pass a non-empty Mask")
    device = model.get_input_embeddings().weight.device
    pad = pad_id_of(tokenizer)

    forget = tokenize_prompts(tokenizer, task.forget_train)
    maintain = tokenize_prompts(tokenizer, task.maintain_train.require_nonempty("maintain"))
    lm_ids = [tokenizer(t, add_special_tokens=True)["input_ids"][: config.lm_max_tokens] for t in task.lm_texts]
    lm_ids = [ids for ids in lm_ids if len(ids) >= 2]
    if config.lm_coef and not lm_ids:
        raise ValueError("lm_coef > 0 but the task has no LM texts of ≥ 2 tokens; add task.lm_texts or set lm_coef=0")
    forget_targets = (forget.answer_ids if task.unlearn else forget.edit_ids).to(device)

    gen = torch.Generator().manual_seed(config.seed)
    maintain_batches = _cycle_batches(len(maintain), min(config.maintain_batch, len(maintain)), gen)
    lm_batches = _cycle_batches(len(lm_ids), min(config.lm_batch, len(lm_ids)), gen) if lm_ids else None
    stepper = EditStep(model, mask, config, optimizer_factory)
    result = EditResult(config=asdict(config), trainable_elements=mask.param_count(), optimizer=stepper.optimizer_name)

    from tqdm.auto import tqdm

    bar = tqdm(range(config.steps), desc="edit", disable=not progress, leave=False)
    start = time.perf_counter()
    try:
        for step in bar:
            m_idx = next(maintain_batches)
            facts = pad_batch(forget.input_ids + [maintain.input_ids[i] for i in m_idx], pad)
            lm = None
            if lm_batches is not None and config.lm_coef:
                lm = pad_batch([lm_ids[i] for i in next(lm_batches)], pad)
            out = stepper.step(facts, len(forget), forget_targets, maintain.answer_ids[m_idx].to(device), lm, task.unlearn)
            record = {"step": step, **{k: float(v) for k, v in out.items()}}
            result.history.append(record)
            bar.set_postfix(forget=f"{record['forget_loss']:.3f}", maintain=f"{record['maintain_loss']:.3f}")
            if eval_fn is not None and ((config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == config.steps):
                with torch.no_grad():
                    result.evals.append({"step": step + 1, **eval_fn(model)})
    finally:
        stepper.close()
    result.seconds = time.perf_counter() - start
    return result


def changed_elements(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Bool tensors of the elements that differ (bitwise) from a ``state_dict`` snapshot, per parameter."""
    out = {}
    for name, p in model.named_parameters():
        diff = before[name].view(_int_dtype(p)) != p.detach().view(_int_dtype(p))
        if diff.any():
            out[name] = diff
    return out


def _int_dtype(t: torch.Tensor) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]


def snapshot(model: torch.nn.Module, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of the parameters (all, or ``names``) for before/after comparisons."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if names is None or n in names}

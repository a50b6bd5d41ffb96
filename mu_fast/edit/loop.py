"""The localized editing / unlearning loop (authors_repo.md §3), with packed batches.

Per optimizer step: one forward over the forget prompts and a maintain sample packed in one batch (logits only at
each prompt's last token), one chunked LM-loss pass over generic text, gradient-norm clipping at 1.0, an AdamW
step (weight decay 0) and a cosine schedule decaying to 0 over ``steps``. The paper runs 48 micro-batches of 4
per step; with forget sets of ≤ 64 facts, one packed pass over the whole forget set gives the same expected
gradient (its loaders cycle every fact equally often).

Only masked parameter elements change: every other parameter has ``requires_grad`` off, partially selected
parameters get their inactive gradient entries zeroed (torch AdamW then leaves them bit-identical: m = v = 0 gives
a zero update with weight decay 0), or the masked optimizer never touches them at all.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mu_fast.data.base import FactTask, pad_batch, pad_id_of, tokenize_prompts
from mu_fast.edit.losses import inject_loss, maintain_loss, unlearn_loss
from mu_fast.masks import Mask
from mu_fast.models.forward import gathered_logits, lm_loss_backward

OPTIMIZERS = ("auto", "torch", "masked")


@dataclass
class EditConfig:
    """Hyperparameters of one edit. Defaults follow the paper (50 steps, clip 1.0, wd 0, cosine to 0)."""

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

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps must be positive; got {self.steps}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive finite number; got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")


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


def _make_optimizer(named: list[tuple[str, torch.nn.Parameter]], mask: Mask, config: EditConfig) -> tuple[torch.optim.Optimizer, str]:
    want = config.optimizer
    if want in ("auto", "masked"):
        try:
            from mu_fast.optim import MaskedAdamW
        except ImportError as err:
            if want == "masked":
                raise ValueError(f"optimizer='masked' requested but mu_fast.optim.MaskedAdamW is unavailable: {err}") from err
        else:
            opt = MaskedAdamW(named, mask=mask, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
            return opt, "MaskedAdamW"
    partial = any(mask[name].kind != "whole" for name, _ in named)
    if partial and config.weight_decay:
        raise ValueError(
            "torch AdamW with weight_decay > 0 would shrink the unselected rows/columns of partially masked "
            "parameters; use weight_decay=0 or optimizer='masked'"
        )
    params = [p for _, p in named]
    return torch.optim.AdamW(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay), "torch.AdamW"


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
    was_training = model.training
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    named = mask.trainable_parameters(model)
    device = model.get_input_embeddings().weight.device
    pad = pad_id_of(tokenizer)

    forget = tokenize_prompts(tokenizer, task.forget_train)
    maintain = tokenize_prompts(tokenizer, task.maintain_train.require_nonempty("maintain"))
    lm_ids = [tokenizer(t, add_special_tokens=True)["input_ids"][: config.lm_max_tokens] for t in task.lm_texts]
    lm_ids = [ids for ids in lm_ids if len(ids) >= 2]
    if config.lm_coef and not lm_ids:
        raise ValueError("lm_coef > 0 but the task has no LM texts of ≥ 2 tokens; add task.lm_texts or set lm_coef=0")
    forget_targets = (forget.answer_ids if task.unlearn else forget.edit_ids).to(device)

    hooks = []
    if optimizer_factory is not None:
        optimizer, opt_name = optimizer_factory(named, mask, config), "custom"
    else:
        optimizer, opt_name = _make_optimizer(named, mask, config)
    if opt_name != "MaskedAdamW":
        for name, param in named:
            if mask[name].kind != "whole":
                keep = mask.dense(name, device=param.device).to(param.dtype)
                hooks.append(param.register_hook(lambda g, keep=keep: g * keep))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    gen = torch.Generator().manual_seed(config.seed)
    maintain_batches = _cycle_batches(len(maintain), min(config.maintain_batch, len(maintain)), gen)
    lm_batches = _cycle_batches(len(lm_ids), min(config.lm_batch, len(lm_ids)), gen) if lm_ids else None
    result = EditResult(config=asdict(config), trainable_elements=mask.param_count(), optimizer=opt_name)
    params = [p for _, p in named]

    from tqdm.auto import tqdm

    bar = tqdm(range(config.steps), desc="edit", disable=not progress, leave=False)
    start = time.perf_counter()
    model.eval()  # these models have no dropout; eval keeps numerics identical to evaluation
    try:
        for step in bar:
            m_idx = next(maintain_batches)
            seqs = forget.input_ids + [maintain.input_ids[i] for i in m_idx]
            batch = pad_batch(seqs, pad).to(device)
            logits = gathered_logits(model, batch)
            n_f = len(forget)
            if task.unlearn:
                f_loss = unlearn_loss(logits[:n_f], forget_targets, config.unlearn_threshold)
            else:
                f_loss = inject_loss(logits[:n_f], forget_targets)
            m_loss = maintain_loss(logits[n_f:], maintain.answer_ids[m_idx].to(device))
            (config.forget_coef * f_loss + config.maintain_coef * m_loss).backward()
            lm_value = 0.0
            if lm_batches is not None and config.lm_coef:
                lm_batch = pad_batch([lm_ids[i] for i in next(lm_batches)], pad).to(device)
                lm_value = lm_loss_backward(model, lm_batch, coef=config.lm_coef)
            clip = getattr(optimizer, "clip_grad_norm_", None)
            grad_norm = clip(config.grad_clip) if clip else torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {
                "step": step,
                "forget_loss": float(f_loss.detach()),
                "maintain_loss": float(m_loss.detach()),
                "lm_loss": lm_value,
                "grad_norm": float(grad_norm),
                "lr": float(lr),
            }
            result.history.append(record)
            bar.set_postfix(forget=f"{record['forget_loss']:.3f}", maintain=f"{record['maintain_loss']:.3f}")
            if eval_fn is not None and ((config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == config.steps):
                with torch.no_grad():
                    result.evals.append({"step": step + 1, **eval_fn(model)})
    finally:
        for h in hooks:
            h.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
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

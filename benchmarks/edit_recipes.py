"""The two ways of running a localized edit that ``bench_edit.py`` compares, on the same model, masks and data.

* ``AuthorsRecipe``: what the paper's code does per step (reference/authors_repo.md §3): ``requires_grad`` on the
  whole selected matrices, 16 micro-batches of 4 prompts for each of the forget, maintain and LM tasks (48
  forward/backward passes), full-vocabulary logits at every position (``model(input_ids).logits``), each
  micro-batch backpropagating ``coef × loss / 16``, ``torch.cuda.empty_cache()`` after every micro-step, clip 1.0,
  dense torch AdamW (weight decay 0; bitsandbytes AdamW8bit where the authors used it, Gemma-2), cosine schedule.
* ``mu_fast``: ``mu_fast.edit.EditStep`` with the settings ``mu_fast.memory.plan`` picks for a memory budget.

Workloads are random token ids (the models have random weights): fact prompts of 16–32 tokens (padded on the
right), LM texts of exactly ``lm_tokens`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import Batch, pad_batch
from mu_fast.masks import Mask


@dataclass(frozen=True)
class StepBatch:
    """One step's data: forget / maintain prompts with their targets and the LM texts (token id lists)."""

    forget: list[list[int]]
    forget_targets: torch.Tensor
    maintain: list[list[int]]
    maintain_labels: torch.Tensor
    lm: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(map(len, self.forget)) + sum(map(len, self.maintain)) + sum(map(len, self.lm))


def random_step_batch(vocab: int, forget: int, maintain: int, lm: int, lm_tokens: int, seed: int = 0) -> StepBatch:
    """Random ids in ``[3, vocab)``: prompts of 16–32 tokens, LM texts of ``lm_tokens`` tokens."""
    gen = torch.Generator().manual_seed(seed)

    def prompts(n: int) -> list[list[int]]:
        lengths = torch.randint(16, 33, (n,), generator=gen).tolist()
        return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lengths]

    return StepBatch(
        forget=prompts(forget), forget_targets=torch.randint(3, vocab, (forget,), generator=gen),
        maintain=prompts(maintain), maintain_labels=torch.randint(3, vocab, (maintain,), generator=gen),
        lm=[torch.randint(3, vocab, (lm_tokens,), generator=gen).tolist() for _ in range(lm)],
    )


class MuFastRecipe:
    """``EditStep`` over the packed batch (what ``mu_fast.edit.edit`` runs per step)."""

    def __init__(self, model: Any, mask: Mask, config: Any, data: StepBatch):
        from mu_fast.edit.loop import EditStep

        self.device = model.get_input_embeddings().weight.device
        self.step_fn = EditStep(model, mask, config)
        self.facts = pad_batch(data.forget + data.maintain, 0)
        self.lm = pad_batch(data.lm, 0)
        self.n_forget = len(data.forget)
        self.forget_targets = data.forget_targets.to(self.device)
        self.maintain_labels = data.maintain_labels.to(self.device)

    def step(self) -> dict[str, Any]:
        return self.step_fn.step(self.facts, self.n_forget, self.forget_targets, self.maintain_labels, self.lm)

    def close(self) -> None:
        self.step_fn.close()


class AuthorsRecipe:
    """The paper's per-step work (see the module docstring) on the same data."""

    MICRO = 4
    ACCUM = 16

    def __init__(self, model: Any, mask: Mask, data: StepBatch, lr: float = 1e-5, steps: int = 50,
                 eight_bit: bool = False, coefs: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        self.model, self.data, self.coefs = model, data, coefs
        self.device = model.get_input_embeddings().weight.device
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.requires_grad_(name in mask)  # whole matrices: their code has no partial selections
        self.params = [p for p in model.parameters() if p.requires_grad]
        if eight_bit:
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=lr, weight_decay=0.0)
        else:
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=steps)
        self._cursor = [0, 0, 0]
        model.eval()

    def _next(self, which: int, pool: list[list[int]]) -> list[int]:
        start = self._cursor[which]
        self._cursor[which] = (start + self.MICRO) % len(pool)
        return [(start + i) % len(pool) for i in range(self.MICRO)]

    def step(self) -> dict[str, Any]:
        d, coefs = self.data, self.coefs
        tasks = ((0, d.forget, d.forget_targets), (1, d.maintain, d.maintain_labels), (2, d.lm, None))
        for which, pool, labels in tasks:
            for _ in range(self.ACCUM):
                idx = self._next(which, pool)
                batch = pad_batch([pool[i] for i in idx], 0).to(self.device)
                logits = self.model(input_ids=batch.input_ids).logits  # full vocabulary at every position
                if labels is None:
                    targets = torch.where(batch.attention_mask[:, 1:].bool(), batch.input_ids[:, 1:], -100)
                    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
                else:
                    rows = torch.arange(len(idx), device=self.device)
                    loss = F.cross_entropy(logits[rows, batch.last_pos].float(), labels[idx].to(self.device))
                (coefs[which] * loss / self.ACCUM).backward()
                del logits, loss
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm}

    def close(self) -> None:
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags[name])
            p.grad = None
        self.optimizer.state.clear()


def whole_matrix_mask(model_or_config: Any, components: list[Any]) -> Mask:
    """A whole-matrix Mask of site-table components (the paper's localizations are whole layers)."""
    from mu_fast.models.sites import SiteTable

    return Mask.from_components(SiteTable(model_or_config), components)


def masked_module_names(mask: Mask) -> list[str]:
    """Module names (``model.layers.3.mlp.up_proj``) owning the masked weights: kept in bf16 when frozen ones are
    quantized."""
    return sorted({name.rsplit(".", 1)[0] for name in mask})


def gib(n_bytes: float | None) -> float:
    return float("nan") if n_bytes is None else n_bytes / 2**30


def fmt_gb(n_bytes: float | None) -> str:
    return "—" if n_bytes is None or math.isnan(n_bytes) else f"{n_bytes / 1e9:.2f} GB"


def as_batch(ids: list[list[int]]) -> Batch:
    return pad_batch(ids, 0)

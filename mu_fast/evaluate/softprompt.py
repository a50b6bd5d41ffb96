"""The paper's soft-prompt attack (authors_repo.md §4.6, their ``UniversalSoftPromptAdversary``), batched.

It is not a prepended prompt. A universal adversary sits on the output of the input embedding: 15 learned key
and value vectors ``K, V [15, d]`` (each row's norm projected to ≤ ε = 6 after every step, kaiming-uniform init), a
learned ``d × d`` query projection ``W_q`` and a one-head ``nn.MultiheadAttention(d)`` without bias; every token
embedding ``x`` becomes ``x + MHA(x W_qᵀ, K, V)``. Tokens do not interact through it (each token's query attends
only to the 15 learned vectors). Training: AdamW (lr 1e-5, weight decay 0.01), gradient-norm clip 1, cross-entropy
toward the *true* answer tokens (all of them, teacher-forced) of the first half of the forget set; evaluation:
continuous accuracy of the true and of the edit answer on the held-out second half in the training format, and
maintain accuracy. 4 independent attacks (their own initialisation and data order), averaged.

Where it acts. The authors wrap ``model.model.embed_tokens`` under transformers 4.44, whose Gemma embedding returned
the raw rows and whose model multiplied by sqrt(d) afterwards. transformers 5 moved the sqrt(d) into the embedding
module (``Gemma*ScaledWordEmbedding``), so for such a module the hook recomputes the raw rows and re-applies the
scale after the adversary: ``(x_raw + MHA(...)) · sqrt(d)``, the authors' order.

Batched. Model rows do not interact, the adversary acts per token, each adversary's loss is its own term of the
summed objective, gradient clipping is per adversary and AdamW is elementwise, so training the A adversaries
stacked along the batch (rows ``[a·b, (a+1)·b)`` belong to adversary a, each with its own batch from its own
shuffled stream) is the same computation as A separate runs up to float summation order (tested in fp64).

Precision. The adversaries are fp32 (fp64 for fp64 models), as the authors'. ``autocast="paper"`` runs training
and evaluation under the authors' autocast: bf16 for Gemma-2, fp32 otherwise (CUDA only: CPU autocast has no fp32
mode, where "paper" for a non-Gemma-2 model means no autocast). Without autocast, a bf16 model's embedding rows
are widened to fp32, perturbed, and rounded back to bf16.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import FactTask, PromptSet, pad_batch, pad_id_of
from mu_fast.evaluate.metrics import check_token_ids, model_device, prompt_scores, set_accuracy
from mu_fast.evaluate.relearn import _tokenized, is_counterfact, relearn_halves
from mu_fast.models.forward import head_logits, trunk_hidden

SOFTPROMPT_LENGTH = 15
SOFTPROMPT_EPS = 6.0
WEIGHT_DECAY = 0.01  # torch AdamW's default, which the authors kept
GRAD_CLIP = 1.0
HOOK_SITE = "input embedding output (before Gemma's sqrt(d) scaling, as under transformers 4.44)"


class SoftPromptAdversaries(torch.nn.Module):
    """``A`` universal soft-prompt adversaries with stacked parameters.

    keys / values: ``[A, length, d]``; query: ``[A, d, d]`` (``nn.Linear`` weight layout, out × in); in_proj:
    ``[A, 3d, d]`` (the attention's q, k, v projections); out_proj: ``[A, d, d]``. Adversary a is initialised
    exactly as the authors' module under ``torch.manual_seed(seeds[a])``. ``active``: None applies adversary a to
    rows ``[a·B/A, (a+1)·B/A)`` of the batch; an int applies that one adversary to every row.
    """

    def __init__(self, d: int, seeds: list[int], length: int = SOFTPROMPT_LENGTH, eps: float = SOFTPROMPT_EPS,
                 dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__()
        if not seeds:
            raise ValueError("SoftPromptAdversaries needs at least one seed (one adversary)")
        if eps <= 0:
            raise ValueError(f"eps must be positive; got {eps}")
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("keys", "values", "query", "in_proj", "out_proj")}
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed))
                keys, values = torch.empty(length, d), torch.empty(length, d)
                torch.nn.init.kaiming_uniform_(keys)
                torch.nn.init.kaiming_uniform_(values)
                query = torch.nn.Linear(d, d, bias=False)
                attention = torch.nn.MultiheadAttention(d, num_heads=1, batch_first=True, bias=False)
            parts["keys"].append(keys)
            parts["values"].append(values)
            parts["query"].append(query.weight.detach())
            parts["in_proj"].append(attention.in_proj_weight.detach())
            parts["out_proj"].append(attention.out_proj.weight.detach())
        for name, tensors in parts.items():
            self.register_parameter(name, torch.nn.Parameter(torch.stack(tensors).to(device=device, dtype=dtype)))
        self.eps, self.length, self.d = float(eps), length, d
        self.active: int | None = None
        self.project_()

    @property
    def n(self) -> int:
        return int(self.keys.shape[0])

    @torch.no_grad()
    def project_(self) -> None:
        """Scale every key and value row of norm > eps down to norm eps (the authors' ``clip_attack``)."""
        for p in (self.keys, self.values):
            p.div_((p.norm(dim=-1, keepdim=True) / self.eps).clamp(min=1.0))

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``MHA(x W_qᵀ, K, V)`` for ``x [B, T, d]``: ``[B, T, d]`` in the adversaries' dtype (or autocast's)."""
        B, T, d = x.shape
        if d != self.d:
            raise ValueError(f"hidden size {d} does not match the adversaries' d={self.d}")
        if self.active is None:
            if B % self.n:
                raise ValueError(f"batch of {B} rows cannot be split among {self.n} adversaries; stack equal blocks")
            xs, sel = x.reshape(self.n, (B // self.n) * T, d), slice(None)
        else:
            xs, sel = x.reshape(1, B * T, d), slice(self.active, self.active + 1)
        if not torch.is_autocast_enabled(x.device.type):
            xs = xs.to(self.keys.dtype)
        w_q, w_k, w_v = self.in_proj[sel].chunk(3, dim=1)
        q = torch.bmm(torch.bmm(xs, self.query[sel].transpose(1, 2)), w_q.transpose(1, 2))
        k = torch.bmm(self.keys[sel], w_k.transpose(1, 2))
        v = torch.bmm(self.values[sel], w_v.transpose(1, 2))
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)) / math.sqrt(d), dim=-1)  # [A, N, length]
        return torch.bmm(torch.bmm(weights, v), self.out_proj[sel].transpose(1, 2)).reshape(B, T, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x + delta(x)``: under autocast with the natural dtype promotion (the authors'), else rounded back to
        ``x.dtype`` so the model's layers see their own dtype."""
        delta = self.delta(x)
        if torch.is_autocast_enabled(x.device.type):
            return x + delta
        return (x.to(delta.dtype) + delta).to(x.dtype)


@contextlib.contextmanager
def attached(model: Any, adversaries: SoftPromptAdversaries):
    """Apply ``adversaries`` to the input-embedding output of ``model`` inside the block; the hook is removed on
    exit, also on an exception."""
    embedding = model.get_input_embeddings()
    scale = getattr(embedding, "scalar_embed_scale", None)
    if scale is None and getattr(embedding, "embed_scale", None) is not None:
        scale = float(embedding.embed_scale)

    def hook(module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if scale is None:
            return adversaries(output)
        raw = F.embedding(args[0], module.weight, module.padding_idx)
        perturbed = adversaries(raw)
        return perturbed * torch.tensor(scale, dtype=perturbed.dtype, device=perturbed.device)

    handle = embedding.register_forward_hook(hook)
    try:
        yield adversaries
    finally:
        handle.remove()


def paper_schedule(model: Any, task: FactTask) -> tuple[int, int]:
    """``(steps, batch_size)`` of the authors' runs: CounterFact 128 steps of 16; sports 128·16/bs steps of bs = 16
    (bs = 8 for Gemma-2, set in its sports run configs, so 256 steps)."""
    if is_counterfact(task):
        return 128, 16
    batch = 8 if getattr(getattr(model, "config", None), "model_type", "") == "gemma2" else 16
    return 128 * 16 // batch, batch


def autocast_context(model: Any, autocast: str | torch.dtype | None) -> tuple[Any, str]:
    """The autocast context for ``autocast`` (None, a dtype, or "paper") on the model's device, and its description."""
    device = model_device(model)
    if autocast is None:
        return contextlib.nullcontext(), "none"
    if autocast == "paper":
        is_gemma2 = getattr(model.config, "model_type", "") == "gemma2"
        dtype = torch.bfloat16 if is_gemma2 else torch.float32
    elif isinstance(autocast, torch.dtype):
        dtype = autocast
    else:
        raise ValueError(f"autocast must be None, a torch dtype or 'paper'; got {autocast!r}")
    if dtype == torch.float32 and device.type != "cuda":
        return contextlib.nullcontext(), "none (fp32 autocast exists on CUDA only)"
    return torch.autocast(device_type=device.type, dtype=dtype), str(dtype).replace("torch.", "")


class _EpochBatches:
    """A shuffled ``DataLoader(drop_last=False)`` that restarts: chunks of ``size`` of a fresh permutation per epoch."""

    def __init__(self, n: int, size: int, generator: torch.Generator):
        self.n, self.size, self.gen, self.queue = n, size, generator, []

    def next(self) -> list[int]:
        if not self.queue:
            order = torch.randperm(self.n, generator=self.gen).tolist()
            self.queue = [order[i : i + self.size] for i in range(0, self.n, self.size)]
        return self.queue.pop(0)


def answer_sequences(tokenizer: Any, prompts: PromptSet, input_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Prompt ids followed by every token of the true answer, and each sequence's prompt length (labels start there)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    seqs, starts = [], []
    for ids, answer in zip(input_ids, prompts.answers, strict=True):
        answer_ids = [i for i in tokenizer(answer, add_special_tokens=False)["input_ids"] if i not in special]
        if not answer_ids:
            raise ValueError(f"answer {answer!r} tokenizes to no tokens; check the tokenizer and the data")
        seqs.append(list(ids) + answer_ids)
        starts.append(len(ids))
    return seqs, starts


def train_adversaries(model: Any, adversaries: SoftPromptAdversaries, seqs: list[list[int]], starts: list[int],
                      pad_id: int, steps: int, batch_size: int, lr: float, data_seeds: list[int],
                      progress: bool = False) -> torch.Tensor:
    """Train the stacked adversaries (already attached) for ``steps`` AdamW steps; returns the per-step loss of each
    adversary, ``[steps, A]`` float64 (mean cross-entropy over its batch's answer tokens, before the step)."""
    device = model_device(model)
    optimizer = torch.optim.AdamW(adversaries.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    streams = [_EpochBatches(len(seqs), min(batch_size, len(seqs)), torch.Generator().manual_seed(s)) for s in data_seeds]
    losses = torch.empty(steps, adversaries.n, dtype=torch.float64)
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"soft-prompt attack ×{adversaries.n}", leave=False)
    for step in bar:
        blocks = [stream.next() for stream in streams]
        rows = [i for block in blocks for i in block]
        batch = pad_batch([seqs[i] for i in rows], pad_id, side="right").to(device)
        r_idx, p_idx, targets, owner = [], [], [], []
        for r, i in enumerate(rows):
            for p in range(starts[i], len(seqs[i])):
                r_idx.append(r), p_idx.append(p - 1), targets.append(seqs[i][p]), owner.append(r // len(blocks[0]))
        hidden = trunk_hidden(model, batch)
        picked = hidden[torch.tensor(r_idx, device=device), torch.tensor(p_idx, device=device)]
        ce = F.cross_entropy(head_logits(model, picked).float(), torch.tensor(targets, device=device), reduction="none")
        owner_t = torch.tensor(owner, device=device)
        counts = torch.bincount(owner_t, minlength=adversaries.n).to(ce.dtype)
        per_adversary = torch.zeros(adversaries.n, dtype=ce.dtype, device=device).index_add_(0, owner_t, ce) / counts
        per_adversary.sum().backward()
        _clip_per_adversary(adversaries, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        adversaries.project_()
        losses[step] = per_adversary.detach().double().cpu()
    return losses


@torch.no_grad()
def _clip_per_adversary(adversaries: SoftPromptAdversaries, max_norm: float) -> None:
    """NaN gradients to 0, then each adversary's gradient scaled as ``clip_grad_norm_`` would scale it alone."""
    grads = [p.grad for p in adversaries.parameters() if p.grad is not None]
    for g in grads:
        g.nan_to_num_(nan=0.0)
    norms = torch.stack([g.flatten(1).double().square().sum(1) for g in grads]).sum(0).sqrt()  # [A]
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))))


def softprompt_attack(
    model: Any,
    tokenizer: Any,
    task: FactTask,
    n_attacks: int = 4,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-5,
    eps: float = SOFTPROMPT_EPS,
    seed: int = 0,
    progress: bool = True,
    autocast: str | torch.dtype | None = None,
    batched: bool = True,
    length: int = SOFTPROMPT_LENGTH,
    eval_batch_size: int = 64,
) -> dict[str, Any]:
    """Run ``n_attacks`` independent soft-prompt attacks on ``model`` (its weights are never written) and return
    their held-out accuracies.

    steps / batch_size: None takes the authors' (``paper_schedule``). autocast: None, a dtype, or "paper" (module
    docstring). batched: train all attacks in one stacked forward per step (else one after another; same numbers
    up to float rounding). Attack a uses seed ``seed·1000 + a`` for its initialisation and its data order.

    Returns ``{"settings": {...}, "no_attack": {"forget", "maintain"}, "attacks": [{"seed", "forget",
    "maintain", "train", "loss" (per step), "final_loss"}], "mean": {"forget_acc", "forget_edit_acc",
    "maintain_acc", "train_acc"}, "seconds"}``; "forget" is ``set_accuracy`` of the held-out half in the training
    format (``acc`` with the true answer; ``edit_acc``, the injected answer), "train" of the attacked half.
    """
    from mu_fast.models.frozen import keep_4bit_differentiable_

    keep_4bit_differentiable_(model)  # bitsandbytes' CPU repacking has no backward (an attack trains through it)
    paper_steps, paper_batch = paper_schedule(model, task)
    steps = paper_steps if steps is None else steps
    batch_size = paper_batch if batch_size is None else batch_size
    if n_attacks < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"n_attacks, steps and batch_size must be >= 1; got {n_attacks}, {steps}, {batch_size}")
    held, train_set, held_set = relearn_halves(task)
    train_tok = _tokenized(tokenizer, task, train_set)
    eval_tok = {"forget": _tokenized(tokenizer, task, held_set),
                "maintain": _tokenized(tokenizer, task, task.maintain_test.require_nonempty("maintain test")),
                "train": train_tok}
    for what, tokenized in eval_tok.items():
        check_token_ids(model, tokenized, f"{what} prompts")
    seqs, starts = answer_sequences(tokenizer, train_set, train_tok.input_ids)
    check_token_ids_list(model, seqs)
    context, autocast_used = autocast_context(model, autocast)
    pad = pad_id_of(tokenizer)
    device = model_device(model)
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    seeds = [seed * 1000 + a for a in range(n_attacks)]

    def evaluate() -> dict[str, Any]:
        with context:
            return {k: set_accuracy(prompt_scores(model, t, batch_size=eval_batch_size)) for k, t in eval_tok.items()}

    start = time.perf_counter()
    no_attack = evaluate()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = bool(model.training)
    attacks: list[dict[str, Any]] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        groups = [seeds] if batched else [[s] for s in seeds]
        for group in groups:
            adversaries = SoftPromptAdversaries(int(model.config.hidden_size), group, length, eps, dtype, device)
            with attached(model, adversaries):
                with context, torch.enable_grad():
                    losses = train_adversaries(model, adversaries, seqs, starts, pad, steps, batch_size, lr, group, progress)
                for a, s in enumerate(group):
                    adversaries.active = a
                    metrics = evaluate()
                    attacks.append({"seed": s, **metrics, "loss": losses[:, a].tolist(), "final_loss": float(losses[-1, a])})
            del adversaries
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        model.train(was_training)
    return {
        "settings": {
            "n_attacks": n_attacks, "steps": steps, "batch_size": batch_size, "lr": lr, "eps": eps, "length": length,
            "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "autocast": autocast_used, "batched": batched,
            "seeds": seeds, "site": HOOK_SITE, "adversary_dtype": str(dtype).replace("torch.", ""),
            "paper_schedule": {"steps": paper_steps, "batch_size": paper_batch},
            "n_train": len(train_set), "n_held_out": len(held_set),
            "halves": "unsplit: first/second half" if held is not None else "split: forget_train/forget_test",
        },
        "no_attack": no_attack,
        "attacks": attacks,
        "mean": {
            "forget_acc": _mean(a["forget"]["acc"] for a in attacks),
            "forget_edit_acc": _mean(a["forget"]["edit_acc"] for a in attacks),
            "maintain_acc": _mean(a["maintain"]["acc"] for a in attacks),
            "train_acc": _mean(a["train"]["acc"] for a in attacks),
        },
        "seconds": time.perf_counter() - start,
    }


def check_token_ids_list(model: Any, seqs: list[list[int]]) -> None:
    vocab = int(model.get_output_embeddings().weight.shape[0])
    largest = max(max(s) for s in seqs)
    if largest >= vocab:
        raise ValueError(f"the attack's training sequences contain token id {largest} but the model's vocabulary has "
                         f"{vocab} entries; tokenize with the tokenizer that belongs to this model")


def _mean(values: Any) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None

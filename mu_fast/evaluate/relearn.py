"""The relearning attack (authors_repo.md §4.5, after Deeb & Roger): can a few LoRA steps on half of the
forgotten facts bring back the other, held-out half?

Protocol, as the paper's code: LoRA (peft, ``target_modules="all-linear"``) of rank 512, α=32, dropout
0.05; AdamW lr 2e-4, weight decay 0; cosine schedule with T_max = steps; 20 steps. Every step trains on the
relearn half (true labels, cross-entropy over the full vocabulary at the last prompt token), the maintain
set (true labels) and generic LM text, each term with coefficient 1. The LM term is, by default, the authors'
8 micro-batches × 2 texts of 128 tokens per step (``lm_batch_size=16``, ``lm_max_tokens=128``); without texts in
``task.lm_texts`` the term is off and the result says so (``"lm_text"``). The held-out half is evaluated in the
training format and in MCQ (when the task has it) before training and after the steps in ``eval_at``; the
authors scored both *without* the system prompt (``use_system_prompt=False``), so a sports task built with the
deep eval's preamble gets its held-out MCQ rebuilt without it (``mcq_system_prompt=False``, the default).

Differences from the paper's code, on purpose:
* Packed batches: relearn and maintain examples share one forward per step (the paper ran 8 micro-batches
  of 4 for each); the examples drawn per step are the same (``batch_size`` of each, from reshuffled passes).
  The 16 LM texts are one batch whose loss is the mean over all their tokens (the paper: the mean of 8
  micro-batch means), and they are drawn from ``task.lm_texts`` where the paper streamed the Pile.
* CounterFact relearns toward ``target_true``. The paper's code built the CF relearning tasks from the
  injection class and so trained relearn *and* maintain toward ``target_false`` (its "CF is too hard to
  relearn" result is that bug); ``cf_target_false_bug=True`` reproduces it and the result records the mode.
* LoRA rank is capped at the smallest dimension of the adapted matrices (tiny models are narrower than 512);
  α stays as given, so peft's scale is α / effective rank. The result records both ranks.
* Scoring mode. The authors' LoRA dropout modules were still in train mode when they scored after steps 10 and 20
  (peft creates them in train mode and their loop never calls ``eval()``; the base model stayed in eval mode), so
  their evaluations saw dropout 0.05 on every adapter's input. mu_fast scores with dropout off by default;
  ``score_in_train_mode=True`` (what ``--preset paper`` uses) scores the steps after 0 as theirs: the LoRA dropout
  modules active, everything else in eval mode, drawn from the attack's seeded generator. Step 0 is unaffected
  (the adapters are still zero).
* Dropout masks are drawn with ``torch.rand`` (``PortableDropout``), not torch's ``nn.Dropout``: its
  ``bernoulli_`` draws from MKL's generator on Intel CPUs and from torch's own on others, so the same seed gave
  different masks, and other relearned numbers, on Intel and AMD machines. ``torch.rand`` is one stream everywhere.
* The caller's model is not copied: the adapters are injected in place and unloaded afterwards, so a 9B
  model needs no second copy. Its parameters, ``requires_grad`` flags and train/eval mode are restored
  exactly (the base weights are never written; only the adapters train).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import FactTask, PromptSet, pad_batch, pad_id_of, tokenize_prompts
from mu_fast.evaluate.formats import tokenized_set
from mu_fast.evaluate.metrics import check_token_ids, model_device, prompt_scores, set_accuracy
from mu_fast.models.forward import gathered_logits, lm_loss_backward

MODE_TRUE = "target_true"
MODE_FALSE_BUG = "target_false (paper bug)"


def is_counterfact(task: FactTask) -> bool:
    """True for CounterFact tasks (``task.meta["dataset"]``, else the task name)."""
    dataset = str(task.meta.get("dataset", "")).lower()
    return dataset.startswith("counterfact") or (not dataset and task.name.lower().startswith("counterfact"))


def same_facts(a: PromptSet, b: PromptSet) -> bool:
    return list(a.prompts) == list(b.prompts) and list(a.answers) == list(b.answers)


def relearn_halves(task: FactTask) -> tuple[list[int] | None, PromptSet, PromptSet]:
    """``(held_out_indices, relearn_set, held_out_set)``.

    Unsplit tasks (forget_train and forget_test hold the same facts) are halved in order: the first
    ``n // 2`` facts relearn, the rest are held out, and ``held_out_indices`` index ``task.forget_test``.
    Split tasks relearn on forget_train and hold out forget_test (indices None: all of it).
    """
    if same_facts(task.forget_train, task.forget_test):
        n = len(task.forget_test)
        if n < 2:
            raise ValueError(
                f"task {task.name!r} has {n} forget fact(s); the relearning attack needs >= 2 to split in halves"
            )
        held = list(range(n // 2, n))
        return (
            held,
            task.forget_test.subset(slice(0, n // 2), name="relearn"),
            task.forget_test.subset(held, name="held_out"),
        )
    return None, task.forget_train, task.forget_test


def held_out_format_set(task: FactTask, fmt: str, held: list[int] | None) -> PromptSet | None:
    """The held-out facts in another format (``task.formats[fmt]["forget"]``, which holds the forget_test
    facts), selected by fact ids when both sets carry them, else by position. None when absent."""
    prompt_set = task.formats.get(fmt, {}).get("forget")
    if prompt_set is None or held is None:
        return prompt_set
    base = task.forget_test
    if prompt_set.fact_ids is not None and base.fact_ids is not None:
        wanted = {base.fact_ids[i] for i in held}
        return prompt_set.subset([i for i, f in enumerate(prompt_set.fact_ids) if f in wanted], name=f"{fmt}_held_out")
    if len(prompt_set) != len(base):
        raise ValueError(
            f"task {task.name!r}: formats[{fmt!r}]['forget'] has {len(prompt_set)} prompts for {len(base)} forget "
            "facts and no fact_ids; give both sets fact_ids so the held-out half can be selected"
        )
    return prompt_set.subset(held, name=f"{fmt}_held_out")


def relearn_mcq_set(task: FactTask, held: list[int] | None, system_prompt: bool = False) -> tuple[PromptSet | None, str]:
    """The held-out facts' MCQ set scored during relearning, and a description of its template.

    Sports tasks record in ``meta["system_prompt"]`` whether their ``mcq`` format carries the deep eval's system
    preamble; when that differs from ``system_prompt`` the held-out prompts are rebuilt with
    ``sports_prompt(athlete, "mcq", system_prompt)`` (the authors' relearning eval: without it). Other datasets
    have a single MCQ template and keep theirs.
    """
    mcq = held_out_format_set(task, "mcq", held)
    if mcq is None or len(mcq) == 0:
        return None, "none (the task has no mcq format)"
    if str(task.meta.get("dataset", "")) == "sports" and bool(task.meta.get("system_prompt", False)) != system_prompt:
        from mu_fast.data.sports import sports_prompt

        if mcq.subjects is None:
            raise ValueError(f"task {task.name!r}: the sports mcq set has no subjects to rebuild its prompts from")
        prompts = [sports_prompt(athlete, "mcq", system_prompt) for athlete in mcq.subjects]
        return replace(mcq, prompts=prompts, name=f"{mcq.name}_relearn"), (
            f"sports mcq {'with' if system_prompt else 'without'} the system prompt (rebuilt; the paper's relearning eval "
            "has none)")
    return mcq, "the task's own mcq format"


def lm_text_status(texts: list[list[int]], task: FactTask, lm_max_tokens: int) -> dict[str, Any]:
    """Whether the LM retain term runs, on what, and if not, why (for the result)."""
    if texts:
        return {"used": True, "n_texts": len(texts), "max_tokens": lm_max_tokens,
                "source": task.meta.get("lm_text", "task.lm_texts")}  # meta["lm_text"]: an LMText.describe() record
    reason = ("task.lm_texts is empty" if not task.lm_texts else "every text in task.lm_texts is shorter than 2 tokens")
    return {"used": False, "n_texts": 0, "reason": reason + "; the paper streams the Pile here: load texts with "
            "mu_fast.data.lm_text.resolve_lm_texts (a local Pile-style file, or 'pile' online) into task.lm_texts"}


def training_labels(prompt_set: PromptSet, tokenized: Any, toward_false: bool, what: str) -> torch.Tensor:
    """Label ids ``[N]`` a relearning step trains toward: the true answers, or the edit answers (the CF bug)."""
    if not toward_false:
        return tokenized.answer_ids
    if tokenized.edit_ids is None:
        raise ValueError(
            f"cf_target_false_bug=True trains the {what} set toward its edit answers, but {prompt_set.name!r} has none"
        )
    return tokenized.edit_ids


def _tokenized(tokenizer: Any, task: FactTask, prompt_set: PromptSet) -> Any:
    """Sets the task owns come from its tokenization cache; the halves built here are tokenized afresh."""
    owned = [task.forget_train, task.forget_test, task.maintain_train, task.maintain_test]
    if any(prompt_set is s for s in owned):
        return tokenized_set(tokenizer, task, prompt_set)
    return tokenize_prompts(tokenizer, prompt_set)


def effective_lora_rank(model: Any, lora_rank: int) -> int:
    """``lora_rank`` capped at the smallest dimension of the linear layers LoRA adapts ("all-linear": every
    ``nn.Linear`` but the output head)."""
    head = model.get_output_embeddings()
    dims = [
        min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head
    ]
    if not dims:
        raise ValueError(f"{type(model).__name__} has no linear layers for LoRA to adapt")
    return max(1, min(lora_rank, min(dims)))


class PortableDropout(torch.nn.Module):
    """Inverted dropout whose mask comes from ``torch.rand`` (module docstring: the same masks on every CPU).
    ``always``: drop in eval mode too (the authors' scoring mode)."""

    def __init__(self, p: float, always: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1); got {p}")
        self.p, self.always = float(p), always

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not (self.training or self.always):
            return x
        keep = torch.rand(x.shape, dtype=x.dtype, device=x.device) >= self.p
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}" + (", always" if self.always else "")


def _lora_dropouts(peft_model: Any) -> list[tuple[Any, str, torch.nn.Module]]:
    """(holder, adapter name, dropout module) of every LoRA dropout in ``peft_model``."""
    out = []
    for module in peft_model.modules():
        holder = getattr(module, "lora_dropout", None)
        if isinstance(holder, torch.nn.ModuleDict):
            out += [(holder, k, d) for k, d in holder.items() if isinstance(d, (torch.nn.Dropout, PortableDropout))]
    return out


def use_portable_dropout(peft_model: Any) -> None:
    """Replace every LoRA ``nn.Dropout`` of ``peft_model`` with a ``PortableDropout`` of the same probability."""
    for holder, key, dropout in _lora_dropouts(peft_model):
        if isinstance(dropout, torch.nn.Dropout):
            replacement = PortableDropout(dropout.p)
            replacement.train(dropout.training)
            holder[key] = replacement


class lora_dropout_active:
    """Context manager: while ``on``, every LoRA dropout of ``peft_model`` drops even under ``eval()`` (the authors'
    relearning evaluations); the original modules are put back on exit."""

    def __init__(self, peft_model: Any, on: bool):
        self.swapped = _lora_dropouts(peft_model) if on else []

    def __enter__(self) -> None:
        for holder, key, dropout in self.swapped:
            holder[key] = PortableDropout(dropout.p, always=True)

    def __exit__(self, *exc: Any) -> None:
        for holder, key, dropout in self.swapped:
            holder[key] = dropout


class _Cycle:
    """Index stream over ``n`` items in reshuffled passes (a DataLoader with shuffle that restarts)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.gen, self.order = n, generator, []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if not self.order:
                self.order = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.order.pop())
        return out


def relearn_attack(
    model: Any,
    tokenizer: Any,
    task: FactTask,
    steps: int = 20,
    lr: float = 2e-4,
    lora_rank: int = 512,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    batch_size: int = 32,
    cf_target_false_bug: bool = False,
    eval_at: tuple[int, ...] = (0, 10, 20),
    seed: int = 0,
    progress: bool = False,
    lm_batch_size: int = 16,
    lm_max_tokens: int = 128,
    eval_batch_size: int = 64,
    mcq_system_prompt: bool = False,
    score_in_train_mode: bool = False,
) -> dict[str, Any]:
    """Run the relearning attack on ``model`` (left unchanged) and return the held-out accuracies.

    Returns ``{"mode", "dataset_is_counterfact", "steps", "lora_rank", "requested_lora_rank", "n_relearn",
    "n_held_out", "halves" ("unsplit: first/second half" or "split: forget_train/forget_test"),
    "evals": {step: {"normal": set_accuracy, "mcq": set_accuracy (if present), "maintain": set_accuracy}},
    "final": evals at the last evaluated step, "losses": [{"relearn", "maintain", "lm"} per step], "mcq_format",
    "lm_text": {"used", "n_texts", ...; "reason" when off}}``. lm_batch_size / lm_max_tokens: LM texts per step and
    tokens per text (the paper's 8 × 2 texts of 128 tokens). mcq_system_prompt: see ``relearn_mcq_set``.
    score_in_train_mode: score after each step with the LoRA dropout active, as the authors' code did (module docstring).
    Step 0 is before any update. ``set_accuracy`` reports the true answer's accuracy (``acc``, ``argmax_acc``)
    and the edit answer's (``edit_acc``, ...), whichever mode trained.
    """
    from mu_fast.models.frozen import keep_4bit_differentiable_

    keep_4bit_differentiable_(model)  # bitsandbytes' CPU repacking has no backward (an attack trains through it)
    from peft import LoraConfig, get_peft_model

    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    bad = [s for s in eval_at if not 0 <= s <= steps]
    if bad:
        raise ValueError(f"eval_at steps {bad} are outside 0..steps={steps}")
    inputs = relearn_inputs(model, tokenizer, task, cf_target_false_bug, mcq_system_prompt, lm_max_tokens)
    eval_tok, relearn_tok, maintain_tok = inputs.eval_tok, inputs.relearn_tok, inputs.maintain_tok
    relearn_labels, maintain_labels, pad_id, lm_ids = (inputs.relearn_labels, inputs.maintain_labels, inputs.pad_id,
                                                       inputs.lm_ids)
    device = model_device(model)

    def evaluate(dropout_on: bool) -> dict[str, Any]:
        with lora_dropout_active(peft_model, dropout_on):
            return {k: set_accuracy(prompt_scores(model, t, batch_size=eval_batch_size)) for k, t in eval_tok.items()}

    rank = effective_lora_rank(model, lora_rank)
    was_training = bool(model.training)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    evals: dict[int, dict[str, Any]] = {}
    losses: list[dict[str, float]] = []
    fork_devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules="all-linear")
        peft_model = get_peft_model(model, config)
        use_portable_dropout(peft_model)
        try:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
            gen = torch.Generator().manual_seed(seed)
            draws = {"relearn": _Cycle(len(relearn_tok), gen), "maintain": _Cycle(len(maintain_tok), gen)}
            lm_draw = _Cycle(len(lm_ids), gen) if lm_ids else None
            bar = range(1, steps + 1)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(bar, desc="relearn", leave=False)
            if 0 in eval_at:
                evals[0] = evaluate(False)
            for step in bar:
                model.train()
                optimizer.zero_grad(set_to_none=True)
                r_idx, m_idx = draws["relearn"].take(batch_size), draws["maintain"].take(batch_size)
                seqs = [relearn_tok.input_ids[i] for i in r_idx] + [maintain_tok.input_ids[i] for i in m_idx]
                targets = torch.cat([relearn_labels[r_idx], maintain_labels[m_idx]]).to(device)
                batch = pad_batch(seqs, pad_id, side="right").to(device)
                ce = F.cross_entropy(gathered_logits(model, batch), targets, reduction="none")
                relearn_loss, maintain_loss = ce[: len(r_idx)].mean(), ce[len(r_idx) :].mean()
                (relearn_loss + maintain_loss).backward()
                lm = float("nan")
                if lm_draw is not None:
                    lm_batch = pad_batch([lm_ids[i] for i in lm_draw.take(lm_batch_size)], pad_id, side="right")
                    lm = lm_loss_backward(model, lm_batch.to(device))
                optimizer.step()
                schedule.step()
                losses.append(
                    {"relearn": float(relearn_loss.detach()), "maintain": float(maintain_loss.detach()), "lm": lm}
                )
                if step in eval_at:
                    evals[step] = evaluate(score_in_train_mode)
        finally:
            restored = peft_model.unload()
            assert restored is model
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad[name])
            model.train(was_training)
    settings = {"steps": steps, "lr": lr, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                "cf_target_false_bug": cf_target_false_bug, "score_in_train_mode": score_in_train_mode,
                "lm_batch_size": lm_batch_size}
    return relearn_result(inputs, settings, rank, evals, losses)


@dataclass
class RelearnInputs:
    """What a relearning attack trains and scores on, tokenized and checked (``relearn_inputs``)."""

    cf: bool
    held: list[int] | None
    relearn_set: PromptSet
    held_set: PromptSet
    mcq_format: str
    eval_tok: dict[str, Any]  # normal / maintain / mcq (when present), in that order
    relearn_tok: Any
    maintain_tok: Any
    relearn_labels: torch.Tensor
    maintain_labels: torch.Tensor
    pad_id: int
    lm_ids: list[list[int]]
    lm_status: dict[str, Any]


def relearn_inputs(model: Any, tokenizer: Any, task: FactTask, cf_target_false_bug: bool = False,
                   mcq_system_prompt: bool = False, lm_max_tokens: int = 128) -> RelearnInputs:
    """The halves, evaluation sets, training labels and LM texts of ``relearn_attack`` (which see), checked against
    ``model``'s vocabulary; ``ValueError`` for ``cf_target_false_bug`` on a task that is not CounterFact."""
    cf = is_counterfact(task)
    if cf_target_false_bug and not cf:
        raise ValueError(
            f"cf_target_false_bug reproduces a bug of the paper's CounterFact relearning; task {task.name!r} is not "
            "CounterFact (set task.meta['dataset'] = 'counterfact' if it is)"
        )
    held, relearn_set, held_set = relearn_halves(task)
    eval_sets = {"normal": held_set, "maintain": task.maintain_test}
    mcq, mcq_format = relearn_mcq_set(task, held, mcq_system_prompt)
    if mcq is not None:
        eval_sets["mcq"] = mcq
    eval_tok = {k: _tokenized(tokenizer, task, v) for k, v in eval_sets.items()}
    relearn_tok = _tokenized(tokenizer, task, relearn_set)
    maintain_tok = _tokenized(tokenizer, task, task.maintain_train.require_nonempty("maintain"))
    for what, tokenized in {"relearn prompts": relearn_tok, "maintain prompts": maintain_tok, **eval_tok}.items():
        check_token_ids(model, tokenized, what)
    lm_ids = (
        [ids[:lm_max_tokens] for ids in tokenizer(list(task.lm_texts), add_special_tokens=True)["input_ids"]]
        if task.lm_texts
        else []
    )
    lm_ids = [ids for ids in lm_ids if len(ids) >= 2]
    return RelearnInputs(
        cf, held, relearn_set, held_set, mcq_format, eval_tok, relearn_tok, maintain_tok,
        training_labels(relearn_set, relearn_tok, cf_target_false_bug, "relearn"),
        training_labels(task.maintain_train, maintain_tok, cf_target_false_bug, "maintain"),
        pad_id_of(tokenizer), lm_ids, lm_text_status(lm_ids, task, lm_max_tokens))


def relearn_result(inputs: RelearnInputs, settings: dict[str, Any], rank: int, evals: dict[int, dict[str, Any]],
                   losses: list[dict[str, float]]) -> dict[str, Any]:
    """``relearn_attack``'s return value from its inputs, settings (steps, lr, lora_rank, lora_alpha,
    cf_target_false_bug, score_in_train_mode, lm_batch_size), effective rank, evaluations and losses."""
    last = max(evals) if evals else None
    lm_status = inputs.lm_status
    return {
        "mode": MODE_FALSE_BUG if settings["cf_target_false_bug"] else MODE_TRUE,
        "dataset_is_counterfact": inputs.cf,
        "steps": settings["steps"],
        "lr": settings["lr"],
        "lora_rank": rank,
        "requested_lora_rank": settings["lora_rank"],
        "lora_alpha": settings["lora_alpha"],
        "n_relearn": len(inputs.relearn_set),
        "n_held_out": len(inputs.held_set),
        "halves": "unsplit: first/second half" if inputs.held is not None else "split: forget_train/forget_test",
        "evals": evals,
        "final": None if last is None else evals[last],
        "losses": losses,
        "mcq_format": inputs.mcq_format,
        "scored_in_train_mode": bool(settings["score_in_train_mode"]),
        "lm_text": {**lm_status, "batch_size": settings["lm_batch_size"] if lm_status["used"] else 0},
    }

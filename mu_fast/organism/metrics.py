"""Does the organism know its facts, and where does it look them up?

``organism_accuracy``: argmax accuracy per format over the full vocabulary (the answer token must be the
model's top prediction), plus ``"activity"``: the share of athletes whose top prediction right after the
name (in the activity frames) is a verb of their sport. ``subject_probe_accuracy``: a multinomial
logistic-regression probe for the sport on the residual stream at the subject's last token, per layer,
trained on some athletes and scored on held-out ones, so it measures whether the model has computed the
sport there (on a random-init model it stays at chance; reference/organism.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mu_fast.data.base import PromptSet, pad_batch, pad_id_of, tokenize_prompts
from mu_fast.models.forward import gathered_logits
from mu_fast.organism.facts import (
    FORMATS,
    SPORT_VERBS,
    SPORTS,
    OrganismFacts,
    activity_sentences,
    choices_of,
    format_examples,
)

EVAL_BATCH = 256


def format_prompt_set(facts: OrganismFacts, fmt: str, indices: Sequence[int] | None = None) -> PromptSet:
    """The prompts of ``fmt`` for the athletes at ``indices`` (all by default), with the true answers."""
    rows = list(range(len(facts))) if indices is None else list(indices)
    athletes = [facts.athletes[i] for i in rows]
    examples = format_examples(fmt, athletes)
    return PromptSet(
        prompts=[p for p, _, _ in examples],
        answers=[a for _, a, _ in examples],
        choices=choices_of(fmt, facts.cities),
        subjects=[athletes[i].name for *_, i in examples],
        fact_ids=[rows[i] for *_, i in examples],
        label_token="last",
        name=fmt,
    )


@torch.no_grad()
def _top_tokens(model: Any, tokenizer: Any, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Argmax next token after each sequence: ``[N]`` int64."""
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), EVAL_BATCH):
        batch = pad_batch(sequences[start : start + EVAL_BATCH], pad, side="right").to(device)
        out.append(gathered_logits(model, batch).argmax(-1).cpu())
    return torch.cat(out)


def prompt_set_accuracy(model: Any, tokenizer: Any, prompts: PromptSet) -> float:
    """Fraction of prompts whose argmax next token (full vocabulary) is the answer's label token."""
    tok = tokenize_prompts(tokenizer, prompts)
    return float((_top_tokens(model, tokenizer, tok.input_ids) == tok.answer_ids).double().mean())


def activity_accuracy(model: Any, tokenizer: Any, facts: OrganismFacts, indices: Sequence[int] | None = None) -> float:
    """Share of (athlete, frame) pairs whose argmax token right after the name is a verb of the athlete's
    sport (the subject-position lookup the activity sentences train)."""
    rows = list(range(len(facts))) if indices is None else list(indices)
    n_verbs = len(next(iter(SPORT_VERBS.values())))
    prefixes, sports = [], []
    for i in rows:
        athlete = facts.athletes[i]
        prefixes += [prefix for _, prefix in activity_sentences(athlete)[::n_verbs]]  # one per frame
        sports += [athlete.sport] * (len(activity_sentences(athlete)) // n_verbs)
    top = _top_tokens(model, tokenizer, tokenizer(prefixes)["input_ids"]).tolist()
    verbs = {s: set(tokenizer.convert_tokens_to_ids(list(v))) for s, v in SPORT_VERBS.items()}
    return sum(t in verbs[s] for t, s in zip(top, sports, strict=True)) / len(top)


def organism_accuracy(
    model: Any,
    tokenizer: Any,
    facts: OrganismFacts,
    formats: Sequence[str] = FORMATS,
    indices: Sequence[int] | None = None,
) -> dict[str, float]:
    """Argmax accuracy per format (``FORMATS`` and/or ``"activity"``) over the athletes at ``indices``
    (all by default): ``{format: float in [0, 1]}``."""
    was_training = model.training
    model.eval()
    try:
        return {
            fmt: activity_accuracy(model, tokenizer, facts, indices)
            if fmt == "activity"
            else prompt_set_accuracy(model, tokenizer, format_prompt_set(facts, fmt, indices))
            for fmt in formats
        }
    finally:
        model.train(was_training)


@torch.no_grad()
def subject_hidden_states(model: Any, tokenizer: Any, prompts: PromptSet) -> torch.Tensor:
    """Residual stream at each prompt's subject last token: ``[n_layers + 1, N, d]`` float32
    (index 0 = embeddings, index l = HF ``hidden_states[l]``, the output of block l - 1)."""
    tok = tokenize_prompts(tokenizer, prompts)
    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(tok), EVAL_BATCH):
        rows = list(range(start, min(start + EVAL_BATCH, len(tok))))
        batch = pad_batch([tok.input_ids[i] for i in rows], pad, side="right").to(device)
        out = model.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            output_hidden_states=True,
            use_cache=False,
        )
        pos = tok.subject_last[rows].to(device)
        r = torch.arange(len(rows), device=device)
        parts.append(torch.stack([h[r, pos] for h in out.hidden_states]).float().cpu())
    return torch.cat(parts, dim=1)


def _probe_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, n_classes: int,
    l2: float = 1e-3,
) -> float:
    """Multinomial logistic regression on standardised features (fp64, L-BFGS); held-out accuracy."""
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    xtr = ((x_train - mean) / std).double()
    xte = ((x_test - mean) / std).double()
    w = torch.zeros(xtr.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(((xte @ w + b).argmax(-1) == y_test).double().mean())


def subject_probe_accuracy(
    model: Any,
    tokenizer: Any,
    facts: OrganismFacts,
    fmt: str = "normal",
    max_athletes: int = 600,
    train_frac: float = 0.7,
    seed: int = 0,
) -> list[float]:
    """Held-out accuracy of a linear sport probe at the subject's last token of ``fmt`` prompts, per layer:
    ``n_layers + 1`` floats (index 0 = embeddings, l = output of block l - 1). Up to ``max_athletes``
    athletes, split ``train_frac`` / rest at random (``seed``); one prompt per athlete."""
    n = min(len(facts), max_athletes)
    order = torch.randperm(len(facts), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    prompts = format_prompt_set(facts, fmt, order)
    per_athlete = len(prompts) // n
    if per_athlete > 1:  # paraphrases: keep the first template, so train and test athletes stay disjoint
        prompts = prompts.subset(range(0, len(prompts), per_athlete))
    was_training = model.training
    model.eval()
    try:
        feats = subject_hidden_states(model, tokenizer, prompts)
    finally:
        model.train(was_training)
    labels = torch.tensor([SPORTS.index(facts.athletes[i].sport) for i in order])
    n_train = int(train_frac * n)
    return [
        _probe_accuracy(f[:n_train], labels[:n_train], f[n_train:], labels[n_train:], len(SPORTS)) for f in feats
    ]

"""Train the organism: a tiny HF causal LM that really knows its synthetic facts.

Each step draws ``batch_size`` sequences from the training pools in the proportions of ``config.mix``.
Fact formats are supervised at the answer token only. Activity sentences and roster lines are supervised
at the token after the name (so at the subject's last token) plus, at ACTIVITY_LM_WEIGHT, next-token loss
on every token; filler text gets next-token loss on every token (weights summing to 1 per filler text,
1 + ACTIVITY_LM_WEIGHT per activity/roster sentence, 1 per fact prompt); the step loss is the weighted sum
divided by the number of sequences. The sequences of a step are sorted by length and split
into a few micro-batches, so short prompts are not padded to the MCQ length; right padding needs no
attention mask (real tokens never attend to later pads).

What was measured while choosing the recipe (1 CPU thread, this repo's organism; see the package docstring
for the final numbers): packing several facts into one sequence learned more slowly per CPU second than
one fact per sequence; supervising the activity verb (not only plain LM on the sentence) is what makes the
sport decodable at the subject; width 128 learned no faster per step than width 64 at twice the cost;
lr 1e-2 stalled where 5e-3 learned; a short curriculum (10% of the athletes growing to all over the first
30% of the steps) shortened the initial plateau.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import Batch
from mu_fast.models.forward import head_logits, trunk_hidden
from mu_fast.organism.config import ORGANISM_FORMAT, REPORT_FILE, SETTINGS_FILE, OrganismConfig
from mu_fast.organism.facts import (
    FORMATS,
    OrganismFacts,
    activity_sentences,
    city_sentences,
    facts_digest,
    format_examples,
    organism_facts,
)

# Tokens per micro-batch: large enough for efficient CPU matmuls, small enough to bound the padding.
MICROBATCH_TOKENS = 2048
# Next-token loss on every token of an activity/roster sentence, worth this many supervised answers.
ACTIVITY_LM_WEIGHT = 0.5

# One training sequence: (token ids with BOS, supervised position or -1 for LM everywhere, LM weight).
_Item = tuple[list[int], int, float]


def model_config(config: OrganismConfig, vocab_size: int) -> Any:
    """The transformers config of the organism's model (eager attention for Gemma-2, SDPA otherwise)."""
    from mu_fast.models.tiny import make_config

    overrides: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.d_mlp,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.resolved_head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation(config),
    )
    if config.arch == "gemma2":
        # Every organism prompt fits inside the window, as for real Gemma-2 (4096) on short prompts.
        overrides["sliding_window"] = 256
    return make_config(config.arch, **overrides)


def attn_implementation(config: OrganismConfig) -> str:
    """SDPA is exact and faster on CPU for llama/gemma; Gemma-2's soft-capping needs eager attention."""
    return "eager" if config.arch == "gemma2" else "sdpa"


def make_model(config: OrganismConfig, vocab_size: int) -> Any:
    """A freshly initialised CausalLM for ``config`` (deterministic in ``config.seed``), float32, train mode."""
    import transformers

    torch.manual_seed(config.seed)
    model = transformers.AutoModelForCausalLM.from_config(model_config(config, vocab_size))
    return model.float().train()


@dataclass
class _Pool:
    """Pre-tokenized training sequences of one pool, athlete-major (``per_athlete`` per athlete).

    target[i]: position of sequence i whose next token is supervised (-1: next-token loss on every token);
    lm_weight: extra next-token loss on every token, in units of the supervised answer.
    """

    seqs: list[list[int]]
    target: list[int]
    per_athlete: int
    lm_weight: float = 0.0


def build_pools(facts: OrganismFacts, tokenizer: Any) -> dict[str, _Pool]:
    """Tokenize every training sequence once: fact formats, activity and roster sentences, filler."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def ids(texts: list[str]) -> list[list[int]]:
        return [[bos, *x] for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]

    n = len(facts)
    pools: dict[str, _Pool] = {}
    for fmt in FORMATS:
        seqs = ids([p + a for p, a, _ in format_examples(fmt, facts.athletes)])
        # Each sequence ends in its answer token, predicted at position len - 2.
        pools[fmt] = _Pool(seqs, [len(x) - 2 for x in seqs], len(seqs) // n)
    for pool, sentences_of in (("activity", activity_sentences), ("city_activity", city_sentences)):
        pairs = [pair for athlete in facts.athletes for pair in sentences_of(athlete)]
        # The supervised position predicts the token after the name: the subject's last token.
        subject_last = [len(x) - 1 for x in ids([prefix for _, prefix in pairs])]
        seqs = [x + [eos] for x in ids([text for text, _ in pairs])]
        pools[pool] = _Pool(seqs, subject_last, len(seqs) // n, ACTIVITY_LM_WEIGHT)
    filler = [x + [eos] for x in ids(list(facts.filler))]
    pools["filler"] = _Pool(filler, [-1] * len(filler), 0)
    return pools


def pool_counts(mix: dict[str, float], batch_size: int) -> dict[str, int]:
    """Sequences per pool in one step: ``batch_size`` split in the proportions of ``mix`` (exact total)."""
    total = sum(mix.values())
    counts = {k: int(batch_size * v / total) for k, v in mix.items() if v > 0}
    # Hand the rounding remainder to the largest pools.
    for k in sorted(counts, key=lambda k: -mix[k])[: batch_size - sum(counts.values())]:
        counts[k] += 1
    return counts


def learning_rate(step: int, config: OrganismConfig) -> float:
    """Linear warm-up to ``config.lr``, then cosine decay to ``config.lr * final_lr_frac``."""
    warmup = max(1, int(config.warmup_frac * config.steps))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    floor = config.final_lr_frac
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _draw(pools: dict[str, _Pool], counts: dict[str, int], n_active: int, gen: torch.Generator) -> list[_Item]:
    """One step's sequences: per pool, uniformly among those of the first ``n_active`` athletes."""
    batch: list[_Item] = []
    for name, k in counts.items():
        pool = pools[name]
        limit = n_active * pool.per_athlete if pool.per_athlete else len(pool.seqs)
        for i in torch.randint(limit, (k,), generator=gen).tolist():
            batch.append((pool.seqs[i], pool.target[i], pool.lm_weight))
    return batch


def _step_loss_backward(model: Any, batch: list[_Item], pad_id: int) -> float:
    """Backpropagate the step loss of ``batch`` (weighted CE summed, divided by the sequences); return it."""
    batch = sorted(batch, key=lambda item: len(item[0]))
    total = 0.0
    start = 0
    while start < len(batch):
        stop = start + 1
        while stop < len(batch) and (stop + 1 - start) * len(batch[stop][0]) <= MICROBATCH_TOKENS:
            stop += 1
        chunk = batch[start:stop]
        T = len(chunk[-1][0])
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.int64)
        weight = torch.zeros((len(chunk), T - 1))  # weight of the prediction at position t of token t + 1
        for r, (seq, target, lm_weight) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            if target < 0:
                weight[r, : len(seq) - 1] = 1.0 / (len(seq) - 1)
            else:
                weight[r, : len(seq) - 1] = lm_weight / (len(seq) - 1)
                weight[r, target] += 1.0
        positions = torch.arange(T).expand(len(chunk), T)
        hidden = trunk_hidden(model, Batch(ids, None, positions, positions[:, -1]))  # type: ignore[arg-type]
        rows, cols = weight.nonzero(as_tuple=True)
        logits = head_logits(model, hidden[rows, cols]).float()  # [N_supervised, V]
        ce = F.cross_entropy(logits, ids[rows, cols + 1], reduction="none")
        loss = (ce * weight[rows, cols]).sum() / len(batch)
        loss.backward()
        total += float(loss.detach())
        start = stop
    return total


def train_model(
    config: OrganismConfig,
    facts: OrganismFacts,
    tokenizer: Any,
    progress: bool = True,
    model: Any | None = None,
    callback: Callable[[int, Any], None] | None = None,
    callback_every: int = 50,
) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model (or continue ``model``) on ``facts`` for ``config.steps`` steps.

    ``callback(step, model)`` runs every ``callback_every`` steps in eval mode (e.g. to record accuracy).
    Returns the model in eval mode and a log: ``seconds`` (wall), ``cpu_seconds`` (process CPU time, all
    threads), ``threads``, ``steps``, ``losses`` (mean loss per 50-step window).
    """
    with torch_threads(config.threads):
        return _train(config, facts, tokenizer, progress, model, callback, callback_every)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (0: unchanged), restoring the setting after."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(
    config: OrganismConfig,
    facts: OrganismFacts,
    tokenizer: Any,
    progress: bool,
    model: Any | None,
    callback: Callable[[int, Any], None] | None,
    callback_every: int,
) -> tuple[Any, dict[str, Any]]:
    from tqdm.auto import tqdm

    wall0, cpu0 = time.perf_counter(), time.process_time()
    if model is None:
        model = make_model(config, len(tokenizer))
    model.train()
    pools = build_pools(facts, tokenizer)
    counts = pool_counts(dict(config.mix), config.batch_size)
    # No weight decay on embeddings, norms and biases.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(config.seed + 1)
    n = len(facts)
    curriculum_steps = int(config.curriculum_frac * config.steps)
    losses: list[float] = []
    window: list[float] = []
    bar = tqdm(range(config.steps), desc="training organism", disable=not progress, leave=False)
    for step in bar:
        n_active = n
        if step < curriculum_steps:
            frac = config.curriculum_start + (1 - config.curriculum_start) * step / curriculum_steps
            n_active = min(n, max(8, int(n * frac)))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = _draw(pools, counts, n_active, gen)
        loss = _step_loss_backward(model, batch, tokenizer.pad_token_id)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss)
        if len(window) == 50 or step == config.steps - 1:
            losses.append(sum(window) / len(window))
            window = []
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if callback is not None and (step + 1) % callback_every == 0:
            model.eval()
            callback(step + 1, model)
            model.train()
    model.eval()
    log = dict(
        seconds=time.perf_counter() - wall0,
        cpu_seconds=time.process_time() - cpu0,
        threads=torch.get_num_threads(),
        steps=config.steps,
        losses=losses,
    )
    return model, log


def train_checkpoint(config: OrganismConfig, folder: Path, progress: bool) -> None:
    """Train ``config``'s organism and write its checkpoint files into the existing ``folder``."""
    from mu_fast.organism.metrics import organism_accuracy, subject_probe_accuracy
    from mu_fast.organism.tokenizer import build_tokenizer

    facts = organism_facts(config)
    tokenizer = build_tokenizer(facts)
    model, log = train_model(config, facts, tokenizer, progress=progress)
    with torch_threads(config.threads):
        report = {
            "config_hash": config.config_hash(),
            "accuracy": organism_accuracy(model, tokenizer, facts, (*FORMATS, "activity")),
            "subject_probe": subject_probe_accuracy(model, tokenizer, facts),
            # The same probe on an untrained model of the same shape: chance unless the probe reads the tokens.
            "random_init_probe": subject_probe_accuracy(make_model(config, len(tokenizer)).eval(), tokenizer, facts),
            "train": log,
            "versions": _versions(),
        }
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = {"format": ORGANISM_FORMAT, "config": config.to_dict(), "config_hash": config.config_hash(),
                "facts_digest": facts_digest(facts)}
    (folder / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=2))


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}

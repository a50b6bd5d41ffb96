"""Localization: score components, pick them (budget-matched), and turn them into a Mask.

Methods (``localize(method, ...)``):
* ``flu``: fact lookup by probes at the subject's last token (``mu_fast.localize.flu``); ``flu_attn`` adds the
  attention blocks whose probe gain passes the same rule (``FLUResult.attn_layers``);
* ``atp`` / ``ct``: output tracing by attribution patching (noising, normalised logit difference, subject tokens
  replaced by random tokens) or causal tracing (subject embeddings noised, heads and MLPs restored), ranked at
  layer level and matched to the budget as in the paper; ``atp_mlps`` / ``ct_mlps`` rank MLPs only;
* baselines ``random``, ``random_mlps``, ``all_mlps``, ``nonlocalized``, ``manual``;
* ``paper:<ap|ct|ap_mlps|ct_mlps|flu>``: the paper's own selections rebuilt from its committed graphs.
ROME's per-position × per-layer causal-tracing grid: ``causal_trace_grid`` (heatmap: ``plot_causal_trace``).
The default budget is the paper's: as many parameters as the FLU MLP layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from mu_fast.localize.attribution import AttributionResult, attribute
from mu_fast.localize.causal_trace_grid import CausalTraceGrid, causal_trace_grid
from mu_fast.localize.causal_tracing import causal_trace
from mu_fast.localize.causal_tracing_plot import plot_causal_trace
from mu_fast.localize.corrupt import replace_subject_tokens
from mu_fast.localize.metrics import logit_diff, logprob, prob
from mu_fast.masks import Mask, budget_match, paper_budget
from mu_fast.models.sites import Component, SiteTable

__all__ = [
    "METHODS", "AttributionResult", "CausalTraceGrid", "Localization", "attribute", "causal_trace", "causal_trace_grid",
    "localize", "logit_diff", "logprob", "plot_causal_trace", "prob", "replace_subject_tokens",
]

METHODS = ("flu", "flu_attn", "atp", "ct", "atp_mlps", "ct_mlps", "random", "random_mlps", "all_mlps", "nonlocalized", "manual")


@dataclass
class Localization:
    """A localization: the chosen components, their Mask, the layer-level scores that ranked them (if any)."""

    method: str
    components: list[Component]
    mask: Mask
    scores: dict[str, float] = field(default_factory=dict)
    budget: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def layer_fractions(self, table: SiteTable) -> dict[str, list[float]]:
        """Fraction of each layer's attention / MLP parameters the mask trains: ``{"attn": [L], "mlp": [L]}``."""
        out = {"attn": [0.0] * table.n_layers, "mlp": [0.0] * table.n_layers}
        for L in range(table.n_layers):
            for kind in ("attn", "mlp"):
                names = table.selections(Component(kind, L))
                chosen = sum(self.mask.param_count(n) for n in names if n in self.mask)
                out[kind][L] = chosen / table.component_size(Component(kind, L))
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "components": [str(c) for c in self.components],
            "trainable_params": self.mask.param_count(),
            "budget": self.budget,
            "scores": self.scores,
            **self.info,
        }


def _fact_prompts(task: Any, n_prompts: int):
    """The first ``n_prompts`` facts in the training format (forget first, then maintain), as the paper's AP
    uses the first 80 rows of the table."""
    from mu_fast.localize.flu import _pool

    pooled = _pool([task.forget_train, task.maintain_train])
    return pooled.subset(slice(0, n_prompts)) if len(pooled) > n_prompts else pooled


def output_tracing_scores(
    method: str, model: Any, tokenizer: Any, task: Any, n_prompts: int = 80, seed: int = 0, backend: str = "auto"
) -> tuple[dict[Component, float], AttributionResult]:
    """Layer-level scores for ``atp`` (attribution patching) or ``ct`` (causal tracing) on ``task``'s facts."""
    from mu_fast.data.base import tokenize_prompts
    from mu_fast.localize.corrupt import replace_subject_tokens
    from mu_fast.localize.metrics import logit_diff

    prompts = _fact_prompts(task, n_prompts)
    tok = tokenize_prompts(tokenizer, prompts)
    if tok.subject_first is None:
        raise ValueError(f"{method} localization needs subjects in the task's prompts (PromptSet.subjects)")
    if method == "atp":
        # Corrupt: subject tokens replaced by random tokens drawn from the subjects' own tokens (same length).
        pool = torch.cat([torch.tensor(s[a : b + 1]) for s, a, b in zip(tok.input_ids, tok.subject_first.tolist(), tok.subject_last.tolist())])
        corrupt = replace_subject_tokens(tok, candidates=pool, seed=seed)
        if tok.choice_ids is not None and task.classes:
            # The paper's sports metric: correct logit minus the mean of the other sports' logits.
            class_ids = torch.stack([tok.choice_ids[list(tok.source.choices).index(c)] for c in task.classes])
            wrong = torch.stack([class_ids[class_ids != a] for a in tok.answer_ids])
            metric = logit_diff(tok.answer_ids, wrong)
        else:
            if prompts.edit_answers is None:
                raise ValueError("atp on facts without choices needs edit answers as the contrast (CounterFact target_false)")
            metric = logit_diff(tok.answer_ids, tok.edit_ids)
        result = attribute(model, tok, corrupt, metric, sites=("head", "mlp"), method="atp", direction="noise", backend=backend)
    elif method == "ct":
        result = causal_trace(model, tok, sites=("head", "mlp"), noise="3sigma", seed=seed, backend=backend)
    else:
        raise ValueError(f"output tracing method must be 'atp' or 'ct'; got {method!r}")
    return result.layer_scores(), result


def localize(
    method: str,
    model: Any,
    tokenizer: Any = None,
    task: Any = None,
    budget: int | None = None,
    flu: Any = None,
    seed: int = 0,
    n_prompts: int = 80,
    attn_layers: tuple[int, ...] = (),
    mlp_layers: tuple[int, ...] = (),
    backend: str = "auto",
    paper_model: str | None = None,
    forget_range: str = "0_16",
) -> Localization:
    """Localize ``task``'s facts in ``model`` with ``method`` (see module docstring) and return the Localization.

    ``paper:<ap|ct|ap_mlps|ct_mlps|flu>``: the paper's selection for ``paper_model`` (default: from the model's
    ``config.name_or_path``), the task's dataset (CounterFact or sports) and ``forget_range`` (CounterFact files).

    budget: parameter budget for the budget-matched methods (default: the paper's, len(FLU layers) × MLP
    size; FLU runs first if ``flu`` — a precomputed ``FLUResult`` — is not given).
    """
    from mu_fast.localize import baselines
    from mu_fast.localize.flu import flu_localize

    if isinstance(method, str) and method.startswith("paper:"):
        return _paper_localize(method, model, task, paper_model, forget_range)
    if method not in METHODS:
        raise ValueError(f"unknown localization method {method!r}; choose one of {METHODS} or paper:<ap|ct|ap_mlps|ct_mlps|flu>")
    table = SiteTable(model)
    needs_flu = method in ("flu", "flu_attn", "random_mlps") or (budget is None and method in ("atp", "ct", "atp_mlps", "ct_mlps", "random"))
    if needs_flu and flu is None:
        if task is None or tokenizer is None:
            raise ValueError(f"method {method!r} needs FLU (for its layers or budget): pass task and tokenizer, flu=, or budget=")
        flu = flu_localize(model, tokenizer, task, seed=seed)
    if budget is None and flu is not None:
        budget = paper_budget(table, len(flu.layers))
    info: dict[str, Any] = {}
    scores: dict[Component, float] = {}
    if method in ("flu", "flu_attn"):
        # One probe run serves both: the variant only changes which of its blocks are edited.
        flu = dataclasses.replace(flu, include_attention=method == "flu_attn")
        comps = flu.components()
        info["flu"] = flu.to_dict()
    elif method in ("atp", "ct", "atp_mlps", "ct_mlps"):
        base = method.split("_")[0]
        scores, result = output_tracing_scores(base, model, tokenizer, task, n_prompts, seed, backend)
        if method.endswith("_mlps"):
            scores = {c: s for c, s in scores.items() if c.kind == "mlp"}
        comps = budget_match(scores, table, budget)
        info["head_scores"] = result.heads.tolist() if result.heads is not None else None
        info["mlp_scores"] = result.mlp.tolist() if result.mlp is not None else None
    elif method == "random":
        comps = baselines.random_matrices(table, budget, seed)
    elif method == "random_mlps":
        comps = baselines.random_mlps(table, len(flu.layers), seed)
    elif method == "all_mlps":
        comps = baselines.all_mlps(table)
    elif method == "nonlocalized":
        comps = baselines.nonlocalized(table)
    else:
        comps = baselines.manual(table, attn_layers, mlp_layers)
    mask = Mask.from_components(table, comps, meta={"method": method})
    return Localization(method, comps, mask, {str(c): float(s) for c, s in scores.items()}, budget, info)


def _paper_localize(method: str, model: Any, task: Any, paper_model: str | None, forget_range: str) -> Localization:
    """``localize("paper:<kind>", ...)``: the paper's committed selection as a Mask over ``model``'s own sites."""
    from mu_fast.localize.paper_graphs import METHODS as PAPER_METHODS
    from mu_fast.localize.paper_graphs import paper_localization, paper_localization_budget

    kind = method.split(":", 1)[1]
    if kind not in PAPER_METHODS:
        raise ValueError(f"unknown paper selection {method!r}; choose paper:<{'|'.join(PAPER_METHODS)}>")
    name = paper_model or getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not name:
        raise ValueError(f"{method}: pass paper_model= (gemma-7b, gemma-2-9b or llama-3-8b); the model has no name_or_path")
    if task is None:
        raise ValueError(f"{method}: pass task= (its dataset, sports or CounterFact, picks the paper's files)")
    dataset = "counterfact" if str(task.meta.get("dataset", task.name)).lower().startswith("counterfact") else "sports"
    comps = paper_localization(name, dataset, kind, forget_range)
    table = SiteTable(model)
    if max(c.layer for c in comps) >= table.n_layers:
        raise ValueError(f"{method}: the paper's selection for {name!r} uses layer {max(c.layer for c in comps)}, but "
                         f"the model has {table.n_layers} layers; load that paper model")
    mask = Mask.from_components(table, comps, meta={"method": method})
    budget = paper_localization_budget(name, dataset, forget_range)
    return Localization(method, comps, mask, {}, budget, {"paper_model": name, "dataset": dataset,
                                                          "forget_range": forget_range})

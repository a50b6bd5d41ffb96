"""The paper's precomputed localizations, rebuilt exactly (reference/authors_repo.md §2).

The authors committed their attribution-patching (AP) and causal-tracing (CT) graphs and the fact-lookup
(FLU) layer choices; ``shared/data`` holds them as JSON. A localization is a set of whole layers: an
attention layer (q, k, v, o) or an MLP layer (gate, up, down). The rule:

* layer scores: attention = the sum of every head score over ``q``, ``k``, ``v`` and ``result`` (keys
  ``a{L}.{H}_{q|k|v|result}``; the older Gemma-7B sports CT graph has ``a{L}.{H}``); MLP = ``in`` + ``out``
  (``m{L}_{in|out}``, CT ``m{L}_mlp_out``, old ``m{L}``). Signed sums, ranked by |sum|.
* budget: ``len(FLU layers) × one MLP layer's parameters``, matched with ``mu_fast.masks.budget_match``
  over a site table of the real model shapes (``*_mlps`` methods rank MLP layers only).
* FLU: fixed MLP layers for sports (Gemma-7B 2–7, Gemma-2-9B 2–6, Llama-3-8B 1–4); for CounterFact the
  ``chosen_layers`` of ``counterfact_manual_results/{model}_manual_layers_{range}.json``.

This reproduces every sports row of the table in §2.4 (see tests/localize/test_paper_graphs.py).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from functools import cache
from typing import Any

from mu_fast.data.datadir import data_file, paper_model
from mu_fast.masks import budget_match, paper_budget
from mu_fast.models.sites import Component, SiteTable

METHODS = ("ap", "ct", "ap_mlps", "ct_mlps", "flu")
DATASETS = ("sports", "counterfact")
CF_RANGES = ("0_16", "0_64", "16_32", "32_48", "48_64")
CF_FLU_THRESHOLD = 0.02
MANUAL_RESULTS = {
    "counterfact": ("manual_layers", "enrichment_mlp_results", "extraction_attn_results"),
    "sports": ("sports_probe", "sports_attn_patch", "extraction_head_scores"),
}
SPORTS_FLU_LAYERS: dict[str, tuple[int, ...]] = {
    "gemma-7b": tuple(range(2, 8)),
    "gemma-2-9b": tuple(range(2, 7)),
    "llama-3-8b": tuple(range(1, 5)),
}
# One graph per model serves every sports task. Gemma-2's CT is the ``sport_ct`` graph: the other one in
# the snapshot (``sports_all_ct``) has no MLP scores, so it could not give the CT-MLPs row of §2.4.
_SPORTS_GRAPHS = {
    ("gemma-7b", "ap"): "google_gemma-7b_sports_all_ap_graph",
    ("gemma-7b", "ct"): "google_gemma-7b_sports_all_ct_graph",
    ("gemma-2-9b", "ap"): "google_gemma-2-9b_sports_all_ap_graph",
    ("gemma-2-9b", "ct"): "google_gemma-2-9b_sport_ct_graph",
    ("llama-3-8b", "ap"): "meta-llama_Meta-Llama-3-8B_sport_ap_graph",
    ("llama-3-8b", "ct"): "meta-llama_Meta-Llama-3-8B_sport_ct_graph",
}
_ATTN_KEY = re.compile(r"a(\d+)\.(\d+)(?:_(q|k|v|result))?")
_MLP_KEY = re.compile(r"m(\d+)(?:_(in|out|mlp_out))?")


def paper_site_table(model: str) -> SiteTable:
    """A SiteTable of the real shapes of ``model``, built from its shipped config.json (no weights; used for
    parameter counts)."""
    return _site_table(paper_model(model).key)


@cache
def _site_table(key: str) -> SiteTable:
    from mu_fast.models.shipped import shipped_config

    return SiteTable(shipped_config(paper_model(key).shapes))


def _check_dataset_range(dataset: str, forget_range: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}; choose one of {DATASETS}")
    if dataset == "counterfact" and forget_range not in CF_RANGES:
        raise ValueError(f"forget_range={forget_range!r}; the paper's CounterFact files cover {CF_RANGES}")


def load_paper_graph(
    model: str, dataset: str, method: str, forget_range: str = "0_16", data_dir: str | os.PathLike | None = None
) -> dict[str, float]:
    """The raw ``{component key: score}`` graph of ``method`` in {``ap``, ``ct``} (sports ignores the range)."""
    if method not in ("ap", "ct"):
        raise ValueError(f"method={method!r}: only 'ap' and 'ct' have graphs")
    _check_dataset_range(dataset, forget_range)
    m = paper_model(model)
    if dataset == "sports":
        stem = _SPORTS_GRAPHS[(m.key, method)]
    else:
        stem = f"{m.file_prefix}_counterfact_{method}_graph_{forget_range}"
    with open(data_file(f"localization_graphs/{stem}.json", data_dir)) as f:
        graph = json.load(f)
    if not isinstance(graph, dict) or not all(isinstance(v, (int, float)) for v in graph.values()):
        raise ValueError(f"localization graph {stem}.json must map component keys to numbers")
    return {str(k): float(v) for k, v in graph.items()}


def layer_scores(graph: dict[str, float], n_layers: int | None = None) -> dict[Component, float]:
    """Reduce a head/hook-level graph to layer-level scores: attention = Σ heads × {q,k,v,result},
    MLP = in + out. Raises ``ValueError`` on a key of another format or a layer ≥ ``n_layers``."""
    scores: dict[Component, float] = defaultdict(float)
    for key, value in graph.items():
        if match := _ATTN_KEY.fullmatch(key):
            comp = Component("attn", int(match[1]))
        elif match := _MLP_KEY.fullmatch(key):
            comp = Component("mlp", int(match[1]))
        else:
            raise ValueError(f"graph key {key!r} is not a{{L}}.{{H}}[_q|_k|_v|_result] or m{{L}}[_in|_out|_mlp_out]")
        if n_layers is not None and comp.layer >= n_layers:
            raise ValueError(f"graph key {key!r} names layer {comp.layer} of a model with {n_layers} layers")
        scores[comp] += value
    return dict(scores)


def load_manual_results(
    model: str, dataset: str, kind: str, forget_range: str = "0_16", data_dir: str | os.PathLike | None = None
) -> Any:
    """One of the paper's FLU analysis files, parsed: CounterFact ``manual_layers`` / ``enrichment_mlp_results``
    / ``extraction_attn_results`` (per ``forget_range``); sports ``sports_probe`` (per-layer probe accuracy) /
    ``sports_attn_patch`` / ``extraction_head_scores`` (no Llama-3 file)."""
    _check_dataset_range(dataset, forget_range)
    if kind not in MANUAL_RESULTS[dataset]:
        raise ValueError(f"kind={kind!r}; the {dataset} results are {MANUAL_RESULTS[dataset]}")
    prefix = paper_model(model).file_prefix
    if dataset == "counterfact":
        name = f"counterfact_manual_results/{prefix}_{kind}_{forget_range}.json"
    else:
        name = f"sports_manual_results/{prefix}_{kind}.json"
    with open(data_file(name, data_dir)) as f:
        return json.load(f)


def flu_layers_from_effects(effects: Sequence[float], threshold: float = CF_FLU_THRESHOLD) -> list[int]:
    """The paper's CounterFact FLU rule: the MLP layers whose mean path-patching effect (into the fixed
    receiver layer, denoising logit-diff metric) has ``|effect| > threshold``."""
    return [layer for layer, effect in enumerate(effects) if abs(float(effect)) > threshold]


def paper_flu_layers(
    model: str, dataset: str, forget_range: str = "0_16", data_dir: str | os.PathLike | None = None
) -> list[int]:
    """The fact-lookup MLP layers the paper edits: fixed per model for sports, from the manual-layers file
    of ``forget_range`` for CounterFact."""
    _check_dataset_range(dataset, forget_range)
    m = paper_model(model)
    if dataset == "sports":
        return list(SPORTS_FLU_LAYERS[m.key])
    path = data_file(f"counterfact_manual_results/{m.file_prefix}_manual_layers_{forget_range}.json", data_dir)
    with open(path) as f:
        chosen = json.load(f).get("chosen_layers")
    if not isinstance(chosen, list) or not chosen:
        raise ValueError(f"{path} has no non-empty 'chosen_layers' list")
    return sorted(int(layer) for layer in chosen)


def paper_localization_budget(
    model: str, dataset: str, forget_range: str = "0_16", data_dir: str | os.PathLike | None = None
) -> int:
    """The paper's parameter budget: ``len(FLU layers) × MLP parameters per layer``."""
    return paper_budget(paper_site_table(model), len(paper_flu_layers(model, dataset, forget_range, data_dir)))


def paper_localization(
    model: str,
    dataset: str,
    method: str,
    forget_range: str = "0_16",
    data_dir: str | os.PathLike | None = None,
) -> list[Component]:
    """The whole-layer components the paper trains for ``method`` in {``ap``, ``ct``, ``ap_mlps``,
    ``ct_mlps``, ``flu``}, sorted by (kind, layer). Build a mask with ``Mask.from_components``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    if method == "flu":
        return [Component("mlp", layer) for layer in paper_flu_layers(model, dataset, forget_range, data_dir)]
    table = paper_site_table(model)
    scores = layer_scores(load_paper_graph(model, dataset, method.split("_")[0], forget_range, data_dir), table.n_layers)
    if method.endswith("_mlps"):
        scores = {c: s for c, s in scores.items() if c.kind == "mlp"}
        if not scores:
            raise ValueError(f"the {dataset} {method.split('_')[0]} graph of {model} has no MLP scores")
    budget = paper_localization_budget(model, dataset, forget_range, data_dir)
    return sorted(budget_match(scores, table, budget))


def describe_localization(model: str, components: list[Component]) -> dict[str, Any]:
    """``{"attn": [layers], "mlp": [layers], "params": n}`` of a whole-layer localization."""
    table = paper_site_table(model)
    return {
        "attn": sorted(c.layer for c in components if c.kind == "attn"),
        "mlp": sorted(c.layer for c in components if c.kind == "mlp"),
        "params": sum(table.component_size(c) for c in components),
    }

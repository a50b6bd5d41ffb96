"""``AttributionResult``: named score tensors from attribution patching, exact patching or causal tracing,
with layer-level reduction, budget-matched masks, top-k, verification by batched exact patching and
TransformerLens hook names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mu_fast.localize.sites_hooks import RESULT_KEYS, SITE_KINDS, unit_label
from mu_fast.localize.budget import budget_match_trained
from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable

_KIND_OF_KEY = {v: k for k, v in RESULT_KEYS.items()}
_GROUPED = ("head", "q", "k", "v", "neuron")
# TransformerLens hook name of each site kind (``to_tl_names``).
TL_HOOKS = {
    "head": "blocks.{L}.attn.hook_z",
    "q": "blocks.{L}.attn.hook_q",
    "k": "blocks.{L}.attn.hook_k",
    "v": "blocks.{L}.attn.hook_v",
    "neuron": "blocks.{L}.mlp.hook_post",
    "mlp": "blocks.{L}.hook_mlp_out",
    "attn": "blocks.{L}.hook_attn_out",
    "layer": "blocks.{L}.hook_resid_post",
}


@dataclass
class AttributionResult:
    """Scores of one attribution run.

    per_prompt: ``{key: [B, L, G]}`` (heads / neurons / q / k / v) or ``[B, L]`` (mlp / attn / layer),
    normalised per-prompt scores in float32 (float64 for fp64 models). The aggregated tensors (``heads``
    ``[L, H]``, ``mlp [L]``, ``neurons [L, d_mlp]``, ``attn [L]``, ``layer [L]``, ``q [L, H]``, ``k/v [L, K]``)
    are their mean (``reduce="mean"``) or sum over prompts. clean_metric / corrupt_metric: ``[B]`` raw metric
    values. Scores estimate M(patched) − M(base) of the normalised metric M, where ``direction="noise"``
    patches corrupt activations into the clean run and ``"denoise"`` clean ones into the corrupt run.
    """

    per_prompt: dict[str, torch.Tensor]
    table: SiteTable
    method: str
    direction: str
    metric: str
    normalize: str | None
    reduce: str
    clean_metric: torch.Tensor
    corrupt_metric: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    _replay: Any = field(default=None, repr=False)

    # ------------------------------------------------------------ tensors
    def _agg(self, key: str) -> torch.Tensor:
        if key not in self.per_prompt:
            have = sorted(self.per_prompt)
            kind = _KIND_OF_KEY.get(key, key)
            raise AttributeError(f"no {key!r} scores in this result (it has {have}); rerun with {kind!r} in sites")
        t = self.per_prompt[key]
        return t.mean(0) if self.reduce == "mean" else t.sum(0)

    @property
    def scores(self) -> dict[str, torch.Tensor]:
        """All aggregated score tensors by name."""
        return {key: self._agg(key) for key in self.per_prompt}

    heads = property(lambda self: self._agg("heads"), doc="[L, H] per-head scores (o_proj input z).")
    mlp = property(lambda self: self._agg("mlp"), doc="[L] MLP-output scores.")
    neurons = property(lambda self: self._agg("neurons"), doc="[L, d_mlp] neuron scores (down_proj input).")
    attn = property(lambda self: self._agg("attn"), doc="[L] attention-output scores.")
    layer = property(lambda self: self._agg("layer"), doc="[L] decoder-layer-output scores.")
    q = property(lambda self: self._agg("q"), doc="[L, H] per-query-head scores.")
    k = property(lambda self: self._agg("k"), doc="[L, K] per-KV-head key scores.")
    v = property(lambda self: self._agg("v"), doc="[L, K] per-KV-head value scores.")

    # ---------------------------------------------------------- reductions
    def layer_scores(self) -> dict[Component, float]:
        """Layer-level scores as the paper reduces them: an attention layer's score is the sum of its head
        scores (over every per-head site present: z, q, k, v), else its attention-output score; an MLP's
        score is its MLP-output score, else the sum of its neuron scores."""
        out: dict[Component, float] = {}
        L = self.table.n_layers
        head_keys = [k for k in ("heads", "q", "k", "v") if k in self.per_prompt]
        for layer in range(L):
            if head_keys:
                out[Component("attn", layer)] = float(sum(self._agg(k)[layer].sum() for k in head_keys))
            elif "attn" in self.per_prompt:
                out[Component("attn", layer)] = float(self._agg("attn")[layer])
            if "mlp" in self.per_prompt:
                out[Component("mlp", layer)] = float(self._agg("mlp")[layer])
            elif "neurons" in self.per_prompt:
                out[Component("mlp", layer)] = float(self._agg("neurons")[layer].sum())
        return out

    def component_scores(self, granularity: str = "layer") -> dict[Component, float]:
        """Scores keyed by maskable Component: ``layer`` (as ``layer_scores``), ``head`` (single heads and
        whole MLP layers) or ``neuron`` (single heads and single neurons)."""
        if granularity == "layer":
            return self.layer_scores()
        if granularity not in ("head", "neuron"):
            raise ValueError(f"granularity must be 'layer', 'head' or 'neuron'; got {granularity!r}")
        out: dict[Component, float] = {}
        heads = self._agg("heads")
        for layer in range(heads.shape[0]):
            for h in range(heads.shape[1]):
                out[Component("attn", layer, h)] = float(heads[layer, h])
        if granularity == "neuron":
            neurons = self._agg("neurons")
            for layer in range(neurons.shape[0]):
                for i, s in enumerate(neurons[layer].tolist()):
                    out[Component("mlp", layer, i)] = s
        else:
            for comp, s in self.layer_scores().items():
                if comp.kind == "mlp":
                    out[comp] = s
        return out

    def to_mask(self, table: SiteTable | None = None, budget: int | None = None, granularity: str = "layer") -> Mask:
        """A Mask of the components chosen by the paper's budget rule from ``component_scores(granularity)``;
        ``budget`` is a parameter count. Each step of the rule costs the parameters the component adds to those
        already chosen (``mu_fast.localize.budget``), so under GQA a KV group's key/value rows count once however
        many of its query heads are chosen: ``mask.param_count()`` equals ``mask.meta["trained_params"]``,
        reaches the budget and overshoots it by less than one component."""
        if budget is None:
            raise ValueError("to_mask needs budget= (a parameter count, e.g. mu_fast.masks.paper_budget(table, n))")
        table = table or self.table
        chosen, trained = budget_match_trained(self.component_scores(granularity), table, budget)
        meta = {"source": f"attribution:{self.method}:{self.direction}", "granularity": granularity, "budget": budget, "trained_params": trained}
        return Mask.from_components(table, chosen, meta=meta)

    def units(self) -> list[tuple[str, int, int, float]]:
        """Every scored unit ``(kind, layer, group, score)`` (group 0 for layer-level sites)."""
        out = []
        for key in self.per_prompt:
            kind = _KIND_OF_KEY[key]
            agg = self._agg(key)
            agg = agg if kind in _GROUPED else agg[:, None]
            for layer in range(agg.shape[0]):
                for g, s in enumerate(agg[layer].tolist()):
                    out.append((kind, layer, g, s))
        return out

    def topk(self, k: int = 10, sites: str | tuple[str, ...] | None = None) -> list[tuple[str, float]]:
        """The k units with the largest |score| as ``(label, score)`` (labels as in ``unit_label``),
        optionally only of the given site kinds."""
        kinds = None if sites is None else ((sites,) if isinstance(sites, str) else tuple(sites))
        units = [u for u in self.units() if kinds is None or u[0] in kinds]
        units.sort(key=lambda u: -abs(u[3]))
        return [(unit_label(kind, layer, g), s) for kind, layer, g, s in units[:k]]

    def to_tl_names(self) -> dict[str, torch.Tensor]:
        """Aggregated scores keyed by TransformerLens hook name: ``blocks.{L}.attn.hook_z`` -> ``[H]``,
        ``blocks.{L}.mlp.hook_post`` -> ``[d_mlp]``, ``blocks.{L}.hook_mlp_out`` -> scalar tensor, ..."""
        out = {}
        for key in self.per_prompt:
            kind = _KIND_OF_KEY[key]
            agg = self._agg(key)
            for layer in range(agg.shape[0]):
                out[TL_HOOKS[kind].format(L=layer)] = agg[layer]
        return out

    def verify(self, k: int = 10, n_random: int | None = None, sites: str | tuple[str, ...] | None = None, seed: int = 0) -> Any:
        """Check the top-k units (plus ``n_random`` random others, default k) against batched exact patching
        of the same inputs, metric and direction. Returns a ``VerifyReport`` (rank correlation, top-k recall,
        sign agreement, both score vectors).

        For a ``causal_trace`` result, each chosen unit is restored again, alone, in the same noised runs
        (every prompt in one batch, full forwards without the trace's chunking and prefix reuse): the
        traced effects are exact restorations, so the report should show them equal to round-off."""
        if self._replay is None:
            raise ValueError(
                "this result keeps no inputs, so it cannot be verified; verify the result that attribute() or "
                "causal_trace() returned, before copying or saving it"
            )
        from mu_fast.localize.verify import verify_result

        return verify_result(self, k, k if n_random is None else n_random, sites, seed)


def empty_per_prompt(kinds: tuple[str, ...], B: int, table: SiteTable, dtype: torch.dtype, device: Any) -> dict[str, torch.Tensor]:
    out = {}
    groups = {"head": table.n_heads, "q": table.n_heads, "k": table.n_kv_heads, "v": table.n_kv_heads, "neuron": table.d_mlp}
    for kind in SITE_KINDS:
        if kind in kinds:
            shape = (B, table.n_layers, groups[kind]) if kind in _GROUPED else (B, table.n_layers)
            out[RESULT_KEYS[kind]] = torch.zeros(shape, dtype=dtype, device=device)
    return out

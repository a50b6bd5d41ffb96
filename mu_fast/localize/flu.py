"""Automatic fact-lookup (FLU) localization by linear probes at the subject's last token.

The paper picks the MLP layers in which the attribute becomes linearly decodable at the subject's last token
(sports: a probe on the athlete token jumps to ~100% over a few early layers). Here every layer's residual stream
is read at three points — before the layer (``pre``), between attention and MLP (``mid``) and after the layer
(``post``) — and one batched multinomial probe per point is trained on 80% of the facts and scored on 20%.
An MLP's *gain* is ``acc_post[l] − acc_mid[l]``: what that MLP adds to decodability. FLU selects the MLPs with
gain ≥ ``min_gain`` up to the first layer where ``acc_post`` reaches ``saturation × max(acc_post)``; if none
qualifies, the single MLP with the largest gain.

Attention can take part in the enrichment too (on the organism, attention 0 gathers the name's tokens and already
lifts the probe). Its gain is ``acc_mid[l] − acc_pre[l]``; ``select_flu_attention_layers`` applies the same
count-based rule to it (no fallback: attention is implicated only where it passes). ``flu_localize(...,
include_attention=True)`` (the ``flu_attn`` variant) edits those attention blocks next to the paper's MLP-only
FLU layers; ``enrichment_shares`` splits the probe's rise between attention and MLPs for the localization map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mu_fast.data.base import FactTask, PromptSet, TokenizedPrompts, pad_batch, pad_id_of, tokenize_prompts
from mu_fast.models.forward import trunk_hidden
from mu_fast.models.sites import Component, SiteTable


@dataclass
class FLUResult:
    """Per-layer held-out probe accuracy at the subject's last token and the selected MLP layers.

    acc_pre / acc_mid / acc_post: ``[L]`` float32; chance: majority-class rate of the held-out facts.
    attn_layers: attention blocks whose gain passes the same rule (``select_flu_attention_layers``); they are
    among ``components()`` only when ``include_attention`` (the ``flu_attn`` variant).
    """

    layers: list[int]
    acc_pre: torch.Tensor
    acc_mid: torch.Tensor
    acc_post: torch.Tensor
    chance: float
    meta: dict[str, Any] = field(default_factory=dict)
    attn_layers: list[int] = field(default_factory=list)
    include_attention: bool = False

    @property
    def mlp_gain(self) -> torch.Tensor:
        return self.acc_post - self.acc_mid

    @property
    def attn_gain(self) -> torch.Tensor:
        return self.acc_mid - self.acc_pre

    def components(self) -> list[Component]:
        """The MLPs of ``layers``, preceded in each layer by its attention block when ``include_attention``."""
        attn = set(self.attn_layers) if self.include_attention else set()
        comps = []
        for layer in sorted(set(self.layers) | attn):
            if layer in attn:
                comps.append(Component("attn", layer))
            if layer in self.layers:
                comps.append(Component("mlp", layer))
        return comps

    def enrichment_shares(self) -> dict[str, Any]:
        """How the probe's rise up to the FLU saturation layer splits between attention and MLPs (``enrichment_shares``)."""
        return enrichment_shares(self.acc_pre, self.acc_mid, self.acc_post, int(self.meta.get("n_test", 0)),
                                 float(self.meta.get("saturation", 0.95)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "attn_layers": self.attn_layers,
            "include_attention": self.include_attention,
            "acc_pre": self.acc_pre.tolist(),
            "acc_mid": self.acc_mid.tolist(),
            "acc_post": self.acc_post.tolist(),
            "mlp_gain": self.mlp_gain.tolist(),
            "attn_gain": self.attn_gain.tolist(),
            "chance": self.chance,
            **self.meta,
        }


def residual_features(
    model: torch.nn.Module, tokenized: TokenizedPrompts, pad_id: int, position: str = "subject_last", batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Residual stream at one position per prompt: ``{"pre", "mid", "post"}`` each ``[L, N, d]`` float32 (float64
    for a float64 model).

    position: ``subject_last`` (needs subjects) or ``last`` (the answer-predicting token).
    """
    if position == "subject_last":
        if tokenized.subject_last is None:
            raise ValueError("position='subject_last' needs PromptSet.subjects; give the subjects or use position='last'")
        positions = tokenized.subject_last
    elif position == "last":
        positions = torch.tensor([len(s) - 1 for s in tokenized.input_ids])
    else:
        raise ValueError(f"position must be 'subject_last' or 'last'; got {position!r}")
    table = SiteTable(model)
    device = model.get_input_embeddings().weight.device
    store: dict[str, list[list[torch.Tensor]]] = {k: [[] for _ in range(table.n_layers)] for k in ("pre", "mid", "post")}
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    def grab(kind: str, layer: int, use_output: bool):
        def hook(module, args, kwargs, output=None):
            x = output if use_output else (args[0] if args else kwargs.get("hidden_states"))
            x = x[0] if isinstance(x, tuple) else x
            store[kind][layer].append(x[rows, cols].detach().to(torch.promote_types(x.dtype, torch.float32)).cpu())

        return hook

    handles = []
    for layer in range(table.n_layers):
        block = model.get_submodule(table.layer_path(layer))
        handles.append(block.register_forward_pre_hook(grab("pre", layer, False), with_kwargs=True))
        handles.append(block.register_forward_hook(grab("post", layer, True), with_kwargs=True))
        norm = model.get_submodule(table.resid_mid_path(layer))
        handles.append(norm.register_forward_pre_hook(grab("mid", layer, False), with_kwargs=True))
    try:
        with torch.no_grad():
            for start in range(0, len(tokenized), batch_size):
                idx = list(range(start, min(start + batch_size, len(tokenized))))
                batch = pad_batch([tokenized.input_ids[i] for i in idx], pad_id).to(device)
                rows = torch.arange(len(idx), device=device)
                cols = positions[idx].to(device)
                trunk_hidden(model, batch)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.stack([torch.cat(chunks) for chunks in v]) for k, v in store.items()}


def flu_localize(
    model: torch.nn.Module,
    tokenizer: Any,
    task: FactTask | PromptSet,
    classes: list[str] | None = None,
    min_gain: float = 0.05,
    saturation: float = 0.95,
    seed: int = 0,
    batch_size: int = 64,
    include_attention: bool = False,
) -> FLUResult:
    """Select fact-lookup MLP layers of ``model`` from probes on ``task``'s facts (training format).

    task: a FactTask (its forget and maintain facts are pooled) or a PromptSet with ``subjects``; answers are the
    class labels (``classes``, default ``task.classes``). include_attention: the ``flu_attn`` variant, whose
    components add the attention blocks the probe implicates (``attn_layers``, computed either way).
    """
    from mu_fast.evaluate.linear_probes import stratified_split, train_probes

    if isinstance(task, FactTask):
        classes = classes or task.classes
        pooled = _pool([task.forget_train, task.forget_test, task.maintain_train, task.maintain_test])
    else:
        pooled = task
    if not classes:
        raise ValueError(
            "FLU by probes needs a classification attribute (task.classes, e.g. the sports); for CounterFact use "
            "the paper's FLU layers (mu_fast.localize.paper_graphs.paper_flu_layers) or attribution at subject positions"
        )
    if len(pooled) < 10:
        raise ValueError(f"FLU probes need at least 10 facts; got {len(pooled)}")
    labels = torch.tensor([list(classes).index(a) for a in pooled.answers], dtype=torch.int64)
    tokenized = tokenize_prompts(tokenizer, pooled)
    feats = residual_features(model, tokenized, pad_id_of(tokenizer), "subject_last", batch_size)
    train, test = stratified_split(labels, 0.2, seed)
    L = feats["pre"].shape[0]
    stacked = torch.cat([feats["pre"], feats["mid"], feats["post"]])  # [3L, N, d]
    probes = train_probes(stacked[:, train], labels[train], len(classes))
    acc = probes.accuracy(stacked[:, test], labels[test]).float()
    acc_pre, acc_mid, acc_post = acc[:L], acc[L : 2 * L], acc[2 * L :]
    n_test = int(test.numel())
    layers = select_flu_layers(acc_mid, acc_post, n_test, min_gain, saturation)
    attn_layers = select_flu_attention_layers(acc_pre, acc_mid, acc_post, n_test, min_gain, saturation)
    chance = float(torch.bincount(labels[test]).max()) / max(n_test, 1)
    meta = {"min_gain": min_gain, "saturation": saturation, "n_facts": len(pooled), "n_test": n_test}
    return FLUResult(layers, acc_pre, acc_mid, acc_post, chance, meta, attn_layers, include_attention)


def select_flu_layers(acc_mid: torch.Tensor, acc_post: torch.Tensor, n_test: int, min_gain: float = 0.05,
                      saturation: float = 0.95) -> list[int]:
    """The FLU rule on held-out probe accuracies ``[L]`` measured on ``n_test`` facts (see the module docstring).

    Accuracies are fractions of ``n_test``, so the rule compares counts of correctly probed facts: a gain of exactly
    ``min_gain`` (e.g. 0.9583333 − 0.9083333 = 0.05 at ``n_test`` = 120, which is 0.04999995 in float32) qualifies.
    """
    n = max(int(n_test), 1)
    post = _counts(acc_post, n)
    gain = post - _counts(acc_mid, n)
    last = _saturation_layer(post, saturation)
    layers = [layer for layer in range(last + 1) if float(gain[layer]) >= min_gain * n - _TOL]
    return layers or [int(gain.argmax())]


def select_flu_attention_layers(acc_pre: torch.Tensor, acc_mid: torch.Tensor, acc_post: torch.Tensor, n_test: int,
                                min_gain: float = 0.05, saturation: float = 0.95) -> list[int]:
    """Attention blocks the probe implicates: gain ``acc_mid − acc_pre`` ≥ ``min_gain`` in layers up to the same
    saturation layer as ``select_flu_layers`` (the first whose ``acc_post`` reaches ``saturation × max``),
    compared in counts of the ``n_test`` held-out facts. Empty when none qualifies (no fallback)."""
    if not acc_pre.shape == acc_mid.shape == acc_post.shape or acc_pre.ndim != 1:
        raise ValueError(f"acc_pre/acc_mid/acc_post must be [L] each; got {tuple(acc_pre.shape)}, "
                         f"{tuple(acc_mid.shape)}, {tuple(acc_post.shape)}")
    n = max(int(n_test), 1)
    gain = _counts(acc_mid, n) - _counts(acc_pre, n)
    last = _saturation_layer(_counts(acc_post, n), saturation)
    return [layer for layer in range(last + 1) if float(gain[layer]) >= min_gain * n - _TOL]


def enrichment_shares(acc_pre: torch.Tensor, acc_mid: torch.Tensor, acc_post: torch.Tensor, n_test: int,
                      saturation: float = 0.95) -> dict[str, Any]:
    """Split the probe's rise from the embeddings to the saturation layer ``s`` between attention and MLPs.

    Since a layer's ``pre`` is the previous layer's ``post``, ``acc_post[s] − acc_pre[0]`` is the sum of every
    attention gain and MLP gain up to ``s`` (negative gains included). Returns ``saturation_layer``, ``rise``,
    ``attn_gain`` / ``mlp_gain`` (``[s + 1]`` lists) and ``attn_share`` / ``mlp_share`` (fractions of the rise
    summing to 1; ``None`` when the probe does not rise).
    """
    n = max(int(n_test), 1)
    pre, mid, post = _counts(acc_pre, n), _counts(acc_mid, n), _counts(acc_post, n)
    last = _saturation_layer(post, saturation)
    attn = (mid - pre)[: last + 1] / n
    mlp = (post - mid)[: last + 1] / n
    rise = float(attn.sum() + mlp.sum())
    ok = rise > _TOL
    return {"saturation_layer": last, "rise": rise, "attn_gain": attn.tolist(), "mlp_gain": mlp.tolist(),
            "attn_share": float(attn.sum()) / rise if ok else None, "mlp_share": float(mlp.sum()) / rise if ok else None}


_TOL = 1e-6


def _counts(acc: torch.Tensor, n: int) -> torch.Tensor:
    """Accuracies (fractions of ``n`` facts) as counts of correctly probed facts, float64."""
    return torch.round(acc.double() * n)


def _saturation_layer(post: torch.Tensor, saturation: float) -> int:
    """First layer whose count reaches ``saturation × max`` (the last layer if none)."""
    reached = torch.nonzero(post >= saturation * float(post.max()) - _TOL).flatten()
    return int(reached[0]) if reached.numel() else len(post) - 1


def _pool(sets: list[PromptSet]) -> PromptSet:
    """Union of prompt sets, dropping repeated prompts (unsplit tasks list the forget facts twice)."""
    seen: set[str] = set()
    keep_sets = []
    for ps in sets:
        idx = [i for i, p in enumerate(ps.prompts) if not (p in seen or seen.add(p))]
        if idx:
            keep_sets.append(ps.subset(idx))
    first = keep_sets[0]
    return PromptSet(
        [p for s in keep_sets for p in s.prompts],
        [a for s in keep_sets for a in s.answers],
        None,
        first.choices,
        [x for s in keep_sets for x in (s.subjects or [])] if first.subjects is not None else None,
        None,
        first.label_token,
        "flu_pool",
    )

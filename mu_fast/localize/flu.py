"""Automatic fact-lookup (FLU) localization by linear probes at the subject's last token.

The paper picks the MLP layers in which the attribute becomes linearly decodable at the subject's last token
(sports: a probe on the athlete token jumps to ~100% over a few early layers). Here every layer's residual stream
is read at three points — before the layer (``pre``), between attention and MLP (``mid``) and after the layer
(``post``) — and one batched multinomial probe per point is trained on 80% of the facts and scored on 20%.
An MLP's *gain* is ``acc_post[l] − acc_mid[l]``: what that MLP adds to decodability. FLU selects the MLPs with
gain ≥ ``min_gain`` up to the first layer where ``acc_post`` reaches ``saturation × max(acc_post)``; if none
qualifies, the single MLP with the largest gain.
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
    """

    layers: list[int]
    acc_pre: torch.Tensor
    acc_mid: torch.Tensor
    acc_post: torch.Tensor
    chance: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mlp_gain(self) -> torch.Tensor:
        return self.acc_post - self.acc_mid

    @property
    def attn_gain(self) -> torch.Tensor:
        return self.acc_mid - self.acc_pre

    def components(self) -> list[Component]:
        return [Component("mlp", layer) for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "acc_pre": self.acc_pre.tolist(),
            "acc_mid": self.acc_mid.tolist(),
            "acc_post": self.acc_post.tolist(),
            "mlp_gain": self.mlp_gain.tolist(),
            "chance": self.chance,
            **self.meta,
        }


def residual_features(
    model: torch.nn.Module, tokenized: TokenizedPrompts, pad_id: int, position: str = "subject_last", batch_size: int = 64
) -> dict[str, torch.Tensor]:
    """Residual stream at one position per prompt: ``{"pre", "mid", "post"}`` each ``[L, N, d]`` float32.

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
            store[kind][layer].append(x[rows, cols].detach().float().cpu())

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
) -> FLUResult:
    """Select fact-lookup MLP layers of ``model`` from probes on ``task``'s facts (training format).

    task: a FactTask (its forget and maintain facts are pooled) or a PromptSet with ``subjects``; answers are the
    class labels (``classes``, default ``task.classes``).
    """
    from mu_fast.evaluate.probes import stratified_split, train_probes

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
    layers = select_flu_layers(acc_mid, acc_post, int(test.numel()), min_gain, saturation)
    chance = float(torch.bincount(labels[test]).max()) / max(int(test.numel()), 1)
    meta = {"min_gain": min_gain, "saturation": saturation, "n_facts": len(pooled), "n_test": int(test.numel())}
    return FLUResult(layers, acc_pre, acc_mid, acc_post, chance, meta)


def select_flu_layers(acc_mid: torch.Tensor, acc_post: torch.Tensor, n_test: int, min_gain: float = 0.05,
                      saturation: float = 0.95) -> list[int]:
    """The FLU rule on held-out probe accuracies ``[L]`` measured on ``n_test`` facts (see the module docstring).

    Accuracies are fractions of ``n_test``, so the rule compares counts of correctly probed facts: a gain of exactly
    ``min_gain`` (e.g. 0.9583333 − 0.9083333 = 0.05 at ``n_test`` = 120, which is 0.04999995 in float32) qualifies.
    """
    n = max(int(n_test), 1)
    post = torch.round(acc_post.double() * n)  # correct counts per layer
    gain = post - torch.round(acc_mid.double() * n)
    tol = 1e-6
    reached = torch.nonzero(post >= saturation * float(post.max()) - tol).flatten()
    last = int(reached[0]) if reached.numel() else len(post) - 1
    layers = [layer for layer in range(last + 1) if float(gain[layer]) >= min_gain * n - tol]
    return layers or [int(gain.argmax())]


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

"""Baseline localizations of the paper (authors_repo.md §2.5), as lists of components.

* ``random_matrices``: whole matrices drawn uniformly from {q, k, v, o, up, down} of any layer (never gate, as in
  the paper's code) until the parameter budget is used up. Seeded (the paper's was not), and drawn without
  replacement so a matrix is never counted twice.
* ``random_mlps``: ``k`` whole MLP layers (the paper uses k = number of FLU layers), seeded.
* ``all_mlps``: every MLP. ``nonlocalized``: every attention and MLP matrix (embeddings, norms, head frozen).
* ``manual``: explicit attention / MLP layer lists.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from mu_fast.models.sites import Component, SiteTable

RANDOM_POOL = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.down")


def random_matrices(table: SiteTable, budget: int, seed: int = 0) -> list[Component]:
    """Whole matrices drawn without replacement from RANDOM_POOL × layers until ``budget`` parameters are used
    (the last draw may overshoot, as in the paper)."""
    if budget <= 0:
        raise ValueError(f"budget must be a positive parameter count; got {budget}")
    pool = [Component(kind, layer) for layer in range(table.n_layers) for kind in RANDOM_POOL]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()
    picked, remaining = [], budget
    for i in order:
        if remaining <= 0:
            break
        picked.append(pool[i])
        remaining -= table.component_size(pool[i])
    return picked


def random_mlps(table: SiteTable, k: int, seed: int = 0) -> list[Component]:
    """``k`` distinct whole MLP layers chosen uniformly at random (seeded)."""
    if not 0 < k <= table.n_layers:
        raise ValueError(f"k must be in [1, {table.n_layers}] MLP layers; got {k}")
    layers = torch.randperm(table.n_layers, generator=torch.Generator().manual_seed(seed))[:k]
    return [Component("mlp", int(layer)) for layer in sorted(layers.tolist())]


def all_mlps(table: SiteTable) -> list[Component]:
    return [Component("mlp", layer) for layer in range(table.n_layers)]


def nonlocalized(table: SiteTable) -> list[Component]:
    return [Component(kind, layer) for layer in range(table.n_layers) for kind in ("attn", "mlp")]


def manual(table: SiteTable, attn_layers: Iterable[int] = (), mlp_layers: Iterable[int] = ()) -> list[Component]:
    """Whole attention and MLP layers given by index (validated against the model's depth)."""
    comps = [Component("attn", int(layer)) for layer in attn_layers] + [Component("mlp", int(layer)) for layer in mlp_layers]
    if not comps:
        raise ValueError("a manual localization needs at least one attention or MLP layer")
    for comp in comps:
        table.selections(comp)  # raises a clear error for an out-of-range layer
    return comps

"""Sites where attribution reads and patches activations, resolved through the site table, and the hooks
that expose them.

| site kind | module (``SiteTable``)        | tensor                | groups × group size        |
|-----------|-------------------------------|-----------------------|----------------------------|
| ``head``  | ``o_proj`` input              | per-head z            | n_heads × d_head           |
| ``q``     | ``q_proj`` output             | per-head queries      | n_heads × d_head           |
| ``k``/``v`` | ``k_proj``/``v_proj`` output | per-KV-head keys/values | n_kv_heads × d_head       |
| ``neuron``| ``down_proj`` input           | MLP neuron activations| d_mlp × 1                  |
| ``mlp``   | MLP module output             | MLP output            | 1 × d_model                |
| ``attn``  | ``o_proj`` output             | attention output (before any post-norm) | 1 × d_model |
| ``layer`` | decoder layer output          | residual stream       | 1 × d_model                |

Because ``o_proj`` and ``down_proj`` are linear without bias, gradient·difference summed over a layer's
heads equals the ``attn`` site's value, and summed over neurons equals the ``mlp`` site's value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from mu_fast.models.sites import SiteTable, get_submodule

SITE_KINDS = ("head", "q", "k", "v", "neuron", "mlp", "attn", "layer")
_ALIASES = {
    "heads": "head",
    "attn.head": "head",
    "z": "head",
    "neurons": "neuron",
    "mlp.neuron": "neuron",
    "mlp_out": "mlp",
    "attn_out": "attn",
    "resid": "layer",
    "layers": "layer",
}
# Name of each site kind's score tensor in an AttributionResult.
RESULT_KEYS = {"head": "heads", "q": "q", "k": "k", "v": "v", "neuron": "neurons", "mlp": "mlp", "attn": "attn", "layer": "layer"}


@dataclass(frozen=True)
class Site:
    """One place in one layer: the activation ``[B, T, n_groups * group_size]`` at ``module``'s
    ``io`` ("input": first positional argument, "output": the output or its first element)."""

    kind: str
    layer: int
    module: str
    io: str
    n_groups: int
    group_size: int

    @property
    def features(self) -> int:
        return self.n_groups * self.group_size


def unit_label(kind: str, layer: int, group: int) -> str:
    """Readable name of a scored unit: ``a3.5`` head, ``m2.17`` neuron, ``m2`` MLP, ``a3`` attention
    output, ``r3`` layer output, ``a3.5.q`` / ``a3.1.k`` query / key-value head."""
    if kind == "head":
        return f"a{layer}.{group}"
    if kind == "neuron":
        return f"m{layer}.{group}"
    if kind in ("q", "k", "v"):
        return f"a{layer}.{group}.{kind}"
    return {"mlp": "m", "attn": "a", "layer": "r"}[kind] + str(layer)


def parse_site_kinds(sites: str | Iterable[str]) -> tuple[str, ...]:
    """Normalise ``sites`` ("head", ("head", "mlp"), aliases like "heads"/"neurons") to SITE_KINDS order."""
    items = [sites] if isinstance(sites, str) else list(sites)
    kinds = []
    for item in items:
        kind = _ALIASES.get(item, item)
        if kind not in SITE_KINDS:
            raise ValueError(f"unknown site {item!r}; choose from {SITE_KINDS} (aliases {sorted(_ALIASES)})")
        kinds.append(kind)
    if not kinds:
        raise ValueError("sites is empty; pass e.g. sites=('head', 'mlp')")
    return tuple(k for k in SITE_KINDS if k in kinds)


def resolve_sites(table: SiteTable, kinds: Iterable[str], layers: Iterable[int] | None = None) -> list[Site]:
    """Sites of the given kinds in the given layers (default all), ordered by layer then kind."""
    layer_list = range(table.n_layers) if layers is None else sorted(set(layers))
    H, K, dh, d = table.n_heads, table.n_kv_heads, table.head_dim, table.d_model
    out = []
    for L in layer_list:
        for kind in parse_site_kinds(tuple(kinds)):
            if kind == "head":
                out.append(Site(kind, L, table.module_path(L, "o"), "input", H, dh))
            elif kind in ("q", "k", "v"):
                out.append(Site(kind, L, table.module_path(L, kind), "output", H if kind == "q" else K, dh))
            elif kind == "neuron":
                out.append(Site(kind, L, table.module_path(L, "down"), "input", table.d_mlp, 1))
            elif kind == "mlp":
                out.append(Site(kind, L, table.mlp_path(L), "output", 1, d))
            elif kind == "attn":
                out.append(Site(kind, L, table.module_path(L, "o"), "output", 1, d))
            else:
                out.append(Site(kind, L, table.layer_path(L), "output", 1, d))
    return out


SiteFn = Callable[[Site, torch.Tensor], "torch.Tensor | None"]


class SiteHooks:
    """Context manager that calls ``fn(site, activation)`` at every site during forwards.

    ``activation`` is the ``[B, T, F]`` tensor itself; if ``fn`` returns a tensor, it replaces the
    activation in the forward (same shape). Hooks are removed on exit, also after an exception.
    """

    def __init__(self, model: Any, sites: Iterable[Site], fn: SiteFn):
        self.model, self.sites, self.fn = model, list(sites), fn
        self._handles: list[Any] = []

    def __enter__(self) -> SiteHooks:
        try:
            for site in self.sites:
                module = get_submodule(self.model, site.module)
                if site.io == "input":
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(site)))
                else:
                    self._handles.append(module.register_forward_hook(self._post_hook(site)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, site: Site) -> Callable[..., Any]:
        def hook(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            new = self.fn(site, args[0])
            return None if new is None else (new, *args[1:])

        return hook

    def _post_hook(self, site: Site) -> Callable[..., Any]:
        def hook(module: Any, args: Any, output: Any) -> Any:
            tensor = output[0] if isinstance(output, tuple) else output
            new = self.fn(site, tensor)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook


class EmbeddingHook:
    """Context manager replacing the token-embedding output ``[B, T, d]`` by ``fn(embeddings)`` (noise,
    interpolation) or just observing it when ``fn`` returns None."""

    def __init__(self, model: Any, fn: Callable[[torch.Tensor], "torch.Tensor | None"]):
        self.model, self.fn, self._handle = model, fn, None

    def __enter__(self) -> EmbeddingHook:
        module = self.model.get_input_embeddings()
        self._handle = module.register_forward_hook(lambda mod, args, out: self.fn(out))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

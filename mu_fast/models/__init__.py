"""Models: the per-architecture site table, tiny test models, shipped 7-9B configs, random-weight models,
loading for edits (quantized frozen weights, offload), and the gathered-logits forward.

Importing this package stays cheap (no transformers): everything but the site table is imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from mu_fast.models.sites import ARCHITECTURES, ArchSpec, Component, SiteTable

_LAZY = {
    "SHIPPED": "mu_fast.models.shipped",
    "shipped_config": "mu_fast.models.shipped",
    "build_random_model": "mu_fast.models.random_model",
    "load_for_edit": "mu_fast.models.edit_loading",
    "FROZEN_PRECISIONS": "mu_fast.models.frozen",
    "config_hash": "mu_fast.models.identity",
}

__all__ = ["ARCHITECTURES", "ArchSpec", "Component", "SiteTable", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mu_fast.models' has no attribute {name!r}")

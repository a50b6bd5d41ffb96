"""The configs of the 7-9B models mu_fast targets, shipped in the package (``mu_fast/models/configs/*.json``).

Each file is the public ``config.json`` of one hub checkpoint, verbatim, plus a ``_mu_fast_source`` key naming
that checkpoint. They let benchmarks, memory plans and tests build these exact shapes (random weights, the meta
device) without a hub. Reading a file imports nothing heavy; ``shipped_config`` builds the transformers config.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

SOURCE_KEY = "_mu_fast_source"
SHIPPED: tuple[str, ...] = ("llama-3-8b", "gemma-7b", "gemma-2-9b", "mistral-7b", "qwen2-7b")
_ALIASES: dict[str, str] = {
    "llama3-8b": "llama-3-8b", "meta-llama-3-8b": "llama-3-8b", "llama-3": "llama-3-8b",
    "gemma": "gemma-7b", "gemma7b": "gemma-7b",
    "gemma2-9b": "gemma-2-9b", "gemma-2": "gemma-2-9b", "gemma29b": "gemma-2-9b",
    "mistral-7b-v0.1": "mistral-7b", "mistral": "mistral-7b",
    "qwen2": "qwen2-7b", "qwen-2-7b": "qwen2-7b",
}


def shipped_name(name: str) -> str:
    """Resolve ``name`` (a shipped name, an alias such as ``llama3-8b`` / ``gemma2-9b``, or the source hub id such
    as ``google/gemma-2-9b``) to its shipped name; ``ValueError`` listing the names otherwise."""
    key = str(name).strip().lower().split("/")[-1].replace("_", "-")
    if key in SHIPPED:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise ValueError(
        f"no shipped config named {name!r}; mu_fast ships {list(SHIPPED)} "
        f"(aliases: {sorted(_ALIASES)}, or their hub ids such as 'google/gemma-2-9b')"
    )


@cache
def _raw(name: str) -> dict[str, Any]:
    path = resources.files("mu_fast.models").joinpath("configs", f"{name}.json")
    return json.loads(path.read_text())


def shipped_config_dict(name: str) -> dict[str, Any]:
    """The hub ``config.json`` of a shipped model as a dict (without the ``_mu_fast_source`` key)."""
    data = dict(_raw(shipped_name(name)))
    data.pop(SOURCE_KEY, None)
    return data


def shipped_source(name: str) -> str:
    """The hub id the shipped config was copied from, e.g. ``meta-llama/Meta-Llama-3-8B``."""
    return _raw(shipped_name(name))[SOURCE_KEY]


def shipped_config(name: str, **overrides: Any) -> Any:
    """The ``transformers.PretrainedConfig`` of a shipped model, optionally with fields overridden.

    ``overrides`` replace config.json fields before the config is built, e.g. a CPU-scaled shape
    ``shipped_config("llama-3-8b", num_hidden_layers=8, hidden_size=1024, intermediate_size=3584)``; an unknown
    field is a ``ValueError`` (a typo would otherwise be stored silently).
    """
    import transformers

    data = shipped_config_dict(name)
    # head_dim: read by every supported attention even where the config class does not declare it (qwen2).
    known = set(data) | set(transformers.CONFIG_MAPPING[data["model_type"]]().to_dict()) | {"head_dim"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"{shipped_name(name)} config has no field(s) {unknown}; check the spelling against its config.json")
    data.update(overrides)
    if "num_hidden_layers" in overrides and data.get("layer_types"):
        data["layer_types"] = list(data["layer_types"])[: data["num_hidden_layers"]]
    return transformers.AutoConfig.for_model(**data)


def real_shapes(name: str) -> dict[str, Any]:
    """The shape fields of a shipped model (``arch`` = model_type; ``head_dim`` resolved as transformers does)."""
    data = shipped_config_dict(name)
    return {
        "arch": data["model_type"],
        "hidden_size": data["hidden_size"],
        "intermediate_size": data["intermediate_size"],
        "num_hidden_layers": data["num_hidden_layers"],
        "num_attention_heads": data["num_attention_heads"],
        "num_key_value_heads": data.get("num_key_value_heads", data["num_attention_heads"]),
        "head_dim": data.get("head_dim") or data["hidden_size"] // data["num_attention_heads"],
        "vocab_size": data["vocab_size"],
    }

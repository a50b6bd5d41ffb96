"""Named edit presets: per method group (``lookup`` / ``tracing`` / ``broad``, ``METHOD_GROUP``)
the EditConfig fields a sweep starts from before its own settings and grid apply.

* ``default``: ``EditConfig()`` for every group (the paper's loop: 50 steps, lr 1e-5, coefficients 1).
* ``organism``: the demo's shared edit settings with, per group, the learning rate the lr rule chose on the demo
  organism for the group's representative method (``mu_fast.organism.stored_lrs.organism_groups``).
* ``paper_sports:<model>:<experiment>`` and ``paper_cf:<model>:<experiment>``: the paper's lr / forget coefficient
  per group (reference/authors_repo.md §3.4, its Tables 6-7) for ``gemma-7b`` / ``gemma-2-9b`` / ``llama-3-8b``.
  Sports experiments: ``forget_16`` / ``forget_64`` (edit to a random other sport) and ``sport_golf`` (a whole sport
  edited to golf); CounterFact: ``forget_16``, ``forget_64`` and ``forget_64_sequential`` (25 steps). Gemma-2's
  runs used 8-bit AdamW moments (bitsandbytes AdamW8bit on whole matrices); here that is MaskedAdamW with
  ``state_bits=8``, which also handles partially selected matrices (attention heads).
A spec may define its own under ``presets:`` (``{name: {group: {field: value}}}``, or ``all:`` for every group).
``preset_config(name, method)`` is the ``EditConfig`` of one method's group, for the Python API.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GROUPS = ("lookup", "tracing", "broad")
# The paper tunes lr / forget coefficient per group of methods (authors_repo.md §3.4): fact-lookup-sized MLP
# selections, output-tracing and random selections, and the broad selections.
METHOD_GROUP = {
    "flu": "lookup", "flu_attn": "lookup", "random_mlps": "lookup", "atp_mlps": "lookup", "ct_mlps": "lookup",
    "atp": "tracing", "ct": "tracing", "random": "tracing",
    "all_mlps": "broad", "nonlocalized": "broad", "manual": "lookup",
}
DEMO_METHODS = ("flu", "flu_attn", "atp", "ct", "random", "random_mlps", "all_mlps", "nonlocalized")

# §3.4: (lookup, tracing, broad) lr / forget_coef, from the committed run configs.
_PAPER: dict[tuple[str, str, str], tuple[tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    ("sports", "gemma-2-9b", "forget_16"): ((1e-5, 1), (5e-5, 5), (2e-5, 5)),
    ("sports", "gemma-2-9b", "forget_64"): ((1e-5, 1), (5e-5, 5), (2e-5, 5)),
    ("sports", "gemma-2-9b", "sport_golf"): ((5e-5, 5), (5e-5, 5), (1e-5, 5)),
    ("sports", "gemma-7b", "forget_16"): ((1e-5, 5), (1e-5, 0.1), (2e-6, 0.2)),
    ("sports", "gemma-7b", "forget_64"): ((1e-5, 5), (1e-5, 0.1), (2e-6, 0.2)),
    ("sports", "gemma-7b", "sport_golf"): ((2e-5, 5), (5e-6, 1), (5e-6, 1)),
    ("sports", "llama-3-8b", "forget_16"): ((5e-5, 5), (1e-4, 2), (2e-5, 2)),
    ("sports", "llama-3-8b", "forget_64"): ((5e-5, 5), (1e-4, 2), (2e-5, 2)),
    ("sports", "llama-3-8b", "sport_golf"): ((5e-5, 0.2), (5e-5, 1), (1e-5, 0.1)),
    ("cf", "gemma-2-9b", "forget_16"): ((5e-5, 2), (5e-5, 2), (5e-6, 1)),
    ("cf", "gemma-2-9b", "forget_64"): ((2e-5, 0.5), (2e-5, 2), (5e-6, 1)),
    ("cf", "gemma-2-9b", "forget_64_sequential"): ((2e-5, 0.5), (2e-5, 2), (5e-6, 1)),
    ("cf", "gemma-7b", "forget_16"): ((5e-6, 0.1), (5e-6, 0.2), (5e-6, 0.2)),
    ("cf", "gemma-7b", "forget_64"): ((1e-5, 2), (2e-5, 1), (2e-6, 1)),
    ("cf", "gemma-7b", "forget_64_sequential"): ((1e-5, 2), (2e-5, 1), (2e-6, 1)),
    ("cf", "llama-3-8b", "forget_16"): ((1e-4, 1), (2e-5, 0.1), (2e-5, 2)),
    ("cf", "llama-3-8b", "forget_64"): ((5e-5, 0.2), (5e-5, 2), (1e-5, 0.2)),
    ("cf", "llama-3-8b", "forget_64_sequential"): ((5e-5, 0.2), (5e-5, 2), (1e-5, 0.2)),
}


def builtin_names() -> list[str]:
    """Every built-in preset name."""
    return ["default", "organism"] + [f"paper_{d}:{m}:{e}" for d, m, e in _PAPER]


def _paper_preset(name: str) -> dict[str, dict[str, Any]]:
    kind, model, experiment = name.split(":", 2)
    dataset = kind.removeprefix("paper_")
    try:
        from mu_fast.data.datadir import paper_model

        model = paper_model(model).key
    except ValueError:
        pass
    key = (dataset, model, experiment)
    if key not in _PAPER:
        known = sorted({e for d, _, e in _PAPER if d == dataset})
        raise ValueError(f"spec: edit.preset: no preset {name!r}: the paper's §3.4 tables cover models gemma-7b, gemma-2-9b, llama-3-8b "
                         f"and {dataset} experiments {known}; use e.g. paper_{dataset}:gemma-2-9b:{known[0]}")
    steps = 25 if experiment.endswith("_sequential") else 50
    extra = {"optimizer": "masked", "state_bits": 8} if model == "gemma-2-9b" else {}
    return {group: {"steps": steps, "lr": lr, "forget_coef": float(coef), **extra}
            for group, (lr, coef) in zip(GROUPS, _PAPER[key])}


def preset_groups(name: str, custom: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``{group: {EditConfig field: value}}`` of the preset ``name`` (a spec's own ``presets`` first)."""
    custom = dict(custom or {})
    if name in custom:
        groups = dict(custom[name])
        every = dict(groups.pop("all", {}) or {})
        return {g: {**every, **dict(groups.get(g) or {})} for g in GROUPS}
    if name == "default":
        return {g: {} for g in GROUPS}
    if name == "organism":
        from mu_fast.organism.stored_lrs import organism_groups

        return organism_groups()
    if name.startswith(("paper_sports:", "paper_cf:")) and name.count(":") == 2:
        return _paper_preset(name)
    import difflib

    names = sorted(custom) + builtin_names()
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"spec: edit.preset: unknown preset {name!r}{hint}; use default, organism, "
                     "paper_sports:<model>:<forget_16|forget_64|sport_golf>, paper_cf:<model>:<experiment>, or a "
                     "name defined under presets:")


def preset_config(name: str, method: str = "manual", **overrides: Any) -> Any:
    """The ``EditConfig`` of the preset ``name`` for a mask made by ``method`` (the settings of its group; a method
    of no group, e.g. a hand-made mask, takes the lookup group's), with ``overrides`` on top:
    ``edit(model, tokenizer, task, loc.mask, preset_config("organism", "flu"))``."""
    from mu_fast.edit.loop import EditConfig

    return EditConfig(**{**preset_groups(name)[METHOD_GROUP.get(method, "lookup")], **overrides})

"""What a sweep evaluates after each edit: the evaluation registry, each entry's settings and their defaults.

Built in (spec key ``evaluations:``):

* ``formats``: ``all`` or a list of the task's formats (``normal``, ``qa``, ``mcq``, ``paraphrase``, ...), scored by
  ``mu_fast.evaluate.evaluate_task``; ``batch_size`` is its batch.
* ``relearn``: the relearning attack (``mu_fast.evaluate.relearn_attack``), ``false`` / ``true`` (its defaults, the
  paper's) or a mapping of its keyword arguments (``steps``, ``lr``, ``lora_rank``, ...). It is evaluated at steps 0,
  steps // 2 and steps, as ``mu_fast.pipeline`` does.
* ``probes``: latent-knowledge probes (``mu_fast.evaluate.latent_probes``), ``false`` / ``true`` / its arguments.

Registered at import (``mu_fast.sweep.protocol_evaluations``): ``softprompt`` (the soft-prompt attack),
``capability`` (lm-eval; skipped with the reason when its data is not available offline) and ``paper_probes``
(latent probes exactly as the authors).

Later evaluations plug in with ``register_evaluation(name, fn, defaults, check=None)``: ``fn(model, tokenizer, task, settings,
seed) -> dict`` (JSON-ready), run after the built-in ones on the edited model, which it must leave unchanged; its
result is stored under ``record["results"][name]``. A spec turns it on with ``evaluations: {name: true | {...}}``.
Registered evaluations must be registered in every process that runs sweeps (Ray actors, GPU workers): register
them at import time of a module the spec's runs import, or pass ``setup=`` to the executor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# relearn_attack's keyword defaults (the paper's protocol); tests/sweep check that they match its signature.
RELEARN_DEFAULTS: dict[str, Any] = {
    "steps": 20, "lr": 2e-4, "lora_rank": 512, "lora_alpha": 32.0, "lora_dropout": 0.05, "batch_size": 32,
    "cf_target_false_bug": False, "lm_batch_size": 16, "lm_max_tokens": 128, "mcq_system_prompt": False,
    "score_in_train_mode": False,
}
PROBE_DEFAULTS: dict[str, Any] = {"position": "last", "test_fraction": 0.2, "seed": 42, "steps": 200,
                                  "weight_decay": None}
EVALUATION_DEFAULTS: dict[str, Any] = {"formats": "all", "batch_size": 64, "relearn": False, "probes": False}


@dataclass
class Evaluation:
    """A registered evaluation: ``fn(model, tokenizer, task, settings, seed) -> dict`` and its default settings."""

    name: str
    fn: Callable[..., dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None  # raises ValueError on bad resolved settings


REGISTRY: dict[str, Evaluation] = {}


def register_evaluation(name: str, fn: Callable[..., dict[str, Any]], defaults: Mapping[str, Any] | None = None,
                        check: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Make ``evaluations: {name: ...}`` available to specs (see the module docstring). ``check(settings)``, if
    given, validates the resolved settings when a spec is resolved (before any run) and may normalise them."""
    if name in EVALUATION_DEFAULTS:
        raise ValueError(f"{name!r} is a built-in evaluation key; register yours under another name")
    REGISTRY[name] = Evaluation(name, fn, dict(defaults or {}), check)


def _settings(key: str, value: Any, defaults: Mapping[str, Any]) -> dict[str, Any] | None:
    """``false`` -> None, ``true`` -> the defaults, a mapping -> the defaults updated (unknown keys refused)."""
    if value is False or value is None:
        return None
    if value is True:
        return dict(defaults)
    if not isinstance(value, Mapping):
        raise ValueError(f"spec: evaluations.{key} must be true, false or a mapping of settings; got {value!r}")
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ValueError(f"spec: evaluations.{key}: unknown setting {unknown[0]!r}; known: {', '.join(defaults)}")
    out = dict(defaults)
    for k, v in value.items():
        default = defaults[k]
        if isinstance(default, float) and isinstance(v, (int, float, str)) and not isinstance(v, bool):
            try:
                v = float(v)
            except ValueError:
                raise ValueError(f"spec: evaluations.{key}.{k} must be a number; got {v!r}") from None
        elif isinstance(default, bool) and not isinstance(v, bool):
            raise ValueError(f"spec: evaluations.{key}.{k} must be true or false; got {v!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and (not isinstance(v, int) or isinstance(v, bool)):
            raise ValueError(f"spec: evaluations.{key}.{k} must be an integer; got {v!r}")
        out[k] = v
    return out


def resolve_evaluations(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """The fully resolved evaluation settings of a spec's ``evaluations:`` (what the run id hashes)."""
    value = dict(value or {})
    known = [*EVALUATION_DEFAULTS, *REGISTRY]
    unknown = [k for k in value if k not in known]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"spec: evaluations: unknown key {unknown[0]!r}{hint}; known: {', '.join(known)} "
                         "(register new ones with mu_fast.sweep.register_evaluation)")
    formats = value.get("formats", "all")
    if formats != "all" and (not isinstance(formats, list) or not formats or not all(isinstance(f, str) for f in formats)):
        raise ValueError(f"spec: evaluations.formats must be 'all' or a non-empty list of format names; got {formats!r}")
    batch = value.get("batch_size", 64)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch <= 0:
        raise ValueError(f"spec: evaluations.batch_size must be a positive integer; got {batch!r}")
    out: dict[str, Any] = {
        "formats": None if formats == "all" else list(formats),
        "batch_size": batch,
        "relearn": _settings("relearn", value.get("relearn", False), RELEARN_DEFAULTS),
        "probes": _settings("probes", value.get("probes", False), PROBE_DEFAULTS),
    }
    if out["relearn"] is not None and out["relearn"]["steps"] < 0:
        raise ValueError(f"spec: evaluations.relearn.steps must be >= 0; got {out['relearn']['steps']}")
    extra = {k: _settings(k, value[k], REGISTRY[k].defaults) for k in REGISTRY if k in value}
    extra = {k: v for k, v in extra.items() if v is not None}
    for k, settings in extra.items():
        if REGISTRY[k].check is not None:
            REGISTRY[k].check(settings)
    if extra:
        out["extra"] = extra
    return out


from mu_fast.sweep.protocol_evaluations import register_protocol_evaluations  # noqa: E402  (needs REGISTRY above)

register_protocol_evaluations()

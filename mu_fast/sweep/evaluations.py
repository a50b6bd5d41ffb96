"""What a sweep evaluates after each edit: the evaluation registry, each entry's settings and their defaults.

Built in (spec key ``evaluations:``):

* ``formats``: ``all`` or a list of the task's formats (``normal``, ``qa``, ``mcq``, ``paraphrase``, ...), scored by
  ``mu_fast.evaluate.evaluate_task``; ``batch_size`` is its batch.
* ``relearn``: the relearning attack (``mu_fast.evaluate.relearn_attack``), ``false`` / ``true`` (its defaults, the
  paper's) or a mapping of its keyword arguments (``steps``, ``lr``, ``lora_rank``, ...). It is evaluated at steps 0,
  steps // 2 and steps, as ``mu_fast.sweep.one_run`` does.
* ``probes``: latent-knowledge probes (``mu_fast.evaluate.latent_probes``), ``false`` / ``true`` / its arguments.

Registered at import (``mu_fast.sweep.protocol_evaluations``): ``softprompt`` (the soft-prompt attack),
``capability`` (lm-eval; skipped with the reason when its data is not available offline) and ``paper_probes``
(latent probes exactly as the authors).

Every numeric setting is checked when the spec is read (``SETTING_RANGES``: positive integers, fractions in range,
...), so a bad value is a one-line error naming the key and the fix, not a run that stores nonsense.

Later evaluations plug in with ``register_evaluation(name, fn, defaults, check=None)``: ``fn(model, tokenizer, task, settings,
seed) -> dict`` (JSON-ready), run after the built-in ones on the edited model, which it must leave unchanged; its
result is stored under ``record["results"][name]``. A spec turns it on with ``evaluations: {name: true | {...}}``.
Registered evaluations must be registered in every process that runs sweeps (Ray actors, GPU workers): register
them at import time of a module the spec's runs import, or pass ``setup=`` to the executor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mu_fast.sweep.protocol_evaluations import register_protocol_evaluations

# relearn_attack's keyword defaults (the paper's protocol); tests/sweep check that they match its signature.
RELEARN_DEFAULTS: dict[str, Any] = {
    "steps": 20, "lr": 2e-4, "lora_rank": 512, "lora_alpha": 32.0, "lora_dropout": 0.05, "batch_size": 32,
    "cf_target_false_bug": False, "lm_batch_size": 16, "lm_max_tokens": 128, "mcq_system_prompt": False,
    "score_in_train_mode": False,
}
PROBE_DEFAULTS: dict[str, Any] = {"position": "last", "test_fraction": 0.2, "seed": 42, "steps": 200,
                                  "weight_decay": None}
EVALUATION_DEFAULTS: dict[str, Any] = {"formats": "all", "batch_size": 64, "relearn": False, "probes": False}

def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The allowed values of numeric settings, per evaluation (module docstring): (what the error says, test).
Rule = tuple[str, Callable[[Any], bool]]
POSITIVE_INT: Rule = ("a positive integer", lambda v: _integer(v) and v > 0)
NON_NEGATIVE_INT: Rule = ("an integer >= 0", lambda v: _integer(v) and v >= 0)
POSITIVE: Rule = ("a positive number", lambda v: _number(v) and v > 0)
SETTING_RANGES: dict[str, dict[str, Rule]] = {
    "relearn": {"steps": NON_NEGATIVE_INT, "lr": POSITIVE, "lora_rank": POSITIVE_INT, "lora_alpha": POSITIVE,
                "lora_dropout": ("a number in [0, 1)", lambda v: _number(v) and 0 <= v < 1),
                "batch_size": POSITIVE_INT, "lm_batch_size": POSITIVE_INT, "lm_max_tokens": POSITIVE_INT},
    "probes": {"test_fraction": ("a number in (0, 1)", lambda v: _number(v) and 0 < v < 1), "seed": NON_NEGATIVE_INT,
               "steps": POSITIVE_INT, "position": ("last or subject_last", lambda v: v in ("last", "subject_last")),
               "weight_decay": ("a number >= 0 or null", lambda v: v is None or (_number(v) and v >= 0))},
    # with their own checks (mu_fast.sweep.protocol_evaluations) for steps / batch_size / limit
    "softprompt": {"n_attacks": POSITIVE_INT, "lr": POSITIVE, "eps": POSITIVE, "length": POSITIVE_INT,
                   "eval_batch_size": POSITIVE_INT},
    "capability": {"batch_size": POSITIVE_INT, "num_fewshot": NON_NEGATIVE_INT},
    "paper_probes": {"batch_size": POSITIVE_INT},
}


def check_ranges(key: str, settings: dict[str, Any]) -> None:
    """``ValueError`` for the first setting of evaluation ``key`` outside ``SETTING_RANGES`` (the key and the fix).
    A number written as text (YAML reads ``1e-3`` as a string) becomes a float where a number is allowed."""
    defaults = {"relearn": RELEARN_DEFAULTS, "probes": PROBE_DEFAULTS}.get(key)
    if defaults is None:
        defaults = REGISTRY[key].defaults if key in REGISTRY else {}
    for name, (allowed, test) in SETTING_RANGES.get(key, {}).items():
        if isinstance(settings.get(name), str) and "number" in allowed:
            try:
                settings[name] = float(settings[name])
            except ValueError:
                pass
        if name in settings and not test(settings[name]):
            default = f"the default is {defaults[name]}" if defaults.get(name) is not None else "null takes the default"
            raise ValueError(f"spec: evaluations.{key}.{name} must be {allowed}; got {settings[name]!r} ({default})")


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
    extra = {k: _settings(k, value[k], REGISTRY[k].defaults) for k in REGISTRY if k in value}
    extra = {k: v for k, v in extra.items() if v is not None}
    for k, settings in [("relearn", out["relearn"]), ("probes", out["probes"]), *extra.items()]:
        if settings is not None:
            check_ranges(k, settings)
    for k, settings in extra.items():
        if REGISTRY[k].check is not None:
            REGISTRY[k].check(settings)
    if extra:
        out["extra"] = extra
    return out


register_protocol_evaluations(register_evaluation)

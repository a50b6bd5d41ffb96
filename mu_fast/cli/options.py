"""Command-line flags generated from the settings they set: one flag per ``EditConfig`` field (``--lr``,
``--forget-coef``, ``--maintain-batch``, ... named as the field), one per relearning-attack keyword
(``--relearn-steps``, ``--relearn-lora-rank``, ... from ``mu_fast.sweep.evaluations.RELEARN_DEFAULTS``) and one per
latent-probe keyword (``--probe-steps``, ...).

``with_flags(target, flags)`` adds the flags to a command's signature (typer reads it) and hands the command the
values that were given, as ``{field: value}`` in its ``target`` parameter; a flag left out is absent, so a preset or
the dataclass default applies. Each given value is checked (``check_edit_values`` / ``check_flag_values``) before
anything loads.

Without ``--preset``, ``edit`` and ``run`` take ``default_preset(MODEL)``: ``organism`` on the organism (and on a model
``edit --save-model`` saved from it), ``default`` on any other. ``settings_line`` is the one line ``edit`` prints
before it trains. An edit "did nothing" when the forget accuracy (mean probability of the true answer, training
format, forget set) moved by less than ``NO_EFFECT_ACC`` = 0.02 from before the edit; ``edit`` and ``run`` then end
with ``no_effect_warning`` (the lr, the preset and the fix).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

import typer

from mu_fast.preflight import check_choice, check_positive

# What each EditConfig field does, for --help (the flag is named as the field).
EDIT_HELP = {
    "steps": "optimizer steps of the edit",
    "lr": "learning rate (AdamW, cosine decay to 0)",
    "forget_coef": "weight of the forget (edit / unlearn) loss",
    "maintain_coef": "weight of the maintain-facts loss",
    "lm_coef": "weight of the LM retain loss on generic text (default: 1 when the task has LM texts, else 0)",
    "maintain_batch": "maintain facts per step",
    "lm_batch": "LM texts per step",
    "lm_max_tokens": "tokens per LM text",
    "grad_clip": "gradient-norm clip",
    "unlearn_threshold": "log-probability floor of the unlearning loss (inject-label None)",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas, as b1,b2",
    "eps": "AdamW epsilon",
    "eval_every": "evaluate every N steps inside the edit (0: never; the library's eval_fn)",
    "optimizer": "auto, masked (MaskedAdamW), torch or bnb8bit (bitsandbytes AdamW8bit)",
    "seed": "seed of the edit's data order",
    "state_bits": "MaskedAdamW moment precision: 32 or 8",
    "master_weights": "fp32 master copy of the masked elements of bf16 parameters",
    "compact_grads": "gather compact gradients (default: on when a parameter is only partly selected)",
    "micro_batch": "prompts per forward+backward (default: the whole batch)",
    "lm_micro_batch": "LM texts per forward+backward (default: all)",
    "grad_checkpointing": "recompute activations in backward (transformers')",
    "lm_chunk_tokens": "positions per LM-head chunk (default: as many as fit 256 MiB of fp32 logits)",
}
POSITIVE_INTS = ("steps", "maintain_batch", "lm_batch", "lm_max_tokens", "micro_batch", "lm_micro_batch",
                 "lm_chunk_tokens", "batch_size", "lora_rank", "lm_batch_size")
POSITIVE_FLOATS = ("lr", "grad_clip", "eps", "lora_alpha")
NON_NEGATIVE = ("forget_coef", "maintain_coef", "lm_coef", "weight_decay", "eval_every")
# Fractions: (low, high, whether low itself is allowed); high is always excluded.
FRACTIONS = {"test_fraction": (0.0, 1.0, False), "lora_dropout": (0.0, 1.0, True)}


@dataclass(frozen=True)
class Flag:
    """One generated option: ``param`` (the Python name typer sees), ``field`` (the setting it sets), ``flag``
    (``--name``), ``kind`` (int, float, str, bool, or "pair" for two floats) and its help."""

    param: str
    field: str
    flag: str
    kind: Any
    help: str


def _kind(annotation: Any) -> Any:
    text = str(annotation).replace("typing.", "")
    if "tuple" in text:
        return "pair"
    for kind in (bool, int, float, str):  # bool before int: bool is an int
        if kind.__name__ in text:
            return kind
    raise TypeError(f"no command-line type for {annotation!r}")


def edit_flags(exclude: Sequence[str] = ()) -> list[Flag]:
    """A flag per ``EditConfig`` field (module docstring), in field order."""
    from mu_fast.edit.loop import EditConfig

    return [Flag(f.name, f.name, "--" + f.name.replace("_", "-"), _kind(f.type), _with_default(f))
            for f in dataclasses.fields(EditConfig) if f.name not in exclude]


def _with_default(field: dataclasses.Field) -> str:
    """The help of an EditConfig flag with its default: the preset's value when the preset sets the field, else
    EditConfig's (fields whose help already says their default, e.g. an automatic choice, keep it)."""
    text = EDIT_HELP.get(field.name, field.name)
    if "default" in text or field.default is dataclasses.MISSING:
        return text
    value = field.default
    shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    if isinstance(value, tuple):
        shown = ",".join(f"{v:g}" for v in value)
    elif isinstance(value, float):
        shown = f"{value:g}"
    return f"{text} [default: the preset's, else {shown}]"


def keyword_flags(prefix: str, defaults: Mapping[str, Any], what: str) -> list[Flag]:
    """A flag ``--<prefix>-<key>`` per keyword of ``defaults`` (its type from the default's)."""
    out = []
    for key, default in defaults.items():
        kind = type(default) if default is not None else float
        out.append(Flag(f"{prefix}_{key}", key, f"--{prefix}-{key.replace('_', '-')}", kind,
                        f"{what} {key} (default {default})"))
    return out


def relearn_flags() -> list[Flag]:
    from mu_fast.sweep.evaluations import RELEARN_DEFAULTS

    return keyword_flags("relearn", RELEARN_DEFAULTS, "relearning attack:")


def probe_flags() -> list[Flag]:
    from mu_fast.sweep.evaluations import PROBE_DEFAULTS

    return keyword_flags("probe", PROBE_DEFAULTS, "latent probes:")


def _option(flag: Flag) -> tuple[Any, Any]:
    """(annotation, typer.Option) of a flag; every flag defaults to None (= not given)."""
    if flag.kind is bool:
        no = "--no-" + flag.flag[2:]
        return Optional[bool], typer.Option(None, f"{flag.flag}/{no}", help=flag.help, show_default=False)
    kind = str if flag.kind == "pair" else flag.kind
    return Optional[kind], typer.Option(None, flag.flag, help=flag.help, show_default=False)


def with_flags(target: str, flags: Sequence[Flag]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: add ``flags`` to the command's signature; the command receives ``{field: value}`` of the given
    ones in its parameter ``target`` (which typer does not see)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(func)
        if target not in signature.parameters:
            raise TypeError(f"{func.__name__} has no parameter {target!r} for its generated flags")
        hints = typing.get_type_hints(func)
        params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
                  if p.name != target]
        taken = {p.name for p in params}
        annotations = {p.name: p.annotation for p in params}
        for flag in flags:
            if flag.param in taken:
                raise TypeError(f"{func.__name__}: generated flag {flag.flag} clashes with a parameter of the command")
            annotation, option = _option(flag)
            params.append(inspect.Parameter(flag.param, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=annotation))
            annotations[flag.param] = annotation
        by_param = {flag.param: flag for flag in flags}

        @functools.wraps(func)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in list(kwargs) if name in by_param}
            given = {by_param[name].field: value for name, value in values.items() if value is not None}
            return func(**kwargs, **{target: given})

        command.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        command.__annotations__ = {**annotations, "return": signature.return_annotation}
        del command.__wrapped__  # typer must read the new signature, not the wrapped function's
        return command

    return decorate


def flag_name(field: str, prefix: str = "") -> str:
    return "--" + (f"{prefix}-" if prefix else "") + field.replace("_", "-")


def check_flag_values(values: Mapping[str, Any], prefix: str = "") -> None:
    """Range checks of given settings, each error naming its flag (before anything loads)."""
    for field, value in values.items():
        name = flag_name(field, prefix)
        if field in POSITIVE_INTS:
            check_positive(name, value, integer=True)
        elif field in POSITIVE_FLOATS:
            check_positive(name, value)
        elif field in NON_NEGATIVE and isinstance(value, (int, float)) and not value >= 0:
            raise ValueError(f"{name} must be >= 0; got {value}")
        elif field in FRACTIONS and isinstance(value, (int, float)):
            low, high, low_ok = FRACTIONS[field]
            if not (low <= value < high if low_ok else low < value < high):
                bracket = "[" if low_ok else "("
                raise ValueError(f"{name} must be in {bracket}{low:g}, {high:g}); got {value:g}")


def check_edit_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """The given EditConfig settings, checked and parsed (``--betas 0.9,0.999`` -> a pair); errors name the flag."""
    from mu_fast.edit.loop import OPTIMIZERS

    out = dict(values)
    if "optimizer" in out:
        check_choice("--optimizer", out["optimizer"], OPTIMIZERS)
    if "state_bits" in out:
        check_choice("--state-bits", str(out["state_bits"]), ("32", "8"))
    if "betas" in out:
        parts = str(out["betas"]).split(",")
        try:
            betas = tuple(float(p) for p in parts)
        except ValueError:
            betas = ()
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"--betas {out['betas']!r}: give two numbers in [0, 1) separated by a comma, e.g. 0.9,0.999")
        out["betas"] = betas
    check_flag_values(out)
    if out.get("optimizer") in ("torch", "bnb8bit") and out.get("state_bits", 32) != 32:
        raise ValueError(f"--state-bits is a MaskedAdamW setting; drop it or use --optimizer masked (not {out['optimizer']})")
    if out.get("optimizer") in ("torch", "bnb8bit") and out.get("master_weights"):
        raise ValueError(f"--master-weights is a MaskedAdamW setting; drop it or use --optimizer masked (not {out['optimizer']})")
    return out


def edit_config(base: Mapping[str, Any], given: Mapping[str, Any]) -> Any:
    """``EditConfig(**base, **given)``; its own errors name the flags (``steps must ...`` -> ``--steps must ...``)."""
    import re

    from mu_fast.edit.loop import EditConfig

    try:
        return EditConfig(**{**dict(base), **dict(given)})
    except ValueError as err:
        names = [f.name for f in dataclasses.fields(EditConfig)]
        text = re.sub(r"\b(" + "|".join(names) + r")\b(?=\s|=|$)", lambda m: flag_name(m[1]), str(err))
        raise ValueError(text) from None


def preset_fields(name: str, method: str | None) -> tuple[str, dict[str, Any]]:
    """``(method group, EditConfig fields)`` of the preset ``name`` (``mu_fast.sweep.presets``) for a mask made by
    ``method``; a preset that differs between groups needs the method."""
    import json

    from mu_fast.sweep.presets import METHOD_GROUP
    from mu_fast.sweep.presets import preset_groups

    try:
        groups = preset_groups(name)
    except ValueError as err:
        raise ValueError(str(err).replace("spec: edit.preset: ", "--preset: ").replace("a name defined under presets:",
                                                                                        "a sweep spec's own")) from None
    group = METHOD_GROUP.get(method) if method else None
    if group is None:
        if len({json.dumps(g, sort_keys=True, default=str) for g in groups.values()}) > 1:
            raise ValueError(f"--preset {name} differs per method group, but the mask records no localization method "
                             f"it knows ({method!r}); use a mask saved by `mu-fast localize`, or --preset default "
                             "with explicit flags")
        group = "lookup"
    return group, dict(groups[group])


def default_preset(model: str) -> str:
    """The edit preset of ``edit`` and ``run`` when ``--preset`` is not given: ``organism`` for the organism (MODEL
    ``organism``, ``organism:ci``, or a folder ``mu-fast edit --save-model`` saved from it), ``default`` (the paper's
    loop) for any other model. The paper's lr 1e-5 is tuned for 7-9B models: on the organism its 50 steps moved the
    forget loss by under 1% (6.35 -> 6.34) and left forget accuracy at 0.99."""
    from pathlib import Path

    from mu_fast.preflight import saved_organism_preset

    if model == "organism" or model.startswith("organism:"):
        return "organism"
    path = Path(model).expanduser()
    try:
        return "organism" if path.is_dir() and saved_organism_preset(path) else "default"
    except ValueError:  # a damaged record: resolve_model reports it
        return "default"


def settings_line(config: Any, preset: str, group: str | None = None, frozen: str | None = None) -> str:
    """The edit settings as one line: the preset (and method group), lr, steps, loss coefficients, batches,
    optimizer, frozen precision, then every other field that differs from ``EditConfig``'s default."""
    from mu_fast.edit.loop import EditConfig

    main = ("lr", "steps", "forget_coef", "maintain_coef", "lm_coef", "maintain_batch", "lm_batch", "optimizer")
    default = EditConfig()
    others = [f"{f.name.replace('_', '-')} {getattr(config, f.name)}" for f in dataclasses.fields(EditConfig)
              if f.name not in main and getattr(config, f.name) != getattr(default, f.name)]
    parts = [f"preset {preset}" + (f" ({group} group)" if group else ""), f"lr {config.lr:g}", f"{config.steps} steps",
             f"coefficients forget {config.forget_coef:g} / maintain {config.maintain_coef:g} / lm {config.lm_coef:g}",
             f"batches maintain {config.maintain_batch} / lm {config.lm_batch}", f"optimizer {config.optimizer}",
             *([f"frozen {frozen}"] if frozen else []), *others]
    return "edit settings: " + ", ".join(parts)


# An edit "did nothing" when the forget accuracy (mean probability of the true answer, training format, forget set)
# moved by less than this from before the edit: a working edit moves it by tenths, the paper's lr on the organism
# by thousandths.
NO_EFFECT_ACC = 0.02


def unmoved(before: float, after: float) -> bool:
    """Whether an edit left forget accuracy ``after`` within ``NO_EFFECT_ACC`` of ``before``."""
    return abs(after - before) < NO_EFFECT_ACC


def no_effect_warning(what: str, lrs: Sequence[float], preset: str, model: str, detail: str = "") -> str:
    """One line: ``what`` (the edits that left forget accuracy where it was; ``detail`` e.g. ``0.990 -> 0.989``), the
    lr(s) and preset that did it, and the fix (``--preset organism`` on the organism, and a larger ``--lr``)."""
    lr_text = (f"{detail}; " if detail else "") + "lr " + ", ".join(f"{lr:g}" for lr in sorted(set(lrs)))
    fixes = []
    if preset != "organism" and default_preset(model) == "organism":
        fixes.append("--preset organism (tuned on the organism)")
    fixes.append(f"a larger --lr (e.g. --lr {10 * max(lrs):g})")
    return (f"{what} left forget accuracy within {NO_EFFECT_ACC} of before the edit ({lr_text}, preset {preset}): "
            f"the facts were not edited; use {' or '.join(fixes)}")


def run_settings(preset: str, methods: list[str], settings: Mapping[str, Any], relearn: bool, probes: bool,
                 relearn_settings: Mapping[str, Any], probe_settings: Mapping[str, Any],
                 edit_preset: str | None = None) -> tuple[dict[str, Any], Any]:
    """``({method: EditConfig}, RunOptions)`` of ``--preset`` with the given flags over it; every value is checked
    (errors name the flag) before anything loads. edit_preset: take the edit settings from this preset instead
    (the evaluation options still from ``preset``)."""
    from mu_fast.sweep.one_run import RUN_PRESETS
    from mu_fast.sweep.presets import METHOD_GROUP
    from mu_fast.sweep.presets import preset_groups

    settings = check_edit_values(settings)
    for given, wanted, what in ((relearn_settings, relearn, "relearn"), (probe_settings, probes, "probe")):
        if given and not wanted:
            raise ValueError(f"--{what}-{next(iter(given)).replace('_', '-')} sets the {what} evaluation; drop it or "
                             f"drop --no-{'probes' if what == 'probe' else 'relearn'}")
    check_flag_values(relearn_settings, "relearn")
    check_flag_values(probe_settings, "probe")
    try:
        groups = preset_groups(edit_preset or preset)
    except ValueError as err:
        raise ValueError(str(err).replace("spec: edit.preset: ", "--preset: ").replace(
            ", or a name defined under presets:", "")) from None
    configs = {m: edit_config(groups[METHOD_GROUP.get(m, "lookup")], settings) for m in methods}
    options = replace(RUN_PRESETS.get(preset, RUN_PRESETS["default"]), relearn=relearn, probes=probes)
    relearn_settings = dict(relearn_settings)
    for key, field in (("steps", "relearn_steps"), ("lr", "relearn_lr"), ("lora_rank", "relearn_rank")):
        if key in relearn_settings:
            options = replace(options, **{field: relearn_settings.pop(key)})
    return configs, replace(options, relearn_settings=relearn_settings, probe_settings=dict(probe_settings))

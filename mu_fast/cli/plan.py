"""``mu-fast plan``: the memory plan of an edit, from a model's config alone (no weights are loaded).

MODEL is a shipped config name (``gemma-2-9b``, ``llama-3-8b`` ...; also as ``random:<name>``), a local checkpoint
folder (its config.json), a hub id (its config) or the organism. The edit is one of:
``--mask`` a saved mask (refused if it records another model, as ``mu-fast edit`` refuses it) or
``paper:<flu|ap|ct|ap_mlps|ct_mlps|random>``, the paper's Sports localization of gemma-7b / gemma-2-9b / llama-3-8b
(``random``: random whole matrices at the paper's budget); or ``--components`` a list in the site table's notation
(``m2,m3,m4`` MLPs, ``a3.5`` a head, ``m2.17`` a neuron, ``a3.q`` one matrix), for any model.
Registered on ``mu_fast.cli.app``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from mu_fast.cli.common import console
from mu_fast.preflight import check_choice, check_mask_input, resolve_model

PAPER_MASKS = ("flu", "ap", "ct", "ap_mlps", "ct_mlps", "random")
BATCH_KEYS = {"forget": "n_forget", "maintain": "n_maintain", "lm": "n_lm", "lm_tokens": "lm_tokens",
              "fact_tokens": "fact_tokens"}


def parse_batch(text: str | None) -> Any:
    """``"forget=64,maintain=64,lm=64,lm_tokens=100"`` -> ``BatchShape`` (unnamed fields keep the paper's values)."""
    from mu_fast.memory import BatchShape

    if not text:
        return BatchShape()
    fields: dict[str, int] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in BATCH_KEYS or not value.isdigit():
            raise ValueError(f"--batch {text!r}: write key=count pairs with keys {', '.join(BATCH_KEYS)}, e.g. "
                             "forget=64,maintain=64,lm=64,lm_tokens=100")
        fields[BATCH_KEYS[key]] = int(value)
    return BatchShape(**fields)


def model_config(model: str) -> tuple[Any, str]:
    """(transformers config, what it is) of MODEL, reading at most its config.json. A bare name that is neither a
    shipped config nor a local folder is refused with the shipped names (a hub id has an owner: org/name)."""
    from mu_fast.models.shipped import SHIPPED, shipped_config, shipped_name

    random = model.startswith("random:")
    bare = model.split(":", 1)[1] if random else model
    try:
        name = shipped_name(bare)
    except ValueError:
        name = None
    if name in SHIPPED and (random or not Path(model).exists()):
        return shipped_config(name), f"{name} (shipped config)"
    if random or ("/" not in model and not model.startswith("organism") and not Path(model).expanduser().exists()):
        raise ValueError(f"MODEL {model!r} is not a shipped config ({', '.join(SHIPPED)}), a checkpoint folder, a hub "
                         "id (org/name) or organism; pick one of the shipped configs or pass the model's folder")
    ref = resolve_model(model)
    from mu_fast.models.edit_loading import resolve_source

    source = resolve_source(f"organism:{ref.value}" if ref.kind == "organism" else ref.value)
    return source.config, source.ref


def plan_mask(spec: str | None, config: Any, model: str, components: str | None = None) -> Any:
    """The Mask of ``--mask`` (a saved mask, or the paper's Sports localization of ``model``) or ``--components``."""
    from mu_fast.masks import Mask
    from mu_fast.models.sites import SiteTable

    if components is not None:
        return Mask.from_components(SiteTable(config), parse_components(components, config),
                                    meta={"method": f"components:{components}", "arch": config.model_type})
    assert spec is not None
    if not spec.startswith("paper:"):
        mask = Mask.load(check_mask_input(Path(spec)))
        mask.check_model(config, model)  # as `mu-fast edit` refuses a mask made for another model
        return mask
    method = check_choice("--mask paper:<method>", spec.split(":", 1)[1], PAPER_MASKS)
    from mu_fast.data.datadir import PAPER_MODELS
    from mu_fast.localize.paper_graphs import paper_localization

    paper = _paper_model_of(model, config)
    if paper is None:
        raise ValueError(f"--mask {spec}: the paper localized only {', '.join(PAPER_MODELS)}; for MODEL {model!r} "
                         "give --components (e.g. m2,m3,m4) or pass a mask saved by `mu-fast localize`")
    table = SiteTable(config)
    if method == "random":
        from mu_fast.localize.baselines import random_matrices
        from mu_fast.masks import paper_budget

        flu = paper_localization(paper, "sports", "flu")
        components_ = random_matrices(table, paper_budget(table, len(flu)), seed=0)
    else:
        components_ = paper_localization(paper, "sports", method)
    return Mask.from_components(table, components_, meta={"method": spec, "arch": config.model_type})


def parse_components(text: str, config: Any) -> list[Any]:
    """``"m2,m3,a3.5"`` -> Components, each checked against the model of ``config`` (one-line errors)."""
    from mu_fast.models.sites import Component, SiteTable

    table = SiteTable(config)
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise ValueError("--components is empty; list components such as m2,m3,m4 (MLP layers) or a3.5 (a head)")
    out = []
    for part in parts:
        try:
            comp = Component.parse(part)
            table.selections(comp)
        except ValueError as err:
            raise ValueError(f"--components {part!r}: {err} (write m2 for MLP layer 2, a3.5 for head 5 of layer 3, "
                             "m2.17 for a neuron, a3.q for one matrix)") from None
        out.append(comp)
    return out


def _paper_model_of(model: str, config: Any) -> str | None:
    """The paper model MODEL is: by name, else by a config with the same shape as that model's shipped one."""
    from mu_fast.data.datadir import PAPER_MODELS, paper_model
    from mu_fast.models.shipped import shipped_config

    try:
        return paper_model(model).key
    except ValueError:
        pass
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    for name in PAPER_MODELS:
        shipped = shipped_config(name)
        if all(getattr(config, k, None) == getattr(shipped, k, None) for k in keys):
            return name
    return None


def plan_cmd(
    model: str = typer.Argument(..., help="a shipped config (gemma-2-9b, gemma-7b, llama-3-8b, mistral-7b, qwen2-7b), a checkpoint folder, a hub id or organism"),
    mask: str | None = typer.Option(None, help="a saved mask, or paper:flu|ap|ct|ap_mlps|ct_mlps|random (the paper's Sports localization); or give --components"),
    components: str | None = typer.Option(None, help="the edit as components instead of --mask, e.g. m2,m3,m4 (MLP layers), a3.5 (a head), m2.17 (a neuron)"),
    budget: str = typer.Option(..., help="memory torch may reserve on the GPU, with a unit: 24GB (10^9 bytes) or 22GiB"),
    frozen: str = typer.Option("auto", help="frozen-weight precision: bf16, int8, nf4 or auto (bf16 if it fits, else int8, else nf4)"),
    batch: str | None = typer.Option(None, help="per-step batch, e.g. forget=64,maintain=64,lm=64,lm_tokens=100 (the paper's)"),
    optimizer: str = typer.Option("auto", help="auto, masked, torch or bnb8bit: the optimizer whose state is planned"),
    configs: int | None = typer.Option(None, help="plan a batched edit of up to this many configurations of this mask instead (mu_fast.memory.plan_batch): how many fit and how many per forward/backward"),
) -> None:
    """Plan the GPU memory of an edit (no weights are loaded): the peak per term and the settings that fit."""
    from mu_fast.edit.loop import OPTIMIZERS
    from mu_fast.memory import parse_budget, plan, plan_report

    if (mask is None) == (components is None):
        raise ValueError("give the edit as --mask (a saved mask or paper:<method>) or as --components (e.g. m2,m3,m4)"
                         + (", not both" if mask is not None else ""))
    check_choice("--frozen", frozen, ("auto", "bf16", "int8", "nf4"))
    check_choice("--optimizer", optimizer, OPTIMIZERS)
    device_bytes = parse_budget(budget, option="--budget")
    shape = parse_batch(batch)
    if configs is not None and configs < 1:
        raise ValueError(f"--configs {configs}: give a positive number of configurations")
    if mask is not None and not mask.startswith("paper:"):
        check_mask_input(Path(mask))
    config, what = model_config(model)
    from mu_fast.edit import EditConfig

    edit_mask = plan_mask(mask, config, model, components)
    screen = console()
    if configs is not None:
        from mu_fast.memory import plan_batch

        planned = plan_batch(config, [edit_mask] * configs, EditConfig(), device_bytes=device_bytes, batch=shape,
                             k_max=configs)
        screen.print(planned.format(), highlight=False, soft_wrap=True)
        return
    result = _plan(plan, config, edit_mask, EditConfig(optimizer=optimizer), frozen, device_bytes, shape)
    screen.print(f"{what}, {f'mask {mask}' if mask is not None else f'components {components}'}", highlight=False)
    screen.print(plan_report(result))
    screen.print(f"estimated peak {result.total / 1e9:.2f} GB of {device_bytes / 1e9:.2f} GB: pass these settings to "
                  f"`mu-fast edit` (or --budget {budget} there)", highlight=False)


def _plan(plan: Any, config: Any, mask: Any, edit_config: Any, frozen: str, device_bytes: int, batch: Any) -> Any:
    """The planner's plan; its "nothing fits" error names the command-line options."""
    try:
        return plan(config, mask, edit_config, frozen=None if frozen == "auto" else frozen, device_bytes=device_bytes,
                    batch=batch)
    except ValueError as err:
        raise ValueError(str(err).replace("use frozen=nf4", "use --frozen nf4")) from None


def planned_edit(ref: Any, mask: Any, edit_config: Any, frozen: str, budget: str) -> tuple[Any, str]:
    """``mu-fast edit --budget``: (the EditConfig with the plan's memory settings, the frozen precision to load)."""
    from mu_fast.memory import BatchShape, parse_budget, plan
    from mu_fast.models.edit_loading import resolve_source

    device_bytes = parse_budget(budget, option="--budget")
    config = resolve_source(f"organism:{ref.value}" if ref.kind == "organism" else ref.value).config
    batch = BatchShape(n_maintain=edit_config.maintain_batch, n_lm=edit_config.lm_batch if edit_config.lm_coef else 0,
                       lm_tokens=edit_config.lm_max_tokens)
    result = _plan(plan, config, mask, edit_config, frozen, device_bytes, batch)
    console().print(f"memory plan: peak {result.total / 1e9:.2f} GB of {device_bytes / 1e9:.2f} GB with "
                     f"{result.describe_settings()}", highlight=False)
    return result.edit_config(), result.frozen

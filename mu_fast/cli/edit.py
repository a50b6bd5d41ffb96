"""``mu-fast edit``: edits of models that fit one GPU only with frozen weights quantized or offloaded, saved as
deltas (``mu-fast evaluate --delta``, ``mu_fast.cli.evaluate``, applies one to the full-precision model).

An edit loads through ``mu_fast.models.load_for_edit`` (frozen modules in bf16 / int8 / nf4, masked modules full
precision, accelerate's ``max_memory`` and disk offload) and saves a delta (``mu_fast.edit.delta``): the trained
masked elements, the mask and the provenance, with the edit history in its ``delta.json``. ``--save-model`` saves
the whole model instead (bf16 frozen weights only: quantized weights are not the model the edit is for). Every
``EditConfig`` field has a flag of its name (``mu_fast.cli.options``), over a named ``--preset`` (without it:
``organism`` for the organism and models saved from it, else ``default``); the settings used are printed first, and
an edit that left forget accuracy within ``NO_EFFECT_ACC`` of before ends with a warning naming lr, preset and fix.
``--budget`` lets the memory plan (``mu_fast.cli.plan.planned_edit``) choose the memory settings. Every JSON written
carries the provenance block (``mu_fast.provenance``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import typer

from mu_fast.cli.common import (
    ALLOW_UNKNOWN,
    CF_MODEL_HELP,
    DATASET_HELP,
    DATASETS,
    DTYPE_NAMES,
    FORGET_SPLIT_HELP,
    INJECT_LABEL_HELP,
    console,
    dataset_task,
    identity_of,
    organism_task_of,
    require_known_facts,
)
from mu_fast.cli.options import (
    check_edit_values,
    default_preset,
    edit_config,
    edit_flags,
    flag_name,
    no_effect_warning,
    preset_fields,
    settings_line,
    unmoved,
    with_flags,
)
from mu_fast.preflight import (
    check_choice,
    check_mask_input,
    check_output,
    check_task_options,
    check_writable,
    resolve_model,
    writing_output,
)

FROZEN_CHOICES = ("bf16", "int8", "nf4")
# The settings `--budget` lets the memory plan choose.
PLANNED_SETTINGS = ("micro_batch", "lm_micro_batch", "grad_checkpointing", "state_bits", "master_weights",
                    "compact_grads", "lm_chunk_tokens")


def parse_max_memory(text: str | None) -> dict[Any, str] | None:
    """``"0=22GiB,cpu=64GiB"`` -> ``{0: "22GiB", "cpu": "64GiB"}`` (accelerate's max_memory)."""
    if not text:
        return None
    out: dict[Any, str] = {}
    for part in text.split(","):
        device, sep, amount = part.partition("=")
        device, amount = device.strip(), amount.strip()
        if not sep or not device or not amount:
            raise ValueError(f"--max-memory {text!r}: write device=amount pairs separated by commas, e.g. "
                             "0=22GiB,cpu=64GiB")
        if not (device.isdigit() or device in ("cpu", "disk") or device.startswith("cuda:")):
            raise ValueError(f"--max-memory device {device!r} is not a GPU index, cuda:N, cpu or disk")
        try:
            from mu_fast.memory.shapes import parse_budget  # the planner's size parser, when it is installed

            parse_budget(amount)
        except ImportError:
            if not amount[:1].isdigit():
                raise ValueError(f"--max-memory amount {amount!r} is not a size such as 22GiB") from None
        except ValueError:
            raise ValueError(f"--max-memory {device}={amount}: give the amount with a unit, e.g. {device}=22GiB "
                             "(GiB = 2^30 bytes, GB = 10^9)") from None
        out[int(device) if device.isdigit() else device] = amount
    return out


@with_flags("settings", edit_flags())
def edit_cmd(
    model: str = typer.Argument(..., help="organism, organism:ci, a local HF checkpoint folder or a hub id"),
    mask: Path = typer.Option(..., help="a mask saved by `mu-fast localize`"),
    dataset: str = typer.Option("organism", help=DATASET_HELP),
    forget_split: str = typer.Option("first_16_unsplit", help=FORGET_SPLIT_HELP),
    inject_label: str = typer.Option("random_without_golf", help=INJECT_LABEL_HELP),
    cf_model: str | None = typer.Option(None, help=CF_MODEL_HELP),
    lm_texts: str | None = typer.Option(None, help="text/jsonl file (or 'pile' online) for the LM retain loss"),
    preset: str | None = typer.Option(None, help="edit settings the flags below override: default (the paper's loop: 50 steps, lr 1e-5), organism (tuned on the organism), paper_sports:<model>:<forget_16|forget_64|sport_golf>, paper_cf:<model>:<experiment>; per method group of the mask's method. Default: organism for the organism and models saved from it, else default"),
    frozen: str = typer.Option("auto", help="storage of the weights the mask does not train: bf16, int8, nf4, or auto (bf16; with --budget the plan's choice)"),
    budget: str | None = typer.Option(None, help="GPU memory for the edit, e.g. 24GB: the memory plan (mu-fast plan) chooses --frozen (if auto) and the memory settings"),
    max_memory: str | None = typer.Option(None, help="per-device budget for loading, e.g. 0=22GiB,cpu=64GiB"),
    offload_dir: Path | None = typer.Option(None, help="folder for frozen layers that fit neither GPU nor CPU"),
    out: Path = typer.Option(..., help="folder for the edit: a delta (default) or, with --save-model, the whole model"),
    save_model: bool = typer.Option(False, help="save the whole edited model (save_pretrained; --frozen bf16 only)"),
    overwrite: bool = typer.Option(False, help="replace an existing --out folder (kept until the new one is saved)"),
    dtype: str = typer.Option("bf16", help="precision of the trained (masked) weights: bf16, fp16 or fp32"),
    allow_unknown_facts: bool = typer.Option(False, ALLOW_UNKNOWN, help="run even if the model does not know the facts (unknown tokens, accuracy at chance)"),
    settings: dict[str, Any] | None = None,
) -> None:
    """Edit (or unlearn) the forget facts, training only the masked parameters; save a delta (or the model).
    Every EditConfig field has a flag of its name (--lr, --forget-coef, --maintain-batch, ...). Prints the settings
    it uses, and warns when the edit left forget accuracy where it was (mu_fast.cli.options.NO_EFFECT_ACC)."""
    from dataclasses import replace

    settings = check_edit_values(settings or {})
    check_choice("--frozen", frozen, ("auto", *FROZEN_CHOICES))
    if budget is not None:
        chosen = [flag_name(n) for n in PLANNED_SETTINGS if settings.get(n) not in (None, False)
                  and not (n == "state_bits" and settings[n] == 32)]
        if chosen:
            raise ValueError(f"--budget chooses the memory settings itself; drop {', '.join(chosen)} or --budget")
    check_choice("--dtype", dtype, DTYPE_NAMES)
    if save_model and frozen not in ("auto", "bf16"):
        raise ValueError(f"--save-model needs --frozen bf16: with {frozen} frozen weights the saved model would be "
                         "quantized; drop --save-model to save a delta and apply it to the bf16 model")
    check_output("--out", [out], overwrite)
    if out.exists() and not save_model and not (out / "delta.json").is_file():
        raise FileExistsError(f"--out {str(out)!r} exists and is not a mu_fast delta; choose another --out")
    check_writable("--out", out, folder=True)
    memory = parse_max_memory(max_memory)
    mask_path = check_mask_input(mask)
    ref = resolve_model(model)
    check_task_options(dataset, ref, forget_split, inject_label, cf_model, DATASETS)
    has_lm = bool(lm_texts) or dataset == "organism"  # the organism's task carries its filler texts
    if settings.get("lm_coef") and not has_lm:
        raise ValueError(f"--lm-coef {settings['lm_coef']} needs LM texts for --dataset {dataset}: pass --lm-texts "
                         "FILE (or 'pile' online), or --lm-coef 0")

    from mu_fast.edit import edit
    from mu_fast.edit.loop import snapshot
    from mu_fast.masks import Mask
    from mu_fast.models.edit_loading import check_offload_dir
    from mu_fast.sweep.presets import METHOD_GROUP
    from mu_fast.provenance import provenance_block

    try:
        check_offload_dir(offload_dir)
    except (PermissionError, ValueError) as err:
        raise type(err)(str(err).replace("offload_dir ", "--offload-dir ", 1)) from None
    edit_mask = Mask.load(mask_path)
    method = edit_mask.meta.get("method")
    if preset is None:  # a mask of no known method takes the lookup group's settings, as a hand-made one
        preset, method = default_preset(model), method if method in METHOD_GROUP else "manual"
    group, base = preset_fields(preset, method)
    if "lm_coef" not in settings and not has_lm:
        settings["lm_coef"] = 0.0
    config = edit_config(base, settings)
    if budget is not None:
        from mu_fast.cli.plan import planned_edit

        config, frozen = planned_edit(ref, edit_mask, config, frozen, budget)
        if save_model and frozen != "bf16":
            raise ValueError(f"--save-model needs bf16 frozen weights but --budget {budget} needs {frozen}; drop "
                             "--save-model to save a delta, or raise --budget")
    frozen = "bf16" if frozen == "auto" else frozen
    texts = None
    if lm_texts and dataset == "organism":
        from mu_fast.data import load_lm_texts

        texts = load_lm_texts(lm_texts, n=2048, seed=0)
    task = dataset_task(dataset, forget_split, inject_label, cf_model, lm_texts) if dataset != "organism" else None
    m, tok, info = _load_for_edit(ref, edit_mask, frozen, memory, offload_dir, dtype)
    if task is None:
        task = organism_task_of(info, forget_split, inject_label, tok, ref)
        if texts is not None:
            task.lm_texts = texts
    require_known_facts(m, tok, task, allow_unknown_facts)
    if not task.lm_texts:
        config = replace(config, lm_coef=0.0)
    base_values = snapshot(m, names=list(edit_mask))
    acc_before = forget_accuracy(m, tok, task)
    console().print(settings_line(config, preset, group, frozen), highlight=False, soft_wrap=True)
    result = edit(m, tok, task, edit_mask, config)
    acc_after = forget_accuracy(m, tok, task)
    identity = identity_of(ref, info, m, dtype)
    device = m.get_input_embeddings().weight.device
    record = {"edit_history": result.history, "edit_seconds": result.seconds, "optimizer": result.optimizer,
              "task": task.name, "dataset": dataset, "forget_split": forget_split, "inject_label": inject_label,
              "preset": preset, "method_group": group, "forget_acc": {"before": acc_before, "after": acc_after},
              **provenance_block(model=identity, device=device)}
    lost = "the edit is lost (an existing --out is unchanged); free space or fix the path and run the edit again"
    if save_model:
        with writing_output("--out", out, lost):
            _save_model_atomically(m, tok, out, {"edit": result.config, "history": result.history,
                                                 "load": _jsonable(info), "preset": preset, "method_group": group,
                                                 "provenance": provenance_block(model=identity, device=device)})
        what = "model"
    else:
        from mu_fast.edit.delta import extract_delta
        from mu_fast.files import as_new_file

        delta = extract_delta(m, edit_mask, base=base_values, info=info, edit_config=config, provenance=record)
        with writing_output("--out", out, lost):
            delta.save(out, overwrite=overwrite)
            as_new_file(out, recursive=True)
        what = f"delta (trained against {frozen} frozen weights; apply it with `mu-fast evaluate MODEL --delta {out}`)"
    console().print(f"edited in {result.seconds:.1f} s with {result.optimizer}; forget accuracy {acc_before:.3f} -> "
                    f"{acc_after:.3f}; {what} saved to {out}")
    if unmoved(acc_before, acc_after):
        print("mu-fast: warning: " + no_effect_warning("the edit", [config.lr], preset, model,
                                                       f"{acc_before:.3f} -> {acc_after:.3f}"), file=sys.stderr)


def forget_accuracy(model: Any, tokenizer: Any, task: Any) -> float:
    """The forget accuracy the no-effect warning reads: mean probability of the true answer on the forget set, in
    the training format (``evaluate_task``'s ``normal/forget`` ``acc``)."""
    from mu_fast.evaluate.formats import tokenized_set
    from mu_fast.evaluate.metrics import prompt_scores, set_accuracy

    return float(set_accuracy(prompt_scores(model, tokenized_set(tokenizer, task, task.forget_test)))["acc"])


def _load_for_edit(ref: Any, mask: Any, frozen: str, max_memory: dict[Any, str] | None, offload_dir: Path | None,
                   dtype: str) -> tuple[Any, Any, dict[str, Any]]:
    from mu_fast.models.edit_loading import load_for_edit

    name = f"organism:{ref.value}" if ref.kind == "organism" else ref.value
    return load_for_edit(name, mask, frozen=frozen, max_memory=max_memory, offload_dir=offload_dir, dtype=dtype)


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k != "organism"}


def _save_model_atomically(model: Any, tokenizer: Any, out: Path, extra: dict[str, Any]) -> None:
    """save_pretrained into a temporary sibling folder, then swap it in: a crash never leaves half a model. The
    folder and its files get the modes of any new file (mkdtemp and safetensors alone would make them private)."""
    from mu_fast.files import as_new_file
    from mu_fast.report import write_json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "mu_fast_edit.json", extra)
        as_new_file(tmp, recursive=True)
        if out.exists():
            old = out.with_name(out.name + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

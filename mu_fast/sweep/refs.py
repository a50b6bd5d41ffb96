"""Sweep spec parts that name things outside the spec: models (no weights read) and tasks (checked against them).

``resolve_model`` turns a ``models:`` entry into the canonical reference a run id hashes; ``resolve_tasks`` expands a
``tasks:`` entry over its forget splits and inject labels. Errors are ``ValueError("spec: <key>: <problem>; <fix>")``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TASK_KEYS = ("dataset", "forget_splits", "forget_split", "inject_labels", "inject_label", "maintain_split", "lm_texts",
             "cf_model", "name", "digest")
MODEL_KEYS = ("name", "dtype", "tokenizer", "paper_model", "layers", "digest")
DATASETS = ("organism", "sports", "counterfact")
# ``memory``: a task object a caller provides (``mu_fast.sweep.provided``), named by its digest; not for spec files.
MEMORY = "memory"
DTYPES = ("bf16", "fp16", "fp32", "fp64")


def spec_error(where: str, message: str) -> ValueError:
    return ValueError(f"spec: {where}: {message}")


def close_hint(name: str, known: Any) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(where: str, data: Mapping[str, Any], known: tuple[str, ...]) -> None:
    for key in data:
        if key not in known:
            raise spec_error(where, f"unknown key {key!r}{close_hint(key, known)}; known keys: {', '.join(known)}")


# ------------------------------------------------------------------------------------------------ models
def resolve_model(entry: Any, where: str) -> dict[str, Any]:
    """The canonical model reference of a ``models:`` entry (no weights are read)."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise spec_error(where, f"a model is a name or a mapping with name:; got {entry!r}")
    check_keys(where, entry, MODEL_KEYS)
    name = entry["name"].strip()
    dtype = entry.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise spec_error(f"{where}.dtype", f"{dtype!r} is not one of {', '.join(DTYPES)}")
    out: dict[str, Any] = {}
    digest = entry.get("digest")
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{8,64}", digest)):
        raise spec_error(f"{where}.digest", f"{digest!r} is not a hex digest of the weights "
                         "(mu_fast.sweep.provided.weights_digest); drop it or pass the digest")
    if name.startswith("memory:"):
        if digest is None:
            raise spec_error(where, f"{name} is a model held in memory (mu_fast.sweep.provided); it needs digest: "
                             "<weights_digest(model)> so that its runs are told apart from other weights")
        out = {"ref": name, "kind": "memory", "dtype": dtype or "fp32"}
    elif name == "organism" or name.startswith("organism:"):
        from mu_fast.organism import OrganismConfig

        preset = name.split(":", 1)[1] if ":" in name else "demo"
        if preset not in ("demo", "ci"):
            raise spec_error(where, f"unknown organism preset {preset!r}; use organism (demo) or organism:ci")
        if dtype not in (None, "fp32", "fp64"):
            raise spec_error(f"{where}.dtype", "the organism runs in fp32 (its weights) or fp64 (the demo: the same "
                             "numbers on every CPU); drop dtype or set fp32 / fp64")
        out = {"ref": f"organism:{preset}", "kind": "organism", "dtype": dtype or "fp32",
               "organism_hash": getattr(OrganismConfig, preset)().config_hash()}
    elif name.startswith("random:"):
        from mu_fast.models.shipped import shipped_name

        try:
            shipped = shipped_name(name.split(":", 1)[1])
        except ValueError as err:
            raise spec_error(where, str(err)) from None
        if not entry.get("tokenizer"):
            raise spec_error(where, f"random:{shipped} has random weights and no tokenizer; add tokenizer: <a folder with "
                        "the model's tokenizer> (the facts must tokenize)")
        out = {"ref": f"random:{shipped}", "kind": "random", "dtype": dtype or "bf16",
               "tokenizer": os.path.abspath(os.path.expanduser(entry["tokenizer"])), "layers": entry.get("layers")}
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise spec_error(where, f"{str(path)!r} has no config.json; pass a folder written by save_pretrained")
            out = {"ref": str(path.resolve()), "kind": "checkpoint", "dtype": dtype or "bf16"}
        elif re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) and not name.startswith((".", "/")):
            out = {"ref": name, "kind": "hub", "dtype": dtype or "bf16"}
        else:
            raise spec_error(where, f"no checkpoint folder at {str(path.absolute())!r} and {name!r} is not a hub id "
                        "(org/name); use organism, organism:ci, a save_pretrained folder, a hub id or random:<shipped>")
    if entry.get("tokenizer") and out["kind"] in ("checkpoint", "hub"):
        out["tokenizer"] = os.path.abspath(os.path.expanduser(entry["tokenizer"]))
    if entry.get("paper_model"):
        from mu_fast.data.datadir import paper_model

        try:
            out["paper_model"] = paper_model(entry["paper_model"]).key
        except ValueError as err:
            raise spec_error(f"{where}.paper_model", str(err)) from None
    if digest is not None:
        out["digest"] = digest  # weights other than the name's usual ones (a retrained organism, a model in memory)
    return {k: v for k, v in out.items() if v is not None}


def memory_task(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The reference of a task a caller provides (``mu_fast.sweep.provided``): its name and digest."""
    check_keys(where, entry, ("dataset", "name", "digest"))
    if not isinstance(entry.get("name"), str) or not isinstance(entry.get("digest"), str):
        raise spec_error(where, "a memory task needs name: and digest: (mu_fast.sweep.provided.task_digest)")
    return {"dataset": MEMORY, "name": entry["name"], "digest": entry["digest"]}


def paper_model_of(model: Mapping[str, Any]) -> str | None:
    """The paper model (gemma-7b / gemma-2-9b / llama-3-8b) a model reference stands for, if any."""
    if model.get("paper_model"):
        return model["paper_model"]
    from mu_fast.data.datadir import paper_model

    try:
        return paper_model(str(model["ref"]).removeprefix("random:")).key
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ tasks
def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def resolve_tasks(entry: Any, where: str, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tasks of one ``tasks:`` entry (its forget splits x inject labels), checked against the models."""
    from mu_fast.data.sports import FORGET_SPLIT_NAMES, INJECT_LABELS, parse_forget_split

    if not isinstance(entry, Mapping):
        raise spec_error(where, f"a task is a mapping with dataset:, forget_splits:, ...; got {entry!r}")
    if entry.get("dataset") == MEMORY:
        return [memory_task(entry, where)]
    check_keys(where, entry, TASK_KEYS[:-2])
    dataset = entry.get("dataset")
    if dataset not in DATASETS:
        raise spec_error(f"{where}.dataset", f"unknown dataset {dataset!r}{close_hint(dataset, DATASETS)}; use {', '.join(DATASETS)}")
    splits = as_list(entry.get("forget_splits", entry.get("forget_split", "first_16_unsplit")))
    default_label = "target_false" if dataset == "counterfact" else "random_without_golf"
    labels = ["None" if x is None else str(x) for x in as_list(entry.get("inject_labels", entry.get("inject_label", default_label)))]
    if not splits or not labels:
        raise spec_error(where, "forget_splits and inject_labels must not be empty lists")
    names = FORGET_SPLIT_NAMES if dataset != "counterfact" else ("first_16", "first_64", "random_16", "random_64")
    for split in splits:
        try:
            parse_forget_split(str(split), names)
        except ValueError as err:
            raise spec_error(f"{where}.forget_splits", str(err)) from None
    allowed = ("target_false",) if dataset == "counterfact" else INJECT_LABELS
    for label in labels:
        if label not in allowed:
            raise spec_error(f"{where}.inject_labels", f"{label!r} is not one of {', '.join(allowed)}")
    maintain = entry.get("maintain_split", "split")
    if maintain not in ("split", "unsplit") or (dataset == "counterfact" and maintain != "split"):
        raise spec_error(f"{where}.maintain_split", f"{maintain!r}: use split" + (" or unsplit" if dataset != "counterfact" else ""))
    organism = [m["ref"] for m in models if m["kind"] == "organism"]
    others = [m["ref"] for m in models if m["kind"] != "organism"]
    if dataset == "organism" and others:
        raise spec_error(f"{where}.dataset", f"the organism's facts are known only to the organism, not to {others[0]}; "
                    "give organism tasks in a spec whose models are organisms")
    if dataset != "organism" and organism:
        raise spec_error(f"{where}.dataset", f"{organism[0]} knows only its own facts; use dataset: organism for it")
    lm_texts = entry.get("lm_texts")
    if lm_texts is not None and lm_texts != "pile" and not Path(str(lm_texts)).expanduser().is_file():
        raise spec_error(f"{where}.lm_texts", f"{lm_texts!r} is neither 'pile' nor an existing text file")
    cf_model = entry.get("cf_model")
    if dataset == "counterfact" and cf_model is None:
        guessed = {paper_model_of(m) for m in models}
        if len(guessed) != 1 or None in guessed:
            raise spec_error(where, "counterfact needs cf_model: gemma-7b, gemma-2-9b or llama-3-8b (the filtered table)")
        cf_model = guessed.pop()
    out = []
    for split in splits:
        for label in labels:
            task = {"dataset": dataset, "forget_split": str(split), "inject_label": label, "maintain_split": maintain}
            if lm_texts is not None:
                task["lm_texts"] = str(lm_texts) if lm_texts == "pile" else str(Path(lm_texts).expanduser().resolve())
            if dataset == "counterfact":
                task["cf_model"] = cf_model
            out.append(task)
    return out

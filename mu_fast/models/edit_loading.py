"""Load a model for a localized edit: masked modules in full precision and trainable, the rest frozen and
optionally quantized (bitsandbytes) and offloaded (accelerate), without ever materializing the model twice.

Everything that can be wrong with the arguments is checked before any weight is read: the frozen precision,
bitsandbytes, the offload directory, the checkpoint (only its config.json is read), and the mask against a
meta-device model of that config (names, shapes, architecture). Checkpoints load through
``from_pretrained`` with a device map, shard by shard, straight to their devices.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mu_fast.masks import Mask
from mu_fast.models.device_map import check_masked_on_gpu, edit_device_map, summarize
from mu_fast.models.frozen import (bnb_config, check_frozen, is_quantized, keep_4bit_differentiable_, quantize_frozen_,
                                   require_bitsandbytes)
from mu_fast.models.identity import config_hash
from mu_fast.models.loading import parse_dtype

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_OFFLOAD_FILES = re.compile(r"index\.json|.*\.dat")
ORGANISM_PRESETS = ("demo", "ci")


@dataclass
class Source:
    """What ``name_or_path`` names: kind in {checkpoint, hub, random, organism}, its config, and identity."""

    kind: str
    ref: str
    config: Any
    path: str | None = None
    revision: str | None = None
    organism_preset: str | None = None


def check_offload_dir(offload_dir: str | os.PathLike | None) -> Path | None:
    """The offload directory as a Path after checking, without writing anything, that it can be used:
    a new or empty directory (or one holding only a previous offload) whose nearest existing ancestor is a
    writable directory. ``PermissionError`` / ``ValueError`` naming the path and the fix otherwise."""
    if offload_dir is None:
        return None
    path = Path(offload_dir).expanduser().absolute()
    if path.exists():
        if not path.is_dir():
            raise PermissionError(f"offload_dir {path} is a file, not a directory; pass a writable directory path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"offload_dir {path} is not writable; pass a directory you can write to")
        foreign = [p.name for p in path.iterdir() if not _OFFLOAD_FILES.fullmatch(p.name)]
        if foreign:
            raise ValueError(f"offload_dir {path} holds other files ({foreign[:3]}); offloading overwrites files there, "
                             "so pass an empty or new directory")
        return path
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        why = "is a file" if not ancestor.is_dir() else "is not writable"
        raise PermissionError(f"offload_dir {path} cannot be created: {ancestor} {why}; pass a writable directory path")
    return path


def _hub_offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def resolve_source(name_or_path: str | os.PathLike) -> Source:
    """Read only the config of ``name_or_path``: a local checkpoint folder, a hub id, ``random:<shipped name>``
    or ``organism`` / ``organism:<preset>``. One-line errors for a missing path or an unreachable hub."""
    import transformers

    ref = os.fspath(name_or_path)
    if ref.startswith("random:"):
        from mu_fast.models.shipped import shipped_config, shipped_name

        name = shipped_name(ref.split(":", 1)[1])
        return Source("random", f"random:{name}", shipped_config(name))
    if ref == "organism" or ref.startswith("organism:"):
        return _organism_source(ref.split(":", 1)[1] if ":" in ref else "demo")
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {path.absolute()}; pass a folder written by save_pretrained")
        config = transformers.AutoConfig.from_pretrained(path)
        snapshot = path.resolve()
        revision = snapshot.name if snapshot.parent.name == "snapshots" else None  # a hub cache snapshot
        return Source("checkpoint", ref, config, path=str(path.absolute()), revision=revision)
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint folder that holds config.json")
    if not _HUB_ID.fullmatch(ref):
        raise FileNotFoundError(f"no checkpoint at {path.absolute()}; pass a save_pretrained folder, a hub id "
                                "('org/name'), 'random:<shipped name>' or 'organism'")
    offline = _hub_offline()
    try:
        config = transformers.AutoConfig.from_pretrained(ref, local_files_only=offline)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; each becomes one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if offline:
            raise ValueError(f"{ref!r} is neither a local folder nor in the HF cache, and HF_HUB_OFFLINE=1 forbids "
                             "downloading it; download it first or pass a local checkpoint folder") from None
        raise ValueError(f"cannot read the config of hub model {ref!r} ({type(err).__name__}: {first}); check the id, "
                         "the network and your HF token, or pass a local checkpoint folder") from None
    return Source("hub", ref, config, revision=getattr(config, "_commit_hash", None))


def _organism_source(preset: str) -> Source:
    import transformers

    from mu_fast.organism import OrganismConfig, build_tokenizer, checkpoint_dir, organism_facts
    from mu_fast.organism.train import model_config

    if preset not in ORGANISM_PRESETS:
        raise ValueError(f"unknown organism preset {preset!r}; use 'organism' (demo) or 'organism:ci'")
    from mu_fast.organism.shipped import shipped_path

    org_config = getattr(OrganismConfig, preset)()
    path = shipped_path(org_config) or checkpoint_dir(org_config)  # the shipped weights, else the cache
    if (path / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(path)
    else:  # not trained yet: the config it will have, so the mask is checked before minutes of training
        config = model_config(org_config, len(build_tokenizer(organism_facts(org_config))))
    return Source("organism", f"organism:{preset}", config, path=str(path), revision=org_config.config_hash(),
                  organism_preset=preset)


def resolve_mask(mask_or_localization: Any, model: torch.nn.Module) -> Mask:
    """A Mask from a Mask, a Localization (its ``.mask``), a saved-mask path, or a list of parameter names
    (whole tensors, shapes from ``model``)."""
    if isinstance(mask_or_localization, Mask):
        mask = mask_or_localization
    elif isinstance(getattr(mask_or_localization, "mask", None), Mask):
        mask = mask_or_localization.mask
    elif isinstance(mask_or_localization, (str, os.PathLike)):
        mask = Mask.load(mask_or_localization)
    elif isinstance(mask_or_localization, (list, tuple)) and all(isinstance(n, str) for n in mask_or_localization):
        mask = Mask.whole(model, mask_or_localization)
    else:
        raise TypeError(f"expected a Mask, a Localization, a saved-mask path or a list of parameter names; "
                        f"got {type(mask_or_localization).__name__}")
    if len(mask) == 0:
        raise ValueError("the mask selects no parameters; localize first (mu_fast.localize) or pass a non-empty Mask")
    return mask


def check_mask_fits(mask: Mask, model: torch.nn.Module, what: str) -> None:
    """``ValueError`` if ``mask`` was built for another architecture or names parameters/shapes ``model`` lacks."""
    arch = mask.meta.get("arch")
    model_type = getattr(model.config, "model_type", None)
    if arch and model_type and arch != model_type:
        raise ValueError(f"the mask was built for a {arch} model but {what} is {model_type}; "
                         "localize on this model (or load the matching checkpoint)")
    try:
        mask.validate(model)
    except ValueError as err:
        raise ValueError(f"the mask does not fit {what}: {err}") from None


def masked_modules(mask: Mask) -> list[str]:
    """Module names owning the masked parameters (``model.layers.0.mlp.up_proj.weight`` -> ``...up_proj``)."""
    return sorted({name.rsplit(".", 1)[0] for name in mask})


def _load_tokenizer(source: Source) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path or source.ref)
    except (OSError, ValueError, TypeError) as err:
        return None, f"none ({type(err).__name__}: the checkpoint has no usable tokenizer)"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as the paper's code (pad = EOS)
    return tokenizer, "checkpoint"


def load_for_edit(
    name_or_path: str | os.PathLike,
    mask_or_localization: Any,
    frozen: str = "bf16",
    max_memory: dict[Any, Any] | None = None,
    offload_dir: str | os.PathLike | None = None,
    dtype: str = "bf16",
    device_map: str | dict[str, Any] | None = "auto",
    progress: bool = True,
) -> tuple[Any, Any, dict[str, Any]]:
    """Load ``name_or_path`` for an edit under ``mask_or_localization``; return ``(model, tokenizer, info)``.

    name_or_path: a ``save_pretrained`` folder, a hub id (network, or the HF cache when HF_HUB_OFFLINE=1),
    ``random:<shipped name>`` (random weights of a shipped config; tokenizer None) or ``organism`` /
    ``organism:ci`` (the built-in organism, trained on first use). frozen: ``bf16`` | ``int8`` | ``nf4``, the
    storage of every Linear the mask does not touch (the LM head always stays in ``dtype``). max_memory /
    offload_dir: accelerate's per-device budget (``{0: "20GiB", "cpu": "60GiB"}``) and the folder for disk
    offload of frozen layers; masked layers always stay on the GPU. device_map: ``"auto"`` (GPU when CUDA is
    available, else CPU), ``None`` / ``"cpu"`` (CPU), or an accelerate map that keeps masked modules on a GPU.
    Only masked parameters have ``requires_grad``. info: identity (source, path or hub id, revision or
    organism hash, ``config_hash``), ``frozen``, ``dtype``, ``skipped_modules`` (kept in ``dtype``),
    ``quantized_modules``, ``device_map`` (module counts on gpu/cpu/disk), ``tokenizer`` and, for the organism,
    ``organism`` (the loaded ``Organism``).
    """
    start = time.perf_counter()
    check_frozen(frozen)
    torch_dtype = parse_dtype(dtype)
    require_bitsandbytes(frozen)
    offload_path = check_offload_dir(offload_dir)
    if not (device_map in (None, "auto", "cpu") or isinstance(device_map, dict)):
        raise ValueError(f"device_map={device_map!r}; use 'auto', 'cpu', None or an accelerate device map dict")
    source = resolve_source(name_or_path)

    from mu_fast.models.random_model import empty_model

    meta_model = empty_model(source.config, torch_dtype)
    mask = resolve_mask(mask_or_localization, meta_model)
    check_mask_fits(mask, meta_model, source.ref)
    modules = masked_modules(mask)
    skipped = sorted(set(modules) | {"lm_head"})
    use_gpu = torch.cuda.is_available() and device_map not in (None, "cpu")
    planned = None
    if use_gpu and source.kind in ("checkpoint", "hub"):
        if isinstance(device_map, dict):
            check_masked_on_gpu(device_map, modules)
            planned = dict(device_map)
        else:
            planned = edit_device_map(meta_model, modules, frozen, torch_dtype, max_memory)
        if "disk" in planned.values() and offload_path is None:
            raise ValueError("the frozen layers do not fit in GPU and CPU memory (max_memory="
                             f"{max_memory}); pass offload_dir= to offload some to disk, or use frozen='nf4'")
    del meta_model

    info: dict[str, Any] = {"model": os.fspath(name_or_path), "source": source.kind, "path": source.path,
                            "revision": source.revision, "arch": source.config.model_type}
    if source.kind == "organism":
        from mu_fast.models.loading import load_model

        model, tokenizer, org_info = load_model(f"organism:{source.organism_preset}", progress=progress)
        model = model.to(device="cuda" if use_gpu else "cpu", dtype=torch_dtype)  # a few MB: 4 layers of width 64
        quantize_frozen_(model, frozen, keep=skipped)  # on the model's device, as bitsandbytes lays it out there
        info.update(organism=org_info["organism"], organism_hash=source.revision, tokenizer="organism")
    elif source.kind == "random":
        from mu_fast.models.random_model import build_random_model

        model = build_random_model(source.config, device="cuda" if use_gpu else "cpu", dtype=torch_dtype, frozen=frozen,
                                   trainable_modules=modules)
        tokenizer = None
        info["tokenizer"] = "none (random weights)"
    else:
        from transformers import AutoModelForCausalLM

        offloads = planned is not None and any(not isinstance(d, int) and not str(d).startswith("cuda")
                                               for d in planned.values())
        kwargs: dict[str, Any] = {"dtype": torch_dtype,
                                  "quantization_config": bnb_config(frozen, skipped, torch_dtype, cpu_offload=offloads)}
        if planned is not None:
            kwargs["device_map"] = planned
            if offload_path is not None:
                kwargs["offload_folder"] = str(offload_path)
        model = AutoModelForCausalLM.from_pretrained(source.path or source.ref, **kwargs)
        tokenizer, info["tokenizer"] = _load_tokenizer(source)
    keep_4bit_differentiable_(model)  # transformers builds its Linear4bit layers with bitsandbytes' CPU repacking on
    model.eval()
    params = dict(model.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in mask)
    for name in mask:
        if is_quantized(params[name]) or params[name].device.type == "meta" or (use_gpu and params[name].device.type != "cuda"):
            raise RuntimeError(f"masked parameter {name!r} was loaded as {type(params[name]).__name__} on "
                               f"{params[name].device}; it must be a full-precision tensor on the GPU (report this)")
    info.update(
        config_hash=config_hash(model.config), frozen=frozen, dtype=dtype, skipped_modules=skipped,
        quantized_modules=sum(1 for m in model.modules() if is_quantized(m)), device_map=summarize(model),
        offload_dir=str(offload_path) if offload_path else None, masked_params=list(mask),
        trainable_elements=mask.param_count(), seconds=time.perf_counter() - start,
    )
    return model, tokenizer, info

"""Edit deltas: the trained values of the masked elements only, the mask, and where they came from.

An edit trained against quantized frozen weights (``load_for_edit(..., frozen="int8"|"nf4")``) optimises a
slightly different function than the full-precision model, as in QLoRA; its result is therefore kept as a delta
and applied to the full-precision base with ``apply_delta``.

Canonical order of a parameter's compact values (a 1-D tensor, the parameter's dtype): ``whole`` -
``param.flatten()``; ``rows`` - ``param[rows]`` flattened row-major (rows ascending); ``cols`` -
``param[:, cols]`` flattened row-major; ``elements`` - ``param[bool_mask]`` (row-major order of the selected
elements). ``base_checksum`` holds, per parameter, 16 hex digits of sha256 over the base model's compact values
(cast to the delta's dtype) so that applying a delta to another base is caught.

On disk a delta is a directory: ``values.safetensors`` (one tensor per parameter), ``mask.safetensors`` +
``mask.json`` (``Mask.save``) and ``delta.json`` (format, parameter list and provenance). It is written into a
temporary sibling directory and renamed into place, so a crash never leaves a half-written delta.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import torch

from mu_fast.masks import Mask, Selection

DELTA_FORMAT_VERSION = 1
_IDENTITY_KEYS = ("model", "source", "path", "revision", "arch", "organism_hash", "config_hash", "frozen", "dtype")


def compact(tensor: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The selected elements of ``tensor`` as a 1-D tensor in the canonical order (module docstring)."""
    t = tensor.detach()
    if selection.kind == "whole":
        return t.reshape(-1)
    index = selection.index.to(t.device)
    if selection.kind == "rows":
        return t[index].reshape(-1)
    if selection.kind == "cols":
        return t[:, index].reshape(-1)
    return t[index]


def scatter_(param: torch.Tensor, selection: Selection, values: torch.Tensor) -> None:
    """Write compact ``values`` into the selected elements of ``param`` in place (cast to its dtype/device)."""
    v = values.to(device=param.device, dtype=param.dtype)
    shape = tuple(param.shape)
    with torch.no_grad():
        if selection.kind == "whole":
            param.copy_(v.view(shape))
            return
        index = selection.index.to(param.device)
        if selection.kind == "rows":
            param[index] = v.view(len(index), *shape[1:])
        elif selection.kind == "cols":
            param[:, index] = v.view(shape[0], len(index), *shape[2:])
        else:
            param[index] = v


def _checksum(values: torch.Tensor, dtype: torch.dtype) -> str:
    data = values.detach().to(device="cpu", dtype=dtype).contiguous()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def base_checksum(model_or_values: torch.nn.Module | Mapping[str, torch.Tensor], mask: Mask,
                  dtype: torch.dtype | None = None) -> dict[str, str]:
    """Per masked parameter, a checksum of its values at the masked elements, from a model or a snapshot
    ``{name: tensor}`` (``mu_fast.edit.snapshot``). Take it before the edit. ``dtype``: cast first (default:
    each tensor's own dtype)."""
    values = dict(model_or_values.named_parameters()) if isinstance(model_or_values, torch.nn.Module) else model_or_values
    out = {}
    for name, selection in mask.items():
        if name not in values:
            raise ValueError(f"masked parameter {name!r} is missing from the base; snapshot every masked parameter")
        out[name] = _checksum(compact(values[name], selection), dtype or values[name].dtype)
    return out


def _jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class EditDelta:
    """The compact trained values (``values[name]``: 1-D, canonical order), their ``mask`` and ``provenance``
    (base identity, config hash, the frozen precision the edit was trained against, dtype, edit config,
    versions, git commit, date, and ``base_checksum``)."""

    values: dict[str, torch.Tensor]
    mask: Mask
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.values) != set(self.mask):
            raise ValueError(f"delta values cover {sorted(set(self.values) ^ set(self.mask))[:3]} differently from "
                             "its mask; build deltas with extract_delta")
        for name, value in self.values.items():
            if value.dim() != 1 or value.numel() != self.mask.param_count(name):
                raise ValueError(f"delta values of {name!r} hold {tuple(value.shape)} but the mask selects "
                                 f"{self.mask.param_count(name)} elements; the delta is corrupt")

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the delta directory ``path`` atomically; ``FileExistsError`` if it exists and not ``overwrite``
        (an existing path that is not a delta is never replaced)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
            if not (path / "delta.json").is_file():
                raise FileExistsError(f"{path} exists and is not a mu_fast delta; choose another path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            save_file({n: v.detach().to("cpu").contiguous() for n, v in self.values.items()}, str(tmp / "values.safetensors"))
            self.mask.save(tmp / "mask")
            header = {"format": DELTA_FORMAT_VERSION, "params": {n: {"numel": int(v.numel()), "dtype": str(v.dtype)}
                                                                  for n, v in self.values.items()},
                      "provenance": _jsonable(self.provenance)}
            (tmp / "delta.json").write_text(json.dumps(header, indent=2))
            from mu_fast.files import as_new_file

            as_new_file(tmp, recursive=True)  # mkdtemp / safetensors make owner-only files
            if path.exists():  # overwrite: move the old delta aside first so one of the two always exists
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, old / "delta")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EditDelta:
        """Inverse of ``save``. A damaged file of the delta (truncated, garbled, missing) is one ``ValueError``
        naming that file (re-create the delta)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "delta.json").is_file():
            raise FileNotFoundError(f"no delta at {path} (no delta.json); save one with EditDelta.save()")
        file = path / "delta.json"
        try:
            header = json.loads(file.read_text())
            version = header.get("format")
            if version == DELTA_FORMAT_VERSION:
                file = path / "values.safetensors"
                values = load_file(str(file))
                file = path / "delta.json"
                values = {n: values[n] for n in header["params"]}
        except (SafetensorError, FileNotFoundError, IsADirectoryError, ValueError, KeyError, TypeError,
                AttributeError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise _damaged(file, err) from None
        if version != DELTA_FORMAT_VERSION:
            raise ValueError(f"{path} has delta format {version}; this mu_fast reads {DELTA_FORMAT_VERSION}")
        mask = Mask.load(path / "mask")
        try:
            return cls(values, mask, header.get("provenance", {}))
        except ValueError as err:  # values and mask disagree: one of the files was changed or cut
            raise _damaged(path / "values.safetensors", err) from None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.values.values())).dtype


def _damaged(file: Path, err: BaseException) -> ValueError:
    detail = " ".join(str(err).split())[:120] or type(err).__name__
    return ValueError(f"the delta file {file} is damaged ({detail}); re-create the delta (mu-fast edit --out, "
                      "or EditDelta.save) or restore it from a copy")


def extract_delta(
    model: torch.nn.Module,
    mask: Mask,
    base: Mapping[str, torch.Tensor] | Mapping[str, str] | None = None,
    info: Mapping[str, Any] | None = None,
    edit_config: Any = None,
    provenance: Mapping[str, Any] | None = None,
) -> EditDelta:
    """The masked elements of (edited) ``model`` as an EditDelta.

    base: the masked parameters before the edit (``snapshot(model, names=list(mask))``) or their precomputed
    ``base_checksum``; without it the delta carries no base checksum and ``apply_delta`` needs
    ``check_base=False``. info: ``load_for_edit``'s info (base identity, frozen precision, dtype). edit_config:
    an ``EditConfig`` or dict. provenance: extra JSON-ready fields to record.
    """
    from mu_fast.models.frozen import frozen_precision_of
    from mu_fast.models.identity import config_hash, git_commit, versions

    params = dict(model.named_parameters())
    mask.validate(model)
    values = {name: compact(params[name], sel).to("cpu").clone() for name, sel in mask.items()}
    dtype = next(iter(values.values())).dtype
    if base is None:
        checksum = None
    elif all(isinstance(v, str) for v in base.values()):
        checksum = dict(base)
    else:
        checksum = base_checksum(base, mask, dtype)
    info = dict(info or {})
    record: dict[str, Any] = {
        "base": {k: info[k] for k in _IDENTITY_KEYS if k in info},
        "config_hash": config_hash(model.config) if hasattr(model, "config") else None,
        "arch": getattr(getattr(model, "config", None), "model_type", None),
        "trained_frozen": info.get("frozen") or frozen_precision_of(model),
        "dtype": str(dtype).replace("torch.", ""),
        "edit_config": _jsonable(edit_config) if edit_config is not None else None,
        "versions": versions(),
        "git": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_checksum": checksum,
        "checksum_dtype": str(dtype).replace("torch.", ""),
        "trainable_elements": mask.param_count(),
    }
    record.update(_jsonable(dict(provenance or {})))
    return EditDelta(values, mask, record)


def apply_delta(model_or_checkpoint: Any, delta: EditDelta | str | os.PathLike, check_base: bool = True,
                dtype: str = "bf16") -> Any:
    """Write ``delta``'s values into the masked elements of a full-precision model, in place; return the model.

    model_or_checkpoint: a model, or anything ``load_for_edit`` loads (a checkpoint folder, hub id,
    ``organism``), which is then loaded with ``frozen="bf16"`` in ``dtype``. ``delta``: an EditDelta or a saved
    delta directory. check_base: compare the target's values at the masked elements with the delta's base
    checksum first (a delta applied to another base is a ``ValueError``).
    """
    from mu_fast.models.frozen import is_quantized

    if not isinstance(delta, EditDelta):
        delta = EditDelta.load(delta)
    if isinstance(model_or_checkpoint, torch.nn.Module):
        model = model_or_checkpoint
    else:
        from mu_fast.models.edit_loading import load_for_edit

        model, _, _ = load_for_edit(model_or_checkpoint, delta.mask, frozen="bf16", dtype=dtype)
    arch = delta.provenance.get("arch")
    model_arch = getattr(getattr(model, "config", None), "model_type", None)
    if arch and model_arch and arch != model_arch:
        raise ValueError(f"the delta was extracted from a {arch} model but the target is {model_arch}; apply it to its base")
    params = dict(model.named_parameters())
    for name in delta.mask:
        param = params.get(name)
        if param is not None and (is_quantized(param) or is_quantized(_owner(model, name))):
            raise ValueError(f"parameter {name!r} of the target is quantized ({type(_owner(model, name)).__name__}); "
                             "apply deltas to a full-precision model: load it with frozen='bf16'")
        if param is not None and param.device.type == "meta":
            raise ValueError(f"parameter {name!r} of the target is offloaded (meta device); load the model so that "
                             "its masked layers are materialized (device_map with them on a GPU or the CPU)")
    delta.mask.validate(model)
    if check_base:
        _check_base(model, delta)
    for name, selection in delta.mask.items():
        scatter_(params[name], selection, delta.values[name])
    return model


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model


def _check_base(model: torch.nn.Module, delta: EditDelta) -> None:
    expected = delta.provenance.get("base_checksum")
    if not expected:
        raise ValueError("the delta carries no base checksum (extracted without base=); pass check_base=False to "
                         "apply it without checking the base")
    got = base_checksum(model, delta.mask, delta.dtype)
    differ = [n for n in delta.mask if got.get(n) != expected.get(n)]
    if differ:
        base = delta.provenance.get("base", {})
        raise ValueError(
            f"the target's values at the masked elements of {differ[0]!r}"
            f"{f' (and {len(differ) - 1} more)' if len(differ) > 1 else ''} differ from the base the delta was "
            f"extracted from ({base.get('model', 'unknown base')}, config {delta.provenance.get('config_hash')}); "
            "apply it to that base, or pass check_base=False to apply it anyway"
        )

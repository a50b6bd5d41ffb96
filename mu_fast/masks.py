"""Masks: which elements of which parameters an edit may change.

A ``Mask`` maps parameter names to structured ``Selection``s: the whole tensor, a set of rows (dim 0), a set
of columns (dim 1) or, as a fallback, an arbitrary boolean tensor. Head slices and neurons become rows and
columns through the site table (``Mask.from_components``). Masks count their parameters, combine by union
and intersection, save to ``<path>.safetensors`` + ``<path>.json`` and load back, and check themselves
against a model. ``budget_match`` implements the paper's parameter-budget rule.

A mask may record the model it was made for (``mask.set_model(identity)``; ``mu-fast localize`` always does):
``meta["model"]`` = ``{"name", "arch", "config_hash", ...}`` (``config_hash`` from ``mu_fast.models.identity``: the
same in every precision). ``mask.check_model(model_or_config, name)`` then refuses another model; a mask without
one (older files, masks built by hand) is checked by parameter names and shapes only, with a warning when it was
loaded from a file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mu_fast.models.sites import Component, SiteTable

SELECTION_KINDS = ("whole", "rows", "cols", "elements")
MASK_FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)
class Selection:
    """One parameter's active elements.

    kind: ``whole`` | ``rows`` | ``cols`` | ``elements``.
    index: None for whole; sorted unique int64 indices ``[n]`` for rows/cols; bool tensor of the
    parameter's shape for elements.
    """

    kind: str
    index: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in SELECTION_KINDS:
            raise ValueError(f"selection kind {self.kind!r} is not one of {SELECTION_KINDS}")
        if (self.index is None) != (self.kind == "whole"):
            raise ValueError(
                f"Selection({self.kind!r}) {'takes no index' if self.kind == 'whole' else 'needs an index'}: "
                "rows/cols take integer indices, elements a bool tensor of the parameter's shape, whole none"
            )
        if self.index is not None and not isinstance(self.index, torch.Tensor):
            object.__setattr__(self, "index", torch.as_tensor(self.index))

    def numel(self, shape: tuple[int, ...]) -> int:
        """Number of active elements in a parameter of ``shape``."""
        if self.kind == "whole":
            return math.prod(shape)
        if self.kind == "rows":
            return int(self.index.numel()) * math.prod(shape[1:])
        if self.kind == "cols":
            return int(self.index.numel()) * shape[0] * math.prod(shape[2:])
        return int(self.index.sum())

    def dense(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """The selection as a bool tensor of ``shape``."""
        if self.kind == "whole":
            return torch.ones(shape, dtype=torch.bool, device=device)
        if self.kind == "elements":
            return self.index.to(device)
        out = torch.zeros(shape, dtype=torch.bool, device=device)
        if self.kind == "rows":
            out[self.index.to(device)] = True
        else:
            out[:, self.index.to(device)] = True
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection) or self.kind != other.kind:
            return False
        if self.index is None or other.index is None:
            return self.index is None and other.index is None
        return self.index.shape == other.index.shape and bool(torch.equal(self.index, other.index))

    def __repr__(self) -> str:
        if self.kind == "whole":
            return "Selection(whole)"
        if self.kind == "elements":
            return f"Selection(elements, {int(self.index.sum())} of {self.index.numel()})"
        return f"Selection({self.kind}, n={self.index.numel()})"


def _check_has_values(tensor: torch.Tensor, what: str, name: str) -> None:
    """Refuse a tensor on the meta device: it has a shape but no values, so it selects nothing we can know."""
    if tensor.device.type == "meta":
        raise ValueError(
            f"{what} for {name!r} is on the meta device, which holds no values to select with; build it on the cpu "
            "(or the parameters' device), e.g. from the real model or with torch.zeros(..., dtype=torch.bool)"
        )


def _indices(values: Iterable[int] | torch.Tensor | range, limit: int, what: str, name: str) -> torch.Tensor:
    if not isinstance(values, torch.Tensor):
        values = torch.as_tensor(list(values) if isinstance(values, (range, tuple, list)) else values)
    _check_has_values(values, f"{what} index tensor", name)
    if values.numel() and (values.is_floating_point() or values.is_complex() or values.dtype == torch.bool):
        sample = ", ".join(f"{v:g}" for v in values.flatten()[:3].tolist())
        raise ValueError(
            f"{what} indices for {name!r} must be integers; got {values.dtype} values such as {sample}: pass integer "
            f"{what} numbers (a bool mask goes in as kind='elements', or through torch.nonzero)"
        )
    idx = torch.unique(values.to(torch.int64).flatten())  # sorted
    if idx.numel() and (idx[0] < 0 or idx[-1] >= limit):
        raise ValueError(
            f"{what} indices for {name!r} must lie in [0, {limit}); got min {int(idx[0])}, max {int(idx[-1])}"
        )
    return idx


def _normalize(sel: Selection, shape: tuple[int, ...]) -> Selection | None:
    """Canonical form: None when empty, whole when full, rows/cols when an element mask is row/col-structured."""
    if sel.kind == "whole":
        return sel
    if sel.kind in ("rows", "cols"):
        n = sel.index.numel()
        if n == 0:
            return None
        full = shape[0] if sel.kind == "rows" else shape[1]
        return Selection("whole") if n == full else sel
    dense = sel.index
    total = int(dense.sum())
    if total == 0:
        return None
    if total == dense.numel():
        return Selection("whole")
    flat = dense.reshape(shape[0], -1)
    rows_any, rows_all = flat.any(1), flat.all(1)
    if torch.equal(rows_any, rows_all):
        return Selection("rows", torch.nonzero(rows_all).flatten())
    if len(shape) == 2:
        cols_any, cols_all = dense.any(0), dense.all(0)
        if torch.equal(cols_any, cols_all):
            return Selection("cols", torch.nonzero(cols_all).flatten())
    return sel


class Mask(Mapping[str, Selection]):
    """Structured selections per parameter name, with the parameter shapes they refer to.

    Build with ``Mask.from_components(table, components)``, ``Mask.whole(model, names)``,
    ``Mask.from_dense({name: bool_tensor})`` or ``mask.add(...)``. Read like a dict of ``Selection``.
    """

    def __init__(self, meta: Mapping[str, Any] | None = None):
        self._sel: dict[str, Selection] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self.meta: dict[str, Any] = dict(meta or {})
        self.path: Path | None = None  # the file it was loaded from, if any
        self._identity_warned = False

    # ---------------------------------------------------------------- build
    def add(self, name: str, shape: Iterable[int], kind: str = "whole", index: Any = None) -> Mask:
        """Add (union) a selection for parameter ``name`` of ``shape``. Returns self."""
        shape = tuple(int(s) for s in shape)
        if kind not in SELECTION_KINDS:
            raise ValueError(f"selection kind {kind!r} for {name!r} is not one of {SELECTION_KINDS}")
        if name in self._shape and self._shape[name] != shape:
            raise ValueError(f"parameter {name!r} was added with shape {self._shape[name]} and now with {shape}")
        if kind == "whole":
            sel = Selection("whole")
        elif kind == "rows":
            sel = Selection("rows", _indices(index, shape[0], "row", name))
        elif kind == "cols":
            if len(shape) < 2:
                raise ValueError(f"cannot select columns of the 1-D parameter {name!r} (shape {shape}); use rows")
            sel = Selection("cols", _indices(index, shape[1], "column", name))
        else:
            dense = torch.as_tensor(index)
            _check_has_values(dense, "element mask", name)
            if dense.dtype != torch.bool or tuple(dense.shape) != shape:
                raise ValueError(
                    f"element mask for {name!r} must be a bool tensor of shape {shape}; "
                    f"got {dense.dtype} {tuple(dense.shape)}"
                )
            sel = Selection("elements", dense.detach().to("cpu").clone())
        sel = _normalize(sel, shape)
        if sel is None:
            return self
        self._shape[name] = shape
        self._sel[name] = _union(self._sel[name], sel, shape) if name in self._sel else sel
        return self

    @classmethod
    def from_components(cls, table: SiteTable, components: Iterable[Component], meta: Mapping[str, Any] | None = None) -> Mask:
        """The mask that selects every parameter slice the components own (site table semantics)."""
        mask = cls(meta)
        comps = list(components)
        for comp in comps:
            for name, (kind, span) in table.selections(comp).items():
                mask.add(name, table._shape_of_param(name), kind, span)
        mask.meta.setdefault("components", [str(c) for c in comps])
        mask.meta.setdefault("arch", table.arch)
        return mask

    @classmethod
    def whole(cls, model: torch.nn.Module, names: Iterable[str], meta: Mapping[str, Any] | None = None) -> Mask:
        """Whole-tensor selections of the named parameters of ``model``."""
        params = dict(model.named_parameters())
        mask = cls(meta)
        for name in names:
            if name not in params:
                raise ValueError(f"parameter {name!r} not in the model; close names: {_close(name, params)}")
            mask.add(name, params[name].shape)
        return mask

    @classmethod
    def from_dense(cls, dense: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Mask:
        """Infer the structure (whole/rows/cols/elements) of boolean masks keyed by parameter name."""
        mask = cls(meta)
        for name, value in dense.items():
            mask.add(name, value.shape, "elements", value.to(torch.bool))
        return mask

    # ---------------------------------------------------------------- read
    def __getitem__(self, name: str) -> Selection:
        return self._sel[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sel)

    def __len__(self) -> int:
        return len(self._sel)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def param_count(self, name: str | None = None) -> int:
        """Active elements of one parameter, or of all of them."""
        if name is not None:
            return self._sel[name].numel(self._shape[name])
        return sum(sel.numel(self._shape[n]) for n, sel in self._sel.items())

    def counts(self) -> dict[str, int]:
        return {n: self.param_count(n) for n in self._sel}

    def dense(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        return self._sel[name].dense(self._shape[name], device)

    def kinds(self) -> dict[str, str]:
        return {n: s.kind for n, s in self._sel.items()}

    # ------------------------------------------------------------- combine
    def union(self, other: Mask) -> Mask:
        out = self.copy()
        for name, sel in other._sel.items():
            shape = other._shape[name]
            if name in out._shape and out._shape[name] != shape:
                raise ValueError(f"masks disagree on the shape of {name!r}: {out._shape[name]} vs {shape}")
            out._shape[name] = shape
            out._sel[name] = _union(out._sel[name], sel, shape) if name in out._sel else sel
        return out

    def intersection(self, other: Mask) -> Mask:
        out = Mask({**self.meta, "components": None})
        for name, sel in self._sel.items():
            if name not in other._sel:
                continue
            shape = self._shape[name]
            if other._shape[name] != shape:
                raise ValueError(f"masks disagree on the shape of {name!r}: {shape} vs {other._shape[name]}")
            inter = _intersection(sel, other._sel[name], shape)
            if inter is not None:
                out._sel[name], out._shape[name] = inter, shape
        return out

    __or__ = union
    __and__ = intersection

    def copy(self) -> Mask:
        out = Mask(self.meta)
        out._sel, out._shape = dict(self._sel), dict(self._shape)
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mask) and self._shape == other._shape and self._sel == other._sel

    # ---------------------------------------------------------- model glue
    def validate(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if the mask records another model (``check_model``), or a masked parameter is
        missing from ``model`` or has another shape."""
        self.check_model(model)
        params = dict(model.named_parameters())
        for name, shape in self._shape.items():
            if name not in params:
                raise ValueError(
                    f"mask names parameter {name!r}, which the model does not have (close names: "
                    f"{_close(name, params)}); build the mask from the same model"
                )
            if tuple(params[name].shape) != shape:
                raise ValueError(
                    f"mask for {name!r} has shape {shape} but the parameter has {tuple(params[name].shape)}; "
                    "build the mask from the same model"
                )

    def set_model(self, identity: Mapping[str, Any]) -> Mask:
        """Record the model the mask is made for: ``identity`` holds ``config_hash`` (and ``name``, ``arch``, ...;
        ``mu_fast.provenance.model_identity`` gives one, with ``ref`` as the name). Returns self."""
        if not identity.get("config_hash"):
            raise ValueError("a mask's model identity needs config_hash (mu_fast.models.identity.config_hash(model))")
        ident = {k: v for k, v in identity.items() if v is not None}
        ident.setdefault("name", ident.get("ref"))
        self.meta["model"] = _jsonable(ident)
        return self

    def check_model(self, model_or_config: Any, name: str | None = None) -> None:
        """``ValueError`` (naming both models and the fix) when the mask records another model than
        ``model_or_config`` (a model or its transformers config; compared by ``config_hash``). A mask that records
        none passes; loaded from a file, it warns once that only names and shapes can be checked."""
        from mu_fast.models.identity import config_hash

        config = getattr(model_or_config, "config", model_or_config)
        made_for = self.meta.get("model") or {}
        if not made_for.get("config_hash"):
            if self.path is not None and not self._identity_warned:
                self._identity_warned = True
                warnings.warn(f"the mask {self.path} records no model identity (saved by an older mu_fast or built by "
                              "hand), so it is checked against the model only by parameter names and shapes; save it "
                              "again with `mu-fast localize` to record one", UserWarning, stacklevel=2)
            return
        if config is None or not hasattr(config, "to_dict"):
            return
        got = config_hash(config)
        if got != made_for["config_hash"]:
            target = name or getattr(config, "_name_or_path", None) or "this model"
            raise ValueError(
                f"the mask was made for {made_for.get('name') or 'another model'} ({made_for.get('arch')}, config "
                f"{made_for['config_hash']}) but is applied to {target} ({getattr(config, 'model_type', None)}, config "
                f"{got}); localize on {target} (mu-fast localize {target} ...) or use the model the mask was made for")

    def trainable_parameters(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        """Validate, then set ``requires_grad`` on exactly the masked parameters; return them (name order)."""
        self.validate(model)
        out = []
        for name, param in model.named_parameters():
            param.requires_grad_(name in self._sel)
            if name in self._sel:
                out.append((name, param))
        return out

    # ----------------------------------------------------------- save/load
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``<path>.safetensors`` (indices; metadata in the header) and ``<path>.json`` (summary).

        Files are written to a temporary name and renamed, so a crash never leaves a half-written mask.
        """
        from safetensors.torch import save_file

        base = _strip_suffix(Path(path))
        st_path, json_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        if not overwrite and (st_path.exists() or json_path.exists()):
            raise FileExistsError(f"{st_path} already exists; pass overwrite=True to replace it")
        tensors = {}
        for i, (name, sel) in enumerate(self._sel.items()):
            if sel.index is not None:
                tensors[f"{i}.{sel.kind}"] = sel.index.contiguous()
        header = self._header()
        base.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(st_path, lambda tmp: save_file(tensors, tmp, metadata={"mu_fast_mask": json.dumps(header)}))
        summary = {**header, "counts": self.counts(), "total": self.param_count()}
        _atomic_write(json_path, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        return st_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mask:
        """Inverse of ``save``. Accepts the base path or either file. A truncated or garbled file is a
        ``ValueError`` naming it (re-create the mask)."""
        from safetensors import SafetensorError, safe_open

        st_path = _strip_suffix(Path(path)).with_suffix(".safetensors")
        if not st_path.exists():
            raise FileNotFoundError(f"no mask at {st_path}; save one with Mask.save()")
        try:
            with safe_open(str(st_path), framework="pt") as f:
                meta = f.metadata() or {}
                if "mu_fast_mask" not in meta:
                    raise ValueError(f"{st_path} is not a mu_fast mask (no 'mu_fast_mask' header)")
                try:
                    header = json.loads(meta["mu_fast_mask"])
                    version = header.get("version")
                except (ValueError, AttributeError) as err:
                    raise _damaged(st_path, err) from None
                if version != MASK_FORMAT_VERSION:
                    raise ValueError(f"{st_path} has mask format {version}; this mu_fast reads {MASK_FORMAT_VERSION}")
                try:
                    mask = cls(header.get("meta"))
                    for i, entry in enumerate(header["params"]):
                        index = f.get_tensor(f"{i}.{entry['kind']}") if entry["kind"] != "whole" else None
                        mask._shape[entry["name"]] = tuple(entry["shape"])
                        mask._sel[entry["name"]] = Selection(entry["kind"], index)
                except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as err:
                    raise _damaged(st_path, err) from None
        except SafetensorError as err:  # the header itself: an empty, truncated or foreign file
            raise _damaged(st_path, err) from None
        mask.path = st_path
        return mask

    def _header(self) -> dict[str, Any]:
        params = [{"name": n, "kind": s.kind, "shape": list(self._shape[n])} for n, s in self._sel.items()]
        return {"version": MASK_FORMAT_VERSION, "params": params, "meta": _jsonable(self.meta)}

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for sel in self._sel.values():
            kinds[sel.kind] = kinds.get(sel.kind, 0) + 1
        return f"Mask({len(self)} params, {self.param_count():,} elements, kinds={kinds})"


# --------------------------------------------------------------------- rules
def _union(a: Selection, b: Selection, shape: tuple[int, ...]) -> Selection:
    if a.kind == "whole" or b.kind == "whole":
        return Selection("whole")
    if a.kind == b.kind and a.kind in ("rows", "cols"):
        return _normalize(Selection(a.kind, torch.unique(torch.cat([a.index, b.index]))), shape)
    return _normalize(Selection("elements", a.dense(shape) | b.dense(shape)), shape)


def _intersection(a: Selection, b: Selection, shape: tuple[int, ...]) -> Selection | None:
    if a.kind == "whole":
        return b
    if b.kind == "whole":
        return a
    if a.kind == b.kind and a.kind in ("rows", "cols"):
        keep = torch.isin(a.index, b.index)
        return _normalize(Selection(a.kind, a.index[keep]), shape)
    return _normalize(Selection("elements", a.dense(shape) & b.dense(shape)), shape)


def budget_match(
    scores: Mapping[Component, float], sizes: Mapping[Component, int] | SiteTable, budget: int
) -> list[Component]:
    """The paper's budget rule: rank components by |score|, walk down subtracting sizes until the budget is
    spent (≤ 0), take that component's |score| as the threshold, keep everything with |score| ≥ threshold.

    The selection overshoots the budget by at most one component (plus exact ties). Returns components in
    descending |score| order. ``sizes`` is a mapping or a SiteTable (``component_size``).
    """
    if budget <= 0:
        raise ValueError(f"budget must be a positive parameter count; got {budget}")
    if not scores:
        raise ValueError("budget_match needs at least one scored component; the score dict is empty")
    size_of = sizes.component_size if isinstance(sizes, SiteTable) else sizes.__getitem__
    ordered = sorted(scores, key=lambda c: (-abs(float(scores[c])), c))
    remaining = budget
    threshold = None
    for comp in ordered:
        remaining -= size_of(comp)
        if remaining <= 0:
            threshold = abs(float(scores[comp]))
            break
    if threshold is None:  # the budget exceeds everything scored
        return ordered
    return [c for c in ordered if abs(float(scores[c])) >= threshold]


def paper_budget(table: SiteTable, n_flu_layers: int) -> int:
    """The paper's budget: as many parameters as ``n_flu_layers`` whole MLP layers."""
    return n_flu_layers * table.component_size(Component("mlp", 0))


# ------------------------------------------------------------------ helpers
def _damaged(path: Path, err: BaseException) -> ValueError:
    detail = " ".join(str(err).split())[:120] or type(err).__name__
    return ValueError(f"the mask file {path} is damaged ({detail}); re-create it (mu-fast localize --out, or "
                      "Mask.save) or restore it from a copy")


def _strip_suffix(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def _atomic_write(path: Path, write: Any) -> None:
    from mu_fast.files import as_new_file

    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        as_new_file(tmp)  # mkstemp (and safetensors) create 0600 files; a mask is as readable as any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _close(name: str, names: Iterable[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)

"""The segment table: a ``Mask`` over a list of parameters turned into work tiles every backend reads.

Every parameter's active elements are described by *segments*. A segment is either

* **strided**: ``n_runs`` runs of ``run_len`` contiguous elements, ``run_stride`` apart, starting at flat
  offset ``base`` of the (contiguous) parameter. Element ``k`` (0 ≤ k < run_len·n_runs, the order the state
  uses) sits at ``base + (k // run_len)·run_stride + k % run_len``. A whole tensor is one run; a block of
  consecutive rows is one run; a block of consecutive columns is one run per row (``n_runs`` = rows).
* **columns**: scattered columns (single neurons of ``down_proj``), walked row by row: ``run_len`` selected
  column offsets ``index[base : base + run_len]`` repeated over ``n_runs`` rows ``run_stride`` apart; element ``k``
  sits at ``(k // run_len)·run_stride + index[base + k % run_len]``. Row-major traversal keeps the hardware
  prefetcher (CPU) and sector reuse (GPU) working where a walk down each single column would not.
* **indexed**: the fallback for arbitrary boolean masks; element ``k`` sits at ``index[base + k]`` (int32
  flat offsets into the parameter, stored once in ``SegmentTable.index``).

Each segment owns a contiguous range of the compact state buffers starting at ``state0``; segments are cut
into *tiles* of at most ``tile`` elements, one row of ``SegmentTable.tiles`` (int64, ``TILE_FIELDS`` columns,
the layout below, mirrored in csrc/masked_adamw_common.h and kernels/masked_adamw.py). Tiles are the unit of
work of every backend: one program (Triton), one thread block (CUDA) or one OpenMP task (CPU) per tile, so
one launch covers all tensors of a dtype.

Alignment: each parameter's state starts at a multiple of ``PARAM_ALIGN`` elements (256 B of fp32), and with
8-bit state every segment starts at a multiple of the quantization block (256), so a tile holds whole blocks.
A strided segment whose base, run length and run stride are multiples of ``STATE_VEC`` (8) starts its state at
a multiple of 8 as well: then every aligned group of 8 elements of a tile (k0 a multiple of 8) is contiguous and
16-byte aligned in the parameter, the gradient and the state, and the CUDA kernels move it with vector accesses.
Padding elements are never read or written by the kernels; they stay zero.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mu_fast.masks import Selection

STRIDED, INDEXED, COLUMNS = 0, 1, 2
# Tile row layout (int64). Keep in sync with csrc/masked_adamw_common.h and kernels/masked_adamw.py.
TILE_SLOT, TILE_GROUP, TILE_KIND, TILE_BASE, TILE_RUN_LEN, TILE_RUN_STRIDE, TILE_K0, TILE_COUNT, TILE_STATE0 = range(9)
TILE_FIELDS = 9
PARAM_ALIGN = 64
DEFAULT_TILE = 4096
MAX_RUN = 2**30  # longest run; element offsets inside a run are 32-bit in the kernels
STATE_VEC = 8  # strided segments whose runs are 8-aligned start their state 8-aligned too (CUDA vector accesses)
MIN_COLUMN_RUN = 16  # column selections whose runs average fewer columns are walked row by row (COLUMNS)


@dataclass(frozen=True)
class Segment:
    """One rectangle (or index list) of active elements of one parameter; see the module docstring."""

    kind: int
    base: int
    run_len: int
    n_runs: int
    run_stride: int
    state0: int

    @property
    def numel(self) -> int:
        return self.run_len * self.n_runs


@dataclass
class ParamSlot:
    """Where one parameter's active elements live: its segments, state range and tile range."""

    name: str
    slot: int
    shape: tuple[int, ...]
    group: int
    kind: str  # the Selection kind: whole | rows | cols | elements
    n_active: int
    state_begin: int
    state_end: int  # exclusive; includes padding between and after segments (8-bit alignment)
    tile_begin: int
    tile_end: int
    segments: list[Segment] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Maximal runs of consecutive values in a sorted unique int64 tensor, as [start, stop) pairs."""
    if index.numel() == 0:
        return []
    breaks = torch.nonzero(index[1:] - index[:-1] != 1).flatten() + 1
    starts = torch.cat([index.new_zeros(1), breaks]).tolist()
    stops = torch.cat([breaks, index.new_tensor([index.numel()])]).tolist()
    values = index.tolist()
    return [(values[a], values[b - 1] + 1) for a, b in zip(starts, stops)]


class SegmentTable:
    """Segments and work tiles for a list of parameters with their selections.

    entries: ``(name, shape, selection, group)`` per parameter, in slot order (slot = position).
    tile: elements per tile (a multiple of ``align``). align: state alignment of every segment
    (256 for 8-bit block-quantized state, else 1).

    Attributes: ``slots`` (ParamSlot per parameter), ``tiles`` (int64 ``[n_tiles, TILE_FIELDS]``, CPU until
    ``to``), ``index`` (int32 ``[n_index]`` flat offsets of indexed segments), ``state_numel`` (length of each
    compact state buffer, padding included), ``n_active`` (active elements, padding excluded).
    """

    def __init__(
        self,
        entries: Sequence[tuple[str, Sequence[int], Selection, int]],
        tile: int = DEFAULT_TILE,
        align: int = 1,
    ):
        if tile <= 0 or tile % align:
            raise ValueError(f"tile={tile} must be a positive multiple of align={align}")
        self.tile, self.align = int(tile), int(align)
        self.slots: list[ParamSlot] = []
        index_parts: list[torch.Tensor] = []
        n_index = 0
        cursor = 0
        seg_rows: list[list[int]] = []
        for slot, (name, shape, sel, group) in enumerate(entries):
            shape = tuple(int(s) for s in shape)
            cursor = _round_up(cursor, max(PARAM_ALIGN, self.align))
            begin = cursor
            segments = []
            for kind, base, run_len, n_runs, stride, extra in self._describe(name, shape, sel, n_index):
                vectorizable = kind == STRIDED and (base | run_len | (stride if n_runs > 1 else 0)) % STATE_VEC == 0
                cursor = _round_up(cursor, max(self.align, STATE_VEC) if vectorizable else self.align)
                segments.append(Segment(kind, base, run_len, n_runs, stride, cursor))
                cursor += run_len * n_runs
                if extra is not None:
                    index_parts.append(extra)
                    n_index += extra.numel()
            n_active = sum(s.numel for s in segments)
            cursor = _round_up(cursor, self.align)  # whole quantization blocks per parameter
            self.slots.append(ParamSlot(name, slot, shape, int(group), sel.kind, n_active, begin, cursor, 0, 0, segments))
            seg_rows += [[slot, int(group), s.kind, s.base, s.run_len, s.run_stride, 0, s.numel, s.state0] for s in segments]
        self.state_numel = _round_up(cursor, max(PARAM_ALIGN, self.align))
        self.n_active = sum(s.n_active for s in self.slots)
        self.index = torch.cat(index_parts) if index_parts else torch.zeros(0, dtype=torch.int32)
        self.tiles = self._cut_tiles(torch.tensor(seg_rows, dtype=torch.int64).reshape(-1, TILE_FIELDS))
        self.gathered = bool((self.tiles[:, TILE_KIND] != STRIDED).any()) if self.tiles.numel() else False  # scattered tiles
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ build
    @staticmethod
    def _describe(name: str, shape: tuple[int, ...], sel: Selection, index_offset: int):
        """Yield (kind, base, run_len, n_runs, stride, index_tensor_or_None) for one parameter."""
        numel = math.prod(shape)
        inner = math.prod(shape[1:])
        if sel.kind in ("whole", "rows"):
            for r0, r1 in _runs(sel.index) if sel.kind == "rows" else [(0, shape[0] if shape else 1)]:
                if (r1 - r0) * inner < MAX_RUN:
                    yield STRIDED, r0 * inner, (r1 - r0) * inner, 1, numel, None
                else:  # kernels address inside a run with 32-bit offsets: one run per row instead
                    yield STRIDED, r0 * inner, inner, r1 - r0, inner, None
        elif sel.kind == "cols":
            unit = math.prod(shape[2:])
            if shape[1] * unit >= MAX_RUN:
                raise ValueError(f"rows of {name!r} ({shape[1] * unit} elements) exceed the 2**30-element run limit")
            runs = _runs(sel.index)
            if len(runs) * MIN_COLUMN_RUN <= sel.index.numel():
                for c0, c1 in runs:
                    yield STRIDED, c0 * unit, (c1 - c0) * unit, shape[0], shape[1] * unit, None
            else:
                offsets = (sel.index[:, None] * unit + torch.arange(unit)).flatten().to(torch.int32)
                yield COLUMNS, index_offset, offsets.numel(), shape[0], shape[1] * unit, offsets
        elif sel.kind == "elements":
            if numel >= 2**31:
                raise ValueError(
                    f"element mask for {name!r} covers {numel} elements, more than int32 offsets address; "
                    "express it as rows/cols/whole selections"
                )
            flat = torch.nonzero(sel.index.reshape(-1)).flatten().to(torch.int32)
            yield INDEXED, index_offset, flat.numel(), 1, 0, flat
        else:
            raise ValueError(f"selection kind {sel.kind!r} for {name!r} is not one of whole/rows/cols/elements")

    def _cut_tiles(self, segs: torch.Tensor) -> torch.Tensor:
        """Cut every segment row into tiles of at most ``tile`` elements (k0 multiples of ``tile``)."""
        if segs.numel() == 0:
            for s in self.slots:
                s.tile_begin = s.tile_end = 0
            return segs
        n = segs[:, TILE_COUNT]
        per_seg = (n + self.tile - 1) // self.tile
        tiles = segs.repeat_interleave(per_seg, dim=0)
        first = torch.cumsum(per_seg, 0) - per_seg
        local = torch.arange(tiles.shape[0]) - first.repeat_interleave(per_seg)
        tiles[:, TILE_K0] = local * self.tile
        tiles[:, TILE_COUNT] = torch.clamp(n.repeat_interleave(per_seg) - tiles[:, TILE_K0], max=self.tile)
        bounds = torch.searchsorted(tiles[:, TILE_SLOT].contiguous(), torch.arange(len(self.slots) + 1)).tolist()
        for s in self.slots:
            s.tile_begin, s.tile_end = bounds[s.slot], bounds[s.slot + 1]
        return tiles.contiguous()

    # ------------------------------------------------------------------- use
    @property
    def n_tiles(self) -> int:
        return int(self.tiles.shape[0])

    def to(self, device: torch.device | str) -> SegmentTable:
        """Move ``tiles`` and ``index`` to ``device`` (in place; returns self)."""
        self.tiles = self.tiles.to(device)
        self.index = self.index.to(device)
        self._cache.clear()
        return self

    def indices(self, slot: int, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat offsets into the parameter, positions in the state buffers) of a slot's active elements.

        Both int64 ``[n_active]``, in state order. Materialized on demand and cached (8 B per element each):
        used by the torch reference backend, state migration and tests, never by the fused kernels.
        """
        device = torch.device(device) if device is not None else self.tiles.device
        key = (slot, str(device))
        if key not in self._cache:
            flats, states = [], []
            index = self.index.to("cpu", torch.int64)
            for s in self.slots[slot].segments:
                k = torch.arange(s.numel, dtype=torch.int64)
                if s.kind == INDEXED:
                    flats.append(index[s.base : s.base + s.numel])
                elif s.kind == COLUMNS:
                    r = k // s.run_len
                    flats.append(r * s.run_stride + index[s.base + (k - r * s.run_len)])
                else:
                    r = k // s.run_len
                    flats.append(s.base + r * s.run_stride + (k - r * s.run_len))
                states.append(s.state0 + k)
            empty = torch.zeros(0, dtype=torch.int64)
            flat = torch.cat(flats) if flats else empty
            state = torch.cat(states) if states else empty
            self._cache[key] = (flat.to(device), state.to(device))
        return self._cache[key]

    def key(self, slot: int) -> str:
        """A digest of a slot's shape and active set, stored in state_dicts to catch a mismatched mask."""
        s = self.slots[slot]
        h = hashlib.sha1(repr((s.shape, [(x.kind, x.base if x.kind == STRIDED else 0, x.run_len, x.n_runs, x.run_stride) for x in s.segments])).encode())
        for x in s.segments:
            if x.kind != STRIDED:
                length = x.numel if x.kind == INDEXED else x.run_len
                h.update(self.index[x.base : x.base + length].cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"SegmentTable({len(self.slots)} params, {self.n_active:,} active elements, "
            f"{sum(len(s.segments) for s in self.slots)} segments, {self.n_tiles} tiles of ≤{self.tile})"
        )


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple

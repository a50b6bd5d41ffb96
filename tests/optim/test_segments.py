"""The segment table covers exactly the active elements, once each, with disjoint aligned state ranges."""

from __future__ import annotations

import pytest
import torch

from mu_fast.optim.segments import INDEXED, TILE_COUNT, TILE_FIELDS, TILE_SLOT, SegmentTable
from tests.optim._oracle import DENSITIES, STRUCTURES, make_mask, make_params


@pytest.mark.parametrize("align", [1, 256])
@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("density", DENSITIES, ids=lambda d: f"density={d}")
def test_table_covers_the_mask_exactly(structure, density, align, rng):
    params = make_params(torch.float32, rng)
    mask = make_mask(params, structure, density, rng)
    tile = 256 if align == 256 else 7  # an odd tile size splits runs mid-row
    table = SegmentTable([(n, params[n].shape, mask[n], 0) for n in mask], tile=tile, align=align)
    assert table.tiles.shape[1] == TILE_FIELDS and bool((table.tiles[:, TILE_COUNT] <= tile).all())
    assert bool((table.tiles[:, TILE_COUNT] > 0).all())
    assert table.n_active == mask.param_count()
    used = torch.zeros(table.state_numel, dtype=torch.int64)
    for slot, info in enumerate(table.slots):
        flat, state = table.indices(slot)
        expected = torch.nonzero(mask.dense(info.name).reshape(-1)).flatten()
        assert torch.equal(torch.sort(flat).values, expected), info.name
        assert bool((state >= info.state_begin).all() and (state < info.state_end).all())
        assert info.state_begin % 64 == 0 and info.state_end % align == 0
        assert all(seg.state0 % align == 0 for seg in info.segments)
        tiles = table.tiles[info.tile_begin : info.tile_end]
        assert bool((tiles[:, TILE_SLOT] == slot).all()) and int(tiles[:, TILE_COUNT].sum()) == info.n_active
        used[state] += 1
    assert int(used.max()) == 1  # every state element belongs to one active element at most


def test_structured_selections_become_few_segments(rng):
    params = make_params(torch.float32, rng)
    shape = params["w_q"].shape
    rows = SegmentTable([("w_q", shape, make_mask({"w_q": params["w_q"]}, "heads", 0.3, rng)["w_q"], 0)])
    assert all(seg.kind != INDEXED and seg.n_runs == 1 for seg in rows.slots[0].segments)  # contiguous row blocks
    from mu_fast.masks import Mask

    cols = Mask().add("w_o", (24, 40), "cols", list(range(8, 24)))
    table = SegmentTable([("w_o", (24, 40), cols["w_o"], 0)])
    (seg,) = table.slots[0].segments  # one run of 16 columns per row
    assert (seg.run_len, seg.n_runs, seg.run_stride, seg.base) == (16, 24, 40, 8)


def test_bad_tile_is_refused():
    with pytest.raises(ValueError, match="multiple of align"):
        SegmentTable([], tile=100, align=256)


def test_runs_longer_than_2_pow_30_are_cut_per_row():
    from mu_fast.masks import Selection

    table = SegmentTable([("embed", (2**15, 2**16), Selection("whole"), 0)], tile=4096)
    (seg,) = table.slots[0].segments
    assert (seg.run_len, seg.n_runs, seg.run_stride) == (2**16, 2**15, 2**16)
    assert table.n_active == 2**31 and table.n_tiles == 2**31 // 4096


def test_scattered_columns_are_walked_row_by_row():
    from mu_fast.masks import Mask
    from mu_fast.optim.segments import COLUMNS

    cols = Mask().add("down", (24, 40), "cols", [1, 5, 6, 30])
    table = SegmentTable([("down", (24, 40), cols["down"], 0)], tile=10)
    (seg,) = table.slots[0].segments
    assert (seg.kind, seg.run_len, seg.n_runs, seg.run_stride) == (COLUMNS, 4, 24, 40)
    flat, _ = table.indices(0)
    assert flat[:6].tolist() == [1, 5, 6, 30, 41, 45]  # row-major over the selected columns


@pytest.mark.parametrize("tile", [4096, 64, 7])
def test_vectorizable_strided_segments_start_their_state_8_aligned(tile, rng):
    """Aligned groups of 8 elements of such tiles are contiguous and 8-aligned in the parameter and the state."""
    from mu_fast.masks import Mask
    from mu_fast.optim.segments import STATE_VEC, STRIDED

    mask = Mask().add("q", (64, 40), "rows", [0, 1, 2, 9, 10]).add("o", (40, 64), "cols", list(range(8, 24)))
    mask.add("odd", (13, 24), "rows", [3, 5, 6]).add("w", (5, 16))
    mask.add("pad", (20, 12), "rows", [1, 6, 7])  # a 12-element run, then an aligned 24-element one: padded
    table = SegmentTable([(n, mask.shape(n), mask[n], 0) for n in mask], tile=tile)
    n_vec = 0
    for slot, info in enumerate(table.slots):
        flat, state = table.indices(slot)
        for seg in info.segments:
            vec = seg.kind == STRIDED and (seg.base | seg.run_len | (seg.run_stride if seg.n_runs > 1 else 0)) % STATE_VEC == 0
            if not vec:
                continue
            n_vec += 1
            assert seg.state0 % STATE_VEC == 0, (info.name, seg)
            at = (state >= seg.state0) & (state < seg.state0 + seg.numel)
            f, s = flat[at].reshape(-1, STATE_VEC), state[at].reshape(-1, STATE_VEC)
            assert bool((f[:, 0] % STATE_VEC == 0).all() and (s[:, 0] % STATE_VEC == 0).all())
            assert bool((f.diff(dim=1) == 1).all() and (s.diff(dim=1) == 1).all())
    assert n_vec == 7  # q and odd: two row blocks each; o: 16 columns × 40 rows; the whole w; rows 6-7 of pad

"""Damaged masks and deltas (truncated, garbage, empty, garbled JSON) are one error naming the file and the fix, from
the library and, before any model loads, from the command line."""

from __future__ import annotations

import json
import time

import pytest
import torch

from mu_fast.cli import main
from mu_fast.edit.delta import EditDelta
from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model


@pytest.fixture(scope="module")
def mask():
    table = SiteTable(make_tiny_model("llama", num_hidden_layers=2))
    return Mask.from_components(table, [Component("attn", 0, 1), Component("mlp", 1, 3), Component("mlp", 0)])


def _truncate(path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


DAMAGE = {
    "truncated": lambda p: _truncate(p),
    "truncated tail": lambda p: _truncate(p, 0.97),
    "garbage": lambda p: p.write_bytes(b"\x00garbage\xff" * 10),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_mask_names_its_file(damage, mask, tmp_path):
    path = mask.save(tmp_path / "m")
    DAMAGE[damage](path)
    with pytest.raises(ValueError) as caught:
        Mask.load(tmp_path / "m")
    text = str(caught.value)
    assert f"the mask file {path} is damaged" in text and "re-create it" in text and "\n" not in text, text


def test_a_mask_with_a_garbled_header_names_its_file(mask, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file({"0.rows": torch.zeros(2, dtype=torch.long)}, str(path), metadata={"mu_fast_mask": "{not json"})
    with pytest.raises(ValueError, match=f"the mask file {path} is damaged"):
        Mask.load(path)
    save_file({}, str(path), metadata={"mu_fast_mask": json.dumps({"version": 1, "params": [{"kind": "rows"}]})})
    with pytest.raises(ValueError, match=f"the mask file {path} is damaged"):
        Mask.load(path)


@pytest.fixture
def delta_dir(mask, tmp_path):
    values = {n: torch.randn(mask.param_count(n)) for n in mask}
    return EditDelta(values, mask, {"note": "test"}).save(tmp_path / "delta")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_delta_names_its_file(damage, delta_dir):
    path = delta_dir / "values.safetensors"
    DAMAGE[damage](path)
    with pytest.raises(ValueError) as caught:
        EditDelta.load(delta_dir)
    text = str(caught.value)
    assert f"the delta file {path} is damaged" in text and "re-create the delta" in text, text


@pytest.mark.parametrize("content", ["{\"format\": 1, \"params\": ", "not json at all", "[1, 2]", "\udcff"])
def test_a_corrupt_delta_json_names_its_file(content, delta_dir):
    (delta_dir / "delta.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"the delta file {delta_dir / 'delta.json'} is damaged"):
        EditDelta.load(delta_dir)


def test_a_damaged_mask_inside_a_delta_names_the_mask(delta_dir):
    _truncate(delta_dir / "mask.safetensors")
    with pytest.raises(ValueError, match=f"the mask file {delta_dir / 'mask.safetensors'} is damaged"):
        EditDelta.load(delta_dir)


@pytest.fixture
def no_loading(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the damaged file was found")

    import mu_fast.cli.common
    import mu_fast.models.edit_loading
    import mu_fast.models.loading
    import mu_fast.organism

    for module, name in ((mu_fast.models.loading, "load_model"), (mu_fast.organism, "load_organism"),
                         (mu_fast.models.edit_loading, "load_for_edit"), (mu_fast.cli.common, "load_model_ref")):
        monkeypatch.setattr(module, name, forbidden)
    import mu_fast.cli.edit
    import mu_fast.cli.evaluate

    monkeypatch.setattr(mu_fast.cli.evaluate, "load_model_ref", forbidden)
    monkeypatch.setattr(mu_fast.cli.edit, "_load_for_edit", forbidden)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)


def _one_line(args, capsys) -> str:
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert time.perf_counter() - start < 10.0
    return lines[0]


def test_the_command_line_names_a_damaged_delta_before_loading(delta_dir, capsys, no_loading):
    (delta_dir / "delta.json").write_text("{\"format\": 1, \"par")
    line = _one_line(["evaluate", "organism:ci", "--delta", delta_dir], capsys)
    assert f"the delta file {delta_dir / 'delta.json'} is damaged" in line, line


def test_the_command_line_names_a_damaged_mask_before_loading(mask, tmp_path, capsys, no_loading):
    path = mask.save(tmp_path / "m")
    _truncate(path)
    line = _one_line(["edit", "organism:ci", "--mask", tmp_path / "m", "--out", tmp_path / "e"], capsys)
    assert f"the mask file {path} is damaged" in line, line

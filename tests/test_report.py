"""The results table fits 100 columns without cutting method names, and says what its columns and names mean."""

import json
import math
import os
import stat

import pytest

from mu_fast.report import COMPONENT_LEGEND, TABLE_COLUMNS, environment, format_legend, format_table, legend, write_json


def full_summary(rng_value: float) -> dict:
    summary = {key: rng_value for key, _, _ in TABLE_COLUMNS}
    summary["trainable_params"] = 262_144
    summary["seconds"] = 1234.5  # in results.json, not in the table
    return summary


@pytest.mark.parametrize("methods", [
    ["(before edit)", "flu", "atp", "ct", "random", "random_mlps", "all_mlps", "nonlocalized"],
    ["flu", "a_localization_method_with_a_rather_long_name_indeed", "ct_mlps"],
])
def test_table_fits_100_columns_and_keeps_method_names(methods):
    summaries = {m: full_summary(0.5 + i / 100) for i, m in enumerate(methods)}
    summaries[methods[0]]["relearn_acc"] = math.nan  # shown as a dash, not "nan"
    text = format_table(summaries, "title")
    lines = text.splitlines()
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
    for method in methods:
        assert any(line.startswith(method + " ") for line in lines), method
    for key, header, fmt in TABLE_COLUMNS:  # every column is there (in a second block if need be)
        assert any(header[1] in line for line in lines), header
    assert "262,144" in text and "1234" not in text and "nan" not in text


def test_columns_no_method_reports_are_left_out():
    text = format_table({"flu": {"trainable_params": 10, "forget_err": 0.5}}, "t")
    assert "forget" in text and "relearn" not in text and "probe" not in text


def test_legend_names_every_column_and_component_form():
    text = " ".join(format_legend().split())
    for form in ("aL ", "aL.H", "mL ", "mL.N", "aL.q / aL.k / aL.v / aL.o"):
        assert form in text, form
    headers = {" ".join(h).replace(" ↑", "").replace(" ↓", "").strip() for _, h, _ in TABLE_COLUMNS}
    assert headers <= set(legend()["columns"]), headers - set(legend()["columns"])
    assert all(len(line) <= 100 for line in format_legend().splitlines())
    assert legend()["components"] == COMPONENT_LEGEND


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_write_json_respects_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


def test_environment_records_versions_threads_and_kernels():
    import torch
    import transformers

    env = environment()
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"] == torch.__version__
    assert env["packages"]["transformers"] == transformers.__version__
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()

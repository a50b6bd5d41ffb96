"""The README's demo section quotes the committed records, not numbers typed by hand: its table is the table the
numerics benchmark's demos printed (benchmarks/results/CPU/demo_numerics.json, every setting the same), its lr
neighbour table is benchmarks/results/CPU/demo_lr_neighbours.md, and the CPU it names is the one they ran on."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "CPU"


def demo_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## What the demo does")
    return text[start:text.index("\n## ", start + 1)]


def test_the_readme_table_is_the_recorded_demo_table():
    record = json.loads((RESULTS / "demo_numerics.json").read_text())
    assert all(v["same_table"] for v in record["vs_reference"].values()), record["vs_reference"]
    assert record["table"] in demo_section(), "README's demo table differs from demo_numerics.json: rerun and paste"
    assert "mean±std over 5 seeds" in record["table"]


def test_the_readme_lr_neighbours_are_the_recorded_ones():
    table = (RESULTS / "demo_lr_neighbours.md").read_text().strip()
    assert table in demo_section()


def test_the_readme_names_the_cpu_the_records_ran_on():
    record = json.loads((RESULTS / "demo_numerics.json").read_text())
    cpu = record["provenance"]["host"]["cpu"]
    section = " ".join(demo_section().split())
    assert f"family {cpu['family']} model {cpu['model']}" in section
    assert {h["processor"] for h in record["hosts"].values()} == {"AMD EPYC"} and "AMD EPYC" in section

"""The committed plan-vs-trace record (benchmarks/results/CPU/plan_vs_trace.json) measures the code it claims to:
no commit after the one it names changes mu_fast/memory or mu_fast/edit, and the README quotes its numbers.

Regenerate with ``python benchmarks/plan_vs_trace.py`` after committing the code, then commit the JSON (and the
README numbers the script prints). Skipped where git history is unavailable (no git, or a shallow clone that lacks
the recorded commit)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.plan_vs_trace import MEASURED, readme_summary

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "CPU" / "plan_vs_trace.json"
REGENERATE = "regenerate it: python benchmarks/plan_vs_trace.py (about 30 min), then commit the JSON and the README numbers"


def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


def record() -> dict:
    return json.loads(RECORD.read_text())


def test_the_record_is_newer_than_the_code_it_measures():
    if shutil.which("git") is None or git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("no git history here")
    data = record()
    commit = data["commit"]
    assert not data.get("dirty"), f"{RECORD.name} was written with uncommitted changes in {data['dirty']}; {REGENERATE}"
    if git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        if git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
            pytest.skip(f"shallow clone: the recorded commit {commit} is not fetched")
        pytest.fail(f"{RECORD.name} names commit {commit}, which is not in this repository's history; {REGENERATE}")
    changed = git("log", "--format=%h %s", f"{commit}..HEAD", "--", *MEASURED)
    assert changed.returncode == 0, changed.stderr
    if changed.stdout.strip():
        pytest.fail(f"{RECORD.name} measured commit {commit}, but later commits change {', '.join(MEASURED)}:\n"
                    f"{changed.stdout}{REGENERATE}", pytrace=False)


def test_the_readme_quotes_the_record():
    summary = readme_summary(record()["rows"])
    readme = " ".join((ROOT / "README.md").read_text().split())
    if summary not in readme:
        pytest.fail(f"the README should say: {summary!r} ({REGENERATE})", pytrace=False)
    assert re.search(r"plan / trace = \d", readme)


def test_every_recorded_row_reserves_enough():
    """The committed 7-9B record itself: the plan's tensor bytes within ±10% of the trace, and its reserved bytes at
    least what the trace's allocation sequence reserves in the caching-allocator model."""
    rows = [r for r in record()["rows"] if "error" not in r]
    assert rows
    for r in rows:
        name = f"{r['model']} {r['mask']} {r['frozen']}"
        assert abs(r["ratio"] - 1) <= 0.10, f"{name}: plan / trace = {r['ratio']:.3f}"
        assert r.get("reserved_ratio", 0) >= 1, f"{name}: plan reserved / allocator model = {r.get('reserved_ratio')}"

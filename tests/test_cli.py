"""The command line: `mu-fast demo` runs the whole job on the (CI) organism and writes its report."""

import json

from typer.testing import CliRunner

from mu_fast.cli import app


def test_demo_runs_the_job_and_writes_the_report(ci_organism, cache_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))  # the CLI finds the session's trained CI organism
    out = tmp_path / "report"
    args = ["demo", "--preset", "ci", "--forget-split", "first_16_unsplit", "--methods", "flu,atp", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "organism ready" in result.output and "(before edit)" in result.output
    for name in ("results.json", "flu.json", "atp.json", "probe_accuracy.png", "localization_map.png", "robustness.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["flu", "atp"]
    before = results["before"]["normal"]["forget"]["acc"]
    for method, record in results["methods"].items():
        summary = record["summary"]
        assert summary["trainable_params"] > 0
        # the edit moved the forget facts (the CI organism knows them: accuracy > 0.9 before)
        assert before > 0.9 and summary["forget_err"] > 0.3, (method, summary)
        assert 0.0 <= summary["relearn_acc"] <= 1.0 and "probe_true_acc" in summary
    assert record["edit"]["config"]["steps"] == 100  # the organism's group settings, not EditConfig defaults

    # A second run with the same settings reuses every method's result: the per-method files are not rewritten.
    stamps = {m: (out / f"{m}.json").stat().st_mtime_ns for m in ("flu", "atp")}
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert {m: (out / f"{m}.json").stat().st_mtime_ns for m in ("flu", "atp")} == stamps
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]


def test_demo_rejects_an_unknown_preset(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--preset", "huge", "--out", str(tmp_path)])
    assert result.exit_code != 0 and "unknown preset" in result.output

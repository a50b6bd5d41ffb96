"""What commands print and pass on, on the CI organism: `evaluate --relearn --probes` prints both results and the
column legend (without --out they would be lost), `localize --seed` seeds the localization, and `report` prints
its column legend."""

from __future__ import annotations

import pytest

from tests.test_cli import run_main


@pytest.fixture
def cli_env(cache_root, monkeypatch):
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))  # the session's trained CI organism
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)


def test_evaluate_prints_the_relearning_and_probe_results(ci_organism, cli_env, capsys):
    code, out, err = run_main(["evaluate", "organism:ci", "--relearn", "--relearn-steps", "2",
                               "--relearn-lora-rank", "4", "--probes", "--probe-steps", "20"], capsys)
    assert code == 0, err
    text = " ".join(out.split())
    assert "relearning attack (LoRA rank 4, 2 steps on" in text, out
    assert "step 0 1 2" in text and "forget acc" in text and "maintain" in text, out
    assert "latent probes (" in text and "true answer best" in text and "quality" in text, out
    layers = ci_organism.model.config.num_hidden_layers
    assert "boundary " + " ".join(str(i) for i in range(layers + 1)) in text, out
    assert "Columns: acc:" in text and "relearned:" in text and "probe:" in text, out


def test_evaluate_without_relearn_or_probes_prints_only_the_formats(ci_organism, cli_env, capsys):
    code, out, err = run_main(["evaluate", "organism:ci"], capsys)
    assert code == 0, err
    assert "relearning attack" not in out and "latent probes" not in out and "Columns: acc:" in out


def test_localize_passes_its_seed_on(ci_organism, cli_env, capsys, monkeypatch, tmp_path):
    import mu_fast.localize

    seen = []

    class Stop(Exception):
        pass

    def fake_localize(*args, **kwargs):
        seen.append(kwargs.get("seed"))
        raise Stop

    monkeypatch.setattr(mu_fast.localize, "localize", fake_localize)
    for seed in ("3", None):
        with pytest.raises(Stop):
            from mu_fast.cli import main

            main(["localize", "organism:ci", "--method", "random", "--out", str(tmp_path / "m"),
                  *(["--seed", seed] if seed else [])])
    assert seen == [3, 0]


def test_report_prints_its_column_legend(tmp_path, capsys, monkeypatch):
    from mu_fast.sweep.report import COLUMN_LEGEND
    from mu_fast.sweep.store import Store
    from tests.test_report_plots import _records

    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    store = Store(tmp_path / "s.jsonl")
    for record in _records():
        store.append(record)
    code, out, err = run_main(["report", str(store.path), "--out", str(tmp_path / "r")], capsys)
    assert code == 0, err
    legend = "".join(out[out.index("Columns: "):].split())  # wrapped lines joined, spaces ignored
    for column, meaning in COLUMN_LEGEND.items():
        assert "".join(f"{column}: {meaning}".split()) in legend, column
    assert "forget err" in out.splitlines()[1]  # under the table

"""`mu-fast localize -> edit -> evaluate` on the organism and on a local checkpoint, `mu-fast run`, `mu-fast sweep`
(--dry-run and a real one) and `mu-fast report`: the same provenance block in every JSON written, masks that refuse
another model, and a flag for every EditConfig field and every relearning / probe setting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mu_fast.provenance import BLOCK_KEYS
from tests.test_cli import no_loading, run_main  # noqa: F401 (fixture)
from tests._tiny_task import word_checkpoint

REPO = Path(__file__).resolve().parents[1]


def assert_provenance(block, kind=None):
    """The provenance block (mu_fast.provenance.provenance_block) with its model identity."""
    assert set(BLOCK_KEYS) <= set(block), sorted(block)
    assert block["versions"]["torch"] and block["model"]["config_hash"] and block["host"]["pid"]
    if kind is not None:
        assert block["model"]["kind"] == kind, block["model"]


@pytest.fixture
def cli_env(cache_root, monkeypatch):
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))  # the session's trained CI organism
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)


SMALL_EDIT = ["--steps", "2", "--maintain-batch", "8", "--lm-batch", "2"]


def test_localize_edit_evaluate_the_organism(ci_organism, cli_env, tmp_path, capsys):
    mask = tmp_path / "flu"
    code, _, err = run_main(["localize", "organism:ci", "--method", "flu", "--out", str(mask)], capsys)
    assert code == 0, err
    meta = json.loads(mask.with_suffix(".json").read_text())["meta"]
    assert meta["model"]["config_hash"] and meta["model"]["name"] == "organism:ci"
    assert_provenance(meta["provenance"], "organism")

    delta = tmp_path / "delta"
    code, _, err = run_main(["edit", "organism:ci", "--mask", str(mask), "--out", str(delta), "--preset", "organism",
                             "--lr", "2e-2", *SMALL_EDIT], capsys)
    assert code == 0, err
    header = json.loads((delta / "delta.json").read_text())["provenance"]
    assert_provenance(header, "organism")
    # the preset's lookup-group settings under the flags given
    assert header["edit_config"]["lr"] == 2e-2 and header["edit_config"]["maintain_coef"] == 5.0
    assert header["preset"] == "organism" and header["method_group"] == "lookup"

    report = tmp_path / "eval.json"
    code, _, err = run_main(["evaluate", "organism:ci", "--delta", str(delta), "--out", str(report), "--relearn",
                             "--relearn-steps", "1", "--relearn-lora-rank", "4", "--relearn-batch-size", "4"], capsys)
    assert code == 0, err
    edited = json.loads(report.read_text())
    assert edited["relearn_settings"] == {"steps": 1, "lora_rank": 4, "batch_size": 4} and edited["relearn"]
    assert_provenance(edited["provenance"], "organism")

    # a whole edited organism saved as a model folder: evaluate knows its facts are the organism's
    saved = tmp_path / "edited"
    code, _, err = run_main(["edit", "organism:ci", "--mask", str(mask), "--out", str(saved), "--save-model",
                             "--lr", "2e-2", "--preset", "organism", *SMALL_EDIT], capsys)
    assert code == 0, err
    assert_provenance(json.loads((saved / "mu_fast_edit.json").read_text())["provenance"], "organism")
    report2 = tmp_path / "eval2.json"
    code, _, err = run_main(["evaluate", str(saved), "--out", str(report2)], capsys)
    assert code == 0, err
    again = json.loads(report2.read_text())
    assert_provenance(again["provenance"], "checkpoint")
    assert again["provenance"]["model"]["edited_from"] == "organism:ci"
    assert again["formats"]["normal"]["forget"]["n"] == edited["formats"]["normal"]["forget"]["n"] == 16
    # The edit moved the forget facts: both sides measured in this run (the edit's own before/after record), never
    # a fixed threshold a trained number could land on either side of on another CPU.
    # (the edit trained against bf16 frozen weights; evaluate applies its delta to the fp32 model)
    before, after = header["forget_acc"]["before"], header["forget_acc"]["after"]
    assert after < before and edited["formats"]["normal"]["forget"]["acc"] < before


def _sports_checkpoint(folder: Path, layers: int) -> Path:
    """A save_pretrained folder: a tiny random Llama with a word tokenizer of the sports prompts."""
    from mu_fast.data import load_sports_task

    return word_checkpoint(folder, [load_sports_task("first_16_unsplit")], layers)


def test_localize_edit_evaluate_a_local_checkpoint_and_masks_refuse_another_model(tmp_path, data_dir, capsys,
                                                                                   monkeypatch):
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    ckpt = _sports_checkpoint(tmp_path / "ckpt", layers=2)
    task = ["--dataset", "sports", "--allow-unknown-facts"]  # a random model knows no facts
    mask = tmp_path / "mask"
    code, _, err = run_main(["localize", str(ckpt), "--method", "all_mlps", "--dtype", "fp32", "--out", str(mask),
                             *task], capsys)
    assert code == 0, err
    meta = json.loads(mask.with_suffix(".json").read_text())["meta"]
    assert meta["model"]["name"] == str(ckpt) and meta["model"]["path"] == str(ckpt.resolve())
    assert_provenance(meta["provenance"], "checkpoint")
    delta = tmp_path / "delta"
    code, _, err = run_main(["edit", str(ckpt), "--mask", str(mask), "--out", str(delta), "--dtype", "fp32",
                             "--lr", "1e-3", *SMALL_EDIT, *task], capsys)
    assert code == 0, err
    assert_provenance(json.loads((delta / "delta.json").read_text())["provenance"], "checkpoint")
    report = tmp_path / "eval.json"
    code, _, err = run_main(["evaluate", str(ckpt), "--delta", str(delta), "--dataset", "sports", "--dtype", "fp32",
                             "--out", str(report)], capsys)
    assert code == 0, err
    results = json.loads(report.read_text())
    assert_provenance(results["provenance"], "checkpoint")
    assert results["formats"]["normal"]["forget"]["n"] == 16

    # The same mask on another model (same names and shapes in layers 0-1, another config): one line, both named.
    other = _sports_checkpoint(tmp_path / "other", layers=3)
    code, _, err = run_main(["edit", str(other), "--mask", str(mask), "--out", str(tmp_path / "d2"), *SMALL_EDIT,
                             *task], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert str(ckpt) in err and str(other) in err and "localize" in err
    assert not (tmp_path / "d2").exists()


def test_run_compares_methods_on_the_organism(ci_organism, cli_env, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(["run", "organism:ci", "--methods", "flu,random", "--preset", "organism",
                                  *SMALL_EDIT, "--relearn-steps", "1", "--relearn-lora-rank", "4",
                                  "--relearn-batch-size", "4", "--probe-steps", "5", "--seeds", "0,1", "--out",
                                  str(out)], capsys)
    assert code == 0, err
    assert "(before edit)" in stdout and "mean±std over 2 seeds" in stdout and "selections over 2 seeds" in stdout
    for name in ("results.json", "runs.jsonl", "probe_accuracy.png", "localization_map.png", "robustness.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert_provenance(results["provenance"], "organism")
    assert results["provenance"]["organism"]["config_hash"] == ci_organism.config.config_hash()
    # the organism preset's per-group lr (the lr rule's choice for the group's representative) under --steps 2
    from mu_fast.organism.lr_choice import organism_groups

    groups = organism_groups()
    configs = {m: r["edit"]["config"] for m, r in results["methods"].items()}
    assert configs["flu"]["lr"] == groups["lookup"]["lr"] and configs["random"]["lr"] == groups["tracing"]["lr"]
    assert configs["flu"]["steps"] == configs["random"]["steps"] == 2
    for method in ("flu", "random"):
        assert set(results["methods"][method]["runs"]) == {"0", "1"}
        records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]  # the sweep store
        record = next(r for r in records if r["config"]["method"] == method and r["config"]["seed"] == 1)
        assert record["config"]["model"]["ref"] == "organism:ci" and record["config"]["task"]["dataset"] == "organism"
        assert_provenance(record["provenance"], "organism")
        assert record["edit"]["config"]["seed"] == 1
        assert "relearn_acc" in record["metrics"] and "probe_true_acc" in record["metrics"]


def test_sweep_dry_run_prints_the_runs_and_estimates(tmp_path, capsys, no_loading):
    import mu_fast.sweep as sweep

    store = tmp_path / "ci.jsonl"
    code, stdout, err = run_main(["sweep", str(REPO / "specs" / "ci_organism.yaml"), "--dry-run", "--out", str(store)],
                                 capsys)
    assert code == 0, err
    runs = sweep.expand(REPO / "specs" / "ci_organism.yaml")
    assert f"{len(runs)} runs, 0 already stored" in stdout and "estimated" in stdout and "peak memory" in stdout
    assert all(r.run_id in stdout for r in runs)
    assert not store.exists()
    # spec variables from the command line: the paper's Table 1 grid on another model
    code, stdout, err = run_main(["sweep", str(REPO / "specs" / "paper_table1_sports.yaml"), "--dry-run", "--var",
                                  "model=meta-llama/Meta-Llama-3-8B", "--var", "paper_model=llama-3-8b", "--out",
                                  str(tmp_path / "t1.jsonl")], capsys)
    assert code == 0, err
    assert "meta-llama/Meta-Llama-3-8B" in stdout and "google/gemma-2-9b" not in stdout


def test_sweep_then_report_prints_the_papers_table(ci_organism, cli_env, tmp_path, capsys):
    import yaml

    spec = {"name": "tiny", "models": ["organism:ci"],
            "tasks": [{"dataset": "organism", "forget_splits": ["first_16_unsplit"]}], "methods": ["flu", "random"],
            "edit": {"preset": "organism", "steps": 2, "maintain_batch": 8, "lm_batch": 2}, "seeds": [0, 1],
            "evaluations": {"formats": ["normal", "qa", "mcq"], "batch_size": 128,
                            "relearn": {"steps": 1, "lora_rank": 4, "batch_size": 4}, "probes": {"steps": 5}}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    store = tmp_path / "tiny.jsonl"
    code, stdout, err = run_main(["sweep", str(path), "--out", str(store), "--threads", "1"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in store.read_text().splitlines()]
    assert len(records) == 4 and {r["status"] for r in records} == {"ok"}
    for record in records:
        assert_provenance(record["provenance"], "organism")

    code, stdout, err = run_main(["report", str(tmp_path), "--out", str(tmp_path / "rep")], capsys)
    assert code == 0, err
    for column in ("forget err", "maintain", "Q/A err", "MCQ err", "relearned", "probe"):
        assert column in stdout, column
    assert "(before edit)" in stdout and "±" in stdout  # mean ± std over the 2 seeds
    assert (tmp_path / "rep" / "table.txt").read_text().strip() in stdout
    assert len(list((tmp_path / "rep").glob("*.png"))) == 3


def _options(command: str) -> set[str]:
    import typer.main

    from mu_fast.cli import app

    cmd = typer.main.get_command(app).commands[command]
    return {opt for p in cmd.params for opt in p.opts}


@pytest.mark.parametrize("command", ["run", "edit", "demo"])
def test_every_edit_config_field_has_a_flag(command):
    from mu_fast.edit.loop import EditConfig

    flags = _options(command)
    missing = ["--" + f.name.replace("_", "-") for f in dataclasses.fields(EditConfig)
               if "--" + f.name.replace("_", "-") not in flags]
    assert not missing, missing


@pytest.mark.parametrize("command", ["run", "evaluate", "demo"])
def test_every_relearn_and_probe_setting_has_a_flag(command):
    from mu_fast.sweep.evaluations import PROBE_DEFAULTS, RELEARN_DEFAULTS

    flags = _options(command)
    wanted = [f"--relearn-{k.replace('_', '-')}" for k in RELEARN_DEFAULTS]
    wanted += [f"--probe-{k.replace('_', '-')}" for k in PROBE_DEFAULTS]
    assert not [w for w in wanted if w not in flags]


RUN_ERRORS = {
    "negative lr": (["run", "organism:ci", "--lr", "-1"], "--lr must be"),
    "bad betas": (["run", "organism:ci", "--betas", "0.9"], "--betas '0.9'"),
    "unknown preset": (["run", "organism:ci", "--preset", "paper_sports:gemma-7b:forget_99"], "--preset: no preset"),
    "unknown method": (["run", "organism:ci", "--methods", "flu,magic"], "--methods entry 'magic'"),
    "relearn flag without relearn": (["run", "organism:ci", "--no-relearn", "--relearn-steps", "3"], "--relearn-steps"),
    "bad probe steps": (["run", "organism:ci", "--probe-steps", "0"], "--probe-steps must be"),
    "demo bad maintain batch": (["demo", "--maintain-batch", "0", "--out", "{tmp}/d"], "--maintain-batch must be"),
    "sweep missing spec": (["sweep", "{tmp}/none.yaml"], "SPEC"),
    "sweep bad executor": (["sweep", "specs/ci_organism.yaml", "--executor", "slurm"], "--executor 'slurm'"),
    "ray address without ray": (["sweep", "specs/ci_organism.yaml", "--ray-address", "auto"], "--executor ray"),
    "report of nothing": (["report", "{tmp}/none.jsonl"], "RESULTS"),
    "sweep var without value": (["sweep", "specs/ci_organism.yaml", "--var", "model"], "--var 'model'"),
}


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_run_sweep_report_errors_are_one_line_before_loading(case, tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.chdir(REPO)
    args, expected = RUN_ERRORS[case]
    code, _, err = run_main([a.replace("{tmp}", str(tmp_path)) for a in args], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("preset", [None, "default"])
def test_run_defaults_to_the_organism_preset_and_warns_about_edits_that_did_nothing(preset, ci_organism, cli_env,
                                                                                  tmp_path, capsys, monkeypatch):
    """Without --preset, `run` on the organism takes the organism preset (per-group lr, the organism's relearning
    attack); an explicit --preset wins. Methods whose forget accuracy stayed within 0.02 of before the edit are named
    in one closing warning with their lr and the preset (the results are made up here: no training)."""
    import mu_fast.cli.run
    from mu_fast.organism.lr_choice import organism_groups

    seen = {}

    def fake_report_run(model, tokenizer, task, methods, configs, options, *args, **kwargs):
        seen.update(configs=configs, options=options)
        return {"before": {"normal": {"forget": {"acc": 0.95}}},
                "summary": {"flu": {"forget_err": 0.06}, "atp": {"forget_err": 0.90}}}

    monkeypatch.setattr(mu_fast.cli.run, "report_run", fake_report_run)
    args = ["run", "organism:ci", "--methods", "flu,atp", "--out", str(tmp_path / "run")]
    code, _, err = run_main(args + (["--preset", preset] if preset else []), capsys)
    assert code == 0, err
    groups = organism_groups()
    lrs = ({"flu": groups["lookup"]["lr"], "atp": groups["tracing"]["lr"]} if preset is None
           else {"flu": 1e-5, "atp": 1e-5})
    assert {m: c.lr for m, c in seen["configs"].items()} == lrs
    assert seen["options"].relearn_lr == (1e-3 if preset is None else 2e-4)
    last = err.strip().splitlines()[-1]
    assert last.startswith("mu-fast: warning: the edit of flu left forget accuracy within 0.02 of before the edit"), err
    assert f"lr {lrs['flu']:g}, preset {preset or 'organism'})" in last and "atp" not in last
    assert ("--preset organism" in last) == (preset == "default")

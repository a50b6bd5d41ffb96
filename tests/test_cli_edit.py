"""`mu-fast edit` loads through load_for_edit (frozen bf16 / int8 / nf4), saves a delta, and `mu-fast evaluate
--delta` applies it to the bf16 model and says in which precision every number was measured."""

import json

import pytest

from mu_fast.cli import main
from tests.test_cli import no_loading, run_main  # noqa: F401 (fixture)


@pytest.fixture
def organism_mask(ci_organism, tmp_path):
    from mu_fast.masks import Mask
    from mu_fast.models.sites import Component, SiteTable

    table = SiteTable(ci_organism.model)
    path = tmp_path / "mask"
    Mask.from_components(table, [Component("mlp", 1)], meta={"method": "manual"}).save(path)
    return path


@pytest.mark.parametrize("frozen", ["int8"])
def test_edit_saves_a_delta_that_evaluate_applies_to_full_precision(frozen, ci_organism, cache_root, organism_mask, tmp_path,
                                                         monkeypatch, capsys):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    out = tmp_path / "delta"
    code, stdout, err = run_main(["edit", "organism:ci", "--mask", str(organism_mask), "--out", str(out),
                                  "--frozen", frozen, "--steps", "2", "--lr", "1e-2", "--micro-batch", "32"], capsys)
    assert code == 0, err
    assert f"trained against {frozen} frozen weights" in " ".join(stdout.split())
    header = json.loads((out / "delta.json").read_text())
    provenance = header["provenance"]
    assert provenance["trained_frozen"] == frozen and len(provenance["edit_history"]) == 2
    assert provenance["edit_config"]["micro_batch"] == 32 and set(header["params"]) == {
        n for n in json.loads((tmp_path / "mask.json").read_text())["counts"]}

    report = tmp_path / "eval.json"
    code, stdout, err = run_main(["evaluate", "organism:ci", "--delta", str(out), "--out", str(report)], capsys)
    assert code == 0, err
    results = json.loads(report.read_text())
    # The organism's full precision is fp32 (a 7-9B checkpoint's would be bf16): the numbers say so.
    assert results["precision"] == {"weights": "fp32", "edit_trained_frozen": frozen}
    assert results["delta"]["trained_frozen"] == frozen
    assert f"measured on fp32 weights; the delta was trained against {frozen}" in " ".join(stdout.split())
    # The delta moved the forget facts (2 steps at a high lr on the trained MLP).
    from mu_fast.evaluate import evaluate_task
    from mu_fast.organism import organism_task

    task = organism_task(ci_organism.facts, "first_16_unsplit", tokenizer=ci_organism.tokenizer)
    before = evaluate_task(ci_organism.model, ci_organism.tokenizer, task, formats=["normal"])
    assert results["formats"]["normal"]["forget"]["acc"] < before["normal"]["forget"]["acc"] - 0.01


EDIT_ERRORS = {
    "save-model with nf4": (["--frozen", "nf4", "--save-model"], "--save-model needs --frozen bf16"),
    "bad frozen": (["--frozen", "fp8"], "--frozen 'fp8'"),
    "bad max-memory": (["--max-memory", "0:22GiB"], "--max-memory '0:22GiB'"),
    "bad state bits": (["--state-bits", "16"], "--state-bits '16'"),
    "state bits with torch": (["--state-bits", "8", "--optimizer", "torch"], "--state-bits is a MaskedAdamW setting"),
    "bad micro batch": (["--micro-batch", "0"], "--micro-batch must be a positive integer"),
    "offload dir is a file": (["--offload-dir", "{tmp}/m.safetensors"], "--offload-dir "),
    "budget with micro batch": (["--budget", "24GB", "--micro-batch", "8"], "--budget chooses the memory settings"),
}


@pytest.mark.parametrize("case", list(EDIT_ERRORS))
def test_edit_options_are_checked_before_loading(case, tmp_path, capsys, no_loading, monkeypatch):
    import mu_fast.models.edit_loading

    monkeypatch.setattr(mu_fast.models.edit_loading, "load_for_edit",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded before checking")))
    extra, expected = EDIT_ERRORS[case]
    (tmp_path / "m.safetensors").write_bytes(b"")
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, err = run_main(["edit", "organism", "--mask", str(tmp_path / "m"), "--out", str(tmp_path / "d"), *extra],
                            capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_evaluate_refuses_a_folder_that_is_not_a_delta(tmp_path, capsys, no_loading):
    code, _, err = run_main(["evaluate", "organism", "--delta", str(tmp_path)], capsys)
    assert code == 2 and "holds no delta.json" in err


def _edit(args, organism_mask, tmp_path, capsys, name="delta"):
    out = tmp_path / name
    code, stdout, err = run_main(["edit", "organism:ci", "--mask", str(organism_mask), "--out", str(out), *args], capsys)
    assert code == 0, err
    return " ".join(stdout.split()), err, json.loads((out / "delta.json").read_text())["provenance"]


@pytest.fixture
def cli_env(cache_root, monkeypatch):
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))  # the session's trained CI organism
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)


def test_an_edit_that_leaves_forget_accuracy_where_it_was_ends_with_a_warning(ci_organism, cli_env, organism_mask,
                                                                              tmp_path, capsys):
    """An lr of 1e-9 cannot move anything: the edit prints the settings it used, then one warning line naming the lr,
    the preset and the fixes (on the organism under another preset: --preset organism)."""
    stdout, err, provenance = _edit(["--preset", "default", "--lr", "1e-9", "--steps", "2"], organism_mask, tmp_path,
                                    capsys)
    assert ("edit settings: preset default (lookup group), lr 1e-09, 2 steps, coefficients forget 1 / maintain 1 / "
            "lm 1, batches maintain 64 / lm 64, optimizer auto, frozen bf16") in stdout
    acc = provenance["forget_acc"]
    assert abs(acc["after"] - acc["before"]) < 1e-3 and acc["before"] > 0.5
    last = err.strip().splitlines()[-1]
    assert last.startswith("mu-fast: warning: the edit left forget accuracy within 0.02 of before the edit"), err
    assert "lr 1e-09, preset default" in last and "--preset organism" in last and "--lr 1e-08" in last


def test_edit_defaults_to_the_organism_preset_on_the_organism_and_a_real_edit_does_not_warn(
        ci_organism, cli_env, organism_mask, tmp_path, capsys):
    from mu_fast.organism.lr_choice import organism_groups

    lookup = organism_groups()["lookup"]  # the mask's method, manual, is in the lookup group
    stdout, err, provenance = _edit([], organism_mask, tmp_path, capsys)
    assert provenance["preset"] == "organism" and provenance["method_group"] == "lookup"
    assert {k: provenance["edit_config"][k] for k in lookup} == lookup
    assert (f"edit settings: preset organism (lookup group), lr {lookup['lr']:g}, {lookup['steps']} steps, "
            f"coefficients forget {lookup['forget_coef']:g} / maintain {lookup['maintain_coef']:g} / lm 1") in stdout
    acc = provenance["forget_acc"]
    assert acc["after"] < acc["before"] - 0.1, acc  # the organism preset's 50 steps edit the facts
    assert "left forget accuracy" not in err, err


@pytest.mark.parametrize("model, preset", [("organism", "organism"), ("organism:ci", "organism"),
                                           ("google/gemma-2-9b", "default"), ("{tmp}/ckpt", "default"),
                                           ("{tmp}/saved", "organism"), ("{tmp}/saved_other", "default")])
def test_the_default_preset_is_organism_for_organism_models(model, preset, tmp_path):
    """edit and run default to the organism preset on the organism and on a model `edit --save-model` saved from it."""
    from mu_fast.cli.options import default_preset

    for name, load in (("ckpt", None), ("saved", {"model": "organism:ci", "source": "organism"}),
                       ("saved_other", {"model": "/data/llama", "source": "checkpoint"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        if load is not None:
            (tmp_path / name / "mu_fast_edit.json").write_text(json.dumps({"load": load}))
    assert default_preset(model.replace("{tmp}", str(tmp_path))) == preset

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

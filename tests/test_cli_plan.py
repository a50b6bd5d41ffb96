"""`mu-fast plan`: the memory plan of a 7-9B edit from the shipped config alone (no weights), and `edit --budget`."""

import re

import pytest

pytest.importorskip("mu_fast.memory")

from tests.test_cli import no_loading, run_main  # noqa: E402,F401 (fixture)


def peak_gb(stdout: str) -> float:
    match = re.search(r"estimated peak ([0-9.]+) GB of ([0-9.]+) GB", " ".join(stdout.split()))
    assert match, stdout[-2000:]
    return float(match[1])


@pytest.fixture
def no_weights(monkeypatch, no_loading):  # noqa: F811
    import transformers

    def forbidden(*args, **kwargs):
        raise AssertionError("plan loaded weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", forbidden)


@pytest.mark.parametrize("frozen, budget", [("bf16", 24), ("nf4", 12)])
def test_gemma2_9b_flu_edit_fits_the_issue_budgets(frozen, budget, capsys, no_weights, data_dir):
    code, out, err = run_main(["plan", "gemma-2-9b", "--mask", "paper:flu", "--budget", f"{budget}GB",
                               "--frozen", frozen], capsys)
    assert code == 0, err
    assert peak_gb(out) <= budget and f"frozen={frozen}" in " ".join(out.split())


def test_nothing_fits_is_one_line_naming_the_options(capsys, no_weights, data_dir):
    code, _, err = run_main(["plan", "gemma-2-9b", "--mask", "paper:flu", "--budget", "4GB", "--frozen", "bf16"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "raise --budget to" in err and "--frozen nf4" in err and "frozen=nf4" not in err


@pytest.mark.parametrize("args, expected", [
    (["gemma-2-9b", "--mask", "paper:magic", "--budget", "24GB"], "--mask paper:<method> 'magic'"),
    (["mistral-7b", "--mask", "paper:flu", "--budget", "24GB"], "the paper localized only"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "24 parsecs"], "--budget: cannot read budget"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "24GB", "--batch", "forget=x"], "--batch 'forget=x'"),
    (["gemma-2-9b", "--mask", "no/such/mask", "--budget", "24GB"], "--mask 'no/such/mask'"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "24GB", "--frozen", "fp4"], "--frozen 'fp4'"),
])
def test_plan_errors(args, expected, capsys, no_weights, data_dir):
    code, _, err = run_main(["plan", *args], capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_random_mask_at_the_paper_budget_and_a_checkpoint_config(capsys, no_weights, data_dir, tmp_path):
    from mu_fast.models.shipped import shipped_config

    shipped_config("llama-3-8b").save_pretrained(tmp_path)  # a checkpoint folder: only config.json is read
    code, out, err = run_main(["plan", str(tmp_path), "--mask", "paper:random", "--budget", "80GB",
                               "--batch", "forget=16,maintain=16,lm=16,lm_tokens=50"], capsys)
    assert code == 0, err
    assert "paper:random" in out and peak_gb(out) <= 80


def test_edit_budget_applies_the_plan(ci_organism, cache_root, monkeypatch, tmp_path):
    from mu_fast.cli_plan import planned_edit
    from mu_fast.edit import EditConfig
    from mu_fast.masks import Mask
    from mu_fast.models.sites import Component, SiteTable
    from mu_fast.preflight import ModelRef

    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))
    mask = Mask.from_components(SiteTable(ci_organism.model), [Component("mlp", 1)])
    base = EditConfig(steps=3)
    config, frozen = planned_edit(ModelRef("organism", "ci"), mask, base, "auto", "1GB")
    assert frozen == "bf16" and config.steps == 3  # a tiny model fits; the edit settings are kept
    with pytest.raises(ValueError, match="raise --budget"):
        planned_edit(ModelRef("organism", "ci"), mask, base, "auto", "100MB")

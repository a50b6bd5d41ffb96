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
    (["mistral-7b", "--mask", "paper:flu", "--budget", "24GB"], "the paper localized only gemma-7b, gemma-2-9b, llama-3-8b; for MODEL 'mistral-7b' give --components"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "24 parsecs"], "--budget 24 parsecs: cannot read it"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "24"], "--budget 24: give a unit, e.g. 24GB"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "0.5"], "--budget 0.5: give a unit, e.g. 0.5GB"),
    (["qwen2-7b", "--components", "m2,m40", "--budget", "24GB"], "--components 'm40': layer 40 out of range"),
    (["qwen2-7b", "--components", "x2", "--budget", "24GB"], "--components 'x2': cannot parse component"),
    (["qwen2-7b", "--components", " , ", "--budget", "24GB"], "--components is empty"),
    (["qwen2-7b", "--budget", "24GB"], "give the edit as --mask (a saved mask or paper:<method>) or as --components"),
    (["gemma-2-9b", "--mask", "paper:flu", "--components", "m2", "--budget", "24GB"], "or as --components (e.g. m2,m3,m4), not both"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "24GB", "--batch", "forget=x"], "--batch 'forget=x'"),
    (["gemma-2-9b", "--mask", "no/such/mask", "--budget", "24GB"], "--mask 'no/such/mask'"),
    (["gemma-2-9b", "--mask", "paper:flu", "--budget", "24GB", "--frozen", "fp4"], "--frozen 'fp4'"),
    (["llama-3-8b", "--components", "m1", "--budget", "24GB", "--configs", "0"], "--configs 0: give a positive number"),
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
    from mu_fast.cli.plan import planned_edit
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


@pytest.mark.parametrize("model, components", [("mistral-7b", "m2,m3,m4"), ("qwen2-7b", "m2,m3,m4"),
                                               ("random:qwen2-7b", "a3.5, m2.17, a4.q")])
def test_components_plan_any_shipped_config(model, components, capsys, no_weights, data_dir):
    code, out, err = run_main(["plan", model, "--components", components, "--budget", "24GB"], capsys)
    assert code == 0, err
    assert f"components {components}" in out and peak_gb(out) <= 24


def test_the_plan_names_the_lm_head_chunk_and_the_unit_of_its_time_column(capsys, no_weights, data_dir):
    code, out, err = run_main(["plan", "gemma-2-9b", "--mask", "paper:flu", "--budget", "24GB", "--frozen", "bf16"],
                              capsys)
    text = " ".join(out.split())
    assert code == 0, err
    assert re.search(r"LM head in chunks of \d+ positions \((chosen|automatic)", text), text[-1500:]
    assert "step time ×" in text and "× a plain step" in text and "time cost" not in text
    assert "allocator" in text  # the peak is reserved bytes: the caching allocator's share is a term of its own


def test_an_unknown_model_name_lists_the_shipped_configs_without_asking_the_hub(capsys, no_weights, monkeypatch):
    import mu_fast.preflight

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(mu_fast.preflight, "hub_reachable", no_hub)
    code, _, err = run_main(["plan", "gemma-3-9b", "--components", "m2", "--budget", "24GB"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "MODEL 'gemma-3-9b' is not a shipped config (llama-3-8b, gemma-7b, gemma-2-9b, mistral-7b, qwen2-7b)" in err


def test_a_mask_recorded_for_another_model_is_refused_as_edit_refuses_it(capsys, no_weights, tmp_path):
    """Llama-3-8B's and Mistral-7B's MLP matrices have the same names and shapes: only the recorded identity tells
    the mask's model apart, and `edit` refuses it (Mask.check_model); `plan` must too."""
    from mu_fast.masks import Mask
    from mu_fast.models.identity import config_hash
    from mu_fast.models.shipped import shipped_config
    from mu_fast.models.sites import Component, SiteTable

    llama = shipped_config("llama-3-8b")
    mask = Mask.from_components(SiteTable(llama), [Component("mlp", 2)])
    mask.set_model({"config_hash": config_hash(llama), "name": "llama-3-8b", "arch": "llama"})
    mask.save(tmp_path / "llama_m2")
    code, _, err = run_main(["plan", "mistral-7b", "--mask", str(tmp_path / "llama_m2"), "--budget", "24GB"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the mask was made for llama-3-8b" in err and "applied to mistral-7b" in err
    with pytest.raises(ValueError, match="the mask was made for llama-3-8b"):
        mask.check_model(shipped_config("mistral-7b"), "mistral-7b")  # the message `edit` gives, word for word
    code, out, err = run_main(["plan", "llama-3-8b", "--mask", str(tmp_path / "llama_m2"), "--budget", "24GB"], capsys)
    assert code == 0, err  # its own model plans


def test_edit_budget_needs_a_unit_before_anything_loads(no_loading):  # noqa: F811
    from mu_fast.cli.plan import planned_edit
    from mu_fast.edit import EditConfig
    from mu_fast.masks import Mask
    from mu_fast.preflight import ModelRef

    with pytest.raises(ValueError, match="^--budget 24: give a unit, e.g. 24GB"):
        planned_edit(ModelRef("organism", "ci"), Mask(), EditConfig(), "auto", "24")


def test_configs_plans_a_batched_edit(capsys, no_weights, data_dir):
    """``--configs K``: how many configurations of the mask train together within the budget, and per pass."""
    from mu_fast.memory import plan_batch
    from mu_fast.memory.shapes import BatchShape
    from mu_fast.models.shipped import shipped_config

    code, out, err = run_main(["plan", "llama-3-8b", "--components", "m1,m2", "--budget", "80GB", "--configs", "16"],
                              capsys)
    assert code == 0, err
    from mu_fast.cli.plan import plan_mask

    config = shipped_config("llama-3-8b")
    expected = plan_batch(config, [plan_mask(None, config, "llama-3-8b", "m1,m2")] * 16, device_bytes="80GB",
                          batch=BatchShape())
    assert 1 <= expected.k < 16  # two whole MLP layers: 5.6 GB of state each
    assert f"{expected.k} configuration(s), {expected.groups_per_pass} per pass" in " ".join(out.split())

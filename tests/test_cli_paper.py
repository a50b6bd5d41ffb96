"""``mu-fast run MODEL --preset paper``: the dry run shows the authors' §3.4 settings per method (checked against
paper_protocol and the table parsed from reference/authors_repo.md), the paper model is found from a local folder's
config.json, flags that change the authors' settings warn (or are refused), a real tiny run goes through the sweep
engine to the report, and ``random_mlps`` on a paper model draws as many MLP layers as the paper's FLU layers."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from mu_fast.paper_protocol import METHODS, paper_protocol
from tests.test_cli import no_loading, run_main  # noqa: F401 (fixture)
from tests._tiny_task import word_checkpoint
from tests.test_cli_run import _sports_checkpoint
from tests.test_paper_protocol import authors_table

@pytest.fixture
def one_torch_thread():
    """As tests/sweep: on the shared 2-core machine one torch thread runs the tiny edits faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HUB_IDS = {"gemma-7b": "google/gemma-7b", "gemma-2-9b": "google/gemma-2-9b", "llama-3-8b": "meta-llama/Meta-Llama-3-8B"}
ROW = re.compile(r"^(\S+)\s+(lookup|tracing|broad)\s+lr=(\S+)\s+forget_coef=(\S+)\s+steps=(\d+)\s+8bit=(yes|no)", re.M)


def dry_run(model, capsys, tmp_path, *extra, experiment="forget_16", dataset="sports"):
    out = tmp_path / "out"
    code, stdout, err = run_main(["run", str(model), "--preset", "paper", "--dataset", dataset, "--experiment",
                                  experiment, "--dry-run", "--out", str(out), *extra], capsys)
    assert code == 0, err
    assert not out.exists()  # a dry run writes nothing
    rows = {m[1]: {"group": m[2], "lr": float(m[3]), "forget_coef": float(m[4]), "steps": int(m[5]),
                   "bits8": m[6] == "yes"} for m in ROW.finditer(stdout)}
    return stdout, rows


@pytest.mark.parametrize("model", list(HUB_IDS))
def test_dry_run_shows_the_authors_settings(model, data_dir, tmp_path, capsys, no_loading):
    stdout, rows = dry_run(HUB_IDS[model], capsys, tmp_path)
    assert set(rows) == set(METHODS)
    protocol = paper_protocol(model, "sports", "forget_16")
    table = next(r for r in authors_table() if (r["dataset"], r["model"], r["experiment"]) == ("sports", model, "forget_16"))
    for method, row in rows.items():
        edit = protocol["methods"][method]["edit"]
        assert (row["lr"], row["forget_coef"]) == table["methods"][method] == (edit["lr"], edit["forget_coef"])
        assert row["steps"] == table["steps"] and row["bits8"] == table["bits8"]
        assert row["group"] == protocol["methods"][method]["group"]
    flu = protocol["methods"]["paper:flu"]["localization"]
    assert f"mlp {flu['mlp']}" in stdout and f"as {model}," in stdout
    assert "warning" not in stdout
    assert f"{len(METHODS)} runs, 0 already stored" in stdout  # the sweep's own dry run of the expanded spec


@pytest.mark.parametrize("model, how", [("gemma-2-9b", "shapes"), ("llama-3-8b", "shapes"), ("llama-3-8b", "name")])
def test_paper_model_from_a_local_folder(model, how, data_dir, tmp_path, capsys, no_loading):
    from mu_fast.data.datadir import paper_model
    from mu_fast.models.shipped import shipped_config_dict

    folder = tmp_path / "my-checkpoint"  # a name that names no paper model
    folder.mkdir()
    config = shipped_config_dict(paper_model(model).shapes)
    if how == "name":  # a fine-tune of other shapes whose config names its base
        config = {"model_type": config["model_type"], "_name_or_path": HUB_IDS[model], "num_hidden_layers": 40}
    (folder / "config.json").write_text(json.dumps(config))
    stdout, rows = dry_run(folder, capsys, tmp_path)
    assert f"as {model}," in stdout and set(rows) == set(METHODS)
    assert rows["paper:flu"]["lr"] == paper_protocol(model, "sports", "forget_16")["methods"]["paper:flu"]["edit"]["lr"]


def test_not_a_paper_model_is_one_line(tmp_path, capsys, no_loading):
    from mu_fast.models.tiny import make_config

    folder = tmp_path / "tiny"
    make_config("llama", num_hidden_layers=5).save_pretrained(folder)
    for model in (str(folder), "mistralai/Mistral-7B-v0.1"):
        code, _, err = run_main(["run", model, "--preset", "paper", "--dataset", "sports", "--experiment", "forget_16",
                                 "--dry-run"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "cannot tell which paper model" in err and "--paper-model" in err and model in err
    # --paper-model names it
    stdout, rows = dry_run(folder, capsys, tmp_path, "--paper-model", "llama-3-8b")
    assert "as llama-3-8b," in stdout and set(rows) == set(METHODS)


def test_edit_flags_override_with_a_warning(data_dir, tmp_path, capsys, no_loading):
    stdout, rows = dry_run("google/gemma-7b", capsys, tmp_path, "--lr", "3e-4", "--methods", "paper:flu,random",
                           "--no-relearn", "--paper-evals", "capability", "--seeds", "0,1")
    assert set(rows) == {"paper:flu", "random"} and {r["lr"] for r in rows.values()} == {3e-4}
    authors = {r["forget_coef"] for r in rows.values()}
    assert authors == {paper_protocol("gemma-7b", "sports", "forget_16")["methods"][m]["edit"]["forget_coef"]
                       for m in rows}  # what was not overridden stays the authors'
    warnings = [line for line in stdout.splitlines() if line.startswith("warning:")]
    assert any("--lr 0.0003 replaces the authors' lr" in w for w in warnings)
    assert any("--no-relearn" in w for w in warnings) and any("softprompt" in w for w in warnings)
    assert "4 runs, 0 already stored" in stdout  # 2 methods x 2 seeds


PAPER_ERRORS = {
    "organism dataset": (["organism:ci", "--preset", "paper", "--experiment", "forget_16"], "--dataset sports or counterfact"),
    "no experiment": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports"], "--preset paper needs --experiment"),
    "wrong experiment": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports", "--experiment", "forget_64_sequential"],
                         "experiments are"),
    "forget split fixed": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports", "--experiment", "forget_16",
                            "--forget-split", "first_64_unsplit"], "--forget-split is set by --experiment"),
    "probe flag": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports", "--experiment", "forget_16",
                    "--probe-steps", "5"], "--probe-steps sets the standardised probes"),
    "bad seeds": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports", "--experiment", "forget_16",
                   "--seeds", "a,b"], "--seeds 'a,b'"),
    "not an authors' method": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports", "--experiment", "forget_16",
                                "--methods", "atp"], "--methods entry 'atp'"),
    "bad paper evals": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports", "--experiment", "forget_16",
                         "--paper-evals", "mmlu"], "--paper-evals 'mmlu'"),
    "bad paper model": (["google/gemma-7b", "--preset", "paper", "--dataset", "sports", "--experiment", "forget_16",
                         "--paper-model", "gpt-2"], "--paper-model 'gpt-2'"),
    "sequential with seeds": (["google/gemma-7b", "--preset", "paper", "--dataset", "counterfact", "--experiment",
                               "forget_64_sequential", "--seeds", "0,1"], "one seed per call"),
    "paper option without the preset": (["organism:ci", "--experiment", "forget_16"], "options of --preset paper"),
}


@pytest.mark.parametrize("case", list(PAPER_ERRORS))
def test_paper_errors_are_one_line_before_loading(case, data_dir, capsys, no_loading):
    args, expected = PAPER_ERRORS[case]
    code, _, err = run_main(["run", *args, "--dry-run"] if case != "paper option without the preset" else ["run", *args],
                            capsys)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err


def test_sequential_dry_run_lists_the_partitions(data_dir, tmp_path, capsys, no_loading):
    stdout, rows = dry_run("google/gemma-2-9b", capsys, tmp_path, dataset="counterfact",
                           experiment="forget_64_sequential")
    protocol = paper_protocol("gemma-2-9b", "counterfact", "forget_64_sequential")
    assert set(rows) == set(METHODS)  # the authors ran all 9 sequentially (results_rebuttal_counterfact/*_sequential)
    for method, row in rows.items():
        assert (row["lr"], row["forget_coef"], row["steps"]) == tuple(protocol["methods"][method]["edit"][k]
                                                                      for k in ("lr", "forget_coef", "steps"))
    for part in protocol["partitions"]:
        assert f"partition {part['range']}: FLU layers {part['flu_layers']}" in stdout
    assert "warning" not in stdout


def test_tiny_paper_run_end_to_end(data_dir, tmp_path, capsys, monkeypatch, one_torch_thread):
    """A 5-layer random Llama with a word tokenizer of the sports prompts stands in for Llama-3-8B (whose sports FLU
    layers are 1-4): paper:flu and random_mlps, 2 steps each, through the sweep engine to the table and plots."""
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    ckpt = _sports_checkpoint(tmp_path / "ckpt", layers=5)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"text {i} about the sport of basketball" for i in range(2048)))  # the LM loss's n
    out = tmp_path / "out"
    code, stdout, err = run_main(["run", str(ckpt), "--preset", "paper", "--paper-model", "llama-3-8b", "--dataset",
                                  "sports", "--experiment", "forget_16", "--methods", "paper:flu,random_mlps",
                                  "--steps", "2", "--maintain-batch", "8", "--lm-batch", "2", "--dtype", "fp32",
                                  "--no-relearn", "--no-probes", "--paper-evals", "none", "--lm-texts", str(texts),
                                  "--out", str(out)], capsys)
    assert code == 0, err
    store = out / "paper_sports_llama-3-8b_forget_16.jsonl"
    records = [json.loads(line) for line in store.read_text().splitlines()]
    assert {r["status"] for r in records} == {"ok"}, [r.get("error", {}).get("message") for r in records]
    by_method = {r["config"]["method"]: r for r in records}
    assert set(by_method) == {"paper:flu", "random_mlps"}
    flu_layers = paper_protocol("llama-3-8b", "sports", "forget_16")["flu_layers"]
    assert sorted(by_method["paper:flu"]["localization"]["components"]) == sorted(f"m{i}" for i in flu_layers)
    mlps = by_method["random_mlps"]["localization"]["components"]
    assert len(mlps) == len(flu_layers) and all(c.startswith("m") for c in mlps)  # the paper's FLU count, not ours
    for record in records:
        assert record["config"]["edit"]["steps"] == 2 and record["config"]["edit"]["lr"] == \
            paper_protocol("llama-3-8b", "sports", "forget_16")["methods"][record["config"]["method"]]["edit"]["lr"]
    assert (out / "report" / "table.txt").read_text().strip() in stdout
    assert len(list((out / "report").glob("*.png"))) == 3


class _Session(SimpleNamespace):
    """Just what ModelSession.localization reads."""


@pytest.mark.parametrize("paper", ["llama-3-8b", None])
def test_random_mlps_takes_the_paper_flu_layer_count(paper, data_dir):
    from mu_fast.localize.paper_graphs import paper_flu_layers
    from mu_fast.models.sites import SiteTable
    from mu_fast.models.tiny import make_tiny_model
    from mu_fast.sweep.session import ModelSession

    model = make_tiny_model("llama", num_hidden_layers=8)
    ref = {"ref": "/tmp/tiny", "kind": "checkpoint", "dtype": "fp32", **({"paper_model": paper} if paper else {})}
    our_flu = SimpleNamespace(layers=[0])  # what our own FLU run would have found
    session = ModelSession.__new__(ModelSession)
    session.__dict__.update(ref=ref, key=json.dumps(ref), model=model, tokenizer=None, table=SiteTable(model),
                            _localizations={}, _flu={})
    session.flu = lambda run, task: our_flu
    run = SimpleNamespace(method="random_mlps", budget=None, seed=0, task={"dataset": "sports",
                                                                          "forget_split": "first_16_unsplit"})
    loc, cached = session.localization(run, task=None)
    want = len(paper_flu_layers(paper, "sports")) if paper else len(our_flu.layers)
    assert not cached and len(loc.components) == want and {c.kind for c in loc.components} == {"mlp"}


def _small_sequential_tasks(monkeypatch):
    """The CLI path on less data: 16 maintain facts, the Normal format only (CPU time); returns the task builder."""
    import dataclasses

    import mu_fast.data

    full = mu_fast.data.counterfact_sequential_tasks

    def first(s, n=16):
        cut = {f.name: getattr(s, f.name)[:n] for f in dataclasses.fields(s)
               if isinstance(getattr(s, f.name), list) and f.name != "choices"}
        return dataclasses.replace(s, **cut)

    def small_tasks(**kwargs):
        return [dataclasses.replace(t, maintain_train=first(t.maintain_train), maintain_test=first(t.maintain_test),
                                    formats={"normal": {k: v if k == "forget" else first(v)
                                                        for k, v in t.formats["normal"].items()}})
                for t in full(**kwargs)]

    monkeypatch.setattr(mu_fast.data, "counterfact_sequential_tasks", small_tasks)
    return small_tasks


def _recording_evaluations(monkeypatch):
    """softprompt and capability replaced by recorders (their own tests cover them; here: that they run, when and on
    what), returning ``{name: [(n forget facts, weights fingerprint)]}``."""
    from mu_fast.sweep.evaluations import REGISTRY

    calls = {}

    def recorder(name):
        def fn(model, tokenizer, task, settings, seed):
            weights = sum(float(p.double().sum()) for p in model.parameters())
            calls.setdefault(name, []).append((len(task.forget_test), weights, dict(settings)))
            return {"metrics": {"softprompt_forget_acc": 0.25} if name == "softprompt" else {"capability_mmlu_acc": 0.5}}
        return fn

    for name in ("softprompt", "capability"):
        monkeypatch.setattr(REGISTRY[name], "fn", recorder(name))
    return calls


def test_tiny_sequential_counterfact_run(data_dir, tmp_path, capsys, monkeypatch, one_torch_thread):
    """A 20-layer random Llama stands in for Gemma-7B (whose CounterFact FLU layers all lie below 20): paper:flu and
    random_mlps edited over the 4 CounterFact partitions (2 steps each, each partition its own layers); then, as the
    authors' script after its last partition, the relearning attack, soft-prompt attack and lm-eval on all 64 facts;
    one JSON per method with the provenance block and the authors' lr."""
    small_tasks = _small_sequential_tasks(monkeypatch)
    calls = _recording_evaluations(monkeypatch)
    monkeypatch.delenv("MU_FAST_DEBUG", raising=False)
    ckpt = word_checkpoint(tmp_path / "ckpt", small_tasks(model="gemma-7b"), layers=20)
    out = tmp_path / "out"
    code, stdout, err = run_main(["run", str(ckpt), "--preset", "paper", "--paper-model", "gemma-7b", "--dataset",
                                  "counterfact", "--experiment", "forget_64_sequential", "--methods",
                                  "paper:flu,random_mlps", "--steps", "2", "--maintain-batch", "8", "--dtype", "fp32",
                                  "--lm-texts", "none", "--relearn-steps", "2", "--out", str(out)], capsys)
    assert code == 0, err
    protocol = paper_protocol("gemma-7b", "counterfact", "forget_64_sequential")
    from mu_fast.models.sites import Component, SiteTable
    from mu_fast.models.tiny import make_tiny_model

    mlp = SiteTable(make_tiny_model("llama", num_hidden_layers=20)).component_size(Component("mlp", 0))
    loaded = None
    for method in ("paper:flu", "random_mlps"):
        result = json.loads((out / f"{method.replace(':', '_')}.json").read_text())
        assert result["provenance"]["model"]["config_hash"] and result["provenance"]["versions"]["torch"]
        assert result["edit_config"]["lr"] == protocol["methods"][method]["edit"]["lr"]
        assert result["edit_config"]["steps"] == 2 and result["edit_config"]["lm_coef"] == 0.0
        elements = [p["trainable_elements"] for p in result["partitions"]]
        assert elements == [len(part["flu_layers"]) * mlp for part in protocol["partitions"]]  # per-partition count
        assert len(result["partitions"][-1]["eval"]["per_partition"]) == 4
        relearn = result["final_evaluations"]["relearn"]  # first 32 of the 64 facts relearned, last 32 held out
        assert (relearn["steps"], relearn["n_relearn"], relearn["n_held_out"]) == (2, 32, 32)
        assert sorted(relearn["evals"]) == ["0", "1", "2"] and relearn["scored_in_train_mode"] is True
        assert result["final_metrics"]["relearn_acc"] == relearn["final"]["normal"]["acc"]
        assert result["final_metrics"]["mmlu_acc"] == 0.5 and result["final_metrics"]["softprompt_forget_acc"] == 0.25
    for name in ("softprompt", "capability"):  # once per method, on all 64 facts, on the edited model
        assert [n for n, _, _ in calls[name]] == [64, 64]
    assert calls["capability"][0][2]["add_bos"] == "paper"
    assert calls["softprompt"][0][1] == calls["capability"][0][1]  # both on the same (edited) weights
    assert calls["softprompt"][0][1] != calls["softprompt"][1][1]  # each method's own edit (restored in between)
    assert "paper:flu" in stdout and "forget acc per partition" in stdout and "relearned" in stdout
    assert "warning: --relearn-steps 2 replaces the authors' relearning steps (20)" in stdout


def test_tiny_sequential_evaluations_turn_off(data_dir, tmp_path, capsys, monkeypatch, one_torch_thread):
    """--no-relearn and --paper-evals none: the sequential run edits and runs none of the final evaluations."""
    small_tasks = _small_sequential_tasks(monkeypatch)
    calls = _recording_evaluations(monkeypatch)
    ckpt = word_checkpoint(tmp_path / "ckpt", small_tasks(model="gemma-7b"), layers=20)
    out = tmp_path / "out"
    code, stdout, err = run_main(["run", str(ckpt), "--preset", "paper", "--paper-model", "gemma-7b", "--dataset",
                                  "counterfact", "--experiment", "forget_64_sequential", "--methods", "all_mlps",
                                  "--steps", "1", "--maintain-batch", "8", "--dtype", "fp32", "--lm-texts", "none",
                                  "--no-relearn", "--paper-evals", "none", "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads((out / "all_mlps.json").read_text())
    assert result["final_evaluations"] == {} and not calls
    assert "warning: --no-relearn drops the relearning attack" in stdout
    assert "evaluations after the last partition, on all 64 facts: formats all\n" in stdout

"""The authors' full protocol for one paper model, dataset and experiment, as plain dicts (``--preset paper``).

``paper_protocol(model_key, dataset, experiment)`` gathers what reference/authors_repo.md and the committed data say
the authors ran, reusing the modules that already hold each part:

* localization per method: the paper's own selections (``paper:<flu|ap|ct|ap_mlps|ct_mlps>``,
  ``mu_fast.localize.paper_graphs.paper_localization`` over the graphs in shared/data) and the baselines
  (``random`` at the paper's budget, ``random_mlps``, ``all_mlps``, ``nonlocalized``);
* edit settings per method group: the §3.4 table (``mu_fast.sweep.presets``, ``paper_<sports|cf>:<model>:<exp>``);
* FLU layers: ``paper_flu_layers`` (sports: fixed per model; CounterFact: the manual-layers file of the range);
* evaluations as the authors: every format (the deep evals' Normal / MCQ / paraphrase / neighbourhood), the
  relearning attack with its defaults (LoRA 512, 20 steps, lr 2e-4) scored as theirs (LoRA dropout live after step
  0), the soft-prompt attack on the authors' schedule, lm-eval ``mmlu`` + ``sciq`` zero-shot encoded as their lm-eval
  0.4.4 (BOS for Gemma only), and (sports athlete editing only) latent probes as the authors. One deliberate
  difference: CounterFact relearns toward the true answer (theirs toward ``target_false``, a bug;
  ``cf_target_false_bug=True`` gives theirs);
* ``spec``: a sweep spec (``mu_fast.sweep.run(spec)``) that runs all of it, ``None`` for the sequential CounterFact
  experiment, whose spec is ``paper_sequential_spec(protocol)`` (``kind: sequential``): each of the 9 methods edits
  the 4 partitions in turn (``mu_fast.edit.sequential.sequential_steps`` over ``paper_sequential_masks``), then the
  same evaluations run once on all 64 facts, as the authors' script did after its last partition (``mu-fast run
  --preset paper`` does all of it).

Differences that remain are listed in docs/protocol_differences.md.
"""

from __future__ import annotations

from typing import Any

from mu_fast.data.datadir import paper_model

DATASETS = {"sports": "sports", "counterfact": "cf", "cf": "cf"}
EXPERIMENTS = {"sports": ("forget_16", "forget_64", "sport_golf"),
               "cf": ("forget_16", "forget_64", "forget_64_sequential")}
PAPER_SELECTIONS = ("flu", "ap", "ct", "ap_mlps", "ct_mlps")
BASELINES = ("random", "random_mlps", "all_mlps", "nonlocalized")
SPORTS = ("baseball", "basketball", "football")
CF_PARTITIONS = ("0_16", "16_32", "32_48", "48_64")
# The authors' methods (§3.4 columns) in the sweep's names: paper selections first, then the baselines.
METHODS = tuple(f"paper:{m}" for m in PAPER_SELECTIONS) + BASELINES


def _check(model_key: str, dataset: str, experiment: str) -> tuple[str, str, str]:
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r}; the paper's protocol covers 'sports' and 'counterfact'")
    kind = DATASETS[dataset]
    if experiment not in EXPERIMENTS[kind]:
        raise ValueError(f"experiment={experiment!r}; the paper's {dataset} experiments are {EXPERIMENTS[kind]}")
    return paper_model(model_key).key, kind, experiment


def _tasks(kind: str, experiment: str, model: str, lm_texts: str | None) -> list[dict[str, Any]]:
    """The sweep task entries of the experiment (authors_repo.md §1)."""
    if kind == "cf":
        size = experiment.split("_")[1]
        return [{"dataset": "counterfact", "forget_splits": [f"first_{size}_unsplit"], "inject_labels": ["target_false"],
                 "maintain_split": "split", "cf_model": model, "lm_texts": lm_texts}]
    if experiment == "sport_golf":  # Full-Sports-Editing: every athlete of a sport to golf, trained on half
        return [{"dataset": "sports", "forget_splits": [f"{s}_split" for s in SPORTS], "inject_labels": ["golf"],
                 "maintain_split": "split", "lm_texts": lm_texts}]
    size = experiment.split("_")[1]
    return [{"dataset": "sports", "forget_splits": [f"first_{size}_unsplit"], "inject_labels": ["random_without_golf"],
             "maintain_split": "split", "lm_texts": lm_texts}]


def _localizations(model: str, dataset: str, forget_range: str) -> dict[str, dict[str, Any]]:
    from mu_fast.localize.paper_graphs import describe_localization, paper_localization

    return {f"paper:{m}": describe_localization(model, paper_localization(model, dataset, m, forget_range))
            for m in PAPER_SELECTIONS}


def paper_evaluations(dataset: str, experiment: str) -> dict[str, Any]:
    """The sweep ``evaluations:`` of the authors' evals for this experiment (``resolve_evaluations`` accepts it)."""
    kind = DATASETS[dataset]
    evaluations: dict[str, Any] = {
        "formats": "all",
        "batch_size": 64,
        # relearn_attack's defaults are the authors' (§4.5), CF toward the true answer; scored with the LoRA dropout
        # live after step 0, as their evaluations at steps 10 and 20
        "relearn": {"score_in_train_mode": True},
        # 4 attacks, the authors' steps / batch (paper_schedule), lr 1e-5, eps 6, bf16 autocast for Gemma-2 (CUDA)
        "softprompt": {"autocast": "paper"},
        # lm-eval 0.4.4 as theirs: no special tokens but for Gemma (capability_eval's add_bos="paper")
        "capability": {"tasks": ["mmlu", "sciq"], "num_fewshot": 0, "add_bos": "paper"},
    }
    if kind == "sports" and experiment != "sport_golf":  # §4.7: athlete editing only
        evaluations["paper_probes"] = True
    return evaluations


def authors_relearn_settings(dataset: str) -> dict[str, Any]:
    """The relearning settings of the authors' runs (``relearn_attack`` keywords): the defaults, scored with the LoRA
    dropout live, and on CounterFact their ``target_false`` bug."""
    from mu_fast.sweep.evaluations import RELEARN_DEFAULTS

    return {**RELEARN_DEFAULTS, "score_in_train_mode": True,
            "cf_target_false_bug": DATASETS.get(dataset, dataset) == "cf"}


def paper_protocol(model_key: str, dataset: str, experiment: str, model_ref: str | None = None,
                   lm_texts: str | None = "pile", seeds: tuple[int, ...] | list[int] = (0,)) -> dict[str, Any]:
    """The authors' protocol for ``model_key`` (gemma-7b | gemma-2-9b | llama-3-8b, or their hub ids), ``dataset``
    (sports | counterfact) and ``experiment`` (sports: forget_16 | forget_64 | sport_golf; counterfact:
    forget_16 | forget_64 | forget_64_sequential). Spec only: ``model_ref`` loads another checkpoint of that model (a
    local folder or hub id; default the hub id), ``lm_texts`` is the LM retain text ("pile" streams it as the
    authors, online; or a local text file; None: no LM term), ``seeds`` the runs' seeds (the authors ran one).

    Returns ``{"model", "hf_id", "dataset", "experiment", "edit_preset", "edit_groups" ({group: EditConfig fields}),
    "methods" ({method: {"group", "edit", "localization" ({"attn", "mlp", "params"}) or None}}), "flu_layers",
    "budget" (parameters), "partitions" (sequential CF: [{"range", "flu_layers", "budget", "localizations"}]),
    "evaluations", "spec" (a sweep spec dict, or None with "spec_note")}``; all plain JSON-ready values. The
    sequential experiment edits only the partitions' localizations: there "localization", "flu_layers" and "budget"
    are None and each partition carries its own.
    """
    from mu_fast.localize.paper_graphs import paper_flu_layers, paper_localization_budget
    from mu_fast.sweep.presets import preset_groups
    from mu_fast.sweep.spec import method_group

    model, kind, experiment = _check(model_key, dataset, experiment)
    data = "sports" if kind == "sports" else "counterfact"
    preset = f"paper_{kind}:{model}:{experiment}"
    groups = preset_groups(preset)
    forget_range = "0_64" if experiment.startswith("forget_64") else "0_16"
    group_of = {m: method_group(m) for m in METHODS}
    localizations = _localizations(model, data, forget_range)
    methods = {m: {"group": group_of[m], "edit": dict(groups[group_of[m]]), "localization": localizations.get(m)}
               for m in METHODS}
    budget = paper_localization_budget(model, data, forget_range)
    out: dict[str, Any] = {
        "model": model, "hf_id": paper_model(model).hf_id, "dataset": data, "experiment": experiment,
        "edit_preset": preset, "edit_groups": groups, "methods": methods,
        "flu_layers": paper_flu_layers(model, data, forget_range), "budget": budget, "partitions": None,
        "evaluations": paper_evaluations(data, experiment),
    }
    if experiment.endswith("_sequential"):  # §3.6: each partition its own localization, budget and FLU layers
        out["partitions"] = [{"range": r, "flu_layers": paper_flu_layers(model, data, r),
                              "budget": paper_localization_budget(model, data, r),
                              "localizations": _localizations(model, data, r)} for r in CF_PARTITIONS]
        out["flu_layers"] = out["budget"] = None  # the 0_64 range is never edited here
        for entry in methods.values():
            entry["localization"] = None
        out["spec"] = None
        out["spec_note"] = ("a sequential sweep (kind: sequential): paper_sequential_spec(protocol) builds it; its runs "
                            "edit the 4 partitions as mu_fast.edit.sequential.sequential_edit over paper_sequential_masks "
                            "(the per-partition localizations in 'partitions'), then run 'evaluations' on all 64 facts "
                            "(mu-fast run --preset paper)")
        return out
    out["spec"] = {
        "name": f"paper_{data}_{model}_{experiment}",
        "models": [{"name": model_ref or paper_model(model).hf_id, "dtype": "bf16", "paper_model": model}],
        "tasks": _tasks(kind, experiment, model, lm_texts),
        "methods": list(METHODS),
        "budget": budget,
        "edit": {"preset": preset},
        "seeds": [int(s) for s in seeds],
        "evaluations": out["evaluations"],
        "store": f"sweeps/paper_{data}_{model}_{experiment}.jsonl",
    }
    return out


def paper_sequential_spec(protocol: dict[str, Any], model_ref: str | None = None, lm_texts: str | None = "pile",
                          seeds: tuple[int, ...] | list[int] = (0,)) -> dict[str, Any]:
    """The sweep spec (``kind: sequential``, ``mu_fast.sweep.spec``) of a sequential ``paper_protocol``: every
    method over the 4 partitions, the authors' edit preset and evaluations; model_ref, lm_texts and seeds as
    ``paper_protocol``'s. Its runs are sequences of 4 steps, one store record each."""
    if protocol.get("partitions") is None:
        raise ValueError(f"{protocol['experiment']} is not a sequential experiment; its spec is protocol['spec']")
    model, experiment = protocol["model"], protocol["experiment"]
    return {
        "name": f"paper_counterfact_{model}_{experiment}",
        "kind": "sequential",
        "partitions": len(protocol["partitions"]),
        "models": [{"name": model_ref or paper_model(model).hf_id, "dtype": "bf16", "paper_model": model}],
        "tasks": _tasks("cf", experiment, model, lm_texts),
        "methods": list(METHODS),
        "edit": {"preset": protocol["edit_preset"]},
        "seeds": [int(s) for s in seeds],
        "evaluations": protocol["evaluations"],
        "store": f"sweeps/paper_counterfact_{model}_{experiment}.jsonl",
    }


def paper_sequential_masks(model: Any, method: str, model_key: str | None = None, seed: int = 0) -> list[Any]:
    """The 4 masks of the sequential CounterFact experiment for ``sequential_edit`` (§3.6: each partition its own
    localization), for the ranges 0_16, 16_32, 32_48, 48_64 over ``model``'s own sites.

    method: one of ``METHODS`` (``paper:`` optional for the paper's selections). The paper's selections are
    ``localize("paper:<method>")`` of each range. The baselines follow the authors' sequential script: ``random``
    draws whole matrices up to the partition's budget (its FLU layer count × this model's MLP size, the authors'
    budget on their models) and ``random_mlps`` as many MLP layers as the partition's FLU layers, each partition
    drawn anew (seed ``seed + p``; theirs were unseeded); ``all_mlps`` and ``nonlocalized`` are the same for every
    partition. model_key: the paper model (default: the model's name_or_path)."""
    from types import SimpleNamespace

    from mu_fast.data.datadir import paper_model
    from mu_fast.localize import baselines, localize
    from mu_fast.localize.paper_graphs import paper_flu_layers
    from mu_fast.masks import Mask, paper_budget
    from mu_fast.models.sites import SiteTable

    kind = method.removeprefix("paper:")
    if kind not in PAPER_SELECTIONS + BASELINES or (method.startswith("paper:") and kind not in PAPER_SELECTIONS):
        raise ValueError(f"method={method!r}; the sequential experiment's methods are {', '.join(METHODS)}")
    if kind in PAPER_SELECTIONS:
        task = SimpleNamespace(name="counterfact_sequential", meta={"dataset": "counterfact"})
        return [localize(f"paper:{kind}", model, task=task, paper_model=model_key, forget_range=r).mask
                for r in CF_PARTITIONS]
    table = SiteTable(model)
    name = model_key or getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not name:
        raise ValueError(f"{method}: pass model_key= (gemma-7b, gemma-2-9b or llama-3-8b); the model has no name_or_path")
    key = paper_model(name).key
    masks = []
    for p, r in enumerate(CF_PARTITIONS):
        n_flu = len(paper_flu_layers(key, "counterfact", r))
        if kind == "random":
            comps = baselines.random_matrices(table, paper_budget(table, n_flu), seed + p)
        elif kind == "random_mlps":
            comps = baselines.random_mlps(table, n_flu, seed + p)
        else:
            comps = baselines.all_mlps(table) if kind == "all_mlps" else baselines.nonlocalized(table)
        masks.append(Mask.from_components(table, comps, meta={"method": kind, "forget_range": r}))
    return masks

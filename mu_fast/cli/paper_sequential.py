"""``mu-fast run MODEL --preset paper --dataset counterfact --experiment forget_64_sequential``: the authors' sequential
CounterFact runs (authors_repo.md §3.6, their ``localized_finetuning_script_counterfact_sequential.py``).

Per method (the paper's five selections and the four baselines, as the authors' ``results_rebuttal_counterfact/
*_sequential`` runs): ``sequential_edit`` over the 4 partitions with their own masks (``paper_sequential_masks``),
then, after the last partition and on all 64 facts, the evaluations the authors' script ran there (its
``do_full_mmlu_evals``, ``do_softprompt_evals`` and ``do_relearning_evals``): the relearning attack (trained on the
first 32 facts, scored on the last 32, as their ``first_64_split``), the soft-prompt attack and lm-eval, each as
the sweep runs it (``--no-relearn`` and ``--paper-evals`` turn them off). The model is restored between methods.
Writes ``out/<method>.json`` (partitions' records, final evaluations, edit settings, provenance) and prints a table.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def final_evaluations(model: Any, tokenizer: Any, task: Any, evaluations: Mapping[str, Any], seed: int,
                      progress: bool = True) -> dict[str, Any]:
    """The resolved sweep ``evaluations`` (``resolve_evaluations``) other than the formats, run on the edited
    ``model`` as a sweep run does: ``relearn`` (evaluated at steps 0, steps // 2 and steps), ``probes`` and the
    registered ones (``softprompt``, ``capability``, ...). Returns ``{name: result}``; the model is left unchanged."""
    from mu_fast.evaluate import latent_probes, relearn_attack
    from mu_fast.sweep.evaluations import REGISTRY

    out: dict[str, Any] = {}
    if evaluations.get("relearn") is not None:
        settings = dict(evaluations["relearn"])
        steps = settings["steps"]
        out["relearn"] = relearn_attack(model, tokenizer, task, seed=seed, eval_batch_size=evaluations["batch_size"],
                                        progress=progress, eval_at=tuple(sorted({0, steps // 2, steps})), **settings)
    if evaluations.get("probes") is not None and task.classes:
        out["latent_probes"] = latent_probes(model, tokenizer, task, batch_size=evaluations["batch_size"],
                                             **evaluations["probes"])
    for name, settings in (evaluations.get("extra") or {}).items():
        out[name] = REGISTRY[name].fn(model, tokenizer, task, settings, seed)
    return out


def final_metrics(final: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers the table shows: held-out accuracy after relearning, forget accuracy under the soft-prompt
    attack, and each lm-eval task's accuracy (None where not run; "skipped" where skipped)."""
    relearn = final.get("relearn")
    metrics: dict[str, Any] = {"relearn_acc": None if relearn is None or relearn["final"] is None
                               else relearn["final"]["normal"]["acc"]}
    soft = final.get("softprompt")
    metrics["softprompt_forget_acc"] = None if soft is None else soft["metrics"]["softprompt_forget_acc"]
    capability = final.get("capability")
    metrics["mmlu_acc"] = (None if capability is None else "skipped" if "skipped" in capability
                           else capability["metrics"].get("capability_mmlu_acc"))
    return metrics


def run_sequential(model: str, key: str, protocol: Mapping[str, Any], methods: list[str], edit: Mapping[str, Any],
                   evaluations: Mapping[str, Any], texts: str | None, dtype: str, out: Path, seed: int = 0) -> None:
    """Run the sequential experiment (module docstring). evaluations: resolved (``resolve_evaluations``). seed: the
    edit's data order (EditConfig.seed, unless --seed overrides it), the random baselines' draws and the attacks'."""
    import torch

    from mu_fast.cli.common import identity_of, load_model_ref
    from mu_fast.data import counterfact_sequential_tasks, load_lm_texts
    from mu_fast.edit.loop import EditConfig
    from mu_fast.edit.sequential import all_facts_task, sequential_edit
    from mu_fast.paper_protocol import paper_sequential_masks
    from mu_fast.preflight import resolve_model
    from mu_fast.provenance import provenance_block
    from mu_fast.sweep.snapshot import MaskedSnapshot

    ref = resolve_model(model)
    lm = load_lm_texts(texts, n=2048, seed=0) if texts else None
    tasks = counterfact_sequential_tasks(model=key, lm_texts=lm)
    everything = all_facts_task(tasks)
    net, tokenizer, info = load_model_ref(ref, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    identity = identity_of(ref, info, net, dtype)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        fields = {"seed": seed, **protocol["methods"][method]["edit"], **edit}
        if not texts:
            fields["lm_coef"] = 0.0
        if "betas" in fields:
            fields["betas"] = tuple(fields["betas"])
        config = EditConfig(**fields)
        masks = paper_sequential_masks(net, method, model_key=key, seed=seed)
        snapshot = MaskedSnapshot.take(net, functools.reduce(lambda a, b: a.union(b), masks))  # one copy, even
        try:                                                                                   # for nonlocalized
            records = sequential_edit(net, tokenizer, tasks, masks, config, formats=evaluations["formats"],
                                      eval_batch_size=evaluations["batch_size"])
            final = final_evaluations(net, tokenizer, everything, evaluations, seed)
        finally:
            snapshot.restore(net)
        path = out / f"{method.replace(':', '_')}.json"
        block = provenance_block(model=identity, device=next(net.parameters()).device)
        path.write_text(json.dumps({"method": method, "paper_model": key, "experiment": protocol["experiment"],
                                    "edit_config": dict(vars(config)), "partitions": records,
                                    "final_evaluations": final, "final_metrics": final_metrics(final),
                                    "evaluation_settings": dict(evaluations), "provenance": block},
                                   indent=1, default=str))
        last = records[-1]["eval"]
        maintain = last.get("normal", {}).get("maintain", {}).get("acc")
        rows.append((method, [p["acc"] for p in last["per_partition"]], maintain, final_metrics(final)))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print_table(rows, out)


def print_table(rows: list[tuple[str, list[float], float | None, dict[str, Any]]], out: Path) -> None:
    """The methods' forget accuracy per partition after all 4 edits, maintain accuracy and the final evaluations."""
    def cell(value: Any) -> str:
        return "-" if value is None else value if isinstance(value, str) else f"{value:.3f}"

    print(f"{'method':14s} {'forget acc per partition after all 4 edits':44s} {'maintain':9s} {'relearned':9s} "
          f"{'softprompt':10s} {'MMLU':7s} (results: {out}/)")
    for method, accs, maintain, metrics in rows:
        shown = " ".join(f"{a:.3f}" for a in accs)
        print(f"{method:14s} {shown:44s} {cell(maintain):9s} {cell(metrics['relearn_acc']):9s} "
              f"{cell(metrics['softprompt_forget_acc']):10s} {cell(metrics['mmlu_acc']):7s}")
    print("relearned: held-out forget accuracy (true answer) after the relearning attack; softprompt: forget accuracy "
          "under the soft-prompt attack; MMLU: lm-eval accuracy (- = not run)")

"""``mu-fast run MODEL --preset paper``: the authors' protocol (``mu_fast.paper_protocol``) on MODEL.

The paper model (gemma-7b, gemma-2-9b or llama-3-8b) is MODEL's name, a local folder whose config.json names it
(``_name_or_path``) or has its shapes, or ``--paper-model``. ``paper_protocol`` gives every method's localization,
edit settings (§3.4) and evaluations; the sweep engine runs them (store: ``--out/<spec name>.jsonl``, resumable),
then the paper-layout table is printed and written with the plots under ``--out/report``. The sequential
CounterFact experiment runs ``sequential_edit`` per paper selection instead (one JSON per method in ``--out``).

Flags that change the authors' settings are applied as explicit overrides, each with a printed warning line: edit
flags (``--lr``, ``--steps`` ...) replace that field in every method group, ``--relearn-*`` replace the relearning
attack's settings, ``--no-relearn`` / ``--no-probes`` / ``--paper-evals`` drop evaluations and ``--dtype`` other
than bf16 changes the precision. Flags the experiment fixes (``--forget-split``, ``--inject-label``, ``--cf-model``)
and ``--probe-*`` (the authors' probes take none of them) are refused. ``--dry-run`` prints the runs and loads
nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mu_fast.paper_protocol import METHODS, PAPER_SELECTIONS

PAPER_EVALS = ("softprompt", "capability")
# run_cmd's defaults of the options the experiment fixes: a value other than these was given on purpose.
FIXED_BY_EXPERIMENT = {"forget_split": "first_16_unsplit", "inject_label": "random_without_golf", "cf_model": None}
SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "vocab_size")


def infer_paper_model(model: str, given: str | None = None) -> str:
    """The paper model key of MODEL: ``given`` (``--paper-model``), else MODEL's name (``google/gemma-2-9b``,
    ``.../gemma-2-9b``), else a local folder's config.json: its ``_name_or_path``, else shapes equal to one paper
    model's shipped config. ValueError (one line, naming the fix) when none matches."""
    from mu_fast.data.datadir import PAPER_MODELS, paper_model
    from mu_fast.models.shipped import shipped_config_dict

    if given is not None:
        try:
            return paper_model(given).key
        except ValueError:
            raise ValueError(f"--paper-model {given!r} is not a paper model; use one of {', '.join(PAPER_MODELS)}") from None
    for name in (model, model.rstrip("/")):
        try:
            return paper_model(name).key
        except ValueError:
            pass
    config_file = Path(model).expanduser() / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        try:
            return paper_model(str(config.get("_name_or_path", ""))).key
        except ValueError:
            pass
        for key in PAPER_MODELS:
            shipped = shipped_config_dict(paper_model(key).shapes)
            if all(config.get(k) == shipped.get(k) for k in SHAPE_KEYS):
                return key
    raise ValueError(f"--preset paper: cannot tell which paper model MODEL {model!r} is (neither its name nor its "
                     f"config.json matches {', '.join(PAPER_MODELS)}); pass --paper-model gemma-7b|gemma-2-9b|llama-3-8b")


def parse_seeds(seeds: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        out = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or any(s < 0 for s in out):
        raise ValueError(f"--seeds {seeds!r}: give non-negative integers separated by commas, e.g. --seeds 0,1,2")
    return out


def paper_methods(methods: str, default: str, sequential: bool) -> list[str]:
    """The methods to run: all the authors' (run_cmd's default list given) or the chosen subset of them."""
    allowed = PAPER_SELECTIONS if sequential else METHODS
    if methods == default:
        return [f"paper:{m}" for m in PAPER_SELECTIONS] if sequential else list(METHODS)
    out = [m.strip() for m in methods.split(",") if m.strip()]
    names = [f"paper:{m}" for m in allowed] if sequential else list(allowed)
    for method in out:
        if method not in names and f"paper:{method}" not in names:
            raise ValueError(f"--methods entry {method!r} is not one of the authors' methods for this experiment; "
                             f"choose from {','.join(names)}")
    return [m if m in names else f"paper:{m}" for m in out]


def _warn(lines: list[str], text: str) -> None:
    lines.append(f"warning: {text} (not the authors' setting)")


def protocol_overrides(protocol: Mapping[str, Any], settings: Mapping[str, Any], relearn: bool, probes: bool,
                       relearn_settings: Mapping[str, Any], probe_settings: Mapping[str, Any], paper_evals: str,
                       dtype: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``(edit overrides, evaluations, warnings)``: the given flags over the authors' settings, each change named."""
    from mu_fast.cli_options import check_edit_values, check_flag_values

    if probe_settings:
        flag = f"--probe-{next(iter(probe_settings)).replace('_', '-')}"
        raise ValueError(f"{flag} sets the standardised probes; --preset paper runs the authors' probes "
                         "(paper_probes), which take no --probe-* settings: drop it")
    edit = check_edit_values(settings)
    check_flag_values(relearn_settings, "relearn")
    warnings: list[str] = []
    for field, value in edit.items():
        value = list(value) if isinstance(value, tuple) else value
        edit[field] = value
        authors = sorted({str(g.get(field, "EditConfig default")) for g in protocol["edit_groups"].values()})
        _warn(warnings, f"--{field.replace('_', '-')} {value} replaces the authors' {field} ({' / '.join(authors)}) in every method")
    evaluations = dict(protocol["evaluations"])
    if not relearn:
        evaluations["relearn"] = False
        _warn(warnings, "--no-relearn drops the relearning attack")
    elif relearn_settings:
        evaluations["relearn"] = dict(relearn_settings)
        _warn(warnings, f"--relearn-* set the relearning attack's {', '.join(relearn_settings)}")
    if not probes and evaluations.pop("paper_probes", None):
        _warn(warnings, "--no-probes drops the authors' latent probes")
    keep = _paper_evals(paper_evals)
    for name in PAPER_EVALS:
        if name not in keep and evaluations.pop(name, None) is not None:
            _warn(warnings, f"--paper-evals {paper_evals} drops the {name} evaluation")
    if dtype != "bf16":
        _warn(warnings, f"--dtype {dtype} instead of bf16")
    return edit, evaluations, warnings


def _paper_evals(value: str) -> set[str]:
    if value == "all":
        return set(PAPER_EVALS)
    if value == "none":
        return set()
    out = {v.strip() for v in value.split(",") if v.strip()}
    bad = sorted(out - set(PAPER_EVALS))
    if bad or not out:
        raise ValueError(f"--paper-evals {value!r}: use all, none or a comma list of {','.join(PAPER_EVALS)}")
    return out


def describe_methods(protocol: Mapping[str, Any], methods: list[str], edit: Mapping[str, Any]) -> list[str]:
    """One line per method: its group, lr, forget_coef, steps, 8-bit moments and the layers it edits."""
    lines = []
    for method in methods:
        entry = protocol["methods"][method]
        cfg = {**entry["edit"], **edit}
        loc = entry["localization"]
        if loc is not None:
            where = f"attn {loc['attn']} mlp {loc['mlp']} ({loc['params']:,} params)"
        elif method == "random":
            where = f"random matrices, budget {protocol['budget']:,} params"
        elif method == "random_mlps":
            where = f"{len(protocol['flu_layers'])} random MLP layers"
        else:
            where = "every MLP" if method == "all_mlps" else "every block"
        eight = "yes" if cfg.get("state_bits") == 8 else "no"
        lines.append(f"{method:14s} {entry['group']:8s} lr={cfg['lr']:<8g} forget_coef={cfg['forget_coef']:<4g} "
                     f"steps={cfg['steps']:<3d} 8bit={eight:3s} {where}")
    return lines


def run_paper(model: str, dataset: str, experiment: str | None, paper_model: str | None, methods: str,
              default_methods: str, lm_texts: str | None, seeds: str, out: Path, dry_run: bool, fresh: bool,
              dtype: str, relearn: bool, probes: bool, paper_evals: str, settings: Mapping[str, Any],
              relearn_settings: Mapping[str, Any], probe_settings: Mapping[str, Any],
              fixed: Mapping[str, Any]) -> None:
    """``mu-fast run MODEL --preset paper`` (module docstring); every option is checked before anything loads."""
    from mu_fast.cli_common import DTYPE_NAMES
    from mu_fast.paper_protocol import paper_protocol
    from mu_fast.preflight import check_choice

    t0 = time.perf_counter()
    if dataset not in ("sports", "counterfact"):
        raise ValueError(f"--preset paper needs --dataset sports or counterfact (got {dataset!r})")
    if experiment is None:
        raise ValueError("--preset paper needs --experiment: forget_16, forget_64, sport_golf (sports) or "
                         "forget_64_sequential (counterfact)")
    for name, value in fixed.items():
        if value != FIXED_BY_EXPERIMENT[name]:
            raise ValueError(f"--{name.replace('_', '-')} is set by --experiment under --preset paper; drop it")
    check_choice("--dtype", dtype, DTYPE_NAMES)
    key = infer_paper_model(model, paper_model)
    texts = None if lm_texts in ("none", "None") else (lm_texts or "pile")
    seed_list = parse_seeds(seeds)
    protocol = paper_protocol(key, dataset, experiment, model_ref=model, lm_texts=texts, seeds=seed_list)
    sequential = protocol["spec"] is None
    if sequential and len(seed_list) > 1:
        raise ValueError(f"--seeds {seeds}: the sequential experiment runs one seed per call; pass one seed")
    chosen = paper_methods(methods, default_methods, sequential)
    edit, evaluations, warnings = protocol_overrides(protocol, settings, relearn, probes, relearn_settings,
                                                     probe_settings, paper_evals, dtype)
    if texts is None:
        edit.setdefault("lm_coef", 0.0)
        _warn(warnings, "--lm-texts none drops the LM retain loss")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; pass a folder for the results")
    if not dry_run:
        from mu_fast.preflight import check_writable

        check_writable("--out", out, folder=True)
    print(f"paper protocol: {model} as {key}, {dataset} {experiment}; edit preset {protocol['edit_preset']}; "
          f"FLU layers {protocol['flu_layers']}; budget {protocol['budget']:,} params")
    for line in [*describe_methods(protocol, chosen, edit), *warnings]:
        print(line)
    if sequential:
        for part in protocol["partitions"]:
            print(f"partition {part['range']}: FLU layers {part['flu_layers']}, budget {part['budget']:,} params")
        if not dry_run:
            from mu_fast.preflight import writing_output

            with writing_output("--out", out, "the methods written before are kept in --out"):
                run_sequential(model, key, protocol, chosen, edit, texts, dtype, out, seed_list[0])
        return
    spec = dict(protocol["spec"])
    spec["methods"] = chosen
    spec["edit"] = {**spec["edit"], **edit}
    spec["evaluations"] = evaluations
    spec["models"] = [{**m, "dtype": dtype} for m in spec["models"]]
    store = out / f"{spec.pop('store').rsplit('/', 1)[-1]}"
    import mu_fast.sweep as sweep

    if dry_run:
        sweep.dry_run(spec, store=store, print_fn=print)
        return
    from mu_fast.preflight import resolve_model

    resolve_model(model)
    if fresh and store.exists():
        kept = store.with_name(f"{store.name}.{time.strftime('%Y%m%d-%H%M%S')}.old")
        store.rename(kept)
        print(f"--fresh: the earlier results are kept as {kept}")
    from mu_fast.preflight import writing_output

    kept = "every run stored before is kept; free space or fix the path, then run again to resume"
    with writing_output("--out", out, kept):
        result = sweep.run(spec, store=store, retry_failed=True)  # a rerun after a fix retries the failed runs
    print(str(result))
    from mu_fast.sweep.report import write_report
    from mu_fast.sweep.store import load_results

    records = load_results(store)
    if not any(r.get("status") == "ok" for r in records):
        first = next((r["error"] for r in records if r.get("error")), {"type": "?", "message": "no record"})
        raise RuntimeError(f"no run of {store} finished (first error: {first['type']}: {first['message']}); fix the "
                           "cause and run again (the failed runs are retried; finished ones are kept)")
    with writing_output("--out", out, f"the runs are kept in {store}; `mu-fast report {store}` writes the report"):
        written = write_report(records, out / "report")
    print(written["text"])
    print(f"report: {out / 'report'}/ (table.txt, {len(written['plots'])} plots); store: {store}; "
          f"total {time.perf_counter() - t0:.1f} s")


def run_sequential(model: str, key: str, protocol: Mapping[str, Any], methods: list[str], edit: Mapping[str, Any],
                   texts: str | None, dtype: str, out: Path, seed: int = 0) -> None:
    """The sequential CounterFact experiment: per paper selection, ``sequential_edit`` over the 4 partitions with
    their own masks (``paper_sequential_masks``); the model is restored between methods. Writes
    ``out/<method>.json`` (partitions' records, edit settings, provenance block) and prints a short table.
    ``seed``: the edit's data order (EditConfig.seed, unless --seed overrides it)."""
    import torch

    from mu_fast.cli_common import identity_of, load_model_ref
    from mu_fast.data import counterfact_sequential_tasks, load_lm_texts
    from mu_fast.edit.loop import EditConfig
    from mu_fast.edit.sequential import sequential_edit
    from mu_fast.paper_protocol import paper_sequential_masks
    from mu_fast.preflight import resolve_model
    from mu_fast.provenance import provenance_block
    from mu_fast.sweep.snapshot import MaskedSnapshot

    ref = resolve_model(model)
    lm = load_lm_texts(texts, n=2048, seed=0) if texts else None
    tasks = counterfact_sequential_tasks(model=key, lm_texts=lm)
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
        masks = paper_sequential_masks(net, method, model_key=key)
        snapshots = [MaskedSnapshot.take(net, m) for m in masks]
        try:
            records = sequential_edit(net, tokenizer, tasks, masks, config, formats=None)
        finally:
            for snap in reversed(snapshots):
                snap.restore(net)
        path = out / f"{method.replace(':', '_')}.json"
        block = provenance_block(model=identity, device=next(net.parameters()).device)
        path.write_text(json.dumps({"method": method, "paper_model": key, "experiment": protocol["experiment"],
                                    "edit_config": {k: v for k, v in vars(config).items()}, "partitions": records,
                                    "provenance": block}, indent=1, default=str))
        last = records[-1]["eval"]
        accs = [p["acc"] for p in last["per_partition"]]
        maintain = last.get("normal", {}).get("maintain", {}).get("acc")
        rows.append((method, accs, maintain))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"{'method':14s} forget acc per partition after all 4 edits   maintain acc   (results: {out}/)")
    for method, accs, maintain in rows:
        shown = " ".join(f"{a:.3f}" for a in accs)
        print(f"{method:14s} {shown:44s} {'-' if maintain is None else f'{maintain:.3f}'}")

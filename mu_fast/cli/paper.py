"""``mu-fast run MODEL --preset paper``: the authors' protocol (``mu_fast.paper_protocol``) on MODEL.

The paper model (gemma-7b, gemma-2-9b or llama-3-8b) is MODEL's name, a local folder whose config.json names it
(``_name_or_path``) or has its shapes, or ``--paper-model``. ``paper_protocol`` gives every method's localization,
edit settings (§3.4) and evaluations; the sweep engine runs them (store: ``--out/<spec name>.jsonl``, resumable),
then the paper-layout table is printed and written with the plots under ``--out/report``. The sequential
CounterFact experiment is a ``kind: sequential`` sweep (``paper_protocol.paper_sequential_spec``; store
``--out/<spec name>.jsonl``, one record per partition step, resumable): per method the 4 partitions in turn, each its
own localization, then the evaluations once on all 64 facts, as the authors' script after its last partition; its
table is printed and one JSON per method written in ``--out`` (``mu_fast.cli.paper_sequential``).

Flags that change the authors' settings are applied as explicit overrides, each with a printed warning line: edit
flags (``--lr``, ``--steps`` ...) replace that field in every method group, ``--relearn-*`` replace the relearning
attack's settings, ``--no-relearn`` / ``--no-probes`` / ``--paper-evals`` drop evaluations, ``--(no-)mmlu-add-bos``
changes lm-eval's encoding and ``--dtype`` other than bf16 changes the precision. A flag that gives back an authors'
setting the preset deliberately changes (``--relearn-cf-target-false-bug``: their CounterFact relearning toward
``target_false``) prints a note saying so. Flags the experiment fixes (``--forget-split``, ``--inject-label``, ``--cf-model``)
and ``--probe-*`` (the authors' probes take none of them) are refused. ``--dry-run`` prints the runs and loads
nothing.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mu_fast.paper_protocol import METHODS

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


def paper_methods(methods: str, default: str) -> list[str]:
    """The methods to run: all the authors' (run_cmd's default list given) or the chosen subset of them (the
    sequential experiment runs the same 9 as the others, as the authors' ``*_sequential`` runs)."""
    if methods == default:
        return list(METHODS)
    out = [m.strip() for m in methods.split(",") if m.strip()]
    names = list(METHODS)
    for method in out:
        if method not in names and f"paper:{method}" not in names:
            raise ValueError(f"--methods entry {method!r} is not one of the authors' methods for this experiment; "
                             f"choose from {','.join(names)}")
    return [m if m in names else f"paper:{m}" for m in out]


def _warn(lines: list[str], text: str) -> None:
    lines.append(f"warning: {text} (not the authors' setting)")


def _flag(name: str, value: Any) -> str:
    """How the user wrote it: ``--relearn-steps 5``, ``--relearn-cf-target-false-bug``, ``--no-mmlu-add-bos``."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value}"


WHY_AUTHORS = {  # what an authors' setting the preset changes on purpose means
    "cf_target_false_bug": "their CounterFact relearning trains relearn and maintain toward target_false, a bug "
                           "(authors_repo.md §4.5); the preset relearns toward the true answer",
}


def _relearn_overrides(protocol: Mapping[str, Any], preset: Any, given: Mapping[str, Any],
                       lines: list[str]) -> dict[str, Any]:
    """The relearning settings: the preset's with the given ``--relearn-*`` values; a line per change, a note where
    the value is the authors' own."""
    from mu_fast.paper_protocol import authors_relearn_settings
    from mu_fast.sweep.evaluations import RELEARN_DEFAULTS

    if given.get("cf_target_false_bug") and protocol["dataset"] != "counterfact":
        raise ValueError("--relearn-cf-target-false-bug reproduces a bug of the authors' CounterFact relearning; "
                         f"--dataset {protocol['dataset']} has none: drop it")
    ours = {**RELEARN_DEFAULTS, **(preset if isinstance(preset, Mapping) else {})}
    authors = authors_relearn_settings(protocol["dataset"])
    for key, value in given.items():
        flag = _flag(f"relearn_{key}", value)
        if value == ours[key]:
            continue
        if value == authors[key]:
            lines.append(f"note: {flag} is the authors' setting: {WHY_AUTHORS.get(key, 'the preset differs')}")
        else:
            _warn(lines, f"{flag} replaces the authors' relearning {key} ({authors[key]})")
    return {**(preset if isinstance(preset, Mapping) else {}), **given}


def _add_bos_override(protocol: Mapping[str, Any], evaluations: dict[str, Any], add_bos: bool | None,
                      paper_evals: str, lines: list[str]) -> None:
    """``--(no-)mmlu-add-bos`` over the authors' lm-eval 0.4.4 encoding (a BOS token for Gemma only)."""
    if add_bos is None:
        return
    if "capability" not in evaluations:
        raise ValueError(f"{_flag('mmlu_add_bos', add_bos)} sets lm-eval's MMLU/SciQ encoding, but --paper-evals "
                         f"{paper_evals} does not run the capability evaluation: drop one of them")
    authors = protocol["model"].startswith("gemma")
    if add_bos != authors:
        evaluations["capability"]["add_bos"] = add_bos
        _warn(lines, f"{_flag('mmlu_add_bos', add_bos)}: lm-eval requests {'with' if add_bos else 'without'} the BOS "
                     f"token, where the authors' lm-eval 0.4.4 sent {'one' if authors else 'none'} for {protocol['model']}")


def protocol_overrides(protocol: Mapping[str, Any], settings: Mapping[str, Any], relearn: bool, probes: bool,
                       relearn_settings: Mapping[str, Any], probe_settings: Mapping[str, Any], paper_evals: str,
                       dtype: str, mmlu_add_bos: bool | None = None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """``(edit overrides, evaluations, lines)``: the given flags over the authors' settings, each change named in a
    ``warning:`` line (or a ``note:`` where a flag gives back an authors' setting the preset changes on purpose)."""
    from mu_fast.cli.options import check_edit_values, check_flag_values

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
    evaluations = copy.deepcopy(dict(protocol["evaluations"]))
    if not relearn:
        evaluations["relearn"] = False
        _warn(warnings, "--no-relearn drops the relearning attack")
    elif relearn_settings:
        evaluations["relearn"] = _relearn_overrides(protocol, evaluations["relearn"], relearn_settings, warnings)
    if not probes and evaluations.pop("paper_probes", None):
        _warn(warnings, "--no-probes drops the authors' latent probes")
    keep = _paper_evals(paper_evals)
    for name in PAPER_EVALS:
        if name not in keep and evaluations.pop(name, None) is not None:
            _warn(warnings, f"--paper-evals {paper_evals} drops the {name} evaluation")
    _add_bos_override(protocol, evaluations, mmlu_add_bos, paper_evals, warnings)
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
    """One line per method: its group, lr, forget_coef, steps, 8-bit moments and the layers it edits (sequential:
    "per partition", listed by ``describe_partitions``)."""
    lines = []
    for method in methods:
        entry = protocol["methods"][method]
        cfg = {**entry["edit"], **edit}
        loc = entry["localization"]
        if protocol["partitions"] is not None:
            where = "its own localization per partition (below)"
        elif loc is not None:
            where = f"attn {loc['attn']} mlp {loc['mlp']} ({loc['params']:,} params)"
        else:
            where = _baseline(method, protocol["budget"], protocol["flu_layers"])
        eight = "yes" if cfg.get("state_bits") == 8 else "no"
        lines.append(f"{method:14s} {entry['group']:8s} lr={cfg['lr']:<8g} forget_coef={cfg['forget_coef']:<4g} "
                     f"steps={cfg['steps']:<3d} 8bit={eight:3s} {where}")
    return lines


def _baseline(method: str, budget: int, flu_layers: list[int], seed: int | None = None) -> str:
    drawn = "" if seed is None else f" (seed {seed})"
    if method == "random":
        return f"random matrices, budget {budget:,} params{drawn}"
    if method == "random_mlps":
        return f"{len(flu_layers)} random MLP layers{drawn}"
    return "every MLP" if method == "all_mlps" else "every block"


def describe_partitions(protocol: Mapping[str, Any], methods: list[str], seed: int) -> list[str]:
    """The sequential experiment: per partition its FLU layers and budget, then what each method edits there (the
    partition's own selection; random draws anew per partition with seed ``seed + p``, as ``paper_sequential_masks``)."""
    lines = []
    for p, part in enumerate(protocol["partitions"]):
        lines.append(f"partition {part['range']}: FLU layers {part['flu_layers']}, budget {part['budget']:,} params")
        for method in methods:
            loc = part["localizations"].get(method)
            where = (f"attn {loc['attn']} mlp {loc['mlp']} ({loc['params']:,} params)" if loc is not None
                     else _baseline(method, part["budget"], part["flu_layers"], seed + p))
            lines.append(f"  {method:14s} {where}")
    return lines


def describe_sequential_evaluations(evaluations: Mapping[str, Any]) -> str:
    """One line: the evaluations each method gets once, after the last partition."""
    names = [name for name in ("relearn", "paper_probes", *PAPER_EVALS) if evaluations.get(name)]
    return (f"evaluations after the last partition, on all 64 facts: formats {evaluations.get('formats', 'all')}"
            + "".join(f", {n}" for n in names))


def run_paper(model: str, dataset: str, experiment: str | None, paper_model: str | None, methods: str,
              default_methods: str, lm_texts: str | None, seeds: str, out: Path, dry_run: bool, fresh: bool,
              dtype: str, relearn: bool, probes: bool, paper_evals: str, settings: Mapping[str, Any],
              relearn_settings: Mapping[str, Any], probe_settings: Mapping[str, Any],
              fixed: Mapping[str, Any], mmlu_add_bos: bool | None = None) -> None:
    """``mu-fast run MODEL --preset paper`` (module docstring); every option is checked before anything loads."""
    from mu_fast.cli.common import DTYPE_NAMES
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
    chosen = paper_methods(methods, default_methods)
    edit, evaluations, warnings = protocol_overrides(protocol, settings, relearn, probes, relearn_settings,
                                                     probe_settings, paper_evals, dtype, mmlu_add_bos)
    if texts is None:
        edit.setdefault("lm_coef", 0.0)
        _warn(warnings, "--lm-texts none drops the LM retain loss")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; pass a folder for the results")
    if not dry_run:
        from mu_fast.preflight import check_writable

        check_writable("--out", out, folder=True)
    where = (f"{len(protocol['partitions'])} partitions edited in turn, each its own localization" if sequential else
             f"FLU layers {protocol['flu_layers']}; budget {protocol['budget']:,} params")
    print(f"paper protocol: {model} as {key}, {dataset} {experiment}; edit preset {protocol['edit_preset']}; {where}")
    for line in [*describe_methods(protocol, chosen, edit), *warnings]:
        print(line)
    if sequential:
        from mu_fast.cli.paper_sequential import run_sequential
        from mu_fast.sweep.evaluations import resolve_evaluations

        resolve_evaluations(evaluations)  # checked now, before anything loads
        for line in [*describe_partitions(protocol, chosen, seed_list[0]), describe_sequential_evaluations(evaluations)]:
            print(line)
        if not dry_run:
            from mu_fast.preflight import writing_output

            with writing_output("--out", out, "every step stored before is kept in --out; run again to resume"):
                run_sequential(model, key, protocol, chosen, edit, evaluations, texts, dtype, out, seed_list[0],
                               fresh=fresh)
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

"""``mu-fast sweep``: run every run of a sweep spec (``mu_fast.sweep``) that its store does not hold yet, with the
local, processes, gpus or Ray executor; a killed sweep resumes where it stopped. ``--dry-run`` prints the expanded
runs with estimated time and memory. Registered on ``mu_fast.cli.app``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mu_fast.cli.common import parse_batch, console
from mu_fast.preflight import check_choice, check_writable, writing_output

EXECUTORS = ("local", "processes", "gpus", "ray")


def sweep_cmd(
    spec: Path = typer.Argument(..., help="a sweep spec (YAML), e.g. specs/ci_organism.yaml"),
    out: Path | None = typer.Option(None, help="the results store (JSON lines; default: the spec's store:, else sweeps/<name>.jsonl)"),
    dry_run: bool = typer.Option(False, help="print the expanded runs with estimated time and memory; run nothing"),
    retry_failed: bool = typer.Option(False, help="run again the runs whose record says failed"),
    executor: str = typer.Option("local", help="local (this process), processes (worker processes), gpus (one worker per GPU) or ray (Ray actors)"),
    workers: int | None = typer.Option(None, help="workers for processes / ray (default 2, or the Ray cluster's GPUs)"),
    ray_address: str | None = typer.Option(None, help="an existing Ray cluster (auto, or host:port of `ray start --head`); default: a local one"),
    threads: int | None = typer.Option(None, help="torch CPU threads per worker"),
    batch: str | None = typer.Option(None, help="runs trained together in one pass over the frozen model (mu_fast.sweep.batches): a number or auto; default: the spec's batch:, else auto (batches on a GPU, each alone on a CPU)"),
    var: list[str] | None = typer.Option(None, help="set a spec variable (its vars:), e.g. --var model=google/gemma-2-9b; repeatable"),
) -> None:
    """Run every run of a sweep spec the store does not hold yet (a killed sweep resumes where it stopped)."""
    import mu_fast.sweep as sweep
    from mu_fast.preflight import check_positive

    check_choice("--executor", executor, EXECUTORS)
    check_positive("--workers", workers, integer=True)
    check_positive("--threads", threads, integer=True)
    batch_size = None if batch is None else parse_batch(batch)
    if not spec.is_file():
        raise FileNotFoundError(f"SPEC {str(spec)!r} does not exist; pass a sweep spec file such as "
                                "specs/ci_organism.yaml")
    if ray_address is not None and executor != "ray":
        raise ValueError(f"--ray-address is for --executor ray; add --executor ray (not {executor})")
    if out is not None and out.is_dir():
        raise IsADirectoryError(f"--out {str(out)!r} is a folder; pass the store's file path, e.g. {out}/sweep.jsonl")
    variables = parse_vars(var or [])
    from mu_fast.sweep.engine import store_path
    from mu_fast.sweep.spec import load_spec

    store = store_path(load_spec(spec, variables), out)
    store_option = "--out" if out is not None else f"store: of {spec.name}"
    fix = None if out is not None else "pass --out FILE or change store: in the spec"
    if dry_run:
        sweep.dry_run(spec, vars=variables, store=out, print_fn=print)
        return
    from mu_fast.sweep.engine import SweepInterrupted

    check_writable(store_option, store, append=True, fix=fix)
    try:
        with writing_output(store_option, store, "every run stored before is kept; free space or fix the path, then "
                                                 "run again to resume"):
            result = sweep.run(spec, vars=variables, store=out, executor=executor, retry_failed=retry_failed,
                               batch=batch_size,
                               workers=workers, ray_address=ray_address, threads=threads)
    except SweepInterrupted as err:  # Ctrl-C: one line, not click's "Aborted!" (the store keeps every finished run)
        print(f"mu-fast: {err}", file=sys.stderr)
        raise SystemExit(130) from None
    console().print(str(result), highlight=False)
    if result.failed:
        console().print("failed runs are kept in the store; fix the cause and rerun with --retry-failed")


def parse_vars(items: list[str]) -> dict[str, str]:
    """``["model=google/gemma-2-9b"]`` -> ``{"model": "google/gemma-2-9b"}``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--var {item!r}: write NAME=VALUE, e.g. --var model=google/gemma-2-9b")
        out[key.strip()] = value
    return out

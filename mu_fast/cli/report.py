"""``mu-fast report``: a sweep store's tables in the paper's layout (mean ± std over seeds), printed and written
with the plots (``mu_fast.sweep.report``). Registered on ``mu_fast.cli.app``."""

from __future__ import annotations

from pathlib import Path

import typer

from mu_fast.cli.common import console
from mu_fast.preflight import check_writable, writing_output


def report_cmd(
    results: Path = typer.Argument(..., help="a sweep store (.jsonl) or a folder holding one"),
    out: Path | None = typer.Option(None, help="folder for table.txt and the plots (default: <store>_report/)"),
) -> None:
    """Print a sweep's tables in the paper's layout (mean ± std over seeds) and write them with the plots."""
    from mu_fast.sweep.report import write_report

    store = _store_file(results)
    folder = out if out is not None else store.with_name(store.stem + "_report")
    check_writable("--out", folder, folder=True)
    from mu_fast.sweep.store import load_results

    records = load_results(store)
    if not records:
        raise ValueError(f"{store} holds no finished run; run the sweep first (mu-fast sweep SPEC --out {store})")
    with writing_output("--out", folder, "the store is unchanged; nothing else was written"):
        written = write_report(records, folder)
    print(written["text"])
    from mu_fast.report import format_legend
    from mu_fast.sweep.report import COLUMN_LEGEND

    print(format_legend(columns=COLUMN_LEGEND, components=False))
    console().print(f"report: {folder}/ (table.txt, {len(written['plots'])} plots)")


def _store_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        stores = sorted(path.glob("*.jsonl"))
        if len(stores) == 1:
            return stores[0]
        what = "no" if not stores else f"{len(stores)}"
        raise FileNotFoundError(f"RESULTS {str(path)!r} holds {what} .jsonl stores; pass the store file itself")
    raise FileNotFoundError(f"RESULTS {str(path)!r} does not exist; pass a sweep's store (mu-fast sweep --out FILE)")

"""Where the paper's data files live, and what to do when one is missing.

Files are read from a data directory: the ``data_dir`` argument, else ``$MU_FAST_DATA_DIR``, else
``../shared/data`` next to the current directory or next to this repository. A missing file raises a
``FileNotFoundError`` that names the file, the directory searched and where to get it. The CounterFact
tables can also be read online from the Hugging Face hub (``hf_dataset=...``) when the ``datasets`` library
is installed; nothing here imports it (or pandas) until a loader needs it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "MU_FAST_DATA_DIR"
COUNTERFACT_HF_DATASET = "PhillipGuo/counterfact-with-gemma-probs"

_TASKS_REPO = "github.com/magikarp01/tasks (commit 7c1e4a9be15e, folder facts/data/)"
_MAIN_REPO = "github.com/magikarp01/mechanistic-unlearning (commit a36be56965a2)"


@dataclass(frozen=True)
class PaperModel:
    """One of the paper's three models and the names its data files use.

    key: canonical name. hf_id: the checkpoint. file_prefix: ``hf_id`` with ``/`` → ``_`` (file names).
    hf_split: the split of the CounterFact hub dataset. shapes: the key of ``mu_fast.models.tiny.REAL_SHAPES``.
    """

    key: str
    hf_id: str
    hf_split: str
    shapes: str

    @property
    def file_prefix(self) -> str:
        return self.hf_id.replace("/", "_")


PAPER_MODELS: dict[str, PaperModel] = {
    "gemma-7b": PaperModel("gemma-7b", "google/gemma-7b", "gemma_7b", "gemma-7b"),
    "gemma-2-9b": PaperModel("gemma-2-9b", "google/gemma-2-9b", "gemma2_9b", "gemma2-9b"),
    "llama-3-8b": PaperModel("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "llama3_8b", "llama3-8b"),
}
_MODEL_ALIASES = {
    "gemma": "gemma-7b", "gemma-7b": "gemma-7b", "google-gemma-7b": "gemma-7b",
    "gemma-2": "gemma-2-9b", "gemma-2-9b": "gemma-2-9b", "gemma2-9b": "gemma-2-9b", "google-gemma-2-9b": "gemma-2-9b",
    "llama-3": "llama-3-8b", "llama-3-8b": "llama-3-8b", "llama3-8b": "llama-3-8b", "meta-llama-3-8b": "llama-3-8b",
    "meta-llama-meta-llama-3-8b": "llama-3-8b",
}


def paper_model(name: str) -> PaperModel:
    """Resolve a model name: ``gemma-7b``, ``gemma_7b``, ``google/gemma-7b``, ``gemma2-9b``, ``llama3_8b`` ..."""
    key = str(name).strip().lower().split("/")[-1].replace("_", "-")
    if key not in _MODEL_ALIASES:
        raise ValueError(f"unknown paper model {name!r}; choose one of {sorted(PAPER_MODELS)} (or their HF ids)")
    return PAPER_MODELS[_MODEL_ALIASES[key]]


def counterfact_file(model: str) -> str:
    """File name of a model's filtered CounterFact table, e.g. ``counterfact_google_gemma-7b.csv``."""
    return f"counterfact_{paper_model(model).file_prefix}.csv"


def _source_of(name: str) -> str:
    """Where a data file comes from, for the missing-file message."""
    base = Path(name).name
    folder = Path(name).parent.name
    if base.startswith("counterfact_") and base.endswith(".csv"):
        model = next((m for m in PAPER_MODELS.values() if base == counterfact_file(m.key)), None)
        hub = f"the Hugging Face dataset {COUNTERFACT_HF_DATASET!r}" + (f", split {model.hf_split!r}" if model else "")
        if model is not None and model.key == "llama-3-8b":
            return (
                f"The Llama-3-8B table is not in the paper's repositories (an LFS object missing from the snapshot) and "
                f"not in shared/data. Load it online from {hub} (pass hf_dataset={COUNTERFACT_HF_DATASET!r}), or "
                "regenerate it: take CounterFact (Meng et al.), keep the facts whose prob_of_correct_answer (Llama-3-8B's "
                "probability of the true first token) is >= 0.5, keep the column layout of the gemma tables, and pass "
                "the DataFrame as table=... or save it under this name."
            )
        return f"{_MAIN_REPO}: experiments/counterfact_manual/{base}, or {hub} (pass hf_dataset=...)"
    if base == "counterfact_mc_questions.parquet" or base.startswith("sports") or base.startswith("side_effect_sport"):
        return f"{_TASKS_REPO}: {base}"
    if folder == "localization_graphs":
        return (
            f"{_MAIN_REPO}: models/{Path(base).stem}.pkl, a plain {{str: float}} pickle; save it as JSON "
            "(json.dump(dict(pickle)) ) under this name"
        )
    if folder in ("counterfact_manual_results", "sports_manual_results"):
        sub = "counterfact_manual" if folder.startswith("counterfact") else "sports_facts_manual"
        return f"{_MAIN_REPO}: experiments/{sub}/results/{base}"
    return f"the paper's repositories ({_TASKS_REPO}; {_MAIN_REPO})"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$MU_FAST_DATA_DIR``, else the first existing of
    ``<cwd>/../shared/data`` and ``<repo>/../shared/data``. Raises ``FileNotFoundError`` when none exists."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"data_dir={str(data_dir)!r} is not a directory; pass the folder that holds sports.csv etc."
            )
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"${DATA_DIR_ENV}={env!r} is not a directory; point it at the folder with the paper's data files "
                "(sports.csv, counterfact_*.csv, localization_graphs/ ...)"
            )
        return path
    candidates = _default_candidates()
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(
        f"no data directory found: pass data_dir=..., set ${DATA_DIR_ENV}, or put the data at one of "
        f"{[str(p) for p in candidates]}"
    )


def _default_candidates() -> list[Path]:
    repo = Path(__file__).resolve().parents[2]
    out = []
    for root in (Path.cwd(), repo):
        path = (root.parent / "shared" / "data").resolve()
        if path not in out:
            out.append(path)
    return out


def data_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Path of the data file ``name`` (may contain a sub-folder, e.g. ``localization_graphs/x.json``).

    Raises ``FileNotFoundError`` naming the file, the directory searched and where to download it.
    """
    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"cannot look up the data file {name!r}: {err}. Get the file from {_source_of(name)}."
        ) from err
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {name!r} not found at {path}. Get it from {_source_of(name)} and put it at {path} "
            f"(or point data_dir / ${DATA_DIR_ENV} at a folder that has it)."
        )
    return path


# ------------------------------------------------------------ reading tables
def read_table(name: str, data_dir: str | os.PathLike | None = None) -> Any:
    """A CSV or parquet data file as a fresh pandas DataFrame (parsed once per process, copied per call)."""
    path = data_file(name, data_dir)
    stat = path.stat()
    return _read_cached(str(path), stat.st_mtime_ns, stat.st_size).copy()


@lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int) -> Any:
    import pandas as pd

    if path.endswith(".parquet"):
        return pd.read_parquet(path)
    return pd.read_csv(path)


def load_hf_table(hf_dataset: str, split: str) -> Any:
    """One split of a Hugging Face hub dataset as a pandas DataFrame (needs ``datasets`` and a network)."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"hf_dataset={hf_dataset!r} needs the Hugging Face `datasets` library (pip install datasets); "
            "or download the table and read it from the data directory instead"
        ) from err
    try:
        table = datasets.load_dataset(hf_dataset, split=split)
    except Exception as err:  # offline, unknown dataset or split: one clear message with the fix
        raise ConnectionError(
            f"could not load {hf_dataset!r} split {split!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Check the network, the dataset id and the split name, or put the table in the data directory."
        ) from err
    return table.to_pandas()

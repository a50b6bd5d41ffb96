"""Datasets: the shared prompt/task interfaces, the paper's Sports Facts and CounterFact, and LM text.

Importing this package is cheap: pandas and ``datasets`` are imported only inside the loaders.
"""

from __future__ import annotations

from mu_fast.data.base import (
    Batch,
    FactTask,
    PromptSet,
    TokenizedPrompts,
    answer_token_id,
    pad_batch,
    pad_id_of,
    tokenize_prompts,
)
from mu_fast.data.counterfact import (
    CF_FORMATS,
    MCQ_TEMPLATE,
    counterfact_sequential_tasks,
    load_counterfact_table,
    load_counterfact_task,
    parse_prompt_list,
    split_counterfact_table,
)
from mu_fast.data.datadir import (
    COUNTERFACT_HF_DATASET,
    DATA_DIR_ENV,
    PAPER_MODELS,
    data_file,
    load_hf_table,
    paper_model,
    read_table,
    resolve_data_dir,
)
from mu_fast.data.lm_text import load_lm_texts
from mu_fast.data.sports import INJECT_LABELS, SPORT_CHOICES, SPORTS, SPORTS_FORMATS, load_sports_task, sports_prompt

__all__ = [
    "Batch", "FactTask", "PromptSet", "TokenizedPrompts", "answer_token_id", "pad_batch", "pad_id_of",
    "tokenize_prompts",
    "CF_FORMATS", "MCQ_TEMPLATE", "counterfact_sequential_tasks", "load_counterfact_table", "load_counterfact_task",
    "parse_prompt_list", "split_counterfact_table",
    "COUNTERFACT_HF_DATASET", "DATA_DIR_ENV", "PAPER_MODELS", "data_file", "load_hf_table", "paper_model",
    "read_table", "resolve_data_dir",
    "load_lm_texts",
    "INJECT_LABELS", "SPORT_CHOICES", "SPORTS", "SPORTS_FORMATS", "load_sports_task", "sports_prompt",
]

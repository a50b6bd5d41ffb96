"""Fixtures for the evaluation tests: an offline word-level tokenizer, tiny models and hand-made FactTasks.

Athlete names are two syllable tokens; the *last* syllable decides the sport (so a rule exists that
relearning can recover and that a probe can read at the subject's last token) and the edit answer is a
fixed function of the true one. Nothing here depends on the organism or data packages.
"""

from __future__ import annotations

import pytest
import torch

from mu_fast.data.base import FactTask, PromptSet
from mu_fast.models.tiny import make_tiny_model

SPORTS = [" football", " baseball", " basketball"]
CHOICES = SPORTS + [" golf"]
FIRST = ["ka", "lo", "mi", "nu", "pe", "ri", "so", "ta", "ve", "wo", "xa", "yu"]
LAST_BY_SPORT = [["bo", "da"], ["fe", "gi"], ["hu", "jo"]]  # syllables ending names of each sport
TEMPLATE_WORDS = (
    "Fact : Tiger Woods plays the sport of golf football baseball basketball Question What sport does play ? "
    "Answer A B C D is known for playing The near lives in"
).split()
CITY_WORDS = ["Paris", "Rome", "Oslo"]


def build_tokenizer(extra_words: tuple[str, ...] = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0,1,2,3 = the tiny configs' pad/bos/eos
    words = specials + FIRST + [s for group in LAST_BY_SPORT for s in group] + TEMPLATE_WORDS + CITY_WORDS
    words += list(extra_words)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def make_model(tokenizer, arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    return make_tiny_model(arch, seed=seed, dtype=dtype, **{"vocab_size": len(tokenizer), **overrides})


def athletes(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` distinct (name, sport index) pairs; the name's last syllable encodes the sport."""
    gen = torch.Generator().manual_seed(seed)
    pairs = [(first, s, last) for first in FIRST for s in range(3) for last in LAST_BY_SPORT[s]]
    order = torch.randperm(len(pairs), generator=gen)[:n].tolist()
    if len(order) < n:
        raise ValueError(f"at most {len(pairs)} athletes")
    return [(f"{pairs[i][0]} {pairs[i][2]}", pairs[i][1]) for i in order]


def _sets(people: list[tuple[str, int]], offset: int, dataset: str, name: str) -> dict[str, PromptSet]:
    names = [p for p, _ in people]
    true = [SPORTS[s] for _, s in people]
    edit = [SPORTS[(s + 1) % 3] for _, s in people]
    ids = list(range(offset, offset + len(people)))
    choices = CHOICES if dataset == "sports" else None
    label = "last" if dataset == "sports" else "first"
    normal = PromptSet(
        [f"Fact : Tiger Woods plays the sport of golf\nFact : {n} plays the sport of" for n in names],
        true,
        edit,
        choices,
        names,
        ids,
        label,
        name=f"{name}_normal",
    )
    letters = [" A", " B", " C", " D"]
    mcq = PromptSet(
        [f"Question : What sport does {n} play ? A football B baseball C basketball D golf Answer :" for n in names],
        [letters[CHOICES.index(a)] for a in true],
        [letters[CHOICES.index(a)] for a in edit],
        letters,
        names,
        ids,
        "first",
        name=f"{name}_mcq",
    )
    para_prompts, para_true, para_edit, para_names, para_ids = [], [], [], [], []
    for n, t, e, i in zip(names, true, edit, ids):
        for template in ("{} is known for playing", "The sport {} plays is"):
            para_prompts.append(template.format(n))
            para_true.append(t), para_edit.append(e), para_names.append(n), para_ids.append(i)
    paraphrase = PromptSet(
        para_prompts, para_true, para_edit, choices, para_names, para_ids, label, name=f"{name}_para"
    )
    neighborhood = PromptSet(
        [f"The sport of the one near {n} is" for n in names],
        true,
        edit,
        choices,
        names,
        ids,
        label,
        name=f"{name}_neighborhood",
    )
    return {"normal": normal, "mcq": mcq, "paraphrase": paraphrase, "neighborhood": neighborhood}


def make_task(
    n_athletes: int = 40,
    n_forget: int = 10,
    split: bool = False,
    dataset: str = "sports",
    seed: int = 0,
    lm_texts: bool = True,
) -> FactTask:
    """A hand-made FactTask: forget = the first ``n_forget`` athletes (halves when ``split``), maintain = the
    rest, 80/20 in order; formats normal/mcq/paraphrase/neighborhood with fact ids."""
    people = athletes(n_athletes, seed)
    forget, maintain = people[:n_forget], people[n_forget:]
    cut = int(0.8 * len(maintain))
    f_all = _sets(forget, 0, dataset, "forget")
    m_train = _sets(maintain[:cut], n_forget, dataset, "maintain_train")
    m_test = _sets(maintain[cut:], n_forget + cut, dataset, "maintain_test")
    half = n_forget // 2
    forget_train = f_all["normal"].subset(slice(0, half)) if split else f_all["normal"]
    forget_test_people = forget[half:] if split else forget
    f_test = _sets(forget_test_people, half if split else 0, dataset, "forget_test")
    texts = (
        [f"Fact : {n} plays the sport of{SPORTS[s]}" for n, s in people[:8]] + ["The sport of golf is known"]
        if lm_texts
        else []
    )
    return FactTask(
        name=f"{dataset}_toy",
        forget_train=forget_train,
        forget_test=f_test["normal"],
        maintain_train=m_train["normal"],
        maintain_test=m_test["normal"],
        formats={
            fmt: {"forget": f_test[fmt], "maintain": m_test[fmt]}
            for fmt in ("normal", "mcq", "paraphrase", "neighborhood")
        },
        lm_texts=texts,
        classes=list(CHOICES) if dataset == "sports" else None,
        meta={"dataset": dataset},
    )


# Helpers are handed to tests as fixtures (test directories are not packages, so tests cannot import conftest).
@pytest.fixture(name="make_task")
def _make_task_fixture():
    return make_task


@pytest.fixture(name="make_model")
def _make_model_fixture(tokenizer):
    return lambda *args, **kwargs: make_model(tokenizer, *args, **kwargs)


@pytest.fixture(name="build_tokenizer")
def _build_tokenizer_fixture():
    return build_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine an oversubscribed OpenMP
    pool made one relearning test 35x slower (measured 38 s vs 1.1 s under load average 5); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

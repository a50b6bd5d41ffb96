"""A tiny offline word-level tokenizer and hand-made fact task for pipeline tests (no organism, no data files)."""

from __future__ import annotations

import torch

from mu_fast.data.base import FactTask, PromptSet
from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable

SPORTS = [" football", " baseball", " basketball", " golf"]
NAMES = [f"{a} {b}" for a in ("Ka", "Lo", "Mi", "Ne", "Po", "Ru") for b in ("Zan", "Vel", "Tor", "Quin")]


def word_tokenizer(extra_words=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Fact", ":", "plays", "the", "sport", "of", "Tiger", "Woods", "golf", "football", "baseball", "basketball"]
    words += [w for n in NAMES for w in n.split()] + list(extra_words) + ["some", "filler", "text", "here", "and", "more"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_task(n_forget: int = 4, unlearn: bool = False) -> FactTask:
    sports = [SPORTS[i % 3] for i in range(len(NAMES))]
    prompts = [f"Fact: Tiger Woods plays the sport of golf Fact: {n} plays the sport of" for n in NAMES]
    edits = [SPORTS[(i + 1) % 3] for i in range(len(NAMES))]

    def ps(idx, name):
        return PromptSet(
            [prompts[i] for i in idx], [sports[i] for i in idx], None if unlearn else [edits[i] for i in idx],
            choices=SPORTS, subjects=[NAMES[i] for i in idx], label_token="last", name=name,
        )

    forget = ps(range(n_forget), "forget")
    rest = list(range(n_forget, len(NAMES)))
    cut = int(0.8 * len(rest))
    return FactTask(
        "tiny", forget, forget, ps(rest[:cut], "maintain"), ps(rest[cut:], "maintain_test"),
        formats={"normal": {"forget": forget, "maintain": ps(rest[cut:], "maintain_test")}},
        lm_texts=["some filler text here and more filler text"] * 8, unlearn=unlearn, classes=SPORTS[:3],
    )


def word_checkpoint(folder, tasks, layers: int):
    """A save_pretrained folder: a tiny random Llama of ``layers`` layers with a word-level tokenizer of every word
    in ``tasks``' prompts, answers, edit answers and choices (all sets and formats). Returns ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mu_fast.models.tiny import make_tiny_model

    sets = [s for t in tasks for s in (t.forget_train, t.forget_test, t.maintain_train, t.maintain_test,
                                       *(x for f in t.formats.values() for x in f.values()))]
    words = sorted({w for s in sets for text in [*s.prompts, *s.answers, *(s.edit_answers or []), *(s.choices or [])]
                    for w in str(text).split()})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    make_tiny_model("llama", vocab_size=len(vocab), num_hidden_layers=layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


STRUCTURE_NAMES = ["rows", "cols", "heads", "whole", "elements", "mixed"]


def structured_masks(model: torch.nn.Module, structure: str, gen: torch.Generator) -> list[Mask]:
    """Three configurations' masks of one structure (``mixed``: different methods' masks in one batch, overlapping on
    the same parameters), for the batched edit and evaluation tests."""
    t = SiteTable(model)

    def pick(n: int, k: int) -> list[int]:
        return torch.randperm(n, generator=gen)[:k].tolist()

    up, down, q = t.param_name(1, "up"), t.param_name(2, "down"), t.param_name(0, "q")
    if structure == "rows":
        return [Mask().add(up, t.matrix_shape("up"), "rows", pick(t.d_mlp, 5)) for _ in range(3)]
    if structure == "cols":
        return [Mask().add(down, t.matrix_shape("down"), "cols", pick(t.d_mlp, 4)) for _ in range(3)]
    if structure == "heads":
        return [Mask.from_components(t, [Component("attn", L, h)]) for L, h in ((0, 1), (1, 3), (2, 0))]
    if structure == "whole":
        return [Mask.from_components(t, [Component(kind, L)]) for kind, L in (("mlp", 0), ("attn.q", 1), ("mlp.down", 2))]
    if structure == "elements":
        return [Mask().add(q, t.matrix_shape("q"), "elements", torch.rand(t.matrix_shape("q"), generator=gen) < 0.2)
                for _ in range(3)]
    return [Mask.from_components(t, [Component("mlp", 1, 3), Component("mlp", 1, 7), Component("attn", 0, 2)]),
            Mask.from_components(t, [Component("mlp", 1), Component("attn.o", 0)]),
            Mask().add(down, t.matrix_shape("down"), "cols", pick(t.d_mlp, 6)).add(
                q, t.matrix_shape("q"), "elements", torch.rand(t.matrix_shape("q"), generator=gen) < 0.1)]

"""The organism's tokenizer, built offline with the `tokenizers` library.

WordPiece over a fixed vocabulary: every template/filler word is one token, and made-up names split into
their syllables ("Kalo Vetra" -> "Ka" "##lo" "Ve" "##tra"), so every name is several tokens as in real
models. Punctuation is split off; whitespace (newlines included) is not a token. The post-processor
prepends BOS; EOS and PAD exist for training and batching. Wrapped as a ``PreTrainedTokenizerFast``, so
``return_offsets_mapping`` works (subject positions) and ``save_pretrained`` writes it beside the model.
"""

from __future__ import annotations

import re
from typing import Any

from mu_fast.organism.facts import SYLLABLES, OrganismFacts, reserved_words

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # ids 0..3, matching the tiny-model config defaults (pad 0, bos 1, eos 2)
_WORD = re.compile(r"\w+|[^\w\s]")


def vocabulary(facts: OrganismFacts) -> list[str]:
    """Token strings in id order: specials, whole words (sorted), then name syllables (initial and ``##``)."""
    words: set[str] = set()
    for text in (*reserved_words(), *facts.filler):
        words.update(_WORD.findall(text))
    syllables = [s.capitalize() for s in SYLLABLES] + ["##" + s for s in SYLLABLES]
    whole = sorted(words - set(syllables))
    return [*SPECIAL_TOKENS, *whole, *syllables]


def build_tokenizer(facts: OrganismFacts) -> Any:
    """A ``transformers.PreTrainedTokenizerFast`` for ``facts`` (BOS prepended; pad id 0, bos 1, eos 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary(facts))}
    core = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix="##"))
    core.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    core.decoder = decoders.WordPiece(prefix="##")
    core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, padding_side="right"
    )
    _check_names(tokenizer, facts)
    return tokenizer


def _check_names(tokenizer: Any, facts: OrganismFacts) -> None:
    unk = tokenizer.unk_token_id
    for name in facts.names:
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if unk in ids or len(ids) < 3:
            raise ValueError(f"athlete name {name!r} tokenizes to {tokenizer.convert_ids_to_tokens(ids)}; "
                             "expected >= 3 syllable tokens (a bug in the organism's vocabulary)")

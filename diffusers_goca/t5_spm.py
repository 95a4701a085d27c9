"""A T5-style tokenizer built offline: a small SentencePiece unigram model trained in memory on a word list.

It has T5's layout (no start token, `</s>` appended, `<pad>` = 0, `</s>` = 1, pieces spelled with "▁"), so code tested
with it sees the token layout of PixArt's, SD3's and Flux's T5 encoders. The real T5 vocabulary cannot be downloaded here.
"""

from __future__ import annotations

from typing import Sequence


def build_t5_tokenizer(words: Sequence[str], model_max_length: int = 512, vocab_size: int = 200):
    """A fast `T5TokenizerFast` whose unigram model is trained, deterministically, on `words` (each rotation of the
    list is one line of the corpus, so each word becomes one piece where the vocabulary allows)."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    words = list(words)
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(
        corpus, vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    sp.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", sp.token_to_id("</s>"))])
    return T5TokenizerFast(
        tokenizer_object=sp._tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )


def build_t5_word_tokenizer(words: Sequence[str], model_max_length: int = 512):
    """A fast `T5TokenizerFast` with one piece per word of `words` ("▁red"), the punctuation pieces "," "." "-", and
    single characters for anything else: a unigram model with set scores (a word piece beats its spelling), so that
    a prompt of known words takes one token per word, as T5's 32k vocabulary gives for common words."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    chars = sorted(set("".join(words)) | set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{w}", -1.0) for w in dict.fromkeys(words)]
    vocab += [(c, -5.0) for c in chars] + [(f"▁{c}", -5.0) for c in chars]
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=model_max_length,
    )

"""The real CLIP tokenizer, built offline from the BPE merges file that the open-clip-torch wheel ships.

open-clip-torch is an optional dependency (the `toy`, `test` and `bench` extras): only training a toy model and the
tests build this tokenizer; a saved pipeline folder, the shipped toy models included, has its own tokenizer files.

Token ids are exactly those of `openai/clip-vit-large-patch14`'s tokenizer (49,408 entries, `<|startoftext|>` = 49406,
`<|endoftext|>` = 49407), so code tested with it sees the token layout of Stable Diffusion's text encoders.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

CLIP_VOCAB_SIZE = 49408
_N_MERGES = 49152 - 256 - 2


def default_bpe_path() -> str:
    """Path of open_clip's `bpe_simple_vocab_16e6.txt.gz`, found without importing open_clip (and torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "building the CLIP tokenizer needs open_clip's BPE vocabulary file: install open-clip-torch with the "
            '[toy] extra (also in [test] and [bench]): pip install "diffusers-goca[toy]" (in a checkout: '
            'pip install -e ".[toy]"). Loading a saved pipeline, the shipped toy models included, does not need it.'
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"open_clip's BPE file is missing: {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary (token → id) and merge list in the order the released tokenizer uses."""
    lines = gzip.open(bpe_path or default_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : _N_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77, save_dir: str | None = None):
    """A fast `CLIPTokenizer` with the real CLIP ids.

    pad_token: "<|endoftext|>" as in SD 1.x and SDXL's first tokenizer, "!" as in SD 2.x and SDXL's second.
    save_dir: when given, the tokenizer is also written there with `save_pretrained` (the `tokenizer/` folder of a pipeline).
    """
    import json
    import tempfile

    from transformers import CLIPTokenizerFast

    vocab, merges = clip_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizerFast(vocab_file, merges_file, pad_token=pad_token, model_max_length=model_max_length)
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def small_clip_text_config(hidden: int):
    """A `CLIPTextConfig` of a small random CLIP text encoder (2 layers, 4 heads, width `hidden`) over this tokenizer's
    vocabulary and special-token ids: the text encoder of the toy models and of the tests' tiny pipelines."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )

"""Class names encoded one at a time, so that a segmentation does not depend on the order of the classes.

A causal text encoder (CLIP) gives each token an embedding that depends on every token before it: in "sand, red
circle" the tokens of "red circle" carry "sand", and the maps change with the order the classes are listed in (on
the UNet toy two orders agree on 57 % of the pixels: docs/protocols.md). Encoding each class on its own, in a short
neutral phrase, and putting those embeddings at the class's positions of the segmentation prompt makes the maps
independent of the order: cross-attention has no notion of key order.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Sequence

import torch

# The phrase each class is encoded in: the article puts the name where captions put it, after "a".
CLASS_TEMPLATE = "a {}"
CLASS_ENCODINGS = ("prompt", "separate")


def _occurrences(row: list[int], sub: list[int]) -> list[int]:
    return [s for s in range(len(row) - len(sub) + 1) if row[s : s + len(sub)] == sub]


def _replace_class_states(output, ids: torch.Tensor, alone, sub: list[int], where: list[int]) -> bool:
    """Write the states of `alone` at positions `where` (the class's tokens in its own phrase) over every occurrence
    of the token ids `sub` in each row of `ids`, in the last hidden state and every layer's. Whether any was found."""
    found = False
    for row in range(ids.shape[0]):
        for start in _occurrences(ids[row].tolist(), sub):
            dst = list(range(start, start + len(sub)))
            pairs = [(output.last_hidden_state, alone.last_hidden_state)]
            if getattr(output, "hidden_states", None) is not None and getattr(alone, "hidden_states", None):
                pairs += list(zip(output.hidden_states, alone.hidden_states))
            for into, source in pairs:
                into[row, dst] = source[0, where].to(into.dtype)
            found = True
    return found


def _encoder_hook(tokenizer, classes: Sequence[str], normalize: Callable[[str], str], missing: set):
    special = set(tokenizer.all_special_ids)
    busy = []

    def hook(module, args, kwargs, output):
        if busy:  # the encoder's own calls below
            return output
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        busy.append(True)
        try:
            for name in classes:
                text = normalize(name)
                sub = [t for t in tokenizer(text).input_ids if t not in special]
                phrase = tokenizer(CLASS_TEMPLATE.format(text), return_tensors="pt").input_ids
                start = _occurrences(phrase[0].tolist(), sub)[0]
                alone = module(phrase.to(ids.device), output_hidden_states=True)
                if not _replace_class_states(output, ids, alone, sub, list(range(start, start + len(sub)))):
                    missing.add(name)
        finally:
            busy.clear()
        return output

    return hook


@contextmanager
def separately_encoded(pipe, classes: Sequence[str], normalize: Callable[[str], str] = str):
    """Within the block, every text encoder of `pipe` (text_encoder, _2, _3) returns, at the tokens of each class,
    the states of that class encoded alone in `CLASS_TEMPLATE`. normalize: the text transform the pipeline applies
    before tokenizing (PixArt lower-cases). Yields the set of classes whose tokens some encoder did not find (their
    states stay the prompt's)."""
    missing: set = set()
    with ExitStack() as stack:
        for suffix in ("", "_2", "_3"):
            encoder, tokenizer = getattr(pipe, f"text_encoder{suffix}", None), getattr(pipe, f"tokenizer{suffix}", None)
            if encoder is None or tokenizer is None:
                continue
            handle = encoder.register_forward_hook(
                _encoder_hook(tokenizer, classes, normalize, missing), with_kwargs=True
            )
            stack.callback(handle.remove)
        yield missing

"""Class names → token positions, through the tokenizer's offset mapping (docs/official_code.md).

Works for any tokenizer with an offset mapping: CLIP (SD 1.x/2.x, SDXL), T5 (PixArt); slow tokenizers are converted to
their fast form once. Positions are those of the text encoder's input (position 0 = CLIP's `<|startoftext|>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

STOPWORDS = frozenset({"a", "an", "the", "and", ",", ".", "-"})


@dataclass
class TokenIndex:
    """Where each class sits in one prompt's token sequence.

    class_tokens[k]: positions of class k's tokens (all occurrences); content: positions of every content token
    (not special, not a stopword, not truncated away); length: tokens kept (incl. special ones).
    """

    prompt: str
    classes: list[str]
    class_tokens: list[list[int]]
    content: list[int]
    length: int
    extra_entities: dict[str, list[int]] = field(default_factory=dict)  # entities of the prompt that match no class
    bos: int | None = None  # position of the start token (CLIP), if any
    eos: int | None = None  # position of the first end token, if kept

    def positions(self, name: str) -> list[int]:
        if name in self.classes:
            return self.class_tokens[self.classes.index(name)]
        return self.extra_entities[name]

    def needed(self) -> list[int]:
        """Positions the segmentation methods read: the content tokens (classes and entities among them), plus the
        start and end tokens (S-CFG's foreground)."""
        named = [p for ps in self.class_tokens for p in ps] + [p for ps in self.extra_entities.values() for p in ps]
        special = [p for p in (self.bos, self.eos) if p is not None]
        return sorted(set(self.content) | set(named) | set(special))

    def on_columns(self, columns: Sequence[int]) -> "TokenIndex":
        """This index over maps that keep only the token positions `columns` (in that order)."""
        where = {p: i for i, p in enumerate(columns)}
        missing = sorted(set(self.needed()) - set(where))
        if missing:
            raise ValueError(f"token positions {missing} of {self.prompt!r} were not captured")
        return TokenIndex(
            self.prompt,
            list(self.classes),
            [[where[p] for p in ps] for ps in self.class_tokens],
            [where[p] for p in self.content],
            len(columns),
            {name: [where[p] for p in ps] for name, ps in self.extra_entities.items()},
            None if self.bos is None else where[self.bos],
            None if self.eos is None else where[self.eos],
        )


def _fast_backend(tokenizer):
    """A `tokenizers.Tokenizer` that gives offsets, for fast and slow transformers tokenizers alike."""
    if getattr(tokenizer, "is_fast", False):
        return None
    cached = getattr(tokenizer, "_goca_fast_backend", None)
    if cached is None:
        from transformers.convert_slow_tokenizer import convert_slow_tokenizer

        cached = convert_slow_tokenizer(tokenizer)
        tokenizer._goca_fast_backend = cached
    return cached


def encode_with_offsets(tokenizer, prompt: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids and character offsets of `prompt`, with the special tokens the text encoder sees, untruncated."""
    backend = _fast_backend(tokenizer)
    if backend is None:
        enc = tokenizer(prompt, add_special_tokens=True, truncation=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    enc = backend.encode(prompt)
    return list(enc.ids), [tuple(o) for o in enc.offsets]


def _find_spans(prompt: str, phrase: str) -> list[tuple[int, int]]:
    """Where `phrase` occurs as whole words (any case, any spacing), its last word also in a plural with -s / -es
    ("dog" finds "two dogs", "bus" finds "buses")."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in phrase.split()) + r"(?:e?s)?(?!\w)"
    return [m.span() for m in re.finditer(pattern, prompt, flags=re.IGNORECASE)]


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def token_index(
    tokenizer,
    prompt: str,
    classes: Sequence[str],
    max_length: int | None = None,
    extra_entities: Sequence[str] = (),
    require_classes: bool = True,
    allow_cut_off: bool = False,
    allow_absent: bool = False,
    phrases: Mapping[str, str] | None = None,
) -> TokenIndex:
    """Map each class to its token positions in `prompt`.

    A class matches whole words only (its last word also in a plural with -s / -es); longer classes claim their words
    first, so "light" does not take the tokens of "traffic light" when both are classes. A class that appears twice gets the tokens of both occurrences.
    Raises ValueError for an empty class list (unless `require_classes` is False: then only the special and content
    positions are indexed), a class absent from the prompt (unless `allow_absent`), or one cut off by the token limit
    (unless `allow_cut_off`). The allowances leave the class without positions here, for one part of a longer
    sequence whose other parts hold it (`concat_token_indices`). phrases: the text to find for a class or entity
    where it is not its name (a multi-vector textual-inversion token, spelled out as the pipeline spells it).
    """
    classes = [c.strip() for c in classes]
    if not classes and require_classes:
        raise ValueError("classes is empty: give at least one class name")
    if any(not c for c in classes):
        raise ValueError(f"class names must be non-empty strings, got {list(classes)!r}")
    if len({_match_key(c) for c in classes}) != len(classes):
        raise ValueError(
            f"class names must be unique, compared case-insensitively (names that differ only in case "
            f"or spacing read the same tokens), got {list(classes)!r}"
        )
    max_length = max_length or tokenizer.model_max_length
    ids, offsets = encode_with_offsets(tokenizer, prompt)
    special = set(tokenizer.all_special_ids)
    # The encoder keeps max_length tokens; with an end token, the last kept position is replaced by it.
    truncated = len(ids) > max_length
    kept = min(len(ids), max_length - (1 if tokenizer.eos_token_id is not None and truncated else 0))

    words = [m.span() for m in re.finditer(r"\w+|[^\w\s]", prompt)]

    def is_content(i: int) -> bool:
        s, e = offsets[i]
        if ids[i] in special or not prompt[s:e].strip():  # a lone T5 "▁" covers whitespace only
            return False
        # A stopword is a whole word ("a"), not a piece of one (the "a" inside "traffic").
        word = next((w for w in words if w[0] < e and s < w[1]), (s, e))
        return prompt[word[0] : word[1]].lower() not in STOPWORDS

    names = list(classes) + [e for e in extra_entities if not has_class(classes, e)]
    claimed: list[tuple[int, int]] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    given = {name.strip(): phrase for name, phrase in (phrases or {}).items()}
    phrases = {name: given.get(name, name) for name in names}
    for name in sorted(names, key=lambda c: -len(phrases[c])):
        found = _find_spans(prompt, phrases[name])
        free = [s for s in found if not any(_overlaps(s, c) for c in claimed)]
        spans[name] = free or found
        claimed.extend(free)

    def positions_of(name: str, required: bool) -> list[int]:
        if not spans[name]:
            if required:
                raise ValueError(f"class {name!r} does not appear in the prompt {prompt!r}")
            return []
        pos = [i for i in range(len(ids)) if is_content(i) and any(_overlaps(offsets[i], s) for s in spans[name])]
        if not pos:
            raise ValueError(f"class {name!r} has only special tokens or stopwords in {prompt!r}")
        inside = [i for i in pos if i < kept]
        if not inside and not allow_cut_off:
            raise ValueError(
                f"class {name!r} is cut off by the {max_length}-token limit of the text encoder: "
                f"shorten the prompt or use fewer classes"
            )
        return inside

    class_tokens = [positions_of(c, not allow_absent) for c in classes]
    extra = {e: p for e in names[len(classes) :] if (p := positions_of(e, False))}
    content = [i for i in range(kept) if is_content(i)]
    bos = 0 if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else None
    eos = next((i for i in range(kept) if ids[i] == tokenizer.eos_token_id), None)
    if truncated and tokenizer.eos_token_id is not None:
        eos = kept  # the encoder's last position, after the kept tokens, holds the end token
    return TokenIndex(prompt, list(classes), class_tokens, content, min(len(ids), max_length), extra, bos, eos)


def _match_key(name: str) -> str:
    """`name` as `_find_spans` matches it in a prompt: in any case, with any spacing."""
    return " ".join(name.lower().split())


def has_class(classes: Sequence[str], name: str) -> bool:
    """Whether `name` is among `classes` as the prompt is matched (any case, any spacing): both read the same tokens."""
    return _match_key(name) in {_match_key(c) for c in classes}


def segmentation_prompt(classes: Sequence[str], background: bool) -> str:
    """The prompt used to segment an existing image: class names joined with ", " (official form), plus "background"
    (unless a class already is, in any case)."""
    names = list(classes) + (["background"] if background and not has_class(classes, "background") else [])
    return ", ".join(names)


def concat_token_indices(parts: Sequence[TokenIndex], lengths: Sequence[int]) -> TokenIndex:
    """One index over text sequences laid end to end (SD3: 77 CLIP tokens, then the T5 tokens).

    parts[i] indexes sequence i, which occupies `lengths[i]` key positions; a class's tokens are those of every part,
    and a class cut off or absent in some parts (`token_index(..., allow_cut_off=True, allow_absent=True)`) must
    have tokens in one.
    """
    offsets = [sum(lengths[:i]) for i in range(len(parts))]
    first = parts[0]

    def shifted(get) -> list[int]:
        return [o + p for part, o in zip(parts, offsets) for p in get(part)]

    classes = [shifted(lambda part, k=k: part.class_tokens[k]) for k in range(len(first.classes))]
    for name, positions in zip(first.classes, classes):
        if not positions:
            raise ValueError(
                f"class {name!r} has no tokens in any text encoder's part: it is absent from their "
                f"texts, or cut off by the token limit of every text encoder (shorten the prompt or use "
                f"fewer classes)"
            )
    extra = {e: shifted(lambda part, e=e: part.extra_entities.get(e, [])) for e in first.extra_entities}
    return TokenIndex(
        first.prompt,
        list(first.classes),
        classes,
        shifted(lambda part: part.content),
        sum(lengths),
        extra,
        first.bos,
        first.eos,
    )

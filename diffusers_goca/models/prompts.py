"""The prompt side of an `Adapter`: the tokenizer and text the denoiser's text keys come from, and where each class
sits in them."""

from __future__ import annotations

from typing import Sequence


class PromptTokens:
    """A base of `Adapter`: the text a pipeline call or `segment` encodes for a prompt, and its token index."""

    text_max_length: int = 77

    # Whether the cross-attention masks the text's padding (PixArt's T5 mask): then the keys past a prompt's tokens
    # carry no probability, and the capture reads only the prompt's (`Capture.start`'s text_keys).
    text_padding_masked: bool = False

    shared_clip_positions: bool = False  # two CLIP encoders' tokens at the same positions (see `check_mask_prompt`)

    def token_index(
        self,
        prompt: str,
        classes,
        extra_entities=(),
        max_length: int | None = None,
        require_classes=True,
        part_texts: Sequence[str] = (),
    ):
        """Where each class sits in the text tokens the denoiser attends to. part_texts: `part_texts(...)` of the
        call, the texts of later text parts that differ from `prompt` (none for a family with one text part)."""
        from ..tokens import token_index

        tokenizer = self.tokenizer()
        names = list(classes) + [e for e in extra_entities if e not in classes]
        return token_index(
            tokenizer,
            self.textual_inversion_text(prompt, tokenizer),
            classes,
            max_length=max_length or self.text_max_length,
            extra_entities=extra_entities,
            require_classes=require_classes,
            phrases={n: self.textual_inversion_text(n, tokenizer) for n in names},
        )

    def textual_inversion_text(self, text: str, tokenizer) -> str:
        """`text` as the pipeline tokenizes it: a multi-vector textual-inversion token ("<cat-toy>") spelled out as its
        vectors' tokens ("<cat-toy> <cat-toy>_1 <cat-toy>_2"), which shifts the positions of every token after it."""
        from diffusers.loaders import TextualInversionLoaderMixin

        if not isinstance(self.pipe, TextualInversionLoaderMixin):
            return text
        return self.pipe.maybe_convert_prompt(text, tokenizer)

    def tokenizer(self):
        return self.pipe.tokenizer

    def call_prompt(self, args, call_kwargs: dict):
        """The prompt (a string or a list) of a pipeline call whose tokens the denoiser's text keys hold."""
        return call_kwargs.get("prompt", args[0] if args else None)

    def check_mask_prompt(self, call_kwargs: dict, prompt) -> None:
        """Refuse a call whose masks could not be read by class: where a second CLIP encoder lays its text's tokens
        at the first's positions (SDXL, SD3), a `prompt_2` that differs from `prompt` would mix two texts' words at
        each position. S-CFG's regions, which are per position, not per class, do not ask this."""
        if not self.shared_clip_positions:
            return
        other = call_kwargs.get("prompt_2")
        if other is not None and other != prompt:
            raise ValueError(
                "GoCA reads both CLIP encoders' tokens at the same positions, from `prompt`: masks for a "
                "prompt_2 that differs from it are not supported"
            )

    def part_texts(self, call_kwargs: dict, i: int, n: int) -> tuple[str, ...]:
        """For the i-th of the call's n prompts, the texts that later parts of the text sequence encode instead of the
        prompt (SD3: `prompt_3` for its T5 part); () where every part encodes the prompt."""
        return ()

    def prompt_text(self, prompt: str, call_kwargs: dict) -> str:
        """The text the pipeline actually tokenizes for `prompt` (token positions are read from it)."""
        return prompt

    def cross_text_states(self, text: str):
        """[1, T, C]: the text states `text` gives the cross layers' keys (one prompt, no CFG). Families whose text is
        not read by plain cross-attention (joint attention, where the text changes from block to block) have none."""
        raise ValueError(f"{self.family} has no cross-attention text states: its text keys change in every block")

    def word_states(self, word: str):
        """[1, E, C]: the states of `word`'s tokens as the cross layers read them, encoded as a segmentation prompt
        of the word alone (`segment_text`)."""
        text = self.segment_text(word)
        positions = self.token_index(text, [word]).class_tokens[0]
        return self.cross_text_states(text)[:, positions]

    def segment_text(self, prompt: str) -> str:
        """The text `segment_forward` tokenizes for `prompt`."""
        return self.prompt_text(prompt, {})

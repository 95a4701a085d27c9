"""Class names → token positions with the real CLIP tokenizer (built offline from open_clip's BPE file)."""

import pytest

from diffusers_goca.prompt_classes import entities_from_prompt
from diffusers_goca.testing import clip_tokenizer, t5_tokenizer
from diffusers_goca.tokens import segmentation_prompt, token_index


def ids_at(prompt, positions):
    ids = clip_tokenizer()(prompt).input_ids
    return [clip_tokenizer().convert_ids_to_tokens(ids[p]) for p in positions]


def test_real_clip_ids():
    ids = clip_tokenizer()("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_multi_token_classes_and_background():
    prompt = "a photo of a traffic light and a person, background"
    index = token_index(clip_tokenizer(), prompt, ["traffic light", "person"], extra_entities=["background"])
    assert ids_at(prompt, index.class_tokens[0]) == ["traffic</w>", "light</w>"]
    assert ids_at(prompt, index.class_tokens[1]) == ["person</w>"]
    assert ids_at(prompt, index.positions("background")) == ["background</w>"]
    # Content excludes specials and stopwords (a, and, ","), keeps "photo" / "of".
    assert ids_at(prompt, index.content) == [
        "photo</w>",
        "of</w>",
        "traffic</w>",
        "light</w>",
        "person</w>",
        "background</w>",
    ]


def test_class_twice_and_substring_class():
    prompt = "a car next to a carpet and another car"
    index = token_index(clip_tokenizer(), prompt, ["carpet", "car"])
    assert ids_at(prompt, index.class_tokens[1]) == ["car</w>", "car</w>"]  # both occurrences, not the carpet
    assert len(index.class_tokens[1]) == 2 and index.class_tokens[0] not in index.class_tokens[1]
    assert ids_at(prompt, index.class_tokens[0]) == ["carpet</w>"]
    # "light" must not take the tokens of "traffic light" when both are classes.
    prompt = "a traffic light and a light"
    index = token_index(clip_tokenizer(), prompt, ["light", "traffic light"])
    assert index.class_tokens[0] == [6] and index.class_tokens[1] == [2, 3]


def test_a_class_finds_its_plural():
    prompt = "two dogs and three buses near a cathedral, one dog"
    index = token_index(clip_tokenizer(), prompt, ["dog", "bus"])
    assert ids_at(prompt, index.class_tokens[0]) == ["dogs</w>", "dog</w>"]
    assert ids_at(prompt, index.class_tokens[1]) == ["buses</w>"]
    with pytest.raises(ValueError, match="does not appear"):  # a plural, not any word that starts alike
        token_index(clip_tokenizer(), prompt, ["cat"])


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        token_index(clip_tokenizer(), "a cat", [])
    with pytest.raises(ValueError, match="does not appear"):
        token_index(clip_tokenizer(), "a cat", ["dog"])
    with pytest.raises(ValueError, match="cut off by the 77-token limit"):
        token_index(clip_tokenizer(), " ".join(["dog"] * 80) + " cat", ["dog", "cat"])


def test_entities_and_segmentation_prompt():
    assert entities_from_prompt("a red circle and a purple square on grass") == ["red circle", "purple square", "grass"]
    assert entities_from_prompt("grass with a white triangle") == ["grass", "white triangle"]
    assert segmentation_prompt(["cat", "grass"], True) == "cat, grass, background"
    assert segmentation_prompt(["cat", "background"], True) == "cat, background"


@pytest.mark.parametrize(
    "prompt, classes",
    [
        ("a photo of a cat sitting on the grass", ["cat", "grass"]),
        ("an astronaut riding a horse on mars", ["astronaut", "horse", "mars"]),
        ("a red car parked next to a tree, highly detailed, 4k", ["red car", "tree"]),
        ("two dogs playing in the snow", ["dogs", "snow"]),
        ("a man wearing a hat and holding an umbrella", ["man", "hat", "umbrella"]),
        ("the cat is sleeping on a red sofa", ["cat", "red sofa"]),
        ("a group of people standing in front of a tall building", ["people", "tall building"]),
        ("running shoes on a wooden floor, trending on artstation, octane render", ["running shoes", "wooden floor"]),
        ("a spotted dog next to a bright colored bird", ["spotted dog", "bright colored bird"]),
        ("a painting of a lighthouse by the sea, masterpiece, best quality", ["lighthouse", "sea"]),
        ("portrait of a woman wearing a red dress, digital art, by greg rutkowski", ["woman", "red dress"]),
        ("a castle in the style of studio ghibli, by hayao miyazaki and makoto shinkai", ["castle"]),
        ("oil painting by van gogh of a starry night over a village", ["starry night", "village"]),
        ("a cabin surrounded by tall trees, art by alphonse mucha", ["cabin", "tall trees"]),
        (
            "sky with a yellow circle, a black square and a white triangle",
            ["sky", "yellow circle", "black square", "white triangle"],
        ),
    ],
)
def test_classes_from_a_prompt_are_what_a_user_would_name(prompt, classes):
    """Noun phrases with their modifiers; no framing words, verbs, counts or quality tags."""
    assert entities_from_prompt(prompt) == classes
    index = token_index(clip_tokenizer(), prompt, classes)  # every class is found in the prompt's tokens
    assert all(index.class_tokens)


def test_a_prompt_with_no_class_is_refused():
    with pytest.raises(ValueError, match="no class found"):
        entities_from_prompt("highly detailed, 4k, trending on artstation")


def test_t5_positions_skip_lone_spaces_and_eos():
    tok = t5_tokenizer()
    prompt = "a photo of a traffic light and a person, background"
    index = token_index(tok, prompt, ["traffic light", "person"], max_length=300, extra_entities=["background"])
    enc = tok(prompt, return_offsets_mapping=True)
    for positions, word in [(index.class_tokens[0], "traffic light"), (index.class_tokens[1], "person")]:
        text = "".join(prompt[enc.offset_mapping[i][0] : enc.offset_mapping[i][1]] for i in positions)
        assert text.replace(" ", "") == word.replace(" ", "")
    eos = enc.input_ids.index(tok.eos_token_id)
    assert eos not in index.content and all(prompt[slice(*enc.offset_mapping[i])].strip() for i in index.content)
    with pytest.raises(ValueError, match="cut off by the 12-token limit"):
        token_index(tok, prompt, ["person"], max_length=12)


@pytest.mark.parametrize("family", ["clip", "t5"])
def test_a_truncated_prompt_is_indexed_as_the_encoder_sees_it(family):
    """A prompt past the token limit: the encoder keeps max_length − 1 tokens and puts the end token last; the index
    has that end token's position, the encoder's length, and no content past the limit."""
    tok, limit = (clip_tokenizer(), 77) if family == "clip" else (t5_tokenizer(), 40)
    prompt = "a photo of " + ", ".join(["a red circle on grass"] * 16) + ", a dog on sand"
    encoded = tok(prompt, max_length=limit, truncation=True).input_ids
    index = token_index(tok, prompt, ["grass"], max_length=limit)
    assert len(encoded) == limit and index.length == limit
    assert encoded[index.eos] == tok.eos_token_id and index.eos == limit - 1
    assert max(index.content) < index.eos and max(index.class_tokens[0]) < index.eos

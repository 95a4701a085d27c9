"""The classes a user would name in a prompt: its noun phrases, by a small rule set (no NLP model).

"a photo of a cat sitting on the grass" → cat, grass; "an astronaut riding a horse on mars" → astronaut, horse, mars;
"a red car parked next to a tree, highly detailed, 4k" → red car, tree. Colour and other modifiers stay with their
noun, counts go ("two dogs" → dogs), and so do framing words ("a photo of"), verbs, quality tags and who made the
picture ("by greg rutkowski", "in the style of van gogh").
"""

from __future__ import annotations

import re

# Quality and style tags of prompt lists: removed before the prompt is split (longest first, whole words).
QUALITY_TAGS = sorted(
    (
        "highly detailed",
        "ultra detailed",
        "hyper detailed",
        "extremely detailed",
        "very detailed",
        "detailed",
        "intricate details",
        "intricate",
        "4k",
        "8k",
        "16k",
        "uhd",
        "hd",
        "hdr",
        "high resolution",
        "high res",
        "highres",
        "trending on artstation",
        "artstation",
        "octane render",
        "unreal engine 5",
        "unreal engine",
        "masterpiece",
        "best quality",
        "high quality",
        "highest quality",
        "photorealistic",
        "hyperrealistic",
        "hyper realistic",
        "realistic",
        "ultra realistic",
        "sharp focus",
        "soft focus",
        "cinematic lighting",
        "cinematic",
        "studio lighting",
        "dramatic lighting",
        "volumetric lighting",
        "soft lighting",
        "digital art",
        "digital painting",
        "concept art",
        "award winning photograph",
        "award winning photo",
        "award winning",
        "professional photograph",
        "professional photo",
        "beautiful",
        "stunning",
        "epic",
        "dslr",
        "bokeh",
        "depth of field",
        "wide angle",
        "close up",
        "close-up",
        "closeup",
        "photograph",
        "photo",
        "illustration",
        "render",
        "3d render",
    ),
    key=len,
    reverse=True,
)
_QUALITY = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(t) for t in QUALITY_TAGS) + r")(?![\w-])", re.IGNORECASE)

# Words that link two things ("a cat on grass"): they end a phrase and are not part of any.
LINKS = frozenset(
    """
and or with without on in of at near under over beside besides by to from into onto toward towards behind above below
beneath inside outside around through along across against between among amid while as for during upon within via
next front top bottom side that which who whose where there here than
""".split()
)
# Verbs a prompt uses in the present tense; gerunds and participles are found by their ending (below).
VERBS = frozenset(
    """
is are was were be been being has have had sits sit stands stand runs run walks walk holds hold rides ride flies fly
eats eat plays play looks look lies lie lays lay jumps jump swims swim sleeps sleep waits wait carries carry wears wear
grazes graze hangs hang floats float rests rest sits leans lean stares stare smiles smile drinks drink reads read
""".split()
)
# Nouns that end like a verb form: never taken for one.
ING_NOUNS = frozenset(
    """
building buildings painting paintings ceiling ceilings king kings ring rings wing wings thing things string strings
spring springs swing swings evening morning clothing earring earrings pudding wedding sibling siblings icing stuffing
railing railings awning awnings lighting bedding sling herring duckling ducklings dumpling dumplings sapling seedling
viking vikings ping pong sing dining living parking ceiling shopping skiing surfing railing outing bling
""".split()
)
ED_NOUNS = frozenset("bed shed sled seed weed reed steed bread thread head sled speed feed".split())
# A phrase's leading determiners and counts, dropped ("two dogs" → dogs).
DETERMINERS = frozenset(
    """
a an the some any this that these those his her their its my our your one two three four five six seven eight nine
ten eleven twelve many several few couple pair lots lot bunch group number set kind type piece slice
""".split()
)
# Words that frame what follows ("a photo of a cat"): the phrase they head is dropped.
FRAMES = frozenset(
    """
photo photograph picture image painting drawing illustration render rendering portrait shot view sketch closeup
close-up scene group pair couple bunch lot lots number set kind type piece slice style
""".split()
)
# Words after which "by" names who made the picture ("a painting by van gogh", "art by ..."), not a place ("a
# house by the lake") or an agent ("surrounded by trees"); so does "by" opening a comma-separated tag.
MAKERS = FRAMES | frozenset("art artwork artworks painted drawn made created designed sculpted photographed".split())
# A word, a placeholder token of textual inversion ("<cat-toy>"), or one punctuation mark.
_WORD = re.compile(r"<[^<>\s]+>|[\w'-]+|[^\w\s]")


def _is_verb(word: str, following: str | None) -> bool:
    """Whether `word`, after the first word of a phrase, begins a verb clause ("a cat sitting on ...")."""
    w = word.lower()
    if w in VERBS:
        return True
    if w.endswith("ing") and len(w) > 4 and w not in ING_NOUNS:
        return True
    # A participle ("parked next to") rather than an adjective ("a spotted dog"): the next word is not a noun.
    nounless = (
        following is None
        or following in LINKS
        or following in DETERMINERS
        or len(following) == 1
        and not following.isalnum()
    )
    return w.endswith("ed") and len(w) > 4 and w not in ED_NOUNS and nounless


def _phrases(prompt: str) -> list[list[str]]:
    """The prompt's words, cut into phrases at punctuation, linking words and verbs (which are dropped)."""
    words = _WORD.findall(_QUALITY.sub(",", prompt))
    phrases: list[list[str]] = [[]]
    attribution = False  # inside "by <artist>" or "style of <artist>": names, not things in the image
    for i, word in enumerate(words):
        following = words[i + 1].lower() if i + 1 < len(words) else None
        previous = words[i - 1].lower() if i > 0 else ","
        lower = word.lower()
        punctuation = len(word) == 1 and not word.isalnum() and word not in ("'", "-")
        if attribution and not punctuation and (lower in ("and", "&") or lower not in LINKS):
            continue  # names joined by "and" stay one attribution; another link ends it
        attribution = False
        if punctuation:
            phrases.append([])
        elif (lower == "by" and (previous in MAKERS or previous == ",") and following not in DETERMINERS) or (
            lower == "of" and previous == "style"
        ):
            attribution = True
            if previous in MAKERS:
                phrases[-1] = []  # "art by", "in the style of": the frame is no class
            phrases.append([])
        elif lower in LINKS:
            if lower == "of" and phrases[-1] and phrases[-1][-1].lower() in FRAMES:
                phrases[-1] = []  # "a photo of" / "a group of": the frame is no class
            phrases.append([])
        elif _is_verb(word, following) and (
            any(w.lower() not in DETERMINERS for w in phrases[-1])
            or following is None
            or following in DETERMINERS
            or following in LINKS
        ):
            # a verb that opens a phrase is followed by its object or a link ("and holding an umbrella", "is
            # sleeping on"), a modifier by its noun ("running shoes")
            phrases.append([])
        else:
            phrases[-1].append(word)
    return phrases


def entities_from_prompt(prompt: str) -> list[str]:
    """The noun phrases of `prompt` that a user would name as classes, in order, without repeats (compared in any
    case: they read the same tokens). Raises ValueError when none is left."""
    out: list[str] = []
    for words in _phrases(prompt):
        while words and words[0].lower() in DETERMINERS:
            words = words[1:]
        if not words or all(w.isdigit() for w in words):
            continue
        phrase = " ".join(words)
        if phrase.lower() not in {o.lower() for o in out}:
            out.append(phrase)
    if not out:
        raise ValueError(f"no class found in the prompt {prompt!r}; pass the classes explicitly")
    return out

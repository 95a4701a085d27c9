"""The order the classes are named in the segmentation prompt: as given, or a fixed order of the class set.

With a causal text encoder (CLIP) each token's state carries the tokens before it, so the classes' maps depend on
the order they are listed in. On the toy models it matters most where the class covering most of the image is
named: on the UNet toy naming the surface first reads 42.5 mIoU and naming it last 22.2 (docs/protocols.md). The
classes that cover most of an image are the *stuff* of segmentation datasets (sky, grass, road, wall: COCO-Stuff's
word for amorphous regions, against countable *things*). "stuff-first" names those first, in alphabetical order, and
the other classes after them in several orders whose maps are averaged (every order of up to three; each class in
each place): the orders are a function of the set of classes alone, so any two orders of the same classes give the
same segmentation, and no class is privileged by its place.
"""

from __future__ import annotations

from typing import Sequence

CLASS_ORDERS = ("given", "stuff-first")

# Head nouns of stuff classes: COCO-Stuff's outdoor and indoor surfaces and regions (its sky, ground, plant, water,
# solid, building, wall, floor and ceiling groups, names without their "-other" suffixes) and common synonyms of
# them, and the word "background" itself. Not the small stuff (banner, napkin, food), which covers little.
STUFF_WORDS = frozenset(
    """
    background sky clouds cloud fog
    ground grass dirt mud gravel sand snow ice pavement road street sidewalk railroad platform playingfield field
    meadow lawn beach desert terrain
    water sea ocean river lake pond waterfall
    mountain hill rock stone cliff
    tree trees forest bush bushes leaves foliage vegetation moss hedge
    wall floor ceiling carpet rug
    building buildings skyscraper house roof bridge fence
    """.split()
)


def is_stuff(name: str) -> bool:
    """Whether the class `name` is stuff: its last word (its head noun, as "blue sky", "stone wall"), lower-cased,
    or that word without a plural "s", is one of `STUFF_WORDS`."""
    words = name.lower().split()
    if not words:
        return False
    head = words[-1]
    return head in STUFF_WORDS or (head.endswith("s") and head[:-1] in STUFF_WORDS)


def prompt_orders(classes: Sequence[str], class_order: str) -> list[list[str]]:
    """The orders the prompt names the classes in, one segmenting forward each, whose scores are averaged.

    "given": `classes` as they are. "stuff-first": the stuff classes (`is_stuff`) first, in alphabetical order
    (case-folded), then the others in every rotation of their alphabetical order and of its reverse, without repeats:
    every order of up to three of them, 2·T orders of T > 3, each of them once in each place. The first order is the
    alphabetical one."""
    if class_order not in CLASS_ORDERS:
        raise ValueError(f"class_order must be one of {CLASS_ORDERS}, got {class_order!r}")
    if class_order == "given":
        return [list(classes)]
    alphabetical = sorted(classes, key=lambda c: (c.casefold(), c))
    stuff = [c for c in alphabetical if is_stuff(c)]
    things = [c for c in alphabetical if not is_stuff(c)]
    orders = []
    for base in (things, things[::-1]):
        for shift in range(max(1, len(base))):
            order = stuff + base[shift:] + base[:shift]
            if order not in orders:
                orders.append(order)
    return orders

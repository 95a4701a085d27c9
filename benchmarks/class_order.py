"""Which part of the class order a segmentation depends on, on the toy world: the surface's place or the objects'.

    python benchmarks/class_order.py --limit 100
    python benchmarks/class_order.py --limit 100 --model diffusers_goca/toyworld/dit_model

Each held-out scene is segmented with its own classes (oracle) in several orders; the prompt is "c1, c2, ...", as
`segment` builds it. A causal text encoder (CLIP) gives each class's tokens states that carry the classes named
before them, so the order can matter; this says where it does. Reported per order and method: mIoU over the world's
classes present, and the share of pixels labelled as in the scene's order.
"""

from __future__ import annotations

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffusers_goca.bench.toy_script import toy_study, write_table
from diffusers_goca.functional.metrics import confusion_matrix, miou
from diffusers_goca.toyworld import CLASS_NAMES, make_scene, scene_seeds

METHODS = ("goca", "vanilla")


# order name → (the classes in that order, from the surface, the objects as drawn and each class's true area; the
# other arguments of `segment`)
ORDERS = {
    "scene order: surface first, objects as drawn": (lambda surface, objects, area: [surface] + objects, {}),
    "surface last": (lambda surface, objects, area: objects + [surface], {}),
    "surface first, objects reversed": (lambda surface, objects, area: [surface] + objects[::-1], {}),
    "largest region first (true areas)": (
        lambda surface, objects, area: sorted([surface] + objects, key=lambda c: -area[c]),
        {},
    ),
    "surface last, class_encoding='separate'": (
        lambda surface, objects, area: objects + [surface],
        {"class_encoding": "separate"},
    ),
    "surface last, class_order='stuff-first'": (
        lambda surface, objects, area: objects + [surface],
        {"class_order": "stuff-first"},
    ),
}


def main(argv=None) -> int:
    args, pipe = toy_study(__doc__, argv, limit=100, split="test")
    k = len(CLASS_NAMES)
    names = list(ORDERS)
    conf = {(o, m): torch.zeros(k, k, dtype=torch.long) for o in names for m in METHODS}
    agree = {(o, m): 0 for o in names for m in METHODS}
    pixels = 0
    for seed in tqdm(scene_seeds(args.split, args.limit), desc="scenes"):
        scene = make_scene(seed)
        image, truth = Image.fromarray(scene.image), torch.from_numpy(scene.labels)
        objects = [c for c in scene.classes if c != scene.background]
        area = {c: int((scene.labels == CLASS_NAMES.index(c)).sum()) for c in scene.classes}
        labels = {}
        for name, (order, arguments) in ORDERS.items():
            classes = order(scene.background, objects, area)
            got = pipe.segment(image, classes, method=list(METHODS), **arguments)
            ids = torch.tensor([CLASS_NAMES.index(c) for c in classes])
            for m in METHODS:
                labels[name, m] = ids[got[m].labels]
                conf[name, m] += confusion_matrix(labels[name, m], truth, k)
        for name in names:
            for m in METHODS:
                agree[name, m] += int((labels[name, m] == labels[names[0], m]).sum())
        pixels += truth.numel()
    print(f"\n{args.limit} {args.split} scenes, {args.model or 'UNet toy'}, oracle classes\n")
    print("| order | " + " | ".join(f"{m} mIoU | {m}: as the scene order" for m in METHODS) + " |")
    print("|---|" + "---|---|" * len(METHODS))
    table = {}
    for name in names:
        cells = []
        for m in METHODS:
            value = 100 * miou(conf[name, m], over="truth")[0]
            share = 100 * agree[name, m] / pixels
            table[f"{name} / {m}"] = dict(miou=value, agreement=share)
            cells += [f"{value:.1f}", f"{share:.1f} %"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    write_table(args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

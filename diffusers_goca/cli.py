"""Command line: `goca segment IMAGE --classes cat,grass --model ID_OR_PATH --out overlay.png`, `goca demo`,
`goca bench-seg --dataset voc --root DIR --model ID_OR_PATH` (the segmentation benchmark), `goca app` (the web demo,
extra [app]).

The pipelines load through `loading` (`load_pipeline`; `DTYPES` are the --dtype names); `segment` loads in the
--dtype given, on any device."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .class_encoding import CLASS_ENCODINGS
from .class_order import CLASS_ORDERS
from .loading import DTYPES, load_pipeline

__all__ = ["main"]


def _segment(args) -> int:
    from .methods import METHODS

    if args.method not in METHODS:
        raise SystemExit(f"goca: error: --method must be one of {', '.join(METHODS)}")
    if not os.path.exists(args.image):  # before the model loads, which takes long for a real one
        raise SystemExit(f"goca: error: image file not found: {args.image}")
    if args.model is None:  # a real photo would be segmented by a 32-px model of toy scenes without a word
        from .toyworld import BACKGROUNDS

        print(
            f"goca: note: no --model given: using the embedded toy model (32 px, toy-world classes only: "
            f"{', '.join(BACKGROUNDS)} and coloured shapes such as 'red circle'); for a real image pass --model "
            f"with a hub id or a local pipeline folder, e.g. --model stable-diffusion-v1-5/stable-diffusion-v1-5",
            file=sys.stderr,
        )
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    options = {} if args.layer_weight_stride is None else {"layer_weight_stride": args.layer_weight_stride}
    # Ordinary mistakes (an argument the model refuses, a model that cannot be loaded, an unwritable output) end in
    # one line, as argparse's own errors do, instead of a traceback.
    try:
        pipe = load_pipeline(args.model, args.device, DTYPES[args.dtype])
        result = pipe.segment(  # opens the file upright; the pictures below draw on the image it segmented
            args.image,
            classes,
            method=args.method,
            timestep=args.timestep,
            seed=args.seed,
            background=args.background,
            background_offset=args.background_offset,
            presence=args.presence,
            class_encoding=args.class_encoding,
            class_order=args.class_order,
            **options,
        )
        result.overlay().save(args.out)
        print(f"saved {args.out}")
        if args.heatmaps:
            result.heatmaps().save(args.heatmaps)
            print(f"saved {args.heatmaps}")
    except (ValueError, OSError) as error:  # FileNotFoundError is an OSError
        raise SystemExit(f"goca: error: {error}") from None
    for name, share in result.pixel_shares().items():
        print(f"  {name:>20s}: " + ("judged absent" if share is None else f"{share:5.1f}% of pixels"))
    return 0


def _app(args) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise SystemExit('goca: error: the web demo needs Gradio: pip install "diffusers-goca[app]"')
    from .app import launch

    try:
        launch(args.model, args.device, args.dtype, port=args.port, host=args.host)
    except (ValueError, OSError) as error:  # a model that cannot be loaded or is not supported, a port in use
        raise SystemExit(f"goca: error: {error}") from None
    except KeyboardInterrupt:
        pass
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="goca", description="GoCA: segmentation from the attention of diffusion pipelines")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("segment", help="segment an existing image into the given classes")
    s.add_argument("image")
    s.add_argument("--classes", required=True, help="comma-separated class names, e.g. cat,grass")
    s.add_argument("--model", default=None, help="hub id or local pipeline folder (default: the embedded toy model)")
    s.add_argument("--out", default="overlay.png")
    s.add_argument("--heatmaps", default=None, help="also save a per-class heat-map grid here")
    s.add_argument("--method", default="goca")
    s.add_argument(
        "--timestep",
        type=float,
        default=None,
        help="noise timestep (default: the family's rule, 100 for SD; SD3 / Flux take fractions)",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    s.add_argument(
        "--background",
        action="store_true",
        help="add a background channel (the word's map), for when "
        "only objects are named; off by default, as in segment()",
    )
    s.add_argument("--background-offset", type=float, default=0.0)
    s.add_argument(
        "--presence",
        action="store_true",
        help="first ask the denoiser which named classes are in the image; those it judges absent take no pixel "
        "(14 more forwards per class and round of its elimination; off by default, as in segment())",
    )
    s.add_argument(
        "--class-encoding",
        default="prompt",
        choices=CLASS_ENCODINGS,
        help="separate: encode each class on its own, so that the class order does not matter (as in segment())",
    )
    s.add_argument(
        "--class-order",
        default="given",
        choices=CLASS_ORDERS,
        help="stuff-first: name stuff classes (sky, grass, road, wall, ...) first, the others in several orders "
        "whose maps are averaged (one forward each), so that the order given does not matter (default: as given, "
        "one forward, as in segment())",
    )
    s.add_argument(
        "--layer-weight-stride",
        type=int,
        default=None,
        help="goca: layer weights over every s-th reference row and column (faster; default: all rows)",
    )
    d = sub.add_parser("demo", help="the toy-world demo: generation with masks, held-out mIoU table, pictures")
    d.add_argument("--out", default="outputs/demo")
    d.add_argument("--n-eval", type=int, default=100)
    a = sub.add_parser("app", help="the web demo (extra [app]): masks of a pipeline step by step, in the browser")
    a.add_argument("--model", default=None, help="toy (default), toy-dit, a hub id or a local pipeline folder")
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="on an accelerator (float32 on the CPU)")
    a.add_argument("--port", type=int, default=7860)
    a.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    sub.add_parser(
        "bench-seg",
        add_help=False,
        help="segmentation mIoU benchmark (same options as benchmarks/segmentation.py; bench-seg --help)",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench-seg"]:
        from .bench.segmentation import main as bench_main

        return bench_main(argv[1:])
    args = p.parse_args(argv)
    if args.command == "segment":
        return _segment(args)
    if args.command == "app":
        return _app(args)
    from .toyworld.demo import run_demo

    run_demo(args.out, n_eval=args.n_eval)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The command line shared by the toy-world study scripts (`benchmarks/presence_validation.py`,
`benchmarks/class_order.py`): which toy model, how many scenes of which split, where the JSON table goes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


def toy_study(doc: str, argv: Sequence[str] | None, limit: int, split: str, class_order: bool = False):
    """(parsed arguments, the GoCA pipeline of the toy model named by --model) for a study script documented by
    `doc`; `limit` and `split` are the defaults of --limit and --split; class_order: also take --class-order."""
    from .. import from_pipe
    from ..class_order import CLASS_ORDERS
    from ..toyworld import load_toy_pipeline

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a toy model folder (default: the shipped UNet toy)")
    p.add_argument("--limit", type=int, default=limit, help="scenes")
    p.add_argument("--split", default=split)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    if class_order:
        p.add_argument("--class-order", choices=CLASS_ORDERS, default="given", help="segment's class_order")
    args = p.parse_args(argv)
    return args, from_pipe(load_toy_pipeline(args.model) if args.model else load_toy_pipeline())


def write_table(path: str | None, table: dict) -> None:
    """Write `table` as JSON at `path` (nothing when None), making its folder."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(table, indent=1))

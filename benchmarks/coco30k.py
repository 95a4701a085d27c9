"""COCO-30k FID / CLIP benchmark of CFG, S-CFG and GoCA+S-CFG (see `diffusers_goca.bench.coco30k`).

python benchmarks/coco30k.py --captions coco/annotations/captions_val2014.json --fid-ref coco/val2014 --out runs/coco30k
accelerate launch --num_processes 8 benchmarks/coco30k.py --captions ... --fid-ref stats/coco_val2014_clean.npz
python benchmarks/coco30k.py --toy --limit 8 --steps 10 --no-fid --no-clip     # offline, on CPU
"""

import sys

from diffusers_goca.bench.coco30k import main

if __name__ == "__main__":
    sys.exit(main())

"""Segmentation mIoU benchmark (see `diffusers_goca.bench.segmentation` for the protocol and options).

python benchmarks/segmentation.py --dataset voc --root data/VOCdevkit --model stable-diffusion-v1-5/stable-diffusion-v1-5
accelerate launch --num_processes 8 benchmarks/segmentation.py --dataset ade20k --root data/ade --model ...
python benchmarks/segmentation.py --dataset toyworld --limit 100      # the embedded toy model, offline on CPU
"""

import sys

from diffusers_goca.bench.segmentation import main

if __name__ == "__main__":
    sys.exit(main())

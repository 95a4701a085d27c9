#!/usr/bin/env bash
# The main job on the embedded default (the toy model), offline on CPU: masks during generation, held-out mIoU table,
# pictures in outputs/demo/. Needs only the package's required dependencies (no extra).
source "$(dirname "$0")/env.sh" ""
"$PY" -m diffusers_goca.cli demo --out "${1:-outputs/demo}"

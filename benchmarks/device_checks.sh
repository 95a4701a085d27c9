#!/usr/bin/env bash
# The project's GPU checks, for a session lent a CUDA device, in two parts that each fit one 10-minute device call:
#
#   bash benchmarks/device_checks.sh checks   # gpu_checks.py: images bit-identical, offload, GPU = CPU, Triton = fused
#   bash benchmarks/device_checks.sh speed    # overhead.py at the real configs' native resolution, every family
#   bash benchmarks/device_checks.sh cfg      # the same at a generation step's [uncond, cond] batch (--cfg)
#
# Packages the device lacks (diffusers, open_clip_torch, ...) can be put as wheels in .whl/ (`pip download` them for
# the device's Python); they are installed to /tmp/site first. Each step's log goes to $OUT (default outputs/device),
# and its tail is printed.
set -uo pipefail
part="${1:?usage: device_checks.sh checks|speed|cfg}"
OUT="${OUT:-outputs/device}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}.:tests:benchmarks"

step() {  # step NAME SECONDS SCRIPT ARGS...: run with a time limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" python3 "$@" > "$OUT/$name.log" 2>&1
  echo "exit status $?" >> "$OUT/$name.log"
  tail -n 30 "$OUT/$name.log"
}

case "$part" in
  checks)
    step gpu_checks 540 benchmarks/gpu_checks.py
    ;;
  speed)
    common=(--device cuda --launches)
    step overhead_pixart-sigma 140 benchmarks/overhead.py --model pixart-sigma --resolution 1024 --dtype bfloat16 \
      --kernel both --compare-text-keys "${common[@]}"
    step overhead_pixart-sigma_stride2 80 benchmarks/overhead.py --model pixart-sigma --resolution 1024 --dtype bfloat16 \
      --layer-weight-stride 2 "${common[@]}"
    step overhead_sd3-medium 110 benchmarks/overhead.py --model sd3-medium --resolution 1024 --dtype bfloat16 \
      --kernel both "${common[@]}"
    step overhead_flux-dev 160 benchmarks/overhead.py --model flux-dev --resolution 1024 --dtype bfloat16 \
      --kernel both "${common[@]}"
    step overhead_sd15 40 benchmarks/overhead.py --model sd15 --resolution 512 --dtype float16 --kernel both "${common[@]}"
    ;;
  cfg)
    common=(--device cuda --cfg)
    step overhead_cfg_pixart-sigma 120 benchmarks/overhead.py --model pixart-sigma --resolution 1024 --dtype bfloat16 \
      "${common[@]}"
    step overhead_cfg_sd3-medium 120 benchmarks/overhead.py --model sd3-medium --resolution 1024 --dtype bfloat16 \
      "${common[@]}"
    step overhead_cfg_sdxl 150 benchmarks/overhead.py --model sdxl --resolution 1024 --dtype float16 "${common[@]}"
    step overhead_cfg_sd15 60 benchmarks/overhead.py --model sd15 --resolution 512 --dtype float16 "${common[@]}"
    ;;
  *)
    echo "usage: device_checks.sh checks|speed|cfg" >&2
    exit 2
    ;;
esac

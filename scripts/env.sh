# Sourced by demo.sh, test.sh and .ci/run as `source scripts/env.sh EXTRA`: a virtual environment with the package
# installed editable with the extra EXTRA (test, bench, toy, app; none when empty), created on first use.
#
# The venv is $GOCA_VENV (default ~/.cache/diffusers-goca/venv). `pip install -e` runs only when needed: a stamp file
# in the venv records the hash of pyproject.toml, the checkout it points at and the extras installed, so a second
# call is instant, an edited pyproject.toml reinstalls, and another checkout sharing the venv re-points it.
# Sets PY (the venv's python), the offline exports, and cds to the checkout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GOCA_VENV:-$HOME/.cache/diffusers-goca/venv}"
EXTRA="${1:-}"
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PY="$VENV/bin/python"

_goca_stamp="$VENV/.diffusers-goca-install"
if command -v flock > /dev/null 2>&1; then  # two scripts starting at once install once
  exec 9> "$VENV/.diffusers-goca-install.lock"
  flock 9
fi
# First line: pyproject.toml's hash, the checkout and whether the package is installed; then one line per extra.
_goca_key="$("$PY" - "$ROOT" <<'PY'
import hashlib, importlib.metadata as md, sys
root = sys.argv[1]
with open(f"{root}/pyproject.toml", "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
try:
    md.version("diffusers-goca")
    state = "installed"
except md.PackageNotFoundError:
    state = "missing"
print(f"{digest} {root} {state}")
PY
)"
if [ -f "$_goca_stamp" ] && [ "$(head -n 1 "$_goca_stamp")" = "$_goca_key" ]; then
  _goca_extras="$(tail -n +2 "$_goca_stamp")"
else
  _goca_extras=""
fi
# Installed with any extra covers no extra; otherwise the extra asked must be on record.
if ! { [ -z "$EXTRA" ] && [ -n "$_goca_extras" ]; } && ! grep -qxF -- "extra=$EXTRA" <<< "$_goca_extras"; then
  echo "scripts/env.sh: pip install -e \"$ROOT${EXTRA:+[$EXTRA]}\" into $VENV" >&2
  "$PY" -m pip install -q -e "$ROOT${EXTRA:+[$EXTRA]}"
  _goca_key="${_goca_key% *} installed"
  { echo "$_goca_key"; [ -n "$_goca_extras" ] && printf '%s\n' "$_goca_extras"; echo "extra=$EXTRA"; } > "$_goca_stamp.tmp"
  mv "$_goca_stamp.tmp" "$_goca_stamp"
fi
if command -v flock > /dev/null 2>&1; then
  exec 9>&-
fi
unset _goca_stamp _goca_key _goca_extras

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"

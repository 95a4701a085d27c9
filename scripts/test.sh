#!/usr/bin/env bash
# The test suite, offline on CPU.
source "$(dirname "$0")/env.sh" test
"$PY" -m pytest -q tests "$@"

#!/usr/bin/env bash
# The test suite, offline on CPU, in the venv of scripts/env.sh (installed with the [test] extra on first use).
#   bash scripts/test.sh                                # all of tests/ (pyproject's testpaths)
#   bash scripts/test.sh tests/test_functional.py -x    # one file; any pytest arguments
#   bash scripts/test.sh -m "not slow"                  # without the tests marked slow
source "$(dirname "$0")/env.sh" test
"$PY" -m pytest -q "$@"

#!/usr/bin/env bash
# Every check CI runs: lint, format, types, import contracts, CRD drift, then the tests.
# Arguments go to pytest (e.g. `bash scripts/test.sh -m slow` for the long tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
bin=.venv/bin
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/mypy"
"$bin/lint-imports" --no-cache
"$bin/kubetune" crds --check
"$bin/pytest" "$@"

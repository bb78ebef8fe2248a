#!/usr/bin/env bash
# The main job. Today: set up .venv and validate the example manifests.
# Coming with the runtime (issues 3 and 4): build a tiny base model from GSM8K text and run
# `kubetune run examples/quickstart/finetunejob.yaml` — a LoRA fine-tune on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
.venv/bin/kubetune validate examples/*.yaml
echo
echo "The local run (kubetune run) is not built yet: the manifests above are valid and the"
echo "CRDs are in crds/. See README.md."

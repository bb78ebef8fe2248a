#!/usr/bin/env bash
# The main job, offline on CPU: LoRA fine-tune a small base model on GSM8K, evaluate it against
# the base on held-out GSM8K, merge, and publish verified artifacts.
#
#   1. set up .venv (first run: about 2 minutes)
#   2. build the base model and stage GSM8K in kubetune's embedded S3 (examples/quickstart/prepare.py)
#   3. kubetune run examples/quickstart/finetunejob.yaml: the exact pod the operator would run
#
# Extra arguments go to `kubetune run`, e.g. --set spec.training.maxSteps=40.
# State lives in .kubetune/ (delete it to start over); Ctrl-C checkpoints, rerunning resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python examples/quickstart/prepare.py --workdir .kubetune
.venv/bin/kubetune run examples/quickstart/finetunejob.yaml --workdir .kubetune "$@"

#!/usr/bin/env bash
# The GPU check (issue 14), under 4 minutes on one CUDA GPU (H100 class) with no network: installs what such a machine
# lacks from wheels carried in .whl/, runs the `gpu` test tier, then timed bf16 LoRA and full SFT steps on a tiny model
# (smoke timings: a tiny model says nothing about real speed), and writes everything to one log.
#
#   bash benchmarks/gpu_check.sh [LOG]        # LOG defaults to $OUT/gpu_check.log, else ./gpu_check.log
#
# The machine it ran on (an H200, 2026-12-04: RESULTS.md, "GPU") has torch 2.11, transformers 5.17, peft and
# accelerate, and no trl, datasets, omegaconf or bitsandbytes. Build .whl/ on a machine with network (57 MiB: the device
# carries 64 MiB with the repo; keep results/ and other large files out of the working tree when you send it):
#
#   P="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any"
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $P -d .whl \
#       transformers==5.24.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 omegaconf==2.4.0 \
#       peft==0.21.2 bitsandbytes
#
# vLLM cannot travel (gigabytes), so GRPO's vLLM rollout path stays untested here; GRPO runs with transformers' generate.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-${OUT:-.}/gpu_check.log}
started=$(date +%s)
{
  echo "== install (wheels from .whl/, then gsmtune itself with --no-deps)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  echo "== machine"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "
import importlib.metadata as md, platform, torch
print('python', platform.python_version(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name(0))
print(' | '.join(f'{p} {md.version(p)}' for p in ('gsmtune', 'transformers', 'trl', 'peft', 'accelerate', 'datasets', 'bitsandbytes')))"
  echo "== gpu tier (pytest -m gpu)"
  python3 -m pytest -q -m gpu -rs -p no:cacheprovider tests/gpu
  echo "pytest exit code: $?"
  echo "== smoke timings: bf16 LoRA and full SFT, 8-bit AdamW, tiny random Gemma 3 (not a measure of real speed)"
  python3 benchmarks/gpu_smoke.py --out "$(dirname "$LOG")/gpu_smoke.json"
  echo "== done in $(( $(date +%s) - started )) s"
} 2>&1 | tee "$LOG"

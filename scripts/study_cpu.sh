#!/usr/bin/env bash
# The reference study at CPU scale (issue 12, RESULTS.md), every step resumable: run it again after an interruption
# and each row continues from its checkpoint or predictions file; finished rows and trials are not redone.
#   nohup scripts/study_cpu.sh ../shared/data/gsm8k > study.log 2>&1 &
# Order: the tuned LoRA row and the full-SFT learning-rate grid (the grid's winner goes into cpu/full_main.yaml and
# cpu/full_socratic.yaml by hand, as the LoRA grid's did, so the script stops there until the grid's result,
# results/cpu/sweeps/full_main_lr/best.yaml, is applied); then any training with checkpoints on this machine: they stay
# where they were written (a full model's are 3 GB) and a later session may get another machine; then full SFT main
# and LoRA socratic and full SFT socratic (it needs one machine for its whole run), the base rows, and the extra rows on
# the best trained row whose model is committed (test EM; ties: the first of lora_main, lora_socratic): calculator,
# self-consistency (k = 5), both, each paired with it. These evaluations resume from committed predictions on any
# machine. Last the trainings not begun (LoRA main's seeds 43 and 44) and GRPO (cpu/grpo_best) from the best row whose
# model is on this machine, full rows included. Only adapters are committed (full models are 1 GB): a full row's extras
# need its model re-trained on the machine that runs them.
set -euo pipefail
data=$(realpath "${1:?usage: scripts/study_cpu.sh GSM8K_FOLDER}")
cd "$(dirname "$0")/.."
gsmtune=${GSMTUNE:-.venv/bin/gsmtune}
python=$(dirname "$gsmtune")/python
D=(dataset.source=local "dataset.path=$data")
# Unattended for a day: a step that fails (a killed process, memory) is tried again from its checkpoint or predictions
# file, up to three times; a row that still fails is skipped, so the rows that do not need it go on, and named at the end.
failed=()
step() {
    local try
    for try in 1 2 3; do
        "$@" && return 0
        echo "study: try $try of 3 failed: $*" >&2
        sleep 60
    done
    failed+=("$*")
}
begun_here() {  # a training with a checkpoint on this machine and not finished
    compgen -G "$1/checkpoints/checkpoint-*" > /dev/null && [ ! -f "$1/train_metrics.json" ]
}

step "$gsmtune" run cpu/lora_main "${D[@]}" --resume
step "$gsmtune" sweep cpu/full_main_lr_grid --trials 3 "${D[@]}"
chosen=$("$python" -c "from gsmtune.config import load_config as c
print(c('results/cpu/sweeps/full_main_lr/best.yaml').training.learning_rate == c('src/gsmtune/configs/cpu/full_main.yaml').training.learning_rate)")
if [ "$chosen" != True ]; then
    echo "study: set the full-SFT grid's learning rate (results/cpu/sweeps/full_main_lr/best.yaml) in cpu/full_main.yaml" \
         "and cpu/full_socratic.yaml, then rerun" >&2
    exit 3
fi
trained=(full_main lora_socratic full_socratic lora_main_seed43 lora_main_seed44)
for row in "${trained[@]}"; do
    if begun_here "results/cpu/$row"; then
        step "$gsmtune" run "cpu/$row" "${D[@]}" --resume
    fi
done
# full SFT socratic before the extras: its checkpoints (3 GB) stay on the machine that writes them, so it needs one
# session's machine for its whole ~2 h at 222 tokens/s (BENCHMARKS.md, 2026-12-04 evening); the extras resume on any machine
for row in full_main lora_socratic full_socratic; do  # the best-row choice below needs both LoRA rows
    step "$gsmtune" run "cpu/$row" "${D[@]}" --resume
done
for row in one_shot_instruction zero_shot zero_shot_instruction one_shot; do
    step "$gsmtune" eval "cpu/$row" "${D[@]}" --resume
done
if [ ${#failed[@]} -gt 0 ]; then
    printf 'study: failed after three tries, rerun to resume: %s\n' "${failed[@]}" >&2
    exit 1
fi
best=$("$python" -c "import json
rows = ['lora_main', 'lora_socratic']
acc = {r: json.load(open(f'results/cpu/{r}/metrics.json'))['accuracy'] for r in rows}
print(max(rows, key=acc.get))")
R=results/cpu/$best
# the reference study has no number for these rows: the best row's saved config would carry its own
E=("$R/config.yaml" "model.name=$R/model" "${D[@]}" "baseline_run=$R" reference.accuracy=null)
# self-consistency: 5 samples at temperature 0.7 (top-k 50), beside each problem's greedy completion, as RESULTS.md's
# earlier 96-problem rows
SC=(generation.num_samples=5 generation.temperature=0.7)
step "$gsmtune" eval "${E[@]}" generation.calculator=true "output_dir=${R}_calculator" --resume
step "$gsmtune" eval "${E[@]}" "${SC[@]}" "output_dir=${R}_sc5" --resume
step "$gsmtune" eval "${E[@]}" "${SC[@]}" generation.calculator=true "output_dir=${R}_sc5_calculator" --resume
for row in lora_main_seed43 lora_main_seed44; do
    step "$gsmtune" run "cpu/$row" "${D[@]}" --resume
done
# GRPO from the best SFT row whose model is on this machine (full models are not committed: a full row counts only where
# it was trained), on that row's training variant
# (a committed full row's model/ folder holds its card and config, not its weights: the weights decide)
G=results/cpu/$("$python" -c "import glob, json
rows = [r for r in ('full_main', 'full_socratic', 'lora_main', 'lora_socratic') if glob.glob(f'results/cpu/{r}/model/*.safetensors')]
print(max(rows, key=lambda r: json.load(open(f'results/cpu/{r}/metrics.json'))['accuracy']))")
variant=$("$python" -c "from gsmtune.config import load_config as c; print(c('$G/config.yaml').dataset.config_name)")
step "$gsmtune" run cpu/grpo_best "model.name=$G/model" "baseline_run=$G" "output_dir=${G}_grpo" \
    "dataset.config_name=$variant" "${D[@]}" --resume
if [ ${#failed[@]} -gt 0 ]; then
    printf 'study: failed after three tries, rerun to resume: %s\n' "${failed[@]}" >&2
    exit 1
fi

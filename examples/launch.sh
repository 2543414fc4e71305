#!/bin/bash
# One run of the PowerOPD paper's grid: a model pair (examples/PAIR.yaml) and a reward METHOD.
#
#   examples/launch.sh qwen3-0.6b-base_from_qwen3-4b power_a5             # torchrun, 8 GPUs here
#   LAUNCHER=sbatch NODES=2 examples/launch.sh qwen3-1.7b-base_from_qwen3-8b clip      # Slurm
#   LAUNCHER=print examples/launch.sh qwen3-0.6b-base_from_qwen3-8b zscore  # the flags only
#
# METHOD: power_aALPHA (PowerOPD, r = pi_T^a - pi_S^a; the paper's grid is 0.1 0.5 1 5 10 50 100
# 500), log_ratio (vanilla OPD), clip (log-ratio clipped to [-1, 1]), tanh (tanh(r / 5)), zscore
# (standardized over the step's tokens), full_vocab_kl (exact reverse KL over the vocabulary).
# Flags after METHOD go to scripts/pretrain_opd.py and override the YAML and the method.
# The run writes runs/PAIR/METHOD/ (checkpoints, tensorboard/, metrics.jsonl).
# Environment: LAUNCHER (torchrun | sbatch | print), NPROC_PER_NODE (torchrun, default 8), NODES
# and GPUS_PER_NODE (sbatch, defaults 1 and 8), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." # the YAMLs' paths are relative to the checkout

if (($# < 2)); then
    echo "usage: $0 PAIR METHOD [pretrain_opd.py flags...]; PAIR is one of:" >&2
    for f in examples/*.yaml; do echo "  $(basename "$f" .yaml)" >&2; done
    exit 2
fi
PAIR=$1 METHOD=$2
shift 2
CONFIG=examples/$PAIR.yaml
if [[ ! -f $CONFIG ]]; then
    echo "no $CONFIG" >&2
    exit 2
fi

case $METHOD in
power_a*) FLAGS=(--opd-reward power --opd-alpha "${METHOD#power_a}") ;;
log_ratio) FLAGS=(--opd-reward log_ratio) ;;
clip) FLAGS=(--opd-reward clip --opd-clip-min=-1 --opd-clip-max=1) ;;
tanh) FLAGS=(--opd-reward tanh --opd-tanh-temperature 5) ;;
zscore) FLAGS=(--opd-reward zscore) ;;
full_vocab_kl) FLAGS=(--opd-reward full_vocab_kl) ;;
*)
    echo "unknown METHOD $METHOD: power_aALPHA, log_ratio, clip, tanh, zscore, full_vocab_kl" >&2
    exit 2
    ;;
esac
RUN=runs/$PAIR/$METHOD
FLAGS+=(--save "$RUN" --tensorboard-dir "$RUN/tensorboard" --metrics-file "$RUN/metrics.jsonl")

case ${LAUNCHER:-torchrun} in
torchrun)
    exec "${PYTHON:-python3}" -m torch.distributed.run --nproc-per-node "${NPROC_PER_NODE:-8}" \
        scripts/pretrain_opd.py --config "$CONFIG" "${FLAGS[@]}" "$@"
    ;;
sbatch)
    CONFIG=$CONFIG exec sbatch --nodes "${NODES:-1}" --gpus-per-node "${GPUS_PER_NODE:-8}" \
        --exclusive --job-name "opd-$PAIR-$METHOD" scripts/slurm/pretrain_opd.sbatch \
        "${FLAGS[@]}" "$@"
    ;;
print)
    printf '%q ' --config "$CONFIG" "${FLAGS[@]}" "$@"
    echo
    ;;
*)
    echo "LAUNCHER must be torchrun, sbatch or print, got $LAUNCHER" >&2
    exit 2
    ;;
esac

#!/usr/bin/env bash
# Transformer base on Multi30k En->De with LAMB + device-wise GradientMix (GradientMix paper, section 5.2):
# B = 1024 sentences, LAMB lr 8e-3 (5e-4 at batch 64, scaled linearly), betas (0.9, 0.98), eps 1e-6,
# weight decay 0.01 (not on biases and LayerNorm), label smoothing 0.1, inverse square root schedule with
# "4000 warmup steps at batch 64, linearly decayed by the batch size" (= 250 steps), Gaussian mixing of
# the workers' gradients (std 0.25). The settings of
# deepspeed_configs/gradientmix_lamb_transformer_multi30k_b1024.json, run with horovodrun.
#
#   NP=8 HOSTS=node1:4,node2:4 DATA_DIR=/data/multi30k horovod_examples/transformer_multi30k_lamb_gradientmix.sh
#   SMOKE=1 NP=2 DATA_DIR=../shared/data/multi30k horovod_examples/transformer_multi30k_lamb_gradientmix.sh
#
# DATA_DIR holds the official raw files (train.en.gz, train.de.gz, val.*, test_2016_flickr.*;
# lb_dist.data.download_multi30k fetches them). Environment and extra flags as in resnet56_cifar10_clars.sh;
# EPOCHS (default 30). Add --mix none for the LAMB baseline, --optimizer clars --lr 1 for CLARS.
set -euo pipefail
NP=${NP:-8}
HOSTS=${HOSTS:-localhost:$NP}
TRAIN_CMD=${TRAIN_CMD:-lb-dist train}
DATA=(--dataset multi30k --data-dir "${DATA_DIR:?set DATA_DIR to the directory holding the Multi30k raw files}")
if [[ -n "${SMOKE:-}" ]]; then
  # the small Transformer on the first 2048 pairs, 2 epochs of 8 steps at B = 256, 100 test sentences
  RUN_DIR=${RUN_DIR:-runs/transformer_smoke_lamb_mix}
  WORKLOAD=(--model transformer_small --train-size 2048 --test-size 100 --bleu-samples 100 --max-length 64
            --vocab-size 4000 --batch-size 256 --epochs 2 --lr 0.02 --warmup-steps 4 --num-threads 1)
else
  RUN_DIR=${RUN_DIR:-runs/transformer_base_multi30k_lamb_mix}
  WORKLOAD=(--model transformer_base --batch-size 1024 --epochs "${EPOCHS:-30}" --lr 0.008
            --warmup-steps 4000 --warmup-base-batch-size 64)
fi
# shellcheck disable=SC2086
exec horovodrun -np "$NP" -H "$HOSTS" ${HOROVODRUN_ARGS:-} \
  $TRAIN_CMD --backend horovod --run-dir "$RUN_DIR" "${DATA[@]}" "${WORKLOAD[@]}" \
  --optimizer lamb --betas 0.9 0.98 --eps 1e-6 --weight-decay 0.01 --label-smoothing 0.1 \
  --schedule inverse-sqrt --mix device --mix-noise gaussian --mix-std 0.25 "$@"

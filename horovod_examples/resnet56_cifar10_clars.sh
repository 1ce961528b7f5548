#!/usr/bin/env bash
# CLARS, CIFAR-10 ResNet-56, B = 8192, 20 epochs, no warmup (CLARS paper, section 4.4 and Fig. 4):
# gamma_scale = 0.1 x 8192/128 = 6.4 (linear scaling rule), eta 0.01, Nesterov 0.9, weight decay 5e-4,
# S_k exact per sample on |J| = 512 samples per step, constant rate. The settings of
# deepspeed_configs/clars_resnet56_cifar10_b8192.json, run with horovodrun.
#
#   NP=8 HOSTS=node1:4,node2:4 DATA_DIR=/data/cifar horovod_examples/resnet56_cifar10_clars.sh
#   SMOKE=1 NP=2 horovod_examples/resnet56_cifar10_clars.sh          # scaled down, synthetic data, CPU
#
# Environment: NP (processes, 8), HOSTS (horovodrun -H, localhost:NP), DATA_DIR (holds
# cifar-10-batches-py), RUN_DIR (runs/resnet56_cifar10_clars; rerunning resumes), HOROVODRUN_ARGS
# (e.g. "--mpi" or "--gloo --network-interface eth0"), TRAIN_CMD ("lb-dist train"). Further arguments
# are lb-dist train flags and win over the ones here (argparse: the last occurrence counts).
set -euo pipefail
NP=${NP:-8}
HOSTS=${HOSTS:-localhost:$NP}
TRAIN_CMD=${TRAIN_CMD:-lb-dist train}
if [[ -n "${SMOKE:-}" ]]; then
  # ResNet-20 on 16x16 synthetic images, 2 epochs of 4 steps at B = 256 (gamma_scale 0.2), |J| = 64
  RUN_DIR=${RUN_DIR:-runs/resnet_smoke_clars}
  WORKLOAD=(--model resnet20 --dataset synthetic --image-size 16 --train-size 1024 --test-size 256
            --batch-size 256 --epochs 2 --per-sample-subset 64 --num-threads 1)
else
  RUN_DIR=${RUN_DIR:-runs/resnet56_cifar10_clars}
  WORKLOAD=(--model resnet56 --dataset cifar10 --data-dir "${DATA_DIR:?set DATA_DIR to the directory holding cifar-10-batches-py}"
            --batch-size 8192 --epochs 20 --per-sample-subset 512)
fi
# shellcheck disable=SC2086  # HOROVODRUN_ARGS and TRAIN_CMD are word lists
exec horovodrun -np "$NP" -H "$HOSTS" ${HOROVODRUN_ARGS:-} \
  $TRAIN_CMD --backend horovod --run-dir "$RUN_DIR" "${WORKLOAD[@]}" \
  --optimizer clars --base-lr 0.1 --base-batch-size 128 --eta 0.01 --momentum 0.9 --weight-decay 5e-4 \
  --schedule constant --clars-moments per-sample "$@"

#!/usr/bin/env bash
# The LARS baseline of resnet56_cifar10_clars.sh (CLARS paper, Fig. 4): the same model, batch and
# linear-scaling rate, eta 0.001, heavy-ball momentum 0.9, 5 warmup epochs then polynomial decay
# (GradientMix eq. 15, power 2). Same environment variables and SMOKE mode as resnet56_cifar10_clars.sh.
#
#   NP=8 HOSTS=node1:4,node2:4 DATA_DIR=/data/cifar horovod_examples/resnet56_cifar10_lars_warmup.sh
#   SMOKE=1 NP=2 horovod_examples/resnet56_cifar10_lars_warmup.sh
set -euo pipefail
NP=${NP:-8}
HOSTS=${HOSTS:-localhost:$NP}
TRAIN_CMD=${TRAIN_CMD:-lb-dist train}
if [[ -n "${SMOKE:-}" ]]; then
  RUN_DIR=${RUN_DIR:-runs/resnet_smoke_lars}
  WORKLOAD=(--model resnet20 --dataset synthetic --image-size 16 --train-size 1024 --test-size 256
            --batch-size 256 --epochs 2 --warmup-epochs 0.5 --num-threads 1)
else
  RUN_DIR=${RUN_DIR:-runs/resnet56_cifar10_lars}
  WORKLOAD=(--model resnet56 --dataset cifar10 --data-dir "${DATA_DIR:?set DATA_DIR to the directory holding cifar-10-batches-py}"
            --batch-size 8192 --epochs 20 --warmup-epochs 5)
fi
# shellcheck disable=SC2086
exec horovodrun -np "$NP" -H "$HOSTS" ${HOROVODRUN_ARGS:-} \
  $TRAIN_CMD --backend horovod --run-dir "$RUN_DIR" "${WORKLOAD[@]}" \
  --optimizer lars --base-lr 0.1 --base-batch-size 128 --eta 0.001 --momentum 0.9 --weight-decay 5e-4 \
  --schedule poly --decay-power 2 "$@"

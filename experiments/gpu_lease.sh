#!/usr/bin/env bash
# A GPU lease in three calls, most wanted first (a lease is 15 minutes of device time, the
# machine's start included; each call at most 10 minutes). From the repository root on the
# device machine, $OUT the folder whose files come back:
#
#   bash experiments/gpu_lease.sh check   # gpu_check.py: env, the bf16 step with and without
#                                         # NDHWC convolutions (profiled), f32, the evaluation (~6 min)
#   bash experiments/gpu_lease.sh epoch   # gpu_train.py epoch: a full-size epoch end to end (~4 min)
#   bash experiments/gpu_lease.sh train   # gpu_train.py cpu_real: 4 minutes of real training,
#                                         # export and 15-subset table brought back (~6 min)
#   bash experiments/gpu_lease.sh smoke   # all three at tiny sizes on this CPU
#
# Prepare on the development machine and carry both (ignored by git):
#   pip download --no-deps --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
#       grain array-record cloudpickle etils nibabel importlib-resources ml-collections PyYAML \
#       tensorboardX portpicker psutil protobuf absl-py typing-extensions packaging tqdm \
#       surface-distance                                                  # ~10 MB
#   python experiments/compact_cases.py --root data/brats2018 --out .gpu_data/brats2018_2mm  # ~22 MB
set -euo pipefail
part=${1:?usage: gpu_lease.sh check|epoch|train|smoke}
OUT=${OUT:-/tmp/gpu_lease_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ "$part" != smoke ] && ls .whl/*.whl >/dev/null 2>&1; then
  # The GPU image has jax, flax, optax, orbax and torch; the rest comes from the carried wheels.
  $PY -m pip install -q --no-index --find-links .whl nibabel grain ml-collections tensorboardX \
      tqdm portpicker surface-distance 2>&1 | tail -2 || true
fi
$PY -c 'import jax; print("devices:", jax.devices())'
case "$part" in
  check)
    $PY experiments/gpu_check.py --out "$OUT/gpu_check.jsonl" --artifacts-dir "$OUT" \
        --budget-s 360 --case-timeout-s 150 --precompile-timeout-s 200 --steps 10 --warmup 2 \
        --cases env,step_bf16,step_bf16_nhwc,step_f32,eval_bf16_nhwc,eval_bf16 \
        2>&1 | tee "$OUT/gpu_check.log" ;;
  epoch)
    $PY experiments/gpu_train.py --cases epoch --out-dir "$OUT" --epoch-cases 24 --workers 16 \
        --case-timeout-s 500 ;;
  train)
    $PY experiments/gpu_train.py --cases cpu_real --data .gpu_data/brats2018_2mm \
        --out-dir "$OUT" --train-s 240 --case-timeout-s 380 --step-timeout-s 90 ;;
  smoke)
    $PY experiments/gpu_check.py --smoke --out "$OUT/gpu_check.jsonl" \
        --cases env,step_bf16,step_bf16_nhwc,eval_bf16 --budget-s 600
    $PY experiments/gpu_train.py --smoke --out-dir "$OUT" ;;
  *) echo "unknown part $part: check|epoch|train|smoke" >&2; exit 2 ;;
esac
ls -la "$OUT"

#!/usr/bin/env bash
# The main job on the bundled demo photos: build the demo LMDB, train a model for a few minutes on the CPU, then
# test it (SR images + PSNR/SSIM on Y) next to the bicubic baseline.
#   bash scripts/demo.sh [MODEL]      MODEL: AdaFormer_x4 (default), PFT_light_x4, SwinIR_light_x4
# Threads: OMP_NUM_THREADS if set, else the cores not already busy (nproc minus the 1-minute load, at least 1):
# more OpenMP threads than idle cores run several times slower. Override: OMP_NUM_THREADS=2 bash scripts/demo.sh
# Outputs: experiments/demo_<MODEL>/ (checkpoints, training log), results/demo_<MODEL>/ and results/demo_Bicubic_x4/.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-AdaFormer_x4}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
TRAIN_OPT=options/demo/train_${MODEL}_demo.yml
TEST_OPT=options/demo/test_${MODEL}_demo.yml
CORES=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # usable cores (nproc itself follows OMP_NUM_THREADS)
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  OMP_NUM_THREADS=$(awk -v n="$CORES" '{ t = int(n - $1 + 0.5); print (t < 1 ? 1 : (t > n ? n : t)) }' /proc/loadavg)
  export OMP_NUM_THREADS
fi
echo "demo: $OMP_NUM_THREADS thread(s) (load $(cut -d' ' -f1 /proc/loadavg) on $CORES cores; set OMP_NUM_THREADS to change)"
[ -f "$TRAIN_OPT" ] || { echo "no demo for '$MODEL' ($TRAIN_OPT missing); choose one of:"; ls options/demo | sed -n 's/^train_\(.*\)_demo.yml$/  \1/p'; exit 2; }

"$PY" scripts/data_preparation/create_lmdb.py --skip-existing \
  --input datasets/demo/train/HR datasets/demo/train/LR_bicubic/X2 datasets/demo/train/LR_bicubic/X3 \
          datasets/demo/train/LR_bicubic/X4 \
  --output datasets/demo/lmdb/train_HR.lmdb datasets/demo/lmdb/train_LR_X2.lmdb datasets/demo/lmdb/train_LR_X3.lmdb \
           datasets/demo/lmdb/train_LR_X4.lmdb > /dev/null
# a re-run starts the demo afresh (BasicSR would otherwise archive the old folder under a new name)
rm -rf "experiments/demo_${MODEL}"
start=$(date +%s)
"$PY" adasr/train.py -opt "$TRAIN_OPT"
echo "demo training took $(( $(date +%s) - start )) s"
"$PY" adasr/test.py -opt "$TEST_OPT"
"$PY" adasr/test.py -opt options/demo/test_Bicubic_x4_demo.yml
echo
echo "== results (PSNR/SSIM on Y, held-out demo photos) =="
for log in "results/demo_${MODEL}" results/demo_Bicubic_x4; do
  f=$(ls -t "$log"/test_*.log | head -1)
  printf '%-28s %s\n' "$(basename "$log")" "$(grep -oE '# (psnr|ssim): [0-9.]+' "$f" | tr '\n' ' ')"
done
echo "SR images: results/demo_${MODEL}/visualization/demo_val/"

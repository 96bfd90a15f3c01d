#!/usr/bin/env bash
# GPU check: the CUDA paths that CI (CPU only) never runs, end to end through the CLI, then the
# training/inference throughput on the GPU and the unit tests with a GPU present.
#
#   bash bench/gpu_check.sh OUT_DIR [--no-tests]
#
# ONLY=REGEX runs the steps whose names match (e.g. ONLY='synth|lite0|predict|cuda_equals|nproc').
# Each step prints "ok  <step>" or "FAIL <step>" (its log is OUT_DIR/<step>.log) and the script goes
# on; the last line counts the failures. Needs cxrlab importable (pip install -e .[dev] or PYTHONPATH).
set -u
OUT=${1:?usage: bash bench/gpu_check.sh OUT_DIR [--no-tests]}
TESTS=${2:-}
W=$(mktemp -d /tmp/cxrlab-gpu.XXXX)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEV=${DEVICE:-cuda}        # DEVICE=cpu rehearses the script on a machine without a GPU
PER_CLASS=${PER_CLASS:-150}
CX="$PY -m cxrlab"
fails=0
step() {  # step NAME command...
  local name=$1; shift
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return; fi
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then echo "ok   $name ($((SECONDS - t0)) s)"
  else echo "FAIL $name ($((SECONDS - t0)) s): $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ')"; fails=$((fails + 1)); fi
}

$PY - <<'EOF' | tee "$OUT/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF

D=$W/synth
step synth $CX synth --out "$D" --per-class "$PER_CLASS" --size 128
common=(--data "$D" --img-size 128 --device $DEV --quiet --workers 4)
# Pretrained EfficientNet-Lite0: fp16 autocast + GradScaler (amp auto on CUDA), EMA, per-epoch Grad-CAM.
lite0=("${common[@]}" --model efficientnet_lite0 --pretrained --ema 0.99 --optimizer adamw --lr 1e-3 --scheduler cosine
       --cam-every 1 --cam-images 2 --out "$W/lite0")
step train_lite0_fp16 $CX train "${lite0[@]}" --epochs "${EPOCHS:-3}"
step resume_lite0 $CX train "${lite0[@]}" --epochs $((${EPOCHS:-3} + 1)) --resume
step train_resnet18_bf16_compile $CX train "${common[@]}" --model resnet18 --epochs 2 --amp bf16 --compile \
  --out "$W/r18"
step train_design1 $CX train "${common[@]}" --model chestxray_cnn --epochs 2 --out "$W/d1"
step train_design2 $CX train "${common[@]}" --model custom_cnn --epochs 2 --class-weights --monitor val_auc \
  --cam-every 1 --cam-images 2 --out "$W/d2"
step predict_cuda $CX predict --checkpoint "$W/lite0/best.pt" "$D/test" --output "$W/p_cuda.csv" --device $DEV
step predict_cpu $CX predict --checkpoint "$W/lite0/best.pt" "$D/test" --output "$W/p_cpu.csv" --device cpu
step predict_tta_cuda $CX predict --checkpoint "$W/lite0/best.pt" "$D/test" --tta --output "$W/p_tta.csv" --device $DEV
step cuda_equals_cpu $PY - "$W/p_cuda.csv" "$W/p_cpu.csv" <<'EOF'
import csv, sys
a, b = ([r for r in csv.DictReader(open(f))] for f in sys.argv[1:3])
assert len(a) == len(b) > 0, (len(a), len(b))
cols = [c for c in a[0] if c.startswith("p_") or c.startswith("prob")]
assert cols, a[0].keys()
diff = max(abs(float(x[c]) - float(y[c])) for x, y in zip(a, b) for c in cols)
same = sum(x["predicted"] == y["predicted"] for x, y in zip(a, b))
print(f"{len(a)} images, max |p_cuda - p_cpu| = {diff:.2e}, same label {same}/{len(a)}")
assert diff < 2e-3 and same == len(a), (diff, same)
EOF
step evaluate_cuda $CX evaluate --checkpoint "$W/lite0/best.pt" --data "$D" --out "$W/eval" --device $DEV --bootstrap 200
step stress_cuda $CX stress --checkpoint "$W/lite0/best.pt" --data "$D" --out "$W/stress" --device $DEV
step explain_cuda $CX explain --checkpoint "$W/lite0/best.pt" "$D/test" --out "$W/cam" --device $DEV
step explain_score_cuda $CX explain --checkpoint "$W/d2/best.pt" --score --data "$D" --out "$W/cam_score" --device $DEV
step export_onnx $CX export --checkpoint "$W/lite0/best.pt" --out "$W/lite0.onnx"
# one GPU: --nproc 2 on CUDA must stop with a clear message; on the CPU (gloo) it must run
step nproc2_one_gpu_refused bash -c "$CX train ${common[*]} --model resnet18 --epochs 1 --nproc 2 --out $W/ddp 2>&1 | grep 'CUDA GPU(s) are visible'"
step nproc2_cpu_on_gpu_machine $CX train --data "$D" --img-size 64 --device cpu --quiet --model resnet18 --epochs 1 --nproc 2 --out "$W/ddp_cpu"
step no_failures_logged bash -c "! grep -H -i 'failed\|traceback' $W/*/train.log"
cp "$W/eval/metrics.json" "$OUT/eval_metrics.json" 2>/dev/null
step throughput_gpu $PY bench/throughput.py --device $DEV --images ${TP_IMAGES:-1024} --json "$OUT/throughput_gpu.json"
if [ "$TESTS" != "--no-tests" ]; then
  step pytest timeout 300 $PY -m pytest -q -m "not slow and not browser" -p no:cacheprovider
fi
echo "failures: $fails"

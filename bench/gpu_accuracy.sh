#!/usr/bin/env bash
# The accuracy recipe on a GPU: the same `bench/accuracy.py` runs as on the 2-core CPU, by epochs instead of
# by the CPU's 30-minute budget, so that a lent GPU answers (1) how long the recipe takes there and whether it
# reproduces the CPU numbers at the CPU's epoch count, and (2) whether more epochs than the CPU can afford
# move the test numbers (is compute what limits the Kermany goal?).
#
#   bash bench/gpu_accuracy.sh DATA_DIR OUT_DIR [SEED:EPOCHS ...]
#
# Default runs, in this order: 3:16 (CPU seed 3 ran 16 epochs in 26 min: 0.949 / 0.979), 3:30, 4:30, 0:30.
# BUDGET_MIN (default 30) is the run's --budget-min (with EXTRA="--members K --parallel P" the members' share of it
# bounds their epochs, so that a slower machine trims epochs instead of running into the deadline).
# DEADLINE_S (default 480) stops starting new runs once that many seconds have passed, and the run in
# progress is cut at the deadline, so the finished runs' summaries always come back.
# Each finished run appends one line to OUT_DIR/summary.jsonl; logs and metrics go to OUT_DIR/runs.tar.gz.
# EXTRA adds arguments to every run, e.g. EXTRA="--members 5 --parallel 5": five members trained side by side
# on the one GPU and averaged (the members' own test numbers are in the summary line too).
set -u
DATA=${1:?usage: bash bench/gpu_accuracy.sh DATA_DIR OUT_DIR [SEED:EPOCHS ...]}
OUT=${2:?usage: bash bench/gpu_accuracy.sh DATA_DIR OUT_DIR [SEED:EPOCHS ...]}
shift 2
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=(3:16 3:30 4:30 0:30)
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE_S:-480}
W=$(mktemp -d /tmp/cxrlab-gpuacc.XXXX)
mkdir -p "$OUT"
export CXRLAB_CACHE=$W/cache
$PY - <<'EOF' | tee "$OUT/env.txt"
import os, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cpus", os.cpu_count(),
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
for run in "${RUNS[@]}"; do
  seed=${run%%:*}; epochs=${run##*:}
  left=$((DEADLINE - SECONDS))
  if [ $left -lt 30 ]; then echo "skipped seed $seed, $epochs epochs: deadline"; continue; fi
  name=s${seed}_e${epochs}
  t0=$SECONDS
  if timeout $left $PY bench/accuracy.py --data "$DATA" --out "$W/$name" --seed "$seed" --epochs "$epochs" \
      --budget-min "${BUDGET_MIN:-30}" ${EXTRA:-} >"$W/$name.log" 2>&1; then
    $PY - "$W/$name/bench_summary.json" "$name" "$epochs" >>"$OUT/summary.jsonl" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(json.dumps({"run": sys.argv[2], "epochs": int(sys.argv[3]), **{k: s[k] for k in
      ("seed", "wall_s", "best_epoch", "accuracy", "auc_macro", "macro_f1", "recall", "specificity", "members")
      if k in s}}))
EOF
    echo "ok   $name ($((SECONDS - t0)) s): $(tail -n 1 "$OUT/summary.jsonl")"
  else
    echo "FAIL $name ($((SECONDS - t0)) s): $(tail -n 5 "$W/$name.log" | tr '\n' ' ')"
    cp "$W/$name.log" "$OUT/" 2>/dev/null
    [ -s "$OUT/summary.jsonl" ] || { echo "first run failed: the others would too"; exit 1; }
  fi
done
(cd "$W" && tar czf "$OUT/runs.tar.gz" --exclude='*.pt' --exclude='*.png' --exclude='*.html' --exclude=cache ./*.log ./s*/ 2>/dev/null)
echo "runs done in $SECONDS s"

#!/usr/bin/env bash
# GPU check for the scale work (issue 5): one prepared script, < 8 minutes on a single GPU.
#
#   bash benchmarks/gpu_check.sh                 # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # the same steps, tiny, on CPU (what CI can run)
#
# Steps (each with its own time limit; the script stops at the first failure):
#   1. the quickstart in precision 16-mixed (fp16 autocast + GradScaler through manual optimisation)
#   2. the seed's quick-start workload: GPT-2-small architecture, 100 training texts, 5 queries (16-mixed)
#   3. 4-bit NF4 + LoRA unlearning on a 1.1B-parameter Llama built from configs/llama1b_quant4_lora.yaml
#   4. the scoring-throughput benchmark (plus the naive, overhead and memory benchmarks at GPU sizes
#      if time is left: SKIP_EXTRA=1 skips them)
#   5. if time is left: the batch-1 ascent loop against a plain loop and parallel_targets K = 1, 2, 4, 8
#      (GPT-2-small sized), into $OUT/bench
# Each step's outputs and checks go to $OUT (default runs/gpu_check); $OUT/gpu_check_summary.json
# collects them. Offline: everything is built from configs, nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

MODE=gpu
if [[ "${1:-}" == "--cpu-dry-run" ]]; then MODE=cpu; fi
OUT=${OUT:-runs/gpu_check}
if [[ "$MODE" == cpu ]]; then OUT=${OUT%/}-cpu-dry-run; export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
rm -rf "$OUT"
mkdir -p "$OUT"
START=$(date +%s)
PY=${PYTHON:-python}
UNTRAC="$PY -m untrac_pl.cli"

step() { echo; echo "=== [$(( $(date +%s) - START ))s] $*"; }

if [[ "$MODE" == gpu ]]; then
  $PY - <<'EOF'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible (use --cpu-dry-run on a CPU machine)")
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)
import bitsandbytes, peft
print("bitsandbytes", bitsandbytes.__version__, "| peft", peft.__version__)
EOF
fi

# ---------------------------------------------------------------------------------------------
step "1/4 quickstart, precision 16-mixed"
if [[ "$MODE" == gpu ]]; then
  timeout 120 $UNTRAC attribute -c configs/quickstart_16mixed.yaml --attribution.output_dir "$OUT/quickstart_16mixed" --trainer.enable_progress_bar false
else
  timeout 120 $UNTRAC attribute -c configs/quickstart_16mixed.yaml --attribution.output_dir "$OUT/quickstart_16mixed" --trainer.enable_progress_bar false \
    --trainer.accelerator cpu --data.max_length 32
fi

# ---------------------------------------------------------------------------------------------
step "2/4 seed quick-start workload (GPT-2-small, 100 texts, 5 queries, 16-mixed)"
if [[ "$MODE" == gpu ]]; then
  timeout 150 $PY benchmarks/seed_workload.py --device cuda --precision 16-mixed --out "$OUT/seed_workload" | tee "$OUT/seed_workload.json"
else
  timeout 120 $PY benchmarks/seed_workload.py --device cpu --precision 16-mixed --tiny --out "$OUT/seed_workload" | tee "$OUT/seed_workload.json"
fi

# ---------------------------------------------------------------------------------------------
step "3/4 4-bit NF4 + LoRA unlearning, Llama 1.1B built from a config"
if [[ "$MODE" == gpu ]]; then
  timeout 240 $UNTRAC attribute -c configs/llama1b_quant4_lora.yaml --attribution.output_dir "$OUT/llama1b_quant4_lora" --trainer.enable_progress_bar false
else
  timeout 120 $UNTRAC attribute -c configs/llama1b_quant4_lora.yaml --attribution.output_dir "$OUT/llama1b_quant4_lora" --trainer.enable_progress_bar false \
    --model.model.config '{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, max_position_embeddings: 256, vocab_size: 2048, tie_word_embeddings: false}' \
    --model.model.quantization '{bits: 4, quant_type: nf4, double_quant: true, compute_dtype: bfloat16, device: cpu}' \
    --trainer.accelerator cpu --data.max_length 32
fi

# ---------------------------------------------------------------------------------------------
step "4/4 benchmarks"
if [[ "$MODE" == gpu ]]; then
  timeout 150 $PY benchmarks/run_all.py --device cuda --gpu-sizes --only throughput --out "$OUT/bench"
  ELAPSED=$(( $(date +%s) - START ))
  if [[ "${SKIP_EXTRA:-0}" != 1 && $ELAPSED -lt 300 ]]; then
    timeout $(( 450 - ELAPSED )) $PY benchmarks/run_all.py --device cuda --gpu-sizes --reuse --only throughput naive overhead memory --out "$OUT/bench" \
      || echo "extra benchmarks did not finish in time (the throughput result above stands)"
  fi
else
  timeout 240 $PY benchmarks/run_all.py --device cpu --tiny --threads 1 --out "$OUT/bench"
fi

# ---------------------------------------------------------------------------------------------
# issue 15 (only on a GPU, only if time is left): the batch-1 ascent loop vs a plain loop, and K targets at once
if [[ "$MODE" == gpu && "${SKIP_EXTRA:-0}" != 1 ]]; then
  ELAPSED=$(( $(date +%s) - START ))
  if [[ $ELAPSED -lt 360 ]]; then
    step "5 (extra) ascent loop and parallel targets on the GPU"
    timeout 120 $PY benchmarks/bench_ascent_loop.py --device cuda --size small --repeats 3 --out "$OUT/bench" || echo "ascent-loop benchmark did not finish"
    timeout 150 $PY benchmarks/bench_parallel_targets.py --device cuda --size small --ks 1,2,4,8 --repeats 3 --out "$OUT/bench" || echo "parallel-targets benchmark did not finish"
  fi
fi

# ---------------------------------------------------------------------------------------------
step "checks"
MODE=$MODE OUT=$OUT $PY - <<'EOF'
import json, os, sys
from pathlib import Path

mode, out = os.environ["MODE"], Path(os.environ["OUT"])
summary, problems = {"mode": mode}, []

def load(path):
    return json.loads(Path(path).read_text())

# 1. quickstart 16-mixed: the precision actually used and per-phase peaks
s = load(out / "quickstart_16mixed" / "summary.json")
m = load(out / "quickstart_16mixed" / "memory.json")
expected = "16-mixed" if mode == "gpu" else "bf16-mixed"
summary["quickstart_16mixed"] = {"precision": s["precision"], "failed": s["num_failed"], "memory": {k: v.get("peak_gb") for k, v in m.items()}}
if s["precision"] != expected: problems.append(f"quickstart precision {s['precision']} != {expected}")
if s["num_failed"]: problems.append("quickstart has failed targets")
if not {"unlearning", "scoring"} <= set(m): problems.append("memory.json lacks a phase")
if mode == "gpu" and m["unlearning"]["device"] != "cuda": problems.append("memory was not measured on CUDA")

# 2. seed workload
w = json.loads((out / "seed_workload.json").read_text()[(out / "seed_workload.json").read_text().index("{"):])
summary["seed_workload"] = {k: w[k] for k in ("seconds", "scores_shape", "precision", "parameters")}
if w["failed"]: problems.append("seed workload has failed targets")
if w["scores_shape"][0] != 5: problems.append("seed workload: expected 5 query rows")
if mode == "gpu" and w["parameters"] < 100e6: problems.append("seed workload model is not GPT-2-small sized")

# 3. 4-bit + LoRA
s = load(out / "llama1b_quant4_lora" / "summary.json")
m = load(out / "llama1b_quant4_lora" / "memory.json")
summary["llama1b_quant4_lora"] = {"failed": s["num_failed"], "model": m.get("model"), "memory": {k: v.get("peak_gb") for k, v in m.items() if k != "model"}}
if s["num_failed"]: problems.append("4-bit run has failed targets")
if not m.get("model", {}).get("quantized"): problems.append("4-bit run: model not quantised")
if mode == "gpu" and m["model"]["trainable_bytes"] * 20 > m["model"]["parameter_bytes"]: problems.append("4-bit run: adapters are not small next to the base")

# 4. benchmarks
t = load(out / "bench" / "throughput.json")
summary["throughput_ratio"] = t["ratio"]
if mode == "gpu" and t["ratio"] < 0.9: problems.append(f"throughput ratio {t['ratio']:.2f} < 0.9")
table = out / "bench" / "table.md"
if table.exists():
    summary["table"] = table.read_text()

summary["problems"] = problems
(out / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
sys.exit(1 if problems else 0)
EOF
step "gpu_check finished: all checks passed ($MODE)"

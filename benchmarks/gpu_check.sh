#!/usr/bin/env bash
# First contact with a GPU: everything llmlab has never run on one, in one script, < 8 min on one
# H100/H200 (docs/performance.md, "GPU check").
#
#   benchmarks/gpu_check.sh [--cpu-dry-run] [--out DIR]
#
# 1. the `gpu`-marked tests (bf16 vs fp32, flash-attn and its varlen path vs SDPA, Mamba2 kernels,
#    generation on CUDA);
# 2. 200 steps of recipes/gpu_124m_fineweb.yaml's pretrain stage on local data: tokens/s and MFU
#    (goal >= 45 %);
# 3. packed documents (flash_attn_varlen_func) vs the same documents padded: loss, bf16 and fp32;
# 4. QLoRA (bitsandbytes 4-bit) on a small model, merged into final/;
# 5. Mamba2 training steps, with the mamba_ssm / causal_conv1d kernels where installed;
# 6. FSDP (distributed.strategy: fsdp) on one GPU (world size 1) through one optimizer step.
#
# Each part writes DIR/<part>.json; DIR/summary.json collects them. The exit status is the number
# of failed parts. --cpu-dry-run runs every part on the CPU at tiny sizes (the gpu tests are only
# collected), as tests/test_gpu_check.py does in the suite.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=""
OUT="gpu_check_out"
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY="--cpu-dry-run" ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--cpu-dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY="${PYTHON:-python}"
failed=0

run_part() {  # name, command...: run it, log it, count a failure
  local name="$1"; shift
  local t0=$SECONDS
  echo "== $name"
  if "$@" > "$OUT/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s): $(tail -n 1 "$OUT/$name.log")"
  else
    echo "   FAILED ($((SECONDS - t0)) s); last lines of $OUT/$name.log:"
    tail -n 20 "$OUT/$name.log" | sed 's/^/   | /'
    failed=$((failed + 1))
  fi
}

if [ -z "$DRY" ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --cpu-dry-run')" || exit 2
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  run_part gpu_tests "$PY" -m pytest -q -m gpu -rs -p no:cacheprovider "$ROOT/tests"
else
  run_part gpu_tests "$PY" -m pytest -q -m gpu --collect-only -p no:cacheprovider "$ROOT/tests"
fi
for part in throughput packed qlora mamba2 fsdp1; do
  run_part "$part" "$PY" "$ROOT/benchmarks/gpu_check.py" "$part" $DRY --out "$OUT"
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
(out / "summary.json").write_text(json.dumps(parts, indent=2))
t = parts.get("throughput")
if t:
    print(f"pretrain ({t['params'] / 1e6:.1f} M parameters): {t['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {100 * t['mfu']:.1f} % (goal 45 %)")
PYEOF
echo "$failed part(s) failed; results in $OUT/summary.json"
exit "$failed"

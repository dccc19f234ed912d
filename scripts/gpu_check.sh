#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU and tetrad's source tree (no package
# registry needed: tetrad runs from PYTHONPATH with the torch found there), run the GPU tests
# and bench/gpu.py within 8 minutes and write a JSON summary to $OUT (default ./gpu_out).
#   bash scripts/gpu_check.sh              # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-smoke  # anywhere: the same steps with the GPU parts
#                                          # skipped or on the CPU, so CI catches a broken script
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
SMOKE=""
[ "${1:-}" = "--cpu-smoke" ] && SMOKE=--cpu-smoke
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
start=$(date +%s)

"$PY" - > "$OUT/env.json" <<'PYEOF'
import json, torch
cuda = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": cuda,
                  "device": torch.cuda.get_device_name(0) if cuda else None,
                  "devices": torch.cuda.device_count() if cuda else 0}))
PYEOF

# The GPU tests: pytest where it is installed, else tests/gpu/mini_pytest.py (no registry there).
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout 330 "$PY" -m pytest -q -p no:cacheprovider -rs tests/gpu > "$OUT/gpu_tests.log" 2>&1
  rc_tests=$?
  [ $rc_tests -eq 5 ] && rc_tests=0  # nothing collected counts as a broken check below
else
  if [ -n "$SMOKE" ]; then
    timeout 60 "$PY" tests/gpu/mini_pytest.py --collect-only tests/gpu/test_*.py > "$OUT/gpu_tests.log" 2>&1
  else
    timeout 330 "$PY" tests/gpu/mini_pytest.py tests/gpu/test_*.py > "$OUT/gpu_tests.log" 2>&1
  fi
  rc_tests=$?
fi

timeout 150 "$PY" bench/gpu.py $SMOKE > "$OUT/bench_gpu.jsonl" 2> "$OUT/bench_gpu.log"
rc_bench=$?

"$PY" - "$OUT" "$rc_tests" "$rc_bench" "$start" <<'PYEOF'
import json, re, sys, time
from pathlib import Path
out, rc_tests, rc_bench, start = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
log = (out / "gpu_tests.log").read_text(errors="replace")
counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", log)}
counts["collected"] = log.count("COLLECTED ")
bench = [json.loads(l) for l in (out / "bench_gpu.jsonl").read_text().splitlines() if l.startswith("{")]
summary = {"env": json.loads((out / "env.json").read_text()), "tests": counts, "tests_rc": rc_tests,
           "bench": bench, "bench_rc": rc_bench, "seconds": round(time.time() - start, 1)}
ran = counts.get("passed", 0) + counts.get("failed", 0) + counts.get("skipped", 0) + counts["collected"]
summary["ok"] = rc_tests == 0 and rc_bench == 0 and ran > 0 and len(bench) >= 6
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("ok", "tests", "tests_rc", "bench_rc", "seconds")}))
sys.exit(0 if summary["ok"] else 1)
PYEOF

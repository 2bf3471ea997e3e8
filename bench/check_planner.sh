#!/usr/bin/env bash
# Is the simulator honest? Calibrate a cost profile on this machine from the daemon's own steps
# under chat traffic, then for the same chat workload at two loads (one light, one near
# saturation) compare what `convoy plan` predicts for one `convoy serve` (its defaults) with
# what `convoy-bench run --spawn` measures on the real daemon: throughput (requests/s), TTFT
# p50 (within 20%) and TTFT p99 (within 30%). Exit status 1 when a figure is outside its
# tolerance. Results: docs/benchmarks.md.
#
# The calibration runs use their own seeds and rates between the two loads, so the checked runs
# are not the data the profile was fitted on: `convoy serve --step-log` records every step's
# shape and time under traffic, `convoy-bench calibrate --from-steps` fits the cost model to
# them, and `--edge-from` takes the per-request time outside the engine (TTFT minus the
# daemon's own) from the first calibration run's report.
#
#   bash bench/check_planner.sh
#   LIGHT=0.1 HEAVY=0.3 DURATION=180 bash bench/check_planner.sh
#
# Needs target/release/{convoy,convoy-bench} (cargo build --release). Run it on an otherwise
# idle machine: the profile and the measurement must see the same CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${MODEL:-models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
workload="${WORKLOAD:-bench/workloads/chat.toml}"
light="${LIGHT:-0.1}"
heavy="${HEAVY:-0.3}"
duration="${DURATION:-180}"
# Two calibration runs between the loads (a quarter and three quarters of the way), so the
# fit sees the small and the larger batches of both.
cal_rates="${CAL_RATES:-$(python3 -c "l, h = $light, $heavy; print(f'{round(l + (h - l) / 4, 4)} {round(l + 3 * (h - l) / 4, 4)}')")}"
cal_seed="${CAL_SEED:-1000}"
out="${OUT:-bench/planner-out}"
mkdir -p "$out"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')
echo "machine: $cpu, $(nproc) CPUs; model $model; workload $workload; loads $light and $heavy conv/s, $duration s each"
if [ ! -f "$out/profile.json" ] || [ "${RECALIBRATE:-0}" = 1 ]; then
  logs=()
  k=0
  for cal_rate in $cal_rates; do
    echo "calibration run: $cal_rate conv/s, seed $((cal_seed + k)), $duration s"
    ./target/release/convoy-bench run --spawn --model "$model" --workload "$workload" \
      --rate "$cal_rate" --seed "$((cal_seed + k))" --duration-s "$duration" --no-progress \
      --report "$out/calibration-run-$k.json" -- --step-log "$out/steps-$k.jsonl" >"$out/calibration-run-$k.txt"
    logs+=(--from-steps "$out/steps-$k.jsonl")
    k=$((k + 1))
  done
  ./target/release/convoy-bench calibrate --model "$model" "${logs[@]}" \
    --edge-from "$out/calibration-run-0.json" --out "$out/profile.json" | tee "$out/calibration.txt"
fi
for rate in "$light" "$heavy"; do
  ./target/release/convoy-bench run --spawn --model "$model" --workload "$workload" \
    --rate "$rate" --duration-s "$duration" --no-progress --report "$out/run-$rate.json" >"$out/run-$rate.txt"
  ./target/release/convoy plan --workload "$workload" --conversation-rate "$rate" \
    --profile "$out/profile.json" --gpus 1 --warmup-s 0 --window-s "$duration" --json >"$out/plan-$rate.json"
done
python3 - "$out" "$light" "$heavy" <<'PY'
import json, sys
out, rates = sys.argv[1], sys.argv[2:]
edge = json.load(open(f"{out}/profile.json"))["cost"].get("request_edge_s", 0.0)
rows, ok = [], True
for rate in rates:
    run = json.load(open(f"{out}/run-{rate}.json"))["runs"][0]
    plan = json.load(open(f"{out}/plan-{rate}.json"))["at"]
    for name, measured, predicted, tol in [
        ("requests/s", run["throughput"]["requests_per_s"], plan["requests_per_s"], 0.20),
        ("TTFT p50 ms", run["latency_ms"]["ttft"]["p50"], plan["ttft_p50_ms"], 0.20),
        ("TTFT p99 ms", run["latency_ms"]["ttft"]["p99"], plan["ttft_p99_ms"], 0.30),
        ("hit ratio", run["cache"]["hit_ratio"], plan["hit_ratio"], None),
        # Informational: the daemon's own TTFT against the prediction less the edge.
        ("engine p50 ms", run["latency_ms"]["engine_ttft"]["p50"], plan["ttft_p50_ms"] - 1e3 * edge, None),
    ]:
        err = (predicted - measured) / measured if measured else float("inf")
        good = tol is None or abs(err) <= tol
        ok &= good
        rows.append((rate, name, measured, predicted, err, "-" if tol is None else f"{tol:.0%}", "ok" if good else "OUT"))
print(f"{'conv/s':>7} {'figure':>12} {'measured':>10} {'predicted':>10} {'error':>7} {'tol':>5}")
for r in rows:
    print(f"{r[0]:>7} {r[1]:>12} {r[2]:>10.3f} {r[3]:>10.3f} {r[4]:>+7.1%} {r[5]:>5} {r[6]}")
sys.exit(0 if ok else 1)
PY

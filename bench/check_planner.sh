#!/usr/bin/env bash
# Is the simulator honest? Calibrate a cost profile on this machine from the daemon's own steps
# under chat traffic, then for the same chat workload at several loads (LIGHT and HEAVY, or the
# list RATES, in conversations/s; put some at and past the knee) compare what `convoy plan`
# predicts for one `convoy serve` (its defaults) with what `convoy-bench run --spawn` measures
# on the real daemon: throughput (requests/s), TTFT p50 (within 20%) and TTFT p99 (within
# 30%). Exit status 1 when a figure is outside its tolerance (or its band, below). Results:
# docs/benchmarks.md.
#
# The calibration runs use their own seeds and rates between the two loads, so the checked runs
# are not the data the profile was fitted on: `convoy serve --step-log` records every step's
# shape and time under traffic, `convoy-bench calibrate --from-steps` fits the cost model to
# them, and `--edge-from` fits the per-request time outside the engine (TTFT minus the daemon's
# own) against the daemon's running requests over the calibration runs' reports.
#
# Each checked rate is also planned with every step slower and faster (`convoy plan
# --cost-margin`) by as much as the profile missed that run's own logged steps (at least 2%):
# a figure outside its tolerance passes as "band" only inside that band, which says the miss
# comes from the profile's step times and not from the model of the queue. The second table
# gives the profile's time for the logged steps against their measured time, and the engine's
# busy share and batch, measured and simulated.
#
#   bash bench/check_planner.sh
#   LIGHT=0.1 HEAVY=0.3 DURATION=180 bash bench/check_planner.sh
#   RECALIBRATE=1 LIGHT=0.2 HEAVY=0.9 RATES="0.2 0.7 0.9 1.0" bash bench/check_planner.sh
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
    logs+=(--from-steps "$out/steps-$k.jsonl" --edge-from "$out/calibration-run-$k.json")
    k=$((k + 1))
  done
  ./target/release/convoy-bench calibrate --model "$model" "${logs[@]}" \
    --out "$out/profile.json" | tee "$out/calibration.txt"
fi
rates="${RATES:-$light $heavy}"
for rate in $rates; do
  # REUSE=1 keeps a rate's measured run from an earlier check (to plan it again after a model
  # change: planning is deterministic and takes seconds, a run takes minutes).
  if [ "${REUSE:-0}" != 1 ] || [ ! -f "$out/run-$rate.json" ]; then
    ./target/release/convoy-bench run --spawn --model "$model" --workload "$workload" \
      --rate "$rate" --duration-s "$duration" --no-progress --report "$out/run-$rate.json" \
      -- --step-log "$out/steps-run-$rate.jsonl" >"$out/run-$rate.txt"
  fi
  ./target/release/convoy plan --workload "$workload" --conversation-rate "$rate" \
    --profile "$out/profile.json" --gpus 1 --warmup-s 0 --window-s "$duration" --json \
    --cost-margin 0 --step-log "$out/steps-plan-$rate.jsonl" >"$out/plan-$rate.json"
done
# shellcheck disable=SC2086
python3 - "$out" "$workload" "$duration" $rates <<'PY'
import json, math, subprocess, sys
out, workload, duration, rates = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
FLOOR = 0.02  # the narrowest band: run-to-run noise of a step's time
cost = json.load(open(f"{out}/profile.json"))["cost"]
edge, edge_per_running = cost.get("request_edge_s", 0.0), cost.get("request_edge_per_running_s", 0.0)


def modelled(s):
    """The profile's time of a logged step's shape (the linear terms of a calibrated profile)."""
    return (cost["fixed_s"] + s["prefill_tokens"] * cost["prefill_token_s"]
            + s["decode_seqs"] * cost["decode_token_s"] + s["kv_tokens"] * cost.get("kv_token_s", 0)
            + s["attention_pairs"] * cost.get("attention_pair_s", 0)
            + s["copied_slots"] * cost.get("copy_token_s", 0))


def steps(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def cost_error(ss):
    """Modelled over measured time of these steps, less one (+5%: the profile says 5% longer)."""
    measured = sum(s["step_s"] for s in ss)
    return sum(modelled(s) for s in ss) / measured - 1 if measured else float("nan")


def busy(ss):
    span = ss[-1]["at_s"] + ss[-1]["step_s"] - ss[0]["at_s"]
    return sum(s["step_s"] for s in ss) / span


def with_steps(rate, margin):
    """The prediction with every step `margin` slower (negative: faster)."""
    cmd = ["./target/release/convoy", "plan", "--workload", workload, "--conversation-rate", rate,
           "--profile", f"{out}/profile.json", "--gpus", "1", "--warmup-s", "0",
           "--window-s", duration, "--json", "--cost-margin", f"{margin:.4f}"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["margin"]["report"]


def figure(report, key):
    """A report's figure; an overloaded run's infinite percentiles come back as null."""
    v = report.get(key)
    return math.inf if v is None else v


rows, ok, step_rows = [], True, []
for rate in rates:
    run = json.load(open(f"{out}/run-{rate}.json"))["runs"][0]
    plan = json.load(open(f"{out}/plan-{rate}.json"))["at"]
    real, sim = steps(f"{out}/steps-run-{rate}.jsonl"), steps(f"{out}/steps-plan-{rate}.jsonl")
    held_out = cost_error(real)
    # The band: the predictions with every step as far off as the profile was on this run's
    # own steps (at least FLOOR), faster and slower.
    margin = max(abs(held_out), FLOOR)
    faster, slower = with_steps(rate, -margin), with_steps(rate, margin)
    step_rows.append((rate, len(real), held_out,
                      cost_error([s for s in real if s["prefill_tokens"] > 0]),
                      cost_error([s for s in real if s["prefill_tokens"] == 0]),
                      cost_error([s for s in real if s["prefill_tokens"] >= 512]),
                      busy(real), busy(sim),
                      sum(s["decode_seqs"] for s in real) / len(real),
                      sum(s["decode_seqs"] for s in sim) / len(sim)))
    for name, measured, key, tol in [
        ("requests/s", run["throughput"]["requests_per_s"], "requests_per_s", 0.20),
        ("TTFT p50 ms", run["latency_ms"]["ttft"]["p50"], "ttft_p50_ms", 0.20),
        ("TTFT p99 ms", run["latency_ms"]["ttft"]["p99"], "ttft_p99_ms", 0.30),
        ("hit ratio", run["cache"]["hit_ratio"], "hit_ratio", None),
    ]:
        predicted = figure(plan, key)
        lo, hi = sorted((figure(faster, key), figure(slower, key)))
        err = (predicted - measured) / measured if measured else float("inf")
        # Within tolerance; or within the band the profile's own error on this run's steps
        # gives (near the knee a few percent of step time moves the latencies a lot), a band
        # with both ends finite.
        verdict = "ok" if tol is None or abs(err) <= tol else \
            "band" if lo <= measured <= hi and math.isfinite(hi) else "OUT"
        ok &= verdict != "OUT"
        rows.append((rate, name, measured, predicted, err, lo, hi, "-" if tol is None else f"{tol:.0%}", verdict))
    rows.append((rate, "band +-", 100 * margin, None, None, None, None, "-", "-"))
    # Informational: the edge the profile gives at the daemon's measured mean running count,
    # and the daemon's own TTFT against the prediction less that edge.
    modelled_edge = edge + edge_per_running * run["server"]["running_mean"]
    rows.append((rate, "edge p50 ms", run["latency_ms"]["edge"]["p50"], 1e3 * modelled_edge,
                 None, None, None, "-", "-"))
    rows.append((rate, "engine p50 ms", run["latency_ms"]["engine_ttft"]["p50"],
                 plan["ttft_p50_ms"] - 1e3 * modelled_edge, None, None, None, "-", "-"))
print("predictions as made, and (band) with every step as much faster .. slower than the profile")
print("as the profile missed that run's own logged steps by (at least 2%; the 'band +-' row, in %):")
print(f"{'conv/s':>7} {'figure':>13} {'measured':>10} {'predicted':>10} {'error':>7} {'band':>21} {'tol':>5}")
for r in rows:
    predicted = f"{r[3]:>10.3f}" if r[3] is not None else f"{'':>10}"
    err = f"{r[4]:>+7.1%}" if r[4] is not None else f"{'':>7}"
    band = f"{r[5]:>10.3f}..{r[6]:<9.3f}" if r[5] is not None else f"{'':>21}"
    print(f"{r[0]:>7} {r[1]:>13} {r[2]:>10.3f} {predicted} {err} {band} {r[7]:>5} {r[8]}")
print()
print("the daemon's logged steps: the profile's time for them against the measured (held-out cost error),")
print("the engine's busy share and mean decoding sequences per step, measured and simulated:")
print(f"{'conv/s':>7} {'steps':>6} {'all':>7} {'prompt':>7} {'decode':>7} {'>=512':>7} {'busy':>6} {'sim':>6} {'batch':>6} {'sim':>6}")
def share(e):
    return f"{'-':>7}" if e != e else f"{e:>+7.1%}"  # NaN: no such steps


for r in step_rows:
    errors = " ".join(share(e) for e in r[2:6])
    print(f"{r[0]:>7} {r[1]:>6} {errors} {r[6]:>6.1%} {r[7]:>6.1%} {r[8]:>6.2f} {r[9]:>6.2f}")
sys.exit(0 if ok else 1)
PY

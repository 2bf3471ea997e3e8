#!/usr/bin/env bash
# A convoy fleet on this machine: N replicas (loopback HTTP ports, small KV caches so the
# cache is scarce) behind HAProxy with deploy/haproxy.cfg, driven by a multi-turn chat
# workload (scripts/fleet_driver.py) THROUGH HAProxy. Phases, each on fresh replicas:
#
#   single      one replica with the whole fleet's KV memory: the hit ratio to match
#   sticky      N replicas, consistent hashing on X-Session-ID / `user`
#   roundrobin  N replicas, round robin (CONVOY_BALANCE=roundrobin): the counter-example
#   kill        sticky again, and one replica gets SIGKILL mid-run: client errors must be
#               limited to the streams running on it, and its conversations go on elsewhere
#
# then prints, per replica and overall, the later-turn prefix-cache hit ratio and TTFT
# p50/p99 (docs/deploy.md explains the design). Exit status 1 if the outcome is not the
# expected one: sticky more than 2 points of hit ratio below one replica, round robin not
# clearly below sticky, or, in the kill phase, an error other than a stream that was running
# on the killed replica, or a conversation that could not finish.
#
#   bash scripts/fleet.sh
#   MODEL=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf CONVS=6 TURNS=3 MAX_TOKENS=8 \
#       KV_MEMORY=16MiB bash scripts/fleet.sh          # slow on a CPU: keep it small
#
# Knobs (environment): MODEL (default models/glassllm), REPLICAS (3), THREADS (compute
# threads per replica, 1), KV_MEMORY (device KV cache per replica, 4MiB), BLOCK_SIZE (8),
# CONVS (conversations, 36), TURNS (4), MAX_TOKENS (reply length, 6), SEED (1),
# BASE_PORT (replica i listens on BASE_PORT+i; default: a free run), LB_PORT and STATS_PORT
# (default: free ports),
# PHASES ("single sticky roundrobin kill"; add "bench" to drive the sticky fleet with
# `convoy-bench run --target openai` too), CONVOY_BIN (target/release/convoy), KEEP=1
# keeps the work directory (logs, JSON reports).
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${MODEL:-models/glassllm}
REPLICAS=${REPLICAS:-3}
THREADS=${THREADS:-1}
KV_MEMORY=${KV_MEMORY:-4MiB}
BLOCK_SIZE=${BLOCK_SIZE:-8}
CONVS=${CONVS:-36}
TURNS=${TURNS:-4}
MAX_TOKENS=${MAX_TOKENS:-6}
SEED=${SEED:-1}
# Free ports by default: a run of 100 consecutive free ports for the replicas from the
# kernel's ephemeral range, and two more for the balancer and its stats (any given port wins).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
free_run() {
    python3 - "$1" <<'PY'
import socket, sys, random
n = int(sys.argv[1])
for _ in range(200):
    base = random.randint(20000, 60000 - n)
    socks = []
    try:
        for p in range(base, base + n):
            s = socket.socket(); s.bind(("127.0.0.1", p)); socks.append(s)
    except OSError:
        continue
    finally:
        for s in socks: s.close()
    if len(socks) == n:
        print(base); break
PY
}
BASE_PORT=${BASE_PORT:-$(free_run 100)}
LB_PORT=${LB_PORT:-$(free_port)}
STATS_PORT=${STATS_PORT:-$(free_port)}
PHASES=${PHASES:-single sticky roundrobin kill}
BIN=${CONVOY_BIN:-target/release/convoy}

if ! command -v haproxy >/dev/null; then
    echo "error: haproxy is not installed. Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y haproxy" >&2
    echo "       (Fedora/RHEL: sudo dnf install haproxy; macOS: brew install haproxy). HAProxy >= 2.6 is needed." >&2
    exit 1
fi
if ! haproxy -cc 'version_atleast(2.6)' 2>/dev/null; then
    echo "error: $(haproxy -v | head -1): deploy/haproxy.cfg needs HAProxy 2.6 or newer" >&2
    exit 1
fi
for tool in curl python3; do
    command -v "$tool" >/dev/null || { echo "error: $tool is needed" >&2; exit 1; }
done
[[ -e "$MODEL" ]] || { echo "error: $MODEL is missing: run scripts/fetch_models.sh" >&2; exit 1; }
if [[ ! -x "$BIN" ]]; then
    echo "building $BIN ..." >&2
    source scripts/toolchain.sh
    cargo build --release --bin convoy
fi

work=$(mktemp -d -t convoy-fleet.XXXXXX)
# name -> pid of every child we started. They are disowned so that bash does not print
# "Killed" when the kill phase's victim dies; stop() polls for their exit instead of `wait`.
declare -A PID=()
# stop NAME SIGNAL: signal a child and wait (at most 60 s) until it is gone.
stop() {
    local pid=${PID[$1]} t=0
    kill "-$2" "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((t++ < 600)); do sleep 0.1; done
    unset "PID[$1]"
}
cleanup() {
    local rc=$? name
    trap - EXIT INT TERM
    for name in "${!PID[@]}"; do stop "$name" KILL; done
    if [[ "${KEEP:-0}" == 1 || $rc -ne 0 ]]; then
        echo "logs and reports kept in $work" >&2
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# glassllm has no chat template: give it a plain one (role: content lines).
template_args=()
if [[ -d "$MODEL" && ! -f "$MODEL/tokenizer_config.json" ]]; then
    printf '%s\n' '{% for m in messages %}{{ m.role }}: {{ m.content }}' \
        '{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}' >"$work/chat_template.jinja"
    template_args=(--chat-template "$work/chat_template.jinja")
fi

# wait_for WHAT SECONDS CMD...: retry CMD every 0.1 s.
wait_for() {
    local what=$1 limit=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null; do
        if ((SECONDS >= deadline)); then
            echo "error: timed out waiting for $what" >&2
            return 1
        fi
        sleep 0.1
    done
}

# start_replica I KV: convoy serve with HTTP on BASE_PORT+I.
start_replica() {
    local i=$1 kv=$2 port=$((BASE_PORT + $1))
    "$BIN" serve --model "$MODEL" "${template_args[@]}" \
        --socket "$work/r$i.sock" --http "127.0.0.1:$port" \
        --threads "$THREADS" --kv-cache-memory "$kv" --host-cache-memory 0 \
        --block-size "$BLOCK_SIZE" >>"$work/r$i.log" 2>&1 &
    PID[r$i]=$!
    disown "$!"
}

replica_up() {
    kill -0 "${PID[r$1]}" 2>/dev/null || { echo "error: replica r$1 exited; its log:" >&2; tail -20 "$work/r$1.log" >&2; exit 1; }
    curl -sf "http://127.0.0.1:$((BASE_PORT + $1))/health"
}

# The stats page's CSV: every server of backend `convoy` passed its last check.
servers_checked() {
    local n=$1
    kill -0 "${PID[haproxy]}" 2>/dev/null || { echo "error: haproxy exited; its log:" >&2; tail -20 "$work/haproxy-$phase.log" >&2; exit 1; }
    [[ $(curl -sf "http://127.0.0.1:$STATS_PORT/;csv" | awk -F, '$1=="convoy" && $2!="BACKEND" && $18=="UP" {n++} END {print n+0}') == "$n" ]]
}

# start_fleet PHASE N KV BALANCE
start_fleet() {
    local phase=$1 n=$2 kv=$3 balance=$4 i
    local -a env=(CONVOY_BALANCE="$balance" CONVOY_BIND="127.0.0.1:$LB_PORT"
        CONVOY_HAPROXY_STATS="127.0.0.1:$STATS_PORT" CONVOY_HAPROXY_SOCKET="$work/haproxy.sock")
    for ((i = 0; i < n; i++)); do
        start_replica "$i" "$kv"
        env+=(CONVOY_REPLICA_$i="127.0.0.1:$((BASE_PORT + i))")
    done
    for ((i = 0; i < n; i++)); do
        wait_for "replica r$i" 60 replica_up "$i"
    done
    env "${env[@]}" haproxy -c -q -f deploy/haproxy.cfg
    env "${env[@]}" haproxy -db -f deploy/haproxy.cfg >>"$work/haproxy-$phase.log" 2>&1 &
    PID[haproxy]=$!
    disown "$!"
    wait_for "HAProxy to see $n healthy replicas" 30 servers_checked "$n"
}

# SIGTERM: the replicas drain (nothing is running by now) and exit.
stop_fleet() {
    local name
    for name in "${!PID[@]}"; do stop "$name" TERM; done
}

# drive PHASE N [extra driver args]
drive() {
    local phase=$1 n=$2 i
    shift 2
    local -a reps=()
    for ((i = 0; i < n; i++)); do reps+=(--replica "r$i=http://127.0.0.1:$((BASE_PORT + i))"); done
    python3 scripts/fleet_driver.py run --url "http://127.0.0.1:$LB_PORT" --phase "$phase" \
        --out "$work/$phase.json" --conversations "$CONVS" --turns "$TURNS" \
        --max-tokens "$MAX_TOKENS" --seed "$SEED" --prefix "$phase" "${reps[@]}" "$@"
}

echo "fleet: $REPLICAS x $(basename "$MODEL"), KV ${KV_MEMORY}/replica (block $BLOCK_SIZE, no host tier), $THREADS thread(s) each; $CONVS conversations x $TURNS turns, $MAX_TOKENS-token replies; work dir $work" >&2
# The single replica holds the whole fleet's KV memory: the count times the replicas, in the
# same unit, which convoy parses (the bytesize crate's units: KB/MB/GB, KiB/MiB/GiB).
if [[ ! "$KV_MEMORY" =~ ^([0-9]+)[[:space:]]*([A-Za-z]*)$ ]]; then
    echo "fleet: KV_MEMORY must be a whole number with an optional unit (e.g. 4MiB), got $KV_MEMORY" >&2
    exit 2
fi
fleet_kv_memory="$((BASH_REMATCH[1] * REPLICAS))${BASH_REMATCH[2]}"
reports=()
for phase in $PHASES; do
    case $phase in
        single)
            # One replica holding the fleet's KV memory: what an ideal router could reach.
            start_fleet single 1 "$fleet_kv_memory" sticky
            drive single 1
            ;;
        sticky)
            start_fleet sticky "$REPLICAS" "$KV_MEMORY" sticky
            drive sticky "$REPLICAS"
            ;;
        roundrobin)
            start_fleet roundrobin "$REPLICAS" "$KV_MEMORY" roundrobin
            drive roundrobin "$REPLICAS"
            ;;
        kill)
            start_fleet kill "$REPLICAS" "$KV_MEMORY" sticky
            # r1 dies after 40% of the requests; the driver sends the SIGKILL itself so it
            # knows exactly which requests were in flight.
            drive kill "$REPLICAS" --kill-pid "${PID[r1]}" --kill-replica r1 \
                --kill-after "$((CONVS * TURNS * 2 / 5))"
            ;;
        bench)
            # The project's load generator through the same sticky fleet (the smoke chat
            # workload, closed loop), its own table printed; not part of the pass/fail checks.
            start_fleet bench "$REPLICAS" "$KV_MEMORY" sticky
            "${CONVOY_BENCH_BIN:-target/release/convoy-bench}" run --target openai \
                --url "http://127.0.0.1:$LB_PORT" --workload bench/workloads/smoke.toml \
                --conversations "$CONVS" --duration-s 120 --no-progress --report "$work/bench.json" >&2
            stop_fleet
            continue
            ;;
        *) echo "error: unknown phase $phase" >&2; exit 1 ;;
    esac
    stop_fleet
    reports+=("$work/$phase.json")
done

if ((${#reports[@]})); then
    echo
    python3 scripts/fleet_driver.py summarize "${reports[@]}"
fi

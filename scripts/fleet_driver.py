#!/usr/bin/env python3
"""Multi-turn chat load for a convoy fleet behind a load balancer (scripts/fleet.sh).

Standard library only. Two subcommands:

  run        play K conversations of T turns each against an OpenAI-compatible URL
             (through HAProxy), streaming, and write a JSON report: one record per request
             (conversation, turn, attempt, replica that answered, TTFT, prompt_tokens,
             cached_tokens, error) plus each replica's /metrics counter deltas over the run.
  summarize  print the comparison table of several reports.

Every conversation starts with the same persona system prompt (cached on every replica
after its first use) and then has its own user turns; each request carries
`X-Session-ID: <conversation id>` and `"user": <conversation id>`, so a sticky balancer
keeps a conversation on one replica. The replica that answered is read from the
`X-Convoy-Replica` header that deploy/haproxy.cfg adds.

`--kill-pid PID --kill-after N` sends SIGKILL to PID once N requests have finished: the
requests in flight at that moment on that replica may fail (their streams die with it);
any other failure is reported as unexpected. A failed turn is retried (as a client would),
so the conversation goes on, on another replica.

convoy-bench's `run --target openai` will replace `run` for serious load; this driver stays
small on purpose.
"""

import argparse
import http.client
import json
import os
import random
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PERSONA = "You are Nemo, captain of the Nautilus."
TOPICS = [
    "coral", "whales", "pearls", "squid", "storms", "maps", "engines", "divers",
    "ice", "reefs", "lamps", "ink", "salt", "tides", "wrecks", "eels",
]


def user_message(rng, conv, turn):
    """A short, conversation-specific question (glassllm's context is 128 tokens)."""
    return f"Q{turn} on {rng.choice(TOPICS)} {rng.randint(10, 99)}?"


class Driver:
    def __init__(self, args):
        self.args = args
        u = urllib.parse.urlsplit(args.url)
        self.host, self.port = u.hostname, u.port or 80
        self.path = u.path.rstrip("/") + "/v1/chat/completions"
        self.lock = threading.Lock()
        self.records = []
        self.finished = 0
        self.in_flight = {}  # request key -> record (for the kill bookkeeping)
        self.kill_time = None
        self.killed = False

    def request(self, conv_id, turn, attempt, messages):
        a = self.args
        body = {
            "messages": messages,
            "max_tokens": a.max_tokens,
            "temperature": 0,
            "ignore_eos": True,  # fixed reply lengths: comparable prompts across phases
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if not a.no_user:
            body["user"] = conv_id
        headers = {"content-type": "application/json"}
        if not a.no_header:
            headers["x-session-id"] = conv_id
        rec = {
            "conv": conv_id, "turn": turn, "attempt": attempt, "replica": None,
            "status": None, "ttft_ms": None, "total_ms": None, "prompt_tokens": None,
            "cached_tokens": None, "text": "", "error": None,
        }
        key = (conv_id, turn, attempt)
        t0 = time.monotonic()
        rec["start"] = t0
        with self.lock:
            self.in_flight[key] = rec
        conn = http.client.HTTPConnection(self.host, self.port, timeout=a.timeout)
        try:
            conn.request("POST", self.path, json.dumps(body), headers)
            resp = conn.getresponse()
            rec["status"] = resp.status
            rec["replica"] = resp.getheader("x-convoy-replica")
            if resp.status != 200:
                rec["error"] = f"HTTP {resp.status}: {resp.read()[:200].decode(errors='replace')}"
            else:
                done = False
                while True:
                    line = resp.readline()
                    if not line:
                        break
                    line = line.strip()
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:]
                    if data == b"[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        rec["error"] = f"stream error: {ev['error']}"
                        continue
                    for ch in ev.get("choices") or []:
                        piece = (ch.get("delta") or {}).get("content")
                        if piece:
                            if rec["ttft_ms"] is None:
                                rec["ttft_ms"] = (time.monotonic() - t0) * 1e3
                            rec["text"] += piece
                    if ev.get("usage"):
                        u = ev["usage"]
                        rec["prompt_tokens"] = u["prompt_tokens"]
                        rec["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get(
                            "cached_tokens", 0)
                if not done and rec["error"] is None:
                    rec["error"] = "stream ended without [DONE]"
        except Exception as e:  # noqa: BLE001 (any transport failure is a client error)
            rec["error"] = f"{type(e).__name__}: {e}"
        finally:
            conn.close()
        rec["end"] = time.monotonic()
        rec["total_ms"] = (rec["end"] - t0) * 1e3
        with self.lock:
            del self.in_flight[key]
            self.records.append(rec)
            self.finished += 1
            if a.kill_pid and not self.killed and self.finished >= a.kill_after:
                self.kill()
        return rec

    def kill(self):
        """SIGKILL the victim replica (called with the lock held) and note what was in flight."""
        self.killed = True
        self.kill_time = time.monotonic()
        try:
            os.kill(self.args.kill_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for rec in self.in_flight.values():
            rec["in_flight_at_kill"] = True

    def conversation(self, c):
        a = self.args
        conv_id = f"{a.prefix}-{c:03d}"
        rng = random.Random(f"{a.seed}:{conv_id}")
        messages = [{"role": "system", "content": a.persona}]
        for turn in range(1, a.turns + 1):
            messages.append({"role": "user", "content": user_message(rng, conv_id, turn)})
            for attempt in range(1, a.attempts + 1):
                rec = self.request(conv_id, turn, attempt, messages)
                if rec["error"] is None:
                    break
                time.sleep(0.2)
            else:
                return  # the conversation gives up; counted in the report
            messages.append({"role": "assistant", "content": rec["text"]})
            if a.think_ms:
                time.sleep(rng.uniform(0, 2 * a.think_ms) / 1e3)

    def run(self):
        a = self.args
        before = {name: scrape(url) for name, url in a.replica}
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=a.concurrency or a.conversations) as ex:
            list(ex.map(self.conversation, range(a.conversations)))
        wall = time.monotonic() - t0
        after = {name: scrape(url) for name, url in a.replica}
        server = {}
        for name, _ in a.replica:
            b, e = before[name], after[name]
            if b is None or e is None:
                server[name] = None  # not reachable (the killed replica)
                continue
            server[name] = {k: e.get(k, 0) - b.get(k, 0) for k in e}
        for r in self.records:
            r["start"] -= t0
            r["end"] -= t0
        return {
            "phase": a.phase,
            "url": a.url,
            "conversations": a.conversations,
            "turns": a.turns,
            "wall_s": wall,
            "kill_pid": a.kill_pid,
            "kill_replica": a.kill_replica,
            "kill_at_s": (self.kill_time - t0) if self.kill_time else None,
            "records": self.records,
            "server": server,
        }


def scrape(url):
    """Counters of one replica's /metrics: prefix-cache queries and hits (both tiers),
    finished requests, evicted KV blocks."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return None
    out = {"queries": 0.0, "hits": 0.0, "requests": 0.0, "evicted": 0.0}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        if name == "convoy:prefix_cache_queries_total":
            out["queries"] += value
        elif name == "convoy:prefix_cache_hits_total":
            out["hits"] += value
        elif name == "convoy:request_finished_total":
            out["requests"] += value
        elif name == "convoy:kv_cache_evicted_blocks_total":
            out["evicted"] += value
    return out


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(p / 100 * len(xs) + 0.5)) - 1))]


def later_turn_hit(recs):
    ok = [r for r in recs if r["error"] is None and r["turn"] >= 2 and r["prompt_tokens"]]
    p = sum(r["prompt_tokens"] for r in ok)
    return (sum(r["cached_tokens"] for r in ok) / p) if p else None


def fmt(v, spec):
    """Format v, or a dash of the same width when there is no value."""
    width = int(spec.split(".")[0].rstrip("df") or 0)
    return "-".rjust(width) if v is None else format(v, spec)


def summarize(paths):
    reports = [json.load(open(p)) for p in paths]
    hdr = (f"{'phase':<11} {'replica':<8} {'reqs':>5} {'hit t>=2':>9} {'srv hit':>8} "
           f"{'evicted':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'errors':>6}")
    print(hdr)
    print("-" * len(hdr))
    overall = {}
    for rep in reports:
        recs = rep["records"]
        names = sorted({r["replica"] for r in recs if r["replica"]} | set(rep["server"]))
        rows = [(n, [r for r in recs if r["replica"] == n]) for n in names]
        rows.append(("all", recs))
        for name, rs in rows:
            ttft = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
            if name == "all":
                srv = [s for s in rep["server"].values() if s]
            else:
                srv = [rep["server"][name]] if rep["server"].get(name) else []
            q, h = sum(s["queries"] for s in srv), sum(s["hits"] for s in srv)
            evicted = int(sum(s["evicted"] for s in srv)) if srv else None
            srv_hit = h / q if q else None
            errs = sum(1 for r in rs if r["error"])
            print(f"{rep['phase']:<11} {name:<8} {len(rs):>5} {fmt(later_turn_hit(rs), '9.3f')} "
                  f"{fmt(srv_hit, '8.3f')} {fmt(evicted, '7d')} {fmt(pct(ttft, 50), '7.1f')}ms "
                  f"{fmt(pct(ttft, 99), '7.1f')}ms {errs:>6}")
        overall[rep["phase"]] = later_turn_hit(recs)
        print()
    print("hit t>=2: cached / prompt tokens of turns 2.. (client usage, by the replica that answered);")
    print("srv hit: prefix_cache_hits / queries from each replica's /metrics over the phase (all turns);")
    print("evicted: KV blocks the replica dropped from its prefix cache for room (scarcity);")
    print("TTFT: client-measured through HAProxy, request sent to first content token.")
    ok = True
    # The expected outcome: sticky matches one replica (within 2 points), round robin is
    # clearly (over 2 points) below sticky.
    if overall.get("single") is not None and overall.get("sticky") is not None:
        d = 100 * (overall["sticky"] - overall["single"])
        good = d >= -2
        ok &= good
        print(f"sticky vs one replica (later turns): {overall['sticky']:.3f} vs "
              f"{overall['single']:.3f} ({d:+.1f} points): {'OK' if good else 'FAILED'}")
    if overall.get("sticky") is not None and overall.get("roundrobin") is not None:
        d = 100 * (overall["roundrobin"] - overall["sticky"])
        good = d < -2
        ok &= good
        print(f"round-robin vs sticky (later turns): {overall['roundrobin']:.3f} vs "
              f"{overall['sticky']:.3f} ({d:+.1f} points): {'OK' if good else 'FAILED'}")
    for rep in reports:
        if rep.get("kill_replica"):
            ok &= kill_report(rep)
    return 0 if ok else 1


def kill_report(rep):
    """Errors must be limited to the streams in flight on the killed replica; its
    conversations must go on elsewhere."""
    victim = rep["kill_replica"]
    recs = rep["records"]
    print(f"\nkill phase: SIGKILL of {victim} at {fmt(rep['kill_at_s'], '.2f')} s "
          f"after {sum(1 for r in recs if r['end'] <= (rep['kill_at_s'] or 0))} finished requests")
    errors = [r for r in recs if r["error"]]
    expected = [r for r in errors if r.get("in_flight_at_kill") and r["replica"] in (victim, None)]
    unexpected = [r for r in errors if r not in expected]
    in_flight = [r for r in recs if r.get("in_flight_at_kill")]
    print(f"  requests in flight at the kill: {len(in_flight)} "
          f"({sum(1 for r in in_flight if r['replica'] == victim)} on {victim})")
    print(f"  client errors: {len(errors)} ({len(expected)} streams running on {victim} "
          f"when it died, {len(unexpected)} other)")
    for r in unexpected[:10]:
        print(f"    unexpected: {r['conv']} turn {r['turn']} on {r['replica']}: {r['error']}")
    kill_at = rep["kill_at_s"] or 0
    moved = sorted({r["conv"] for r in recs if r["replica"] == victim})
    # Requests of its conversations sent before the kill that HAProxy re-sent elsewhere
    # (no response had started: retry-on conn-failure / empty-response).
    rerouted = [r for r in in_flight if r["conv"] in moved and r["error"] is None
                and r["replica"] != victim]
    after = [r for r in recs if r["conv"] in moved and r["start"] > kill_at]
    after_ok = [r for r in after if r["error"] is None]
    where = sorted({r["replica"] for r in after_ok})
    finished = {r["conv"] for r in recs
                if r["error"] is None and r["turn"] == rep["turns"]}
    lost = [c for c in moved if c not in finished]
    print(f"  {len(rerouted)} requests of its conversations in flight at the kill, not yet "
          f"answered, were re-sent by HAProxy to another replica and succeeded")
    print(f"  {len(moved)} conversations had turns on {victim}; after the kill they sent "
          f"{len(after)} requests (retries of failed turns included): {len(after_ok)} ok, "
          f"on {', '.join(where) or '-'}")
    if after_ok and later_turn_hit(after_ok) is not None:
        print(f"  hit ratio of those later turns: {later_turn_hit(after_ok):.3f} (the first turn "
              f"on the new replica recomputes the prefix, the next ones hit again)")
    print(f"  conversations that did not finish all turns: {len(lost)}")
    good = not unexpected and not lost and len(after_ok) == len(after)
    print("  kill phase: " + ("OK" if good else "FAILED"))
    return good


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--url", required=True, help="the balancer, e.g. http://127.0.0.1:8080")
    r.add_argument("--phase", required=True, help="a name for the report")
    r.add_argument("--out", required=True, help="JSON report path")
    r.add_argument("--conversations", type=int, default=24)
    r.add_argument("--turns", type=int, default=4)
    r.add_argument("--concurrency", type=int, default=0, help="default: all conversations")
    r.add_argument("--max-tokens", type=int, default=6)
    r.add_argument("--think-ms", type=float, default=0, help="mean pause between turns")
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--prefix", default="conv", help="conversation id prefix")
    r.add_argument("--persona", default=PERSONA)
    r.add_argument("--attempts", type=int, default=3, help="tries per turn")
    r.add_argument("--timeout", type=float, default=120)
    r.add_argument("--no-header", action="store_true", help="do not send X-Session-ID")
    r.add_argument("--no-user", action="store_true", help="do not send `user`")
    r.add_argument("--replica", action="append", default=[], type=lambda s: s.split("=", 1),
                   metavar="NAME=URL", help="a replica's own HTTP address, for /metrics")
    r.add_argument("--kill-pid", type=int, default=0)
    r.add_argument("--kill-replica", default=None, help="the killed replica's name")
    r.add_argument("--kill-after", type=int, default=0, help="finished requests before the kill")
    s = sub.add_parser("summarize")
    s.add_argument("reports", nargs="+")
    a = p.parse_args()
    if a.cmd == "summarize":
        return summarize(a.reports)
    rep = Driver(a).run()
    with open(a.out, "w") as f:
        json.dump(rep, f)
    errs = sum(1 for r in rep["records"] if r["error"])
    print(f"{a.phase}: {len(rep['records'])} requests in {rep['wall_s']:.1f} s, {errs} errors",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

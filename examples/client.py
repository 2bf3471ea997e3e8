#!/usr/bin/env python3
"""A streaming multi-turn chat with a running `convoy serve`, standard library only.

    python3 examples/client.py --socket ./convoy.sock "Hello!" "What can you do?"

Each argument is one user turn; the model's streamed reply is printed as it arrives and then
appended to the conversation, so every later turn is served mostly from convoy's prefix cache
(the `cached_tokens` figure printed after each turn).
"""
import argparse
import json
import os
import socket
import sys


def default_socket():
    run = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(run, "convoy.sock") if run else "convoy.sock"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--socket", default=default_socket())
    ap.add_argument("--system", default="You are a helpful assistant. Answer briefly.")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("turns", nargs="*", default=["Hello! Who are you?", "What is the capital of France?"])
    args = ap.parse_args()

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError as e:
        sys.exit(f"cannot connect to {args.socket}: {e.strerror} (is `convoy serve --socket {args.socket}` running?)")
    stream = sock.makefile("rwb")

    def send(obj):
        stream.write((json.dumps(obj) + "\n").encode("utf-8"))
        stream.flush()

    messages = [{"role": "system", "content": args.system}]
    for n, user in enumerate(args.turns):
        messages.append({"role": "user", "content": user})
        print(f"> {user}")
        send({"op": "generate", "id": f"turn-{n}", "messages": messages, "max_tokens": args.max_tokens, "stream": True})
        reply = []
        while True:
            line = stream.readline()
            if not line:
                sys.exit("the daemon closed the connection")
            event = json.loads(line)
            if event["event"] == "token":
                reply.append(event["text"])
                print(event["text"], end="", flush=True)
            elif event["event"] == "done":
                usage, timing = event["usage"], event["timing"]
                print(f"\n  [{event['finish_reason']}: {usage['completion_tokens']} tokens, "
                      f"{usage['cached_tokens'] + usage['host_cached_tokens']}/{usage['prompt_tokens']} prompt tokens "
                      f"from cache, first token after {timing['ttft_ms']:.0f} ms]")
                break
            elif event["event"] == "error":
                sys.exit(f"error {event['code']}: {event['message']}")
        messages.append({"role": "assistant", "content": "".join(reply)})
    send({"op": "stats"})
    stats = json.loads(stream.readline())["stats"]
    print(f"cache hit ratio so far: {stats['cache']['hit_ratio']:.2f}")


if __name__ == "__main__":
    main()

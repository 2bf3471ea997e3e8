"""The official `openai` package, unmodified, against convoy's HTTP face; and `/metrics`
through `prometheus_client`'s parsers.

Run by engine/server/tests/http_python.rs against a daemon it starts:
    python3 openai_client.py --base-url http://127.0.0.1:PORT --api-key KEY
Exits 0 when every check holds (an AssertionError otherwise).
"""

import argparse
import urllib.request

import openai
from openai import OpenAI
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families


def scrape(base, key, openmetrics=False):
    """Every sample of /metrics as {(name, labels without model_name): value}."""
    headers = {"Authorization": f"Bearer {key}"}
    if openmetrics:
        headers["Accept"] = "application/openmetrics-text; version=1.0.0"
    req = urllib.request.Request(base + "/metrics", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
        content_type = r.headers["Content-Type"]
    parse = openmetrics_families if openmetrics else text_string_to_metric_families
    samples, types = {}, {}
    for family in parse(text):
        types[family.name] = family.type
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[(s.name, labels)] = s.value
    return samples, types, content_type


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--api-key", required=True)
    args = ap.parse_args()
    base = args.base_url.rstrip("/")
    client = OpenAI(base_url=base + "/v1", api_key=args.api_key, max_retries=0, timeout=300)

    before, types, content_type = scrape(base, args.api_key)
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    assert types["convoy:generation_tokens"] == "counter", types
    assert types["convoy:time_to_first_token_seconds"] == "histogram", types
    assert types["convoy:num_requests_running"] == "gauge", types

    model = client.models.list().data[0].id

    # A three-turn chat, streamed; later turns find the conversation in the prefix cache.
    messages = [{"role": "system", "content": "You are a helpful pirate."}]
    completion_tokens = prompt_tokens = 0
    for turn, user in enumerate(
        ["Hello! Who are you?", "Where is your ship?", "What do you eat?"]
    ):
        messages.append({"role": "user", "content": user})
        stream = client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage, finish = "", None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    text += choice.delta.content
                if choice.finish_reason:
                    finish = choice.finish_reason
        assert finish in ("stop", "length"), finish
        assert usage is not None and usage.completion_tokens > 0, usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, usage
        cached = usage.prompt_tokens_details.cached_tokens
        print(f"turn {turn}: {usage.prompt_tokens} prompt tokens, {cached} cached: {text!r}")
        if turn == 0:
            assert cached == 0, usage
        else:
            assert cached > 0, usage
            assert cached * 10 >= usage.prompt_tokens * 6, usage
        completion_tokens += usage.completion_tokens
        prompt_tokens += usage.prompt_tokens
        messages.append({"role": "assistant", "content": text})

    # Not streamed, and the legacy completions endpoint.
    r = client.chat.completions.create(model=model, messages=messages[:2], max_tokens=4, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 4, r
    assert r.usage.prompt_tokens_details.cached_tokens > 0, r.usage
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert c.choices[0].text and c.usage.completion_tokens == 3, c
    completion_tokens += r.usage.completion_tokens + c.usage.completion_tokens

    # Errors surface as the client's typed exceptions.
    for kwargs, exc in [
        (dict(n=2), openai.BadRequestError),
        (dict(top_p=0), openai.BadRequestError),
        (dict(model="no-such-model"), openai.NotFoundError),
    ]:
        call = dict(model=model, messages=messages[:2], max_tokens=2) | kwargs
        try:
            client.chat.completions.create(**call)
        except exc as e:
            assert e.body and e.body.get("code"), e.body
        else:
            raise AssertionError(f"{kwargs} was accepted")
    try:
        OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    except openai.AuthenticationError:
        pass
    else:
        raise AssertionError("a wrong key was accepted")

    # The counters moved by what the requests did.
    after, _, _ = scrape(base, args.api_key)

    def moved(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert moved("convoy:generation_tokens_total") == completion_tokens, (moved("convoy:generation_tokens_total"), completion_tokens)
    assert moved("convoy:prompt_tokens_total") >= prompt_tokens
    assert moved("convoy:prefix_cache_queries_total") > 0
    assert moved("convoy:prefix_cache_hits_total", (("tier", "device"),)) > 0
    assert moved("convoy:time_to_first_token_seconds_count") == 5
    assert moved("convoy:e2e_request_latency_seconds_count") == 5
    assert moved("convoy:time_per_output_token_seconds_count") >= 4
    finished = sum(
        moved("convoy:request_finished_total", (("finished_reason", r),)) for r in ("stop", "length")
    )
    assert finished == 5, finished
    assert after[("convoy:num_requests_running", ())] == 0
    assert after[("convoy:cache_divergence_total", ())] == 0

    # The same exposition in OpenMetrics, for scrapers that ask for it.
    om, om_types, om_type = scrape(base, args.api_key, openmetrics=True)
    assert om_type.startswith("application/openmetrics-text"), om_type
    assert om_types["convoy:generation_tokens"] == "counter", om_types
    assert om[("convoy:generation_tokens_total", ())] == after[("convoy:generation_tokens_total", ())]
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()

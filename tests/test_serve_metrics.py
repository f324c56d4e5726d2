"""GET /metrics on the real server, read by Prometheus' own parser (prometheus_client): the counts match the
requests made and the usage they were answered with."""

from __future__ import annotations

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from serve_helpers import MODEL, running_server, tiny_model, tokenizer


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    out = httpx.get(url + "/metrics", timeout=30)
    assert out.status_code == 200 and out.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(out.text) for s in family.samples}


def test_metrics_count_the_requests_tokens_and_errors():
    with running_server(tiny_model(), tokenizer(), max_batch=3, api_key="k") as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
        done = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=5, temperature=0, n=2)
        again = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=3, temperature=0)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True, stream_options={"include_usage": True})
        chat_usage = [c.usage for c in stream if c.usage][0]
        bad_json = httpx.post(url + "/v1/completions", content=b"{oops", headers={"authorization": "Bearer k"})
        assert bad_json.status_code == 400
        assert httpx.get(url + "/v1/nowhere").status_code == 404
        assert httpx.get(url + "/v1/models").status_code == 401  # no key
        m = scrape(url)  # no key: open like /health, as vLLM's is
    usages = [done.usage, again.usage, chat_usage]
    assert m["codellama:prompt_tokens_total", ()] == sum(u.prompt_tokens for u in usages)
    assert m["codellama:generation_tokens_total", ()] == sum(u.completion_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert m["codellama:prefix_cache_hit_tokens_total", ()] == cached
    assert m["codellama:prefix_cache_hit_tokens_total", ()] > 0  # the second request reused the first's prompt
    assert m["codellama:requests_total", (("endpoint", "completions"), ("status", "ok"))] == 2
    assert m["codellama:requests_total", (("endpoint", "chat"), ("status", "ok"))] == 1
    assert m["codellama:request_success_total", (("finished_reason", "length"),)] == 4  # n=2, then 1 and 1
    assert [m["codellama:request_errors_total", (("status", s),)] for s in ("400", "401", "404")] == [1, 1, 1]
    assert m["codellama:e2e_request_latency_seconds_count", ()] == 3
    assert m["codellama:time_to_first_token_seconds_bucket", (("le", "+Inf"),)] == 3
    assert m["codellama:num_requests_running", ()] == 0 and m["codellama:cache_slots", ()] == 3

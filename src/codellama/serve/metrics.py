"""GET /metrics: the server's counters in Prometheus' text format (version 0.0.4), named as vLLM names its
(`codellama:` for `vllm:`), for a Prometheus scraper or any dashboard that reads one.

Everything is updated and read on the server's event loop, so no locks: a request's figures when its log
line is written (engine requests), an error's status when it is answered, the engine's gauges when scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter

# seconds; vLLM's buckets for time to first token and for the whole request, cut to a code model's range
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class Histogram:
    """Counts of observations at or below each bound (cumulative when rendered), their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def samples(self) -> list[tuple[str, float]]:
        """(what follows the family's name, value) of each sample: the cumulative buckets, sum, count."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            out.append((f'_bucket{{le="{le}"}}', total))
        return out + [("_sum", self.sum), ("_count", self.count)]


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()  # (endpoint, status) -> requests that ran
        self.errors: Counter[int] = Counter()  # HTTP status -> requests answered with it (4xx, 5xx)
        self.finished: Counter[str] = Counter()  # finish reason -> choices
        self.prompt_tokens = self.cached_tokens = self.generation_tokens = 0
        self.ttft, self.latency = Histogram(TTFT_BUCKETS), Histogram(LATENCY_BUCKETS)

    def request(self, endpoint: str, status: str, prompt_tokens: int, cached_tokens: int, generated: int,
                latency: float, ttft: float | None, finish_reasons: list[str]) -> None:
        """One request that reached the engine, when it ended (status: ok, error or disconnected)."""
        self.requests[endpoint, status] += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.generation_tokens += generated
        self.finished.update(finish_reasons)
        self.latency.observe(latency)
        if ttft is not None:
            self.ttft.observe(ttft)

    def error(self, status: int) -> None:
        self.errors[status] += 1

    def render(self, engine: dict) -> str:
        """The text a scrape gets; `engine`: Engine.stats() (active, waiting, slots)."""
        lines: list[str] = []

        def family(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            """samples: (labels or suffix, value), "" for a family of one value."""
            lines.extend([f"# HELP codellama:{name} {help}", f"# TYPE codellama:{name} {kind}"])
            lines.extend(f"codellama:{name}{tail} {value!r}" for tail, value in samples)

        def labelled(label: str, counts: Counter) -> list[tuple[str, float]]:
            return [(f'{{{label}="{k}"}}', n) for k, n in sorted(counts.items())]

        family("num_requests_running", "gauge", "Generations being decoded.", [("", engine["active"])])
        family("num_requests_waiting", "gauge", "Generations waiting for a cache slot.", [("", engine["waiting"])])
        family("cache_slots", "gauge", "Sequences the KV cache holds at once (--max-batch).", [("", engine["slots"])])
        family("requests_total", "counter", "Requests that reached the engine, by endpoint and how they ended.",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
        family("request_errors_total", "counter", "Requests answered with an error, by HTTP status.",
               labelled("status", self.errors))
        family("request_success_total", "counter", "Finished generations (choices), by finish reason.",
               labelled("finished_reason", self.finished))
        family("prompt_tokens_total", "counter", "Prompt tokens of the requests.", [("", self.prompt_tokens)])
        family("prefix_cache_hit_tokens_total", "counter", "Prompt tokens a cache slot held (not prefilled again).",
               [("", self.cached_tokens)])
        family("generation_tokens_total", "counter", "Generated tokens.", [("", self.generation_tokens)])
        family("time_to_first_token_seconds", "histogram", "Time from a request's arrival to its first token.",
               self.ttft.samples())
        family("e2e_request_latency_seconds", "histogram", "Time from a request's arrival to its answer's end.",
               self.latency.samples())
        return "\n".join(lines) + "\n"

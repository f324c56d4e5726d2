"""32 concurrent streaming clients against one server: each gets the text it gets alone (greedy), clients
that disconnect halfway free their slots, and the server keeps answering."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx

from codellama.serve.app import _Mailbox
from serve_helpers import MODEL, running_server, tiny_model, tokenizer

PROMPTS = [f"def task_{i}(x):\n    return x {'+-*/%'[i % 5]} {i}" for i in range(32)]


def stream_text(url: str, prompt: str, max_tokens: int, stop_after: int | None = None) -> tuple[str, str | None]:
    """Stream a greedy completion; with stop_after, hang up after that many chunks. -> (text, finish_reason)"""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, finish, n = "", None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice["text"]
            finish = choice["finish_reason"] or finish
            n += 1
            if stop_after is not None and n >= stop_after:
                return text, None  # leaving the block closes the connection mid-stream
    return text, finish


def test_32_concurrent_streams_match_alone_with_disconnects():
    tok = tokenizer()
    with running_server(tiny_model(), tok, max_batch=16, max_concurrent=64) as (url, engine):
        alone = [stream_text(url, p, 24) for p in PROMPTS]
        assert all(finish in ("stop", "length") for _, finish in alone)

        results: dict[int, tuple[str, str | None]] = {}
        errors: list[BaseException] = []
        leavers = set(range(0, 32, 4))  # 8 clients hang up after 3 chunks

        def client(i: int) -> None:
            try:
                results[i] = stream_text(url, PROMPTS[i], 24 if i not in leavers else 400, 3 if i in leavers else None)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        for i in range(32):
            if i not in leavers:
                assert results[i] == alone[i], i
        # the leavers' requests were cancelled: every slot comes free and nothing stays queued
        deadline = time.monotonic() + 30
        while (engine.stats()["active"] or engine.stats()["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["active"] == 0 and engine.stats()["waiting"] == 0
        assert sorted(engine.scheduler.free_slots) == list(range(16))
        assert engine.stats()["finished"].get("cancelled", 0) == len(leavers)
        # and the server still answers, with the same text as before
        assert stream_text(url, PROMPTS[5], 24) == alone[5]
        assert httpx.get(url + "/health").json()["status"] == "ok"


def test_mailbox_hands_every_event_over_in_order():
    """The engine's thread posts each step's events at once; the event loop gets every one, in order, into
    its request's queue (one wake-up of the loop may carry many)."""
    async def receive() -> list[list[int]]:
        box = _Mailbox(asyncio.get_running_loop())
        queues: list[asyncio.Queue] = [asyncio.Queue(), asyncio.Queue()]
        engine = threading.Thread(target=lambda: [box.post(queues[i % 2], i) for i in range(4000)])
        engine.start()
        got = [[await asyncio.wait_for(q.get(), 30) for _ in range(2000)] for q in queues]
        engine.join()
        assert all(q.empty() for q in queues)
        return got

    assert asyncio.run(receive()) == [list(range(0, 4000, 2)), list(range(1, 4000, 2))]

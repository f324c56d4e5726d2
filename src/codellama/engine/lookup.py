"""Prompt lookup: draft tokens for speculative decoding, copied from the sequence itself (prompt lookup
decoding, as transformers' `prompt_lookup_num_tokens` and llama.cpp's lookup decoding do).

Code models repeat their context: an edit rewrites the function it was given, a completion repeats names,
calls and whole lines. When the sequence's last few tokens occurred earlier, the tokens that followed them
there are a guess at what follows now. One step over the guess checks all of it (engine/batching.py):
each guessed token is kept while it equals the model's greedy choice, so the output is that of one token
per step, in fewer steps.
"""

from __future__ import annotations

from collections.abc import Sequence

# The n-grams looked up, longest first: a 1-token match is right too rarely to pay for the rows it adds.
MAX_NGRAM, MIN_NGRAM = 3, 2


def draft(tokens: Sequence[int], k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens, for the
    longest n from MAX_NGRAM down to MIN_NGRAM that occurred; [] when none did."""
    tokens = list(tokens)
    size = len(tokens)
    for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
        tail = tokens[-n:]
        for start in range(size - n - 1, -1, -1):  # latest first; at least one token follows the match
            if tokens[start] == tail[0] and tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []

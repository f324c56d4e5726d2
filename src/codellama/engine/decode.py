"""Prefill and decode steps over the model's static slot cache.

Prefill writes prompts into their slots in chunks (memory stays bounded for 16k-100k token prompts).
Decode runs one token for every active slot at once.

Three ways to run a step, picked when a Decoder is made (the fused step is rebuilt at the next prefill
if the model was quantised or converted since):
- CPU, float32 model with fused projections: FusedCPUDecode (engine/cpu_decode.py), each layer one C++
  call. Rows are (slot, position) pairs, so a decode step runs exactly the active slots and one prefill
  call can take several short prompts (FUSED_PREFILL_ROWS tokens per call); a longer prompt is prefilled
  by the eager model, whose attention suits long sequences.
- CUDA: the decode step compiled with CUDA graphs (gpt-fast's recipe): always all max_batch rows and the
  whole static cache, so shapes never change and the step compiles once.
- Otherwise the eager model. A step covers slots 0..n-1 as a contiguous prefix of the cache (a view, no
  gather); a free slot inside that range carries a dummy token whose cache write is harmless (the next
  prompt prefilled there overwrites it, and attention never reads past a row's own position).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from codellama.engine.cpu_decode import FusedCPUDecode
from codellama.model import Transformer

# The longest prompt prefilled by the fused step (its per-row attention loop is quadratic in the prompt),
# and the most tokens per fused call (enough rows for the matmuls to run as efficient GEMMs).
FUSED_PREFILL_MAX_PROMPT = 256
FUSED_PREFILL_ROWS = 1024


class Decoder:
    def __init__(
        self,
        model: Transformer,
        max_batch: int,
        max_seq_len: int,
        prefill_chunk: int = 2048,
        compile: bool | None = None,
    ):
        self.model = model.eval()
        self.device = model.tok_embeddings.weight.device
        self.prefill_chunk = prefill_chunk
        self.compiled = self.device.type == "cuda" if compile is None else compile
        self._step = None
        self._fused = None if self.compiled else FusedCPUDecode.for_model(model)
        self.ensure(max_batch, max_seq_len)

    def ensure(self, max_batch: int, max_seq_len: int) -> None:
        """Make sure the cache holds max_batch slots of max_seq_len positions (grows it if not)."""
        self.model.setup_cache(max_batch, max_seq_len)  # keeps a larger cache: we use its first rows
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Write each prompt's keys/values into its slot; return the logits after each prompt's last token,
        [len(prompts), V] float32."""
        if self._fused is not None and not self._fused.current():  # the model was quantised or converted
            self._fused = FusedCPUDecode.for_model(self.model)
        if self._fused is None:
            return torch.stack([self._prefill_one(p, s) for p, s in zip(prompts, slots)])
        # Short prompts go through the fused step, several per call; long ones through the model's SDPA
        # (the fused step's attention loops per row, which a long prompt makes quadratic).
        out: list[torch.Tensor | None] = [None] * len(prompts)
        short = [i for i, p in enumerate(prompts) if len(p) <= FUSED_PREFILL_MAX_PROMPT]
        if short:
            logits = self._fused_prefill([prompts[i] for i in short], [slots[i] for i in short])
            for i, row in zip(short, logits):
                out[i] = row
        for i, (p, s) in enumerate(zip(prompts, slots)):
            if out[i] is None:
                out[i] = self._prefill_one(p, s)
        return torch.stack(out)

    def _prefill_one(self, prompt: Sequence[int], slot: int) -> torch.Tensor:
        tokens = torch.tensor([list(prompt)], device=self.device)  # [1, n]
        slots = torch.tensor([slot], device=self.device)
        logits = None
        for start in range(0, tokens.shape[1], self.prefill_chunk):
            piece = tokens[:, start : start + self.prefill_chunk]  # [1, t]
            pos = torch.arange(start, start + piece.shape[1], device=self.device)[None]
            logits = self.model(piece, input_pos=pos, slots=slots, last_only=True)
        return logits[0, -1]

    def _fused_prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        tokens, row_slots, positions, last = [], [], [], []  # one row per prompt token
        for prompt, slot in zip(prompts, slots):
            tokens += prompt
            row_slots += [slot] * len(prompt)
            positions += range(len(prompt))
            last.append(len(tokens) - 1)
        tokens_t, slots_t, pos_t = (torch.tensor(v, device=self.device) for v in (tokens, row_slots, positions))
        last_t = torch.tensor(last, device=self.device)
        chunk = min(self.prefill_chunk, FUSED_PREFILL_ROWS)
        out = []
        for start in range(0, len(tokens), chunk):  # a later chunk attends to what earlier ones cached
            end = start + chunk
            want = last_t[(last_t >= start) & (last_t < end)] - start
            out.append(self._fused(tokens_t[start:end], slots_t[start:end], pos_t[start:end], want))
        return torch.cat(out)

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], tokens: Sequence[int] | torch.Tensor, positions: Sequence[int]
    ) -> torch.Tensor:
        """One step for the rows in `slots` (ascending), each feeding `tokens[i]` at `positions[i]`.

        tokens may be a tensor on the model's device (the previous step's samples, never read by the host).
        Returns logits [len(slots), V] float32 in the same order.
        """
        tokens_t = torch.as_tensor(tokens, device=self.device)  # [b]
        if self._fused is not None:
            return self._fused(tokens_t, *(torch.tensor(list(v), device=self.device) for v in (slots, positions)))
        n = self.max_batch if self.compiled else slots[-1] + 1
        if len(slots) == n:  # slots are exactly 0..n-1
            tok_t = tokens_t[:, None]  # [n, 1]
        else:  # rows outside `slots` carry a dummy token 0 at position 0
            tok_t = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            tok_t[torch.tensor(list(slots), device=self.device), 0] = tokens_t
        pos = [0] * n
        for s, p in zip(slots, positions):
            pos[s] = p
        pos_t = torch.tensor(pos, device=self.device)[:, None]
        logits = self._compiled_step(tok_t, pos_t) if self.compiled else self._eager_step(tok_t, pos_t)  # [n, V]
        if len(slots) == n:  # slots are exactly 0..n-1
            return logits
        return logits[torch.tensor(list(slots), device=self.device)]

    def _eager_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, input_pos=pos)[:, -1]

    def _compiled_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self._step is None:
            self._step = torch.compile(self._eager_step, mode="reduce-overhead", fullgraph=True)
        # clone: CUDA-graph outputs are overwritten by the next replay
        return self._step(tokens, pos).clone()

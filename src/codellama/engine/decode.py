"""Prefill and decode steps over the model's static slot cache.

Prefill writes prompts into their slots in chunks (memory stays bounded for 16k-100k token prompts).
Decode runs one token for every active slot at once.

Three ways to run a step, picked when a Decoder is made (the fused step is rebuilt at the next prefill
if the model was quantised or converted since):
- CPU, float32 model with fused projections: FusedCPUDecode (engine/cpu_decode.py), each layer one C++
  call. Rows are (slot, position) pairs, so a decode step runs exactly the active slots and one prefill
  call can take several short prompts (FUSED_PREFILL_ROWS tokens per call); a longer prompt is prefilled
  by the eager model, whose attention suits long sequences.
- CUDA: the decode step compiled with CUDA graphs (gpt-fast's recipe), over buckets of rows and of cache
  positions: the first 2^i slots and the first 2^j positions (at least MIN_KV_BUCKET) covering every
  active row. Attention reads what the bucket covers, not the whole static cache (a server's cache of 16
  slots x 4096 positions holds 34 GB for the 7B, 2.5x its weights). Sizes are symbolic in the compiled
  code, so the step compiles twice (one row, several rows) and a CUDA graph is recorded per bucket pair.
  Prefill chunks are compiled too (without CUDA graphs: their lengths vary), one graph for every length
  of two tokens or more: the eager model launches ~50 operators per layer from Python, likely most of
  the 27-33 ms that a generate call spent beyond its decode steps on the H200 (several steps' worth).
- Otherwise the eager model, over exactly the slots and positions in use.
Both cover slots 0..n-1 as a contiguous prefix of the cache (a view, no gather); a free slot inside that
range carries a dummy token written at the cache's last position, which no record of what a slot holds
covers (see hold) and no row reads before a request fills the whole cache.

Prefix reuse: a slot keeps the keys and values of what it last held after its request ends (`held`: the
prompt and the tokens fed after it), so a prompt that starts with the same tokens (an editor resending a
file with one more line, a chat resending its history, few-shot prompts) is prefilled from where they
differ. A prompt may also copy its start from another slot, and prompts of one prefill call that start
alike (n samples of one prompt, few-shot prompts) compute that start once (_plan). The reused positions
were computed in other calls, possibly as rows of larger matmuls, so the logits can differ from a fresh
prefill's by float rounding (as llama.cpp's and vLLM's prefix caches do).
The record lives with the cache (KVCache.held), so every Decoder of a model keeps it true, and
Transformer.setup_cache, which others call before writing the cache themselves, forgets it; so does a
change to the weights (an optimizer step between two calls of a Generator, a load_state_dict, quantize()),
checked before each prefill and admission.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from codellama.engine.cpu_decode import FusedCPUDecode
from codellama.engine.graphs import StepGraphs
from codellama.engine.host import staging, to_device
from codellama.engine.kernels import onednn_matmuls, torch_on_one_thread
from codellama.engine.quant import QuantLinear
from codellama.engine.rows import TokenLogprob, token_logprobs
from codellama.errors import UserError
from codellama.model import KVCache, Transformer, TransformerBlock, kv_read_len, round_up

log = logging.getLogger(__name__)

# The fewest tokens worth taking from another slot than a prompt's own (a copy per layer; on a GPU the
# scheduler's slot choice too: the rows of a step span slots 0..n-1, so a high slot costs every step)
MIN_REUSED_TOKENS = 16

# The longest prompt prefilled by the fused step (its per-row attention loop is quadratic in the prompt:
# past this the eager model's GEMMs and SDPA are faster, BENCHMARKS.md, prefill), with float32 activations
# and, longer, with int8 ones (against the eager model's tiles and SDPA, tok/s to the first token: SmolLM2
# 2048 tokens 940 against 635, 4096 630 against 510, 8000 390 against 370; two layers of the 7B shape, int4,
# 2048 tokens 466 against 306, 4096 283 against 284, and with 8 kv heads 4096 583 against 327); and the most
# tokens per fused call (several short prompts: enough rows for the matmuls to run as GEMMs).
FUSED_PREFILL_MAX_PROMPT = 128
FUSED_PREFILL_MAX_PROMPT_INT8 = 4096
FUSED_PREFILL_ROWS = 1024
# The fewest cache positions a compiled step attends over: fewer CUDA graphs, while a bucket's unused
# positions cost little next to the weights. The compiled code sees a bucket as KV_UNIT x a symbolic count,
# so it knows every size and stride of the cache slice and of the attention bias is a multiple of 8, the
# alignment SDPA's kernels need (else it pads a copy of the bias in every layer); the cache holds a
# multiple of MIN_KV_BUCKET positions.
KV_UNIT = 128
MIN_KV_BUCKET = 2 * KV_UNIT
# A compiled prefill chunk reads its cache positions in units of 8 (SDPA's alignment, as above), at least
# two: a size of 1 is one the compiled graph would specialise on (a second compile in mid-serving).
PREFILL_KV_UNIT = 8


class Decoder:
    def __init__(
        self,
        model: Transformer,
        max_batch: int,
        max_seq_len: int,
        prefill_chunk: int = 2048,
        compile: bool | dict | None = None,
        attention: str = "sdpa",
        graphs: str = "trees",
        reuse_prefixes: bool = True,
        kv_dtype: torch.dtype | None = None,
        compile_scope: str = "step",
    ):
        """compile: compile prefill and decode (default: on CUDA); a dict compiles them with these inductor
        options too, e.g. {"coordinate_descent_tuning": True} (bench/bench_decode.py compares settings).
        Candidates for the GPU's compiled step, timed beside the defaults by bench/bench_decode.py:
        attention: the decode step's attention over the cache, "sdpa" or "flex" (FlexAttention, see
        Transformer.forward); graphs: its CUDA graphs, "trees" (torch.compile's) or "manual" (engine/graphs.py;
        the model must not be converted once decoding began). reuse_prefixes: prefill a prompt from where it
        differs from what its slot holds (module docstring); off, every prompt is prefilled whole.
        kv_dtype: how the KV cache stores keys and values; default: the fused CPU step's choice
        (FusedCPUDecode.kv_dtype: float16 for quantised weights), else the activations' dtype; torch.int8 (CPU):
        model.KVCache, half the memory of float16.
        compile_scope: what torch.compile compiles, "step" (the whole decode step and prefill chunk: inductor
        fuses across layers) or "blocks" (one transformer block, whose compiled code every layer runs: on the
        CPU the SmolLM2 step compiled in a fifth of the time; on CUDA only with graphs="manual", which records
        the whole step, and attention="sdpa")."""
        if compile_scope not in ("step", "blocks"):
            raise ValueError(f"compile_scope must be 'step' or 'blocks', got {compile_scope!r}")
        if compile_scope == "blocks" and (attention != "sdpa" or (model.device.type == "cuda" and graphs != "manual")):
            raise ValueError("compile_scope='blocks' runs the step between the blocks eagerly: it needs "
                             "attention='sdpa' (FlexAttention's mask is made there) and, on CUDA, graphs='manual' "
                             "(to launch it as one graph)")
        if attention not in ("sdpa", "flex"):
            raise ValueError(f"attention must be 'sdpa' or 'flex', got {attention!r}")
        if graphs not in ("trees", "manual"):
            raise ValueError(f"graphs must be 'trees' or 'manual', got {graphs!r}")
        if not isinstance(prefill_chunk, int) or prefill_chunk < 1:  # 0 and -1 failed every prefill
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
        if kv_dtype not in (None, torch.float16, torch.float32, torch.int8, model.dtype):  # the fused step reads these
            raise ValueError(f"kv_dtype must be torch.float16, torch.float32, torch.int8 or the model's {model.dtype}, "
                             f"got {kv_dtype!r}")
        if kv_dtype == torch.int8 and model.device.type != "cpu":  # (head_dim: model.KVCache checks it)
            raise UserError(f"an int8 KV cache is for the CPU (its fused step reads it); on {model.device.type} "
                            "keep the default")
        self.model = model.eval()
        self.attention, self.graphs = attention, graphs
        self.device = model.device
        if graphs == "manual" and self.device.type != "cuda":
            raise ValueError("graphs='manual' records CUDA graphs: it needs a model on a CUDA device")
        if self.device.type == "cuda":
            staging(self.device)  # now, not first while a step runs (decode steps copy their positions through it)
        self.prefill_chunk = prefill_chunk
        self.compiled = self.device.type == "cuda" if compile is None else compile is not False
        self.compile_options = compile if isinstance(compile, dict) else {}
        self.compile_scope = compile_scope
        self._step = None  # the compiled decode step
        self._prefill = None  # the compiled prefill chunk
        self._block: Callable | None = None  # TransformerBlock.forward compiled (compile_scope "blocks")
        # the fused CPU step has its own attention: a Decoder asked for flex runs the model
        self._fused = None if self.compiled or attention != "sdpa" else FusedCPUDecode.for_model(model)
        self.reuse_prefixes = reuse_prefixes
        self.kv_dtype = kv_dtype
        self.ensure(max_batch, max_seq_len)

    def ensure(self, max_batch: int, max_seq_len: int, limit: int | None = None) -> None:
        """Make sure the cache holds max_batch slots of max_seq_len positions (else a new one of this size,
        keeping what the old one's slots held: a Generator's next call, a chat's longer turn, needs a longer
        cache). A compiled decoder only grows it, its positions to at least twice as many, at most `limit`: the
        compiled steps are specialised on the cache's size, so each size compiles them anew (a minute on a GPU,
        and past torch._dynamo.config.recompile_limit they run eagerly); doubling keeps the sizes few."""
        cache_len = round_up(max_seq_len, MIN_KV_BUCKET) if self.compiled else max_seq_len
        kv_dtype = self.kv_dtype or (self._fused.kv_dtype if self._fused is not None else None)  # None: activations'
        if not self.model.cache_fits(max_batch, cache_len, kv_dtype):  # else we use the first rows of the larger one
            cache_rows = max_batch
            if self.compiled and self.model.cache_shape is not None:
                rows, positions = self.model.cache_shape
                cache_rows = max(rows, max_batch)
                if positions < cache_len:
                    cap = round_up(max(limit or 0, max_seq_len), MIN_KV_BUCKET)
                    cache_len = max(cache_len, min(2 * positions, cap))
                else:
                    cache_len = positions
            if self._fused is not None:
                self._fused.release_caches()
            self.model.resize_cache(cache_rows, cache_len, kv_dtype)  # (our CUDA graphs see its new cache_version)
        self.max_batch, self.max_seq_len = max_batch, max_seq_len

    @property
    def held(self) -> dict[int, list[int]]:
        """slot -> the tokens whose keys/values the slot holds at positions 0..n-1 (see the module docstring)."""
        return self.model.layers[0].attention.cache.held

    @property
    def steps_exact_slots(self) -> bool:
        """Whether a decode step runs exactly the active slots (the fused CPU step), leaving free slots' caches
        as they are; the other steps run slots 0..n-1, a dummy token in each free one."""
        return self._fused is not None

    def forget_if_weights_changed(self) -> None:
        """Forget what the slots hold if the weights changed since it was computed."""
        if not self.reuse_prefixes:  # nothing is reused here (another Decoder of the model checks for itself)
            return
        cache, stamp = self.model.layers[0].attention.cache, weights_stamp(self.model)
        if cache.held_with != stamp:
            cache.held.clear()
            cache.held_with = stamp

    # ---- what the slots hold ----
    def reusable(self, prompt: Sequence[int], slot: int) -> int:
        """How many of the prompt's first tokens the slot holds already: where its prefill would start (never
        its last token, whose logits the prefill returns)."""
        if not self.reuse_prefixes or slot not in self.held:
            return 0
        return common_prefix_len(self.held[slot], prompt, limit=len(prompt) - 1)

    def reused(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> list[int]:
        """Per prompt, how many of its tokens prefill(prompts, slots) will not compute."""
        return [n for n, _, _ in self._plan(prompts, slots)]

    def _plan(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> list[tuple[int, int | None, int | None]]:
        """Per prompt: (how many of its first tokens it need not compute, the slot holding them already if not
        its own, the index of the prompt of this call they are copied from once it is computed).

        Its own slot's start is taken unless another slot holds MIN_REUSED_TOKENS more: one this call does
        not overwrite (a busy one too: decoding writes only past its prompt), or an earlier prompt of the call
        that copies from none (n samples of one prompt; few-shot prompts sharing their examples). A repeat of
        such a prompt is copied whole, its logits too."""
        if not self.reuse_prefixes:
            return [(0, None, None)] * len(prompts)
        plan: list[tuple[int, int | None, int | None]] = []
        for i, (p, slot) in enumerate(zip(prompts, slots)):
            best = (self.reusable(p, slot), None, None)
            candidates = [(common_prefix_len(held, p, limit=len(p) - 1), s, None) for s, held in self.held.items()
                          if s not in slots]
            for j in range(i):
                if plan[j][2] is None:  # computed first, so it can be copied from
                    n = len(p) if prompts[j] == p else common_prefix_len(prompts[j], p, limit=len(p) - 1)
                    candidates.append((n, None, j))
            other = max(candidates, key=lambda c: c[0], default=best)
            plan.append(other if other[0] >= best[0] + MIN_REUSED_TOKENS else best)
        return plan

    def hold(self, slot: int, tokens: Sequence[int]) -> None:
        """Record that the slot's cache holds `tokens` at positions 0..len-1 (a finished request's prompt and
        the tokens decoded after it that were fed back), all but the cache's last position: the steps write
        their dummy rows there. The records stay in the order they were made."""
        self.held.pop(slot, None)
        self.held[slot] = list(tokens[: self.model.cache_shape[1] - 1])

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        """Write each prompt's keys/values into its slot, from where it differs from what the slot holds
        (reusable()); return the logits after each prompt's last token, [len(prompts), V] float32."""
        if self._fused is not None and not self._fused.current():  # the model was quantised or converted
            self._fused = FusedCPUDecode.for_model(self.model)
            self.ensure(self.max_batch, self.max_seq_len)  # its cache, as the new step keeps it
        self.forget_if_weights_changed()
        plan = self._plan(prompts, slots)
        for s in slots:  # overwritten from here on: held again once the prefill succeeded
            self.held.pop(s, None)
        out: list[torch.Tensor | None] = [None] * len(prompts)
        first = [i for i, (_, _, after) in enumerate(plan) if after is None]
        for i in first:
            n, source, _ = plan[i]
            if source is not None:
                self._copy_positions(source, slots[i], n)
        self._prefill_rests(prompts, slots, plan, first, out)
        then = [i for i, (_, _, after) in enumerate(plan) if after is not None]
        for i in then:
            n, _, after = plan[i]
            self._copy_positions(slots[after], slots[i], n)
            if n == len(prompts[i]):  # a repeat
                out[i] = out[after]
        self._prefill_rests(prompts, slots, plan, [i for i in then if out[i] is None], out)
        for p, s in zip(prompts, slots):
            self.hold(s, p)
        with torch_on_one_thread(self.device):  # a parallel copy of the logits would slow the next step
            return torch.stack(out)

    def _prefill_rests(self, prompts: Sequence[Sequence[int]], slots: Sequence[int],
                       plan: list[tuple[int, int | None, int | None]], todo: list[int], out: list) -> None:
        """Prefill prompts[i] for i in todo from their planned starts; out[i] = the logits after each."""
        if self._fused is not None:
            # Short rests of prompts go through the fused step, several per call; long ones through the model's
            # SDPA (the fused step's attention loops per row, which many rows make quadratic).
            limit = FUSED_PREFILL_MAX_PROMPT_INT8 if self._fused.int8_activations() else FUSED_PREFILL_MAX_PROMPT
            short = [i for i in todo if len(prompts[i]) - plan[i][0] <= limit]
            if short:
                rows = self._fused_prefill(*zip(*((prompts[i], slots[i], plan[i][0]) for i in short)))
                for i, row in zip(short, rows):
                    out[i] = row
        for i in todo:
            if out[i] is None:
                out[i] = self._prefill_one(prompts[i], slots[i], plan[i][0])

    def _copy_positions(self, source: int, slot: int, n: int) -> None:
        """Copy the keys and values of positions 0..n-1 of slot `source` into `slot`, in every layer."""
        with torch_on_one_thread(self.device):
            for layer in self.model.layers:
                cache = layer.attention.cache
                for t in cache.views():  # [max_batch, Hkv, S, ...] views of the cache's buffers
                    t[slot, :, :n] = t[source, :, :n]

    def _prefill_one(self, prompt: Sequence[int], slot: int, start: int = 0) -> torch.Tensor:
        for _, logits in self._prefill_chunks(prompt, slot, last_only=True, start=start):
            pass
        return logits[-1]

    @torch.inference_mode()
    def score_prompt(self, prompt: Sequence[int], slot: int, top: int) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
        """Prefill one prompt into its slot, scoring it on the way: (the logits after it [V], one entry per
        prompt token: None for the first, then its logprob given the tokens before it and the `top`
        likeliest alternatives). What OpenAI's echo + logprobs returns (lm-evaluation-harness's loglikelihood)."""
        scored: list[TokenLogprob | None] = [None]
        self.held.pop(slot, None)
        for start, logits in self._prefill_chunks(prompt, slot, last_only=False):
            following = list(prompt[start + 1 : start + 1 + logits.shape[0]])  # what each position predicts
            scored += token_logprobs(logits[: len(following)], following, [top] * len(following))
        self.hold(slot, prompt)
        return logits[-1], scored

    def _prefill_chunks(self, prompt: Sequence[int], slot: int, last_only: bool,
                        start: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
        """Prefill by the model in chunks from position `start` (the slot holds the tokens before it); yields
        (start, logits [t or 1, V] float32) per chunk."""
        tokens = to_device(prompt, self.device)  # [n]
        slots = to_device([slot], self.device)
        cache_len = self.model.cache_shape[1]
        for start in range(start, len(tokens), self.prefill_chunk):
            piece = tokens[start : start + self.prefill_chunk][None]  # [1, t], strides (t, 1) as compiled
            end = start + piece.shape[1]
            pos = torch.arange(start, end, device=self.device)[None]
            # the positions attention reads, from the host (the model would read them back from the device)
            kv_len = kv_read_len(end, cache_len)
            # a one-token chunk is a shape the compiled graph would specialise on: it runs eagerly
            chunk = self._compiled_chunk if self.compiled and piece.shape[1] > 1 else self._eager_chunk
            yield start, chunk(piece, pos, slots, kv_len, last_only)[0]

    def _fused_prefill(
        self, prompts: Sequence[Sequence[int]], slots: Sequence[int], starts: Sequence[int]
    ) -> torch.Tensor:
        tokens, row_slots, positions, last = [], [], [], []  # one row per prompt token from its start
        for prompt, slot, start in zip(prompts, slots, starts):
            tokens += prompt[start:]
            row_slots += [slot] * (len(prompt) - start)
            positions += range(start, len(prompt))
            last.append(len(tokens) - 1)
        tokens_t, slots_t, pos_t = (torch.tensor(v, device=self.device) for v in (tokens, row_slots, positions))
        last_t = torch.tensor(last, device=self.device)
        chunk = min(self.prefill_chunk, FUSED_PREFILL_ROWS)
        out = []
        for start in range(0, len(tokens), chunk):  # a later chunk attends to what earlier ones cached
            end = start + chunk
            want = last_t[(last_t >= start) & (last_t < end)] - start
            out.append(self._fused(tokens_t[start:end], slots_t[start:end], pos_t[start:end], want))
        with torch_on_one_thread(self.device):
            return torch.cat(out)

    @torch.inference_mode()
    def decode(
        self, slots: Sequence[int], tokens: Sequence[int] | torch.Tensor, positions: Sequence[int]
    ) -> torch.Tensor:
        """One step for the rows in `slots` (ascending), each feeding `tokens[i]` at `positions[i]`. Where
        steps run exactly their rows (steps_exact_slots), a slot may have several rows, at consecutive
        positions (prompt lookup's guesses, engine/batching.py).

        tokens may be a tensor on the model's device (the previous step's samples, never read by the host).
        Returns logits [len(slots), V] float32 in the same order.
        """
        tokens_t = tokens if isinstance(tokens, torch.Tensor) else to_device(tokens, self.device)  # [b]
        if self._fused is not None:
            return self._fused(tokens_t, to_device(slots, self.device), to_device(positions, self.device))
        n, kv_len, cache_len = slots[-1] + 1, max(positions) + 1, self.model.cache_shape[1]
        if self.compiled:
            n, kv_len = bucket(n, 1, self.max_batch), bucket(kv_len, MIN_KV_BUCKET, cache_len)
        else:
            kv_len = kv_read_len(kv_len, cache_len)
        # rows outside `slots` carry a dummy token 0 at the cache's last position, which no record covers
        pos = [cache_len - 1] * n
        for s, p in zip(slots, positions):
            pos[s] = p
        pos_t = to_device(pos, self.device)[:, None]  # [n, 1]
        if len(slots) == n:  # slots are exactly 0..n-1
            tok_t = tokens_t[:, None]  # [n, 1]
        else:
            slots_t = to_device(slots, self.device)
            tok_t = torch.zeros(n, 1, dtype=torch.long, device=self.device)
            tok_t[slots_t, 0] = tokens_t
        step = self._compiled_step if self.compiled else self._eager_step
        logits = step(tok_t, pos_t, kv_len)  # [n, V]
        return logits if len(slots) == n else logits[slots_t]

    def _eager_step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        return self.model(tokens, input_pos=pos, kv_len=kv_len, attention=self.attention, block=self._block)[:, -1]

    def _compile_options(self) -> dict:
        # torch.compile's CUDA graphs (mode="reduce-overhead"), or ours around the compiled step
        options = {"triton.cudagraphs": self.graphs == "trees", **self.compile_options}
        if any(isinstance(m, QuantLinear) for m in self.model.modules()):
            # gpt-fast's setting: inductor then turns a one-row matmul into a reduction, into which the
            # int8 weights' widening fuses (else the widened weights are written out and read again)
            options["coordinate_descent_tuning"] = True
        return options

    def _compiled_block(self) -> Callable:
        """TransformerBlock.forward compiled once for every layer (compile_scope "blocks"): the layer is an
        input, so one graph serves all of them (one more for prefill chunks)."""
        if self._block is None:
            self._block = torch.compile(TransformerBlock.forward, fullgraph=True, dynamic=True,
                                        options=self._compile_options())
        return self._block

    def _compiled_step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        if self._step is None:
            if self.compile_scope == "blocks":  # the step runs eagerly between the compiled blocks
                self._compiled_block()
                self._step = self._unit_step
            else:
                # dynamic: one compiled graph serves every bucket (cudagraph trees record one CUDA graph per size)
                self._step = torch.compile(self._unit_step, fullgraph=True, dynamic=True,
                                           options=self._compile_options())
            if self.graphs == "manual":
                self._step = StepGraphs(self._step, lambda: self.model.cache_version)
        try:
            # clone: CUDA-graph outputs are overwritten by the next replay
            return self._step(tokens, pos, kv_len // KV_UNIT).clone()
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            self._compile_failed(e)
            return self._eager_step(tokens, pos, kv_len)

    def _unit_step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_units: int) -> torch.Tensor:
        return self._eager_step(tokens, pos, kv_units * KV_UNIT)

    def _compiled_chunk(
        self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kv_len: int, last_only: bool
    ) -> torch.Tensor:
        """One prefill chunk, tokens [1, t] with t >= 2, by the compiled model -> logits [1, t or 1, V]."""
        if self._prefill is None:
            if self.compile_scope == "blocks":
                self._compiled_block()
                self._prefill = self._unit_chunk
            else:
                self._prefill = torch.compile(self._unit_chunk, fullgraph=True, dynamic=True,
                                              options=self.compile_options)
        kv_units = max(kv_len // PREFILL_KV_UNIT, min(2, self.model.cache_shape[1] // PREFILL_KV_UNIT))
        try:
            return self._prefill(tokens, pos, slots, kv_units, last_only)
        except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
            self._compile_failed(e)
            return self._eager_chunk(tokens, pos, slots, kv_len, last_only)

    def _eager_chunk(
        self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kv_len: int, last_only: bool
    ) -> torch.Tensor:
        if self.device.type != "cpu" or torch.compiler.is_compiling() or self._block is not None:
            # (the compiled chunk traces this; compiled blocks run inductor's kernels, not torch's matmuls)
            return self.model(tokens, input_pos=pos, slots=slots, last_only=last_only, kv_len=kv_len, block=self._block)
        with onednn_matmuls():
            return self.model(tokens, input_pos=pos, slots=slots, last_only=last_only, kv_len=kv_len)

    def _unit_chunk(self, tokens: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, kv_units: int,
                    last_only: bool) -> torch.Tensor:
        return self._eager_chunk(tokens, pos, slots, kv_units * PREFILL_KV_UNIT, last_only)

    def _compile_failed(self, error: Exception) -> None:
        """e.g. no triton or no C compiler: not the input. Decode and prefill eagerly from now on.

        Or dynamo's recompile limit: each cache size compiles the steps anew (dynamo guards on the cache's
        static shape), a Generator's cache grows with its calls, and past torch._dynamo.config.recompile_limit
        a fullgraph compile raises FailOnRecompileLimitHit instead of running eagerly."""
        if isinstance(error, torch._dynamo.exc.FailOnRecompileLimitHit):
            log.warning("the prefill and decode steps were compiled for more cache sizes than "
                        "torch._dynamo.config.recompile_limit (%d) allows; running them eagerly (slower)",
                        torch._dynamo.config.recompile_limit)
        else:
            log.warning("could not compile the prefill and decode steps; running them eagerly (slower): %s", error)
        self.compiled, self._step, self._prefill, self._block = False, None, None, None


def weights_stamp(model: Transformer) -> tuple[tuple[int, int, int], ...]:
    """Which tensors and storage hold the weights, and how often each was written in place (torch's version
    counter; inference tensors have none): a quantisation, a conversion, an optimizer step or a
    load_state_dict changes it. Writes through `.data` in place are not seen. The KV cache is left out. About
    0.4 ms for SmolLM2's 303 tensors."""
    return tuple((id(t), t.data_ptr(), 0 if t.is_inference() else t._version) for m in model.modules()
                 if not isinstance(m, KVCache) for t in (*m._parameters.values(), *m._buffers.values())
                 if t is not None)


def common_prefix_len(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """The number of leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), len(b) if limit is None else limit)
    if n == 0 or a[0] != b[0]:  # most pairs of prompts that differ differ at once
        return 0
    lo, hi = 0, n  # a[:lo] == b[:lo]; compared in slices (C speed) by halving: 100k-token prompts
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if list(a[lo:mid]) == list(b[lo:mid]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def bucket(n: int, least: int, most: int) -> int:
    """The smallest power of two >= n and >= least, at most `most`."""
    return min(most, max(least, 1 << (n - 1).bit_length()))

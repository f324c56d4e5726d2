"""The training loop: gradient accumulation, AdamW with warm-up + cosine, clipping, bf16 on CUDA,
periodic validation, logs, DCP checkpoints with exact resume, and a Hugging Face export at the end.

Loss = cross-entropy of the next token, summed over the targets the mask keeps and divided by the number
of kept targets in the whole global batch (all micro-batches, all ranks), so gradient accumulation and
any number of ranks give the same gradient as one big batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from codellama.checkpoints.train_run import latest_checkpoint
from codellama.config import ModelConfig, PRESETS, preset
from codellama.errors import UserError
from codellama.folder_lock import lock_folder
from codellama.model import Transformer
from codellama.train.checkpoint import (load_checkpoint, read_trainer_state, save_checkpoint,
                                       set_aside_earlier_run)
from codellama.train.config import Recipe
from codellama.train.data import (ChatExamples, InMemoryTokens, RankBatches, ShardsSource, TokenSource,
                                  make_source)
from codellama.train.distributed import (DistEnv, all_reduce_sum, barrier, build_from_scratch, init_distributed,
                                         place_loaded)
from codellama.train.interrupt import StopRequest
from codellama.train.metrics import MetricsLog, memory_gib, mfu, peak_flops
from codellama.train.optim import apply_recipe_settings, build_optimizer, lr_at, set_lr

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer


def masked_ce_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [B, T, V], targets [B, T], mask [B, T] bool -> summed cross-entropy over kept targets."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")  # [B*T]
    return (ce * mask.flatten()).sum()


def _source_seed(seed: int, name: str) -> int:
    return seed * 7919 + zlib.crc32(name.encode())


def build_sources(recipe: Recipe, tokenizer: Tokenizer | None, split: str) -> tuple[TokenSource | None, list]:
    """The recipe's sources for `split` ("train" or "val", the corpus pipeline's split names) as one (mixed)
    stream; None when no source has that split. Also returns the (name, source) pairs, for the vocabulary check."""
    d, t = recipe.data, recipe.train
    root = Path(d.root or ".")
    sources, weights = {}, {}
    for s in d.sources:
        seed = _source_seed(t.seed, s.name)
        if s.kind == "shards":
            try:
                src = ShardsSource(root / s.path, split, t.seq_len, seed, d.fim_rate, name=s.name,
                                   fim_spm_rate=d.fim_spm_rate)
            except UserError:
                if split == "train":
                    raise
                continue
        else:
            path = s.path if split == "train" else s.valid_path
            if not path:
                continue
            if s.kind == "tokens":
                src = InMemoryTokens.from_file(root / path, t.seq_len, seed, name=s.name)
            else:
                if tokenizer is None:
                    raise UserError(f"source {s.name!r} is chat data: the model needs a tokenizer "
                                    "(model.tokenizer, or a checkpoint that carries one)")
                src = ChatExamples.from_jsonl(root / path, tokenizer, t.seq_len, seed, name=s.name)
        sources[s.name], weights[s.name] = src, s.weight
    if not sources:
        return None, []
    return make_source(sources, weights, _source_seed(t.seed, f"mixture-{split}")), list(sources.items())


def check_sources_exist(recipe: Recipe) -> None:
    """UserError for a training source whose path does not exist, said before the model loads (a typo in
    data.root was reported only after model.init, minutes for a 7B)."""
    root = Path(recipe.data.root or ".")
    for s in recipe.data.sources:
        if not (root / s.path).exists():
            raise UserError(f"data source {s.name!r}: {root / s.path} does not exist; build it with "
                            "`codellama data`, or fix data.root (--data-root) or the source's path")


def _check_same_sources(state: dict, recipe: Recipe, ckpt: Path) -> None:
    """UserError when the checkpoint was written by a run reading other data sources than the recipe's."""
    saved = [s["name"] for s in state.get("recipe", {}).get("data", {}).get("sources", [])]
    ours = [s.name for s in recipe.data.sources]
    if saved and saved != ours:
        raise UserError(f"checkpoint {ckpt} was written reading data sources {saved}, the recipe now has {ours}: "
                        "resume with the same data.sources, or start a new run (--no-resume or another --out)")


def _check_same_lora(state: dict, recipe: Recipe, ckpt: Path) -> None:
    """UserError when the checkpoint was written with other model.lora settings than the recipe's: its
    adapters have other shapes, and its lora_scale buffers would silently override a new alpha."""
    saved = state.get("recipe", {}).get("model", {}).get("lora")
    if saved is None:  # written before LoRA existed: no adapters, and check_fits compares the tensors
        return
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in dataclasses.asdict(recipe.model.lora).items()
               if saved.get(k) != v]
    if changed:
        raise UserError(f"checkpoint {ckpt} was written with other model.lora settings ({'; '.join(changed)}): "
                        "resume with the same model.lora, or start a new run (--no-resume or another --out)")


def _shape_of(cfg: ModelConfig) -> dict:
    return {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "head_dim")}


class Trainer:
    """One training run of a recipe. Sources, model config and environment can be given directly (tests,
    benchmarks); otherwise they are built from the recipe."""

    def __init__(self, recipe: Recipe, *, model_config: ModelConfig | None = None, tokenizer=None,
                 train_source: TokenSource | None = None, valid_source: TokenSource | None = None,
                 env: DistEnv | None = None, progress: bool = True, resume: bool = True):
        self.recipe, self.progress = recipe, progress
        t = recipe.train
        # the batch must split over the ranks: a UserError before the process group or the model exist
        recipe.grad_accum(env.world_size if env else int(os.environ.get("WORLD_SIZE", "1")))
        self.env = env or init_distributed(t.device)
        self.accum = recipe.grad_accum(self.env.world_size)
        self.out_dir = Path(t.out_dir)
        self._lock = None
        if self.env.is_main:  # for the run: a second run there replaced this one's checkpoints, wrote into its log
            self._lock = lock_folder(self.out_dir, f"another codellama train is running in {self.out_dir}; wait for "
                                     "it to end or stop it (it saves a checkpoint on SIGTERM), or use another --out")
        self.bf16 = t.dtype == "bf16" and self.env.device.type == "cuda"
        parallel = dict(activation_checkpointing=t.activation_checkpointing, compile=t.compile, bf16=self.bf16)

        if train_source is None:
            check_sources_exist(recipe)
        self.model, self.tokenizer = self._build_model(model_config, tokenizer, parallel)
        self.cfg: ModelConfig = self.model.config

        arrays = []
        from_recipe = train_source is None
        if from_recipe:
            train_source, arrays = build_sources(recipe, self.tokenizer, "train")
            valid_source, valid_arrays = build_sources(recipe, self.tokenizer, "val")
            # checked too: a valid_path of another vocabulary was an IndexError at the first validation
            arrays += [(f"{name} (validation)", src) for name, src in valid_arrays]
        for name, src in arrays:
            bound = getattr(src, "vocab_size", None)  # pre-tokenised sources know their largest id
            if bound is not None and bound > self.cfg.vocab_size:
                raise UserError(f"source {name!r} has token ids up to {bound - 1}, beyond the model's vocabulary "
                                f"of {self.cfg.vocab_size}: it was tokenised for another model")
            if self.tokenizer is not None and hasattr(src, "check_tokenizer"):
                src.check_tokenizer(self.tokenizer)
        G = t.global_batch_seqs
        self.batches = RankBatches(train_source, G, self.env.rank, self.env.world_size)
        self.valid = RankBatches(valid_source, G, self.env.rank, self.env.world_size) if valid_source else None
        self.valid_start = self.valid.state_dict() if self.valid else None

        self.optimizer = build_optimizer(self.model, recipe.optim)
        self.step = 0
        self.tokens_seen = 0
        if not resume and self.env.is_main and (aside := set_aside_earlier_run(self.out_dir)) is not None:
            print(f"--no-resume: the earlier run's checkpoints and logs in {self.out_dir} were moved to {aside}",
                  file=sys.stderr)
        barrier(self.env)
        ckpt = latest_checkpoint(self.out_dir) if resume else None
        if ckpt is not None:
            # checked before any tensor loads: a shape error would not say which setting changed
            _check_same_lora(read_trainer_state(ckpt), recipe, ckpt)
            state = load_checkpoint(ckpt, self.model, self.optimizer, self.env.device)
            changed = apply_recipe_settings(self.optimizer, recipe.optim)
            if changed and self.env.is_main:
                print(f"resuming with the recipe's optimizer settings, not the checkpoint's: {'; '.join(changed)}",
                      file=sys.stderr)
            if from_recipe:  # the data state is per source: it only fits the same source list
                _check_same_sources(state, recipe, ckpt)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.batches.load_state_dict(state["data"])
        self.resumed_from = ckpt
        self.stopped_by: signal.Signals | None = None  # what stopped run() early (train/interrupt.py)
        # FSDP2 mixed precision already computes in bf16; otherwise autocast on CUDA
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 and not self.env.distributed
                         else contextlib.nullcontext())
        self.peak = peak_flops(self.env.device)
        self.log = MetricsLog(self.out_dir, enabled=self.env.is_main, start_step=self.step)

    # ---------------------------------------------------------------- model

    def _build_model(self, model_config, tokenizer, parallel) -> tuple[Transformer, object]:
        m, t = self.recipe.model, self.recipe.train
        if model_config is None and m.init:
            from codellama.checkpoints.load import load_model

            loaded = load_model(m.init, device="cpu", dtype=torch.float32)
            model, cfg = loaded.model, loaded.config
            tokenizer = tokenizer or loaded.tokenizer
            if m.preset:
                want = _shape_of(self._preset(m.preset))
                got = _shape_of(cfg)
                if want != got:
                    diff = ", ".join(f"{k} {got[k]} vs {want[k]}" for k in want if got[k] != want[k])
                    raise UserError(f"checkpoint {m.init} does not have the shape of preset {m.preset!r} ({diff}); "
                                    "fix model.preset or leave it empty")
            if m.tokenizer:
                tokenizer = self._load_tokenizer(m.tokenizer)
            if m.add_infill_tokens:
                from codellama.train.vocab import ensure_infill_tokens

                vocab = model.config.vocab_size
                tokenizer = ensure_infill_tokens(model, tokenizer, seed=t.seed)
                if m.lora.rank and model.config.vocab_size != vocab:
                    raise UserError(f"model.add_infill_tokens added {model.config.vocab_size - vocab} tokens to the "
                                    f"vocabulary of {m.init}, but with model.lora only the adapters train: the new "
                                    "tokens' embedding rows would stay as initialised. Add them in a full fine-tune "
                                    "first (model.lora.rank = 0), or start from a checkpoint that has them (Code "
                                    "Llama's do)")
            self._adjust_config(model.config)
            if m.lora.rank:
                self._apply_lora(model)
            return place_loaded(model, self.env, **parallel), tokenizer
        cfg = model_config.replace() if model_config is not None else self._preset(m.preset)
        if tokenizer is None and m.tokenizer:
            tokenizer = self._load_tokenizer(m.tokenizer)
        if m.add_infill_tokens:  # from scratch the pieces only need ids, and the model rows for them
            if tokenizer is None:
                raise UserError("model.add_infill_tokens needs a tokenizer to add the pieces to; set model.tokenizer")
            from codellama.tokenizer import add_infill_tokens

            tokenizer = add_infill_tokens(tokenizer)
            cfg.vocab_size = max(cfg.vocab_size, tokenizer.vocab_size)
        self._adjust_config(cfg)
        return build_from_scratch(cfg, self.env, t.seed, **parallel), tokenizer

    def _apply_lora(self, model: Transformer) -> None:
        from codellama.train.lora import apply_lora

        lora, total = self.recipe.model.lora, sum(p.numel() for p in model.parameters())
        trainable = apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.targets, self.recipe.train.seed)
        if self.env.is_main:
            print(f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: {trainable:,} trainable parameters, "
                  f"{100 * trainable / total:.2f}% of the model's {total:,}", file=sys.stderr)

    @staticmethod
    def _preset(name: str) -> ModelConfig:
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return preset(name)

    @staticmethod
    def _load_tokenizer(spec: str):
        """A tokenizer file or directory, or "codellama" for Code Llama's own vocabulary."""
        from codellama import tokenizer

        return tokenizer.codellama_tokenizer() if spec == "codellama" else tokenizer.load_tokenizer(spec)

    def _adjust_config(self, cfg: ModelConfig) -> None:
        """LCFT raises RoPE theta (forward reads it from the config); the context grows to seq_len."""
        if self.recipe.model.rope_theta > 0:
            cfg.rope_theta = self.recipe.model.rope_theta
        cfg.max_seq_len = max(cfg.max_seq_len, self.recipe.train.seq_len)

    # ---------------------------------------------------------------- steps

    def _micro_batches(self, batch):
        tokens, mask = batch.tokens.to(self.env.device), batch.mask.to(self.env.device)
        mb = self.recipe.train.micro_batch
        for i in range(0, tokens.shape[0], mb):
            yield tokens[i : i + mb, :-1], tokens[i : i + mb, 1:], mask[i : i + mb]  # [b, T] each

    def train_step(self) -> dict:
        model, env = self.model, self.env
        batch = self.batches.next_batch()
        n_kept = all_reduce_sum(batch.mask.sum().to(env.device, torch.float32), env)  # global kept targets
        loss_sum = torch.zeros((), device=env.device)
        for i, (x, y, m) in enumerate(self._micro_batches(batch)):
            if env.distributed:  # reduce-scatter gradients only on the last micro-batch
                model.set_requires_gradient_sync(i == self.accum - 1)
            with self.autocast:
                logits = model(x)  # [b, T, V]
            s = masked_ce_sum(logits, y, m)
            # FSDP averages gradients over ranks, hence the world_size factor
            (s * env.world_size / n_kept.clamp(min=1)).backward()
            loss_sum += s.detach()
        clip = self.recipe.optim.grad_clip or math.inf
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP
            norm = norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = all_reduce_sum(loss_sum, env) / n_kept.clamp(min=1)
        return {"loss": loss.item(), "grad_norm": norm.item(), "kept_targets": int(n_kept.item())}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the first eval_batches global batches of the validation stream (the same ones
        every time)."""
        if self.valid is None:
            return None
        self.valid.load_state_dict(self.valid_start)
        total = torch.zeros((), device=self.env.device)
        count = torch.zeros((), device=self.env.device)
        # LoRA's dropout off: it made the validation loss noisy and drew from the training's generator
        self.model.eval()
        try:
            for _ in range(self.recipe.train.eval_batches):
                batch = self.valid.next_batch()
                for x, y, m in self._micro_batches(batch):
                    with self.autocast:
                        logits = self.model(x)
                    total += masked_ce_sum(logits, y, m)
                    count += m.sum()
        finally:
            self.model.train()
        all_reduce_sum(total, self.env)
        all_reduce_sum(count, self.env)
        return (total / count.clamp(min=1)).item()

    def save(self) -> Path:
        state = {"tokens_seen": self.tokens_seen, "data": self.batches.state_dict(),
                 "recipe": self.recipe.to_dict(), "model_config": self.cfg.__dict__.copy()}
        return save_checkpoint(self.out_dir, self.step, self.model, self.optimizer, state, self.env,
                               self.recipe.train.keep_checkpoints, tokenizer=self._export_tokenizer())

    def run(self, stop_after: int | None = None) -> list[dict]:
        """Train to recipe.train.steps (or stop after step `stop_after`, as if killed there).
        Returns the records logged by this process (train and validation)."""
        from tqdm import tqdm

        t, o, env = self.recipe.train, self.recipe.optim, self.env
        tokens_per_step = t.global_batch_seqs * t.seq_len
        flops_per_token = self.cfg.flops_per_token(t.seq_len)
        if self.recipe.model.lora.rank:  # frozen weights get no gradients: a third of the matmuls' work is not done
            flops_per_token -= 2 * self.cfg.num_params(include_embeddings=False)
        records = []
        if env.is_main:
            self._note_settings_without_effect()
        bar = tqdm(total=t.steps, initial=self.step, disable=not (self.progress and env.is_main), unit="step",
                   dynamic_ncols=True)
        try:
            with StopRequest(announce=env.is_main) as stop:
                while self.step < t.steps and (stop_after is None or self.step < stop_after):
                    lr = lr_at(self.step, t.steps, o)
                    set_lr(self.optimizer, lr)
                    t0 = time.perf_counter()
                    out = self.train_step()
                    if env.device.type == "cuda":
                        torch.cuda.synchronize(env.device)
                    dt = time.perf_counter() - t0
                    if not math.isfinite(out["loss"]):  # the recipe's doing (its lr): one line, not a traceback
                        raise UserError(f"loss became {out['loss']} at step {self.step + 1}; lower optim.lr or "
                                        "resume from an earlier checkpoint")
                    self.step += 1
                    self.tokens_seen += tokens_per_step
                    tps = tokens_per_step / dt
                    rec = {"kind": "train", "step": self.step, "loss": out["loss"], "lr": lr,
                           "grad_norm": out["grad_norm"], "tokens_per_s": tps,
                           "mfu": mfu(tps, flops_per_token, self.peak, env.world_size),
                           "memory_gib": memory_gib(env.device), "tokens": self.tokens_seen}
                    records.append(rec)
                    if self.step % t.log_every == 0 or self.step == t.steps:
                        self.log.log(rec)
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                    if t.eval_every and (self.step % t.eval_every == 0 or self.step == t.steps):
                        val = self.evaluate()
                        if val is not None:
                            vrec = {"kind": "valid", "step": self.step, "loss": val}
                            records.append(vrec)
                            self.log.log(vrec)
                    saved = (t.ckpt_every and self.step % t.ckpt_every == 0) or self.step == t.steps
                    if saved:
                        self.save()
                    if stop.agreed(env):  # SIGTERM or Ctrl-C: this step's checkpoint, then stop
                        if not saved:
                            self.save()
                        # another rank's signal: torchrun and schedulers send SIGTERM to every rank
                        self.stopped_by = stop.signal or signal.SIGTERM
                        break
            if self.step == t.steps and t.export_hf:
                self.export_hf(self.out_dir / "hf")
        finally:
            bar.close()
        return records

    def _note_settings_without_effect(self) -> None:
        """Say so on stderr when a recipe setting will do nothing in this run, rather than look applied."""
        t, d = self.recipe.train, self.recipe.data
        if self.valid is None and t.eval_every:
            print(f"note: no validation data (no source has a validation split of at least {t.seq_len + 1} tokens), "
                  "so no validation loss: build corpora with a larger `codellama data --val-fraction`, or give "
                  "tokens and chat sources a valid_path", file=sys.stderr)
        as_they_are = [f"{s.name} ({s.kind})" for s in d.sources if s.kind != "shards"]
        if d.fim_rate > 0 and as_they_are:
            print(f"note: data.fim_rate {d.fim_rate} is applied when a corpus is built (`codellama data "
                  f"--fim-rate`); {', '.join(as_they_are)} are trained as they are", file=sys.stderr)

    def export_hf(self, out_dir: Path) -> Path | None:
        """Gather the full weights on rank 0 and write the Hugging Face layout (checkpoints.hf.save_hf)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from codellama.checkpoints.hf import save_hf
        from codellama.train.lora import merge_lora_tensors

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        sd = merge_lora_tensors(sd)  # LoRA adapters into the weights they adapt
        done = None
        if self.env.is_main:
            with torch.device("meta"):
                plain = Transformer(self.cfg)
            missing, unexpected = plain.load_state_dict(sd, assign=True, strict=False)
            if self.cfg.tie_embeddings:
                plain.output.weight = plain.tok_embeddings.weight
                missing = [k for k in missing if k != "output.weight"]
            if missing or unexpected:
                raise RuntimeError(f"export: state dict mismatch, missing {missing}, unexpected {unexpected}")
            save_hf(plain, self._export_tokenizer(), out_dir)
            done = out_dir
        barrier(self.env)
        return done

    def _export_tokenizer(self):
        """The tokenizer to export; after chat training in the [INST] format, with that format as its chat
        template (Code Llama's tokenizer carries none, and transformers and vLLM chat through one)."""
        from codellama.prompts import INSTRUCT_TEMPLATE, chat_format

        tok = self.tokenizer
        chat = any(s.kind == "chat" for s in self.recipe.data.sources)
        if tok is None or not chat or chat_format(tok) != "instruct":
            return tok
        tok = copy.copy(tok)
        tok.chat_template = INSTRUCT_TEMPLATE
        return tok

    def close(self) -> None:
        self.log.close()
        if self._lock is not None:
            self._lock.close()  # and the lock with it
            self._lock = None


def train(recipe: Recipe, **kwargs) -> list[dict]:
    """Build a Trainer for the recipe, run it to the end, return the records."""
    trainer = Trainer(recipe, **kwargs)
    try:
        return trainer.run()
    finally:
        trainer.close()

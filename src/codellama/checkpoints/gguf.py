"""GGUF (llama.cpp) checkpoints: load F32/F16/BF16 weights and every block type the gguf package can
dequantise (Q4_0 to Q8_0, Q2_K to Q6_K, the IQ, TQ, MXFP4 and NVFP4 types), plus the tokenizer and chat
template stored in the file; save F32/F16/Q8_0 files that llama.cpp and our loader both read.

llama.cpp's converter permutes attn_q/attn_k rows HF->Meta (interleaved RoPE pairs), so we un-permute on
load and permute on save (checkpoints/common.py). Tensors are dequantised one at a time from the reader's
memory map, so only the final weights are ever held in full.

With keep_codes, the linear layers' quantised matrices are not dequantised but kept as the file's codes in
a QuantLinear layout (engine/quant.py) that holds them exactly: the 4-bit types (Q4_0, Q4_1, Q4_K) as int4
(groups of 32 with a float32 scale and minimum, 4.5-5 bits per weight as in the file), the types without
a minimum (Q8_0, Q5_0, Q6_K, Q3_K, and IQ4_NL/IQ4_XS, whose nibbles index 16 int8 levels) as int8s (int8
codes with a scale per block of 32 or 16, float16 where a matrix's are all exactly so, as Q8_0's, Q5_0's and
IQ4_NL's are, else float32: 8.5 to 10 bits per weight), the others (Q5_1, Q5_K, Q2_K)
as int8g (a scale and a minimum per 16: 12 bits); the grid-coded IQ types, TQ and the FP4 types are
dequantised. That is the way
llama.cpp runs such a file, with its very values, instead of float32's 32 bits per weight. A tied output
projection (no output.weight: the embedding's) runs on the embedding's codes, which the embedding lookup
widens a row at a time (engine/quant.py: QuantEmbedding).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from codellama.checkpoints.common import (
    DTypeSpec,
    drop_mapped_pages,
    fill_model,
    meta_to_ours,
    ours_to_meta,
    resolve_dtype,
)
from codellama.config import ModelConfig, warn_default_theta
from codellama.engine.quant import GROUP, INT8_GROUP, QuantCodes, int8s_scales, pack_int4
from codellama.errors import UserError
from codellama.model import Transformer

if TYPE_CHECKING:
    import gguf

    from codellama.checkpoints.gguf_reader import FastGGUFReader
    from codellama.tokenizer import Tokenizer

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # the block types the int4 layout holds exactly
INT8S_TYPES = ("Q8_0", "Q5_0", "Q6_K", "Q3_K", "IQ4_NL", "IQ4_XS")  # int8s: no minimum
CODE_TYPES = (*INT4_TYPES, *INT8S_TYPES, "Q5_1", "Q5_K", "Q2_K")  # the rest as int8g
# read through gguf.quants.dequantize to floating point only (grid and ternary codes: no layout of ours)
FLOAT_ONLY_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4",
                    "NVFP4")
SUPPORTED_TYPES = ("F32", "F16", "BF16", *CODE_TYPES, *FLOAT_ONLY_TYPES)
SAVE_TYPES = ("F32", "F16", "Q8_0")

# GGUF tensor name (per block, after "blk.N.") -> ours (after "layers.N.")
_LAYER = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv", "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
}
_TOP = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_OURS = re.compile(r"layers\.(\d+)\.(.+)\.weight")
_IGNORED = ("rope_freqs.weight",)


def to_gguf_name(name: str) -> str:
    m = _OURS.fullmatch(name)
    if m:
        return f"blk.{m.group(1)}.{_LAYER_INV[m.group(2)]}.weight"
    return f"{_TOP_INV[name.removesuffix('.weight')]}.weight"


def from_gguf_name(name: str) -> str | None:
    if name in _IGNORED:
        return None
    m = _BLK.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    base = name.removesuffix(".weight")
    if base in _TOP and name.endswith(".weight"):
        return f"{_TOP[base]}.weight"
    raise KeyError(name)


# ---- reading ----


def open_reader(path: str | Path) -> FastGGUFReader:
    from codellama.checkpoints.gguf_reader import FastGGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        return FastGGUFReader(path)
    except Exception as e:  # bad magic, truncated header/tensor data, unknown value types
        raise UserError(
            f"{path}: not a valid GGUF file ({type(e).__name__}: {e}); it may be truncated, re-download it"
        ) from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that is that float32 (1e-05, not 9.99999974e-06), so a
    config converted from GGUF reads as the original did."""
    return float(str(np.float32(value)))


def gguf_rope_scaling(reader: FastGGUFReader, path: Path) -> float:
    """The linear RoPE factor, read as llama.cpp reads it: a factor without a scaling type is linear, and
    files from before GGUF v3 name it rope.scale_linear. UserError for a scaling we do not implement."""
    kind = _field(reader, "llama.rope.scaling.type", "linear")
    if kind not in ("none", "linear"):
        raise UserError(f"{path}: rope scaling {kind!r} is not supported (only linear): its logits would be "
                        "wrong past the context it was trained at")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None and not np.all(dequantize(freqs.data, freqs.tensor_type).numpy() == 1):
        # llama.cpp divides each frequency by its entry: Llama 3.1-style scaling, converted into a tensor
        raise UserError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama 3.1-style rope scaling) "
                        "are not supported")
    factor = _field(reader, "llama.rope.scaling.factor", _field(reader, "llama.rope.scale_linear"))
    return 1.0 if kind == "none" or factor in (None, 0) else _f32(factor)  # llama.cpp: 0 means none


def gguf_config(reader: FastGGUFReader, path: Path) -> ModelConfig:
    """ModelConfig from the llama.* metadata; vocab from llama.vocab_size, else the token list."""
    arch = _field(reader, "general.architecture", "llama")
    if arch != "llama":
        raise UserError(f"{path}: architecture {arch!r} is not supported (only 'llama' GGUF files)")

    experts = _field(reader, "llama.expert_count")
    if experts:  # Mixtral's GGUFs are "llama" files: `info` showed a dense model, loading an unexpected tensor
        raise UserError(f"{path}: a mixture-of-experts model ({experts} experts per layer, Mixtral-style); only "
                        "dense Llama models are supported")

    def need(key: str):
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise UserError(f"{path}: missing metadata key llama.{key}")
        return value

    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise UserError(f"{path}: no token_embd.weight tensor; not a Llama GGUF")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else int(emb.shape[1])
    rope_scaling = gguf_rope_scaling(reader, path)
    if _field(reader, "llama.rope.freq_base") is None:
        warn_default_theta(int(vocab), str(path))
    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", dim // n_heads))
    rope_dims = _field(reader, "llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UserError(f"{path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    try:
        return ModelConfig(
            dim=dim,
            n_layers=int(need("block_count")),
            n_heads=n_heads,
            n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
            vocab_size=int(vocab),
            ffn_hidden=int(need("feed_forward_length")),
            norm_eps=_f32(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(_field(reader, "llama.rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=int(_field(reader, "llama.context_length", 4096)),
            tie_embeddings=all(t.name != "output.weight" for t in reader.tensors),  # SmolLM2 ships no output
            head_dim=head_dim,
            bos_id=_field(reader, "tokenizer.ggml.bos_token_id", 1),
            eos_id=_field(reader, "tokenizer.ggml.eos_token_id", 2),
            name=str(_field(reader, "general.name", path.stem)),
        )
    except (ValueError, TypeError) as e:  # e.g. heads not divisible by kv heads, per-layer head counts
        raise UserError(f"{path}: inconsistent model metadata ({e})") from None


def dequantize(data: np.ndarray, qtype) -> torch.Tensor:
    """GGUF tensor data as GGUFReader gives it -> torch tensor in torch shape order [rows, cols].

    F16/BF16 keep their dtype (no float32 detour); block types go through gguf.quants.dequantize (the
    reference implementation) to float32."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as np_dequantize

    qtype = Q(qtype)
    arr = np.asarray(data)
    if qtype == Q.F32:
        return torch.from_numpy(arr.view(np.float32).copy())  # copy: the reader's map is read-only
    if qtype == Q.F16:
        return torch.from_numpy(arr.view(np.float16).copy())
    if qtype == Q.BF16:
        return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
    if qtype.name not in SUPPORTED_TYPES:
        raise UserError(f"GGUF tensor type {qtype.name} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
    return torch.from_numpy(np_dequantize(arr, qtype))


def _f16(raw: np.ndarray) -> np.ndarray:
    """[..., 2] bytes holding a float16 -> float32 [..., 1]."""
    return raw.copy().view(np.float16).astype(np.float32)


def _bits(raw: np.ndarray, shifts: tuple[int, ...], mask: int) -> np.ndarray:
    """uint8 [..., n] -> [..., len(shifts), n]: the field at each shift of every byte."""
    return (raw[..., None, :] >> np.array(shifts, dtype=np.uint8)[:, None]) & np.uint8(mask)


def _block_values(blocks: np.ndarray, qtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block type's bytes [N, B, block bytes] -> (codes [N, B, block], scale and min [N, B, sub-blocks]
    float32), so that weight = code * scale + min over each sub-block of consecutive weights.

    The scales and minima are the very float32 products gguf.quants.dequantize forms (d * sc, dmin * m, ...),
    and each type's code times its scale is exact in float32, so the weights equal its floats bit for bit
    (tests/test_checkpoints_gguf.py). Codes come out in the weights' order, as that function lays them out."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import IQ4_NL, Q4_K

    n, b = blocks.shape[:2]
    name = Q(qtype).name

    def k_scales(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # Q4_K/Q5_K: 8 6-bit scales and mins
        sc, m = Q4_K.get_scale_min(raw.reshape(-1, 12))
        return sc.reshape(n, b, 8).astype(np.float32), m.reshape(n, b, 8).astype(np.float32)

    def high_bits(raw: np.ndarray, nbits: int) -> np.ndarray:  # a 32-bit mask per 32 weights -> [n, b, 32*..]
        return _bits(raw, tuple(range(nbits)), 1).reshape(n, b, -1)

    if name == "Q8_0":  # d, 32 int8
        return blocks[..., 2:].view(np.int8), _f16(blocks[..., :2]), np.zeros((n, b, 1), np.float32)
    if name in ("Q4_0", "Q4_1"):  # d (, m), 16 bytes: low nibbles k = 0..15, high ones 16..31
        off = 2 if name == "Q4_0" else 4
        codes = _bits(blocks[..., off:], (0, 4), 0x0F).reshape(n, b, 32)
        d = _f16(blocks[..., :2])
        return codes, d, -8 * d if name == "Q4_0" else _f16(blocks[..., 2:4])
    if name in ("Q5_0", "Q5_1"):  # d (, m), a 32-bit mask of fifth bits, 16 bytes of nibbles
        off = 2 if name == "Q5_0" else 4
        high = high_bits(blocks[..., off:off + 4], 8).reshape(n, b, 8, 4).transpose(0, 1, 3, 2).reshape(n, b, 32)
        codes = _bits(blocks[..., off + 4:], (0, 4), 0x0F).reshape(n, b, 32) | (high << 4)
        d = _f16(blocks[..., :2])
        if name == "Q5_0":
            return codes.astype(np.int8) - 16, d, np.zeros_like(d)
        return codes, d, _f16(blocks[..., 2:4])
    if name in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of scales/mins, (32 bytes of fifth bits,) nibbles
        d, dmin = _f16(blocks[..., :2]), _f16(blocks[..., 2:4])
        sc, m = k_scales(blocks[..., 4:16])
        off = 16 if name == "Q4_K" else 48
        codes = _bits(blocks[..., off:].reshape(n, b, 4, 32), (0, 4), 0x0F).reshape(n, b, 256)
        if name == "Q5_K":
            codes = codes | (high_bits(blocks[..., 16:48], 8) << 4)
        return codes, d * sc, -(dmin * m)
    if name == "Q6_K":  # 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d
        low = _bits(blocks[..., :128].reshape(n, b, 2, 64), (0, 4), 0x0F).reshape(n, b, 256)
        high = _bits(blocks[..., 128:192].reshape(n, b, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, b, 256)
        scale = _f16(blocks[..., 208:]) * blocks[..., 192:208].view(np.int8).astype(np.float32)
        return (low | (high << 4)).astype(np.int8) - 32, scale, np.zeros_like(scale)
    if name == "Q3_K":  # 32 bytes of third bits (set: no -4), 64 of bit pairs, 12 of 6-bit scales, d
        low = _bits(blocks[..., 32:96].reshape(n, b, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, b, 256)
        minus4 = (high_bits(blocks[..., :32], 8) ^ 1) << 2
        raw = blocks[..., 96:108]
        sc = _bits(raw[..., :8], (0, 4), 0x0F).reshape(n, b, 16)  # low 4 bits, then the high 2
        sc |= _bits(raw[..., 8:], (0, 2, 4, 6), 0x03).reshape(n, b, 16) << 4
        scale = _f16(blocks[..., 108:]) * (sc.astype(np.int8) - 32).astype(np.float32)
        return low.astype(np.int8) - minus4.astype(np.int8), scale, np.zeros_like(scale)
    if name == "Q2_K":  # 16 bytes of 4-bit scale/min pairs, 64 of bit pairs, d, dmin
        sc = blocks[..., :16]
        codes = _bits(blocks[..., 16:80].reshape(n, b, 2, 32), (0, 2, 4, 6), 0x03).reshape(n, b, 256)
        d, dmin = _f16(blocks[..., 80:82]), _f16(blocks[..., 82:84])
        return codes, d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32))
    if name in ("IQ4_NL", "IQ4_XS"):  # nibbles index a table of 16 int8 levels, 32 weights per scale
        levels = np.array(IQ4_NL.kvalues, dtype=np.int8)
        d = _f16(blocks[..., :2])
        if name == "IQ4_NL":  # d, 16 bytes: low nibbles k = 0..15, high ones 16..31
            return levels[_bits(blocks[..., 2:], (0, 4), 0x0F).reshape(n, b, 32)], d, np.zeros_like(d)
        # d, 2 bytes of high scale bit pairs, 4 of low scale nibbles, 8 sub-blocks of 16 bytes as IQ4_NL's
        high = blocks[..., 2:4].copy().view(np.uint16)  # [n, b, 1]
        high = ((high >> np.arange(0, 16, 2, dtype=np.uint16)) & 3).astype(np.uint8)  # [n, b, 8]
        low = _bits(blocks[..., 4:8], (0, 4), 0x0F).transpose(0, 1, 3, 2).reshape(n, b, 8)
        scale = d * ((low | (high << 4)).astype(np.int8) - 32).astype(np.float32)
        codes = levels[_bits(blocks[..., 8:].reshape(n, b, 8, 16), (0, 4), 0x0F).reshape(n, b, 256)]
        return codes, scale, np.zeros_like(scale)
    raise ValueError(f"{name} has no codes layout here; these do: {', '.join(CODE_TYPES)}")


def file_codes(data: np.ndarray, qtype) -> QuantCodes:
    """A quantised matrix's raw data [N, row bytes] -> its codes in a QuantLinear layout, exactly its values:
    Q4_0/Q4_1/Q4_K as int4 (4.5-5 bits per weight, as in the file), those without a minimum as int8s (8.5-10
    bits: float16 scales where exact), the others as int8g (12 bits)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    qtype = Q(qtype)
    _, size = GGML_QUANT_SIZES[qtype]
    arr = np.asarray(data)
    n = arr.shape[0]
    codes, scale, low = _block_values(arr.reshape(n, -1, size), qtype)  # [N, B, block], [N, B, S] x 2
    if qtype.name in INT8S_TYPES:  # low is all zeros: a scale per sub-block, as the file has it
        scales = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(n, -1))  # [N, K/G]
        return QuantCodes("int8s", torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8).reshape(n, -1)),
                          int8s_scales(scales))
    int4 = qtype.name in INT4_TYPES
    # a scale and min per group of the layout (32 or 16 weights): a 32-weight sub-block's for both its 16s
    repeat = codes.shape[-1] // scale.shape[-1] // (GROUP if int4 else INT8_GROUP)
    sz = torch.from_numpy(np.stack((scale.reshape(n, -1), low.reshape(n, -1)), axis=-1).repeat(repeat, axis=1))
    if int4:
        packed = pack_int4(torch.from_numpy(np.ascontiguousarray(codes, dtype=np.uint8)).view(n, -1, 32))
        return QuantCodes("int4", packed, sz)
    return QuantCodes("int8g", torch.from_numpy(np.ascontiguousarray(codes, dtype=np.int8).reshape(n, -1)), sz)


def _iter_tensors(
    reader, cfg: ModelConfig, path: Path, keep_codes: bool = False
) -> Iterator[tuple[str, torch.Tensor | QuantCodes]]:
    for t in reader.tensors:
        try:
            name = from_gguf_name(t.name)
        except KeyError:
            raise UserError(f"{path}: unexpected tensor {t.name!r} in a Llama GGUF") from None
        if name is None:
            continue
        kept = keep_codes and len(t.shape) == 2 and t.tensor_type.name in CODE_TYPES
        try:
            w = file_codes(t.data, t.tensor_type) if kept else dequantize(t.data, t.tensor_type)
        except UserError as e:
            raise UserError(f"{path}: tensor {t.name}: {e}") from None
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: cannot read tensor {t.name} ({e}); the file is corrupt or truncated") from None
        if name.endswith("attention.wq.weight"):
            w = meta_to_ours(w, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            w = meta_to_ours(w, cfg.n_kv_heads)
        drop_mapped_pages(t.data.ctypes.data, t.data.nbytes)  # w is a copy: the file's pages can go
        yield name, w


def _stored_dtype(reader) -> torch.dtype:
    types = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    if len(types) != 1:
        return torch.float16  # mixed or quantised: half precision on an accelerator
    return {"BF16": torch.bfloat16, "F32": torch.float32}.get(types.pop(), torch.float16)


def gguf_tokenizer(reader: FastGGUFReader) -> Tokenizer | None:
    """The tokenizer (with chat template) embedded in the GGUF, or None when it carries none."""
    if reader.fields.get("tokenizer.ggml.tokens") is None:
        return None
    from codellama.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(reader)


def load_gguf(
    path: str | Path, device: str | torch.device = "cpu", dtype: DTypeSpec = None, *, with_tokenizer: bool = True,
    keep_codes: bool = False, quantize: str | None = None,
) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """-> (model, tokenizer or None, config) from a .gguf file; keep_codes: see the module docstring;
    quantize: see fill_model."""
    path = Path(path)
    reader = open_reader(path)
    cfg = gguf_config(reader, path)
    dt = resolve_dtype(device, dtype, _stored_dtype(reader))
    model = fill_model(cfg, _iter_tensors(reader, cfg, path, keep_codes), device=device, dtype=dt, source=str(path),
                       quantize=quantize)
    tokenizer = gguf_tokenizer(reader) if with_tokenizer else None
    return model, tokenizer, cfg


# ---- writing ----


def _tensor_plan(model: Transformer, qtype: str) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(GGUF name, float32 tensor in llama.cpp row order, storage type) for every tensor."""
    cfg = model.config
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue  # llama.cpp falls back to token_embd when output is absent
        if name.endswith("attention.wq.weight"):
            t = ours_to_meta(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = ours_to_meta(t, cfg.n_kv_heads)
        kind = qtype
        if t.ndim == 1:
            kind = "F32"  # norms stay F32, as llama.cpp's converter keeps them
        elif kind == "Q8_0" and t.shape[-1] % 32:
            kind = "F16"  # Q8_0 needs rows in whole blocks of 32
        yield to_gguf_name(name), t, kind


def _encode(t: torch.Tensor, kind: str) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    a = t.detach().float().cpu().numpy()
    if kind == "F32":
        return a
    if kind == "F16":
        return a.astype(np.float16)
    return quantize(a, Q[kind])


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[Q[kind]]
    return int(np.prod(shape)) // block * size


def save_gguf(model: Transformer, tokenizer: Tokenizer | None, path: str | Path, qtype: str = "F16") -> Path:
    """Write a llama-architecture GGUF (F32, F16 or Q8_0 matrices; norms F32) with the tokenizer fields,
    streaming one tensor at a time."""
    import gguf

    qtype = qtype.upper()
    if qtype not in SAVE_TYPES:
        raise UserError(f"cannot write GGUF type {qtype!r}; choose one of {', '.join(SAVE_TYPES)}")
    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(cfg.name or "codellama")
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim != cfg.dim // cfg.n_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_scaling)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type({"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        write_tokenizer(w, tokenizer, cfg)
    else:  # llama.cpp refuses a file without tokenizer.ggml.model; "no_vocab" (its --no-vocab) runs token ids
        w.add_tokenizer_model("no_vocab")

    # two passes over the weights (infos, then data) so no converted copy of the whole model is held
    from gguf import GGMLQuantizationType as Q

    for name, t, kind in _tensor_plan(model, qtype):
        shape = tuple(t.shape)
        w.add_tensor_info(name, shape, np.dtype(np.float32), _nbytes(shape, kind), raw_dtype=Q[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, t, kind in _tensor_plan(model, qtype):
        w.write_tensor_data(_encode(t, kind))
    w.close()
    return path


def write_tokenizer(w: gguf.GGUFWriter, tok: Tokenizer, cfg: ModelConfig) -> None:
    """The tokenizer.ggml.* fields (codellama.tokenizer's writer) plus llama.cpp's infill token ids."""
    from codellama.tokenizer import write_gguf_tokenizer

    tok = _fit_pieces(tok, cfg.vocab_size)
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tok.vocab_size} pieces but the model {cfg.vocab_size} embedding rows; "
            "llama.cpp needs them equal"
        )
    write_gguf_tokenizer(tok, w)
    for key, tid in (("fim_pre", tok.prefix_id), ("fim_suf", tok.suffix_id), ("fim_mid", tok.middle_id)):
        if tid is not None:
            w.add_uint32(f"tokenizer.ggml.{key}_token_id", tid)
    if tok.eot_id is not None:
        w.add_eot_token_id(tok.eot_id)


def _fit_pieces(tok: Tokenizer, rows: int) -> Tokenizer:
    """A SentencePiece tokenizer with as many pieces as the embedding has rows, made as llama.cpp's converter
    makes them: pieces past the embedding dropped (a 32000-row Python model shipped with Code Llama's 32016),
    rows past the pieces named [PAD{id}], unused (a fine-tune's added pad row). Any other tokenizer as is."""
    from codellama import spm_proto
    from codellama.tokenizer import SentencePieceTokenizer

    if not isinstance(tok, SentencePieceTokenizer) or tok.vocab_size == rows:
        return tok
    proto = spm_proto.ModelProto.from_bytes(tok.model_proto)
    if max(proto.special_ids().values()) >= rows:  # its BOS, EOS, unknown or pad piece would be lost
        return tok
    proto.pieces = proto.pieces[:rows] + [spm_proto.Piece(f"[PAD{i}]", -10000.0, spm_proto.UNUSED)
                                          for i in range(len(proto.pieces), rows)]
    proto.set_vocab_size()
    return SentencePieceTokenizer(proto.to_bytes(), chat_template=tok.chat_template, add_bos=tok.add_bos)

"""Meta's layout: params.json + consolidated.NN.pth (one per model-parallel rank) + tokenizer.model.

Shards are merged by fairscale's rules (spec 1.4), and wq/wk rows permuted from Meta's interleaved RoPE
order into ours (spec 1.5). save_meta writes the exact reverse, so tests can build real Meta checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from codellama.checkpoints.common import (
    DTypeSpec,
    drop_mapped_pages,
    fill_model,
    load_state_dict_file,
    meta_to_ours,
    ours_to_meta,
    read_json_object,
    resolve_dtype,
    tokenizer_at,
)
from codellama.config import ModelConfig, llama_ffn_hidden, warn_default_theta
from codellama.errors import UserError
from codellama.model import Transformer

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer

# fairscale ColumnParallelLinear splits the output dim (0), RowParallelLinear the input dim (1);
# ParallelEmbedding splits the embedding dim (1); norms are replicated.
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}
_IGNORED = ("rope.freqs",)


def split_dim(name: str) -> int | None:
    """The dim a parameter is split on across model-parallel shards (None: replicated)."""
    key = name.removesuffix(".weight").rsplit(".", 1)[-1]
    return _SPLIT_DIM.get(key)


def shard_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise UserError(
            f"{path}: params.json found but no consolidated.00.pth "
            "(Meta layout: params.json, consolidated.NN.pth, tokenizer.model)"
        )
    return files


def read_params(path: Path) -> dict:
    f = path / "params.json"
    params = read_json_object(f, "model parameters")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise UserError(f"{f}: missing key(s) {', '.join(missing)}")
    return params


def _merge(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    dim = split_dim(name)
    if len(parts) == 1 or dim is None:
        return parts[0]
    return torch.cat(parts, dim=dim)


def _iter_merged(
    shards: list[dict[str, torch.Tensor]], cfg: ModelConfig, dtype: torch.dtype, source: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Merged, permuted, converted tensors, one at a time; each shard piece's file pages are dropped from
    RSS as soon as a copy of it exists, so the process holds about one copy of the weights."""
    for name in list(shards[0]):
        if name in _IGNORED:
            continue
        parts = [s.pop(name) for s in shards]  # meta_config checked every shard has every tensor
        t = _merge(name, parts)
        if name.endswith("attention.wq.weight"):
            t = meta_to_ours(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = meta_to_ours(t, cfg.n_kv_heads)
        t = t.to(dtype)
        if all(t.untyped_storage().data_ptr() != p.untyped_storage().data_ptr() for p in parts):
            for p in parts:  # a copy exists: the mapped pages of the pieces are no longer needed
                drop_mapped_pages(p.data_ptr(), p.numel() * p.element_size())
        yield name, t


def _tokenizer_vocab(path: Path) -> tuple[object | None, int | None]:
    f = path / "tokenizer.model"
    if not f.is_file():
        return None, None
    tok = tokenizer_at(f)
    return tok, tok.vocab_size


def _check_shard_count(path: Path, params: dict, emb: torch.Tensor, n_files: int) -> None:
    """Each shard holds 1/MP of the embedding's columns (ParallelEmbedding): a missing or extra
    consolidated.NN.pth shows there, before any tensor is merged into a wrong shape."""
    dim, part = params["dim"], emb.shape[1]
    if part * n_files == dim:
        return
    if dim % part:
        raise UserError(f"{path}: consolidated.00.pth has embedding width {part}, which does not divide the dim "
                        f"{dim} of params.json; the shards and params.json do not belong together")
    raise UserError(f"{path}: the shards were written for {dim // part} model-parallel ranks (consolidated.00.pth "
                    f"holds {part} of {dim} embedding columns) but {n_files} consolidated.NN.pth file(s) are here; "
                    "a shard is missing or does not belong (re-download the checkpoint)")


def _check_shards_agree(files: list[Path], shards: list[dict[str, torch.Tensor]]) -> None:
    """Every shard holds the same tensors in the same shapes (fairscale splits evenly; the rest is
    replicated): a later shard that is cut short or from another checkpoint is named before any merging."""
    first = {name: tuple(t.shape) for name, t in shards[0].items()}
    for f, shard in zip(files[1:], shards[1:]):
        shapes = {name: tuple(t.shape) for name, t in shard.items()}
        missing, extra = sorted(first.keys() - shapes.keys()), sorted(shapes.keys() - first.keys())
        if missing or extra:
            what = f"lacks {', '.join(missing[:3])}" if missing else f"has {', '.join(extra[:3])} extra"
            raise UserError(f"{f}: {what} compared with {files[0].name}; the shards do not belong together "
                            "(re-download the checkpoint)")
        for name, shape in first.items():
            if shapes[name] != shape:
                raise UserError(f"{f}: {name} is {shapes[name]} but {shape} in {files[0].name}; the shards do not "
                                "belong together (re-download the checkpoint)")


def meta_config(
    path: Path, shards: list[dict[str, torch.Tensor]] | None = None
) -> tuple[ModelConfig, Tokenizer | None, list[Path]]:
    """-> (config, tokenizer or None, shard files); reads params.json, tokenizer.model and the shards'
    tensor names and shapes (memory-mapped: no weight is read), checking the shards agree."""
    params = read_params(path)
    files = shard_files(path)
    if shards is None:
        shards = [load_state_dict_file(f) for f in files]
    _check_shards_agree(files, shards)
    shard0 = shards[0]
    emb = shard0.get("tok_embeddings.weight")
    if emb is None:
        raise UserError(f"{files[0]}: no tok_embeddings.weight; not a Llama checkpoint")
    if emb.dim() != 2:
        raise UserError(f"{files[0]}: tok_embeddings.weight has shape {tuple(emb.shape)}, not [vocab, dim]; "
                        "not a Llama checkpoint")
    _check_shard_count(path, params, emb, len(files))
    tokenizer, vocab = _tokenizer_vocab(path)
    if vocab is None:  # no tokenizer.model: the embedding rows (never split) are the vocabulary
        vocab = emb.shape[0]
    try:
        cfg = ModelConfig.from_meta(params, vocab)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path / 'params.json'}: {e}") from None
    cfg.name = path.name
    if "rope_theta" not in params:
        warn_default_theta(cfg.vocab_size, str(path / "params.json"))
    if cfg.n_kv_heads % len(files) or cfg.n_heads % len(files):
        raise UserError(f"{path}: {len(files)} shards cannot split {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads")
    return cfg, tokenizer, files


def load_meta(
    path: str | Path, device: str | torch.device = "cpu", dtype: DTypeSpec = None, quantize: str | None = None
) -> tuple[Transformer, Tokenizer | None, ModelConfig]:
    """-> (model, tokenizer or None, config) from a Meta checkpoint directory (any number of MP shards);
    quantize: see fill_model."""
    path = Path(path)
    files = shard_files(path)
    shards = [load_state_dict_file(f) for f in files]
    cfg, tokenizer, _ = meta_config(path, shards)
    dt = resolve_dtype(device, dtype, shards[0]["tok_embeddings.weight"].dtype)
    model = fill_model(cfg, _iter_merged(shards, cfg, dt, str(path)), device=device, dtype=dt, source=str(path),
                       quantize=quantize)
    return model, tokenizer, cfg


# ---- saving ----


def meta_ffn_params(dim: int, ffn_hidden: int, multiple_of: int, multiplier: float | None) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that make Meta's rule give `ffn_hidden`."""
    if llama_ffn_hidden(dim, multiple_of, multiplier) == ffn_hidden:
        return multiple_of, multiplier
    base = int(2 * (4 * dim) / 3)
    if ffn_hidden >= base:
        return ffn_hidden, None  # ceil(base / F) * F == F
    mult = (ffn_hidden + 0.5) / base  # int(mult * base) == F, then multiple_of 1 keeps it
    return 1, mult


def check_meta_layout(cfg: ModelConfig, n_shards: int) -> None:
    """UserError unless Meta's layout can hold the model split for `n_shards` ranks (checked from the config
    alone, so `convert` says so before loading the source)."""
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        raise UserError("Meta's layout cannot express head_dim != dim / n_heads")
    if cfg.rope_scaling != 1.0:  # params.json has no field for it: the model would load with plain RoPE
        raise UserError(f"Meta's params.json cannot express linear RoPE scaling (x{cfg.rope_scaling:g}); "
                        "convert to hf or gguf instead")
    if cfg.n_kv_heads % n_shards or cfg.n_heads % n_shards:
        raise UserError(f"cannot split {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads into {n_shards} shards")
    # the other sizes _SPLIT_DIM cuts: w1/w3 rows and w2 columns, the output's rows, the embedding's columns
    for what, size in (("ffn_hidden", cfg.ffn_hidden), ("vocab_size", cfg.vocab_size), ("dim", cfg.dim)):
        if size % n_shards:
            raise UserError(f"cannot split {what} {size} into {n_shards} shards")


def save_meta(model: Transformer, tokenizer: Tokenizer | None, out_dir: str | Path, n_shards: int = 1) -> Path:
    """Write params.json (no vocab_size, as Meta's, unless the tokenizer's differs), consolidated.NN.pth split
    for `n_shards` ranks, and tokenizer.model when the tokenizer is SentencePiece."""
    cfg = model.config
    check_meta_layout(cfg, n_shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    full: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith("attention.wq.weight"):
            t = ours_to_meta(t, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = ours_to_meta(t, cfg.n_kv_heads)
        full[name] = t.detach().cpu()
    if cfg.tie_embeddings:
        full["output.weight"] = full["output.weight"].clone()  # Meta's layout has no tying
    # Meta's files carry the RoPE table too (ignored on load)
    full["rope.freqs"] = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
    for stale in out.glob("consolidated.*.pth"):  # an overwritten checkpoint's extra ranks would be loaded too
        stale.unlink()
    for rank in range(n_shards):
        shard = {}
        for name, t in full.items():
            d = split_dim(name)
            # clone: a saved view would carry its whole storage
            shard[name] = t if d is None else t.chunk(n_shards, dim=d)[rank].clone()
        torch.save(shard, out / f"consolidated.{rank:02d}.pth")

    params = cfg.to_meta()
    params["multiple_of"], params["ffn_dim_multiplier"] = meta_ffn_params(
        cfg.dim, cfg.ffn_hidden, cfg.multiple_of, cfg.ffn_dim_multiplier
    )
    if params["ffn_dim_multiplier"] is None:
        params.pop("ffn_dim_multiplier")
    proto = getattr(tokenizer, "model_proto", None)  # SentencePieceTokenizer; Meta's layout has no BPE
    if proto is not None and tokenizer.vocab_size != cfg.vocab_size:
        # loading takes the vocab from tokenizer.model unless params.json gives one: a 32000-row model with
        # Code Llama's 32016 pieces (the Hub's Python models) was written, then refused for its embedding
        params["vocab_size"] = cfg.vocab_size
    (out / "params.json").write_text(json.dumps(params) + "\n")
    if proto is not None:
        (out / "tokenizer.model").write_bytes(proto)
    else:  # an overwritten checkpoint's tokenizer does not belong to these weights
        (out / "tokenizer.model").unlink(missing_ok=True)
    return out


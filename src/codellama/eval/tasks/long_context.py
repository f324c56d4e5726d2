"""Long-context evaluations (spec 5.6): key retrieval (paper App. G.2, Tab. 17) and perplexity against
context length (Fig. 4a). Neither executes programs; both write summary.json, a table and a PNG.

Key retrieval: a haystack of real Python code (the files of the running interpreter's standard library,
standing in for the paper's CodeContests solutions: both are syntactically valid code), with

    def my_function() -> int:
        # Note that this function is used at the end
        return <two-digit VALUE>

inserted between two files at a relative position, the whole prompt `length` tokens long and ending with
`assert my_function() == `. Greedy; an example is right when the completion starts with VALUE.

Perplexity: per-token negative log-likelihood of long code files (>= 50 kB, as in the paper) run through
the model once with the KV cache in chunks; perplexity at context length L = exp(mean NLL of tokens < L).
"""

from __future__ import annotations

import ast
import json
import math
import random
import re
import sysconfig
from pathlib import Path

from codellama.errors import UserError
from codellama.eval.data import append_jsonl, read_jsonl_tolerant, repair_tail

KEY_FUNCTION = "def my_function() -> int:\n    # Note that this function is used at the end\n    return {value}\n"
QUESTION = "\n\nassert my_function() == "
DEFAULT_LENGTHS = (8000, 16000, 24000)  # Tab. 17
DEFAULT_POSITIONS = (0.0, 0.2, 0.4)
DEFAULT_EXAMPLES = 64
PPL_LENGTHS = (1024, 2048, 4096, 8192, 16384)
PPL_MIN_BYTES = 50_000
FILL_TRIES = 16  # file orders tried before a haystack length is refused as too short for the code's blocks
POSITION_SLACK = 0.02  # the key lands within this fraction of the haystack of its relative position
ANSWER_TOKENS = 4  # greedy tokens generated after `assert my_function() == `: the two digits and some slack
# what its resumed results depend on
KEY_RETRIEVAL_RUN_KEYS = ("task", "model", "seed", "data_dir", "quantize", "dtype")


def code_files(root: str | Path | None = None, min_bytes: int = 2000) -> list[Path]:
    """Python source files to build haystacks from: `root` if given, else the standard library."""
    base = Path(root) if root else Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in base.glob("*.py") if p.stat().st_size >= min_bytes)
    if not files:
        raise UserError(f"no Python files of at least {min_bytes} bytes in {base}; pass --data-dir with code files")
    return files


class Haystack:
    """Real code cut into top-level blocks (each file split before its top-level defs and classes, found
    with `ast`, so any block boundary is a valid place to insert a function), token-counted once."""

    def __init__(self, tokenizer, files: list[Path]):
        self.tok = tokenizer
        self.files = files
        self._blocks: dict[Path, list[tuple[str, int]]] = {}

    def ntok(self, text: str) -> int:
        return len(self.tok.encode(text))

    def blocks(self, path: Path) -> list[tuple[str, int]]:
        if path not in self._blocks:
            text = path.read_text(encoding="utf-8", errors="replace").rstrip("\n") + "\n\n"
            try:
                tree = ast.parse(text)
                starts = sorted({min([n.lineno, *(d.lineno for d in getattr(n, "decorator_list", []))]) - 1
                                 for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))})
            except (SyntaxError, ValueError):
                self._blocks[path] = []  # not valid Python (here): not used
                return []
            lines = text.splitlines(keepends=True)
            cuts = [0, *[i for i in starts if i > 0], len(lines)]
            pieces = ["".join(lines[a:b]) for a, b in zip(cuts, cuts[1:]) if b > a]
            self._blocks[path] = [(p, self.ntok(p)) for p in pieces]
        return self._blocks[path]

    def room(self, length: int, key: str = KEY_FUNCTION.format(value=10) + "\n\n") -> int:
        """Tokens left for the haystack in a prompt of `length`; UserError when the key and the question alone
        are longer (such a prompt was built all the same and scored under `length`: `--lengths 8,16` meant
        as thousands reported 100% at "8 tokens")."""
        budget = length - self.ntok(key) - self.ntok(QUESTION)
        if budget <= 0:
            raise UserError(f"--lengths {length} leaves no room for a haystack: the key function and the question "
                            f"alone take {length - budget} tokens; lengths count tokens (the paper's 8000,16000,24000)")
        return budget

    def build(self, length: int, position: float, value: int, rng: random.Random) -> tuple[str, float]:
        """(prompt, actual relative position): about `length` tokens (never more) with the key function at a
        block boundary within POSITION_SLACK of relative `position`. A block that would carry the haystack
        past that point by more ends its file there (a file's trailing blocks may be dropped, never its head:
        imports, globals) and the haystack goes on with the next file: a large class no longer puts the key
        far from where it was asked (0.5 came out anywhere from 0.18 to 0.82)."""
        key = KEY_FUNCTION.format(value=value) + "\n\n"
        budget = self.room(length, key)
        target, slack = position * budget, POSITION_SLACK * budget
        for _ in range(FILL_TRIES):  # a short haystack can miss its budget in one file order and fit in another
            order = self.files[:]
            rng.shuffle(order)
            chunks, at, total = self._fill(order, budget, target, slack)
            if total >= budget * 0.9:
                break
        else:
            raise UserError(f"could not fill a {length}-token haystack with whole top-level blocks of code: too short "
                            "for the files' blocks (use --lengths of 1000 or more), or too little code (--data-dir)")
        at = len(chunks) if at is None else at
        texts = [t for t, _ in chunks]
        head = "".join(texts[:at])
        if head and not head.endswith("\n\n"):
            head = head.rstrip("\n") + "\n\n"
        return head + key + "".join(texts[at:]).rstrip("\n") + QUESTION, sum(n for _, n in chunks[:at]) / max(total, 1)

    def _fill(self, order: list[Path], budget: int, target: float, slack: float):
        """(chunks, how many precede the key or None, their tokens) for one file order."""
        chunks: list[tuple[str, int]] = []
        total, at = 0, None  # at: how many chunks precede the key
        for path in order:
            blocks = self.blocks(path)
            for i, (text, n) in enumerate(blocks):
                if at is None and total + n > target:
                    if target - total > slack:
                        break
                    at = len(chunks)
                if total + n > budget:
                    break
                chunks.append((text if i < len(blocks) - 1 else text.rstrip("\n") + "\n\n", n))
                total += n
            if total >= budget * 0.98:
                break
        return chunks, at, total


def parse_answer(completion: str) -> int | None:
    m = re.match(r"\s*\(?\s*(-?\d+)", completion)
    return int(m.group(1)) if m else None


def key_retrieval(model, tokenizer, out: Path, lengths=DEFAULT_LENGTHS, positions=DEFAULT_POSITIONS,
                  examples: int = DEFAULT_EXAMPLES, seed: int = 0, files: list[Path] | None = None,
                  batch_size: int = 1, progress: bool = True, plot: bool = True) -> dict:
    """Accuracy per (length, position); resumable via out/results.jsonl."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    res_path = out / "results.jsonl"
    repair_tail(res_path)
    done = {r["task_id"]: r for r in read_jsonl_tolerant(res_path)}
    hay = Haystack(tokenizer, files or code_files())
    for length in lengths:  # before any example runs
        hay.room(length)
    jobs = []
    for length in lengths:
        for pos in positions:
            for i in range(examples):
                tid = f"L{length}/P{pos:g}/{i}"
                if tid not in done:
                    rng = random.Random(f"{seed}/{length}/{pos}/{i}")
                    jobs.append((tid, length, pos, rng.randint(10, 99), rng))
    bar = tqdm(total=len(jobs), desc="key retrieval", disable=not progress or not jobs)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        built = [hay.build(length, pos, value, rng) for _, length, pos, value, rng in chunk]
        answers = model.complete([b[0] for b in built], max_new_tokens=ANSWER_TOKENS, temperature=0.0, stop=("\n",))
        rows = [{"task_id": tid, "length": length, "position": pos, "actual_position": round(b[1], 4),
                 "value": value, "completion": a, "passed": parse_answer(a) == value}
                for (tid, length, pos, value, _), b, a in zip(chunk, built, answers)]
        append_jsonl(res_path, rows)
        done.update({r["task_id"]: r for r in rows})
        bar.update(len(chunk))
    bar.close()
    table: dict[tuple[int, float], float] = {}
    for length in lengths:
        for pos in positions:
            # this run's examples only: a rerun with fewer (--examples, --limit) reported those of the longer run
            wanted = {f"L{length}/P{pos:g}/{i}" for i in range(examples)}
            rows = [r for tid, r in done.items() if tid in wanted]
            if rows:
                table[(length, pos)] = sum(r["passed"] for r in rows) / len(rows)
    from codellama.eval.plots import plot_heatmap

    png = plot_heatmap(table, out / "key_retrieval.png", "key retrieval accuracy") if plot else None
    summary = {"task": "long-context-key-retrieval", "examples": examples,
               "accuracy": {f"{n}/{p:g}": acc for (n, p), acc in table.items()}, "plot": png,
               "report": format_grid(table, "accuracy %", lambda v: f"{100 * v:.1f}")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_grid(table: dict[tuple[int, float], float], what: str, fmt) -> str:
    lengths = sorted({k[0] for k in table})
    positions = sorted({k[1] for k in table})
    head = [f"{what} / position", *[f"{p:g}" for p in positions]]
    body = [[f"{n} tokens", *[fmt(table[(n, p)]) if (n, p) in table else "-" for p in positions]] for n in lengths]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    return "\n".join("  ".join(v.rjust(x) for v, x in zip(r, w)) for r in [head, *body])


# ------------------------------------------------------------------------------------------ perplexity
def token_nll(model, tokens: list[int], chunk: int = 1024) -> list[float]:
    """Negative log-likelihood of tokens[1:] given their prefix, computed chunk by chunk through the KV
    cache so that no [T, vocab] logits tensor for the whole file is ever materialised."""
    import torch

    device = model.output.weight.device
    ids = torch.tensor(tokens, device=device)
    model.setup_cache(1, len(tokens))
    nll: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(tokens) - 1, chunk):
            end = min(start + chunk, len(tokens) - 1)
            x = ids[start:end][None]  # [1, c]
            pos = torch.arange(start, end, device=device)[None]  # [1, c]
            logits = model(x, input_pos=pos)[0]  # [c, V] float32
            target = ids[start + 1 : end + 1]
            nll.extend(torch.nn.functional.cross_entropy(logits, target, reduction="none").tolist())
    return nll


def perplexity_vs_length(model, tokenizer, out: Path, lengths=PPL_LENGTHS, files: list[Path] | None = None,
                         max_files: int = 8, progress: bool = True) -> dict:
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    files = files or code_files(min_bytes=PPL_MIN_BYTES)
    top = max(lengths)
    seqs = []
    for path in files:
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= top + 1:
            seqs.append((path, ids[: top + 1]))
        if len(seqs) == max_files:
            break
    if not seqs:
        lengths = [n for n in lengths if any(len(tokenizer.encode(p.read_text(errors="replace"))) > n for p in files[:max_files])]
        raise UserError(f"no code file has {top + 1} tokens; pass --lengths with smaller values"
                        + (f" (e.g. {','.join(map(str, lengths))})" if lengths else ""))
    sums = [0.0] * top
    for path, ids in tqdm(seqs, desc="perplexity", disable=not progress):
        for i, v in enumerate(token_nll(model, ids)):
            sums[i] += v
    mean = [s / len(seqs) for s in sums]  # per position, averaged over files
    table = {}
    acc = 0.0
    for i, v in enumerate(mean):
        acc += v
        if i + 1 in lengths:
            table[i + 1] = math.exp(acc / (i + 1))
    from codellama.eval.plots import plot_curve

    xs = sorted(table)
    plot = plot_curve(xs, [table[x] for x in xs], out / "perplexity_vs_length.png", "perplexity against context",
                      "context length (tokens)", "perplexity")
    report = "\n".join(["tokens  perplexity", *[f"{n:>6}  {table[n]:.4f}" for n in xs]])
    summary = {"task": "perplexity-vs-length", "files": [str(p) for p, _ in seqs],
               "perplexity": {str(n): table[n] for n in xs}, "plot": plot, "report": report}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_options(extra: dict) -> None:
    """Before the model loads: --examples 0 meant the default 64, a negative count a matplotlib traceback."""
    examples, positions = extra.get("examples"), extra.get("positions")
    if examples is not None and examples < 1:
        raise UserError(f"--examples must be >= 1, got {examples}")
    if positions is not None and any(not 0 <= p <= 1 for p in positions):
        raise UserError(f"--positions are relative positions between 0 and 1 (0.5: the middle), got "
                        f"{','.join(f'{p:g}' for p in positions)}")


def allow_context(generator, context: int) -> None:
    """Let the generator take prompts of `context` tokens. `codellama eval` loads one model for all its tasks,
    with the model's own context, which refused the lengths past it that these tasks are about (Tab. 17's
    24k tokens on Code Llama, trained at 16k). Past the context the model was trained for, it says so."""
    from codellama.generate import warn_past_trained_context

    if getattr(generator, "context_len", context) < context:
        warn_past_trained_context(context, generator.model.config, "a context of")
        generator.context_len = context


def run_special(cfg, model=None) -> dict:
    """Entry point from the runner for the tasks that do not execute programs."""
    from codellama.eval.runner import ModelAdapter, check_same_run

    if cfg.phase == "execute":
        raise UserError(f"{cfg.task} has no execution phase; run it with --phase all")
    _check_options(cfg.extra)
    key_retrieval_task = cfg.task == "long-context-key-retrieval"
    lengths = cfg.extra.get("lengths") or (DEFAULT_LENGTHS if key_retrieval_task else PPL_LENGTHS)
    # the point is to go past the context a model was trained at (Tab. 17: 24k tokens on Code Llama's 16k;
    # RoPE has no length limit): the model's own context would refuse those prompts
    context = max(lengths) + 64  # + BOS, the answer and a margin
    model = model or ModelAdapter.for_config(cfg, max_seq_len=context)
    allow_context(model.generator, context)
    tok = model.tokenizer
    if tok is None:
        raise UserError(f"{cfg.task} needs a model with a tokenizer")
    files = code_files(cfg.data_dir, min_bytes=PPL_MIN_BYTES if cfg.task == "perplexity-vs-length" else 2000) \
        if cfg.data_dir else None
    if key_retrieval_task:
        # its results resume: those of another model or haystack must not be counted as this one's
        cfg.out.mkdir(parents=True, exist_ok=True)
        check_same_run(cfg, cfg.out / "results.jsonl", KEY_RETRIEVAL_RUN_KEYS)
        # one prompt at a time whatever --batch-size: the KV cache holds batch x length positions (8 x 24k
        # on the 7B in float16: 100 GB), for a batch that would only share 4 decode steps after the prefills;
        # and each answer is saved as it comes
        s = key_retrieval(model, tok, cfg.out, lengths, cfg.extra.get("positions") or DEFAULT_POSITIONS,
                          cfg.extra.get("examples") or (cfg.limit or DEFAULT_EXAMPLES), cfg.seed, files,
                          batch_size=1, progress=cfg.progress)
    else:
        gen = model.generator
        s = perplexity_vs_length(gen.model, tok, cfg.out, lengths, files,
                                 max_files=cfg.limit or 8, progress=cfg.progress)
    # which model, as the other tasks' summaries say
    s = {"task": s["task"], "model": cfg.model or "default", "quantize": cfg.quantize, "dtype": cfg.dtype, **s}
    (cfg.out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
    return s

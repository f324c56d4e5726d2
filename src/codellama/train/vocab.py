"""Adding the four infilling tokens (▁<PRE> ▁<SUF> ▁<MID> ▁<EOT>, spec 4.3) to a model whose vocabulary
lacks them, e.g. SmolLM2 or Llama 2's 32000 pieces.

New embedding (and output) rows start at the mean of the existing rows plus a little noise:
- the mean keeps the new tokens inside the region the model's layers were trained on; random rows with
  the init std are far from every trained embedding and can have large norms;
- for the output layer, a mean row gives a new token the average logit, so before any training the model's
  next-token distribution barely moves (Hewitt 2021, "Initializing new word embeddings"): the new tokens
  are not predicted out of the blue and the language-model loss does not jump;
- the noise (1% of the rows' std) breaks the symmetry between the four new tokens so they can learn apart.
"""

from __future__ import annotations

import torch
from torch import nn

from codellama.errors import UserError
from codellama.model import Transformer
from codellama.tokenizer import Tokenizer, add_infill_tokens


@torch.no_grad()
def _grow_rows(weight: torch.Tensor, new_rows: int, generator: torch.Generator) -> torch.Tensor:
    """weight [V, D] -> [V + new_rows, D], new rows = mean + N(0, (0.01 * std)^2)."""
    w = weight.float()
    mean, std = w.mean(0), w.std(0)  # [D]
    noise = torch.randn(new_rows, w.shape[1], generator=generator) * (0.01 * std)
    return torch.cat([w, mean + noise]).to(weight.dtype)


@torch.no_grad()
def resize_vocab(model: Transformer, new_vocab: int, seed: int = 0) -> None:
    """Grow the model's vocabulary to `new_vocab` in place (embedding and output, tied or not)."""
    old = model.config.vocab_size
    if new_vocab < old:
        raise UserError(f"cannot shrink the vocabulary from {old} to {new_vocab}")
    if new_vocab == old:
        return
    g = torch.Generator().manual_seed(seed)
    emb = _grow_rows(model.tok_embeddings.weight.cpu(), new_vocab - old, g)
    device = model.tok_embeddings.weight.device
    model.tok_embeddings = nn.Embedding(new_vocab, emb.shape[1], device=device, dtype=emb.dtype)
    model.tok_embeddings.weight.copy_(emb)
    if model.config.tie_embeddings:
        model.output = nn.Linear(emb.shape[1], new_vocab, bias=False, device=device, dtype=emb.dtype)
        model.output.weight = model.tok_embeddings.weight
    else:
        out = _grow_rows(model.output.weight.cpu(), new_vocab - old, g)
        model.output = nn.Linear(out.shape[1], new_vocab, bias=False, device=device, dtype=out.dtype)
        model.output.weight.copy_(out)
    model.config = model.config.replace(vocab_size=new_vocab)  # not the caller's config: it may be shared


def ensure_infill_tokens(model: Transformer, tokenizer: Tokenizer | None, seed: int = 0) -> Tokenizer:
    """Give tokenizer and model the four infilling tokens when the tokenizer lacks them; returns the
    (possibly new) tokenizer. The tokenizer side is codellama.tokenizer.add_infill_tokens."""
    if tokenizer is None:
        raise UserError("model.add_infill_tokens needs a tokenizer: the checkpoint has none; set model.tokenizer")
    if tokenizer.can_infill:
        if max(tokenizer.prefix_id, tokenizer.suffix_id, tokenizer.middle_id, tokenizer.eot_id) >= \
                model.config.vocab_size:
            resize_vocab(model, tokenizer.vocab_size, seed)
        return tokenizer
    tokenizer = add_infill_tokens(tokenizer)
    resize_vocab(model, max(tokenizer.vocab_size, model.config.vocab_size), seed)
    return tokenizer

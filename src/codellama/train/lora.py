"""LoRA (Hu et al., 2021): fine-tune a loaded model through low-rank adapters, its own weights frozen.

Each targeted projection W [out, in] of the blocks gets A [r, in] and B [out, r] and computes
y = x W^T + (alpha / r) * dropout(x) A^T B^T. B starts at zero, so training starts from the loaded model's
exact outputs; only A and B (about 2 r (in + out) numbers per projection) get gradients and AdamW moments,
which is what lets a 7B be fine-tuned on one GPU.

The base weight keeps its name (`layers.0.attention.wq.weight`) and the adapter sits beside it
(`...wq.lora_a`, `...wq.lora_b`, `...wq.lora_scale`), so training checkpoints resume like any other; a
checkpoint's tensors become a plain model's by merge_lora_tensors (W + scale * B A), which both the
Hugging Face export and loading a run directory as a model use.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from codellama.errors import UserError
from codellama.train.distributed import named_generator

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # the attention's and the feed-forward's projections
ADAPTER_KEYS = ("lora_a", "lora_b", "lora_scale")


class LoRALinear(nn.Module):
    """A frozen bias-free linear layer plus a trainable low-rank update (module docstring)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same Parameter: nothing copied
        self.weight.requires_grad_(False)
        a = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # nn.Linear's own initialisation
        self.lora_a = nn.Parameter(a.to(device=self.weight.device, dtype=self.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device,
                                               dtype=self.weight.dtype))
        self.register_buffer("lora_scale", torch.tensor(alpha / rank, device=self.weight.device))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., in] -> [..., out]; the update as two thin matmuls, never a [out, in] matrix
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return F.linear(x, self.weight) + update * self.lora_scale.to(update.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.lora_a.shape[0]}, scale={float(self.lora_scale):g}"


def check_targets(targets: list[str]) -> None:
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown or not targets:
        raise UserError(f"model.lora.targets: {', '.join(unknown) or 'empty'}; choose among {', '.join(TARGETS)}")


@torch.no_grad()
def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str], seed: int) -> int:
    """Freeze every parameter of `model` and wrap the targeted projections of its blocks in LoRALinear
    (in place); returns the number of trainable parameters. Each A is drawn from a generator seeded by
    (seed, name), so every rank of a distributed run draws the same adapters."""
    check_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if name.rpartition(".")[2] in targets and isinstance(module, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            g = named_generator(seed, name)
            setattr(model.get_submodule(parent_name), attr, LoRALinear(module, rank, alpha, dropout, g))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with adapters -> the plain model's: each adapted weight W + scale * B A (in float32,
    then W's dtype), the adapter's own entries dropped. A state dict without adapters comes back as it is."""
    out = dict(tensors)
    for key in [k for k in tensors if k.rpartition(".")[2] == "lora_a"]:
        prefix = key[: -len("lora_a")]
        a, b, scale = (out.pop(prefix + k) for k in ADAPTER_KEYS)
        w = out[prefix + "weight"]
        out[prefix + "weight"] = (w.float() + float(scale) * (b.float() @ a.float())).to(w.dtype)
    return out

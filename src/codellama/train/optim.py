"""AdamW and the paper's learning-rate schedule (spec 4.4): linear warm-up, cosine down to peak/30."""

from __future__ import annotations

import math

import torch
from torch import nn

from codellama.train.config import OptimSection


def lr_at(step: int, total_steps: int, o: OptimSection) -> float:
    """Learning rate for optimizer step `step` (0-based, the run's last is total_steps - 1): warm-up reaches
    the peak at step warmup-1, then a half cosine reaches lr/final_lr_div at the last step (and stays there)."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    peak_step = max(o.warmup_steps - 1, 0)
    final = o.lr / o.final_lr_div
    progress = min(1.0, (step - peak_step) / max(1, total_steps - 1 - peak_step))
    return final + 0.5 * (o.lr - final) * (1 + math.cos(math.pi * progress))


def group_settings(o: OptimSection) -> list[dict]:
    """AdamW's settings for each parameter group: matrices (projections, embeddings), then norm gains,
    which are not decayed."""
    common = {"betas": tuple(o.betas), "eps": o.eps}
    return [{"weight_decay": o.weight_decay, **common}, {"weight_decay": 0.0, **common}]


def build_optimizer(model: nn.Module, o: OptimSection) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": ps, **g} for ps, g in zip((decay, no_decay), group_settings(o))]
    # foreach: one fused kernel launch per group; works with FSDP2's DTensor parameters too
    return torch.optim.AdamW(groups, lr=o.lr, foreach=True)


def apply_recipe_settings(optimizer: torch.optim.Optimizer, o: OptimSection) -> list[str]:
    """Set the recipe's betas, eps and weight decay on an optimizer restored from a checkpoint, which
    brought back the settings it was saved with; returns what changed ("eps 1e-08 -> 1e-06"), once each."""
    changes: list[str] = []
    for group, want in zip(optimizer.param_groups, group_settings(o)):
        for key, value in want.items():
            old = tuple(group[key]) if key == "betas" else group[key]
            if old != value:
                group[key] = value
                if (change := f"{key} {old} -> {value}") not in changes:
                    changes.append(change)
    return changes


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

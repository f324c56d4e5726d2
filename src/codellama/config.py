"""Model configuration: one dataclass for every Llama-family shape, and the named presets."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass


def warn_default_theta(vocab_size: int | None, source: str) -> None:
    """A Code Llama vocabulary (32016 pieces) whose checkpoint gives no RoPE theta: the 10000 default is most
    likely wrong (early conversions dropped rope_theta: transformers < 4.33, llama.cpp #3090; spec 1.5, 6.10)."""
    if vocab_size == 32016:
        warnings.warn(f"{source} gives no RoPE theta, so Llama 2's 10000 is used; Code Llama 7B/13B/34B and 70B "
                      "base were trained with 1000000 and degrade with 10000 (old conversions dropped it): add "
                      "rope_theta 1000000 if this is one of them", stacklevel=2)


def llama_ffn_hidden(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden size: int(2/3 * 4*dim), times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama 2 / Code Llama transformer.

    Names follow Meta's params.json; `from_hf`/`to_hf` translate to Hugging Face config.json.
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: multi-head attention (n_kv_heads == n_heads)
    vocab_size: int = 32016
    ffn_hidden: int | None = None  # None: derived from multiple_of / ffn_dim_multiplier (Meta's rule)
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: float = 1.0  # linear position interpolation factor (positions are divided by it)
    max_seq_len: int = 4096  # context the model was trained for (HF max_position_embeddings)
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: dim // n_heads
    bos_id: int | None = 1
    eos_id: int | None = 2
    name: str = ""

    def __post_init__(self) -> None:
        # a checkpoint's config.json / params.json / GGUF metadata with a wrong value was a TypeError or a
        # reshape error deep in loading; the callers turn this ValueError into one naming their file
        optional = ("n_kv_heads", "ffn_hidden", "head_dim")  # None: derived below
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", *optional):
            value = getattr(self, name)
            if (value is not None or name not in optional) and (isinstance(value, bool) or not isinstance(value, int)
                                                                or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._check_numbers()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}), or head_dim given")
            self.head_dim = self.dim // self.n_heads
        if self.ffn_hidden is None:
            self.ffn_hidden = llama_ffn_hidden(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    def _check_numbers(self) -> None:
        """The float fields and multiple_of: a string or null norm eps was a format error in `info` and a
        traceback from RMSNorm, multiple_of 0 a ZeroDivisionError, theta or scaling 0 a model of NaNs."""
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name, low in (("norm_eps", "non-negative"), ("rope_theta", "positive"), ("rope_scaling", "positive")):
            value = getattr(self, name)
            if not number(value) or value < 0 or (low == "positive" and value == 0):
                raise ValueError(f"{name} must be a {low} number, got {value!r}")
        if self.ffn_hidden is None:  # only then are these used (Meta's rule, llama_ffn_hidden)
            if isinstance(self.multiple_of, bool) or not isinstance(self.multiple_of, int) or self.multiple_of < 1:
                raise ValueError(f"multiple_of must be a positive integer, got {self.multiple_of!r}")
            mult = self.ffn_dim_multiplier
            if mult is not None and (not number(mult) or mult <= 0):
                raise ValueError(f"ffn_dim_multiplier must be a positive number or null, got {mult!r}")

    @property
    def n_rep(self) -> int:
        """Query heads served by each key/value head (1 = MHA)."""
        return self.n_heads // self.n_kv_heads

    def num_params(self, include_embeddings: bool = True) -> int:
        d, hd, F = self.dim, self.head_dim, self.ffn_hidden
        attn = d * self.n_heads * hd * 2 + 2 * d * self.n_kv_heads * hd
        per_layer = attn + 3 * d * F + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + d + (emb if include_embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N + 12 * layers * dim * seq (the PaLM/nanoGPT formula)."""
        return 6 * self.num_params(include_embeddings=False) + 12 * self.n_layers * self.dim * seq_len

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, hf: dict) -> ModelConfig:
        # transformers >= 5 writes the scaling (and theta) into rope_parameters instead of rope_scaling
        scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if not isinstance(scaling, dict):
            raise ValueError(f"rope_scaling must be an object with rope_type and factor, got {scaling!r}")
        factor = 1.0
        if scaling:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind not in ("linear", "default"):
                raise ValueError(f"unsupported rope_scaling type {kind!r}: only 'linear' is implemented")
            factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
        theta = hf.get("rope_theta")
        if theta is None:  # transformers >= 5 nests it in rope_parameters
            theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        eos = hf.get("eos_token_id", 2)
        if isinstance(eos, list):  # several end ids (the tokenizer reads them all); [] was an IndexError
            eos = eos[0] if eos else None
        n_heads = hf["num_attention_heads"]
        return cls(
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            vocab_size=hf["vocab_size"],
            ffn_hidden=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=factor,
            max_seq_len=hf.get("max_position_embeddings", 4096),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            head_dim=hf.get("head_dim"),  # None: dim // n_heads, checked
            bos_id=hf.get("bos_token_id", 1),
            eos_id=eos,
            name=hf.get("_name_or_path", ""),
        )

    def to_hf(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.ffn_hidden,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": "linear", "factor": self.rope_scaling} if self.rope_scaling != 1.0 else None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "attention_bias": False,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            "torch_dtype": "float16",
        }

    # ---- Meta params.json ----
    @classmethod
    def from_meta(cls, params: dict, vocab_size: int) -> ModelConfig:
        if params.get("use_scaled_rope"):  # ignoring it would load plain RoPE: other logits past 8k tokens
            raise ValueError("use_scaled_rope (Llama 3.1's RoPE frequency scaling) is not supported")
        theta = float(params.get("rope_theta", 10000.0))
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=params.get("vocab_size", -1) if params.get("vocab_size", -1) > 0 else vocab_size,
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=theta,
            # same rule as transformers' converter: raised theta means a 16k Code Llama context
            max_seq_len=16384 if theta > 10000 else 4096,
        )

    def to_meta(self) -> dict:
        out = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
        }
        if self.n_kv_heads != self.n_heads:
            out["n_kv_heads"] = self.n_kv_heads
        return out


def _code_llama(dim: int, n_layers: int, n_heads: int, **kw) -> ModelConfig:
    base = dict(rope_theta=1e6, max_seq_len=16384, norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, **base)


# Named shapes (spec 1.1). `-python` variants drop the 16 infilling pieces (vocab 32000) for 7B/13B.
PRESETS: dict[str, ModelConfig] = {
    "codellama-7b": _code_llama(4096, 32, 32, vocab_size=32016, name="codellama-7b"),
    "codellama-7b-python": _code_llama(4096, 32, 32, vocab_size=32000, name="codellama-7b-python"),
    "codellama-7b-instruct": _code_llama(4096, 32, 32, vocab_size=32016, name="codellama-7b-instruct"),
    "codellama-13b": _code_llama(5120, 40, 40, vocab_size=32016, name="codellama-13b"),
    "codellama-13b-python": _code_llama(5120, 40, 40, vocab_size=32000, name="codellama-13b-python"),
    "codellama-13b-instruct": _code_llama(5120, 40, 40, vocab_size=32016, name="codellama-13b-instruct"),
    "codellama-34b": _code_llama(8192, 48, 64, n_kv_heads=8, vocab_size=32000, name="codellama-34b"),
    "codellama-34b-python": _code_llama(8192, 48, 64, n_kv_heads=8, vocab_size=32000, name="codellama-34b-python"),
    "codellama-34b-instruct": _code_llama(8192, 48, 64, n_kv_heads=8, vocab_size=32000, name="codellama-34b-instruct"),
    "codellama-70b": _code_llama(
        8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, vocab_size=32016, name="codellama-70b"
    ),
    # 70B Python and Instruct kept Llama 2's theta 1e4 and a 4k context (maintainer answer, spec 1.1 / I#188)
    "codellama-70b-python": _code_llama(
        8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, vocab_size=32016,
        rope_theta=1e4, max_seq_len=4096, name="codellama-70b-python",
    ),
    "codellama-70b-instruct": _code_llama(
        8192, 80, 64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3, vocab_size=32016,
        rope_theta=1e4, max_seq_len=4096, name="codellama-70b-instruct",
    ),
    "smollm2-135m": ModelConfig(
        dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_hidden=1536, norm_eps=1e-5,
        rope_theta=1e5, max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_id=2, name="smollm2-135m",
    ),
    # ~1B shape for training benchmarks (SmolLM2-1.7B-like, narrower)
    "llama-1b": ModelConfig(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=32016, ffn_hidden=5632, rope_theta=1e6,
        max_seq_len=4096, name="llama-1b",
    ),
    # for tests: every feature (GQA, theta 1e6) at a size that runs in milliseconds
    "tiny": ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=32016, ffn_hidden=160, rope_theta=1e6,
        max_seq_len=512, name="tiny",
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return dataclasses.replace(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


# How an inference model holds its linear layers (generate.load_for_inference says what each means); here,
# not there, so that the command line lists them without importing torch.
QUANTIZE_CHOICES = ("auto", "none", "int8", "int4")
DTYPE_CHOICES = ("float32", "bfloat16", "float16")  # the weights' dtypes a command line may ask for

"""Weight-only quantisation of the linear layers: int8 per output channel, int4 in groups of 32, and int8 in
groups of 16 or 32 (a GGUF's other block types).

Decoding reads every weight once per token, so fewer bytes per weight is speed. On the CPU a small C++
kernel (csrc/qlinear.cpp, AVX2 + FMA, see engine/kernels.py) multiplies float32 activations by the
quantised weights directly (for prefill's many rows it widens them a few MB at a time for torch's GEMM);
where the CPU has AVX-512 VNNI, every layout multiplies activations rounded to int8 per 32 values instead
(csrc/qlinear_q8.cpp, as llama.cpp does), its codes packed once for those kernels (QuantLinear.pack,
done by generate.load_for_inference on the CPU);
without a compiler, or on a GPU, the weights are widened and multiplied with F.linear (on a GPU that is
gpt-fast's int8 formulation; compiled without tuning it decoded the 7B shape at 89 tok/s against
bfloat16's 184 in the same run on an H200: memory, not speed; the compiled step now uses gpt-fast's
coordinate-descent tuning for it, not yet measured).

quantize() leaves the embedding table in floating point (a lookup reads one row) and gives a tied output
projection its own quantised copy; a GGUF's quantised table, kept as codes, is a QuantEmbedding whose rows
are widened as they are looked up (and a tied output projection uses the same codes). A quantised model is
for inference only.

Four layouts (QuantLinear.mode), each w = code * scale + min over a group of weights of a row:
- "int8": our quantiser's, symmetric per output row (min 0; gpt-fast's);
- "int4": ggml's Q4_1, 4-bit codes per 32 weights, which also holds Q4_0 and Q4_K exactly;
- "int8s": int8 codes with a scale (min 0) per 16 or 32 weights, which holds the ggml types without a
  minimum exactly: Q8_0, Q5_0 and IQ4_NL (blocks of 32), IQ4_XS (sub-blocks of 32), Q6_K and Q3_K (of 16),
  at 8.5 to 10 bits per weight (the IQ4 types' codes index 16 int8 levels); the scales are float16 where
  all of a layer's are exactly so (Q8_0, Q5_0, IQ4_NL: the file's own), else float32 (int8s_scales);
- "int8g": int8 codes with a scale and a min per 16 weights, which holds those with one (Q5_1, Q5_K,
  Q2_K) and any mix of the layouts above (a fused layer of matrices stored in different types): 12 bits.
A GGUF's quantised matrices load straight into QuantLinear as QuantCodes (checkpoints/gguf.py, keep_codes),
so they run with the file's very values, as llama.cpp runs them, instead of being widened to floats.

Accuracy (tests/test_engine_quant.py, random-weight models): int8 logits within ~1% of their scale and
greedy tokens nearly always the same; int4 within a few percent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from codellama.engine.kernels import cpu_kernels

log = logging.getLogger(__name__)

GROUP = 32  # int4 group size (the kernel's layout assumes 32)
INT8_GROUP = 16  # int8g group size: the smallest (sub-)block of any ggml type (Q6_K, Q3_K, Q2_K)
INT8S_GROUPS = (16, 32)  # int8s group sizes (the kernel's)
MODES = ("int8", "int4", "int8s", "int8g")
PACK_ROWS = 16  # rows per packed block (QuantLinear.pack): the int32 lanes of a 512-bit register
# Up to this many rows the eager model's quantised layers multiply by the kernels' tiles, beyond by a GEMM
# (csrc/kernels.h, TILES_MAX_M: beside torch's threads the tiles lost 3x at 100-256 rows)
EAGER_TILES_MAX_M = 16
# weights quantised at once by quantize_weight: a 7B's output projection in two (its other matrices whole)
QUANTIZE_CHUNK = 1 << 26


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q int8 [N, K], scale float32 [N]) with w ~ q * scale, symmetric per output row."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, G, 32] in 0..15 -> packed uint8 [N, G*16]: byte j of a group holds code j in its low
    nibble and code j + 16 in its high one (ggml's Q4_0/Q4_1 order)."""
    N, G, _ = q.shape
    return (q[..., :16] | (q[..., 16:] << 4)).reshape(N, G * 16).contiguous()


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (packed uint8 [N, K/2], scale/min float32 [N, K/32, 2]), w ~ q * scale + min, q in 0..15."""
    N, K = w.shape
    g = w.float().view(N, K // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q), torch.stack((scale, lo), dim=-1).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, G*16] -> codes uint8 [N, G, 32] (pack_int4's inverse)."""
    b = packed.view(packed.shape[0], -1, 16)
    return torch.cat((b & 0x0F, b >> 4), dim=-1)


def dequantize_int4(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K/2], scale/min float32 [N, K/32, 2] -> float32 [N, K]."""
    q = unpack_int4(packed).float()  # [N, G, 32]
    return (q * sz[..., :1] + sz[..., 1:]).reshape(packed.shape[0], -1)


def dequantize_int8_groups(q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """int8 [N, K], scale/min float32 [N, K/16, 2] -> float32 [N, K]."""
    N, K = q.shape
    return (q.view(N, K // INT8_GROUP, INT8_GROUP).float() * sz[..., :1] + sz[..., 1:]).reshape(N, K)


def dequantize_int8_scaled(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """int8 [N, K], scale float32 or float16 [N, K/G] -> float32 [N, K]."""
    N, K = q.shape
    return (q.view(N, s.shape[1], -1).float() * s.float()[..., None]).reshape(N, K)


def int8s_scales(s: torch.Tensor) -> torch.Tensor:
    """A layer's int8s scales float32 [N, K/G] as float16 when every one is exactly a float16 (bit for bit: a
    Q8_0 file's are), else as they are: half the bytes of scales the kernels read, the same weights."""
    half = s.half()
    return half if torch.equal(half.float().view(torch.int32), s.float().view(torch.int32)) else s


def dequantize_codes(mode: str, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows [N] of codes and their scales in a layout of the module docstring -> float32 [N, K]."""
    if mode == "int8":
        return qweight.float() * scales[:, None]
    if mode == "int8s":
        return dequantize_int8_scaled(qweight, scales)
    if mode == "int8g":
        return dequantize_int8_groups(qweight, scales)
    return dequantize_int4(qweight, scales)


@dataclass
class QuantCodes:
    """A matrix [N, K] held in a QuantLinear layout (see the module docstring), e.g. as a GGUF file stores it."""

    mode: str
    qweight: torch.Tensor  # int8 [N, K] (int8, int8s, int8g) or packed uint8 [N, K/2] (int4)
    # float32 [N] (int8), [N, K/G] (int8s: G = 16 or 32; float16 where exact), [N, K/32, 2] (int4) or
    # [N, K/16, 2] (int8g): scale, min
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * (2 if self.mode == "int4" else 1)


def quantize_weight(w: torch.Tensor, mode: str, device=None, dtype: torch.dtype | None = None) -> QuantCodes:
    """w [N, K] by our int8 or int4 quantiser (int8s and int8g have none: they hold a file's codes), on
    `device` (default: w's), from its values in `dtype` (default: w's)."""
    if mode not in ("int8", "int4"):  # int8g got int4's packed codes, read as int8 codes of half the width
        raise ValueError(f"cannot quantise to {mode!r}: use int8 or int4 (int8s and int8g hold a file's codes only)")
    # A large matrix a few rows at a time (both quantise each row on its own): the float32 temporaries of a
    # whole one are three copies of it, 1.5 GB for a 7B's output projection. Others whole: codes copied out
    # of each chunk's left the freed chunks as holes in the allocator's heap, 2 GB of them after a 7B.
    quantizer, step = quantize_int8 if mode == "int8" else quantize_int4, max(1, QUANTIZE_CHUNK // w.shape[1])
    if step >= w.shape[0]:
        return QuantCodes(mode, *quantizer(w.to(device=device, dtype=dtype)))
    codes = scales = None
    for i in range(0, w.shape[0], step):
        q, s = quantizer(w[i : i + step].to(device=device, dtype=dtype))
        if codes is None:
            codes, scales = q.new_empty((w.shape[0], *q.shape[1:])), s.new_empty((w.shape[0], *s.shape[1:]))
        codes[i : i + step], scales[i : i + step] = q, s
    return QuantCodes(mode, codes, scales)


class QuantLinear(nn.Module):
    """A bias-free nn.Linear with quantised weights (a mode of the module docstring); float activations in and out."""

    def __init__(self, mode: str, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown quantised layout {mode!r}: one of {', '.join(MODES)}")
        self.mode = mode
        self.out_features, self.in_features = QuantCodes(mode, qweight, scales).shape
        if mode == "int8s" and not (scales.dim() == 2 and any(scales.shape[1] * g == self.in_features
                                                              for g in INT8S_GROUPS)):
            raise ValueError(f"int8s scales must be [N, K/G] with G in {INT8S_GROUPS}; got {tuple(scales.shape)} "
                             f"for K = {self.in_features}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.packed = False  # qweight and scales in the kernels' packed order (pack), not the layout's

    def _apply(self, fn, recurse: bool = True) -> QuantLinear:
        # A model-wide .to(dtype) / .half() / .bfloat16() sets the activations' dtype; the codes and their
        # scales stay exactly as they are (rounding scales to bfloat16 would change every weight, and the CPU
        # kernels read float32 or float16 scales only): of such a move only the device applies to them.
        if self.packed and fn(self.scales).device.type != "cpu":  # only the CPU kernels read packed weights
            self.unpack()
        for name in ("qweight", "scales"):
            t = getattr(self, name)
            moved = fn(t)
            setattr(self, name, moved if moved.dtype == t.dtype else t.to(moved.device))
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str) -> QuantLinear:
        """The layer quantised by our int8 or int4 quantiser (int8s and int8g hold a file's codes only)."""
        codes = quantize_weight(linear.weight.detach(), mode)
        return cls(mode, codes.qweight, codes.scales)

    def codes(self, rows: torch.Tensor | None = None) -> QuantCodes:
        """The codes in the layout of the module docstring (a copy where packed): all rows, or those given."""
        if not self.packed:
            return QuantCodes(self.mode, *(t if rows is None else t[rows] for t in (self.qweight, self.scales)))
        if rows is None:
            rows = torch.arange(self.out_features, device=self.qweight.device)
        block, lane = rows // PACK_ROWS, rows % PACK_ROWS  # the lane of row n is n % 16 in block n // 16
        s = self.scales
        scales = s[rows] if s.dim() == 1 else s[block, :, lane] if s.dim() == 3 else s[block, :, :, lane]
        if self.mode == "int4":  # packed as float16 where exact (pack)
            scales = scales.float()
        return QuantCodes(self.mode, self.qweight[block, :, :, lane, :].reshape(len(rows), -1), scales)

    def pack(self) -> bool:
        """Lay the codes and scales out once in the order the CPU kernels' int8-activation tiles read them
        (csrc/qlinear_q8.cpp, PackedBlock) instead of rearranging 16 rows at each call: for each block of 16
        rows and group of 32 weights, the 4-byte pieces of the rows' codes side by side, and their scales
        likewise. The same bytes (int4's scales fewer where float16 holds them), the same results bit for bit.
        Returns whether it packed: only layers of whole blocks and groups (out_features % 16, in_features % 32)."""
        N, K = self.out_features, self.in_features
        if self.packed or N % PACK_ROWS or K % GROUP:
            return self.packed
        B, G = N // PACK_ROWS, K // GROUP
        self.qweight = self.qweight.view(B, PACK_ROWS, G, -1, 4).permute(0, 2, 3, 1, 4).contiguous()
        s = self.scales
        if s.dim() == 3:  # [N, K/GW, 2] -> [B, K/GW, 2, 16]
            s = s.view(B, PACK_ROWS, *s.shape[1:]).permute(0, 2, 3, 1).contiguous()
            # int4 scales and mins that float16 holds exactly (a GGUF's Q4_1 stores them so) as float16: a one-row
            # step reads a sixth fewer bytes per weight (0.625 instead of 0.75)
            self.scales = s.half() if self.mode == "int4" and torch.equal(s.half().float(), s) else s
        elif s.dim() == 2:  # [N, K/GW] -> [B, K/GW, 16]
            self.scales = s.view(B, PACK_ROWS, -1).permute(0, 2, 1).contiguous()
        self.packed = True
        return True

    def unpack(self) -> None:
        """Back to the layout of the module docstring (pack's inverse)."""
        if self.packed:
            codes = self.codes()
            self.qweight, self.scales, self.packed = codes.qweight, codes.scales, False

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights the codes stand for, [out_features, in_features]."""
        c = self.codes()
        return dequantize_codes(c.mode, c.qweight, c.scales).to(dtype)

    @property
    def int8s_group(self) -> int:
        """int8s: the weights per scale (16 or 32)."""
        return self.in_features // self.scales.shape[1]

    def int8_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same weights, exactly, as int8g codes and scales (to stack with a layer of another layout)."""
        N, K = self.out_features, self.in_features
        c = self.codes()
        if self.mode == "int8g":
            return c.qweight, c.scales
        if self.mode in ("int8", "int8s"):  # each group of 16 gets its row's or its group's scale, min 0
            scale = (c.scales[:, None].expand(N, K // INT8_GROUP) if self.mode == "int8"  # int8g's are float32
                     else c.scales.float().repeat_interleave(self.int8s_group // INT8_GROUP, dim=1))
            return c.qweight, torch.stack((scale, torch.zeros_like(scale)), dim=-1)
        codes = unpack_int4(c.qweight).reshape(N, K).to(torch.int8)  # int4: codes 0..15
        return codes, c.scales.repeat_interleave(GROUP // INT8_GROUP, dim=1)  # each group of 32's for its halves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        kernels = None
        on_cpu = x.device.type == "cpu" and x.dtype == torch.float32
        if on_cpu and not torch.compiler.is_compiling():  # a compiled graph cannot call the C++ kernels
            kernels = cpu_kernels()
        if kernels is not None:
            y = kernels.linear(x2.contiguous(), self.qweight, self.scales, EAGER_TILES_MAX_M)
        elif self.mode == "int8" and x.dtype != torch.float16:  # gpt-fast's form (compiled, the widening can
            # fuse into the matmul); in float16, x times the codes (up to 127) before the scale would overflow
            # packed for the kernels, which bfloat16 does not reach: unpacked at every call (load packs float32 only)
            c = self.codes() if self.packed else self
            y = F.linear(x2, c.qweight.to(x.dtype)) * c.scales.to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.mode}"


class QuantEmbedding(nn.Module):
    """An embedding table held as a QuantLinear's codes (a GGUF's token_embd, kept): a lookup widens only
    the rows it reads. A tied output projection is that very QuantLinear, so the table is held once."""

    def __init__(self, table: QuantLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.table, self.dtype = table, dtype  # table [vocab, dim]; dtype: the activations'

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        c = self.table.codes(tokens.reshape(-1))
        rows = dequantize_codes(c.mode, c.qweight, c.scales)  # [len(ids), dim]
        return rows.to(self.dtype).view(*tokens.shape, self.table.in_features)

    def extra_repr(self) -> str:
        return f"{self.table.out_features}, {self.table.in_features}, {self.table.mode}"


def _stack(linears: list[nn.Module]) -> nn.Module:
    """One layer computing the given layers' outputs one after another (their rows stacked).

    Layers quantised alike stack their codes; quantised layers of different layouts (a GGUF storing q and
    k in 4 bits, v in 6; or int8s in groups of 32 beside 16) stack as int8g, which holds each exactly;
    with any floating-point layer among them all are widened to floating point, exactly their values."""
    modes = {m.mode if isinstance(m, QuantLinear) else None for m in linears}
    if len(modes) == 1 and None not in modes and len({m.scales.shape[1:] for m in linears}) == 1:
        codes = [m.codes() for m in linears]
        return QuantLinear(modes.pop(), torch.cat([c.qweight for c in codes]), torch.cat([c.scales for c in codes]))
    if None not in modes and all(m.in_features % INT8_GROUP == 0 for m in linears):
        codes, scales = zip(*(m.int8_groups() for m in linears))
        return QuantLinear("int8g", torch.cat(codes), torch.cat(scales))
    dtype = next((m.weight.dtype for m in linears if isinstance(m, nn.Linear)), torch.float32)
    w = torch.cat([m.dequantized(dtype) if isinstance(m, QuantLinear) else m.weight.detach() for m in linears])
    # the stacked tensor is the layer's weight: a layer made on w's device allocated (and initialised) a second
    # copy, a third one of w1/w3 beside the originals (720 MB more of a GPU at a 34B's layer in bfloat16)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(w)
    return fused


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Stack each layer's wq/wk/wv into one wqkv and w1/w3 into one w13 (in place; inference only).

    The same bytes are read, in 2 matmul calls instead of 5 per layer: decoding small models is dominated
    by per-call overhead as much as by bandwidth.
    """
    for layer in model.layers:
        att, ffn = layer.attention, layer.feed_forward
        if att.wqkv is None:
            att.wqkv = _stack([att.wq, att.wk, att.wv])
            del att.wq, att.wk, att.wv
        if ffn.w13 is None:
            ffn.w13 = _stack([ffn.w1, ffn.w3])
            del ffn.w1, ffn.w3
    return model


@torch.no_grad()
def quantize(model: nn.Module, mode: str = "int8", fuse: bool = True) -> nn.Module:
    """Replace every nn.Linear in the model (in place) by a QuantLinear; returns the model.

    Layers already quantised (a GGUF's matrices kept as codes) are left as they are. fuse: then
    stack q/k/v and w1/w3 (fuse_projections), so each layer makes 4 quantised matmuls, not 7; both schemes
    quantise each output row on its own, so stacking after quantising gives the same codes as before.
    """
    if mode not in ("int8", "int4"):
        raise ValueError(f"unknown quantisation {mode!r}: use int8 or int4 (int8s and int8g hold a file's codes only)")
    if any(p.is_cuda for p in model.parameters()):
        log.warning("%s weights on a GPU save memory but decoded slower than bfloat16 there (BENCHMARKS.md: "
                    "89 vs 184 tok/s for the 7B shape with int8, before the step's tuning); leave "
                    "quantisation off for speed", mode)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if mode == "int4":
        bad = [name for name, m in targets if m.in_features % GROUP]
        if bad:
            raise ValueError(f"int4 needs in_features divisible by {GROUP}; not so for {bad[:3]}")
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, QuantLinear.from_linear(linear, mode))
    if fuse and hasattr(model, "layers"):
        fuse_projections(model)
    return model


def pack_for_int8_activations(model: nn.Module) -> int:
    """Pack every QuantLinear of the model for the CPU kernels' int8-activation tiles (QuantLinear.pack),
    where they run (AVX-512 VNNI); returns how many it packed."""
    kernels = cpu_kernels()
    if kernels is None or not kernels.int8_activations():
        return 0
    return sum(m.pack() for m in model.modules() if isinstance(m, QuantLinear) and m.qweight.device.type == "cpu")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every linear layer's (quantised or not) and the norms."""
    total = 0
    tables = {id(m.table) for m in model.modules() if isinstance(m, QuantEmbedding)}
    tables.discard(id(getattr(model, "output", None)))  # a tied output projection is read whole
    for m in model.modules():
        if id(m) in tables:
            continue
        if isinstance(m, QuantLinear):
            total += m.qweight.numel() * m.qweight.element_size() + m.scales.numel() * m.scales.element_size()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1:  # a norm's
            total += m.weight.numel() * m.weight.element_size()
    return total

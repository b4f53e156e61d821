"""Fewer bytes per weight: weight-only int8 (CPU) or bf16 for the base; LoRA stays in full precision on top.

A decode step on CPU reads every weight once, so its time is bytes / memory bandwidth:
int8 weights (per-output-channel symmetric scales, ``torch.ops.aten._weight_int8pack_mm``,
activations stay float32) read a quarter of float32's bytes. Each ``nn.Linear`` of the base
(the attention and MLP projections and the ``lm_head``) becomes an :class:`Int8Linear`, a
subclass of ``nn.Linear`` so peft still wraps it with LoRA; the LoRA A/B matrices stay
float32 and are added on top (peft keeps adapters in float for non-float base weights).
``bf16`` casts the whole model (weights and activations), useful on CPUs with AVX512-BF16/AMX.

Quality is gated by ``bench/backend.py --int8`` (per-token NLL on each domain's val sample vs float32).

Decode steps (1-4 rows) use expertmix's own int8 product (:mod:`experts.backends.cpu_kernels`)
when it builds: it streams the int8 bytes at memory speed. Without it, torch's CPU
``_weight_int8pack_mm`` is the fallback, which on a 2-core AVX2 EPYC took 0.95 ms for a 1536x576
projection at one row against 0.21 ms for float32 (compute-bound there). Prefill (more rows)
dequantizes the layer and uses MKL's float32 GEMM. Off by default: it changes the numbers (the
bench's NLL gate says by how much).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from expertmix.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["QUANTIZE_MODES", "Int4Linear", "Int8Linear", "quantize_model"]

QUANTIZE_MODES = ("none", "int8", "int4", "bf16")
GROUP = 32  # 4-bit: inputs per (scale, min) pair, as llama.cpp's Q4_1


def _int8_linear_cls() -> type:
    import torch
    from torch import nn

    class Int8Linear(nn.Linear):
        """``nn.Linear`` with int8 weights and one float32 scale per output channel."""

        def __init__(self, src: nn.Linear) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = src.in_features, src.out_features
            w = src.weight.detach().float()
            scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self.weight = nn.Parameter(q, requires_grad=False)
            self.register_buffer("scales", scale.contiguous())
            self.bias = None if src.bias is None else nn.Parameter(src.bias.detach().float(), requires_grad=False)

        kernels: Any = None  # cpu_kernels.Kernels, set by quantize_model when they load

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import torch.nn.functional as F

            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            dt = x2.dtype
            rows = x2.shape[0]
            k = self.kernels
            if k is not None and k.enabled and rows <= 4 and (x.dim() < 3 or shape[-2] == 1):
                y = k.gemv(x2.float(), self.weight, self.scales)  # decode: reads the int8 bytes once
            elif rows > 4:  # prefill: compute-bound; a float32 copy of this layer and MKL's GEMM
                y = F.linear(x2.float(), self.dequantized())
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2.float().contiguous(), self.weight, self.scales)
            if self.bias is not None:
                y = y + self.bias
            return y.to(dt).reshape(*shape[:-1], self.out_features)

        def dequantized(self) -> torch.Tensor:
            return self.weight.float() * self.scales[:, None]

    return Int8Linear


def _int4_linear_cls() -> type:
    import torch
    from torch import nn

    class Int4Linear(nn.Linear):
        """``nn.Linear`` with 4-bit weights: per group of 32 inputs a float16 scale and min
        (``w = scale * q + min``, q in 0..15), two inputs a byte — llama.cpp's Q4_1 layout.

        ``weight`` is ``(out, in/2)`` uint8 (byte k of a group: input k low, input k + 16 high),
        ``scales`` ``(out, in/32, 2)`` float16. Weights that were Q4_1 values (the default base's
        GGUF) come back exactly."""

        def __init__(self, src: nn.Linear) -> None:
            nn.Module.__init__(self)
            self.in_features, self.out_features = src.in_features, src.out_features
            w = src.weight.detach().float().reshape(self.out_features, -1, GROUP)
            lo, hi = w.amin(dim=2), w.amax(dim=2)
            d = ((hi - lo) / 15.0).to(torch.float16)
            m = lo.to(torch.float16)
            df = d.float().clamp(min=1e-12)
            q = torch.round((w - m.float()[..., None]) / df[..., None]).clamp(0, 15).to(torch.uint8)
            packed = q[..., :16] | (q[..., 16:] << 4)
            self.weight = nn.Parameter(packed.reshape(self.out_features, -1).contiguous(), requires_grad=False)
            self.register_buffer("scales", torch.stack([d, m], dim=-1).contiguous())
            self.bias = None if src.bias is None else nn.Parameter(src.bias.detach().float(), requires_grad=False)

        kernels: Any = None  # cpu_kernels.Kernels, set by quantize_model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import torch.nn.functional as F

            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            dt = x2.dtype
            k = self.kernels
            if k is not None and k.enabled and x2.shape[0] <= 4 and (x.dim() < 3 or shape[-2] == 1):
                y = k.gemv(x2.float(), self.weight, self.scales)  # decode: reads the 4-bit bytes once
            else:  # prefill (or no kernels): a float32 copy of this layer and MKL's GEMM
                y = F.linear(x2.float(), self.dequantized())
            if self.bias is not None:
                y = y + self.bias
            return y.to(dt).reshape(*shape[:-1], self.out_features)

        def dequantized(self) -> torch.Tensor:
            if self.kernels is not None:  # ~50x faster than the torch unpack below (prefill calls it per layer)
                return self.kernels.dequantize_q4(self.weight, self.scales)
            b = self.weight.reshape(self.out_features, -1, GROUP // 2)
            q = torch.cat([b & 0x0F, b >> 4], dim=-1).float()
            s = self.scales.float()
            return (q * s[..., :1] + s[..., 1:]).reshape(self.out_features, self.in_features)

    return Int4Linear


_CLS: dict[str, type] = {}


def Int8Linear() -> type:
    if "int8" not in _CLS:
        _CLS["int8"] = _int8_linear_cls()
    return _CLS["int8"]


def Int4Linear() -> type:
    if "int4" not in _CLS:
        _CLS["int4"] = _int4_linear_cls()
    return _CLS["int4"]


def quantize_model(model: Any, mode: str, *, device: str = "cpu") -> int:
    """Quantize ``model`` in place; returns the number of linear layers converted (0 for bf16/none)."""
    import torch
    from torch import nn

    if mode == "none":
        return 0
    if mode == "bf16":
        model.to(torch.bfloat16)
        return 0
    if mode not in ("int8", "int4"):
        raise ModelError(f"unknown quantize mode {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if not device.startswith("cpu"):
        raise ModelError(f"quantize = \"{mode}\" is a CPU path; on {device} use dtype = \"bfloat16\" (or vLLM)")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise ModelError(f"quantize = \"{mode}\" needs torch >= 2.3 (this is {torch.__version__})")
    from experts.backends import cpu_kernels

    kernels = cpu_kernels.load()
    if mode == "int4" and kernels is None:
        raise ModelError("quantize = \"int4\" needs expertmix's CPU kernels (an x86-64 CPU with AVX2/FMA/F16C and "
                         f"a C compiler): {cpu_kernels.unavailable_reason()}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # int4: every projection whose inputs split into groups of 32; the lm_head (and any other
        # layer) int8, as llama.cpp keeps the output/embedding matrix at 8 bits
        four = mode == "int4" and mod is not head and mod.in_features % GROUP == 0
        q = (Int4Linear() if four else Int8Linear())(mod)
        q.kernels = kernels
        setattr(parent, child, q)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # lm_head now has its own (int8) weight
    return len(targets)

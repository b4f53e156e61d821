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

__all__ = ["QUANTIZE_MODES", "Int8Linear", "quantize_model"]

QUANTIZE_MODES = ("none", "int8", "bf16")


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


_CLS: dict[str, type] = {}


def Int8Linear() -> type:
    if "int8" not in _CLS:
        _CLS["int8"] = _int8_linear_cls()
    return _CLS["int8"]


def quantize_model(model: Any, mode: str, *, device: str = "cpu") -> int:
    """Quantize ``model`` in place; returns the number of linear layers converted (0 for bf16/none)."""
    import torch
    from torch import nn

    if mode == "none":
        return 0
    if mode == "bf16":
        model.to(torch.bfloat16)
        return 0
    if mode != "int8":
        raise ModelError(f"unknown quantize mode {mode!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if not device.startswith("cpu"):
        raise ModelError(f"quantize = \"int8\" is a CPU path; on {device} use dtype = \"bfloat16\" (or vLLM)")
    if not hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        raise ModelError(f"quantize = \"int8\" needs torch >= 2.3 (this is {torch.__version__})")
    from experts.backends import cpu_kernels

    cls = Int8Linear()
    kernels = cpu_kernels.load()
    targets = [(name, mod) for name, mod in model.named_modules() if type(mod) is nn.Linear]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = cls(mod)
        q.kernels = kernels
        setattr(parent, child, q)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # lm_head now has its own (int8) weight
    return len(targets)

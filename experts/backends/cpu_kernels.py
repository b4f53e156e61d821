"""A bandwidth-bound small-row product for CPU decode steps, built from C at first use.

A decode step multiplies 1-4 rows of activations by every weight once, so its speed is how fast
the weights stream from memory. On the 2-core AVX2 EPYC this was measured on, two cores read
~17 GB/s, but MKL's products on SmolLM2's projections reached ~8 GB/s (the whole step's weights,
211 products: 60-72 ms for 1-4 rows). ``csrc/gemv.c`` streams four weight rows at a time against
all input rows held in registers: ~50 ms for the same products at any row count from 1 to 4, and
~20 ms with int8 weights (one float32 scale per output row; 4x fewer bytes).

Built with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``$EXPERTMIX_HOME/kernels/`` once per source version (a few seconds), written atomically, loaded
with ``ctypes`` after torch so it shares torch's OpenMP runtime. Linux on x86-64 with AVX2 + FMA
only; anywhere else, without a compiler, or with ``EXPERTMIX_CPU_KERNELS=0``, :func:`load` returns
None and callers keep torch's products. Float32 results differ from MKL's only in summation order
(tests: within 1e-4 of ``F.linear``, identical greedy tokens).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertmix.io import expertmix_home

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_ROWS", "Kernels", "ProductSpec", "available", "gemv", "linear_spec", "load", "unavailable_reason"]

logger = logging.getLogger(__name__)

MAX_ROWS = 4
SOURCE = Path(__file__).with_name("csrc") / "gemv.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
_lock = threading.Lock()
_state: dict[str, Any] = {}


@dataclass(frozen=True)
class ProductSpec:
    """One projection as the kernels see it: ``x @ weight.T`` (times ``scale``) + ``bias`` + LoRA.

    ``a``/``b``: LoRA ``Aᵀ`` (in, rank) and ``s·Bᵀ`` (rank, out) for every row, or one adapter per
    row as ``(rows, in, rank)`` / ``(rows, rank, out)``; None without LoRA."""

    weight: torch.Tensor
    scale: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of the product (4-bit weights pack two inputs per byte)."""
        import torch

        n_out, cols = self.weight.shape
        return n_out, cols * 2 if self.weight.dtype == torch.uint8 else cols

    def with_lora(self, a: torch.Tensor, b: torch.Tensor) -> ProductSpec | None:
        """This product plus a LoRA term; None when the kernels cannot take it (dtype, rank, layout)."""
        import torch

        if (a.dtype != torch.float32 or b.dtype != torch.float32 or a.shape[-1] > 64 or not a.is_contiguous()
                or not b.is_contiguous() or a.device.type != "cpu"):
            return None
        return ProductSpec(self.weight, self.scale, self.bias, a, b)


def linear_spec(module: Any) -> ProductSpec | None:
    """The product of a plain float32 ``nn.Linear`` or an int8 ``quantize.Int8Linear`` on CPU, else None.

    Modules with forward hooks, other types or other dtypes are not the kernels' (None)."""
    import torch
    from torch import nn

    w = getattr(module, "weight", None)
    if (w is None or w.dim() != 2 or w.device.type != "cpu" or not w.is_contiguous() or module._forward_hooks
            or module._forward_pre_hooks):
        return None
    scales = getattr(module, "scales", None)
    if type(module) is nn.Linear and w.dtype == torch.float32:
        scale = None
    elif w.dtype == torch.int8 and isinstance(scales, torch.Tensor):
        scale = scales
    elif (w.dtype == torch.uint8 and isinstance(scales, torch.Tensor) and scales.dtype == torch.float16
          and tuple(scales.shape) == (w.shape[0], w.shape[1] // 16, 2) and scales.is_contiguous()):
        scale = scales  # 4-bit: (out, in/32, 2) halves, scale and min per group of 32 inputs
    else:
        return None
    bias = module.bias
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        return None
    return ProductSpec(w, scale, bias)


class Kernels:
    """The loaded library: float32 and int8 small-row products, and a whole decode step."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.enabled = True  # benches switch it off to compare against torch's products in one process
        sig = [ctypes.c_void_p] * 4 + [ctypes.c_long, ctypes.c_long, ctypes.c_int]
        self._fns = {name: getattr(lib, f"expertmix_gemv_{name}") for name in ("f32", "i8", "q4")}
        for fn in self._fns.values():
            fn.argtypes, fn.restype = sig, ctypes.c_int
        self._lora_fns = {name: getattr(lib, f"expertmix_gemv_{name}_lora") for name in ("f32", "i8", "q4")}
        lsig = [*sig, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
        for fn in self._lora_fns.values():
            fn.argtypes, fn.restype = lsig, ctypes.c_int
        self._dequant_q4 = lib.expertmix_dequant_q4
        self._dequant_q4.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_long]
        self._dequant_q4.restype = ctypes.c_int
        self.decode_step = lib.expertmix_decode_step  # kernel_step.py builds its arguments
        self.decode_step.argtypes, self.decode_step.restype = [ctypes.c_void_p], ctypes.c_int

    def gemv(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ weight.T`` (times ``scale`` per output row) for a 2-D float32 ``x`` of 1-4 rows.

        ``weight`` is a contiguous float32, int8 (then with a float32 ``scale``) or 4-bit CPU tensor
        (uint8, two inputs a byte, with ``(out, in/32, 2)`` float16 scales and mins)."""
        import torch

        rows, n_in = x.shape
        n_out = weight.shape[0]
        x = x.contiguous()
        y = torch.empty((rows, n_out), dtype=torch.float32)
        kind = _kind(weight)
        if kind == "q4" and n_in % 32:
            raise ValueError(f"gemv: 4-bit weights need inputs in groups of 32, got {n_in}")
        self._fns[kind](weight.data_ptr(), x.data_ptr(), y.data_ptr(),
                        scale.data_ptr() if scale is not None else None, n_out, n_in, rows)
        return y

    def dequantize_q4(self, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Float32 ``(out, in)`` copy of 4-bit weights (``quantize.Int4Linear``'s layout)."""
        import torch

        n_out, n_in = weight.shape[0], weight.shape[1] * 2
        out = torch.empty((n_out, n_in), dtype=torch.float32)
        if self._dequant_q4(weight.data_ptr(), scales.data_ptr(), out.data_ptr(), n_out, n_in) != 0:
            raise ValueError(f"dequantize_q4: {n_in} inputs do not split into groups of 32")
        return out

    def gemv_lora(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, a: torch.Tensor,
                  b: torch.Tensor) -> torch.Tensor:
        """:meth:`gemv` plus each row's LoRA term ``(x[r] @ a[r]) @ b[r]`` in the same pass.

        ``a`` is ``(rows, in, rank)`` and ``b`` ``(rows, rank, out)`` (one adapter per row, the LoRA
        scale folded into ``b``), or ``(in, rank)`` / ``(rank, out)`` for one adapter on every row;
        contiguous float32, rank at most 64."""
        import torch

        rows, n_in = x.shape
        n_out = weight.shape[0]
        rank = a.shape[-1]
        per_row = a.dim() == 3
        x = x.contiguous()
        y = torch.empty((rows, n_out), dtype=torch.float32)
        fn = self._lora_fns[_kind(weight)]
        rc = fn(weight.data_ptr(), x.data_ptr(), y.data_ptr(), scale.data_ptr() if scale is not None else None,
                n_out, n_in, rows, a.data_ptr(), b.data_ptr(), n_in * rank if per_row else 0,
                rank * n_out if per_row else 0, rank)
        if rc != 0:
            raise ValueError(f"gemv_lora: unsupported shapes (rows={rows}, rank={rank})")
        return y

    def apply(self, x: torch.Tensor, spec: ProductSpec) -> torch.Tensor:
        """``spec``'s product for a 2-D float32 ``x`` of 1-4 rows (bias and LoRA included)."""
        if spec.a is not None and spec.b is not None:
            y = self.gemv_lora(x, spec.weight, spec.scale, spec.a, spec.b)
        else:
            y = self.gemv(x, spec.weight, spec.scale)
        return y + spec.bias if spec.bias is not None else y


def _kind(weight: torch.Tensor) -> str:
    """Which entry point takes these weights: ``f32``, ``i8`` or ``q4`` (uint8: packed 4-bit)."""
    import torch

    return {torch.int8: "i8", torch.uint8: "q4"}.get(weight.dtype, "f32")


def weight_type(weight: torch.Tensor) -> int:
    """The decode step's ``wtype`` code for these weights: 0 float32, 1 int8, 2 4-bit."""
    return {"f32": 0, "i8": 1, "q4": 2}[_kind(weight)]


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return shutil.which("cc") or shutil.which("gcc")


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used in this process (None: they can, or can be built)."""
    if os.environ.get("EXPERTMIX_CPU_KERNELS", "").strip() == "0":
        return "EXPERTMIX_CPU_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"{platform.system()} {platform.machine()} (Linux x86-64 only)"
    missing = {"avx2", "fma", "f16c"} - _cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    if _compiler() is None:
        return "no C compiler (set CC, or install gcc)"
    return None


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        res = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            raise OSError(f"{cc} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
        os.replace(tmp, out)  # atomic: a concurrent process sees the old library or the new one
    finally:
        tmp.unlink(missing_ok=True)


def load() -> Kernels | None:
    """The kernels, built on first use and cached in ``$EXPERTMIX_HOME/kernels``; None if unavailable."""
    with _lock:
        key = (os.environ.get("EXPERTMIX_CPU_KERNELS", ""), os.environ.get("CC", ""), str(expertmix_home()))
        if _state.get("key") == key:
            return _state.get("kernels")  # type: ignore[no-any-return]
        _state.clear()
        _state["key"] = key
        reason = unavailable_reason()
        if reason is not None:
            logger.info("CPU decode kernels off: %s", reason)
            return None
        import torch  # noqa: F401 - loaded first, so the library binds to torch's OpenMP runtime

        src = SOURCE.read_bytes()
        digest = hashlib.sha256(src + " ".join(FLAGS).encode()).hexdigest()[:12]
        path = expertmix_home() / "kernels" / f"gemv-{digest}.so"
        try:
            if not path.is_file():
                _build(_compiler() or "cc", path)
            kernels = Kernels(ctypes.CDLL(str(path)), path)
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            logger.warning("CPU decode kernels off: cannot build or load %s: %s", path, exc)
            return None
        _state["kernels"] = kernels
        return kernels


def available() -> bool:
    """Whether :func:`load` gives kernels (building them if needed)."""
    return load() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """:meth:`Kernels.gemv` when the kernels are loaded and enabled, else None."""
    k = load()
    if k is None or not k.enabled:
        return None
    return k.gemv(x, weight, scale)

"""Small-batch GEMM path on CPU: chosen once per machine from a short probe, cached in ``$EXPERTMIX_HOME``.

Why: torch's CPU ``linear`` (MKL sgemm, ``x @ W.T``) picks a poor kernel for 2-4 rows on some
CPUs: the 49152x576 ``lm_head`` of SmolLM2 costs 2-3x more at 2-3 rows than at one, although a
decode step is bound by reading the weights once. Computing the same product as
``(W @ x.T).T`` (MKL sees a tall-skinny GEMM) reads ``W`` once and stays flat from 1 to 4 rows.
The choice is per phase: prefill (many tokens per row) keeps torch's path, decode steps take the
transposed form up to the probed number of rows.
Which form wins, and up to how many rows, depends on the CPU and MKL build, so a short probe
(~1-3 s) measures both on the model's own shapes and the answer is cached per machine
(CPU model, cores, torch version, threads) in ``$EXPERTMIX_HOME/cpu_tuning.json``.

Paths (``[base] gemm``): ``"auto"`` (probe, cached), ``"default"`` (torch's linear, no patch),
``"wxt"`` (the transposed product up to 4 rows), ``"kernel"`` (expertmix's own small-row product,
:mod:`experts.backends.cpu_kernels`, for 1-4 rows; ``wxt`` above). The probe also times that kernel
against MKL on weights that do not fit the cache (a decode step streams ~0.5 GB of them) and
takes it where it is faster. On CUDA nothing is patched.

``MKL_CBWR`` (MKL's reproducibility branch) also changes the small-M kernels, but MKL only
accepts it before its first computation (``mkl_cbwr_set`` returns -8 afterwards), so it can only
be chosen for a whole process; :func:`set_mkl_cbwr` tries it and reports whether it took.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from expertmix.io import atomic_write_text, expertmix_home

if TYPE_CHECKING:
    import torch

__all__ = ["GEMM_PATHS", "GemmPlan", "choose_gemm", "install_gemm", "plan_kernels", "probe_gemm", "probe_kernel",
           "set_mkl_cbwr", "small_rows_linear"]

logger = logging.getLogger(__name__)

GEMM_PATHS = ("auto", "default", "wxt", "kernel")
_PROBE_ROWS = (1, 2, 3, 4, 8, 16)
_CACHE_FILE = "cpu_tuning.json"
_CBWR = {"OFF": 0, "BRANCH_OFF": 1, "AUTO": 2, "COMPATIBLE": 3, "AVX": 9, "AVX2": 10, "AVX512": 12}


@dataclass(frozen=True)
class GemmPlan:
    """Which product a linear layer uses: ``wxt`` for inputs of at most ``max_rows`` rows."""

    path: str = "default"
    max_rows: int = 0
    #: row counts computed as a larger, faster product (the first row repeated), e.g. ``((1, 2), (3, 4))``:
    #: MKL's one-row gemv runs on one thread, the two-row GEMM on all of them (lm_head 13.2 -> 9.0 ms
    #: on 2 cores), and its three-column kernel is slower than its four-column one
    pad: tuple[tuple[int, int], ...] = ()

    @property
    def pad_to(self) -> dict[int, int]:
        return dict(self.pad)
    source: str = "default"  # "probe", "cache", "config", "cuda" (CPU tricks off)
    probe: dict[str, Any] | None = None
    #: 1-4 rows through expertmix's own product (cpu_kernels) instead of MKL
    kernel: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _machine_key() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # probe=2: the decision rule (ranges start at two rows); older cached probes are re-run
    # probe=4: adds padded row counts; probe=5: adds the small-row kernel (cpu_kernels)
    return f"{cpu}|cores={os.cpu_count()}|threads={torch.get_num_threads()}|torch={torch.__version__}|probe=5"


def small_rows_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    max_rows: int,
    pad_to: Mapping[int, int] | None = None,
    kernels: Any = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; as ``(W @ x.T).T`` for a decode step of at most ``max_rows`` rows.

    Per phase: a (batch, seq, in) input with seq > 1 is a prefill and keeps torch's path (bit-identical
    to plain transformers); a decode step (seq == 1) or a 2-D input of few rows takes the transposed form.
    ``pad_to`` maps a row count to a larger one computed instead (the first row repeated, the extra
    outputs dropped): one row as two makes MKL run its threaded GEMM instead of a single-threaded
    gemv; the weights are still read once and each row's numbers do not depend on the others.
    ``kernels`` (:class:`cpu_kernels.Kernels`): decode steps of 1-4 rows use its product instead.
    """
    import torch
    import torch.nn.functional as F

    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    prefill = x.dim() >= 3 and x.shape[-2] != 1
    if prefill or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    if (kernels is not None and kernels.enabled and 0 < rows <= 4 and weight.dtype == torch.float32
            and weight.is_contiguous()):
        y = kernels.gemv(x.reshape(rows, x.shape[-1]), weight)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    n = pad_to.get(rows, rows) if pad_to else rows
    if n == rows and (rows < 2 or rows > max_rows):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if n > rows:
        x2 = torch.cat([x2, x2[:1].expand(n - rows, -1)])
    # contiguous: a strided (column-major) result makes every later op slower (SDPA leaves its
    # fused kernel, elementwise ops and the argmax over the vocabulary read with a stride)
    y = (weight @ x2.t())[:, :rows].t().contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _time(fn: Any, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def probe_gemm(shapes: dict[str, tuple[int, int]], *, reps: int = 5, rows: tuple[int, ...] = _PROBE_ROWS) -> dict[str, Any]:
    """Time ``linear`` vs ``wxt`` on random weights of ``shapes`` for each row count, interleaved.

    Returns ``{"rows": {r: {"default_ms": .., "wxt_ms": ..}}, "max_rows": n, "pad": [[r, p], ...]}`` where
    ``n`` is the largest row count (from 2) up to which ``wxt`` is not slower in total over the shapes,
    and ``pad`` lists the row counts that are faster (by more than 5%) computed as a larger probed
    count within that range.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
    table: dict[str, dict[str, float]] = {}
    max_rows = 0
    losing = False
    with torch.inference_mode():
        for r in rows:
            xs = {k: torch.randn(r, w.shape[1], generator=gen) for k, w in weights.items()}

            def default(xs: dict[str, torch.Tensor] = xs) -> None:
                for k, w in weights.items():
                    F.linear(xs[k], w)

            def wxt(xs: dict[str, torch.Tensor] = xs) -> None:
                for k, w in weights.items():
                    small_rows_linear(xs[k], w, None, 1 << 30)

            default(), wxt()  # warm-up
            d: list[float] = []
            t: list[float] = []
            for i in range(reps):
                first, second = (default, wxt) if i % 2 == 0 else (wxt, default)
                a, b = _time(first, 1)[0], _time(second, 1)[0]
                d.append(a if first is default else b)
                t.append(b if first is default else a)
            dm, tm = statistics.median(d) * 1e3, statistics.median(t) * 1e3
            table[str(r)] = {"default_ms": round(dm, 3), "wxt_ms": round(tm, 3)}
            # contiguous from two rows: the first row count where wxt loses ends its range
            if r >= 2:
                losing = losing or tm > dm * 1.02
                if not losing:
                    max_rows = r
    return {"rows": table, "max_rows": max_rows, "pad": _pad_choice(table, max_rows), "shapes": {k: list(s) for k, s in shapes.items()}, "reps": reps}


def probe_kernel(shapes: dict[str, tuple[int, int]], mkl: dict[str, Any], *, reps: int = 3,
                 pool_mb: int = 64) -> dict[str, Any] | None:
    """Time the small-row kernel against the probed MKL path (``mkl``: ``probe_gemm``'s result) at
    1-4 rows, on enough distinct weights of each shape (``pool_mb`` per shape) that they stream from
    memory like a decode step's. None when the kernels are unavailable here."""
    import torch

    from experts.backends import cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None:
        return None
    gen = torch.Generator().manual_seed(1)
    pools = {}
    for k, (o, i) in shapes.items():
        n = max(1, -(-pool_mb * (1 << 20) // (o * i * 4)))
        pools[k] = [torch.randn(o, i, generator=gen) for _ in range(n)]
    n_mkl, pad = mkl["max_rows"], {a: b for a, b in mkl["pad"]}
    table: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for r in range(1, 5):
            xs = {k: torch.randn(r, ws[0].shape[1], generator=gen) for k, ws in pools.items()}

            def ours(xs: dict[str, torch.Tensor] = xs) -> None:
                for k, ws in pools.items():
                    for w in ws:
                        kernels.gemv(xs[k], w)

            def theirs(xs: dict[str, torch.Tensor] = xs) -> None:
                for k, ws in pools.items():
                    for w in ws:
                        small_rows_linear(xs[k], w, None, n_mkl, pad)

            ours(), theirs()
            a: list[float] = []
            b: list[float] = []
            for i in range(reps):
                order = (ours, theirs) if i % 2 == 0 else (theirs, ours)
                for fn in order:
                    (a if fn is ours else b).append(_time(fn, 1)[0])
            table[str(r)] = {"kernel_ms": round(statistics.median(a) * 1e3, 3),
                             "mkl_ms": round(statistics.median(b) * 1e3, 3)}
    total = {k: sum(v[f"{k}_ms"] for v in table.values()) for k in ("kernel", "mkl")}
    return {"rows": table, "kernel": total["kernel"] < total["mkl"] * 0.95, "pool_mb": pool_mb}


def _pad_choice(table: dict[str, dict[str, float]], max_rows: int) -> list[list[int]]:
    """Row counts to compute as a larger probed count: the fastest count p >= r (2 <= p <= max_rows)
    when it beats r's own path (torch's for one row, ``wxt`` from two) by more than 5%."""
    own = {int(r): (v["default_ms"] if int(r) == 1 else v["wxt_ms"]) for r, v in table.items()}
    wxt = {int(r): v["wxt_ms"] for r, v in table.items() if 2 <= int(r) <= max_rows}
    pad = []
    for r in sorted(own):
        if r > max_rows:
            break
        best = min((p for p in wxt if p > r), key=lambda p: wxt[p], default=None)
        if best is not None and wxt[best] < own[r] * 0.95:
            pad.append([r, best])
    return pad


def _read_cache() -> dict[str, Any]:
    path = expertmix_home() / _CACHE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def choose_gemm(
    setting: str = "auto", *, device: str = "cpu", shapes: dict[str, tuple[int, int]] | None = None, refresh: bool = False
) -> GemmPlan:
    """The GEMM path for this process: from config, the per-machine cache, or a fresh probe."""
    if not device.startswith("cpu"):
        return GemmPlan(source="cuda" if device.startswith("cuda") else device)
    if setting == "default":
        return GemmPlan(source="config")
    if setting == "wxt":
        return GemmPlan(path="wxt", max_rows=4, source="config")
    if setting == "kernel":
        plan = _plan(4, (), source="config", kernel=True)
        if not plan.kernel:
            from experts.backends import cpu_kernels

            logger.warning("gemm = \"kernel\": %s; using \"wxt\"", cpu_kernels.unavailable_reason() or "build failed")
        return plan
    if setting != "auto":
        from expertmix.errors import ConfigError

        raise ConfigError(f"unknown gemm path {setting!r}; use one of {', '.join(GEMM_PATHS)}", key="base.gemm")
    key = _machine_key()
    cache = _read_cache()
    hit = cache.get(key)
    if hit and not refresh and isinstance(hit.get("max_rows"), int):
        pad = tuple((int(a), int(b)) for a, b in hit.get("pad", []))
        return _plan(hit["max_rows"], pad, source="cache", probe=hit, kernel=bool((hit.get("kernel") or {}).get("kernel")))
    shapes = shapes or {"lm_head": (49152, 576), "mlp": (1536, 576)}
    t = time.perf_counter()
    result = probe_gemm(shapes)
    result["kernel"] = probe_kernel(shapes, result)
    result["probe_s"] = round(time.perf_counter() - t, 2)
    logger.info("GEMM probe (%.1f s): wxt up to %d rows", result["probe_s"], result["max_rows"])
    cache[key] = result
    try:
        atomic_write_text(expertmix_home() / _CACHE_FILE, json.dumps(cache, indent=2) + "\n")
    except OSError as exc:  # a read-only home only costs the probe next time
        logger.warning("cannot cache the GEMM probe in %s: %s", expertmix_home(), exc)
    pad = tuple((a, b) for a, b in result["pad"])
    return _plan(result["max_rows"], pad, source="probe", probe=result, kernel=bool((result["kernel"] or {}).get("kernel")))


def _plan(max_rows: int, pad: tuple[tuple[int, int], ...], *, source: str, probe: dict[str, Any] | None = None,
          kernel: bool = False) -> GemmPlan:
    """A CPU plan; ``kernel`` only if the kernels load here (a cached probe may outlive the compiler).
    The kernel covers 1-4 rows, so a plan with it takes the ``wxt`` path at least that far."""
    if kernel:
        from experts.backends import cpu_kernels

        kernel = cpu_kernels.available()
    rows = max(max_rows, 4 if kernel else 0)
    return GemmPlan(path="wxt" if rows > 0 else "default", max_rows=rows, pad=pad, source=source, probe=probe,
                    kernel=kernel)


def install_gemm(model: Any, plan: GemmPlan) -> int:
    """Route every plain ``nn.Linear`` of ``model`` through :func:`small_rows_linear`; returns how many.

    LoRA wrappers are left alone here (their ``base_layer`` is a plain Linear and gets patched).
    """
    from torch import nn

    if plan.path != "wxt" or plan.max_rows <= 0:
        return 0
    kernels = plan_kernels(plan)
    n = 0
    for mod in model.modules():
        if type(mod) is nn.Linear and mod.weight.device.type == "cpu":
            def forward(x: Any, _m: nn.Linear = mod, _n: int = plan.max_rows, _p: dict[int, int] = plan.pad_to) -> Any:
                return small_rows_linear(x, _m.weight, _m.bias, _n, _p, kernels)

            mod.forward = forward
            n += 1
    return n


def plan_kernels(plan: GemmPlan | None) -> Any:
    """The loaded small-row kernels when ``plan`` uses them, else None."""
    if plan is None or not plan.kernel:
        return None
    from experts.backends import cpu_kernels

    return cpu_kernels.load()


def set_mkl_cbwr(mode: str) -> bool:
    """Ask MKL for a CBWR branch (e.g. ``"COMPATIBLE"``); True when it took effect.

    Only works before MKL's first computation in this process; equivalent to starting the
    process with ``MKL_CBWR=<mode>`` in the environment.
    """
    import ctypes

    import torch

    code = _CBWR.get(mode.upper())
    if code is None:
        return False
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        fn = lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return int(fn(code)) == 0

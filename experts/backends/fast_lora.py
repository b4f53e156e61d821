"""Batched LoRA for mixed-adapter batches (S-LoRA / Punica BGMV style), replacing peft's per-adapter loop.

peft applies ``adapter_names=`` by registering a pre-hook on every LoRA layer (210 on
SmolLM2) for each call and, inside every layer, looping over the adapters present with
``index``/``index_put`` per sub-batch. Here a call with ``adapter_names`` only records the
per-row adapter names (no hooks), and each LoRA ``Linear`` computes

* one adapter for all rows:  ``y = base(x) + (x @ Aᵀ) @ (s·B)ᵀ``  (two small matmuls), or
* mixed rows:                ``y = base(x) + bmm(bmm(x, A_rows), B_rows)`` where ``A_rows[i]``,
  ``B_rows[i]`` are row i's adapter (gathered once per call, zeros for ``__base__`` rows),

so k rows on k adapters cost the same as k rows on one. Ranks may differ (zero-padded).
Layers this cannot handle (DoRA, LoRA bias, non-Linear) fall back to peft per layer, and a
model with ``modules_to_save`` keeps peft's hooks entirely. Device-agnostic (works on CUDA).

Single-expert calls can instead run on **merged weights** (``W + s·B·A`` per projection,
merged on first use, LRU of ``merged_experts`` experts, 0 = off): exactly the base model's
cost per step, at one extra copy of the projection weights per cached expert.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["FastLora", "install_fast_lora", "install_fast_paths"]

BASE = "__base__"


@dataclass
class _Pack:
    """One adapter on one layer: Aᵀ (in, r) and s·Bᵀ (r, out), plus the weights they came from."""

    a_t: torch.Tensor
    b_t: torch.Tensor
    src: tuple[Any, Any]


class _Call:
    """Per-call state: the rows' adapter names and per-layer plans (gathered weights).

    Kept across calls with the same rows (every decode step of a ``generate`` is a call) while
    ``state`` — the adapters' peft config objects — is unchanged: a reloaded or re-merged adapter
    gets a new config object, so its plans are rebuilt.
    """

    def __init__(self, rows: tuple[str, ...], state: tuple[Any, ...]) -> None:
        self.rows = rows
        self.unique = tuple(dict.fromkeys(rows))
        self.state = state
        self.plans: dict[int, Any] = {}
        self.nbytes = 0  # gathered mixed-batch weights held by the plans
        self.dirty = False  # plans added since the last accounting


class FastLora:
    """Owns the patched layers of one peft model; see the module docstring."""

    def __init__(
        self, peft_model: Any, *, max_rows: int = 0, merged_experts: int = 0, pad_to: dict[int, int] | None = None,
        kernels: Any = None,
    ) -> None:
        self.model = peft_model
        self.kernels = kernels  # cpu_kernels.Kernels for merged weights at 1-4 rows (cpu_tuning)
        self.max_rows = max_rows  # small-row GEMM path for merged weights (cpu_tuning); 0 = off
        self.pad_to = pad_to or {}  # row counts computed as larger products (cpu_tuning)
        self.merged_experts = merged_experts
        self.enabled = True  # False: peft's own path (benchmarks compare both in one process)
        self._tls = threading.local()
        self._packs: dict[tuple[int, str], _Pack] = {}
        self._merged: OrderedDict[str, dict[int, tuple[Any, ...]]] = OrderedDict()
        self._calls_bytes = 0
        self._merge_lock = threading.Lock()
        # per-call plans reused across decode steps: rebuilding them every step (a Python pass over
        # 210 layers plus, for mixed rows, a gather of every row's A/B) cost ~15-20 ms of a ~100 ms
        # two-adapter step on 2 CPU cores. LRU of row tuples, bounded in count and gathered bytes.
        self._calls: OrderedDict[tuple[str, ...], _Call] = OrderedDict()
        self.call_cache_size = 32
        self.call_cache_bytes = 96 << 20
        self._merged_state: dict[str, Any] = {}
        self.layers: list[Any] = []
        self.fallback_layers = 0
        self.calls = {"single": 0, "mixed": 0, "merged": 0, "base": 0}

    # -- installation --------------------------------------------------------------------------------
    def install(self) -> bool:
        """Patch the model's LoRA layers (idempotent: a second call patches only new layers)."""
        from peft.tuners.lora.layer import Linear as LoraLinear

        lora_model = self.model.base_model
        if not hasattr(lora_model, "_enable_peft_forward_hooks"):
            return False
        try:
            from peft.utils.other import AuxiliaryTrainingWrapper
        except ImportError:  # older peft
            AuxiliaryTrainingWrapper = ()
        if AuxiliaryTrainingWrapper and any(isinstance(m, AuxiliaryTrainingWrapper) for m in lora_model.modules()):
            return False  # modules_to_save need peft's own hooks
        for mod in lora_model.modules():
            if isinstance(mod, LoraLinear) and not getattr(mod, "_expertmix_fast", False):
                self._patch_layer(mod)
        if not getattr(lora_model, "_expertmix_fast", False):
            orig = lora_model._enable_peft_forward_hooks
            lora_model._enable_peft_forward_hooks = self._hooks(orig)
            lora_model._expertmix_fast = True
        return True

    def _patch_layer(self, layer: Any) -> None:
        orig = type(layer).forward.__get__(layer)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            call = getattr(self._tls, "call", None)
            if call is None or args or kwargs:
                return orig(x, *args, **kwargs)
            return self._forward(layer, orig, call, x)

        layer.forward = forward
        layer._expertmix_fast = True
        layer._expertmix_fast_lora = self  # kernel_step.py asks kernel_spec for its product
        self.layers.append(layer)

    def _hooks(self, orig: Any) -> Any:
        @contextlib.contextmanager
        def enable(*args: Any, **kwargs: Any) -> Iterator[None]:
            names = kwargs.get("adapter_names")
            if not self.enabled or names is None or kwargs.get("alora_offsets") is not None or self.model.training:
                with orig(*args, **kwargs):
                    yield
                return
            if isinstance(kwargs.get("num_beams"), int) and kwargs["num_beams"] > 1:
                names = [n for n in names for _ in range(kwargs["num_beams"])]
            call = self._call_for(tuple(names))
            if self.merged_experts > 0 and len(call.unique) == 1:
                self.prepare_merged(names[0])
            prev = getattr(self._tls, "call", None)
            self._tls.call = call
            try:
                yield
            finally:
                self._tls.call = prev
                self._account(call)

        return enable

    def _state(self, unique: Sequence[str]) -> tuple[Any, ...]:
        cfg = getattr(self.model, "peft_config", {})
        return tuple(cfg.get(n) for n in unique)

    def _call_for(self, rows: tuple[str, ...]) -> _Call:
        """The cached per-call state for these rows, or a new one (after checking the names)."""
        call = self._calls.get(rows)
        if call is not None:
            state = self._state(call.unique)
            if all(a is b for a, b in zip(state, call.state)):
                with self._merge_lock:
                    if rows in self._calls:
                        self._calls.move_to_end(rows)
                return call
        self._check_names(rows)
        unique = tuple(dict.fromkeys(rows))
        call = _Call(rows, self._state(unique))
        with self._merge_lock:
            old = self._calls.pop(rows, None)
            self._calls_bytes -= old.nbytes if old is not None else 0
            self._calls[rows] = call
        return call

    def _account(self, call: _Call) -> None:
        """After a call that made new plans: count its gathered bytes, evict the least recently used calls."""
        if not call.dirty:
            return  # a decode step that reused every plan: nothing to count
        call.dirty = False
        nbytes = sum(_plan_bytes(p) for p in call.plans.values() if p[0] == "mixed")
        with self._merge_lock:
            if self._calls.get(call.rows) is not call:
                return
            self._calls_bytes += nbytes - call.nbytes
            call.nbytes = nbytes
            while self._calls and (len(self._calls) > self.call_cache_size or self._calls_bytes > self.call_cache_bytes):
                _, dropped = self._calls.popitem(last=False)
                self._calls_bytes -= dropped.nbytes

    def _prune(self) -> None:
        """Drop packs of adapters that were deleted (merged adapters come and go)."""
        by_id = {id(layer): layer for layer in self.layers}
        for key in list(self._packs):
            layer = by_id.get(key[0])
            if layer is None or key[1] not in layer.lora_A:
                del self._packs[key]

    def _check_names(self, names: Sequence[str]) -> None:
        if len(self._packs) > 16 * max(1, len(self.layers)):
            self._prune()
        known = set()
        for layer in self.layers:
            known |= set(layer.lora_A.keys())
        unknown = {n for n in names if n != BASE} - known
        if unknown:
            # the same error peft raises, so callers see one behaviour
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")

    # -- the layer math ------------------------------------------------------------------------------
    def _pack(self, layer: Any, name: str) -> _Pack | None:
        if name == BASE or name not in layer.lora_A:
            return None
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        key = (id(layer), name)
        p = self._packs.get(key)
        if p is not None and p.src[0] is a and p.src[1] is b:
            return p
        s = float(layer.scaling[name])
        p = _Pack(a.detach().t().contiguous(), (b.detach() * s).t().contiguous(), (a, b))
        self._packs[key] = p
        return p

    def _supported(self, layer: Any, names: Sequence[str]) -> bool:
        for n in names:
            if n == BASE or n not in layer.lora_A:
                continue
            if layer.use_dora.get(n, False) or getattr(layer.lora_B[n], "bias", None) is not None:
                return False
        return not getattr(layer, "fan_in_fan_out", False) and not layer.disable_adapters

    def _plan(self, layer: Any, call: _Call) -> Any:
        plan = call.plans.get(id(layer))
        if plan is not None:
            return plan
        if not self._supported(layer, call.unique):
            plan = ("peft",)
        elif len(call.unique) == 1:
            p = self._pack(layer, call.unique[0])
            merged = self._merged_weight(layer, call.unique[0]) if p is not None else None
            plan = ("base",) if p is None else ("merged", call.unique[0], p) if merged is not None else ("single", p)
        else:
            packs = [self._pack(layer, n) for n in call.rows]
            real = [p for p in packs if p is not None]
            if not real:
                plan = ("base",)
            else:
                r = max(p.a_t.shape[1] for p in real)
                ref = real[0]
                a = ref.a_t.new_zeros((len(packs), ref.a_t.shape[0], r))
                b = ref.b_t.new_zeros((len(packs), r, ref.b_t.shape[1]))
                for i, p in enumerate(packs):
                    if p is not None:
                        a[i, :, : p.a_t.shape[1]] = p.a_t
                        b[i, : p.b_t.shape[0], :] = p.b_t
                plan = ("mixed", a, b)
        call.plans[id(layer)] = plan
        call.dirty = True
        return plan

    def _forward(self, layer: Any, orig: Any, call: _Call, x: torch.Tensor) -> torch.Tensor:
        plan = self._plan(layer, call)
        kind = plan[0]
        if kind == "peft":
            return orig(x, adapter_names=list(call.rows))
        if kind == "merged":
            import torch.nn.functional as F

            table = self._merged.get(plan[1])
            entry = table.get(id(layer)) if table is not None else None
            if entry is None:  # evicted from the merged LRU since the plan was made: LoRA on the base
                plan = ("single", plan[2])
                return self._lora(layer, plan, x)
            w, bias = entry[0], entry[1]
            if self.max_rows and w.device.type == "cpu":
                from experts.backends.cpu_tuning import small_rows_linear

                return small_rows_linear(x, w, bias, self.max_rows, self.pad_to, self.kernels)
            return F.linear(x, w, bias)
        if kind == "base":
            return layer.base_layer(x)
        if kind == "mixed" and x.shape[0] != plan[1].shape[0]:  # e.g. a caller that reshaped the batch
            return orig(x, adapter_names=list(call.rows))
        return self._lora(layer, plan, x)

    def _lora(self, layer: Any, plan: Any, x: torch.Tensor) -> torch.Tensor:
        import torch

        if self.kernels is not None and self.kernels.enabled:
            fused = self._lora_kernel(layer, plan, x)
            if fused is not None:
                return fused
        y = layer.base_layer(x)  # plain Linear (GEMM path from cpu_tuning) or quantized
        if plan[0] == "single":
            p = plan[1]
            xa = x.to(p.a_t.dtype) if x.dtype != p.a_t.dtype else x
            h = xa.reshape(-1, x.shape[-1]) @ p.a_t
            if y.dtype == p.b_t.dtype:  # y + h @ sBᵀ in one op
                return torch.addmm(y.reshape(-1, y.shape[-1]), h, p.b_t).reshape(y.shape)
            return y + (h @ p.b_t).to(y.dtype).reshape(y.shape)
        a, b = plan[1], plan[2]
        xa = x.to(a.dtype) if x.dtype != a.dtype else x
        h = torch.bmm(xa.reshape(x.shape[0], -1, x.shape[-1]), a)
        if y.dtype == b.dtype:  # y + bmm(h, B_rows) in one op
            return torch.baddbmm(y.reshape(x.shape[0], -1, y.shape[-1]), h, b).reshape(y.shape)
        return y + torch.bmm(h, b).to(y.dtype).reshape(y.shape)

    def _lora_kernel(self, layer: Any, plan: Any, x: torch.Tensor) -> torch.Tensor | None:
        """A decode step of 1-4 rows as one call of the CPU kernel: base product + every row's LoRA
        term (cpu_kernels); None when the shapes or types are not the kernel's."""
        import torch

        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not 0 < rows <= 4 or (x.dim() >= 3 and x.shape[-2] != 1) or x.dtype != torch.float32:
            return None
        spec = self._lora_spec(layer, plan)
        if spec is None:
            return None
        y = self.kernels.apply(x.reshape(rows, x.shape[-1]), spec)
        return y.reshape(*x.shape[:-1], spec.weight.shape[0])

    def _lora_spec(self, layer: Any, plan: Any) -> Any:
        from experts.backends.cpu_kernels import linear_spec

        base = linear_spec(layer.base_layer)
        if base is None:
            return None
        a, b = (plan[1].a_t, plan[1].b_t) if plan[0] == "single" else (plan[1], plan[2])
        return base.with_lora(a, b)

    def current_call(self) -> _Call | None:
        """The state of the call running in this thread (None outside an ``adapter_names`` call)."""
        return getattr(self._tls, "call", None)

    def kernel_spec(self, layer: Any, rows: int) -> Any:
        """What this layer computes for the current call's ``rows`` rows as a ``cpu_kernels.ProductSpec``
        (merged weight, base, or base + LoRA), or None when only its own forward can do it."""
        from experts.backends.cpu_kernels import ProductSpec, linear_spec

        call = getattr(self._tls, "call", None)
        if call is None or len(call.rows) != rows or layer._forward_hooks or layer._forward_pre_hooks:
            return None
        plan = self._plan(layer, call)
        kind = plan[0]
        if kind == "merged":
            table = self._merged.get(plan[1])
            entry = table.get(id(layer)) if table is not None else None
            if entry is not None:
                return ProductSpec(entry[0], None, entry[1]) if linear_spec(layer.base_layer) is not None else None
            plan, kind = ("single", plan[2]), "single"
        if kind == "base":
            return linear_spec(layer.base_layer)
        if kind in ("single", "mixed"):
            return self._lora_spec(layer, plan)
        return None

    # -- merged single-expert weights ----------------------------------------------------------------
    def _merged_weight(self, layer: Any, name: str) -> tuple[torch.Tensor, Any] | None:
        if self.merged_experts <= 0:
            return None
        table = self._merged.get(name)
        if table is None:
            return None
        entry = table.get(id(layer))
        if entry is None or entry[2] is not layer.lora_A[name].weight or entry[3] is not layer.lora_B[name].weight:
            return None  # the adapter changed since the merge: use the LoRA path
        return entry[0], entry[1]

    def prepare_merged(self, name: str) -> bool:
        """Merge ``name`` into a cached copy of every projection (LRU of ``merged_experts``)."""
        if self.merged_experts <= 0 or name == BASE:
            return False
        state = self._state([name])[0]
        with self._merge_lock:
            if name in self._merged and self._merged_state.get(name) is state:
                self._merged.move_to_end(name)
                return True
            table: dict[int, tuple[Any, ...]] = {}
            for layer in self.layers:
                p = self._pack(layer, name)
                if p is None or not self._supported(layer, [name]):
                    continue
                base = layer.base_layer
                w = base.weight.detach()
                if not w.dtype.is_floating_point:
                    continue  # quantized base: keep the LoRA path
                merged = (w.float() + (p.a_t.float() @ p.b_t.float()).t()).to(w.dtype).contiguous()
                table[id(layer)] = (merged, base.bias, p.src[0], p.src[1])
            self._merged[name] = table
            self._merged_state[name] = state
            self._merged.move_to_end(name)
            while len(self._merged) > self.merged_experts:
                dropped, _ = self._merged.popitem(last=False)
                self._merged_state.pop(dropped, None)
            return True

    def clear(self) -> None:
        """Forget cached packs and merges (after adapters change)."""
        with self._merge_lock:
            self._packs.clear()
            self._merged.clear()
            self._merged_state.clear()
            self._calls.clear()
            self._calls_bytes = 0


def _plan_bytes(plan: Any) -> int:
    return sum(t.numel() * t.element_size() for t in plan[1:3])


def install_fast_lora(
    peft_model: Any, *, max_rows: int = 0, merged_experts: int = 0, pad_to: dict[int, int] | None = None,
    kernels: Any = None,
) -> FastLora | None:
    """Patch ``peft_model`` (a ``PeftModel`` with LoRA adapters); None when it cannot be done."""
    fl = FastLora(peft_model, max_rows=max_rows, merged_experts=merged_experts, pad_to=pad_to, kernels=kernels)
    return fl if fl.install() else None


def install_fast_paths(backend: Any) -> FastLora | None:
    """Install (or extend to newly loaded adapters) the batched LoRA path of a ``LocalBackend``.

    Reads ``backend.base.options`` (``models.FastOptions``); a no-op without LoRA adapters or
    with ``fast_lora = false``. The result is kept as ``backend.fast_lora``.
    """
    opts = getattr(backend.base, "options", None)
    if not getattr(backend, "_peft", False) or opts is None or not opts.fast_lora:
        return None
    fl: FastLora | None = getattr(backend, "fast_lora", None)
    if fl is not None and fl.model is backend.model:
        fl.install()
        return fl
    plan = getattr(backend.base, "gemm", None)
    wxt = plan is not None and plan.path == "wxt"
    max_rows = plan.max_rows if wxt else 0
    merged = 0 if opts.quantize != "none" else opts.merged_experts  # merging would undo the fewer bytes
    from experts.backends.cpu_tuning import plan_kernels

    fl = install_fast_lora(backend.model, max_rows=max_rows, merged_experts=merged, pad_to=plan.pad_to if wxt else None,
                           kernels=plan_kernels(plan) if wxt else None)
    backend.fast_lora = fl
    return fl

"""A whole Llama-family decode step in C: every layer's products *and* small ops in one OpenMP region.

After the small-row kernel (:mod:`cpu_kernels`) took the weight products of a SmolLM2 decode step
from ~65 ms to ~40 ms, the rest of the lean step (:mod:`lean_decode`) was ~600 small torch calls
(RMSNorm alone ~100 µs a call, SDPA ~100 µs, cache concatenation, rotary halves) and their Python:
~30 ms of a ~75 ms step on two cores. ``expertmix_decode_step`` (``csrc/gemv.c``) runs all layers
in one call: RMSNorm, the q/k/v products, rotary embedding, appending k/v to the cache,
attention over the cache (grouped query heads, padding mask), the output product, the SiLU-gated
MLP and the residuals, with the two threads meeting at barriers instead of returning to Python.

What each projection computes comes from the module itself: a plain float32 ``nn.Linear``, an
int8 ``Int8Linear``, or a LoRA layer patched by :mod:`fast_lora` (merged expert weights, base, one
adapter for all rows, or one adapter per row), as a :class:`cpu_kernels.ProductSpec`. Anything
else (a module with hooks, peft's own adapter path, more than 4 rows, other dtypes) makes the step
return None and the lean Python step runs instead. The KV cache stays transformers'
``DynamicCache``: each layer's keys/values become views of a buffer with spare positions, so a step
appends in place instead of concatenating; a cache changed behind our back (cropped, reordered,
extended by a prefill) is noticed and copied into a fresh buffer.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["KernelStep"]

logger = logging.getLogger(__name__)

_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_SPARE = 128  # positions added when a cache buffer grows


class _Proj(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("a", ctypes.c_void_p), ("b", ctypes.c_void_p), ("a_stride", ctypes.c_long),
                ("b_stride", ctypes.c_long), ("O", ctypes.c_long), ("I", ctypes.c_long), ("rank", ctypes.c_int),
                ("wtype", ctypes.c_int)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln1", ctypes.c_void_p), ("ln2", ctypes.c_void_p), ("eps1", ctypes.c_float),
                ("eps2", ctypes.c_float), ("p", _Proj * 7), ("kc", ctypes.c_void_p), ("vc", ctypes.c_void_p)]


class _Step(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int), ("H", ctypes.c_int), ("NH", ctypes.c_int), ("KVH", ctypes.c_int),
                ("HD", ctypes.c_int), ("FF", ctypes.c_int), ("n_layers", ctypes.c_int), ("cos_rows", ctypes.c_int),
                ("cap", ctypes.c_long), ("T", ctypes.c_long), ("scaling", ctypes.c_float), ("cos", ctypes.c_void_p),
                ("sin", ctypes.c_void_p), ("mask", ctypes.c_void_p), ("x", ctypes.c_void_p),
                ("layers", ctypes.POINTER(_Layer))]


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


class _Plan:
    """The C arguments for every layer at one row count and adapter assignment (built once, reused)."""

    def __init__(self, key: tuple[Any, ...], layers: Any, keep: list[Any], owners: list[tuple[Any, ...]]) -> None:
        self.key = key
        self.layers = layers
        self.keep = keep  # the tensors the pointers point into
        # (parent, name, module, its base Linear, weight): a module swapped in (e.g. peft wrapping a
        # projection), a replaced weight or a new hook invalidates the plan
        self.owners = owners


class _KV:
    """Per-layer key/value buffers (B, KVH, cap, HD) behind the cache's views."""

    def __init__(self) -> None:
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cap = 0
        self.hwm = 0  # the longest view handed out: a shorter one means the cache was cropped

    def ours(self, layers: Any, past: int) -> bool:
        if not self.k or len(self.k) != len(layers) or past + 1 > self.cap or past < self.hwm:
            return False
        for i, lay in enumerate(layers):
            keys, vals, kb, vb = lay.keys, lay.values, self.k[i], self.v[i]
            if (keys.data_ptr() != kb.data_ptr() or vals.data_ptr() != vb.data_ptr() or keys.stride() != kb.stride()
                    or vals.stride() != vb.stride() or keys.shape[:2] != kb.shape[:2] or keys.shape[2] != past):
                return False
        return True

    def adopt(self, layers: Any, past: int, shape: tuple[int, int, int]) -> bool:
        """Copy the cache's keys/values into fresh buffers with spare positions; False (nothing
        changed) when a layer's (rows, kv heads, head dim) are not ``shape``."""
        import torch

        for lay in layers:
            k, v = lay.keys, lay.values
            if k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != shape or k.shape[2] != past or v.shape != k.shape:
                return False
        cap = past + 1 + _SPARE
        self.k, self.v = [], []
        for lay in layers:
            b, h, _, d = lay.keys.shape
            kb = torch.empty((b, h, cap, d), dtype=torch.float32)
            vb = torch.empty((b, h, cap, d), dtype=torch.float32)
            kb[:, :, :past].copy_(lay.keys)
            vb[:, :, :past].copy_(lay.values)
            self.k.append(kb)
            self.v.append(vb)
        self.cap = cap
        self.hwm = past
        return True

    def publish(self, layers: Any, length: int) -> None:
        for i, lay in enumerate(layers):
            lay.keys = self.k[i][:, :, :length]
            lay.values = self.v[i][:, :, :length]
        self.hwm = length


class KernelStep:
    """Runs decode steps of one model with ``Kernels.decode_step``; see the module docstring."""

    def __init__(self, model: Any, kernels: Any) -> None:
        cfg = model.config
        self.model = model
        self.kernels = kernels
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.inter = cfg.intermediate_size
        self.steps = 0
        self._plan: _Plan | None = None
        self._fl: Any = None
        self._busy = threading.Lock()  # a second thread in a step at the same time takes the Python step

    # -- which products ----------------------------------------------------------------------------
    def _spec(self, mod: Any, rows: int) -> Any:
        from experts.backends.cpu_kernels import linear_spec

        fl = getattr(mod, "_expertmix_fast_lora", None)  # a LoRA layer patched by fast_lora
        return fl.kernel_spec(mod, rows) if fl is not None else linear_spec(mod)

    def _fast_lora(self) -> Any:
        """The ``FastLora`` that patched any of the projections (adapters may target only some)."""
        if self._fl is None:
            for layer in self.model.model.layers:
                for part, names in ((layer.self_attn, _PROJ[:4]), (layer.mlp, _PROJ[4:])):
                    for n in names:
                        fl = getattr(getattr(part, n, None), "_expertmix_fast_lora", None)
                        if fl is not None:
                            self._fl = fl
                            return fl
        return self._fl

    def _key(self, rows: int) -> tuple[Any, ...]:
        # a LoRA model's products depend on the current call (the rows' adapters), fixed for a generate
        fl = self._fast_lora()
        return (rows, fl.current_call() if fl is not None else None)

    def _build(self, key: tuple[Any, ...], rows: int) -> _Plan | None:
        import torch

        from experts.backends.cpu_kernels import weight_type

        inner = self.model.model
        hd = inner.layers[0].self_attn.head_dim
        want_out = (self.heads * hd, self.kv_heads * hd, self.kv_heads * hd, self.hidden, self.inter, self.inter,
                    self.hidden)
        want_in = (self.hidden, self.hidden, self.hidden, self.heads * hd, self.hidden, self.hidden, self.inter)
        layers = (_Layer * len(inner.layers))()
        keep: list[Any] = []
        owners: list[tuple[Any, ...]] = []
        for li, layer in enumerate(inner.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if attn.head_dim != hd:
                return None
            mods = [getattr(attn, n) for n in _PROJ[:4]] + [getattr(mlp, n) for n in _PROJ[4:]]
            for pi, mod in enumerate(mods):
                spec = self._spec(mod, rows)
                if spec is None or spec.shape != (want_out[pi], want_in[pi]):
                    return None
                p = layers[li].p[pi]
                p.w, p.scale, p.bias = spec.weight.data_ptr(), _ptr(spec.scale), _ptr(spec.bias)
                p.O, p.I, p.wtype = want_out[pi], want_in[pi], weight_type(spec.weight)
                if spec.a is not None:
                    per_row = spec.a.dim() == 3
                    if per_row and spec.a.shape[0] != rows:
                        return None
                    p.a, p.b, p.rank = spec.a.data_ptr(), spec.b.data_ptr(), spec.a.shape[-1]
                    p.a_stride = spec.a.shape[-2] * spec.a.shape[-1] if per_row else 0
                    p.b_stride = spec.b.shape[-2] * spec.b.shape[-1] if per_row else 0
                keep.append(spec)
                base = getattr(mod, "base_layer", mod)
                owners.append((attn if pi < 4 else mlp, _PROJ[pi], mod, base, base.weight))
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            for ln in (ln1, ln2):
                if ln.weight.dtype != torch.float32 or not ln.weight.is_contiguous():
                    return None
                keep.append(ln.weight)
            layers[li].ln1, layers[li].ln2 = ln1.weight.data_ptr(), ln2.weight.data_ptr()
            layers[li].eps1, layers[li].eps2 = ln1.variance_epsilon, ln2.variance_epsilon
        return _Plan(key, layers, keep, owners)

    def _plan_for(self, rows: int) -> _Plan | None:
        key = self._key(rows)
        plan = self._plan
        if (plan is not None and plan.key[0] == key[0] and plan.key[1] is key[1]
                and all(getattr(parent, name) is mod and base.weight is w and not mod._forward_hooks
                        and not mod._forward_pre_hooks for parent, name, mod, base, w in plan.owners)):
            return plan
        # (re)built when the rows, their adapters, a weight or a hook changed; an unplannable model
        # (e.g. hooks) tries again each step, usually failing at its first projection
        self._plan = plan = self._build(key, rows)
        return plan

    # -- the step ----------------------------------------------------------------------------------
    def step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.Tensor | None,
             cache: Any, past: int) -> torch.Tensor | None:
        """Run every decoder layer on ``x`` (b, 1, hidden) for one new token per row; returns the
        hidden states before the final norm, or None (nothing changed) when this step is not ours."""
        import torch

        b = x.shape[0]
        if not 0 < b <= 4 or x.dtype != torch.float32 or not self.kernels.enabled:
            return None
        layers = cache.layers
        if not layers or layers[0].keys.dtype != torch.float32:
            return None
        if not self._busy.acquire(blocking=False):
            return None
        try:
            return self._step(x, cos, sin, attention_mask, cache, past)
        finally:
            self._busy.release()

    def _step(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention_mask: torch.Tensor | None,
              cache: Any, past: int) -> torch.Tensor | None:
        import torch

        b = x.shape[0]
        plan = self._plan_for(b)
        if plan is None:
            return None
        layers = cache.layers
        kv = getattr(cache, "_expertmix_kv", None)  # per cache: interleaved generations keep their buffers
        if kv is None:
            kv = _KV()
            cache._expertmix_kv = kv
        hd = self.model.model.layers[0].self_attn.head_dim
        if not (kv.ours(layers, past) and kv.k[0].shape[0] == b) and not kv.adopt(layers, past, (b, self.kv_heads, hd)):
            return None
        for i in range(len(layers)):
            plan.layers[i].kc = kv.k[i].data_ptr()
            plan.layers[i].vc = kv.v[i].data_ptr()
        h = x.reshape(b, -1).contiguous().clone()
        cos2 = cos.reshape(-1, cos.shape[-1]).contiguous()
        sin2 = sin.reshape(-1, sin.shape[-1]).contiguous()
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.to(torch.uint8).contiguous()
        attn = self.model.model.layers[0].self_attn
        s = _Step(B=b, H=self.hidden, NH=self.heads, KVH=self.kv_heads, HD=attn.head_dim, FF=self.inter,
                  n_layers=len(layers), cos_rows=cos2.shape[0], cap=kv.cap, T=past, scaling=float(attn.scaling),
                  cos=cos2.data_ptr(), sin=sin2.data_ptr(), mask=_ptr(mask), x=h.data_ptr(), layers=plan.layers)
        rc = self.kernels.decode_step(ctypes.addressof(s))
        if rc != 0:  # refused before touching anything (bad sizes, no memory): the Python step runs
            logger.warning("decode step in C refused (%d); the Python step runs", rc)
            return None
        kv.publish(layers, past + 1)
        self.steps += 1
        return h.view(b, 1, -1)

"""A lean decode step for Llama-family models: transformers' math without its per-layer scaffolding.

One decode step (one new token per row, a ``DynamicCache``) of SmolLM2-135M on a 2-core CPU
spent about two thirds of its time outside the weight products: transformers builds a 4-D mask,
walks ~10 modules per layer with keyword dictionaries and decorators, and pays that Python per
op. Here the step is one flat loop over the layers with fused ops (``F.rms_norm``, SDPA with the
grouped query heads packed like transformers' own decode path) that still calls the projection
*modules* — so the small-batch GEMM path, batched LoRA, merged expert weights, int8 layers and
peft's hooks all apply unchanged. Everything else (prefill, other architectures, a static or
sliding-window cache, ``output_attentions``, training, autograd) goes to transformers' forward.

Same numbers as transformers' forward: greedy tokens identical and logits within 1e-4 on the test
prompts (tests/experts/test_lean_decode.py); ``[base] lean_decode = false`` turns it off.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["LeanDecoder", "install_lean_decode", "unsupported_reason"]

_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "linear", "llama3")
_ALLOWED_KW = frozenset(
    {"input_ids", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "return_dict",
     "logits_to_keep", "cache_position"}
)


def unsupported_reason(model: Any) -> str | None:
    """Why the lean step cannot run ``model`` (a causal LM), or None when it can."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    if cfg is None or inner is None or getattr(model, "lm_head", None) is None:
        return "not a causal LM with .model and .lm_head"
    if cfg.model_type not in _MODEL_TYPES:
        return f"model_type {cfg.model_type!r} (supported: {', '.join(_MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r}"
    if getattr(cfg, "pretraining_tp", 1) not in (1, None):
        return "pretraining_tp > 1"
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        return f"attention implementation {cfg._attn_implementation!r}"
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "sliding-window layers"
    if cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None):
        return "sliding-window attention"
    if cfg.model_type == "qwen2" and getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention"
    rope = getattr(inner, "rotary_emb", None)
    if rope is None or getattr(rope, "rope_type", "default") not in _ROPE_TYPES:
        return f"rotary embedding {getattr(rope, 'rope_type', None)!r}"
    need = {
        "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx"),
        "mlp": ("gate_proj", "up_proj", "down_proj"),
    }
    for layer in getattr(inner, "layers", ()):
        for part, attrs in need.items():
            mod = getattr(layer, part, None)
            if mod is None or any(not hasattr(mod, a) for a in attrs):
                return f"decoder layer without {part}.{{{', '.join(attrs)}}}"
        if any(hasattr(layer.self_attn, n) for n in ("q_norm", "k_norm")):
            return "query/key norms"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "weight") or not hasattr(norm, "variance_epsilon"):
                return "layer norms other than RMSNorm"
    return None


class LeanDecoder:
    """The lean decode step of one causal LM; installed by wrapping its ``forward``."""

    def __init__(self, model: Any, kernels: Any = None) -> None:
        from transformers import DynamicCache
        from transformers.modeling_outputs import CausalLMOutputWithPast

        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:  # transformers < 4.56 keeps key/value lists instead of layers
            DynamicLayer = None
        self.model = model
        self.kernel_step = None  # the whole step in C (kernel_step.py) when the CPU kernels are loaded
        if kernels is not None and getattr(model.config, "intermediate_size", None):
            from experts.backends.kernel_step import KernelStep

            self.kernel_step = KernelStep(model, kernels)
        self.enabled = True
        self.steps = 0  # decode steps run here (the rest went to transformers)
        cfg = model.config
        self._n_layers = cfg.num_hidden_layers
        self._heads = cfg.num_attention_heads
        self._kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self._cache_type = DynamicCache
        self._layer_type = DynamicLayer
        self._out = CausalLMOutputWithPast
        fields = getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
        self._cache_field = "cache" if "cache" in fields else "past_key_values"

    def install(self) -> None:
        """Wrap the model's ``forward`` (signature kept, so ``generate`` passes the same arguments)."""
        model = self.model
        if getattr(model, "_expertmix_lean", None) is not None:
            return
        orig = model.forward

        @functools.wraps(orig)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self.enabled and not args and self._eligible(kwargs):
                return self.step(**kwargs)
            return orig(*args, **kwargs)

        model.forward = forward
        model._expertmix_lean = self

    # -- when ---------------------------------------------------------------------------------------
    def _eligible(self, kw: dict[str, Any]) -> bool:
        import torch

        if not _ALLOWED_KW.issuperset(kw):
            return False
        ids = kw.get("input_ids")
        cache = kw.get("cache", kw.get("past_key_values"))
        if ids is None or ids.dim() != 2 or ids.shape[1] != 1 or type(cache) is not self._cache_type:
            return False
        if torch.is_grad_enabled() or self.model.training or kw.get("use_cache") is False:
            return False
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self._n_layers:
            return False
        if self._layer_type is not None and any(type(x) is not self._layer_type for x in layers):
            return False
        past = cache.get_seq_length()
        mask = kw.get("attention_mask")
        return past > 0 and (mask is None or (mask.dim() == 2 and mask.shape[1] == past + 1))

    # -- the step -----------------------------------------------------------------------------------
    def step(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
        past_key_values: Any = None,
        **_: Any,
    ) -> Any:
        """One decode step: the math of transformers' Llama forward for one new token per row."""
        import torch
        import torch.nn.functional as F

        cache = cache if cache is not None else past_key_values
        inner = self.model.model
        b = input_ids.shape[0]
        past = cache.get_seq_length()
        x = inner.embed_tokens(input_ids)
        if position_ids is None:  # what transformers does without position ids: the cache length
            position_ids = torch.full((1, 1), past, dtype=torch.long, device=x.device)
        cos, sin = inner.rotary_emb(x, position_ids)
        if self.kernel_step is not None:
            h = self.kernel_step.step(x, cos, sin, attention_mask, cache, past)
            if h is not None:
                return self._finish(h, cache)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (b or 1, 1, 1, head_dim)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (b, 1, 1, kv) broadcast over the heads
        n_kv = self._kv_heads
        rep = self._heads // n_kv
        for layer in inner.layers[: self._n_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            hd = attn.head_dim
            ln = layer.input_layernorm
            h = F.rms_norm(x, (x.shape[-1],), ln.weight, ln.variance_epsilon)
            q = attn.q_proj(h).view(b, 1, -1, hd).transpose(1, 2)
            k = attn.k_proj(h).view(b, 1, -1, hd).transpose(1, 2)
            v = attn.v_proj(h).view(b, 1, -1, hd).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys, values = cache.update(k, v, attn.layer_idx)
            # the grouped query heads of one kv head as a short query sequence (transformers' pack_gqa)
            o = F.scaled_dot_product_attention(q.reshape(b, n_kv, rep, hd), keys, values, attn_mask=mask,
                                               scale=attn.scaling)
            x = x + attn.o_proj(o.reshape(b, 1, -1))
            ln = layer.post_attention_layernorm
            h = F.rms_norm(x, (x.shape[-1],), ln.weight, ln.variance_epsilon)
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self._finish(x, cache)

    def _finish(self, x: torch.Tensor, cache: Any) -> Any:
        import torch.nn.functional as F

        norm = self.model.model.norm
        x = F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
        logits = self.model.lm_head(x)
        self.steps += 1
        return self._out(logits=logits, **{self._cache_field: cache})


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def install_lean_decode(model: Any, kernels: Any = None) -> LeanDecoder | None:
    """Install the lean decode step on ``model`` (a causal LM); None (and nothing changed) when unsupported.

    ``kernels`` (:class:`cpu_kernels.Kernels`): run the whole step in C when its products allow."""
    if unsupported_reason(model) is not None:
        return None
    existing = getattr(model, "_expertmix_lean", None)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    lean = LeanDecoder(model, kernels)
    lean.install()
    return lean

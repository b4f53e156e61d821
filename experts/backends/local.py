"""transformers + peft backend: one base model in memory, every expert a named LoRA adapter on it.

A call to :meth:`LocalBackend.generate` runs all (expert, messages) pairs in **one
mixed-adapter batch** (peft's ``adapter_names=``): rows are left-padded to a common
length, each row is routed through its own adapter, ``__base__`` rows through none.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from expertmix.errors import AdapterError, InputError, UnknownExpert
from experts.backends.base import CancelToken, Generation, GenerationConfig
from experts.backends.prefix_cache import PrefixCache, PromptBatch
from experts.backends.prefix_cache import unsupported_reason as prefix_unsupported
from experts.models import BaseModel, load_base
from experts.prompts import Message
from experts.registry import BASE_EXPERT, BaseSpec, ExpertSpec

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_LORA_RANK", "LocalBackend", "validate_adapter_dir", "verify_adapter_weights"]

logger = logging.getLogger(__name__)


def _cancel_criteria(cancels: Sequence[CancelToken | None]) -> Any:
    """A transformers stopping criterion that ends each row whose token is cancelled (checked every step)."""
    if all(c is None for c in cancels):
        return None
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    tokens = list(cancels)

    class _Cancel(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            flags = [c is not None and c.cancelled for c in tokens]
            return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_Cancel()])


def _cache_kwarg() -> str:
    """The name ``generate`` takes a prefilled KV cache under: ``cache`` (transformers 5.x), else ``past_key_values``."""
    import inspect

    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def validate_adapter_dir(path: Path, *, expert: str) -> dict[str, Any]:
    """Check a PEFT adapter directory and return its ``adapter_config.json``."""
    if not path.is_dir():
        raise AdapterError(f"expert {expert!r}: adapter directory {path} does not exist", expert=expert)
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"expert {expert!r}: {path} has no adapter_config.json (not a PEFT adapter)", expert=expert)
    if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"expert {expert!r}: {path} has no adapter_model.safetensors", expert=expert)
    try:
        cfg: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"expert {expert!r}: {cfg_path} is not valid JSON: {exc}", expert=expert) from exc
    if cfg.get("peft_type") not in ("LORA", None):
        raise AdapterError(f"expert {expert!r}: only LoRA adapters are supported, got {cfg.get('peft_type')}", expert=expert)
    r = cfg.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_LORA_RANK:
        raise AdapterError(f"expert {expert!r}: {cfg_path}: LoRA rank r={r!r} must be an integer in [1, {MAX_LORA_RANK}]",
                           expert=expert)
    return cfg


#: largest LoRA rank accepted (bounds memory per adapter; vLLM's --max-lora-rank plays the same role)
MAX_LORA_RANK = 256
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?:A|B|embedding_A|embedding_B)(?:\.[^.]+)?\.weight$")


def verify_adapter_weights(path: Path, model: Any, *, expert: str) -> int:
    """Check an adapter's safetensors against the base before it is attached: the file is readable and
    every LoRA tensor names a module of the base (else the expert would load as a silent no-op).
    Returns the number of LoRA tensors."""
    f = path / "adapter_model.safetensors"
    if not f.is_file():
        return 0  # a legacy .bin adapter: peft checks it while loading
    try:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
    except Exception as exc:
        raise AdapterError(f"expert {expert!r}: {f} is not a readable safetensors file "
                           f"(truncated or corrupted? {type(exc).__name__}: {str(exc)[:120]})", expert=expert) from exc
    modules = {name for name, _ in model.named_modules()}
    # a PeftModel wraps the base: its module names carry a "base_model.model." prefix
    stripped = {m.removeprefix("base_model.model.") for m in modules}
    lora = [m.group("module") for k in keys if (m := _LORA_KEY.match(k))]
    if not lora:
        raise AdapterError(f"expert {expert!r}: {f} holds no LoRA tensors (lora_A / lora_B)", expert=expert)
    unknown = sorted({m for m in lora if m not in stripped})
    if unknown:
        raise AdapterError(
            f"expert {expert!r}: {len(unknown)} LoRA tensor(s) in {f} name modules the base model does not have "
            f"(e.g. {unknown[0]!r}); the adapter was trained for another architecture",
            expert=expert,
        )
    return len(lora)


class LocalBackend:
    """Experts as LoRA adapters on one shared, locally loaded base model. Thread-safe."""

    local_weights = True

    def __init__(self, base: BaseModel, experts: Sequence[ExpertSpec] = ()) -> None:
        self.base = base
        self._lock = threading.RLock()
        self._specs = {e.name: e for e in experts if e.backend == "local"}
        self.model: Any = base.model
        self.tokenizer = base.tokenizer
        self._peft = False
        for spec in self._specs.values():
            self._load_adapter(spec)
        from experts.backends.merged import MergedAdapterCache

        self.merged = MergedAdapterCache(self)
        mb = base.options.prefix_cache_mb
        #: keys and values of prompt prefixes per adapter (prefix_cache.py); None when ``prefix_cache_mb = 0``
        self.prefix: PrefixCache | None = None
        why = prefix_unsupported(self.model) if mb > 0 else None
        if mb > 0 and why is None:
            self.prefix = PrefixCache(max_bytes=mb << 20)
        elif why is not None:
            logger.info("prompt-prefix cache off for %s: %s", base.name, why)
        self._cache_kw = _cache_kwarg()

    @classmethod
    def from_specs(cls, base: BaseSpec, experts: Sequence[ExpertSpec] = ()) -> LocalBackend:
        from experts.models import FastOptions

        return cls(load_base(base.model, device=base.device, dtype=base.dtype, options=FastOptions.of(base)), experts)

    # -- adapters ---------------------------------------------------------------------------------
    def _load_adapter(self, spec: ExpertSpec) -> None:
        import warnings

        assert spec.adapter is not None
        validate_adapter_dir(spec.adapter, expert=spec.name)
        verify_adapter_weights(spec.adapter, self.model, expert=spec.name)
        try:
            with warnings.catch_warnings():
                # a transformers 5 deprecation raised inside peft; nothing for our users to act on
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self._attach(spec)
        except (RuntimeError, ValueError, KeyError) as exc:
            msg = str(exc).splitlines()[0][:300]
            raise AdapterError(
                f"expert {spec.name!r}: adapter {spec.adapter} does not fit base model {self.base.name} "
                f"(trained for another base? {msg})",
                expert=spec.name,
            ) from exc
        self.model.eval()

    def _attach(self, spec: ExpertSpec) -> None:
        if not self._peft:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(
                self.base.model, str(spec.adapter), adapter_name=spec.name, is_trainable=False
            )
            self._peft = True
        else:
            self.model.load_adapter(str(spec.adapter), adapter_name=spec.name, is_trainable=False)
        self._adapter_changed(spec.name)
        from experts.backends.fast_lora import install_fast_paths

        install_fast_paths(self)  # batched LoRA (docs/performance.md); idempotent, extends to new layers

    def _adapter_changed(self, name: str) -> None:
        """An adapter was (re)loaded or deleted: the cached prompt prefixes computed with it are stale."""
        prefix = getattr(self, "prefix", None)
        if prefix is not None:
            prefix.forget(name)

    def add_expert(self, spec: ExpertSpec) -> None:
        """Load one more adapter onto the shared base (e.g. after training)."""
        with self._lock:
            self._load_adapter(spec)
            self._specs[spec.name] = spec

    def expert_names(self) -> list[str]:
        return list(self._specs)

    def check_expert(self, name: str) -> None:
        if name != BASE_EXPERT and name not in self._specs and not self.merged.owns(name):
            known = ", ".join([*self._specs, BASE_EXPERT])
            raise UnknownExpert(f"unknown expert {name!r}; loaded: {known}", expert=name)

    # -- prompts ----------------------------------------------------------------------------------
    def encode_prompt(self, messages: list[Message], *, add_generation_prompt: bool = True) -> list[int]:
        # a list of ids, or a BatchEncoding with tokenizers whose template returns a dict
        ids: Any = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def _check_length(self, n_prompt: int, max_new_tokens: int) -> None:
        ctx = self.base.context_length
        if n_prompt + max_new_tokens > ctx:
            raise InputError(
                f"prompt is {n_prompt} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"{ctx}-token context window of {self.base.name}; shorten the query"
            )

    def check_prompt(self, messages: list[Message], max_new_tokens: int) -> int:
        """Raise InputError unless the prompt plus ``max_new_tokens`` fits the context; return its length."""
        n = len(self.encode_prompt(messages))
        self._check_length(n, max_new_tokens)
        return n

    def batch_inputs(self, prompts: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad token lists into ``(input_ids, attention_mask)`` on the model's device."""
        import torch

        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        dev = self.base.device
        return ids.to(dev), mask.to(dev)

    def _prompt_batch(self, names: Sequence[str], prompts: Sequence[list[int]]) -> PromptBatch:
        """Inputs of one ``generate`` call: each row's cached prompt prefix (its adapter's) is reused."""
        if self.prefix is None:
            ids, mask = self.batch_inputs(prompts)
            return PromptBatch(ids, mask, None)
        return self.prefix.prepare(self.model, names, prompts, self.tokenizer.pad_token_id, self.base.device)

    def _generate(self, batch: PromptBatch, **kw: Any) -> Any:
        """``model.generate`` on ``batch`` (under the lock); its prompts' new prefix blocks are kept."""
        if batch.cache is not None:
            kw[self._cache_kw] = batch.cache
        out = self.model.generate(input_ids=batch.ids, attention_mask=batch.mask, **kw)
        if batch.cache is not None and self.prefix is not None:
            self.prefix.store(batch, batch.cache, self._decoded_with_kv(out, batch.ids.shape[1]))
        return out

    def _decoded_with_kv(self, out: torch.Tensor, width: int) -> list[list[int]]:
        """Each row's decoded tokens up to its end of sequence whose keys and values the cache holds: all but
        the last step's (a conversation's next turn re-sends the answer, so its blocks are worth keeping)."""
        steps = out.shape[1] - width
        rows = out[:, width : width + max(steps - 1, 0)].tolist()
        stop = set(self._eos_ids())
        return [r[: next((i + 1 for i, t in enumerate(r) if t in stop), len(r))] for r in rows]

    def generate_kwargs(self, config: GenerationConfig) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": config.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if config.greedy:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=config.temperature, top_p=config.top_p, top_k=0)
        if config.max_time_s is not None:
            kw["max_time"] = config.max_time_s
        if config.repetition_penalty != 1.0:
            kw["repetition_penalty"] = config.repetition_penalty
        if config.stop:
            kw.update(stop_strings=list(config.stop), tokenizer=self.tokenizer)
        return kw

    def _decode(self, row: list[int], config: GenerationConfig) -> tuple[str, int, str]:
        eos = set(self._eos_ids())
        n = 0
        finish = "length"
        for t in row:
            if t in eos:
                finish = "stop"
                break
            n += 1
        text = cast(str, self.tokenizer.decode(row[:n], skip_special_tokens=True))  # one row: one string
        for s in config.stop:
            cut = text.find(s)
            if cut >= 0:
                text, finish = text[:cut], "stop"
        return text.strip(), n, finish

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [i for i in [*ids, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id] if i is not None]

    # -- generation -------------------------------------------------------------------------------
    def generate(
        self, requests: Sequence[tuple[str, list[Message]]], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> list[Generation]:
        """Generate for every (expert, messages) pair in one mixed-adapter batch."""
        gens = self.generate_rows(requests, config, [cancel] * len(requests))
        if cancel is not None and cancel.cancelled:
            raise cancel.error(expert=requests[0][0] if len(requests) == 1 else None, what="generation")
        return gens

    def generate_rows(
        self,
        requests: Sequence[tuple[str, list[Message]]],
        config: GenerationConfig,
        cancels: Sequence[CancelToken | None],
    ) -> list[Generation]:
        """One mixed-adapter batch; each row stops when its own token is cancelled (``finish_reason``
        "cancelled"). Used directly by the dynamic batcher, whose rows belong to different callers."""
        import torch

        if not requests:
            return []
        for name, _ in requests:
            self.check_expert(name)
        prompts = [self.encode_prompt(m) for _, m in requests]
        for p in prompts:
            self._check_length(len(p), config.max_new_tokens)
        batch = self._prompt_batch([name for name, _ in requests], prompts)
        kw = self.generate_kwargs(config)
        if self._peft:
            kw["adapter_names"] = [name for name, _ in requests]
        criteria = _cancel_criteria(cancels)
        if criteria is not None:
            kw["stopping_criteria"] = criteria
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            if config.seed is not None:
                torch.manual_seed(config.seed)
            out = self._generate(batch, **kw)
        latency = time.perf_counter() - t0
        new = out[:, batch.ids.shape[1] :].tolist()
        gens = []
        for (name, _), p, row, c in zip(requests, prompts, new, cancels):
            text, n, finish = self._decode(row, config)
            if c is not None and c.cancelled and finish == "length" and n < config.max_new_tokens:
                finish = "cancelled"
            gens.append(Generation(name, text, n, latency, prompt_tokens=len(p), finish_reason=finish))
        return gens

    def stream(
        self, expert: str, messages: list[Message], config: GenerationConfig, *, cancel: CancelToken | None = None
    ) -> Iterator[str]:
        """Yield text chunks of one expert's answer as they are decoded.

        Closing the iterator early (a dropped client) stops decoding within one step and
        releases the backend at once; a cancelled ``cancel`` does the same and raises."""
        import torch
        from transformers import TextIteratorStreamer

        self.check_expert(expert)
        prompt = self.encode_prompt(messages)
        self._check_length(len(prompt), config.max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=0.1)
        own = CancelToken(parent=cancel)
        kw = self.generate_kwargs(config)
        kw["stopping_criteria"] = _cancel_criteria([own])
        if self._peft:
            kw["adapter_names"] = [expert]
        errors: list[BaseException] = []

        def run() -> None:
            try:
                with self._lock, torch.inference_mode():
                    if own.cancelled:
                        return
                    if config.seed is not None:
                        torch.manual_seed(config.seed)
                    # the prefix lookup under the lock: blocks stored by the generation before this one count
                    self._generate(self._prompt_batch([expert], [prompt]), streamer=streamer, **kw)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
                errors.append(exc)
            finally:
                streamer.end()  # type: ignore[no-untyped-call]  # transformers leaves it unannotated

        thread = threading.Thread(target=run, name=f"expertmix-stream-{expert}", daemon=True)
        thread.start()
        import queue as _queue

        try:
            while True:
                try:
                    chunk = next(streamer)
                except StopIteration:
                    break
                except _queue.Empty:
                    if own.cancelled and not thread.is_alive():
                        break
                    continue
                if chunk:
                    yield chunk
        finally:
            own.cancel("stream closed")
            thread.join()
        if errors:
            raise errors[0]
        if cancel is not None and cancel.cancelled:
            raise cancel.error(expert=expert, what="stream")

    # -- local weights (mixture, adapter_merge) -------------------------------------------------------
    def mixture_generate(
        self, messages: list[Message], weights: Mapping[str, float], config: GenerationConfig, *,
        cancel: CancelToken | None = None,
    ) -> Generation:
        """Token-level mixture p(t) = Σ wᵢ·pᵢ(t) over the named adapters (see ``mixture.py``)."""
        from experts.backends.mixture import mixture_generate

        return mixture_generate(self, messages, weights, config, cancel=cancel)

    def merged_adapter(self, weights: Mapping[str, float]) -> str:
        """An adapter equal to Σ wᵢ·ΔWᵢ (LRU-cached); one expert with (almost) all weight is itself."""
        key = self.merged.key(dict(weights))
        if len(key) == 1:
            return key[0][0]
        return self.merged.get(dict(weights))

    # -- scoring (benchmarks, tests) ----------------------------------------------------------------
    def score_nll(self, expert: str, messages: list[Message], response: str) -> tuple[float, int]:
        """Sum of negative log-likelihood of ``response`` tokens after the prompt, and their count."""
        import torch

        self.check_expert(expert)
        prompt = self.encode_prompt(messages)
        full = self.encode_prompt([*messages, {"role": "assistant", "content": response}], add_generation_prompt=False)
        # the chat template appends the assistant turn after the generation prompt
        target = full[len(prompt) :]
        ids = torch.tensor([prompt + target], device=self.base.device)
        kw: dict[str, Any] = {}
        if self._peft:
            kw["adapter_names"] = [expert]
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, **kw).logits[0, len(prompt) - 1 : -1].float()
        tgt = ids[0, len(prompt) :]
        nll = torch.nn.functional.cross_entropy(logits, tgt, reduction="sum")
        return float(nll), int(tgt.numel())

    def close(self) -> None:
        pass

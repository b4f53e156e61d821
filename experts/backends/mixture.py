"""Token-level mixture decoding: p(t) = Σ wᵢ·pᵢ(t) over several adapters, one forward pass per step.

The prompt is repeated once per selected adapter and decoded as one mixed-adapter
batch through transformers' own ``generate`` loop (KV cache included). A logits
processor replaces every row's scores with the log of the weighted mixture and then
picks the next token itself (argmax, or a sample from the mixture), so all rows emit
the same token and stay in lockstep.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from expertmix.errors import StrategyError
from experts.backends.base import CancelToken, Generation, GenerationConfig
from experts.backends.local import _cancel_criteria
from experts.prompts import Message

if TYPE_CHECKING:
    import torch

    from experts.backends.local import LocalBackend

__all__ = ["mixture_generate"]


def _processor(weights: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None) -> Any:
    import torch

    def mix(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if config.greedy:  # argmax of Σ wᵢ pᵢ: one softmax pass (the log-space form cost ~2 ms a step)
            token = int(torch.argmax(weights @ torch.softmax(scores.float(), dim=-1)))
        else:
            logp = torch.log_softmax(scores.float(), dim=-1)  # (n_adapters, vocab)
            mixed = torch.logsumexp(logp + torch.log(weights)[:, None], dim=0)  # log Σ wᵢ pᵢ
            probs = torch.softmax(mixed / config.temperature, dim=-1)
            if config.top_p < 1:
                sorted_p, idx = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < config.top_p
                probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
                probs = probs / probs.sum()
            token = int(torch.multinomial(probs, 1, generator=generator))
        out = torch.full_like(scores, float("-inf"))
        out[:, token] = 0.0
        return out

    return mix


def mixture_generate(
    backend: LocalBackend,
    messages: list[Message],
    weights: Mapping[str, float],
    config: GenerationConfig,
    *,
    cancel: CancelToken | None = None,
) -> Generation:
    """Decode one answer from the weighted token-level mixture of the given experts."""
    import torch
    from transformers import LogitsProcessorList

    items = [(n, float(w)) for n, w in weights.items() if w > 0]
    if not items:
        raise StrategyError("mixture needs at least one positive weight")
    for n, _ in items:
        backend.check_expert(n)
    total = sum(w for _, w in items)
    w = torch.tensor([x / total for _, x in items], device=backend.base.device)
    prompt = backend.encode_prompt(messages)
    backend._check_length(len(prompt), config.max_new_tokens)
    batch = backend._prompt_batch([n for n, _ in items], [prompt] * len(items))
    # the processor picks the token itself: transformers decodes greedily over its one-hot scores;
    # every other option (repetition penalty, stop strings, deadline) is the request's own
    kw = backend.generate_kwargs(replace(config, temperature=0.0, top_p=1.0, seed=None))
    criteria = _cancel_criteria([cancel] * len(items))
    if criteria is not None:
        kw["stopping_criteria"] = criteria
    if backend._peft:
        kw["adapter_names"] = [n for n, _ in items]
    gen = None
    if config.seed is not None:
        gen = torch.Generator(device=backend.base.device).manual_seed(config.seed)
    kw["logits_processor"] = LogitsProcessorList([_processor(w, config, gen)])
    t0 = time.perf_counter()
    with backend._lock, torch.inference_mode():
        out = backend._generate(batch, **kw)
    latency = time.perf_counter() - t0
    if cancel is not None and cancel.cancelled:
        raise cancel.error(expert="+".join(n for n, _ in items), what="mixture generation")
    row = out[0, batch.ids.shape[1] :].tolist()
    text, n_tokens, finish = backend._decode(row, config)
    return Generation(
        "+".join(n for n, _ in items),
        text,
        n_tokens,
        latency,
        prompt_tokens=len(prompt),
        finish_reason=finish,
        extra={"weights": {n: x / total for n, x in items}},
    )

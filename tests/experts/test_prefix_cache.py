"""Prompt-prefix KV cache: a reused prefix gives the numbers of a full prefill (greedy tokens identical,
logits within 1e-4) on the real SmolLM2 base with mixed adapters and padded rows; blocks are per adapter,
bounded, and dropped when an adapter's weights change."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from experts.backends.base import GenerationConfig
from experts.backends.prefix_cache import PrefixCache
from experts.registry import BASE_EXPERT

Q1 = [{"role": "user", "content": "Our checkout page got slow after the deploy. How do we profile it?"}]
Q2 = [{"role": "user", "content": "How should we price the new enterprise plan for a customer with 400 seats?"}]
CHAT = [
    {"role": "system", "content": "You answer briefly, as the company's internal help desk."},
    {"role": "user", "content": "What is our refund window?"},
    {"role": "assistant", "content": "Thirty days from the invoice date."},
    {"role": "user", "content": "And for annual plans that were paid up front?"},
]


@contextlib.contextmanager
def prefix_cache(backend: Any, cache: PrefixCache | None) -> Iterator[PrefixCache | None]:
    keep = backend.prefix
    backend.prefix = cache
    try:
        yield cache
    finally:
        backend.prefix = keep


def _scored(backend: Any, names: list[str], prompts: list[list[int]], n: int) -> tuple[Any, Any]:
    """Greedy tokens and per-step scores of one batch through the backend's input path."""
    import torch

    batch = backend._prompt_batch(names, prompts)
    kw: dict[str, Any] = {"adapter_names": names} if backend._peft else {}
    if batch.cache is not None:
        kw[backend._cache_kw] = batch.cache
    with backend._lock, torch.inference_mode():
        out = backend.model.generate(input_ids=batch.ids, attention_mask=batch.mask, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=backend.tokenizer.pad_token_id,
                                     output_scores=True, return_dict_in_generate=True, **kw)
    if batch.cache is not None:
        backend.prefix.store(batch, batch.cache)
    return out.sequences[:, batch.ids.shape[1]:], out.scores


def test_reused_prefix_matches_a_full_prefill_on_a_mixed_padded_batch(local_backend: Any) -> None:
    import torch

    names = ["finance", "engineering", BASE_EXPERT]  # two adapters and the plain base, prompts of three lengths
    prompts = [local_backend.encode_prompt(m) for m in (Q1, Q2, CHAT)]
    with prefix_cache(local_backend, None):
        ref_tokens, ref_scores = _scored(local_backend, names, prompts, 8)
    with prefix_cache(local_backend, PrefixCache(max_bytes=64 << 20, block=8)) as pc:
        # warm: other questions with the same chat template, each row on its own adapter
        warm = [local_backend.encode_prompt([{"role": "user", "content": f"Question {i} about budgets?"}])
                for i in range(len(names))]
        _scored(local_backend, names, warm, 2)
        assert pc is not None and len(pc) > 0
        batch = local_backend._prompt_batch(names, prompts)
        # the default template's start comes from the cache; the chat with its own system prompt has none cached:
        # its row is left-padded under the others' cached columns
        assert min(batch.reused[:2]) >= 16 and batch.reused[2] == 0, batch.reused
        tokens, scores = _scored(local_backend, names, prompts, 8)
        # the same prompts again: every full block but the last token's comes from the cache
        again = local_backend._prompt_batch(names, prompts)
        assert all(h >= len(p) - 8 for h, p in zip(again.reused, prompts)), again.reused
        tokens2, scores2 = _scored(local_backend, names, prompts, 8)
    for toks, sc in ((tokens, scores), (tokens2, scores2)):
        assert torch.equal(toks, ref_tokens)
        worst = max(float((x - y).nan_to_num(0.0, 0.0, 0.0).abs().max()) for x, y in zip(sc, ref_scores))
        assert worst < 1e-4, worst


def test_generate_and_mixture_give_the_same_tokens_with_the_cache(local_backend: Any) -> None:
    from experts.backends.mixture import mixture_generate

    cfg = GenerationConfig(max_new_tokens=6)
    reqs = [("engineering", Q1), ("product", CHAT)]
    with prefix_cache(local_backend, None):
        ref = [g.text for g in local_backend.generate(reqs, cfg)]
        ref_mix = mixture_generate(local_backend, Q2, {"finance": 0.6, "product": 0.4}, cfg).text
    with prefix_cache(local_backend, PrefixCache(max_bytes=64 << 20)) as pc:
        for _ in range(2):  # cold, then warm
            assert [g.text for g in local_backend.generate(reqs, cfg)] == ref
            assert mixture_generate(local_backend, Q2, {"finance": 0.6, "product": 0.4}, cfg).text == ref_mix
        assert pc is not None and pc.hits > 0


def test_blocks_are_per_adapter_bounded_and_forgotten(local_backend: Any) -> None:
    prompt = local_backend.encode_prompt(Q1)
    with prefix_cache(local_backend, PrefixCache(max_bytes=64 << 20, block=8)) as pc:
        assert pc is not None
        _scored(local_backend, ["finance"], [prompt], 1)
        n = len(pc)
        assert n == len(prompt) // 8
        # another adapter does not see finance's keys and values
        assert local_backend._prompt_batch(["product"], [prompt]).reused[0] == 0
        assert local_backend._prompt_batch(["finance"], [prompt]).reused[0] == (len(prompt) - 1) // 8 * 8
        # a prompt of exactly whole blocks still prefills its last block: generate needs its logits
        exact = prompt[: len(prompt) // 8 * 8]
        assert local_backend._prompt_batch(["finance"], [exact]).reused[0] == len(exact) - 8
        pc.forget("finance")
        assert len(pc) == 0 and pc.bytes == 0
        assert local_backend._prompt_batch(["finance"], [prompt]).reused[0] == 0
    # bounded: a budget of three blocks keeps the three most recently used, the prefix's start last
    small = PrefixCache(max_bytes=1, block=8)
    with prefix_cache(local_backend, small):
        _scored(local_backend, ["finance"], [prompt], 1)
    assert len(small) == 0 and small.bytes == 0
    one = PrefixCache(max_bytes=64 << 20, block=8)
    with prefix_cache(local_backend, one):
        _scored(local_backend, ["finance"], [prompt], 1)
    per_block = one.bytes // len(one)
    three = PrefixCache(max_bytes=3 * per_block, block=8)
    with prefix_cache(local_backend, three):
        _scored(local_backend, ["finance"], [prompt], 1)
        assert len(three) == 3 and three.bytes <= three.max_bytes
        assert local_backend._prompt_batch(["finance"], [prompt]).reused[0] == 24


def test_a_reloaded_adapter_drops_its_blocks(local_backend: Any) -> None:
    prompt = local_backend.encode_prompt(Q1)
    with prefix_cache(local_backend, PrefixCache(max_bytes=64 << 20)) as pc:
        assert pc is not None
        _scored(local_backend, ["engineering"], [prompt], 1)
        assert len(pc) > 0
        local_backend._adapter_changed("engineering")
        assert len(pc) == 0


def test_prefix_cache_config_is_validated() -> None:
    from expertmix.errors import ConfigError
    from experts.models import FastOptions
    from experts.registry import parse_base

    assert FastOptions.of(parse_base({"prefix_cache_mb": 0}, path="x.toml")).prefix_cache_mb == 0
    assert FastOptions.of(parse_base({}, path="x.toml")).prefix_cache_mb == FastOptions().prefix_cache_mb > 0
    for bad in (-1, "64", 1.5, True):
        with pytest.raises(ConfigError, match="prefix_cache_mb"):
            parse_base({"prefix_cache_mb": bad}, path="x.toml")


def test_models_whose_cache_drops_tokens_are_not_cached() -> None:
    from types import SimpleNamespace

    from experts.backends.prefix_cache import unsupported_reason

    def model(**cfg: Any) -> Any:
        return SimpleNamespace(config=SimpleNamespace(**cfg))

    assert unsupported_reason(model(layer_types=["full_attention"] * 2)) is None
    assert unsupported_reason(model(sliding_window=4096, use_sliding_window=False)) is None  # Qwen2's default
    assert "full attention" in unsupported_reason(model(layer_types=["sliding_attention", "full_attention"]))
    assert "sliding" in unsupported_reason(model(sliding_window=4096))


def test_the_next_turn_of_a_conversation_reuses_the_answer(local_backend: Any) -> None:
    cfg = GenerationConfig(max_new_tokens=12)
    follow = {"role": "user", "content": "Say that again in one sentence."}
    with prefix_cache(local_backend, None):
        first = local_backend.generate([("engineering", Q1)], cfg)[0].text
        turn2 = [*Q1, {"role": "assistant", "content": first}, follow]
        ref = local_backend.generate([("engineering", turn2)], cfg)[0].text
    with prefix_cache(local_backend, PrefixCache(max_bytes=64 << 20, block=8)) as pc:
        assert pc is not None
        assert local_backend.generate([("engineering", Q1)], cfg)[0].text == first
        # the answer's tokens were decoded after the prompt: their blocks are cached too
        asked = len(local_backend.encode_prompt(Q1))
        assert pc.cached_tokens("engineering", local_backend.encode_prompt(turn2)) > asked
        assert local_backend.generate([("engineering", turn2)], cfg)[0].text == ref

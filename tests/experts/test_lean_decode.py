"""The lean decode step gives transformers' numbers: greedy tokens identical, logits within 1e-4 —
on the real SmolLM2 base (padded batch, mixed adapters) and on tiny random Llama/Qwen2 models of
other shapes; anything it does not support keeps transformers' own forward."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from experts.backends.base import GenerationConfig

MSGS = [{"role": "user", "content": "Our checkout page got slow after the deploy. How do we profile it?"}]


@contextlib.contextmanager
def lean(model: Any, on: bool) -> Iterator[Any]:
    ld = model._expertmix_lean
    keep = ld.enabled
    ld.enabled = on
    try:
        yield ld
    finally:
        ld.enabled = keep


def _generate(model: Any, ids: Any, mask: Any, n: int, pad: int) -> Any:
    import torch

    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=pad, output_scores=True, return_dict_in_generate=True)


def _assert_same(a: Any, b: Any) -> None:
    import torch

    assert torch.equal(a.sequences, b.sequences)
    worst = max(float((x - y).nan_to_num(0.0, 0.0, 0.0).abs().max()) for x, y in zip(a.scores, b.scores))
    assert worst < 1e-4, worst


def _padded(prompts: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def test_lean_step_matches_transformers_on_a_padded_batch(local_backend: Any) -> None:
    model = local_backend.base.model
    assert getattr(model, "_expertmix_lean", None) is not None, "load_base should install the lean step on CPU"
    prompt = local_backend.encode_prompt(MSGS)
    ids, mask = _padded([prompt, prompt[5:], prompt[11:]], local_backend.tokenizer.pad_token_id)
    with lean(model, True) as ld:
        before = ld.steps
        on = _generate(local_backend.base.model, ids, mask, 10, local_backend.tokenizer.pad_token_id)
        assert ld.steps - before == 9, "every decode step after the prefill should take the lean path"
    with lean(model, False):
        off = _generate(local_backend.base.model, ids, mask, 10, local_backend.tokenizer.pad_token_id)
    _assert_same(on, off)


def test_lean_step_keeps_mixed_adapter_answers(local_backend: Any) -> None:
    rows = ["finance", "engineering", "__base__"]
    cfg = GenerationConfig(max_new_tokens=10)
    with lean(local_backend.base.model, True) as ld:
        before = ld.steps
        on = [g.text for g in local_backend.generate([(r, MSGS) for r in rows], cfg)]
        assert ld.steps > before
    with lean(local_backend.base.model, False):
        off = [g.text for g in local_backend.generate([(r, MSGS) for r in rows], cfg)]
    assert on == off
    assert len(set(on)) > 1, "random adapters should change the answers, or this test shows nothing"


def test_requests_it_does_not_cover_go_to_transformers(local_backend: Any) -> None:
    import torch

    model = local_backend.base.model
    ids, mask = local_backend.batch_inputs([local_backend.encode_prompt(MSGS)])
    with lean(model, True) as ld, torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        before = ld.steps
        nxt = out.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, mask.new_ones((1, 1))], dim=-1)
        attn = model(input_ids=nxt, attention_mask=mask2, cache=cache, output_attentions=True)
        assert ld.steps == before, "output_attentions is transformers' job"
        assert attn.logits.shape[:2] == (1, 1)


def _tiny(kind: str, **extra: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", **extra)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


@pytest.mark.parametrize(("kind", "extra"), [
    ("llama", {}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 64}}),
    ("qwen2", {}),  # biases on q/k/v
], ids=["llama", "llama3-rope", "qwen2"])
def test_lean_step_matches_transformers_on_other_shapes(kind: str, extra: dict[str, Any]) -> None:
    import torch

    from experts.backends.lean_decode import install_lean_decode

    model = _tiny(kind, **extra)
    ld = install_lean_decode(model)
    assert ld is not None
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 5, 7)]
    ids, mask = _padded(prompts, 0)
    on = _generate(model, ids, mask, 8, 0)
    assert ld.steps == 7
    ld.enabled = False
    _assert_same(on, _generate(model, ids, mask, 8, 0))


def test_unsupported_models_keep_their_forward() -> None:
    from experts.backends.lean_decode import install_lean_decode, unsupported_reason

    model = _tiny("llama", hidden_act="gelu")
    forward = model.forward
    assert "hidden_act" in (unsupported_reason(model) or "")
    assert install_lean_decode(model) is None
    assert model.forward == forward and getattr(model, "_expertmix_lean", None) is None

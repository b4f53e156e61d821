"""The whole decode step in C (kernel_step.py) gives transformers' numbers: greedy tokens identical and
logits within 1e-4 — tiny Llama/Qwen2 models (GQA, q/k/v biases, padding, int8 and 4-bit weights), the real
SmolLM2 with merged, single and mixed adapters, a cache cropped or re-selected between steps; and
whatever it does not cover (5+ rows, hooks, kernels switched off) runs the Python step instead."""

from __future__ import annotations

from typing import Any

import pytest

from experts.backends import cpu_kernels
from experts.backends.base import GenerationConfig

pytestmark = pytest.mark.skipif(
    cpu_kernels.unavailable_reason() is not None, reason=f"kernels unavailable here: {cpu_kernels.unavailable_reason()}"
)

MSGS = [{"role": "user", "content": "Which metrics should we track after the pricing change ships?"}]


def _tiny(kind: str) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common: dict[str, Any] = {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512,
                              "attn_implementation": "sdpa"}
    if kind == "llama-wide":  # every projection's inputs split into groups of 32 (4-bit weights)
        common.update(hidden_size=64, intermediate_size=96, num_attention_heads=4)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _padded(n_rows: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(1)
    lens = [9, 5, 7, 6, 8][:n_rows]
    ids = torch.zeros((n_rows, max(lens)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, -n:] = torch.randint(3, 97, (n,), generator=g)
        mask[i, -n:] = 1
    return ids, mask


def _generate(model: Any, ids: Any, mask: Any, n: int) -> Any:
    import torch

    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              pad_token_id=0, output_scores=True, return_dict_in_generate=True)


def _on_transformers(ld: Any, fn: Any) -> Any:
    """``fn()`` with the lean step (and so the C step) off: transformers' own forward."""
    ld.enabled = False
    try:
        return fn()
    finally:
        ld.enabled = True


def _assert_same(a: Any, b: Any, tol: float = 1e-4) -> None:
    import torch

    assert torch.equal(a.sequences, b.sequences)
    worst = max(float((x - y).nan_to_num(0.0, 0.0, 0.0).abs().max()) for x, y in zip(a.scores, b.scores))
    assert worst < tol, worst


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama-int8", "llama-int4"])
def test_c_step_matches_transformers(kind: str) -> None:
    from experts.backends.lean_decode import install_lean_decode

    model = _tiny("llama-wide" if kind.endswith("int4") else kind.split("-")[0])
    if kind.endswith(("int8", "int4")):
        from experts.quantize import quantize_model

        quantize_model(model, kind.split("-")[1])
    ld = install_lean_decode(model, cpu_kernels.load())
    assert ld is not None and ld.kernel_step is not None
    for rows in (1, 3, 4):
        ids, mask = _padded(rows)
        before = ld.kernel_step.steps
        ours = _generate(model, ids, mask, 8)
        assert ld.kernel_step.steps - before == 7, "every decode step should run in C"
        # 4-bit: both sides run the same kernel, which rounds its inputs to int16 per group, so a
        # 1e-6 difference upstream (C vs torch RMSNorm/attention) can move a value by one step
        _assert_same(ours, _on_transformers(ld, lambda ids=ids, mask=mask: _generate(model, ids, mask, 8)),
                     tol=2e-3 if kind.endswith("int4") else 1e-4)


def test_cache_changed_between_steps_is_noticed() -> None:
    """Cropping or re-selecting rows of the cache between steps (as assisted decoding and beam search
    do) must not leave stale positions in the step's buffers."""
    import torch

    model = _tiny("llama")
    from experts.backends.lean_decode import install_lean_decode

    ld = install_lean_decode(model, cpu_kernels.load())

    def run(use_c: bool) -> list[Any]:
        ld.enabled = use_c
        ids, mask = _padded(3)
        out: list[Any] = []
        with torch.inference_mode():
            o = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = getattr(o, "cache", None) or o.past_key_values
            nxt = o.logits[:, -1:].argmax(-1)
            for i in range(9):
                if i == 3:  # drop the last two positions, as a rejected draft would
                    cache.crop(-2)
                    mask = mask[:, :-2]
                if i == 6:  # keep rows 2 and 0, in that order
                    cache.batch_select_indices(torch.tensor([2, 0]))
                    mask, nxt = mask[[2, 0]], nxt[[2, 0]]
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], -1)
                o = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
                nxt = o.logits[:, -1:].argmax(-1)
                out.append(o.logits)
        return out

    try:
        before = ld.kernel_step.steps
        ours = run(True)
        assert ld.kernel_step.steps - before == 9
        theirs = run(False)
    finally:
        ld.enabled = True
    assert max(float((a - b).abs().max()) for a, b in zip(ours, theirs)) < 1e-4


def test_what_it_does_not_cover_runs_the_python_step() -> None:
    model = _tiny("llama")
    from experts.backends.lean_decode import install_lean_decode

    ld = install_lean_decode(model, cpu_kernels.load())
    ks = ld.kernel_step
    ids, mask = _padded(5)
    steps, c_steps = ld.steps, ks.steps
    _generate(model, ids, mask, 4)  # five rows: more than the kernels take
    assert ld.steps - steps == 3 and ks.steps == c_steps
    ids, mask = _padded(2)
    handle = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    try:
        _generate(model, ids, mask, 4)  # a hook must see its module called
        assert ld.steps - steps == 6 and ks.steps == c_steps
    finally:
        handle.remove()
    ks.kernels.enabled = False
    try:
        _generate(model, ids, mask, 4)
        assert ks.steps == c_steps
    finally:
        ks.kernels.enabled = True
    _generate(model, ids, mask, 4)
    assert ks.steps == c_steps + 3


def test_adapters_run_in_c_with_the_same_answers(local_backend: Any) -> None:
    """Merged single expert, one adapter on LoRA (no merge), mixed adapters and the base, on SmolLM2."""
    ld = local_backend.base.model._expertmix_lean
    ks = ld.kernel_step
    if ks is None:
        pytest.skip("the GEMM probe did not choose the kernels on this machine")
    fl = local_backend.fast_lora
    cfg = GenerationConfig(max_new_tokens=8)
    batches = (["finance", "engineering", "__base__"], ["product"], ["__base__", "__base__"], ["finance", "finance"])
    keep = fl.merged_experts if fl else 0
    answers: dict[bool, list[list[str]]] = {}
    try:
        for use_c in (True, False):
            ks.kernels.enabled = use_c  # off: the Python step with torch's products
            before = ks.steps
            answers[use_c] = [[g.text for g in local_backend.generate([(r, MSGS) for r in rows], cfg)]
                              for rows in batches]
            if fl:
                fl.merged_experts = 0  # the single expert on its LoRA instead of merged weights
                answers[use_c].append([g.text for g in local_backend.generate([("engineering", MSGS)], cfg)])
                fl.merged_experts = keep
            assert (ks.steps > before) == use_c
    finally:
        ks.kernels.enabled = True
        if fl:
            fl.merged_experts = keep
    assert answers[True] == answers[False]


def test_adapters_on_some_projections_only() -> None:
    """LoRA on the MLP only: the step's plan must still follow the rows' adapters (a plan keyed on a
    projection without LoRA would reuse one adapter's products for the next)."""
    from peft import LoraConfig, get_peft_model

    from experts.backends.fast_lora import install_fast_lora
    from experts.backends.lean_decode import install_lean_decode

    model = _tiny("llama")
    ld = install_lean_decode(model, cpu_kernels.load())
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False)
    peft = get_peft_model(model, cfg, adapter_name="a")
    peft.add_adapter("b", cfg)
    peft.eval()
    assert install_fast_lora(peft, kernels=cpu_kernels.load()) is not None
    ids, mask = _padded(2)

    def gen(names: list[str]) -> Any:
        import torch

        with torch.inference_mode():
            return peft.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                                 adapter_names=names)

    batches = (["a", "a"], ["b", "b"], ["a", "b"])
    before = ld.kernel_step.steps
    ours = [gen(n) for n in batches]
    assert ld.kernel_step.steps - before == 15
    theirs = _on_transformers(ld, lambda: [gen(n) for n in batches])
    for a, b in zip(ours, theirs):
        _assert_same(a, b)
    assert not all(float((x - y).abs().max()) < 1e-3 for x, y in zip(ours[0].scores, ours[1].scores)), \
        "the two adapters should give different logits, or this test shows nothing"


def test_a_cache_of_other_rows_is_refused_not_read() -> None:
    import torch

    from experts.backends.lean_decode import install_lean_decode

    model = _tiny("llama")
    ks = install_lean_decode(model, cpu_kernels.load()).kernel_step
    ids, mask = _padded(3)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        past = cache.get_seq_length()
        x = model.model.embed_tokens(torch.tensor([[5], [6]]))  # two rows against a three-row cache
        cos, sin = model.model.rotary_emb(x, torch.full((1, 1), past))
        keys = [lay.keys.clone() for lay in cache.layers]
        assert ks.step(x, cos, sin, None, cache, past) is None
    assert all(torch.equal(k, lay.keys) for k, lay in zip(keys, cache.layers))


def test_modules_swapped_after_a_step_are_noticed() -> None:
    """peft wrapping the projections after a decode step ran (its own adapter path, no fast_lora):
    the plan built on the plain Linears must not be reused, or the LoRA would be skipped."""
    from peft import LoraConfig, get_peft_model

    from experts.backends.lean_decode import install_lean_decode

    model = _tiny("llama")
    ld = install_lean_decode(model, cpu_kernels.load())
    ids, mask = _padded(2)
    _generate(model, ids, mask, 3)  # a plan for two rows on the plain model
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft = get_peft_model(model, cfg).eval()
    steps = ld.kernel_step.steps
    ours = _generate(peft, ids, mask, 6)
    assert ld.kernel_step.steps == steps, "peft's own LoRA layers are not the kernels': the Python step runs"
    _assert_same(ours, _on_transformers(ld, lambda: _generate(peft, ids, mask, 6)))

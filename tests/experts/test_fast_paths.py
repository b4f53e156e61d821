"""Fast paths give the same answers: batched LoRA vs peft's ``adapter_names`` loop, merged single
experts, the small-batch GEMM path, int8 weights; plus the ``[base]`` knobs that pick them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from expertmix.errors import ConfigError
from experts.backends.base import GenerationConfig

MSGS = [{"role": "user", "content": "How should a team budget for a new product launch?"}]
ROWS = ["finance", "engineering", "product", "__base__"]


@contextlib.contextmanager
def peft_path(backend: Any) -> Iterator[None]:
    """Run peft's own mixed-adapter path (hooks + per-adapter index loop) instead of ours."""
    fl = backend.fast_lora
    assert fl is not None, "the local backend should have installed the batched LoRA path"
    fl.enabled = False
    try:
        yield
    finally:
        fl.enabled = True


def _logits(backend: Any, rows: list[str]) -> Any:
    import torch

    ids, mask = backend.batch_inputs([backend.encode_prompt(MSGS)] * len(rows))
    with backend._lock, torch.inference_mode():
        return backend.model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits[:, -3:].float()


def _texts(backend: Any, rows: list[str], n: int = 12) -> list[str]:
    cfg = GenerationConfig(max_new_tokens=n)
    return [g.text for g in backend.generate([(r, MSGS) for r in rows], cfg)]


def test_mixed_batch_matches_peft(local_backend: Any) -> None:
    import torch

    fast_logits, fast_text = _logits(local_backend, ROWS), _texts(local_backend, ROWS)
    assert local_backend.fast_lora.calls is not None
    with peft_path(local_backend):
        ref_logits, ref_text = _logits(local_backend, ROWS), _texts(local_backend, ROWS)
    assert fast_text == ref_text
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)
    # the adapters differ, so the rows must too (else the test would prove nothing)
    assert not torch.allclose(fast_logits[0], fast_logits[1], atol=1e-3)


def test_single_expert_merged_matches_peft(local_backend: Any) -> None:
    import torch

    fl = local_backend.fast_lora
    assert fl.merged_experts >= 1
    fast_logits, fast_text = _logits(local_backend, ["engineering"]), _texts(local_backend, ["engineering"] * 2)
    assert "engineering" in fl._merged, "a single-expert call should run on merged weights"
    with peft_path(local_backend):
        ref_logits, ref_text = _logits(local_backend, ["engineering"]), _texts(local_backend, ["engineering"] * 2)
    assert fast_text == ref_text
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_single_expert_fused_matches_peft(local_backend: Any) -> None:
    import torch

    fl = local_backend.fast_lora
    keep = fl.merged_experts
    fl.merged_experts = 0  # the fused (x @ A) @ B path
    try:
        fast_logits = _logits(local_backend, ["product", "product"])
    finally:
        fl.merged_experts = keep
    with peft_path(local_backend):
        ref_logits = _logits(local_backend, ["product", "product"])
    torch.testing.assert_close(fast_logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_unknown_adapter_is_refused(local_backend: Any) -> None:
    with pytest.raises(ValueError, match="non-existing adapter"):
        _logits(local_backend, ["finance", "nope"])


def test_small_rows_linear_equals_linear() -> None:
    import torch
    import torch.nn.functional as F

    from experts.backends.cpu_tuning import small_rows_linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g)
    for shape in [(1, 64), (2, 1, 64), (3, 1, 64), (4, 64), (2, 5, 64), (1, 3, 64)]:
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(small_rows_linear(x, w, b, 4), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        # padded row counts (one row as two: threaded GEMM instead of gemv; three as four): the same numbers
        pad = {1: 2, 3: 4}
        torch.testing.assert_close(small_rows_linear(x, w, b, 4, pad), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(small_rows_linear(x, w, None, 4, pad), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_pad_choice_takes_a_larger_row_count_only_when_clearly_faster() -> None:
    from experts.backends.cpu_tuning import _pad_choice

    # the probe measured on this 2-core EPYC (ms over lm_head + mlp shapes)
    table = {"1": {"default_ms": 17.1, "wxt_ms": 12.6}, "2": {"default_ms": 33.9, "wxt_ms": 12.0},
             "3": {"default_ms": 54.3, "wxt_ms": 15.6}, "4": {"default_ms": 41.4, "wxt_ms": 13.7},
             "8": {"default_ms": 37.2, "wxt_ms": 19.6}}
    assert _pad_choice(table, 8) == [[1, 2], [3, 4]]
    assert _pad_choice(table, 2) == [[1, 2]]  # nothing padded past the transposed path's range
    table["3"]["wxt_ms"] = 14.0  # within 5% of four rows: not worth the extra row
    assert _pad_choice(table, 8) == [[1, 2]]


def test_gemm_path_keeps_greedy_output(local_backend: Any) -> None:
    from torch import nn

    plan = local_backend.base.gemm
    if plan is None or plan.path != "wxt":
        pytest.skip(f"the probe chose torch's default GEMM path here ({plan})")
    batches = (["__base__", "__base__", "finance"], ["__base__"])  # several rows; one row (padded when probed so)
    fast = [_texts(local_backend, rows) for rows in batches]
    patched = [m for m in local_backend.base.model.modules() if type(m) is nn.Linear and "forward" in vars(m)]
    saved = [m.forward for m in patched]
    for m in patched:
        del m.forward
    try:
        ref = [_texts(local_backend, rows) for rows in batches]
    finally:
        for m, f in zip(patched, saved):
            m.forward = f
    assert patched and fast == ref


def test_gemm_probe_is_cached(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from experts.backends.cpu_tuning import choose_gemm

    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path))
    first = choose_gemm("auto", device="cpu", shapes={"w": (256, 64)})
    assert first.source == "probe" and (tmp_path / "cpu_tuning.json").is_file()
    again = choose_gemm("auto", device="cpu", shapes={"w": (256, 64)})
    assert again.source == "cache" and again.max_rows == first.max_rows
    assert choose_gemm("auto", device="cuda:0").path == "default"  # CPU tricks off on CUDA
    assert choose_gemm("wxt", device="cpu").max_rows == 4
    with pytest.raises(ConfigError):
        choose_gemm("fastest", device="cpu")


def test_int8_linear_is_close_to_float() -> None:
    import torch
    from torch import nn

    from experts.quantize import Int8Linear, quantize_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32, bias=False))
    model.config = type("C", (), {})()
    x = torch.randn(3, 64)
    with torch.inference_mode():
        ref = model(x)
        assert quantize_model(model, "int8") == 2
        assert isinstance(model[0], Int8Linear()) and model[0].weight.dtype == torch.int8
        out = model(x)
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max().item())


def test_base_speed_knobs_parse() -> None:
    from experts.models import FastOptions
    from experts.registry import parse_base

    spec = parse_base({"quantize": "int8", "gemm": "default", "fast_lora": False, "merged_experts": 0}, path="x.toml")
    assert FastOptions.of(spec) == FastOptions(quantize="int8", gemm="default", fast_lora=False, merged_experts=0)
    assert FastOptions.of(parse_base({}, path="x.toml")) == FastOptions()
    for bad in ({"quantize": "int2"}, {"gemm": 3}, {"fast_lora": "yes"}, {"merged_experts": -1}):
        with pytest.raises(ConfigError):
            parse_base(bad, path="x.toml")

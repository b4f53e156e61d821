"""On CUDA the CPU levers switch off and the batched LoRA path still gives peft's answers.

Skipped without a CUDA device (CI). The GPU check runs it with the backend tests on a CUDA
machine: ``EXPERTMIX_TEST_DEVICE=cuda EXPERTMIX_TEST_DTYPE=float32`` (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cpu_levers_are_off_and_generation_stays_on_the_device(local_backend: Any) -> None:
    from torch import nn

    from experts.backends.base import GenerationConfig

    if not local_backend.base.device.startswith("cuda"):
        pytest.skip("the model fixture runs on CPU here (EXPERTMIX_TEST_DEVICE)")
    model = local_backend.base.model
    assert getattr(model, "_expertmix_lean", None) is None, "the lean/C decode step is a CPU lever"
    assert local_backend.base.gemm is None or local_backend.base.gemm.path == "default"
    assert not [m for m in model.modules() if type(m) is nn.Linear and "forward" in vars(m)]
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert local_backend.fast_lora is not None, "the batched LoRA path is torch code and runs on CUDA too"
    msgs = [{"role": "user", "content": "What drives gross margin?"}]
    out = local_backend.generate([(r, msgs) for r in ("finance", "engineering", "__base__")],
                                 GenerationConfig(max_new_tokens=6))
    assert [g.expert for g in out] == ["finance", "engineering", "__base__"]
    assert all(g.tokens > 0 for g in out)


def test_bfloat16_mixed_batch_is_close_to_peft(local_backend: Any) -> None:
    """In bfloat16 (the CUDA default) the batched path's logits stay within bf16 rounding of peft's."""
    from experts.backends.local import LocalBackend
    from experts.models import load_base

    if not local_backend.base.device.startswith("cuda"):
        pytest.skip("the model fixture runs on CPU here (EXPERTMIX_TEST_DEVICE)")
    base = load_base(local_backend.base.path, device=local_backend.base.device, dtype="bfloat16")
    bf = LocalBackend(base, list(local_backend._specs.values()))
    rows = ["finance", "engineering", "product", "__base__"]
    msgs = [{"role": "user", "content": "How should a team budget for a new product launch?"}]
    ids, mask = bf.batch_inputs([bf.encode_prompt(msgs)] * len(rows))

    def logits() -> Any:
        with bf._lock, torch.inference_mode():
            return bf.model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits[:, -1].float()

    fast = logits()
    bf.fast_lora.enabled = False
    try:
        ref = logits()
    finally:
        bf.fast_lora.enabled = True
    scale = ref.abs().max().item()
    assert (fast - ref).abs().max().item() <= 0.05 * scale
    assert not torch.allclose(ref[0], ref[1]), "the adapters differ, so the rows must too"

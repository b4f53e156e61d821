"""The small-row CPU kernels: built at first use, same products as torch (float32 within 1e-4,
int8 equal to the dequantized product, 4-bit within its activation rounding), same greedy answers in the model; off cleanly when they
cannot be built."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from experts.backends import cpu_kernels
from experts.backends.base import GenerationConfig

MSGS = [{"role": "user", "content": "How should a team budget for a new product launch?"}]

needs_kernels = pytest.mark.skipif(
    cpu_kernels.unavailable_reason() is not None, reason=f"kernels unavailable here: {cpu_kernels.unavailable_reason()}"
)


def test_kernels_are_available_on_linux_x86_with_a_compiler() -> None:
    """CI runs on Linux x86-64 with gcc: the kernels must build there, not silently skip."""
    import platform

    if platform.system() == "Linux" and platform.machine() == "x86_64" and shutil.which("cc"):
        flags = Path("/proc/cpuinfo").read_text().split()
        if "avx2" in flags and "fma" in flags:
            assert cpu_kernels.available(), cpu_kernels.unavailable_reason()


@needs_kernels
@pytest.mark.parametrize(("n_out", "n_in"), [(576, 576), (193, 576), (37, 100), (1536, 576), (5, 9)])
def test_float32_product_matches_torch(n_out: int, n_in: int) -> None:
    import torch
    import torch.nn.functional as F

    k = cpu_kernels.load()
    assert k is not None
    g = torch.Generator().manual_seed(n_out)
    w = torch.randn(n_out, n_in, generator=g)
    for rows in range(1, 5):
        x = torch.randn(rows, n_in, generator=g)
        ref = F.linear(x, w)
        got = k.gemv(x, w)
        assert got.shape == ref.shape
        assert float((got - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))


@needs_kernels
def test_int8_product_equals_the_dequantized_product() -> None:
    import torch
    import torch.nn.functional as F

    k = cpu_kernels.load()
    assert k is not None
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-127, 128, (200, 72), generator=g, dtype=torch.int8)
    scale = torch.rand(200, generator=g) / 100
    for rows in range(1, 5):
        x = torch.randn(rows, 72, generator=g)
        ref = F.linear(x, q.float() * scale[:, None])
        assert float((k.gemv(x, q, scale) - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def _q4_values(n_out: int, n_in: int, seed: int) -> Any:
    """Weights that are 4-bit values already (half scale and min per group of 32, as the default
    base's Q4_1 projections), each group using the full 0..15 range."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = (torch.rand(n_out, n_in // 32, 1, generator=g) * 0.02 + 0.001).half().float()
    m = (-torch.rand(n_out, n_in // 32, 1, generator=g) * 0.1).half().float()
    q = torch.randint(0, 16, (n_out, n_in // 32, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    return (q * d + m).reshape(n_out, n_in)


def _rounding_bound(x: Any, w: Any) -> Any:
    """How far the 4-bit kernel may be from ``x @ w.T``: it rounds each group of 32 inputs to int16
    (step amax/32767), so each product term moves by at most |w| * step / 2 (plus float sums)."""
    step = x.reshape(x.shape[0], -1, 32).abs().amax(dim=2) / 32767  # (rows, groups)
    wabs = w.abs().reshape(w.shape[0], -1, 32).sum(dim=2)  # (out, groups)
    return step @ wabs.T / 2 + 1e-5


@needs_kernels
def test_int4_weights_round_trip_and_the_product_is_within_its_rounding() -> None:
    import torch
    from torch import nn

    from experts.quantize import Int4Linear

    k = cpu_kernels.load()
    assert k is not None
    w = _q4_values(70, 96, seed=5)  # 70 outputs: not a multiple of the 4-row blocks
    lin = nn.Linear(96, 70)
    with torch.no_grad():
        lin.weight.copy_(w)
    q4 = Int4Linear()(lin)
    assert q4.weight.dtype == torch.uint8 and tuple(q4.weight.shape) == (70, 48)
    assert torch.equal(q4.dequantized(), w), "Q4_1 values must come back exactly (torch's unpack)"
    q4.kernels = k
    assert torch.equal(q4.dequantized(), w), "... and the kernel's"
    g = torch.Generator().manual_seed(6)
    for rows in range(1, 5):
        x = torch.randn(rows, 96, generator=g)
        exact = x @ w.T + lin.bias
        got = q4(x)  # decode rows: the kernel
        assert bool(((got - exact).abs() <= _rounding_bound(x, w)).all())
        assert float((got - exact).abs().max()) > 0, "the kernel rounds the activations; equal means it was not used"
    x = torch.randn(6, 96, generator=g)  # prefill rows: dequantized float32 product
    torch.testing.assert_close(q4(x), x @ w.T + lin.bias, atol=1e-5, rtol=1e-5)
    a, b = torch.randn(3, 96, 8, generator=g) * 0.1, torch.randn(3, 8, 70, generator=g) * 0.1
    x = torch.randn(3, 96, generator=g)
    fused = k.gemv_lora(x, q4.weight, q4.scales, a, b)
    alone = k.gemv(x, q4.weight, q4.scales) + torch.bmm(torch.bmm(x[:, None], a), b)[:, 0]
    torch.testing.assert_close(fused, alone, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_int4_keeps_the_lm_head_and_odd_widths_at_int8() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from experts.quantize import Int4Linear, Int8Linear, quantize_model

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=80, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    quantize_model(model, "int4")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Int4Linear()) and isinstance(layer.mlp.up_proj, Int4Linear())
    assert isinstance(layer.mlp.down_proj, Int8Linear()), "80 inputs do not split into groups of 32"
    assert isinstance(model.lm_head, Int8Linear())


@needs_kernels
@pytest.mark.parametrize(("int8", "rank"), [(False, 8), (True, 8), (False, 16), (False, 5), (False, 40)],
                         ids=["float32", "int8", "rank16", "rank5", "rank40"])
def test_fused_lora_equals_base_plus_each_rows_adapter(int8: bool, rank: int) -> None:
    import torch
    import torch.nn.functional as F

    k = cpu_kernels.load()
    assert k is not None
    g = torch.Generator().manual_seed(5)
    n_out, n_in = 150, 97  # odd sizes: the vector loops' tails
    if int8:
        w = torch.randint(-127, 128, (n_out, n_in), generator=g, dtype=torch.int8)
        scale = torch.rand(n_out, generator=g) / 100
        dense = w.float() * scale[:, None]
    else:
        w, scale = torch.randn(n_out, n_in, generator=g), None
        dense = w
    for rows in range(1, 5):
        x = torch.randn(rows, n_in, generator=g)
        a = torch.randn(rows, n_in, rank, generator=g)
        b = torch.randn(rows, rank, n_out, generator=g)
        b[0] = 0  # a __base__ row: zeros
        ref = F.linear(x, dense) + torch.bmm(torch.bmm(x[:, None], a), b)[:, 0]
        got = k.gemv_lora(x, w, scale, a, b)
        assert float((got - ref).abs().max()) < 1e-4 * float(ref.abs().max())
        a1, b1 = torch.randn(n_in, rank, generator=g), torch.randn(rank, n_out, generator=g)
        shared = k.gemv_lora(x, w, scale, a1, b1)  # one adapter on every row
        ref1 = F.linear(x, dense) + (x @ a1) @ b1
        assert float((shared - ref1).abs().max()) < 1e-4 * float(ref1.abs().max())


def test_no_compiler_means_no_kernels_and_no_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EXPERTMIX_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    assert cpu_kernels.load() is None
    assert cpu_kernels.gemv(*_xw()) is None
    monkeypatch.setenv("CC", str(tmp_path / "broken-cc"))
    (tmp_path / "broken-cc").write_text("#!/bin/sh\necho 'error: broken on purpose' >&2\nexit 3\n")
    (tmp_path / "broken-cc").chmod(0o755)
    assert cpu_kernels.load() is None  # the build failed: logged, nothing half-written left behind
    assert not list((tmp_path / "kernels").glob("*")) if (tmp_path / "kernels").exists() else True
    monkeypatch.setenv("EXPERTMIX_CPU_KERNELS", "0")
    assert cpu_kernels.unavailable_reason() == "EXPERTMIX_CPU_KERNELS=0"


def _xw() -> tuple[Any, Any]:
    import torch

    return torch.ones(1, 8), torch.ones(4, 8)


@needs_kernels
def test_kernel_path_keeps_greedy_answers(local_backend: Any) -> None:
    """Decode steps of 1-3 rows (mixed adapters, merged single expert, base) with the kernel vs MKL."""
    from torch import nn

    from experts.backends.cpu_tuning import GemmPlan, install_gemm

    k = cpu_kernels.load()
    assert k is not None
    model = local_backend.base.model
    saved = {m: vars(m).get("forward") for m in model.modules() if type(m) is nn.Linear}
    fl = local_backend.fast_lora
    keep = (fl.kernels, fl.max_rows) if fl else None
    install_gemm(model, GemmPlan(path="wxt", max_rows=4, kernel=True))  # re-patches every base Linear
    if fl:
        fl.kernels, fl.max_rows = k, 4
    cfg = GenerationConfig(max_new_tokens=12)
    batches = (["finance", "engineering", "__base__"], ["finance"], ["__base__"])
    try:
        k.enabled = True
        ours = [[g.text for g in local_backend.generate([(r, MSGS) for r in rows], cfg)] for rows in batches]
        k.enabled = False
        theirs = [[g.text for g in local_backend.generate([(r, MSGS) for r in rows], cfg)] for rows in batches]
    finally:
        k.enabled = True
        for m, f in saved.items():
            if f is None:
                vars(m).pop("forward", None)
            else:
                m.forward = f
        if fl and keep:
            fl.kernels, fl.max_rows = keep
    assert ours == theirs


def test_gemm_kernel_setting_uses_the_kernel_when_it_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    from experts.backends.cpu_tuning import choose_gemm

    plan = choose_gemm("kernel", device="cpu")
    assert plan.path == "wxt" and plan.max_rows == 4 and plan.kernel == cpu_kernels.available()
    monkeypatch.setenv("EXPERTMIX_CPU_KERNELS", "0")
    off = choose_gemm("kernel", device="cpu")  # falls back to MKL's transposed product, with a warning
    assert off.path == "wxt" and not off.kernel


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_bases_are_refused_off_cpu(mode: str) -> None:
    """int8/int4 are CPU paths: asked for on CUDA, a clear error naming the setting and what to use."""
    from torch import nn

    from expertmix.errors import ModelError
    from experts.quantize import quantize_model

    with pytest.raises(ModelError, match=f'quantize = "{mode}" is a CPU path.*bfloat16'):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), mode, device="cuda")

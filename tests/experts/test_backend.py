"""Local multi-LoRA backend on the real SmolLM2: mixed batches equal single runs, errors are typed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experts.backends.base import GenerationConfig
from expertmix.errors import AdapterError, InputError, UnknownExpert

QUESTIONS = {
    "finance": "What is a bond?",
    "engineering": "How do I reverse a list in Python?",
    "product": "Write a user story for a login page.",
    "__base__": "Say hello.",
}
GREEDY = GenerationConfig(max_new_tokens=12)


def _msgs(q: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}]


def test_mixed_batch_equals_each_expert_alone(local_backend) -> None:
    reqs = [(name, _msgs(q)) for name, q in QUESTIONS.items()]
    batched = local_backend.generate(reqs, GREEDY)
    alone = [local_backend.generate([r], GREEDY)[0] for r in reqs]
    for b, a in zip(batched, alone):
        assert b.expert == a.expert
        assert b.tokens == a.tokens > 0
        assert b.text == a.text, b.expert


def test_adapters_change_the_output(local_backend) -> None:
    q = _msgs(QUESTIONS["finance"])
    outs = local_backend.generate([(n, q) for n in ("__base__", "finance", "engineering", "product")], GREEDY)
    assert len({o.text for o in outs}) >= 3  # the random adapters are really applied


def test_stream_matches_generate(local_backend) -> None:
    q = _msgs(QUESTIONS["engineering"])
    streamed = "".join(local_backend.stream("engineering", q, GREEDY))
    assert streamed.strip() == local_backend.generate([("engineering", q)], GREEDY)[0].text


def test_stop_strings_and_sampling(local_backend) -> None:
    q = _msgs("Count from one to ten.")
    full = local_backend.generate([("__base__", q)], GenerationConfig(max_new_tokens=16))[0].text
    stop = full[6:9]
    assert len(full) > 10 and stop
    cut = local_backend.generate([("__base__", q)], GenerationConfig(max_new_tokens=16, stop=(stop,)))[0].text
    assert cut == full[: full.find(stop)].strip()
    s1 = local_backend.generate([("__base__", q)], GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3))[0]
    s2 = local_backend.generate([("__base__", q)], GenerationConfig(max_new_tokens=8, temperature=1.0, seed=3))[0]
    assert s1.text == s2.text  # seeded sampling is reproducible


def test_unknown_expert(local_backend) -> None:
    with pytest.raises(UnknownExpert, match="legal"):
        local_backend.generate([("legal", _msgs("hi"))], GREEDY)


def test_prompt_longer_than_context(local_backend) -> None:
    with pytest.raises(InputError, match="context window"):
        local_backend.generate([("__base__", _msgs("word " * 9000))], GREEDY)


def test_missing_adapter_dir(local_backend, tmp_path: Path) -> None:
    from experts.registry import ExpertSpec

    with pytest.raises(AdapterError, match="does not exist"):
        local_backend.add_expert(ExpertSpec(name="legal", adapter=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json"):
        local_backend.add_expert(ExpertSpec(name="legal", adapter=tmp_path / "empty"))


def test_adapter_for_another_base(local_backend, random_adapters, tmp_path: Path) -> None:
    """An adapter whose shapes belong to a bigger model is refused with a clear error."""
    import torch
    from safetensors.torch import load_file, save_file

    from experts.registry import ExpertSpec

    src = random_adapters["finance"]
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/other-7b"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    widened = {k: torch.zeros(v.shape[0], v.shape[1] * 2) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(widened, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="does not fit base model"):
        local_backend.add_expert(ExpertSpec(name="other", adapter=bad))
    assert "other" not in local_backend.expert_names()


def test_adapter_targeting_missing_modules(local_backend, random_adapters, tmp_path: Path) -> None:
    import shutil

    from experts.registry import ExpertSpec

    bad = tmp_path / "arch"
    shutil.copytree(random_adapters["product"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ["query_key_value"]  # a Falcon/BLOOM module name, absent in Llama
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError):
        local_backend.add_expert(ExpertSpec(name="arch", adapter=bad))

"""LoRA training: a tiny real run on SmolLM2, reload equivalence, the shipped adapters, bad input."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from expertmix.errors import AdapterError, ConfigError, DataError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "experts" / "default" / "adapters"
DOMAINS = ("finance", "engineering", "product")


def _rows(path: Path, n: int) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for _, line in zip(range(n), fh)]


def _write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def product_slice(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 short product pairs as CSV with non-default column names (field override)."""
    rows = _rows(shared_data / "experts" / "product" / "train.jsonl", 16)
    path = tmp_path_factory.mktemp("data") / "slice.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["question", "answer"])
        w.writeheader()
        for r in rows:
            w.writerow({"question": r["instruction"], "answer": r["response"]})
    return path


@pytest.fixture(scope="module")
def tiny_run(product_slice: Path, base_path: str, tmp_path_factory: pytest.TempPathFactory):
    from experts.training import TrainConfig, train_expert

    root = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        name="tiny",
        data=product_slice,
        val=product_slice,  # NLL on the training slice itself: must drop after training
        out=root / "adapters" / "tiny",
        instruction_field="question",
        response_field="answer",
        rank=8,
        alpha=16,
        targets=("q_proj", "v_proj"),
        lr=3e-3,
        batch_size=4,
        max_steps=6,
        val_rows=8,
        register=root / "expertmix.toml",
        description="tiny test expert",
    )
    return cfg, train_expert(cfg, progress=False, keep_model=True)


def test_training_lowers_loss_and_writes_a_peft_adapter(tiny_run) -> None:
    cfg, result = tiny_run
    out = result.out
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "training_report.json",
        "loss.png",
    }
    assert not list(out.parent.glob(".*partial"))  # no temp dir left behind
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 8
    assert not acfg.get("modules_to_save") and set(acfg["target_modules"]) == {"q_proj", "v_proj"}
    rep = json.loads((out / "training_report.json").read_text())
    assert len(rep["loss_per_step"]) == 6 and rep["hyperparameters"]["steps"] == 6
    assert rep["data"]["train"]["rows"] == 16 and len(rep["data"]["train"]["sha256"]) == 64
    assert {"torch", "transformers", "peft"} <= set(rep["versions"])
    v = rep["val_nll_per_token"]
    assert v["adapter"] < v["base"] * 0.97, v
    losses = rep["loss_per_step"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_trained_adapter_reloads_with_identical_logits(tiny_run, base_path: str) -> None:
    import torch
    from peft import PeftModel

    from experts.models import load_base

    _, result = tiny_run
    base = load_base()
    ids = base.tokenizer("Write a user story for the NSF product.", return_tensors="pt")["input_ids"]
    reloaded = PeftModel.from_pretrained(base.model, str(result.out))
    reloaded.eval()
    with torch.inference_mode():
        a = result.model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
    assert torch.equal(a, b)


def test_warm_start_continues_an_adapter_and_records_it(tiny_run, tmp_path: Path) -> None:
    from experts.training import TrainConfig, train_expert

    cfg, first = tiny_run
    out = tmp_path / "continued"
    res = train_expert(
        TrainConfig(name="tiny", data=cfg.data, val=cfg.data, out=out, instruction_field="question",
                    response_field="answer", rank=4, targets=("q_proj",), lr=1e-3, batch_size=4, max_steps=2,
                    val_rows=8, seed=1, init_adapter=first.out),
        progress=False,
    )
    hp = res.report["hyperparameters"]
    init = hp["init_adapter"]
    # the adapter's own shape wins over the rank/targets given, and the report says what was continued
    assert hp["rank"] == 8 and set(hp["targets"]) == {"q_proj", "v_proj"}
    assert init["previous_run"]["steps"] == 6 and len(init["sha256"]) == 64
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["r"] == 8 and set(acfg["target_modules"]) == {"q_proj", "v_proj"}
    # it started from the trained adapter, not from scratch: val NLL stays near the first run's
    assert res.report["val_nll_per_token"]["adapter"] < first.report["val_nll_per_token"]["base"] * 0.97


def test_warm_start_needs_an_adapter_dir(tmp_path: Path) -> None:
    from experts.training import TrainConfig

    with pytest.raises(ConfigError, match="adapter_config.json"):
        TrainConfig(name="x", data="d.jsonl", init_adapter=tmp_path)


def test_registration_appends_a_valid_experts_table(tiny_run) -> None:
    import tomllib

    from experts.registry import parse_experts

    cfg, result = tiny_run
    path = Path(cfg.register)
    specs = parse_experts(tomllib.loads(path.read_text())["experts"], path=str(path))
    assert [(s.name, s.adapter, s.backend) for s in specs] == [("tiny", result.out.resolve(), "local")]


def test_name_clashes_are_refused_without_force(tiny_run, tmp_path: Path) -> None:
    from experts.training import TrainConfig, train_expert
    from experts.training_register import register_expert

    cfg, result = tiny_run
    with pytest.raises(AdapterError, match="already holds an adapter"):
        train_expert(TrainConfig(name="tiny", data=cfg.data, out=result.out), progress=False)
    with pytest.raises(ConfigError, match="already listed"):
        train_expert(TrainConfig(name="tiny", data=cfg.data, out=tmp_path / "x", register=cfg.register), progress=False)
    # --force replaces the table instead of duplicating it
    conf = tmp_path / "expertmix.toml"
    conf.write_text("# my config\n[base]\nmodel = \"smollm2-135m-instruct\"\n")
    register_expert(conf, name="tiny", description="a", adapter=tmp_path / "a")
    register_expert(conf, name="tiny", description="b", adapter=tmp_path / "b", force=True)
    text = conf.read_text()
    assert text.startswith("# my config\n[base]") and text.count("[[experts]]") == 1 and 'description = "b"' in text


def test_shipped_adapters_lower_nll_on_their_own_domain(shared_data: Path) -> None:
    from experts.backends.local import LocalBackend
    from experts.models import load_base
    from experts.registry import ExpertSpec

    missing = [d for d in DOMAINS if not (SHIPPED / d / "adapter_model.safetensors").is_file()]
    if missing:
        pytest.skip(f"shipped adapters not trained yet: {missing}")
    backend = LocalBackend(load_base(), [ExpertSpec(name=d, adapter=SHIPPED / d) for d in DOMAINS])
    for domain in DOMAINS:
        nll = {"__base__": 0.0, domain: 0.0}
        for row in _rows(shared_data / "experts" / domain / "val.jsonl", 4):
            msgs = [{"role": "user", "content": row["instruction"]}]
            for expert in nll:
                nll[expert] += backend.score_nll(expert, msgs, row["response"])[0]
        assert nll[domain] < nll["__base__"], (domain, nll)


# -- bad input -----------------------------------------------------------------------------------------------


def _good(n: int = 12) -> list[dict[str, object]]:
    return [{"instruction": f"Question {i}?", "response": f"Answer {i}."} for i in range(n)]


def _load(path: Path, **kw):
    from experts.training_data import load_pairs

    return load_pairs(path, **kw)


@pytest.mark.parametrize(
    ("rows", "line", "field", "message"),
    [
        ([*_good(5), {"instruction": "q"}, *_good(6)], 6, "response", "missing field 'response'"),
        ([*_good(3), {"instruction": "q", "response": "   "}, *_good(8)], 4, "response", "is empty"),
        ([*_good(7), {"instruction": "", "response": "a"}, *_good(4)], 8, "instruction", "is empty"),
        ([*_good(2), {"instruction": "q", "response": 3}, *_good(9)], 3, "response", "must be a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path: Path, rows, line: int, field: str, message: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        _load(path)
    assert (err.value.line, err.value.field) == (line, field)
    assert str(err.value).startswith(f"{path} line {line}: ")


def test_non_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in _good(3)).encode()
    path.write_bytes(good + '{"instruction": "caf\xe9", "response": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        _load(path)
    assert err.value.line == 4


def test_too_few_rows(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="only 9 row"):
        _load(_write_jsonl(tmp_path / "small.jsonl", _good(9)))


def test_csv_missing_column(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq,a\n", encoding="utf-8")
    with pytest.raises(DataError, match="lacks column") as err:
        _load(path)
    assert err.value.line == 1


def test_long_rows_truncate_with_a_count_and_overlong_prompts_fail(base_path: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from experts.training_data import Pair, encode_pairs

    tok = AutoTokenizer.from_pretrained(base_path)
    pairs = [Pair(1, "short?", "fine."), Pair(2, "Explain.", "word " * 500)]
    rows, n = encode_pairs(tok, pairs, max_length=64, path="d.jsonl")
    assert n == 1 and [r.truncated for r in rows] == [False, True] and len(rows[1].input_ids) == 64
    assert tok.eos_token_id in rows[0].labels  # the end-of-turn token is learned, so generation stops
    with pytest.raises(DataError, match="the prompt alone is") as err:
        encode_pairs(tok, [Pair(1, "ok", "ok"), Pair(7, "word " * 100, "a")], max_length=64, path="d.jsonl")
    assert err.value.line == 7 and "d.jsonl line 7" in str(err.value)


def test_prompt_encoding_matches_inference(base_path: str) -> None:
    from experts.backends.local import LocalBackend
    from experts.models import load_base
    from experts.training_data import Pair, encode_pairs

    backend = LocalBackend(load_base())
    (row,), _ = encode_pairs(backend.tokenizer, [Pair(1, "What is EBITDA?", "Earnings.")], max_length=384, path="x")
    prompt = backend.encode_prompt([{"role": "user", "content": "What is EBITDA?"}])
    assert row.input_ids[: len(prompt)] == prompt and all(x == -100 for x in row.labels[: len(prompt)])
    assert all(x != -100 for x in row.labels[len(prompt) :])


def test_config_rejects_unsupported_targets_and_bad_names() -> None:
    from experts.training import TrainConfig

    with pytest.raises(ConfigError, match="unsupported LoRA target"):
        TrainConfig(name="x", data="d.jsonl", targets=("q_proj", "lm_head"))
    with pytest.raises(ConfigError, match="invalid expert name"):
        TrainConfig(name="Bad Name", data="d.jsonl")


def test_out_dir_that_is_not_an_adapter_is_refused(tmp_path: Path) -> None:
    from experts.training import TrainConfig, train_expert

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    data = _write_jsonl(tmp_path / "d.jsonl", _good())
    with pytest.raises(AdapterError, match="non-empty directory"):
        train_expert(TrainConfig(name="x", data=data, out=tmp_path / "out", force=True), progress=False)
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"


def test_cli_prints_one_error_line(tmp_path: Path) -> None:
    from orchestrator.cli_train import register

    app = typer.Typer()
    experts_app = typer.Typer()
    app.add_typer(experts_app, name="experts")
    register(experts_app)
    data = _write_jsonl(tmp_path / "d.jsonl", [*_good(4), {"instruction": "q", "response": ""}, *_good(7)])
    res = CliRunner().invoke(app, ["experts", "train", "--name", "x", "--data", str(data), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {data} line 5: field 'response' is empty"), err
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()

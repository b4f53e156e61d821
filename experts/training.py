"""LoRA fine-tuning of one expert on instruction/response pairs, with a provenance report.

>>> from experts.training import TrainConfig, train_expert
>>> result = train_expert(TrainConfig(name="finance", data="train.jsonl", val="val.jsonl"))  # doctest: +SKIP
>>> result.out  # doctest: +SKIP
PosixPath('adapters/finance')

The output directory is a standard PEFT adapter (``adapter_config.json`` +
``adapter_model.safetensors``; LoRA on supported projections only, no
``modules_to_save``) that vLLM's multi-LoRA serving loads unchanged, plus
``training_report.json`` and ``loss.png``. It is written through
:func:`expertmix.io.atomic_dir`: an interrupted run leaves nothing where a loader looks.
Training runs on the cached safetensors copy of the base (fp32 on CPU, bf16 on CUDA).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from expertmix.errors import AdapterError, ConfigError
from expertmix.io import atomic_dir, atomic_write_text, file_sha256
from experts.models import DEFAULT_BASE
from experts.training_data import Encoded, encode_pairs, length_grouped_batches, load_pairs, pad_batch
from experts.training_register import check_registration, register_expert

__all__ = ["SUPPORTED_TARGETS", "TrainConfig", "TrainResult", "train_expert"]

logger = logging.getLogger(__name__)

# Projections of Llama-style models that vLLM's multi-LoRA serving supports.
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Hub id written into adapter_config.json for the embedded default base (a local cache path means nothing elsewhere).
_DEFAULT_BASE_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``expertmix experts train`` accepts; validated on construction."""

    name: str
    data: str | Path
    val: str | Path | None = None
    out: str | Path | None = None  # default: adapters/<name>
    base: str = DEFAULT_BASE
    rank: int = 16
    alpha: float = 32
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    dropout: float = 0.05
    epochs: float = 2
    lr: float = 1e-3
    batch_size: int = 8
    max_steps: int | None = None
    seed: int = 0
    max_length: int = 384  # prompt + response tokens per row; longer responses are truncated
    long_prompts: str = "error"  # a row whose prompt alone exceeds max_length: "error" or "skip" (counted)
    instruction_field: str = "instruction"
    response_field: str = "response"
    save_dtype: str = "float32"  # or "bfloat16": half the size on disk
    device: str = "auto"
    register: str | Path | None = None
    description: str = ""
    force: bool = False
    warmup_steps: int | None = None  # default: 5% of the steps, at least 1
    val_rows: int | None = 64  # first N validation rows for the base-vs-adapter NLL (None: all)
    threads: int | None = None  # CPU threads for torch (default: all cores); 1 is faster on a busy machine
    init_adapter: str | Path | None = None  # continue training this PEFT adapter (its rank/alpha/targets win)

    def __post_init__(self) -> None:
        from experts.registry import _NAME_RE  # the same rule the config applies

        if not _NAME_RE.match(self.name) or self.name == "__base__":
            raise ConfigError(f"invalid expert name {self.name!r}: use lowercase letters, digits, '-' or '_'", key="name")
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", tuple(t.strip() for t in self.targets.split(",") if t.strip()))
        bad = [t for t in self.targets if t not in SUPPORTED_TARGETS]
        if bad or not self.targets:
            raise ConfigError(
                f"unsupported LoRA target(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SUPPORTED_TARGETS)} "
                "(vLLM multi-LoRA serving supports these)",
                key="targets",
            )
        checks: list[tuple[str, bool]] = [
            ("rank", self.rank >= 1),
            ("alpha", self.alpha > 0),
            ("epochs", self.epochs > 0),
            ("lr", 0 < self.lr < 1),
            ("batch_size", self.batch_size >= 1),
            ("max_steps", self.max_steps is None or self.max_steps >= 1),
            ("max_length", self.max_length >= 16),
            ("long_prompts", self.long_prompts in ("error", "skip")),
            ("dropout", 0 <= self.dropout < 1),
            ("val_rows", self.val_rows is None or self.val_rows >= 1),
            ("threads", self.threads is None or self.threads >= 1),
        ]
        for key, ok in checks:
            if not ok:
                raise ConfigError(f"invalid value {getattr(self, key)!r}", key=key)
        if self.init_adapter is not None and not (Path(self.init_adapter) / "adapter_config.json").is_file():
            raise ConfigError(f"{self.init_adapter} holds no adapter_config.json; pass a PEFT adapter directory",
                              key="init_adapter")
        if self.save_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"save_dtype must be float32 or bfloat16, got {self.save_dtype!r}", key="save_dtype")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out is not None else Path("adapters") / self.name


@dataclass
class TrainResult:
    out: Path
    report: dict[str, Any]
    registered: Path | None = None
    warnings: list[str] = field(default_factory=list)
    model: Any = None  # the trained PeftModel, only with ``keep_model=True``


def _check_out_dir(out: Path, *, name: str, force: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise AdapterError(f"--out {out} exists and is not a directory", expert=name)
    if (out / "adapter_config.json").exists():
        if not force:
            raise AdapterError(
                f"{out} already holds an adapter (expert {name!r}?); choose another --out or pass --force to replace it",
                expert=name,
            )
        return
    if any(out.iterdir()):
        raise AdapterError(f"--out {out} is a non-empty directory that is not an adapter; choose another --out", expert=name)


def _read_init_adapter(path: str | Path) -> dict[str, Any]:
    """Shape and provenance of the adapter a warm start continues (its report's steps, its weights' hash)."""
    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA" or cfg.get("modules_to_save"):
        raise AdapterError(f"{path}: only plain LoRA adapters can be continued (peft_type LORA, no modules_to_save)",
                           expert=path.name)
    targets = cfg.get("target_modules") or []
    bad = [t for t in targets if t not in SUPPORTED_TARGETS]
    if bad:
        raise AdapterError(f"{path}: unsupported LoRA target(s) {', '.join(bad)}", expert=path.name)
    prev: dict[str, Any] = {}
    report = path / "training_report.json"
    if report.is_file():
        old = json.loads(report.read_text(encoding="utf-8"))
        hp = old.get("hyperparameters", {})
        prev = {"steps": hp.get("steps"), "lr": hp.get("lr"), "seed": hp.get("seed"),
                "previous_init": hp.get("init_adapter"), "created_utc": old.get("created_utc")}
    return {"path": str(path), "sha256": file_sha256(path / "adapter_model.safetensors"), "r": int(cfg["r"]),
            "lora_alpha": float(cfg["lora_alpha"]), "targets": sorted(targets), "previous_run": prev}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "safetensors", "expertmix"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _nll_per_token(model: Any, rows: Sequence[Encoded], *, pad_id: int, device: str, batch_size: int) -> tuple[float, int]:
    """Mean NLL per response token over ``rows`` (batched, padded per batch)."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                batch = pad_batch([rows[i] for i in order[s : s + batch_size]], pad_id, device)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                logits = logits[:, :-1].float()
                labels = batch["labels"][:, 1:]
                nll = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
                )
                total += float(nll)
                count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1), count


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))  # cosine to 10 %

    return f


def _plot_loss(path: Path, losses: list[float], *, title: str, val: dict[str, float] | None) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        steps = list(range(1, len(losses) + 1))
        ax.plot(steps, losses, lw=0.8 if len(losses) > 40 else 1.5, alpha=0.5 if len(losses) > 40 else 1.0,
                label="train loss (per step)")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.8, label=f"train loss ({k}-step mean)")
        if val:
            ax.axhline(val["base"], color="gray", ls="--", lw=1, label=f"val NLL/token, base {val['base']:.3f}")
            ax.axhline(val["adapter"], color="green", ls="--", lw=1, label=f"val NLL/token, adapter {val['adapter']:.3f}")
        ax.set_xlabel("step")
        ax.set_ylabel("NLL per response token")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _readable(folder: Path) -> None:
    """mkdtemp/mkstemp create 0700/0600 entries; give the adapter the usual umask permissions (e.g. for a server user)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def train_expert(config: TrainConfig, *, progress: bool = True, keep_model: bool = False) -> TrainResult:
    """Fine-tune a LoRA adapter for one expert and write it (atomically) with its report.

    ``keep_model=True`` returns the trained model (eval mode) in ``TrainResult.model``.
    """
    t_start = time.perf_counter()
    if os.environ.get("EXPERTMIX_TRAIN_SMOKE"):  # test knob (tests/test_docs.py): 1 step on the first 64 rows
        small = {"batch_size": min(config.batch_size, 2), "val_rows": min(config.val_rows or 4, 4)}
        config = replace(config, max_steps=1, **small)
    out = config.out_dir
    _check_out_dir(out, name=config.name, force=config.force)
    if config.register is not None:
        check_registration(config.register, config.name, force=config.force)
    train_pairs = load_pairs(config.data, instruction_field=config.instruction_field, response_field=config.response_field)
    val_pairs = (
        load_pairs(config.val, instruction_field=config.instruction_field, response_field=config.response_field, min_rows=1)
        if config.val is not None
        else []
    )
    if os.environ.get("EXPERTMIX_TRAIN_SMOKE"):
        train_pairs = train_pairs[:64]
    val_total = len(val_pairs)
    if config.val_rows is not None:
        val_pairs = val_pairs[: config.val_rows]  # the first N, in file order: a fixed sample

    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from experts.models import load_base

    base = load_base(config.base, device=config.device)
    if config.threads is not None and base.device == "cpu":
        torch.set_num_threads(config.threads)
    tok, model, device = base.tokenizer, base.model, base.device
    max_length = min(config.max_length, base.context_length)
    skipped: list[int] = []
    skipped_val: list[int] = []
    train_rows, n_trunc = encode_pairs(
        tok, train_pairs, max_length=max_length, path=config.data, long_prompts=config.long_prompts, skipped=skipped
    )
    val_rows, n_trunc_val = (
        encode_pairs(tok, val_pairs, max_length=max_length, path=config.val, long_prompts=config.long_prompts,
                     skipped=skipped_val)
        if config.val is not None
        else ([], 0)
    )
    warnings_: list[str] = []
    if skipped:
        warnings_.append(f"{len(skipped)} training rows skipped: prompt alone exceeds {max_length} tokens")
    if skipped_val:
        warnings_.append(f"{len(skipped_val)} validation rows skipped: prompt alone exceeds {max_length} tokens")
    if n_trunc:
        warnings_.append(f"{n_trunc} of {len(train_rows)} training rows exceed {max_length} tokens; responses truncated")
    if n_trunc_val:
        warnings_.append(f"{n_trunc_val} of {len(val_rows)} validation rows exceed {max_length} tokens; responses truncated")
    for w in warnings_:
        logger.warning(w)
    t_loaded = time.perf_counter()

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eval_bs = max(config.batch_size, 8)
    val_base = _nll_per_token(model, val_rows, pad_id=pad_id, device=device, batch_size=eval_bs) if val_rows else None

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    init = _read_init_adapter(config.init_adapter) if config.init_adapter is not None else None
    if init is not None:  # warm start: the adapter's own shape; dropout as configured now
        from peft import PeftModel

        config = replace(config, rank=init["r"], alpha=init["lora_alpha"], targets=tuple(init["targets"]))
        peft_model = PeftModel.from_pretrained(model, str(config.init_adapter), is_trainable=True)
        for mod in peft_model.modules():
            drop = getattr(mod, "lora_dropout", None)
            if drop is not None and "default" in drop and hasattr(drop["default"], "p"):
                drop["default"].p = config.dropout
    else:
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=list(config.targets),
            lora_dropout=config.dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    total = math.ceil(steps_per_epoch * config.epochs)
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, warmup))
    lengths = [len(r.input_ids) for r in train_rows]
    losses: list[float] = []
    batches: list[list[int]] = []
    bar = tqdm(total=total, desc=f"train {config.name}", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for _step in range(total):
            if not batches:
                batches = length_grouped_batches(lengths, config.batch_size, rng=rng)
            batch = pad_batch([train_rows[i] for i in batches.pop()], pad_id, device)
            loss = peft_model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    finally:
        bar.close()
    t_trained = time.perf_counter()

    if config.save_dtype == "bfloat16":  # round in memory too, so the saved adapter is exactly what we evaluate
        with torch.no_grad():
            for p in params:
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    val_nll: dict[str, Any] | None = None
    if val_rows and val_base is not None:
        adapter_nll, n_tok = _nll_per_token(peft_model, val_rows, pad_id=pad_id, device=device, batch_size=eval_bs)
        val_nll = {
            "base": val_base[0],
            "adapter": adapter_nll,
            "relative_change": adapter_nll / val_base[0] - 1.0,
            "tokens": n_tok,
            "rows": len(val_rows),
        }
    t_eval = time.perf_counter()

    report: dict[str, Any] = {
        "name": config.name,
        "description": config.description,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"name": base.name, "hub_id": _DEFAULT_BASE_HUB_ID if base.name == DEFAULT_BASE else base.name},
        "device": device,
        "dtype": str(base.dtype).removeprefix("torch."),
        "data": {
            "train": {
                "path": str(config.data),
                "sha256": file_sha256(config.data),
                "rows": len(train_rows),
                "truncated_rows": n_trunc,
                "skipped_rows": len(skipped),
            },
            "val": (
                {
                    "path": str(config.val),
                    "sha256": file_sha256(config.val),
                    "rows": val_total,
                    "rows_scored": len(val_rows),
                    "truncated_rows": n_trunc_val,
                    "skipped_rows": len(skipped_val),
                }
                if config.val is not None
                else None
            ),
            "fields": {"instruction": config.instruction_field, "response": config.response_field},
            "max_length": max_length,
            "prompt_format": "chat template with add_generation_prompt=True (as LocalBackend.encode_prompt); "
            "loss on response tokens + end-of-turn only",
        },
        "hyperparameters": {
            "rank": config.rank,
            "alpha": config.alpha,
            "targets": list(config.targets),
            "dropout": config.dropout,
            "epochs": config.epochs,
            "lr": config.lr,
            "schedule": f"linear warmup {warmup} steps, cosine to 10%",
            "optimizer": "AdamW (weight_decay 0, grad clip 1.0)",
            "batch_size": config.batch_size,
            "max_steps": config.max_steps,
            "steps": total,
            "seed": config.seed,
            "save_dtype": config.save_dtype,
            "init_adapter": init,
        },
        "versions": _versions(),
        "time_s": {
            "load_and_encode": round(t_loaded - t_start, 2),
            "train": round(t_trained - t_loaded, 2),
            "eval": round(t_eval - t_trained, 2),
            "per_step": round((t_trained - t_loaded) / max(total, 1), 3),
        },
        "loss_per_step": [round(x, 5) for x in losses],
        "val_nll_per_token": val_nll,
        "warnings": warnings_,
    }

    with atomic_dir(out, overwrite=config.force) as tmp:
        dtypes = [p.dtype for p in params]
        if config.save_dtype == "bfloat16":
            for p in params:
                p.data = p.data.to(torch.bfloat16)
        try:
            peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
        finally:
            for p, dt in zip(params, dtypes):
                p.data = p.data.to(dt)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's empty model card template
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["base_model_name_or_path"] = report["base"]["hub_id"]
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        report["time_s"]["total"] = round(time.perf_counter() - t_start, 2)
        atomic_write_text(tmp / "training_report.json", json.dumps(report, indent=2) + "\n")
        _plot_loss(tmp / "loss.png", losses, title=f"{config.name}: LoRA r={config.rank} on {base.name}", val=val_nll)
        _readable(tmp)
    registered = None
    if config.register is not None:
        description = config.description or f"{config.name} expert (LoRA adapter on {base.name})"
        registered = register_expert(config.register, name=config.name, description=description, adapter=out, force=config.force)
    peft_model.eval()
    return TrainResult(
        out=out, report=report, registered=registered, warnings=warnings_, model=peft_model if keep_model else None
    )


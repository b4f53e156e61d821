"""CLI command ``expertmix experts train``: LoRA fine-tuning of one expert.

``register(experts_app)`` adds the command to the ``experts`` sub-app. torch, transformers
and peft are imported inside the command only, so ``--help`` stays instant.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli_common import one_line_errors

__all__ = ["preflight_out", "register", "train"]


def preflight_out(out: Path) -> None:
    """Check ``--out`` before any training, so a bad path costs seconds, not a training run.

    An existing *empty* directory is accepted (it is replaced by the adapter); the nearest existing
    parent must be a writable directory. Non-empty directories are judged by the trainer (``--force``).
    """
    import os

    from expertmix.errors import ConfigError

    out = out.expanduser()
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # the trainer writes the adapter atomically and refuses an existing directory
        return
    if out.exists():
        return
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not a writable directory; choose another --out")


def train(
    name: Annotated[str, typer.Option("--name", help="Expert name (lowercase letters, digits, '-', '_').")],
    data: Annotated[
        Path, typer.Option("--data", help="Training pairs: JSON Lines or CSV with instruction/response.")
    ],
    val: Annotated[
        Path | None, typer.Option("--val", help="Validation pairs: val NLL of base vs adapter.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Adapter directory to write [default: adapters/NAME].")
    ] = None,
    base: Annotated[
        str, typer.Option("--base", help="Base model: default name, HF directory, .gguf or hub id.")
    ] = ("smollm2-135m-instruct"),
    rank: Annotated[int, typer.Option("--rank", help="LoRA rank r.")] = 16,
    alpha: Annotated[float, typer.Option("--alpha", help="LoRA alpha (scale = alpha / rank).")] = 32,
    targets: Annotated[
        str,
        typer.Option(
            "--targets",
            help="Comma-separated projections: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj.",
        ),
    ] = "q_proj,v_proj",
    epochs: Annotated[
        float, typer.Option("--epochs", help="Passes over the training data (may be fractional).")
    ] = 2,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warmup then cosine).")] = 1e-3,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per step (padded per batch).")] = 8,
    max_steps: Annotated[
        int | None, typer.Option("--max-steps", help="Stop after N steps (caps --epochs).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for init, shuffling and dropout.")] = 0,
    max_length: Annotated[
        int,
        typer.Option(
            "--max-length", help="Max prompt+response tokens per row; longer responses are truncated."
        ),
    ] = 384,
    long_prompts: Annotated[
        str,
        typer.Option(
            "--long-prompts", help="A row whose prompt alone exceeds --max-length: error or skip (counted)."
        ),
    ] = "error",
    val_rows: Annotated[
        int, typer.Option("--val-rows", help="Score the first N validation rows (0 = all).")
    ] = 64,
    threads: Annotated[
        int | None,
        typer.Option("--threads", help="CPU threads (default: all cores; 1 helps on a busy machine)."),
    ] = None,
    dropout: Annotated[float, typer.Option("--dropout", help="LoRA dropout.")] = 0.05,
    instruction_field: Annotated[
        str, typer.Option("--instruction-field", help="Field (column) with the instruction.")
    ] = ("instruction"),
    response_field: Annotated[
        str, typer.Option("--response-field", help="Field (column) with the response.")
    ] = "response",
    save_dtype: Annotated[
        str, typer.Option("--save-dtype", help="float32 or bfloat16 (half the file size).")
    ] = "float32",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N].")] = "auto",
    register_config: Annotated[
        Path | None, typer.Option("--register", help="Append the expert to this expertmix.toml.")
    ] = None,
    description: Annotated[
        str, typer.Option("--description", help="Description written with --register.")
    ] = "",
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing adapter / registered name.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    init_adapter: Annotated[
        Path | None,
        typer.Option("--init-adapter", help="Continue training this adapter (its rank, alpha, targets)."),
    ] = None,
) -> None:
    """Fine-tune a LoRA expert; write a PEFT adapter, training_report.json and loss.png."""
    with one_line_errors():
        from expertmix.errors import InputError
        from experts.training import TrainConfig, train_expert

        for flag, value in (("--epochs", epochs), ("--lr", lr), ("--alpha", alpha), ("--dropout", dropout)):
            if not math.isfinite(value):
                raise InputError(f"{flag} must be a finite number, got {value}")
        preflight_out(out if out is not None else Path("adapters") / name)
        cfg = TrainConfig(
            name=name, data=data, val=val, out=out, base=base, rank=rank, alpha=alpha, targets=tuple(targets.split(",")),
            dropout=dropout, epochs=epochs, lr=lr, batch_size=batch_size, max_steps=max_steps, seed=seed,
            max_length=max_length, long_prompts=long_prompts, instruction_field=instruction_field, response_field=response_field,
            save_dtype=save_dtype, device=device, val_rows=val_rows or None, threads=threads, register=register_config, description=description, force=force,
            init_adapter=init_adapter,
        )  # fmt: skip
        result = train_expert(cfg, progress=not quiet)
    for w in result.warnings:
        typer.echo(f"warning: {w}", err=True)
    rep = result.report
    typer.echo(
        f"wrote {result.out} ({rep['hyperparameters']['steps']} steps, {rep['time_s']['total']:.0f} s)"
    )
    v = rep.get("val_nll_per_token")
    if v:
        typer.echo(
            f"val NLL/token: base {v['base']:.4f} -> adapter {v['adapter']:.4f} ({100 * v['relative_change']:+.1f}%)"
        )
    if result.registered is not None:
        typer.echo(f"registered {name!r} in {result.registered}")


def register(experts_app: typer.Typer) -> None:
    """Add ``train`` to the ``experts`` sub-app."""
    experts_app.command("train")(train)

"""Instruction/response data for LoRA fine-tuning: load, validate, encode, batch.

Rows are encoded with the chat template exactly as :meth:`LocalBackend.encode_prompt`
encodes a query at inference (system prompt of the template included), followed by the
response and the end-of-turn token. Only response tokens carry a label; prompt tokens
are masked with ``-100``.

Rows longer than ``max_length`` tokens are **truncated** (the end of the response is cut,
the prompt is kept whole) and counted; a row whose *prompt alone* leaves fewer than
:data:`MIN_RESPONSE_TOKENS` tokens for the response is an error naming its line.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expertmix.errors import DataError
from expertmix.io import read_records

__all__ = [
    "MIN_RESPONSE_TOKENS",
    "MIN_ROWS",
    "Encoded",
    "Pair",
    "encode_pairs",
    "encode_prompt",
    "length_grouped_batches",
    "load_pairs",
    "pad_batch",
]

MIN_ROWS = 10
MIN_RESPONSE_TOKENS = 8
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Pair:
    """One training example and the line it came from."""

    line: int
    instruction: str
    response: str


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + response and the labels (``-100`` on the prompt)."""

    line: int
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def load_pairs(
    path: str | Path,
    *,
    instruction_field: str = "instruction",
    response_field: str = "response",
    min_rows: int = MIN_ROWS,
) -> list[Pair]:
    """Read JSON Lines or CSV pairs; errors name the file, line and field.

    >>> pairs = load_pairs("train.jsonl")  # doctest: +SKIP
    """
    records = read_records(path, (instruction_field, response_field))
    pairs: list[Pair] = []
    for line, row in records:
        for f in (instruction_field, response_field):
            if not row[f].strip():
                raise DataError(f"field '{f}' is empty; every row needs text there", path=path, line=line, field=f)
        pairs.append(Pair(line=line, instruction=row[instruction_field], response=row[response_field]))
    if len(pairs) < min_rows:
        raise DataError(
            f"only {len(pairs)} row(s); LoRA training needs at least {min_rows} (more is better: a few hundred)",
            path=path,
        )
    return pairs


def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def encode_prompt(tokenizer: Any, instruction: str) -> list[int]:
    """The prompt of one user turn, as ``LocalBackend.encode_prompt`` builds it at inference."""
    messages = [{"role": "user", "content": instruction}]
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_pairs(
    tokenizer: Any, pairs: Sequence[Pair], *, max_length: int, path: str | Path, long_prompts: str = "error",
    skipped: list[int] | None = None,
) -> tuple[list[Encoded], int]:
    """Encode pairs; returns ``(encoded, n_truncated)``. See the module docstring for the policy.

    A row whose prompt alone does not fit ``max_length`` is an error (``long_prompts="error"``)
    or is left out, its line appended to ``skipped`` (``long_prompts="skip"``).
    """
    out: list[Encoded] = []
    n_truncated = 0
    for p in pairs:
        prompt = encode_prompt(tokenizer, p.instruction)
        full = _ids(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p.instruction}, {"role": "assistant", "content": p.response}],
                add_generation_prompt=False,
                tokenize=True,
            )
        )
        if full[: len(prompt)] != prompt:  # a template that rewrites earlier turns: fall back
            full = prompt + _ids(tokenizer(p.response + (tokenizer.eos_token or ""), add_special_tokens=False))
        response = full[len(prompt) :]
        if len(prompt) + MIN_RESPONSE_TOKENS > max_length:
            if long_prompts == "skip":
                if skipped is not None:
                    skipped.append(p.line)
                continue
            raise DataError(
                f"the prompt alone is {len(prompt)} tokens, which leaves no room for the response within "
                f"max_length={max_length}; shorten the instruction, raise --max-length or pass --long-prompts skip",
                path=path,
                line=p.line,
            )
        truncated = len(prompt) + len(response) > max_length
        if truncated:
            n_truncated += 1
            response = response[: max_length - len(prompt)]
        out.append(
            Encoded(
                line=p.line,
                input_ids=prompt + response,
                labels=[IGNORE_INDEX] * len(prompt) + response,
                truncated=truncated,
            )
        )
    return out, n_truncated


def length_grouped_batches(lengths: Sequence[int], batch_size: int, *, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length: shuffle, sort within chunks of 16 batches, shuffle batches.

    Per-batch padding then wastes little compute while the order stays random.
    """
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(idx), chunk):
        part = sorted(idx[start : start + chunk], key=lambda i: lengths[i])
        batches.extend(part[j : j + batch_size] for j in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def pad_batch(rows: Sequence[Encoded], pad_id: int, device: str) -> dict[str, Any]:
    """Right-pad a batch to its own longest row (not to a fixed length)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}

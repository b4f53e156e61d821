"""Do the experts specialize? Per-token NLL of each domain's reference val responses under
the base model and under each expert: a 4 x 3 table (rows: model, columns: domain).

    python bench/specialization.py --quick --out bench/results/specialization_quick.json
    python bench/specialization.py --out bench/results/specialization.json
    python bench/specialization.py --smoke      # seconds: 1 row per domain, 4 response tokens

One LocalBackend holds the base and all three adapters; each val row is scored by the base
and the three experts in one mixed-adapter batch (peft ``adapter_names``). The scored
tokens are the response and its end-of-turn token, encoded exactly as in training and at
inference (chat template, ``add_generation_prompt=True`` prompt). Rows are an evenly spaced,
fixed sample of each ``val.jsonl``; responses longer than ``--max-length`` tokens (prompt
included) are truncated.

Target: each expert's NLL on its own domain is >= 10 % below the base's and below every
other expert's on that domain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOMAINS = ("finance", "engineering", "product")

if TYPE_CHECKING:
    from experts.training_data import Encoded

MODELS = ("base", *DOMAINS)


def _sample(n_total: int, n: int) -> list[int]:
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    step = n_total / n
    return [int(i * step) for i in range(n)]


def _clip(row: Encoded, n: int) -> Encoded:
    n_prompt = sum(1 for x in row.labels if x == -100)
    return replace(row, input_ids=row.input_ids[: n_prompt + n], labels=row.labels[: n_prompt + n])


def _relative(path: Path) -> str:
    """A path as results JSON may hold it: relative to the repository (no machine paths)."""
    return os.path.relpath(Path(path).resolve(), REPO)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 rows per domain (a few minutes on 2 CPU cores)")
    ap.add_argument("--smoke", action="store_true", help="1 row per domain, 4 response tokens (seconds; for the tests)")
    ap.add_argument("--rows", type=int, default=None, help="rows per domain (0 = all); default 48, --quick 8")
    ap.add_argument("--max-length", type=int, default=384, help="max prompt+response tokens per row")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data")),
        help="shared data root (holds experts/<domain>/val.jsonl)",
    )
    ap.add_argument("--adapters", type=Path, default=REPO / "experts" / "default" / "adapters")
    args = ap.parse_args(argv)
    n_rows = 1 if args.smoke else args.rows if args.rows is not None else (8 if args.quick else 48)

    import torch

    from experts.backends.local import LocalBackend
    from experts.models import load_base
    from experts.registry import ExpertSpec
    from experts.training_data import encode_pairs, load_pairs

    t0 = time.perf_counter()
    backend = LocalBackend(load_base(), [ExpertSpec(name=d, adapter=args.adapters / d) for d in DOMAINS])
    names = ["__base__", *DOMAINS]
    sums = {m: {d: 0.0 for d in DOMAINS} for m in MODELS}
    counts = {d: 0 for d in DOMAINS}
    rows_used = {}
    for domain in DOMAINS:
        path = args.data / "experts" / domain / "val.jsonl"
        pairs = load_pairs(path, min_rows=1)
        pairs = [pairs[i] for i in _sample(len(pairs), n_rows)]
        rows_used[domain] = len(pairs)
        encoded, _ = encode_pairs(backend.tokenizer, pairs, max_length=args.max_length, path=path)
        if args.smoke:  # score only the first 4 response tokens
            encoded = [_clip(row, 4) for row in encoded]
        for row in encoded:
            ids = torch.tensor([row.input_ids] * len(names), device=backend.base.device)
            labels = torch.tensor(row.labels, device=backend.base.device)[1:]
            with torch.inference_mode():
                logits = backend.model(input_ids=ids, adapter_names=names).logits[:, :-1].float()
            for model, lg in zip(MODELS, logits):
                nll = torch.nn.functional.cross_entropy(lg, labels, ignore_index=-100, reduction="sum")
                sums[model][domain] += float(nll)
            counts[domain] += int((labels != -100).sum())
        print(f"{domain}: {len(encoded)} rows scored ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    nll = {m: {d: sums[m][d] / counts[d] for d in DOMAINS} for m in MODELS}
    rel = {m: {d: nll[m][d] / nll["base"][d] - 1.0 for d in DOMAINS} for m in DOMAINS}
    target = {
        d: bool(rel[d][d] <= -0.10 and all(nll[d][d] < nll[o][d] for o in DOMAINS if o != d)) for d in DOMAINS
    }
    result = {
        "nll": nll,
        "relative_to_base": rel,
        "target_met": target,
        "rows": rows_used,
        "tokens": counts,
        "settings": {"quick": args.quick, "smoke": args.smoke, "rows_per_domain": n_rows, "max_length": args.max_length},
        "adapters": _relative(args.adapters),
        "adapter_sha256_12": {d: hashlib.sha256((args.adapters / d / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
                              for d in DOMAINS},
        "time_s": round(time.perf_counter() - t0, 1),
    }
    print("| model \\ domain | " + " | ".join(DOMAINS) + " |")
    print("|---|" + "---|" * len(DOMAINS))
    for m in MODELS:
        cells = []
        for d in DOMAINS:
            c = f"{nll[m][d]:.3f}"
            if m != "base":
                c += f" ({100 * rel[m][d]:+.1f}%)"
            cells.append(f"**{c}**" if m == d else c)
        print(f"| {m} | " + " | ".join(cells) + " |")
    print("target met: " + ", ".join(f"{d} {'yes' if ok else 'NO'}" for d, ok in target.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

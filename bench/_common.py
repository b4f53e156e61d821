"""Helpers shared by bench/backend.py, bench/quality.py and bench/speed.py.

Argument parsing (``--quick``, ``--out FILE.json``), the adapters to benchmark (the shipped
ones, else random stand-ins, said so in the output), interleaved timing with medians,
markdown tables, machine info and JSON output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

# The shipped OpenMP default (expertmix/runtime.py: GOMP_SPINCOUNT=1000, a short spin, then
# sleep): both sides of every ratio run under it; OMP_WAIT_POLICY / GOMP_SPINCOUNT override it.
from expertmix.runtime import openmp_defaults

openmp_defaults()

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DOMAINS = ("finance", "engineering", "product")
SHIPPED_ADAPTERS = REPO / "experts" / "default" / "adapters"


# -- arguments ------------------------------------------------------------------------------------
def parser(doc: str | None) -> argparse.ArgumentParser:
    """The common options; benches add their own."""
    first = (doc or "").strip().splitlines()[0] if doc else None
    ap = argparse.ArgumentParser(description=first, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a fixed small sample (a few minutes on 2 CPU cores)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result to this file")
    ap.add_argument(
        "--adapters",
        type=Path,
        default=None,
        help="directory holding <expert>/adapter_model.safetensors (default: the shipped adapters; "
        "random stand-in adapters if those are missing, which the output says)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    return ap


def data_root() -> Path:
    return Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data"))


# -- adapters -------------------------------------------------------------------------------------
def _has_adapter(d: Path) -> bool:
    return (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()


def resolve_adapters(requested: Path | None, names: Sequence[str] = DOMAINS) -> tuple[Path, str]:
    """Return ``(directory, kind)``; kind is "shipped", "given" or "random (stand-in ...)"."""
    if requested is not None:
        missing = [n for n in names if not _has_adapter(requested / n)]
        if missing:
            raise SystemExit(f"--adapters {requested}: no adapter for {', '.join(missing)}")
        return requested, "given"
    if all(_has_adapter(SHIPPED_ADAPTERS / n) for n in names):
        return SHIPPED_ADAPTERS, "shipped"
    from expertmix.io import expertmix_home

    out = expertmix_home() / "bench-random-adapters"
    for seed, n in enumerate(names):
        if not _has_adapter(out / n):
            sys.path.insert(0, str(REPO))
            from experts.models import resolve_base
            from tests.helpers import make_random_adapter

            out.mkdir(parents=True, exist_ok=True)
            make_random_adapter(
                resolve_base()[1], out / n, seed=seed, rank=8,
                targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            )
    log("shipped adapters missing: using RANDOM stand-in adapters (timings are representative, quality is not)")
    return out, "random (stand-in: shipped adapters missing)"


def adapter_info(adapters: Path, kind: str, names: Sequence[str] = DOMAINS) -> dict[str, Any]:
    """Where the adapters came from, with a short SHA-256 of each weights file (they get retrained)."""
    import hashlib

    files = {n: adapters / n / "adapter_model.safetensors" for n in names}
    return {
        "path": str(adapters),
        "kind": kind,
        "sha256_12": {n: hashlib.sha256(f.read_bytes()).hexdigest()[:12] for n, f in files.items()},
        "mtime": {n: time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(f.stat().st_mtime)) for n, f in files.items()},
    }


def config_with_adapters(adapters: Path, **orchestrator: Any):
    """The shipped config with its experts' adapters pointed at ``adapters/<name>``."""
    from orchestrator.config import load_config

    cfg = load_config()
    experts = tuple(replace(e, adapter=adapters / e.name) for e in cfg.experts)
    settings = replace(cfg.orchestrator, **orchestrator) if orchestrator else cfg.orchestrator
    return replace(cfg, experts=experts, orchestrator=settings)


def force_length(backend: Any) -> None:
    """Make every local generation run exactly ``max_new_tokens`` steps (EOS is suppressed).

    Bench-only: wraps this backend instance's ``generate_kwargs`` to add transformers'
    ``min_new_tokens``, so batched and sequential runs, mixture and single expert all decode
    the same number of tokens and the time ratios compare equal work.
    """
    orig = backend.generate_kwargs

    def generate_kwargs(config: Any) -> dict[str, Any]:
        kw = orig(config)
        kw["min_new_tokens"] = config.max_new_tokens
        return kw

    backend.generate_kwargs = generate_kwargs


def set_threads(n: int | None) -> None:
    """Call after loading the models (``load_base`` resets torch to all cores)."""
    if n:
        import torch

        torch.set_num_threads(n)


# -- timing ---------------------------------------------------------------------------------------
def interleaved(
    fns: Mapping[str, Callable[[], Any]], *, reps: int, warmup: int = 1
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every function ``reps`` times, alternating the order each round (ABC, CBA, ...).

    ``warmup`` untimed rounds first. Returns wall times per name and each one's last result.
    """
    names = list(fns)
    last: dict[str, Any] = {}
    for _ in range(warmup):
        for n in names:
            last[n] = fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            t = time.perf_counter()
            last[n] = fns[n]()
            times[n].append(time.perf_counter() - t)
    return times, last


def med(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-round ratios (rounds are adjacent in time, so load changes cancel better)."""
    return float(statistics.median(a / b for a, b in zip(num, den)))


# -- output ---------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "loadavg_at_start": load,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "commit": commit,
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
    }


def machine_line(info: Mapping[str, Any]) -> str:
    dev = f"CUDA ({info.get('gpu')})" if info["cuda"] else "no GPU"
    return (
        f"machine: {info['cpu']}, {info['cores']} cores ({info['torch_threads']} torch threads), {dev}; "
        f"OMP_WAIT_POLICY={info['omp_wait_policy']}, GOMP_SPINCOUNT={info.get('gomp_spincount')}; load avg at start {info['loadavg_at_start']}; torch {info['torch']}, transformers "
        f"{info['transformers']}, peft {info['peft']}; commit {info['commit']}"
    )


def random_weights_copy(src: str, out: Path, *, seed: int = 0) -> Path:
    """A model with ``src``'s config and tokenizer and freshly initialised float32 weights.

    For a machine the real weights cannot reach (the GPU check carries only the default base's
    config and tokenizer files): same shapes, so the shipped adapters fit it; timings hold, answers
    are noise.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(src).save_pretrained(str(out))
    gen = Path(src) / "generation_config.json"
    if gen.is_file():
        (Path(out) / "generation_config.json").write_text(gen.read_text(encoding="utf-8"), encoding="utf-8")
    return Path(out)


def write_json(path: Path | None, result: Mapping[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    log(f"wrote {path}")

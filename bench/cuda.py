"""Experts on a GPU: the decode step for k = 1..4 experts, mixed vs single adapter, batched LoRA vs peft.

    python bench/cuda.py [--quick] [--smoke] [--base DIR [--random-weights]] [--dtype D] [--out FILE.json]

The CPU levers of bench/backend.py (GEMM path, lean/C decode step, int8) switch off on CUDA; what
runs there is transformers' step on torch's kernels, with expertmix's batched LoRA (one gathered
matmul per projection for mixed rows) and merged weights for single-expert batches. This bench
measures that path on ``--device`` (default: cuda when available; a ``--smoke`` run on CPU only
proves the script works): one LocalBackend with the shipped adapters, greedy generations with EOS
suppressed, each ``forward`` timed after a device synchronize (prefill = first call, decode step =
median of the rest), variants interleaved per round, medians and per-round paired ratios.

1. decode step for k = 1..4 rows, each a different expert (k=4 adds ``__base__``), vs k=1 — the
   batched path and peft's ``adapter_names`` loop; k base rows.
2. 3 rows on 3 adapters vs the same 3 rows on one adapter (chosen paths, batched kernel, peft).
3. greedy tokens of the mixed batch, batched path vs peft (same dtype): equal or not, and the
   largest last-position logit difference.
4. bandwidth probe (device copy) and the bytes of weights a step reads: the roofline fraction.

``--base DIR --random-weights`` builds a copy of DIR's config and tokenizer with random weights
(the GPU check cannot carry the real ones): the timings hold, the answers are noise.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from backend import PROMPT, StepTimer, _interleaved_results, _relative, bandwidth_gbs, paths, weight_bytes


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="seconds: k = 1, 2, 1 round, 4 tokens")
    ap.add_argument("--base", default=None, help="base model directory or id (default: the embedded default)")
    ap.add_argument("--random-weights", action="store_true", help="random weights with --base's config and tokenizer")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cuda:N or cpu")
    ap.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 2 --quick, else 5)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per row (default 16 --quick, else 32)")
    args = ap.parse_args(argv)
    reps = 1 if args.smoke else args.reps or (2 if args.quick else 5)
    n_tok = 4 if args.smoke else args.max_new_tokens or (16 if args.quick else 32)
    warm = 0 if args.smoke else 1
    ks = (1, 2) if args.smoke else (1, 2, 3, 4)
    t_start = time.perf_counter()

    import torch

    from experts.backends.base import GenerationConfig
    from experts.backends.local import LocalBackend
    from experts.models import load_base, resolve_device
    from experts.registry import ExpertSpec

    device = resolve_device(args.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tmp = tempfile.TemporaryDirectory(prefix="expertmix-randbase-")
    base_arg: Any = args.base
    if args.random_weights:
        if not args.base:
            ap.error("--random-weights needs --base DIR (config and tokenizer files)")
        base_arg = C.random_weights_copy(args.base, Path(tmp.name) / "base")
    adapters, kind = C.resolve_adapters(args.adapters)
    specs = [ExpertSpec(name=d, adapter=adapters / d) for d in C.DOMAINS]
    base = load_base(base_arg, device=device, dtype=args.dtype) if base_arg else load_base(device=device, dtype=args.dtype)
    local = LocalBackend(base, specs)
    local.prefix = None  # rounds repeat one prompt; the prompt-prefix cache would serve it (bench/speed.py measures it)
    C.set_threads(args.threads)
    info = C.machine_info()
    C.force_length(local)
    timer = StepTimer(local.base.model, sync if device.startswith("cuda") else None)
    cfg = GenerationConfig(max_new_tokens=n_tok)
    msgs = [{"role": "user", "content": PROMPT}]
    experts_k = {k: ([*C.DOMAINS, "__base__"])[:k] for k in ks}

    def measure(rows: list[str], **sw: Any):
        def f() -> tuple[float, float]:
            with paths(local, **sw):
                local.generate([(r, msgs) for r in rows], cfg)
            return timer.split()
        return f

    def run(fns: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
        return _interleaved_results(fns, reps, warm)[1]

    # -- 1. decode step vs k ---------------------------------------------------------------------------
    fns = {}
    for k in ks:
        fns[f"experts_k{k}"] = measure(experts_k[k])
        fns[f"experts_k{k}_peft"] = measure(experts_k[k], lora="peft")
        fns[f"base_k{k}"] = measure(["__base__"] * k)
    C.log(f"[1/4] decode step on {device}: {len(fns)} variants x {reps} rounds, {n_tok} tokens ...")
    res = run(fns)
    step = {n: C.med([s for _, s in v]) for n, v in res.items()}
    prefill = {n: C.med([p for p, _ in v]) for n, v in res.items()}

    def ratio(a: str, b: str, src: dict[str, list[tuple[float, float]]] = res) -> float:
        return C.paired_ratio([s for _, s in src[a]], [s for _, s in src[b]])

    per_path = {p: {str(k): ratio(p.format(k=k), p.format(k=1)) for k in ks}
                for p in ("experts_k{k}", "experts_k{k}_peft", "base_k{k}")}
    fast_over_peft = {str(k): ratio(f"experts_k{k}", f"experts_k{k}_peft") for k in ks}

    # -- 2. mixed vs single adapter ----------------------------------------------------------------------
    rows_mixed, rows_one = list(C.DOMAINS), [C.DOMAINS[0]] * 3
    fns = {
        "mixed": measure(rows_mixed), "single": measure(rows_one),
        "mixed_lora": measure(rows_mixed, merged=False), "single_lora": measure(rows_one, merged=False),
        "mixed_peft": measure(rows_mixed, lora="peft"), "single_peft": measure(rows_one, lora="peft"),
    }
    C.log(f"[2/4] mixed vs single adapter: {len(fns)} variants x {reps} rounds ...")
    mres = run(fns)
    mixed = {
        "chosen": ratio("mixed", "single", mres), "batched_lora_kernel": ratio("mixed_lora", "single_lora", mres),
        "peft": ratio("mixed_peft", "single_peft", mres), "mixed_fast_over_peft": ratio("mixed", "mixed_peft", mres),
        "step_ms": {n: round(1e3 * C.med([s for _, s in v]), 3) for n, v in mres.items()},
    }

    # -- 3. same greedy tokens ----------------------------------------------------------------------------
    C.log("[3/4] batched path vs peft: greedy tokens and logits ...")
    rows = [*C.DOMAINS, "__base__"]
    texts, logits = {}, {}
    for lora in ("fast", "peft"):
        with paths(local, lora=lora, merged=False):
            texts[lora] = [g.text for g in local.generate([(r, msgs) for r in rows], cfg)]
            ids, mask = local.batch_inputs([local.encode_prompt(msgs)] * len(rows))
            with local._lock, torch.inference_mode():
                logits[lora] = local.model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits[:, -1].float()
        timer.calls.clear()
    same = {"greedy_tokens_equal": texts["fast"] == texts["peft"],
            "max_abs_logit_diff": float((logits["fast"] - logits["peft"]).abs().max()),
            "logit_scale": float(logits["peft"].abs().max()), "dtype": str(local.base.dtype).replace("torch.", "")}

    # -- 4. roofline ---------------------------------------------------------------------------------------
    C.log("[4/4] bandwidth probe ...")
    bw = bandwidth_gbs(64 if args.smoke else 1024, device=device, sync=sync)
    nbytes = weight_bytes(local.base.model)
    roof_ms = nbytes / (bw * 1e9) * 1e3
    roofline = {"bandwidth_gbs": bw, "weight_bytes": nbytes, "roofline_step_ms": roof_ms,
                "single_expert_step_ms": step["experts_k1"] * 1e3, "fraction": roof_ms / (step["experts_k1"] * 1e3)}

    result = {
        "bench": "cuda",
        "device": device,
        "decode_step_ratio": {str(k): per_path["experts_k{k}"][str(k)] for k in ks if k > 1},
        "mixed_over_single_adapter": mixed["chosen"],
        "decode_step_ratio_by_path": per_path,
        "batched_over_peft_step": fast_over_peft,
        "step_ms": {n: round(v * 1e3, 3) for n, v in step.items()},
        "prefill_ms": {n: round(v * 1e3, 3) for n, v in prefill.items()},
        "mixed": mixed,
        "same_answers": same,
        "roofline": roofline,
        "base": {"name": local.base.name, "random_weights": args.random_weights, "dtype": same["dtype"]},
        "adapters": _relative(C.adapter_info(adapters, kind)),
        "settings": {"quick": args.quick, "smoke": args.smoke, "reps": reps, "warmup_rounds": warm,
                     "max_new_tokens": n_tok, "prompt": PROMPT},
        "machine": info,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(C.machine_line(info))
    print(f"base {local.base.name} ({same['dtype']}{', random weights' if args.random_weights else ''}) on {device}; "
          f"{reps} rounds, {n_tok} tokens a row")
    print(C.table(["rows k", "experts step ms", "vs k=1", "peft step ms", "vs k=1", "batched / peft", "base k rows vs k=1"],
                  [[k, f"{step[f'experts_k{k}'] * 1e3:.2f}", f"{per_path['experts_k{k}'][str(k)]:.2f}x",
                    f"{step[f'experts_k{k}_peft'] * 1e3:.2f}", f"{per_path['experts_k{k}_peft'][str(k)]:.2f}x",
                    f"{fast_over_peft[str(k)]:.2f}x", f"{per_path['base_k{k}'][str(k)]:.2f}x"] for k in ks]))
    print(C.table(["3 rows: 3 adapters / 1 adapter", "ratio"],
                  [["chosen (batched; merged for one)", f"{mixed['chosen']:.2f}x"],
                   ["batched kernel on both", f"{mixed['batched_lora_kernel']:.2f}x"],
                   ["peft's loop", f"{mixed['peft']:.2f}x"],
                   ["mixed: batched / peft", f"{mixed['mixed_fast_over_peft']:.2f}x"]]))
    print(f"greedy tokens batched == peft: {same['greedy_tokens_equal']} (largest logit difference "
          f"{same['max_abs_logit_diff']:.2e} of {same['logit_scale']:.1f}, {same['dtype']})")
    print(f"roofline: {nbytes / 1e6:.0f} MB of weights at {bw:.0f} GB/s = {roof_ms:.3f} ms; single-expert step "
          f"{step['experts_k1'] * 1e3:.2f} ms ({roofline['fraction']:.2f} of the roofline)")
    C.write_json(args.out, result)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

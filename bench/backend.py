"""Mixed-adapter batching: wall time of one batch of k expert generations vs the same k one after another.

    python bench/backend.py [--quick] [--out FILE.json]

One LocalBackend holds the base model and the finance, engineering and product adapters.
For k = 1, 2, 3 the first k experts each answer the same prompt (as in ``ask``: every
routed expert gets the question), either as **one mixed-adapter batch**
(``LocalBackend.generate`` with k requests, peft ``adapter_names=``) or **sequentially**
(k calls of one request each). Greedy decoding, ``max_new_tokens`` fixed (32; 64 without
``--quick``) and EOS suppressed (transformers ``min_new_tokens``), so every row decodes exactly
that many tokens and both sides do the same work. All six variants are timed in the same run,
interleaved (round order alternates: forward, then reversed), after one warm-up round; the
table shows medians and the median of per-round ratios.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

PROMPT = (
    "Our checkout page is slow after the last deploy. How should engineering profile it, "
    "and what should product tell customers?"
)


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 5 with --quick, else 11)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per row (default 32 --quick, else 64)")
    args = ap.parse_args(argv)
    reps = args.reps or (5 if args.quick else 11)
    n_tok = args.max_new_tokens or (32 if args.quick else 64)
    t_start = time.perf_counter()

    from experts.backends.base import GenerationConfig
    from experts.backends.local import LocalBackend
    from experts.models import load_base
    from experts.registry import ExpertSpec

    adapters, kind = C.resolve_adapters(args.adapters)
    local = LocalBackend(load_base(), [ExpertSpec(name=d, adapter=adapters / d) for d in C.DOMAINS])
    C.set_threads(args.threads)
    info = C.machine_info()
    C.force_length(local)
    cfg = GenerationConfig(max_new_tokens=n_tok)
    messages = [{"role": "user", "content": PROMPT}]
    experts = list(C.DOMAINS)

    def batched(k: int):
        return lambda: local.generate([(e, messages) for e in experts[:k]], cfg)

    def sequential(k: int):
        return lambda: [local.generate([(e, messages)], cfg)[0] for e in experts[:k]]

    fns = {}
    for k in (1, 2, 3):
        fns[f"batched_k{k}"] = batched(k)
        fns[f"sequential_k{k}"] = sequential(k)
    C.log(f"timing {len(fns)} variants x {reps} rounds (+1 warm-up), {n_tok} tokens per row ...")
    times, last = C.interleaved(fns, reps=reps, warmup=1)
    tokens = {name: [g.tokens for g in out] for name, out in last.items()}

    rows, per_k = [], {}
    b1 = times["batched_k1"]
    for k in (1, 2, 3):
        b, s = times[f"batched_k{k}"], times[f"sequential_k{k}"]
        per_k[str(k)] = {
            "experts": experts[:k],
            "batched_s": C.med(b),
            "sequential_s": C.med(s),
            "speedup_sequential_over_batched": C.paired_ratio(s, b),
            "batched_over_batched_k1": C.paired_ratio(b, b1),
            "tokens_per_row": tokens[f"batched_k{k}"],
            "batched_tokens_per_s": k * n_tok / C.med(b),
            "sequential_tokens_per_s": k * n_tok / C.med(s),
            "batched_times_s": [round(x, 4) for x in b],
            "sequential_times_s": [round(x, 4) for x in s],
        }
        p = per_k[str(k)]
        rows.append([
            k, "+".join(experts[:k]), f"{p['batched_s']:.2f}", f"{p['sequential_s']:.2f}",
            f"{p['speedup_sequential_over_batched']:.2f}x", f"{p['batched_over_batched_k1']:.2f}x",
            f"{p['batched_tokens_per_s']:.0f} / {p['sequential_tokens_per_s']:.0f}",
        ])

    print(f"Mixed-adapter batch vs sequential: same prompt, {n_tok} new tokens per expert (EOS suppressed), "
          f"greedy; median of {reps} interleaved rounds after 1 warm-up; adapters: {kind}")
    print(C.table(
        ["k", "experts", "batched (s)", "sequential (s)", "speed-up", "batched vs k=1", "tokens/s batched / seq"],
        rows,
    ))
    print(C.machine_line(info))

    result = {
        "per_k": per_k,
        "settings": {
            "quick": args.quick, "reps": reps, "warmup_rounds": 1, "max_new_tokens": n_tok,
            "eos": "suppressed (min_new_tokens = max_new_tokens)", "decoding": "greedy",
            "prompt": PROMPT, "order": "interleaved, alternating forward/reverse each round",
        },
        "adapters": C.adapter_info(adapters, kind),
        "machine": info,
        "time_s": round(time.perf_counter() - t_start, 1),
    }
    C.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Is the default strategy fast enough on a two-part question? ``ask`` (auto → decompose, sections) vs one expert.

    python bench/agentic.py [--quick] [--smoke] [--out FILE.json]

Questions: two-part rows of the cross-department set (``bench/composite.py``, seeded), kept when
the shipped planner splits them into parts on different experts. For each question, interleaved
and repeated (medians of per-round ratios):

- **default**: ``Orchestrator.ask(q)`` with the shipped config's strategy (``auto``: every part on
  its own expert in one mixed-adapter batch, answers joined as sections — no aggregator pass);
- **one expert**: ``Orchestrator.generate(top expert, q)`` — one expert answering the whole question;

both with the same ``max_new_tokens``, and every generation forced to run exactly that many tokens
(EOS suppressed, bench-only) so the two sides do comparable work. Target (issue 13): default ≤ 1.3×
one expert. ``--smoke``: one question, 4 tokens, one round.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--smoke", action="store_true", help="one question, 4 tokens, one round (seconds)")
    ap.add_argument("--questions", type=int, default=None, help="two-part questions (default 8, --quick 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 64, --quick 32, --smoke 4")
    ap.add_argument("--reps", type=int, default=None, help="timed rounds (default 3, --smoke 1)")
    ap.add_argument("--data", type=Path, default=C.data_root(), help="shared data root")
    args = ap.parse_args(argv)
    n_q = args.questions or (1 if args.smoke else 4 if args.quick else 8)
    new = args.max_new_tokens or (4 if args.smoke else 32 if args.quick else 64)
    reps = args.reps or (1 if args.smoke else 3)
    t_start = time.perf_counter()

    from composite import build_composite

    from orchestrator import Orchestrator

    om = Orchestrator.from_config()
    C.set_threads(args.threads)
    assert om.local is not None
    C.force_length(om.local)
    # each question repeats across rounds: the prompt-prefix cache would serve all but its last block on both
    # sides; off, every round computes its prompts as a new question would (bench/speed.py measures the cache)
    om.local.prefix = None
    info = C.machine_info()
    strategy = om.settings.strategy

    rows = [r for r in build_composite(args.data, 64, seed=0) if len(r.parts) == 2]
    chosen = []
    for r in rows:
        plan = om.plan(r.request)
        if plan.multi:
            chosen.append((r, plan))
        if len(chosen) == n_q:
            break
    C.log(f"{len(chosen)} two-part questions the planner splits across experts (of {len(rows)} tried)")

    per_q = []
    for r, plan in chosen:
        top = plan.routing.experts[0].name
        fns = {
            "default": lambda q=r.request: om.ask(q, max_new_tokens=new),
            "one_expert": lambda q=r.request, e=top: om.generate(e, q, max_new_tokens=new),
        }
        times, last = C.interleaved(fns, reps=reps, warmup=0 if args.smoke else 1)
        ans = last["default"]
        per_q.append({
            "id": r.id,
            "parts": [p.expert for p in plan.parts],
            "answered_by": [p["answered_by"] for p in (ans.plan or {}).get("parts", [])],
            "chosen_strategy": ans.chosen,
            "default_s": C.med(times["default"]),
            "one_expert_s": C.med(times["one_expert"]),
            "ratio": C.paired_ratio(times["default"], times["one_expert"]),
        })
        C.log(f"{r.id}: ratio {per_q[-1]['ratio']:.2f} ({per_q[-1]['default_s']:.2f} s vs {per_q[-1]['one_expert_s']:.2f} s)")
    om.close()

    ratios = [q["ratio"] for q in per_q]
    ratio = C.med(ratios) if ratios else None
    print(f"End-to-end `ask` ({strategy}) on two-part questions vs one expert answering the whole question; "
          f"{len(per_q)} questions, {new} tokens forced per generation, {reps} interleaved rounds, medians")
    print(C.table(["question", "parts (planned)", "answered by", "default s", "one expert s", "ratio"],
                  [[q["id"], " + ".join(str(p) for p in q["parts"]), " + ".join(str(p) for p in q["answered_by"]),
                    f"{q['default_s']:.2f}", f"{q['one_expert_s']:.2f}", f"{q['ratio']:.2f}×"] for q in per_q]))
    if ratio is not None:
        print(f"median ratio {ratio:.2f}× (target ≤ 1.3×: {'yes' if ratio <= 1.3 else 'NO'})")
    print(C.machine_line(info))
    C.write_json(args.out, {
        "ratio_default_over_one_expert": ratio,
        "target_met": bool(ratio is not None and ratio <= 1.3),
        "strategy": strategy,
        "questions": per_q,
        "settings": {"quick": args.quick, "smoke": args.smoke, "questions": n_q, "max_new_tokens": new, "reps": reps,
                     "forced_length": True},
        "machine": info,
        "time_s": round(time.perf_counter() - t_start, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

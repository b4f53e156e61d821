"""Embed expertmix in an application: ask, stream and aask, and show how each question was routed.

    python examples/python_api.py                       # the shipped experts and router
    python examples/python_api.py --config my.toml      # your own expertmix.toml

One Orchestrator holds the base model, every LoRA expert and the router; build it once at
start-up and share it (it is thread-safe). The first call also loads the router's encoder.
"""

from __future__ import annotations

import argparse
import asyncio

from orchestrator import Orchestrator


def show_routing(answer) -> None:  # noqa: ANN001 - orchestrator.trace.Answer
    r = answer.routing
    picked = ", ".join(f"{e.name} {e.weight:.2f}" for e in r.experts)
    probs = ", ".join(f"{n} {p:.2f}" for n, p in sorted(r.probabilities.items(), key=lambda x: -x[1]))
    print(f"  routed to: {picked}  (all probabilities: {probs})")
    if r.abstained:
        print(f"  router abstained ({r.reason}); the base model answered")
    if answer.fallback:
        print(f"  fallback: {answer.fallback}")
    for c in answer.contributions:
        status = f"error: {c.error}" if c.error else f"{c.tokens} tokens, {c.latency_s:.2f} s"
        print(f"  - {c.expert} (weight {c.weight:.2f}): {status}")
    t = answer.timings
    print(f"  strategy {answer.strategy}; route {t.route:.3f} s, experts {t.experts:.2f} s, "
          f"merge {t.merge:.2f} s, total {t.total:.2f} s")


async def concurrent_questions(om: Orchestrator, questions: list[str]) -> None:
    # aask runs ask in a worker thread: an async web handler can await it without blocking.
    answers = await asyncio.gather(*(om.aask(q, k=1, strategy="top1", max_new_tokens=48) for q in questions))
    for q, a in zip(questions, answers):
        print(f"\nQ: {q}\nA: {a.text}")
        show_routing(a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="expertmix.toml (default: the shipped one)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    with Orchestrator.from_config(args.config) as om:
        print("experts:", ", ".join(om.expert_names))

        # 1. Routing only (no generation): which experts would answer, with which weights.
        r = om.route("How should we account for deferred revenue on annual plans?", k=2)
        print("route():", [(e.name, round(e.weight, 2)) for e in r.experts], "abstained:", r.abstained)

        # 2. ask(): route -> top-k experts in one mixed-adapter batch -> merge (default: synthesis).
        q = "Our checkout page is slow after the last deploy. How should engineering profile it?"
        answer = om.ask(q, k=2, max_new_tokens=args.max_new_tokens)
        print(f"\nQ: {q}\nA: {answer.text}")
        show_routing(answer)

        # Other merge strategies, per call: "top1", "mixture" (token-level), "adapter_merge" (weight space).
        answer = om.ask("Write a user story for a budgeting app.", k=2, strategy="mixture",
                        max_new_tokens=args.max_new_tokens)
        print(f"\nQ (mixture): Write a user story for a budgeting app.\nA: {answer.text}")
        show_routing(answer)

        # 3. stream(): text chunks as they are decoded, then the final Answer.
        print("\nQ (stream): How do I list the files in a directory in Python?\nA: ", end="", flush=True)
        final = None
        for item in om.stream("How do I list the files in a directory in Python?", k=1, strategy="top1",
                              max_new_tokens=args.max_new_tokens):
            if isinstance(item, str):
                print(item, end="", flush=True)
            else:
                final = item
        print()
        assert final is not None
        show_routing(final)

        # 4. aask(): the async variant, e.g. several questions from an async server.
        asyncio.run(concurrent_questions(om, [
            "What is a price-to-earnings ratio?",
            "The system shall export reports as PDF. Is this a functional requirement?",
        ]))

        # The whole answer as JSON (what the HTTP server returns in its metadata):
        print("\nas_dict keys:", sorted(answer.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

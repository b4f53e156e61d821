"""Orchestrator speed: k-expert batching, ask() end to end, mixture tokens/s, adapter_merge first vs cached.

    python bench/speed.py [--quick] [--smoke] [--out FILE.json]

``--smoke``: seconds (1 round, no warm-up, 4 tokens); the test suite runs it.

One Orchestrator on the shipped config (adapters: the shipped ones, else random stand-ins).
Greedy, ``max_new_tokens`` fixed (32; 64 without ``--quick``) and EOS suppressed (transformers
``min_new_tokens``, set on the local backend by the bench), so every generation decodes exactly
that many tokens; tokens/s use the tokens actually decoded. Every section times its variants
in the same run, interleaved (round order alternates forward/reverse) after one warm-up
round, and reports medians; ratios are medians of per-round ratios.

1. **experts stage**: the k routed experts of one question through the pool
   (``orchestrator.pool.run``: one mixed-adapter batch on the local backend) vs the same k
   experts one after another; k = 1, 2, 3. ``k2_over_k1`` = batched k=2 time / k=1 time.
2. **ask(synthesis)** for k = 1, 2, 3, batched (as shipped) vs the same pipeline with the
   pool forced to run the experts one at a time; with ``answer.timings`` (route, experts,
   merge = the aggregator's generation; k=1 has no aggregator).
3. **mixture** (k=2, routed weights) vs the top expert alone (``local.generate``): decoded
   tokens per second of the generation call.
4. **adapter_merge** (k=2): merge time of a new weight vector (``local.merged.get``, each
   round a weight vector not seen before), and one call = ``merged.get`` + generation, at new
   weights (first call) and at cached weights, vs the top expert alone.
5. **prefix cache** (``[base] prefix_cache_mb``): time to the first token (prefill + one step)
   of the experts stage at k = 1 and 2 with the prompt-prefix cache on vs off (a new question
   each call), k = 1 asking the same question again (everything but its last block reused), and
   k = 1 on a conversation's second turn (a new first turn each round, untimed; its prompt and
   answer are cached); 3x the rounds of the other sections (each call is short).

Every call asks a question never asked before ("Ticket NNNN: " + the question): the prompt-prefix
cache then reuses the chat template's start, as for any new question, and never a whole repeated
prompt (section 5 measures that case on its own).
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

PROMPT = (
    "Our checkout page is slow after the last deploy. How should engineering profile it, "
    "and what should product tell customers?"
)


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--reps", type=int, default=None, help="timed rounds per section (default 3 --quick, else 9)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per generation (default 32 --quick, else 64)")
    if not any("--smoke" in a.option_strings for a in ap._actions):
        ap.add_argument("--smoke", action="store_true", help="seconds: 1 round, no warm-up, 4 tokens")
    args = ap.parse_args(argv)
    reps = 1 if args.smoke else args.reps or (3 if args.quick else 9)
    n_tok = 4 if args.smoke else args.max_new_tokens or (32 if args.quick else 64)
    warm = 0 if args.smoke else 1
    t_start = time.perf_counter()

    from experts.backends.base import GenerationConfig
    from experts.backends.mixture import mixture_generate
    from orchestrator import Orchestrator

    adapters, kind = C.resolve_adapters(args.adapters)
    orch = Orchestrator(C.config_with_adapters(adapters))
    C.set_threads(args.threads)
    info = C.machine_info()
    local = orch.local
    assert local is not None
    C.force_length(local)
    cfg = GenerationConfig(max_new_tokens=n_tok)
    tickets = itertools.count(1000)  # four digits, one token each: every question has the same length

    def question() -> str:
        return f"Ticket {next(tickets)}: {PROMPT}"

    def new_messages() -> list[dict[str, str]]:
        return [{"role": "user", "content": question()}]

    # min_weight=0: the bench needs k experts even where the default min_weight would drop the weak ones
    routing = orch.route(PROMPT, k=3, min_weight=0.0)
    order = [e.name for e in routing.experts]
    order += [d for d in C.DOMAINS if d not in order]
    r2 = {e.name: e.weight for e in orch.route(PROMPT, k=2, min_weight=0.0).experts}
    if len(r2) < 2:  # the router gave (near) all weight to one expert: mix with the next one anyway
        r2 = {order[0]: 0.7, order[1]: 0.3}
    total = sum(r2.values())
    routed2 = {n: w / total for n, w in r2.items()}
    top = order[0]
    result: dict = {}

    # -- 1. experts stage ------------------------------------------------------------------------
    def pool_batched(k: int):
        def f():
            messages = new_messages()
            return orch.pool.run([(e, messages) for e in order[:k]], cfg)
        return f

    def pool_sequential(k: int):
        def f():
            messages = new_messages()
            return [orch.pool.run([(e, messages)], cfg)[0] for e in order[:k]]
        return f

    fns = {}
    for k in (1, 2, 3):
        fns[f"batched_k{k}"] = pool_batched(k)
        fns[f"sequential_k{k}"] = pool_sequential(k)
    C.log(f"[1/5] experts stage: 6 variants x {reps} rounds ...")
    times, last = C.interleaved(fns, reps=reps, warmup=warm)
    for name, outs in last.items():
        bad = [o.error for o in outs if not o.ok]
        if bad:
            raise SystemExit(f"{name}: expert failed: {bad}")
    stage = {}
    for k in (1, 2, 3):
        b, s = times[f"batched_k{k}"], times[f"sequential_k{k}"]
        stage[str(k)] = {
            "experts": order[:k], "batched_s": C.med(b), "sequential_s": C.med(s),
            "batched_over_k1": C.paired_ratio(b, times["batched_k1"]),
            "sequential_over_batched": C.paired_ratio(s, b),
            "tokens": [o.generation.tokens for o in last[f"batched_k{k}"]],
        }
    result["experts_stage"] = stage

    # -- 2. ask(synthesis) ------------------------------------------------------------------------
    orig_run = orch.pool.run
    one_by_one = [False]

    def run(requests, config, **kw):
        if not one_by_one[0]:
            return orig_run(requests, config, **kw)
        return [o for r in requests for o in orig_run([r], config, **kw)]

    orch.pool.run = run

    def ask(k: int, seq: bool):
        def f():
            one_by_one[0] = seq
            try:
                return orch.ask(question(), k=k, strategy="synthesis", max_new_tokens=n_tok, min_weight=0.0)
            finally:
                one_by_one[0] = False
        return f

    fns = {}
    for k in (1, 2, 3):
        fns[f"ask_k{k}"] = ask(k, False)
        fns[f"ask_seq_k{k}"] = ask(k, True)
    C.log(f"[2/5] ask(synthesis): 6 variants x {reps} rounds ...")
    ask_times, ask_last = C.interleaved(fns, reps=reps, warmup=warm)
    asks = {}
    for k in (1, 2, 3):
        a, sq = ask_times[f"ask_k{k}"], ask_times[f"ask_seq_k{k}"]
        ans = ask_last[f"ask_k{k}"]
        asks[str(k)] = {
            "experts": list(ans.weights), "fallback": ans.fallback,
            "total_s": C.med(a), "sequential_total_s": C.med(sq),
            "total_over_k1": C.paired_ratio(a, ask_times["ask_k1"]),
            "sequential_over_batched": C.paired_ratio(sq, a),
            "timings_last": ans.timings.to_dict(), "tokens_last": ans.tokens,
        }
    result["ask_synthesis"] = asks

    # -- 3. mixture vs single expert ----------------------------------------------------------------
    def tps(g) -> float:
        return g.tokens / g.latency_s

    mix_tps: list[float] = []
    one_tps: list[float] = []

    def single():
        g = local.generate([(top, new_messages())], cfg)[0]
        one_tps.append(tps(g))
        return g

    def mixture():
        g = mixture_generate(local, new_messages(), routed2, cfg)
        mix_tps.append(tps(g))
        return g

    C.log(f"[3/5] mixture vs single: 2 variants x {reps} rounds ...")
    mtimes, mlast = C.interleaved({"single": single, "mixture": mixture}, reps=reps, warmup=warm)
    mix_tps, one_tps = mix_tps[-reps:], one_tps[-reps:]
    result["mixture"] = {
        "weights": routed2, "single_expert": top,
        "mixture_tokens_per_s": C.med(mix_tps), "single_tokens_per_s": C.med(one_tps),
        "mixture_over_single_tps": C.paired_ratio(mix_tps, one_tps),
        "tokens": {"mixture": mlast["mixture"].tokens, "single": mlast["single"].tokens},
        "wall_s": {"mixture": C.med(mtimes["mixture"]), "single": C.med(mtimes["single"])},
    }

    # -- 4. adapter_merge ---------------------------------------------------------------------------
    e1, e2 = list(routed2)
    # weight vectors not merged before (the cache key rounds to 0.01), none equal to the routed one
    fresh = iter([w / 100 for w in range(51, 100) if abs(w / 100 - routed2[e1]) > 0.006])
    merge_s: list[float] = []

    def merged_call(weights: dict[str, float]):
        t = time.perf_counter()
        name = local.merged.get(weights)
        dt = time.perf_counter() - t
        return dt, local.generate([(name, new_messages())], cfg)[0]

    def first():
        w = next(fresh)
        dt, g = merged_call({e1: w, e2: 1 - w})
        merge_s.append(dt)
        return g

    def cached():
        return merged_call(routed2)[1]

    def single_am():
        return local.generate([(top, new_messages())], cfg)[0]

    C.log(f"[4/5] adapter_merge: 3 variants x {reps} rounds ...")
    atimes, _ = C.interleaved({"first": first, "cached": cached, "single": single_am}, reps=reps, warmup=warm)
    t = time.perf_counter()
    local.merged.get(routed2)
    lookup_s = time.perf_counter() - t
    result["adapter_merge"] = {
        "weights": routed2,
        "merge_s": C.med(merge_s[-reps:]),
        "first_call_s": C.med(atimes["first"]), "cached_call_s": C.med(atimes["cached"]),
        "single_s": C.med(atimes["single"]),
        "cached_over_single": C.paired_ratio(atimes["cached"], atimes["single"]),
        "first_over_single": C.paired_ratio(atimes["first"], atimes["single"]),
        "cached_lookup_s": lookup_s,
        "cache": {"hits": local.merged.hits, "misses": local.merged.misses, "max_size": local.merged.max_size},
    }
    # -- 5. prefix cache ------------------------------------------------------------------------------
    pc = local.prefix
    repeated = new_messages()
    cfg_first = GenerationConfig(max_new_tokens=1)

    def cached_stage(k: int, on: bool, msgs=None):
        def f():
            local.prefix = pc if on else None
            try:
                m = msgs if msgs is not None else new_messages()
                return orch.pool.run([(e, m) for e in order[:k]], cfg_first)
            finally:
                local.prefix = pc
        return f

    pfns = {"k1_on": cached_stage(1, True), "k1_off": cached_stage(1, False), "k2_on": cached_stage(2, True),
            "k2_off": cached_stage(2, False), "k1_repeat": cached_stage(1, True, repeated)}
    C.log(f"[5/5] prefix cache: 5 variants x {3 * reps} rounds ...")
    ptimes, _ = C.interleaved(pfns, reps=3 * reps, warmup=warm)
    # the next turn of a conversation: a new first turn each round (cache on, untimed; its prompt and answer
    # are stored), then the second turn timed with the cache on and off, in alternating order
    follow = {"role": "user", "content": "And what should we do first? One sentence."}
    turn_times: dict[str, list[float]] = {"on": [], "off": []}
    turn_reused = turn_tokens = 0

    def second_turn(turn2, on: bool) -> float:
        local.prefix = pc if on else None
        try:
            t = time.perf_counter()
            orch.pool.run([(order[0], turn2)], cfg_first)
            return time.perf_counter() - t
        finally:
            local.prefix = pc

    if pc is not None:
        for r in range(warm + 3 * reps):
            m = new_messages()
            answer = orch.pool.run([(order[0], m)], cfg)[0].generation.text
            turn2 = [*m, {"role": "assistant", "content": answer}, follow]
            turn_tokens = len(local.encode_prompt(turn2))
            turn_reused = pc.cached_tokens(order[0], local.encode_prompt(turn2))
            sides = ("on", "off") if r % 2 == 0 else ("off", "on")
            got = {side: second_turn(turn2, side == "on") for side in sides}
            if r >= warm:
                for side in sides:
                    turn_times[side].append(got[side])
    n_prompt = local.check_prompt(new_messages(), n_tok)
    result["prefix_cache"] = {
        "enabled": pc is not None, "prompt_tokens": n_prompt, "max_new_tokens": 1, "rounds": 3 * reps,
        "block": pc.block if pc is not None else None,
        "reused_tokens": {  # per row: a new question, the same question again
            "new_question": pc.cached_tokens(order[0], local.encode_prompt(new_messages())) if pc is not None else 0,
            "same_question": pc.cached_tokens(order[0], local.encode_prompt(repeated)) if pc is not None else 0,
            "next_turn": turn_reused,
        },
        "next_turn_prompt_tokens": turn_tokens,
        "next_turn_on_s": C.med(turn_times["on"]) if turn_times["on"] else None,
        "next_turn_off_s": C.med(turn_times["off"]) if turn_times["off"] else None,
        "next_turn_off_over_on": C.paired_ratio(turn_times["off"], turn_times["on"]) if turn_times["on"] else None,
        **{f"{v}_s": C.med(ptimes[v]) for v in pfns},
        "k1_off_over_on": C.paired_ratio(ptimes["k1_off"], ptimes["k1_on"]),
        "k2_off_over_on": C.paired_ratio(ptimes["k2_off"], ptimes["k2_on"]),
        "k1_off_over_repeat": C.paired_ratio(ptimes["k1_off"], ptimes["k1_repeat"]),
        "k2_over_k1_off": C.paired_ratio(ptimes["k2_off"], ptimes["k1_off"]),
        "k2_over_k1_on": C.paired_ratio(ptimes["k2_on"], ptimes["k1_on"]),
        "stats": pc.stats() if pc is not None else None,
    }
    paths = _paths(local)
    orch.close()

    am, mx = result["adapter_merge"], result["mixture"]
    summary = {
        "k2_over_k1": stage["2"]["batched_over_k1"],
        "k3_over_k1": stage["3"]["batched_over_k1"],
        "mixture_over_single_tps": mx["mixture_over_single_tps"],
        "adapter_merge_first_s": am["merge_s"],
        "adapter_merge_cached_over_single": am["cached_over_single"],
        "ask_k2_over_k1": asks["2"]["total_over_k1"],
        "ask_k3_over_k1": asks["3"]["total_over_k1"],
        "prefix_ttft_k1_off_over_on": result["prefix_cache"]["k1_off_over_on"],
        "prefix_ttft_k2_off_over_on": result["prefix_cache"]["k2_off_over_on"],
        "prefix_ttft_next_turn_off_over_on": result["prefix_cache"]["next_turn_off_over_on"],
    }
    targets = {
        "k2_over_k1<=1.15": summary["k2_over_k1"] <= 1.15,
        "k3_over_k1<=1.3": summary["k3_over_k1"] <= 1.3,
        "mixture_over_single_tps>=0.85": summary["mixture_over_single_tps"] >= 0.85,
        "adapter_merge_cached_over_single<=1.05": summary["adapter_merge_cached_over_single"] <= 1.05,
    }

    yes = lambda ok: "yes" if ok else "NO"
    print(f"Speed, {n_tok} new tokens per generation (EOS suppressed), greedy; median of {reps} interleaved rounds "
          f"after {warm} warm-up (noisy shared machine: compare ratios, not seconds); routed experts for the prompt: {', '.join(f'{e.name} {e.weight:.2f}' for e in routing.experts)}; "
          f"adapters: {kind}")
    print()
    print("Experts stage (pool.run: one mixed-adapter batch vs the same experts one after another):")
    print(C.table(
        ["k", "experts", "batched (s)", "vs k=1", "sequential (s)", "sequential / batched"],
        [[k, "+".join(stage[k]["experts"]), f"{stage[k]['batched_s']:.2f}", f"{stage[k]['batched_over_k1']:.2f}x",
          f"{stage[k]['sequential_s']:.2f}", f"{stage[k]['sequential_over_batched']:.2f}x"] for k in stage],
    ))
    print()
    print("ask(strategy=synthesis) end to end (timings of the last round: route / experts / merge = aggregator):")
    print(C.table(
        ["k", "total (s)", "vs k=1", "experts unbatched (s)", "unbatched / batched", "route / experts / merge (s)"],
        [[k, f"{asks[k]['total_s']:.2f}", f"{asks[k]['total_over_k1']:.2f}x", f"{asks[k]['sequential_total_s']:.2f}",
          f"{asks[k]['sequential_over_batched']:.2f}x",
          " / ".join(f"{asks[k]['timings_last'][x]:.2f}" for x in ("route", "experts", "merge"))] for k in asks],
    ))
    print()
    print("Strategies vs one expert:")
    print(C.table(
        ["measure", "value", "target", "met"],
        [
            ["k=2 / k=1 (experts stage)", f"{summary['k2_over_k1']:.2f}x", "<= 1.15x", yes(targets["k2_over_k1<=1.15"])],
            ["k=3 / k=1 (experts stage)", f"{summary['k3_over_k1']:.2f}x", "<= 1.3x", yes(targets["k3_over_k1<=1.3"])],
            [f"mixture k=2 tokens/s ({mx['mixture_tokens_per_s']:.1f}) / single ({mx['single_tokens_per_s']:.1f})",
             f"{summary['mixture_over_single_tps']:.2f}x", ">= 0.85x", yes(targets["mixture_over_single_tps>=0.85"])],
            ["adapter_merge: merge of a new weight vector", f"{am['merge_s']:.2f} s", "", ""],
            ["adapter_merge first call (merge + generate) / single", f"{am['first_over_single']:.2f}x", "", ""],
            ["adapter_merge cached call / single", f"{summary['adapter_merge_cached_over_single']:.2f}x", "~1.0x",
             yes(targets["adapter_merge_cached_over_single<=1.05"])],
        ],
    ))
    pr = result["prefix_cache"]
    if pr["enabled"]:
        print()
        ru = pr["reused_tokens"]
        print(f"Prompt-prefix cache, time to the first token (experts stage, {pr['prompt_tokens']}-token prompts, "
              f"blocks of {pr['block']} tokens: "
              f"a new question reuses {ru['new_question']}, the same question {ru['same_question']}; "
              "off = every prompt prefilled whole):")
        print(C.table(
            ["case", "cache on (s)", "cache off (s)", "off / on"],
            [["k=1, new question", f"{pr['k1_on_s']:.2f}", f"{pr['k1_off_s']:.2f}", f"{pr['k1_off_over_on']:.2f}x"],
             ["k=2, new question", f"{pr['k2_on_s']:.2f}", f"{pr['k2_off_s']:.2f}", f"{pr['k2_off_over_on']:.2f}x"],
             ["k=1, the same question again", f"{pr['k1_repeat_s']:.2f}", f"{pr['k1_off_s']:.2f}",
              f"{pr['k1_off_over_repeat']:.2f}x"],
             [f"k=1, a conversation's next turn ({ru['next_turn']} of {pr['next_turn_prompt_tokens']} tokens reused)",
              f"{pr['next_turn_on_s']:.2f}", f"{pr['next_turn_off_s']:.2f}", f"{pr['next_turn_off_over_on']:.2f}x"]],
        ))
        print(f"k=2 / k=1: {pr['k2_over_k1_on']:.2f}x with the cache, {pr['k2_over_k1_off']:.2f}x without")
    print(f"paths: {paths}")
    print(C.machine_line(info))

    out = {
        **summary,
        "paths": paths,
        "targets_met": targets,
        **result,
        "raw_times_s": {**{k: [round(x, 4) for x in v] for k, v in times.items()},
                        **{k: [round(x, 4) for x in v] for k, v in ask_times.items()}},
        "settings": {
            "quick": args.quick, "smoke": args.smoke, "reps": reps, "warmup_rounds": warm, "max_new_tokens": n_tok,
            "eos": "suppressed (min_new_tokens = max_new_tokens)", "decoding": "greedy",
            "prompt": f"Ticket NNNN: {PROMPT}", "prompts": "a new ticket number every call",
            "order": "interleaved, alternating forward/reverse each round",
        },
        "routing": routing.to_dict(),
        "adapters": _relative(C.adapter_info(adapters, kind)),
        "machine": info,
        "time_s": round(time.perf_counter() - t_start, 1),
    }
    C.write_json(args.out, out)
    return 0


def _relative(info: dict) -> dict:
    """No absolute machine paths in results JSON."""
    p = Path(info.get("path", ""))
    if p.is_absolute():
        try:
            info["path"] = str(p.relative_to(C.REPO))
        except ValueError:
            info["path"] = p.name
    return info


def _paths(local) -> dict:
    """The fast paths the local backend runs with (docs/performance.md)."""
    plan = getattr(local.base, "gemm", None)
    fl = getattr(local, "fast_lora", None)
    opts = getattr(local.base, "options", None)
    return {
        "gemm": plan.path if plan else None, "gemm_max_rows": plan.max_rows if plan else None,
        "gemm_source": plan.source if plan else None,
        "fast_lora": fl is not None and fl.enabled, "merged_experts": fl.merged_experts if fl else 0,
        "quantize": opts.quantize if opts else "none", "cpu_kernel": bool(plan and getattr(plan, "kernel", False)),
        "lean_decode": getattr(local.base.model, "_expertmix_lean", None) is not None,
        "prefix_cache_mb": opts.prefix_cache_mb if opts and getattr(local, "prefix", None) is not None else 0,
    }


if __name__ == "__main__":
    raise SystemExit(main())

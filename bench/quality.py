"""Answer quality by strategy: per-token NLL of reference responses, single-domain and cross-department.

    python bench/quality.py --set single|composite|both [--quick] [--smoke] [--out FILE.json]

JSON: ``{"single": {"nll": {...}, ...}, "composite": {"nll": {...}, "parts_routed_correctly": x, ...}}``.
``--set composite`` is described in bench/_quality_composite.py (set built by bench/composite.py).
``--smoke``: one row per set, 4 reference tokens, 4-token drafts (seconds; the test suite runs it).

Single set. Data: ``experts/<domain>/val.jsonl`` of the shared data (fields instruction, response), an
evenly spaced fixed sample per domain (10 rows with ``--quick``, 48 without). Each response is
scored teacher-forced after its instruction, encoded exactly as in training and at inference
(chat template, generation prompt; the scored tokens are the response and its end-of-turn
token; rows over ``--max-length`` tokens have their response truncated).

The router (``Router.load()``: the current store version, else the shipped router) routes each
instruction with k=2. Per row, one forward pass of a mixed-adapter batch gives the log-probs of
the reference tokens under every model at once:

- **base**: no adapter;
- **oracle**: the domain's own expert;
- **top1**: the router's top expert (even when the router abstains; the row "top1 as served"
  uses the base model where it abstains, as ``ask`` does);
- **mixture** (k=2): -log Σᵢ wᵢ·pᵢ(t) at the routed weights, from the two experts' per-token
  log-probs with logsumexp (exactly the distribution ``mixture`` decodes from);
- **adapter_merge** (k=2): the adapter ``local.merged.get(weights)`` at the routed weights.

NLL per token = summed NLL / scored tokens, per domain; "mean" is the mean over the three
domains (each domain weighted equally). Targets: top1 within 2 % of oracle, >= 10 % below base.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C

if TYPE_CHECKING:
    from experts.training_data import Encoded

MODELS = ("base", "oracle", "top1", "top1_served", "mixture", "adapter_merge", "auto_served")
LABELS = {
    "base": "base (no adapter)",
    "oracle": "oracle (domain's own expert)",
    "top1": "top1 (routed, k=1)",
    "top1_served": "top1 as served (abstain -> base)",
    "mixture": "mixture (k=2, routed weights)",
    "adapter_merge": "adapter_merge (k=2, routed weights)",
    "auto_served": "auto as served (the shipped default)",
}


def _sample(n_total: int, n: int) -> list[int]:
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    step = n_total / n
    return [int(i * step) for i in range(n)]


def run_single(*, local: Any, router: Any, data: Path, n_rows: int, max_length: int, max_ref_tokens: int | None,
               quick: bool) -> dict:
    """Today's single-domain table (printed); returns the ``single`` section of the bench JSON."""
    import torch

    from experts.registry import BASE_EXPERT
    from experts.training_data import encode_pairs, load_pairs

    t_start = time.perf_counter()
    dev = local.base.device

    sums = {m: {d: 0.0 for d in C.DOMAINS} for m in MODELS}
    tokens = {d: 0 for d in C.DOMAINS}
    rows_used: dict[str, int] = {}
    truncated: dict[str, int] = {}
    auto_split: dict[str, int] = {}
    routing_stats: dict[str, dict] = {}
    merge_times: list[float] = []
    examples: dict[str, list[dict]] = {}
    for domain in C.DOMAINS:
        path = data / "experts" / domain / "val.jsonl"
        pairs = load_pairs(path, min_rows=1)
        idx = _sample(len(pairs), n_rows)
        pairs = [pairs[i] for i in idx]
        rows_used[domain] = len(pairs)
        encoded, truncated[domain] = encode_pairs(local.tokenizer, pairs, max_length=max_length, path=path)
        if max_ref_tokens:  # --smoke: score only the first few response tokens
            encoded = [_clip(row, max_ref_tokens) for row in encoded]
        routings = router.route_batch([p.instruction for p in pairs], k=2)
        top1 = Counter(r.experts[0].name for r in routings)
        abstained = sum(r.abstained for r in routings)
        routing_stats[domain] = {
            "rows": len(pairs),
            "top1_accuracy": top1[domain] / len(pairs),
            "top2_contains_domain": sum(domain in [e.name for e in r.experts] for r in routings) / len(pairs),
            "abstained": abstained,
            "top1_counts": dict(top1),
            "mean_top1_weight": sum(r.experts[0].weight for r in routings) / len(pairs),
        }
        examples[domain] = [
            {"line": p.line, "instruction": p.instruction[:120],
             "routed": [[e.name, round(e.weight, 3)] for e in r.experts], "abstained": r.abstained}
            for p, r in list(zip(pairs, routings))[:3]
        ]
        from orchestrator.merge.auto import CLOSE
        from orchestrator.planning import PlanContext, get_planner

        pctx = PlanContext(router=router, k=2, min_weight=0.05)
        plans = [get_planner("segment").plan(p.instruction, pctx) for p in pairs]
        auto_split[domain] = sum(pl.multi for pl in plans)
        for row, r, pl in zip(encoded, routings, plans):
            weights = {e.name: e.weight for e in r.experts}
            misses, t = local.merged.misses, time.perf_counter()
            merged = local.merged.get(weights) if len(weights) > 1 else next(iter(weights))
            if local.merged.misses > misses:
                merge_times.append(time.perf_counter() - t)
            names = [BASE_EXPERT, *C.DOMAINS, merged]
            # the scored tokens are the tail of the row: only their logits are computed
            n_resp = sum(1 for x in row.labels if x != -100)
            ids = torch.tensor([row.input_ids] * len(names), device=dev)
            tgt = ids[0, -n_resp:]
            with local._lock, torch.inference_mode():
                out = local.model(input_ids=ids, adapter_names=names, logits_to_keep=n_resp + 1)
                logits = out.logits[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1).gather(-1, tgt[None, :, None].expand(len(names), -1, 1))[..., 0]
            col = {n: i for i, n in enumerate(names[:-1])}
            nll = {
                "base": -logp[0],
                "oracle": -logp[col[domain]],
                "top1": -logp[col[r.experts[0].name]],
                "top1_served": -logp[0] if r.abstained else -logp[col[r.experts[0].name]],
                "adapter_merge": -logp[len(names) - 1],
            }
            lw = torch.tensor([math.log(w) for w in weights.values()], device=dev)[:, None]
            nll["mixture"] = -torch.logsumexp(lw + logp[[col[n] for n in weights]], dim=0)
            # auto as served: a one-part plan runs top1 (adapter_merge when the top-2 weights are close,
            # base when the router abstains); a question the planner splits (a false split on a
            # single-domain row) is scored under the whole request's top expert and counted apart
            whole = pl.routing
            if whole.abstained and not pl.multi:
                nll["auto_served"] = -logp[0]
            elif not pl.multi and len(r.experts) > 1 and r.experts[1].weight >= CLOSE:
                nll["auto_served"] = nll["adapter_merge"]
            else:
                nll["auto_served"] = -logp[col[whole.experts[0].name]]
            for m in MODELS:
                sums[m][domain] += float(nll[m].sum())
            tokens[domain] += int(tgt.numel())
        C.log(f"{domain}: {len(encoded)} rows scored ({time.perf_counter() - t_start:.0f} s)")

    # the encoding above must agree with LocalBackend.score_nll (the public scoring API)
    first = load_pairs(data / "experts" / C.DOMAINS[0] / "val.jsonl", min_rows=1)[0]
    api_sum, api_n = local.score_nll(C.DOMAINS[0], [{"role": "user", "content": first.instruction}], first.response)
    enc = encode_pairs(local.tokenizer, [first], max_length=10**6, path="check")[0][0]
    bench_n = sum(1 for x in enc.labels if x != -100)

    per_domain = {m: {d: sums[m][d] / tokens[d] for d in C.DOMAINS} for m in MODELS}
    nll = {m: sum(per_domain[m].values()) / len(C.DOMAINS) for m in MODELS}
    rel_base = {m: nll[m] / nll["base"] - 1.0 for m in MODELS}
    rel_oracle = {m: nll[m] / nll["oracle"] - 1.0 for m in MODELS}
    n_total = sum(rows_used.values())
    routing_acc = sum(routing_stats[d]["top1_accuracy"] * rows_used[d] for d in C.DOMAINS) / n_total
    targets = {
        "top1_within_2pct_of_oracle": bool(rel_oracle["top1"] <= 0.02),
        "top1_at_least_10pct_below_base": bool(rel_base["top1"] <= -0.10),
        "default_within_2pct_of_top1": bool(nll["auto_served"] / nll["top1"] - 1.0 <= 0.02),
    }

    print(f"Per-token NLL of reference val responses (lower is better); {', '.join(f'{d} {rows_used[d]}' for d in C.DOMAINS)} "
          f"rows (evenly spaced fixed sample of each val.jsonl), {sum(tokens.values())} scored tokens; "
          f"mean = mean over domains")
    rows = []
    for m in MODELS:
        rows.append([
            LABELS[m], *(f"{per_domain[m][d]:.3f}" for d in C.DOMAINS), f"**{nll[m]:.3f}**",
            "" if m == "base" else f"{100 * rel_base[m]:+.1f}%",
            "" if m == "oracle" else f"{100 * rel_oracle[m]:+.1f}%",
        ])
    print(C.table(["model", *C.DOMAINS, "mean", "vs base", "vs oracle"], rows))
    print()
    print(f"Routing on the same sample (router: {router.path}; k=2):")
    rrows = []
    for d in C.DOMAINS:
        s = routing_stats[d]
        dist = ", ".join(f"{n} {c}" for n, c in sorted(s["top1_counts"].items(), key=lambda x: -x[1]))
        rrows.append([d, f"{100 * s['top1_accuracy']:.0f}%", f"{100 * s['top2_contains_domain']:.0f}%",
                      f"{s['abstained']}/{s['rows']}", f"{s['mean_top1_weight']:.2f}", dist])
    print(C.table(["domain", "top1 = domain", "domain in top2", "abstained", "mean top1 weight", "top1 picks"], rrows))
    print(f"targets: top1 within 2% of oracle: {'yes' if targets['top1_within_2pct_of_oracle'] else 'NO'} "
          f"({100 * rel_oracle['top1']:+.1f}%); top1 >= 10% below base: "
          f"{'yes' if targets['top1_at_least_10pct_below_base'] else 'NO'} ({100 * rel_base['top1']:+.1f}%); "
          f"default (auto as served) within 2% of top1: {'yes' if targets['default_within_2pct_of_top1'] else 'NO'} "
          f"({100 * (nll['auto_served'] / nll['top1'] - 1):+.1f}%; planner split "
          f"{sum(auto_split.values())} of {n_total} single-domain rows)")

    return {
        "nll": nll,
        "nll_per_domain": per_domain,
        "relative_to_base": rel_base,
        "relative_to_oracle": rel_oracle,
        "targets_met": targets,
        "routing_accuracy": routing_acc,
        "routing": routing_stats,
        "routing_examples": examples,
        "rows": rows_used,
        "tokens": tokens,
        "truncated_rows": truncated,
        "auto_split_rows": auto_split,
        "merge_s_new_weights": {"median": C.med(merge_times) if merge_times else None,
                                "max": max(merge_times, default=None), "n": len(merge_times),
                    "cache_hits": local.merged.hits, "cache_misses": local.merged.misses},
        "check_score_nll": {"score_nll_tokens": api_n, "bench_tokens": bench_n,
                            "score_nll_per_token": api_sum / api_n},
        "settings": {"quick": quick, "rows_per_domain": n_rows, "max_length": max_length, "max_ref_tokens": max_ref_tokens,
                     "sample": "evenly spaced: row int(i * n_total / n) for i < n", "k": 2,
                     "mean": "unweighted mean of the per-domain per-token NLLs"},
        "time_s": round(time.perf_counter() - t_start, 1),
    }


def _clip(row: Encoded, n: int) -> Encoded:
    from dataclasses import replace

    n_prompt = sum(1 for x in row.labels if x == -100)
    return replace(row, input_ids=row.input_ids[: n_prompt + n], labels=row.labels[: n_prompt + n])


def _relative_paths(obj: Any) -> Any:
    """Strings holding this machine's absolute paths → relative to the repository (results JSON rule)."""
    if isinstance(obj, dict):
        return {k: _relative_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_relative_paths(v) for v in obj]
    if isinstance(obj, str):
        for prefix, to in ((str(C.REPO) + "/", ""), (str(C.REPO.parent) + "/", "../")):
            obj = obj.replace(prefix, to)
        from expertmix.io import expertmix_home

        return obj.replace(str(expertmix_home()), "$EXPERTMIX_HOME")
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = C.parser(__doc__)
    ap.add_argument("--set", choices=("single", "composite", "both"), default="single",
                    help="single-domain val rows (today's table), cross-department requests, or both")
    ap.add_argument("--smoke", action="store_true", help="seconds: one row per set, 4 reference tokens, 4-token drafts")
    ap.add_argument("--rows", type=int, default=None, help="single: rows per domain (0 = all); default 48, --quick 10")
    ap.add_argument("--composite-rows", type=int, default=None, help="composite requests; default 48, --quick 12")
    ap.add_argument("--seed", type=int, default=0, help="seed of the composite set")
    ap.add_argument("--draft-tokens", type=int, default=48, help="synthesis drafts: greedy tokens per expert")
    ap.add_argument("--max-length", type=int, default=384, help="single: max prompt+response tokens per row")
    ap.add_argument("--data", type=Path, default=C.data_root(), help="shared data root (experts/<domain>/val.jsonl)")
    ap.add_argument("--router", type=Path, default=None, help="router artifact or store (default: as Router.load())")
    args = ap.parse_args(argv)
    n_rows = 1 if args.smoke else args.rows if args.rows is not None else (10 if args.quick else 48)
    n_comp = 1 if args.smoke else args.composite_rows if args.composite_rows is not None else (12 if args.quick else 48)
    max_ref = 4 if args.smoke else None
    t_start = time.perf_counter()

    from experts.backends.local import LocalBackend
    from experts.models import load_base
    from experts.registry import ExpertSpec
    from orchestrator.config import load_config
    from orchestrator.routing import Router

    adapters, kind = C.resolve_adapters(args.adapters)
    local = LocalBackend(load_base(), [ExpertSpec(name=d, adapter=adapters / d) for d in C.DOMAINS])
    router = Router.load(args.router)
    C.set_threads(args.threads)
    info = C.machine_info()
    ainfo = C.adapter_info(adapters, kind)
    result: dict[str, Any] = {}
    if args.set in ("single", "both"):
        result["single"] = run_single(local=local, router=router, data=args.data, n_rows=n_rows,
                                      max_length=args.max_length, max_ref_tokens=max_ref, quick=args.quick)
        print()
    if args.set in ("composite", "both"):
        import _quality_composite as QC

        cfg = load_config()
        result["composite"] = QC.run(
            local=local, router=router, data=args.data, n_rows=n_comp, seed=args.seed, k=cfg.router.k,
            min_weight=cfg.router.min_weight, settings=cfg.orchestrator, draft_tokens=4 if args.smoke else args.draft_tokens,
            max_ref_tokens=max_ref, adapter_hash=ainfo["sha256_12"],
        )
        QC.print_table(result["composite"])
        print()
    print(f"adapters: {kind}; router: {router.path}")
    print(C.machine_line(info) + "; this machine is shared and noisy (NLLs are exact; times are not)")
    result.update({"settings": {"set": args.set, "quick": args.quick, "smoke": args.smoke},
                   "router": str(router.path), "adapters": ainfo, "machine": info,
                   "time_s": round(time.perf_counter() - t_start, 1)})
    C.write_json(args.out, _relative_paths(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The composite half of bench/quality.py: cross-department requests (bench/composite.py), scored per strategy.

A private helper (leading underscore: not a bench of its own, tests/test_benches.py skips it).

Per-token NLL of the reference (lower is better), teacher-forced, one mixed-adapter batch per prompt:

- whole-request strategies score the joined reference (the parts' references in order) after the request,
  routed as served (the shipped config's k and min_weight): **base**; **top1** (the top expert generates
  everything); **mixture** (-log Σ wᵢ·pᵢ at the routed weights); **adapter_merge** (the merged adapter);
  **synthesis** as served (the aggregator over the surviving experts' drafts; with one survivor its answer
  stands, i.e. the top expert) and **synthesis_aggregator** (always the aggregator over the top-2 drafts:
  what the aggregator itself is worth). Drafts: greedy, ``--draft-tokens``, cached on disk under
  ``$EXPERTMIX_HOME/bench-cache/drafts`` keyed by a hash of base, adapter weights, expert and prompt.
- per-part strategies score each part's reference after ``planning.part_messages`` (the part, then the
  whole request as context): **decompose** (the expert the ``segment`` planner routed the part to; gold
  parts are matched to planned parts by span overlap; an abstained part is the base) and **oracle** (each
  part under its own domain's expert, given the gold part text).

``parts_routed_correctly`` = share of gold parts whose matched planned part's top expert is the part's domain.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C
from composite import CompositeRow, build_composite

WHOLE = ("base", "top1", "mixture", "adapter_merge", "synthesis", "synthesis_aggregator")
PER_PART = ("decompose", "oracle")
MODELS = (*WHOLE, *PER_PART)
LABELS = {
    "base": "base (no adapter)",
    "top1": "top1 (whole request, top expert)",
    "mixture": "mixture (routed weights)",
    "adapter_merge": "adapter_merge (routed weights)",
    "synthesis": "synthesis as served (aggregator if >= 2 experts survive)",
    "synthesis_aggregator": "synthesis, aggregator over top-2 drafts",
    "decompose": "decompose (segment planner, part -> its expert)",
    "oracle": "oracle (each part -> its domain's expert)",
}
TARGETS = {
    "decompose_within_3pct_of_oracle": 0.03,
    "decompose_10pct_below_top1": -0.10,
    "parts_routed_correctly": 0.90,
}


# -- scoring --------------------------------------------------------------------------------------
def _target_ids(
    local: Any, messages: list[dict], reference: str, max_tokens: int | None
) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids incl. end-of-turn), encoded as ``LocalBackend.score_nll`` does."""
    prompt = local.encode_prompt(messages)
    full = local.encode_prompt(
        [*messages, {"role": "assistant", "content": reference}], add_generation_prompt=False
    )
    target = full[len(prompt) :]
    return prompt, target[:max_tokens] if max_tokens else target


def logprobs(
    local: Any, messages: list[dict], reference: str, names: Sequence[str], *, max_tokens: int | None = None
) -> Any:
    """Per-token log-probs of the reference under each adapter name: a [len(names), T] tensor."""
    import torch

    prompt, target = _target_ids(local, messages, reference, max_tokens)
    ids = torch.tensor([prompt + target] * len(names), device=local.base.device)
    tgt = ids[0, len(prompt) :]
    with local._lock, torch.inference_mode():
        out = local.model(input_ids=ids, adapter_names=list(names), logits_to_keep=len(target) + 1)
        lp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        return lp.gather(-1, tgt[None, :, None].expand(len(names), -1, 1))[..., 0]


def _mixture_nll(lp: Any, cols: Sequence[int], weights: Sequence[float]) -> float:
    import torch

    lw = torch.tensor([math.log(w) for w in weights], device=lp.device)[:, None]
    return float(-torch.logsumexp(lw + lp[list(cols)], dim=0).sum())


# -- drafts (synthesis) ---------------------------------------------------------------------------
def drafts(
    local: Any,
    experts: Sequence[str],
    messages: list[dict],
    *,
    max_new_tokens: int,
    repetition_penalty: float,
    adapter_hash: dict[str, str],
    stats: dict[str, int],
) -> dict[str, str]:
    """Greedy drafts of ``experts`` for ``messages``, one mixed batch for the uncached ones; cached on disk."""
    from expertmix.io import atomic_write_text, expertmix_home
    from experts.backends.base import GenerationConfig

    cache = expertmix_home() / "bench-cache" / "drafts"
    out: dict[str, str] = {}
    todo: list[tuple[str, Path]] = []
    for e in experts:
        key = json.dumps(
            {
                "base": local.base.name,
                "expert": e,
                "adapter": adapter_hash.get(e, ""),
                "messages": messages,
                "max_new_tokens": max_new_tokens,
                "repetition_penalty": repetition_penalty,
            },
            sort_keys=True,
        )
        path = cache / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
        if path.is_file():
            out[e] = json.loads(path.read_text(encoding="utf-8"))["text"]
            stats["cached"] += 1
        else:
            todo.append((e, path))
    if todo:
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
        gens = local.generate([(e, messages) for e, _ in todo], cfg)
        for (e, path), g in zip(todo, gens):
            out[e] = g.text
            atomic_write_text(path, json.dumps({"expert": e, "text": g.text}) + "\n")
            stats["generated"] += 1
    return out


def synthesis_messages(
    settings: Any, request: str, experts: Sequence[tuple[str, float]], texts: dict[str, str]
) -> list[dict]:
    """The aggregator's prompt, built from the configured templates exactly as the ``synthesis`` strategy does."""
    contributions = "\n\n".join(
        settings.contribution_template.format(
            expert=n, weight=f"{w:.2f}", weight_pct=f"{100 * w:.0f}%", text=texts[n].strip()
        )
        for n, w in experts
    )
    return [
        {
            "role": "user",
            "content": settings.synthesis_template.format(
                question=request.strip(), contributions=contributions
            ),
        }
    ]


# -- planning -------------------------------------------------------------------------------------
def load_planner() -> tuple[Any, str | None]:
    try:
        from orchestrator.planning import get_planner

        return get_planner("segment"), None
    except ImportError as exc:
        return None, f"planner not available: {exc}"


def make_plan(planner: Any, request: str, router: Any, *, k: int, min_weight: float) -> Any:
    try:
        from orchestrator.planning import PlanContext

        return planner.plan(request, PlanContext(router=router, k=k, min_weight=min_weight))
    except ImportError:  # the contract's keyword form
        return planner.plan(request, router=router, k=k, min_weight=min_weight)


def part_prompt(request: str, plan: Any, part: Any) -> list[dict]:
    """What the expert answering ``part`` sees (the planner package's own ``part_messages``)."""
    from orchestrator.planning import part_messages

    return part_messages([{"role": "user", "content": request}], plan, part)


def _span(part: Any, request: str) -> tuple[int, int]:
    if getattr(part, "span", None):
        return tuple(part.span)  # type: ignore[return-value]
    a = request.find(part.text)
    return (a, a + len(part.text)) if a >= 0 else (0, 0)


def match_parts(
    gold_spans: Sequence[tuple[int, int]], planned: Sequence[Any], request: str
) -> list[int | None]:
    """For each gold span, the index of the planned part overlapping it most (None: no overlap)."""
    spans = [_span(p, request) for p in planned]
    out: list[int | None] = []
    for a, b in gold_spans:
        overlaps = [max(0, min(b, d) - max(a, c)) for c, d in spans]
        best = max(range(len(spans)), key=lambda i: overlaps[i]) if spans else None
        out.append(best if best is not None and overlaps[best] > 0 else None)
    return out


def _part_expert(part: Any) -> str:
    from experts.registry import BASE_EXPERT

    r = part.routing
    return BASE_EXPERT if r.abstained or not r.experts else r.experts[0].name


# -- the bench ------------------------------------------------------------------------------------
def run(
    *,
    local: Any,
    router: Any,
    data: Path,
    n_rows: int,
    seed: int,
    k: int,
    min_weight: float,
    settings: Any,
    draft_tokens: int,
    max_ref_tokens: int | None,
    adapter_hash: dict[str, str],
) -> dict[str, Any]:
    """Score ``n_rows`` composite requests; returns the ``composite`` section of the bench JSON."""
    from experts.registry import BASE_EXPERT
    from orchestrator.planning import Part, Plan

    rows: list[CompositeRow] = build_composite(data, n_rows, seed)
    planner, why_no_planner = load_planner()
    experts = list(C.DOMAINS)
    sums = {m: 0.0 for m in MODELS}
    toks = {"whole": 0, "parts": 0}
    n_parts = n_right = n_top_right = n_aggregated = 0
    misrouted: list[dict[str, Any]] = []
    draft_stats = {"cached": 0, "generated": 0}
    examples = []
    for i, row in enumerate(rows):
        msgs = [{"role": "user", "content": row.request}]
        routing = router.route(row.request, k=k, min_weight=min_weight)
        weights = {e.name: e.weight for e in routing.experts}
        top = routing.experts[0].name
        merged = local.merged_adapter(weights) if len(weights) > 1 else top
        names = [BASE_EXPERT, *experts, merged]
        lp = logprobs(local, msgs, row.reference, names, max_tokens=max_ref_tokens)
        col = {n: j for j, n in enumerate(names[:-1])}
        sums["base"] += float(-lp[0].sum())
        sums["top1"] += float(-lp[col[top]].sum())
        sums["adapter_merge"] += float(-lp[-1].sum())
        sums["mixture"] += _mixture_nll(lp, [col[n] for n in weights], list(weights.values()))
        toks["whole"] += int(lp.shape[1])

        # synthesis: drafts of the top-2 (as served: the survivors of min_weight)
        top2 = router.route(row.request, k=2, min_weight=0.0)
        pair = [(e.name, e.weight) for e in top2.experts]
        texts = drafts(
            local,
            [n for n, _ in pair],
            msgs,
            max_new_tokens=draft_tokens,
            repetition_penalty=settings.repetition_penalty,
            adapter_hash=adapter_hash,
            stats=draft_stats,
        )
        agg = settings.aggregator
        lp_agg = logprobs(
            local,
            synthesis_messages(settings, row.request, pair, texts),
            row.reference,
            [agg],
            max_tokens=max_ref_tokens,
        )
        sums["synthesis_aggregator"] += float(-lp_agg.sum())
        if len(weights) > 1:
            n_aggregated += 1
            served = [(n, w) for n, w in weights.items()]
            lp_served = (
                logprobs(
                    local,
                    synthesis_messages(settings, row.request, served, texts),
                    row.reference,
                    [agg],
                    max_tokens=max_ref_tokens,
                )
                if served != pair
                else lp_agg
            )
            sums["synthesis"] += float(-lp_served.sum())
        else:
            sums["synthesis"] += float(-lp[col[top]].sum())

        # per part: decompose (planned) and oracle (gold)
        gold_parts = tuple(Part(p.text, routing, p.span) for p in row.parts)
        gold_plan = Plan(gold_parts, "gold", routing)
        plan = make_plan(planner, row.request, router, k=k, min_weight=min_weight) if planner else None
        matched = (
            match_parts([p.span for p in row.parts], plan.parts, row.request)
            if plan
            else [None] * len(row.parts)
        )
        row_parts = []
        for gp, gold_part, m in zip(row.parts, gold_parts, matched):
            o_msgs = part_prompt(row.request, gold_plan, gold_part)
            lp_o = logprobs(local, o_msgs, gp.reference, [gp.domain], max_tokens=max_ref_tokens)
            sums["oracle"] += float(-lp_o.sum())
            toks["parts"] += int(lp_o.shape[1])
            n_parts += 1
            if plan is None:
                continue
            planned = plan.parts[m] if m is not None else None
            expert = _part_expert(planned) if planned is not None else BASE_EXPERT
            n_right += expert == gp.domain
            top_any = (
                planned.routing.experts[0].name if planned is not None and planned.routing.experts else None
            )
            n_top_right += top_any == gp.domain
            if expert != gp.domain:
                misrouted.append(
                    {
                        "row": row.id,
                        "part": gp.text,
                        "domain": gp.domain,
                        "routed": expert,
                        "top_expert_ignoring_abstain": top_any,
                    }
                )
            d_msgs = part_prompt(row.request, plan, planned) if planned is not None else msgs
            if d_msgs == o_msgs and expert == gp.domain:
                sums["decompose"] += float(-lp_o.sum())
            else:
                sums["decompose"] += float(
                    -logprobs(local, d_msgs, gp.reference, [expert], max_tokens=max_ref_tokens).sum()
                )
            row_parts.append(
                {"domain": gp.domain, "routed": expert, "planned_text": planned.text if planned else None}
            )
        if i < 4:
            examples.append(
                {
                    "id": row.id,
                    "request": row.request,
                    "whole_routing": [[n, round(w, 3)] for n, w in weights.items()],
                    "parts": row_parts,
                    "drafts": {n: t[:160] for n, t in texts.items()},
                }
            )
        C.log(f"composite {i + 1}/{len(rows)} scored")

    nll: dict[str, float | None] = {m: sums[m] / toks["whole"] for m in WHOLE}
    nll["oracle"] = sums["oracle"] / toks["parts"]
    nll["decompose"] = sums["decompose"] / toks["parts"] if planner else None
    routed = n_right / n_parts if planner else None
    result: dict[str, Any] = {
        "nll": nll,
        "parts_routed_correctly": routed,
        "parts_top_expert_correct_ignoring_abstain": n_top_right / n_parts if planner else None,
        "misrouted_parts": misrouted,
        "relative_to_top1": {m: (v / nll["top1"] - 1.0 if v is not None else None) for m, v in nll.items()},
        "relative_to_oracle": {
            m: (v / nll["oracle"] - 1.0 if v is not None else None) for m, v in nll.items()
        },
        "targets_met": _targets(nll, routed),
        "rows": len(rows),
        "parts": n_parts,
        "rows_by_parts": {str(n): sum(len(r.parts) == n for r in rows) for n in (2, 3)},
        "tokens": toks,
        "synthesis_rows_aggregated": n_aggregated,
        "drafts": {**draft_stats, "max_new_tokens": draft_tokens},
        "planner": "segment" if planner else why_no_planner,
        "examples": examples,
        "settings": {
            "n": n_rows,
            "seed": seed,
            "k": k,
            "min_weight": min_weight,
            "max_ref_tokens": max_ref_tokens,
            "tokens_note": "whole-request models score the joined reference (parts separated by a blank "
            "line, one end-of-turn); per-part models score each part's reference with its "
            "own end-of-turn: token counts differ slightly",
        },
    }
    return result


def _targets(nll: dict[str, float | None], routed: float | None) -> dict[str, bool | None]:
    d = nll.get("decompose")
    if d is None:
        return {k: None for k in TARGETS}
    return {
        "decompose_within_3pct_of_oracle": bool(
            d / nll["oracle"] - 1.0 <= TARGETS["decompose_within_3pct_of_oracle"]
        ),
        "decompose_10pct_below_top1": bool(d / nll["top1"] - 1.0 <= TARGETS["decompose_10pct_below_top1"]),
        "parts_routed_correctly": bool(routed is not None and routed >= TARGETS["parts_routed_correctly"]),
    }


def print_table(res: dict[str, Any]) -> None:
    nll = res["nll"]
    print(
        f"Composite set: {res['rows']} cross-department requests ({res['rows_by_parts']['2']} pairs, "
        f"{res['rows_by_parts']['3']} triples), {res['parts']} parts; per-token NLL of the reference (lower is "
        f"better); routing k={res['settings']['k']}, min_weight={res['settings']['min_weight']}"
    )
    rows = []
    for m in MODELS:
        v = nll[m]
        if v is None:
            rows.append([LABELS[m], "n/a", "", ""])
            continue
        rows.append(
            [
                LABELS[m],
                f"**{v:.3f}**",
                "" if m == "top1" else f"{100 * res['relative_to_top1'][m]:+.1f}%",
                "" if m == "oracle" else f"{100 * res['relative_to_oracle'][m]:+.1f}%",
            ]
        )
    print(C.table(["model", "NLL/token", "vs top1", "vs oracle"], rows))
    pr = res["parts_routed_correctly"]
    print(
        f"parts routed to their domain's expert: {'n/a' if pr is None else f'{100 * pr:.0f}%'} "
        f"(planner: {res['planner']}); synthesis used the aggregator on {res['synthesis_rows_aggregated']}/"
        f"{res['rows']} rows as served"
    )
    for m in res["misrouted_parts"]:
        print(f"  misrouted: {m['domain']} part -> {m['routed']} (top expert {m['top_expert_ignoring_abstain']}): "
              f"{m['part'][:70]!r}")
    t = res["targets_met"]

    def yn(x: bool | None) -> str:
        return "n/a" if x is None else ("yes" if x else "NO")

    d = nll["decompose"]
    extra = (
        (
            f" ({100 * res['relative_to_oracle']['decompose']:+.1f}% vs oracle, "
            f"{100 * res['relative_to_top1']['decompose']:+.1f}% vs top1)"
        )
        if d is not None
        else ""
    )
    print(
        f"targets: decompose within 3% of oracle: {yn(t['decompose_within_3pct_of_oracle'])}; decompose >= 10% "
        f"below top1: {yn(t['decompose_10pct_below_top1'])}; parts routed >= 90%: {yn(t['parts_routed_correctly'])}"
        + extra
    )

"""Router benchmark: generalization (leave-one-source-out) and OOD detection, side by side.

    python bench/router.py [--quick] [--smoke] [--out FILE.json]          # OOD comparison + probe + latency
    python bench/router.py --loso [--quick] [--smoke] [--out FILE.json]   # leave-one-source-out

OOD mode, two data sets, every method on the same MiniLM embeddings in one run:
* CLINC150 domains: train on clinc150/train.jsonl (label field ``domain``; ``oos`` rows are
  off-topic examples, not a class), score on clinc150/val.jsonl (in-domain + oos);
* near-department: the shipped recipe on routing/train.jsonl (+ departments.jsonl), off-topic
  rows from ood_train + ood_enterprise_train; scored on routing/val.jsonl against ood_val
  (general assistant queries) and ood_enterprise_val (HR, legal, healthcare, government).
Columns: accuracy / macro-F1 (argmax, no abstain); OOD recall at the threshold rejecting 3%
of in-domain evaluation rows (same rule for every method); each method's own operating point
(its threshold, fitted on training-side held-out rows) as OOD recall / false-reject.
Also: the shipped router on the hand-written probe set and its route latency (p50/p99,
embedding cache off, so every query is encoded: "cold cache").

LOSO mode: for every label with two or more sources, train the shipped recipe without one
source and test on that source's rows (train + val files); macro = mean over sources.
The old recipe (frames only, no question forms, no department texts) runs alongside.

semantic-router is an optional dependency (``pip install 'expertmix[bench]'``); put it on
PYTHONPATH if it lives elsewhere. This machine is shared and noisy: timings are indicative.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEPARTMENTS = REPO / "router_training" / "recipes" / "departments.jsonl"


def _data_root(arg: Path | None) -> Path:
    return arg or Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data"))


def _subsample(data: Any, per_label: int, n_ood: int, seed: int) -> Any:
    rng = random.Random(seed)
    idx = list(range(len(data.texts)))
    rng.shuffle(idx)
    keep, counts = [], {}
    for i in idx:
        key = (data.labels[i], data.sources[i] if data.sources else "")
        if counts.get(key, 0) < per_label:
            counts[key] = counts.get(key, 0) + 1
            keep.append(i)
    keep.sort()
    return replace(
        data,
        texts=[data.texts[i] for i in keep],
        labels=[data.labels[i] for i in keep],
        lines=[data.lines[i] for i in keep],
        sources=[data.sources[i] for i in keep] if data.sources else [],
        ood_texts=data.ood_texts[:n_ood],
    )


def recipe(*, quick: bool = False, smoke: bool = False, old: bool = False) -> Any:
    """The shipped training recipe (``old``: the previous one: frames only)."""
    from router_training.train import TrainConfig

    cfg = TrainConfig(question_forms=0, cross_forms=0, extra_weight=0, balance="label", c_grid=(1.0,)) if old else TrainConfig()
    if quick or smoke:
        cfg = replace(cfg, subclasses=1)
    if smoke:
        cfg = replace(cfg, ood_units=2)
    return cfg


# -- OOD mode -------------------------------------------------------------------------------------
def _context(train: Any, val: Any, enc: Any, ood_eval: dict[str, list[str]], **extra: Any) -> dict[str, Any]:
    labels = train.labels_set
    ctx = {
        "train": train, "labels": labels, "enc": enc,
        "x_train": enc.encode(train.texts, progress=True),
        "y_train": np.array([labels.index(lab) for lab in train.labels]),
        "x_val": enc.encode(val.texts, progress=True),
        "y": np.array([labels.index(lab) for lab in val.labels]),
        "val_texts": list(val.texts), "val_labels": list(val.labels),
        "x_ood": {k: enc.encode(v) for k, v in ood_eval.items()},
        "ood_texts": ood_eval,
    }
    ctx.update(extra)
    return ctx


def _methods(ctx: dict[str, Any], cfg: Any, skip: set[str], llm_n: int) -> list[dict[str, Any]]:
    from _router_methods import bench_centroid, bench_knn, bench_llm, bench_ours, bench_semantic_router

    rows = bench_ours(ctx, cfg) + [bench_knn(ctx, 1), bench_knn(ctx, 5), bench_centroid(ctx)]
    if "semantic_router" not in skip:
        rows.append(bench_semantic_router(ctx))
    if "llm" not in skip:
        rows.append(bench_llm(ctx, llm_n))
    return rows


def run_clinc(root: Path, enc: Any, args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    from router_training.data import DataConfig, load_labeled

    cfg = DataConfig(label_field="domain", ood_label="oos")
    train = load_labeled(root / "clinc150" / "train.jsonl", cfg)
    val = load_labeled(root / "clinc150" / "val.jsonl", cfg, allowed_labels=train.labels_set, require_classes=False)
    if args.smoke:
        train, val = _subsample(train, 8, 20, 0), _subsample(val, 4, 10, 1)
    elif args.quick:
        train, val = _subsample(train, 150, 100, 0), _subsample(val, 60, 100, 1)
    ctx = _context(train, val, enc, {"oos": list(val.ood_texts)})
    # CLINC is one register (short chat requests): ours trains like `expertmix router train ... --augment 0
    # --question-forms 0`, so every method sees exactly the same training texts and embeddings.
    cfg = replace(recipe(quick=args.quick, smoke=args.smoke), augment=0, question_forms=0)
    rows = _methods(ctx, cfg, skip, 10 if args.smoke else 60)
    return {
        "data": "clinc150 train -> val (10 domains + oos; ours with --augment 0 --question-forms 0)",
        "n_train": len(train.texts), "n_train_oos": len(train.ood_texts),
        "n_val": len(val.texts), "n_val_oos": len(val.ood_texts),
        "ood_sets": ["oos"], "rows": rows,
    }


def run_routing(root: Path, enc: Any, args: argparse.Namespace, skip: set[str]) -> dict[str, Any]:
    from router_training.data import load_labeled, load_texts

    r = root / "routing"
    train = load_labeled(r / "train.jsonl")
    val = load_labeled(r / "val.jsonl", allowed_labels=train.labels_set, require_classes=False)
    extra = load_labeled(DEPARTMENTS, allowed_labels=train.labels_set, require_classes=False)
    ood_fit = load_texts(r / "ood_train.jsonl") + load_texts(r / "ood_enterprise_train.jsonl")
    ood_eval = {"general": load_texts(r / "ood_val.jsonl"), "enterprise": load_texts(r / "ood_enterprise_val.jsonl")}
    if args.smoke or args.quick:
        n = 6 if args.smoke else 120
        train, val = _subsample(train, n, 0, 0), _subsample(val, max(3, n // 3), 0, 1)
        rng = random.Random(0)
        ood_fit = rng.sample(ood_fit, 4 * n)
        ood_eval = {k: rng.sample(v, min(len(v), 2 * n)) for k, v in ood_eval.items()}
    ctx = _context(train, val, enc, ood_eval, ood_fit=ood_fit, extra=extra)
    rows = _methods(ctx, recipe(quick=args.quick, smoke=args.smoke), skip | {"llm"}, 0)
    return {
        "data": "routing train (+departments) -> val; off-topic: ood_train + ood_enterprise_train -> ood_val, "
        "ood_enterprise_val",
        "n_train": len(train.texts), "n_val": len(val.texts), "n_ood_fit": len(ood_fit),
        "ood_sets": list(ood_eval), "rows": rows,
    }


def bench_probe(router_path: Path) -> dict[str, Any]:
    """A router on the hand-written probe questions, plus its cold-cache route latency."""
    import importlib.util

    from orchestrator.routing import Router

    spec = importlib.util.spec_from_file_location("probe_set", REPO / "tests" / "router_training" / "probe_set.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    router = Router.load(router_path, cache_size=0)

    def score(items: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        res = router.route_batch([q for q, _ in items])
        correct = [r.experts[0].name == lab for r, (_, lab) in zip(res, items, strict=True)]
        return {
            "n": len(items),
            "accuracy": float(np.mean(correct)),
            "abstained": int(sum(r.abstained for r in res)),
            "correct_and_routed": float(np.mean([c and not r.abstained for c, r in zip(correct, res, strict=True)])),
            "wrong": [(q, r.experts[0].name) for (q, _), r, c in zip(items, res, correct, strict=True) if not c],
            "abstained_questions": [q for (q, _), r in zip(items, res, strict=True) if r.abstained],
        }

    off = router.route_batch(list(mod.OFF_TOPIC))
    from _router_methods import latency

    queries = [q for q, _ in mod.ALL] + list(mod.OFF_TOPIC)
    p50, p99 = latency(lambda q: router.route(q), queries)
    return {
        "router": str(router_path.relative_to(REPO)) if router_path.is_relative_to(REPO) else router_path.name,
        **score(mod.PROBE),
        "statements_and_fragments": score(mod.STATEMENTS + mod.FRAGMENTS),
        "off_topic_abstained": f"{sum(r.abstained for r in off)}/{len(off)}",
        "route_p50_ms_cold_cache": p50,
        "route_p99_ms_cold_cache": p99,
    }


# -- LOSO mode ------------------------------------------------------------------------------------
def run_loso(root: Path, enc: Any, args: argparse.Namespace) -> dict[str, Any]:
    from router_training.data import load_labeled
    from router_training.loso import held_out_sources, loso

    train = load_labeled(root / "routing" / "train.jsonl")
    val = load_labeled(root / "routing" / "val.jsonl", allowed_labels=train.labels_set, require_classes=False)
    extra = load_labeled(DEPARTMENTS, allowed_labels=train.labels_set, require_classes=False)
    sources = held_out_sources(train)
    if args.sources:  # a subset of held-out sources (to run folds in parallel processes)
        want = set(args.sources.split(","))
        sources = [(lab, src) for lab, src in sources if src in want]
    max_test = None
    if args.smoke:
        train, val = _subsample(train, 12, 0, 0), _subsample(val, 2, 0, 1)
        sources, max_test = sources[-1:], 10
    elif args.quick:
        train, max_test = _subsample(train, 250, 0, 0), 150
    out: dict[str, Any] = {}
    runs = [("loso", recipe(quick=args.quick, smoke=args.smoke), extra)]
    if args.quick or args.smoke or args.with_old:
        runs.append(("loso_old_recipe", recipe(quick=args.quick, smoke=args.smoke, old=True), None))
    for name, cfg, ext in runs:
        t = time.perf_counter()
        res = loso(train, encoder=enc, config=cfg, val=val, extra=ext, max_test=max_test, sources=sources)
        res["seconds"] = round(time.perf_counter() - t, 1)
        out[name] = res
        print(f"{name}: macro {res['macro_accuracy']:.4f} ({res['seconds']} s)", flush=True)
    return out


# -- output ---------------------------------------------------------------------------------------
def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def render_ood(section: dict[str, Any]) -> list[str]:
    sets = section["ood_sets"]
    head = "| method | accuracy | macro-F1 | " + " | ".join(
        f"{s} recall @3% FRR | {s} own point (recall / FRR)" for s in sets
    ) + " | train s |"
    lines = [f"**{section['data']}**", "", head, "|" + "---|" * (4 + 2 * len(sets))]
    for r in section["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |" + " |" * (2 + 2 * len(sets)))
            continue
        cells = [r["method"], _pct(r["accuracy"]), f"{r['macro_f1']:.3f}"]
        for s in sets:
            own = r.get(f"{s}_own_point")
            cells += [_pct(r.get(f"{s}_recall_at_3pct_frr")),
                      f"{_pct(own['ood_recall'])} / {_pct(own['false_reject'])}" if own else "n/a"]
        cells.append(f"{r.get('train_s', 0.0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_loso(res: dict[str, Any]) -> list[str]:
    new, old = res["loso"], res.get("loso_old_recipe")
    lines = ["| held-out source | label | n | new recipe | top-2 | old recipe |", "|---|---|---|---|---|---|"]
    for src, acc in new["per_source"].items():
        d = new["details"][src]
        o = old["per_source"].get(src) if old else None
        lines.append(f"| {src} | {d['label']} | {d['n']} | {_pct(acc)} | {_pct(d['top2_accuracy'])} | {_pct(o)} |")
    o_macro = _pct(old["macro_accuracy"]) if old else "n/a"
    lines.append(f"| **macro** | | | **{_pct(new['macro_accuracy'])}** | | {o_macro} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--loso", action="store_true", help="leave-one-source-out on the shared routing data")
    ap.add_argument("--quick", action="store_true", help="subsampled data (minutes)")
    ap.add_argument("--smoke", action="store_true", help="tiny slices, seconds (the test suite runs this)")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    ap.add_argument("--data", type=Path, default=None, help="shared data directory (default ../shared/data)")
    ap.add_argument("--skip", default="llm", help="comma list of: semantic_router,llm,probe,clinc,routing "
                    "(default: llm, the slow zero-shot baseline)")
    ap.add_argument("--sources", default="", help="--loso: only these held-out sources (comma list)")
    ap.add_argument("--with-old", action="store_true", help="--loso: also the old recipe (always with --quick)")
    ap.add_argument("--router", type=Path, default=REPO / "router_training" / "default", help="router for the probe")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from router_training.embed import Encoder
    from router_training.loso import MemoEncoder

    root, skip = _data_root(args.data), set(filter(None, args.skip.split(",")))
    enc = MemoEncoder(Encoder())
    import torch

    result: dict[str, Any] = {
        "quick": args.quick, "smoke": args.smoke,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "note": "shared, noisy CPU"},
    }
    lines: list[str] = []
    if args.loso:
        result.update(run_loso(root, enc, args))
        lines += render_loso(result)
    else:
        for name, fn in (("clinc150", run_clinc), ("routing_ood", run_routing)):
            if name.split("150")[0].split("_")[0] in skip:
                continue
            result[name] = fn(root, enc, args, skip)
            lines += render_ood(result[name]) + [""]
        if "probe" not in skip:
            p = result["shipped_router_probe"] = bench_probe(args.router)
            sf = p["statements_and_fragments"]
            lines.append(
                f"router {p['router']} on {p['n']} probe questions: accuracy {p['accuracy']:.1%}, "
                f"routed and correct {p['correct_and_routed']:.1%}, abstained {p['abstained']}; on {sf['n']} "
                f"statements/fragments: accuracy {sf['accuracy']:.1%}, abstained {sf['abstained']}; off-topic "
                f"abstained {p['off_topic_abstained']}; route p50 {p['route_p50_ms_cold_cache']:.1f} ms "
                f"(p99 {p['route_p99_ms_cold_cache']:.1f} ms), embedding cache off"
            )
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

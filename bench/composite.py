"""Cross-department evaluation set: questions from different domains joined into one request.

    python bench/composite.py [--n 48] [--seed 0] [--smoke] [--out FILE.json]

Prints a markdown table of the rows (domains, connector, request) and writes them as JSON
(``{"settings": ..., "rows": [...]}``); ``--smoke`` builds one row. Scored by
``bench/quality.py --set composite``.

Deterministic and seeded: the same shared data, ``n`` and ``seed`` give the same rows. Built from
``<data>/experts/<domain>/val.jsonl`` (held-out rows of every expert: nothing here was trained on).
Each row joins two questions from two different domains, or three from all three, with one of
several connectors ("…, and …?", "Also, …", numbered lists, "Two things: …", …). The reference is
the parts' references in the same order, separated by a blank line. Every part records its text
as it appears in the request, its domain, its reference and its character span, so a bench can
score each part on its own:

>>> rows = build_composite(Path("../shared/data"), 4, 0)  # doctest: +SKIP
>>> r = rows[0]; [r.request[a:b] == p.text for p, (a, b) in zip(r.parts, (p.span for p in r.parts))]  # doctest: +SKIP
[True, True]

Questions are kept short and single-line (<= ``MAX_QUESTION_CHARS``), references <= ``MAX_REFERENCE_CHARS``,
so a three-part request with its reference stays well inside the base model's context.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["CONNECTORS", "CompositePart", "CompositeRow", "build_composite", "eligible_questions"]

DOMAINS = ("finance", "engineering", "product")
MAX_QUESTION_CHARS = 160
MAX_REFERENCE_CHARS = 500
TRIPLE_SHARE = 0.25  # a quarter of the rows join three questions (one per domain), the rest two


@dataclass(frozen=True)
class CompositePart:
    text: str
    """The part as it appears in the request (``request[span[0]:span[1]]``)."""
    domain: str
    span: tuple[int, int]
    reference: str
    question: str
    """The val.jsonl instruction the part was made from."""
    line: int
    """Its line in ``experts/<domain>/val.jsonl``."""


@dataclass(frozen=True)
class CompositeRow:
    id: str
    request: str
    reference: str
    parts: tuple[CompositePart, ...]
    connector: str

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(p.domain for p in self.parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts"] = [{**asdict(p), "span": list(p.span)} for p in self.parts]
        return d


@dataclass(frozen=True)
class _Question:
    domain: str
    line: int
    question: str
    reference: str


# -- phrasing -------------------------------------------------------------------------------------
def _core(q: str) -> str:
    """The question without its final punctuation."""
    return q.strip().rstrip("?.!;: ").strip()


def _is_question(q: str) -> bool:
    return q.strip().endswith("?")


def _lower_first(s: str) -> str:
    # keep acronyms and names ("IBM", "Python") as they are
    if len(s) > 1 and s[0].isupper() and s[1].islower() and s.split(" ", 1)[0] not in {"I", "I'm", "I've"}:
        return s[0].lower() + s[1:]
    return s


def _upper_first(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def _sentence(q: str) -> str:
    """A stand-alone sentence: capitalized, ending in '?' for questions and '.' otherwise."""
    return _upper_first(_core(q)) + ("?" if _is_question(q) else ".")


# A connector turns the part questions into pieces: literal strings and part texts (in order).
# Each returns a list of ("lit", s) / ("part", s) so spans are computed, never searched for.
Piece = tuple[str, str]


def _and(qs: Sequence[str]) -> list[Piece]:  # "A, and b?"
    out: list[Piece] = []
    for i, q in enumerate(qs):
        text = _upper_first(_core(q)) if i == 0 else _lower_first(_core(q))
        if i > 0:
            out.append(("lit", ", and " if i == len(qs) - 1 else ", "))
        out.append(("part", text))
    out.append(("lit", "?" if any(_is_question(q) for q in qs) else "."))
    return out


def _also(qs: Sequence[str]) -> list[Piece]:  # "A? Also, b."
    out: list[Piece] = [("part", _sentence(qs[0]))]
    for i, q in enumerate(qs[1:], 1):
        word = "Also, " if i == 1 else "And finally, "
        out += [("lit", " " + word), ("part", _lower_first(_core(q)) + ("?" if _is_question(q) else "."))]
    return out


def _numbered(qs: Sequence[str]) -> list[Piece]:  # "1. A\n2. B"
    out: list[Piece] = [("lit", "Please help with the following:\n")]
    for i, q in enumerate(qs, 1):
        out += [("lit", f"{i}. "), ("part", _sentence(q)), ("lit", "\n" if i < len(qs) else "")]
    return out


def _things(qs: Sequence[str]) -> list[Piece]:  # "Two things: a; and b."
    out: list[Piece] = [("lit", ("Two" if len(qs) == 2 else "Three") + " things: ")]
    for i, q in enumerate(qs):
        if i > 0:
            out.append(("lit", "; and " if i == len(qs) - 1 else "; "))
        out.append(("part", _lower_first(_core(q))))
    out.append(("lit", "."))
    return out


def _first_second(qs: Sequence[str]) -> list[Piece]:  # "I have two questions. First, a? Second, b."
    words = ("First", "Second", "Third")
    out: list[Piece] = [("lit", f"I have {'two' if len(qs) == 2 else 'three'} questions. ")]
    for i, q in enumerate(qs):
        out += [
            ("lit", ("" if i == 0 else " ") + words[i] + ", "),
            ("part", _lower_first(_core(q)) + ("?" if _is_question(q) else ".")),
        ]
    return out


def _bullets(qs: Sequence[str]) -> list[Piece]:  # "Could you answer these?\n- A\n- B"
    out: list[Piece] = [("lit", "Could you answer these?\n")]
    for i, q in enumerate(qs):
        out += [("lit", "- "), ("part", _sentence(q)), ("lit", "\n" if i < len(qs) - 1 else "")]
    return out


CONNECTORS: dict[str, Callable[[Sequence[str]], list[Piece]]] = {
    "and": _and,
    "also": _also,
    "numbered": _numbered,
    "things": _things,
    "first_second": _first_second,
    "bullets": _bullets,
}


# -- building -------------------------------------------------------------------------------------
def eligible_questions(data_root: Path, domain: str) -> list[_Question]:
    """Short, single-line val questions with a short reference, in file order."""
    path = Path(data_root) / "experts" / domain / "val.jsonl"
    out = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            q, r = str(row.get("instruction", "")).strip(), str(row.get("response", "")).strip()
            if (
                not q
                or not r
                or "\n" in q
                or "\r" in q
                or len(q) > MAX_QUESTION_CHARS
                or len(r) > MAX_REFERENCE_CHARS
            ):
                continue
            if len(_core(q)) < 8:
                continue
            out.append(_Question(domain, line_no, q, r))
    if not out:
        raise ValueError(f"{path}: no usable question (single line, <= {MAX_QUESTION_CHARS} chars)")
    return out


def _assemble(pieces: list[Piece], qs: Sequence[_Question], connector: str, row_id: str) -> CompositeRow:
    request, parts, k = "", [], 0
    for kind, s in pieces:
        if kind == "part":
            q = qs[k]
            parts.append(
                CompositePart(
                    text=s,
                    domain=q.domain,
                    span=(len(request), len(request) + len(s)),
                    reference=q.reference,
                    question=q.question,
                    line=q.line,
                )
            )
            k += 1
        request += s
    return CompositeRow(
        id=row_id,
        request=request,
        reference="\n\n".join(p.reference for p in parts),
        parts=tuple(parts),
        connector=connector,
    )


def build_composite(data_root: Path | str, n: int, seed: int = 0) -> list[CompositeRow]:
    """``n`` cross-department requests (deterministic for a given data, ``n`` and ``seed``).

    Questions are drawn without replacement per domain (recycled only when a domain runs out);
    a quarter of the rows (``TRIPLE_SHARE``) have three parts, one per domain, the rest two parts
    of two different domains in a random order; connectors cycle through a seeded shuffle.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"expertmix-composite-{seed}")
    pools = {d: eligible_questions(Path(data_root), d) for d in DOMAINS}
    queues: dict[str, list[_Question]] = {d: [] for d in DOMAINS}

    def draw(d: str) -> _Question:
        if not queues[d]:
            queues[d] = list(pools[d])
            rng.shuffle(queues[d])
        return queues[d].pop()

    n_triples = round(n * TRIPLE_SHARE) if n >= 4 else 0
    sizes = [3] * n_triples + [2] * (n - n_triples)
    rng.shuffle(sizes)
    names = list(CONNECTORS)
    rows = []
    for i, size in enumerate(sizes):
        if i % len(names) == 0:
            rng.shuffle(names)
        connector = names[i % len(names)]
        domains = list(DOMAINS) if size == 3 else rng.sample(DOMAINS, 2)
        rng.shuffle(domains)
        qs = [draw(d) for d in domains]
        key = "|".join(f"{q.domain}:{q.line}" for q in qs) + f"|{connector}"
        row_id = f"c{i:03d}-" + hashlib.sha256(key.encode()).hexdigest()[:8]
        rows.append(_assemble(CONNECTORS[connector]([q.question for q in qs]), qs, connector, row_id))
    return rows


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as C

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=48, help="rows to build")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data", type=Path, default=C.data_root(), help="shared data root (experts/<domain>/val.jsonl)"
    )
    ap.add_argument("--smoke", action="store_true", help="build one row (seconds; for the tests)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    args = ap.parse_args(argv)
    n = 1 if args.smoke else args.n
    rows = build_composite(args.data, n, args.seed)
    print(
        f"{len(rows)} cross-department requests (seed {args.seed}): "
        f"{sum(len(r.parts) == 2 for r in rows)} pairs, {sum(len(r.parts) == 3 for r in rows)} triples"
    )
    cell = lambda s: s.replace("|", "\\|").replace("\n", " / ")
    print(
        C.table(
            ["id", "domains", "connector", "request"],
            [[r.id, "+".join(r.domains), r.connector, cell(r.request)] for r in rows],
        )
    )
    C.write_json(
        args.out,
        {
            "settings": {
                "n": n,
                "seed": args.seed,
                "data": "experts/<domain>/val.jsonl of the shared data",
                "max_question_chars": MAX_QUESTION_CHARS,
                "max_reference_chars": MAX_REFERENCE_CHARS,
            },
            "rows": [r.to_dict() for r in rows],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

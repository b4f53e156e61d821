"""Learning the router: load labeled data, embed, fit classifier + calibration + abstain
rule, evaluate, and save a safe versioned artifact.

    >>> from router_training import train_and_save
    >>> path, metrics = train_and_save("train.jsonl", val="val.jsonl", ood="ood.jsonl")  # doctest: +SKIP

Nothing heavy is imported here: torch, sentence-transformers and scikit-learn load
inside the functions that need them.
"""

from __future__ import annotations

from router_training.artifact import (
    AbstainRule,
    RouterModel,
    RouterStore,
    RouterVersionWarning,
    default_router_path,
    default_store_root,
    load_model,
    resolve_router_path,
    save_model,
)
from router_training.data import DataConfig, LabeledData, load_labeled, load_texts
from router_training.embed import DEFAULT_MODEL_NAME, EmbedConfig, Encoder, default_model_path
from router_training.evaluate import evaluate_arrays, write_report
from router_training.train import TrainConfig, fit_router, train_and_save

__all__ = [
    "DEFAULT_MODEL_NAME",
    "AbstainRule",
    "DataConfig",
    "EmbedConfig",
    "Encoder",
    "LabeledData",
    "RouterModel",
    "RouterStore",
    "RouterVersionWarning",
    "TrainConfig",
    "default_model_path",
    "default_router_path",
    "default_store_root",
    "evaluate_arrays",
    "fit_router",
    "load_labeled",
    "load_model",
    "load_texts",
    "resolve_router_path",
    "save_model",
    "train_and_save",
    "write_report",
]

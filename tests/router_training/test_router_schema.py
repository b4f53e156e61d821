"""router.json is typed and range-checked at load: RouterArtifactError names the path and field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from expertmix.errors import RouterArtifactError
from router_training.artifact import default_router_path, load_model
from router_training.schema import NAME_PATTERN


@pytest.fixture()
def art(tmp_path: Path) -> Path:
    return Path(shutil.copytree(default_router_path(), tmp_path / "art"))


def _edit(art: Path, dotted: str, value: Any) -> None:
    meta = json.loads((art / "router.json").read_text())
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    (art / "router.json").write_text(json.dumps(meta))


_DELETE = object()

BAD = [
    ("calibration.temperature", 0, "calibration.temperature", "> 0"),
    ("calibration.temperature", -1.5, "calibration.temperature", "> 0"),
    ("calibration.temperature", "1.0", "calibration.temperature", "number"),
    ("calibration.temperature", _DELETE, "calibration.temperature", "number"),
    ("abstain.threshold", None, "abstain.threshold", "number"),
    ("abstain.threshold", True, "abstain.threshold", "number"),
    ("abstain.score", "vibes", "abstain.score", "one of"),
    ("abstain.target_false_reject", 1.5, "abstain.target_false_reject", r"\[0, 1\)"),
    ("labels", "finance", "labels", "list"),
    ("labels", [], "labels", "list"),
    ("labels", ["engineering", "finance", "finance"], "labels", "unique"),
    ("labels", ["engineering", "Finance", "product"], "labels[1]", "not a valid expert name"),
    ("labels", ["engineering", "__base__", "product"], "labels[1]", "reserved"),
    ("labels", ["engineering", 3, "product"], "labels[1]", "string"),
    ("embedding.dim", "384", "embedding.dim", "integer"),
    ("embedding.dim", 384.0, "embedding.dim", "integer"),
    ("embedding.dim", 0, "embedding.dim", "at least 1"),
    ("embedding.dim", 768, "embedding.dim", "does not match the weights"),
    ("embedding.normalize", "yes", "embedding.normalize", "true or false"),
    ("embedding", [], "embedding", "object"),
]


@pytest.mark.parametrize(("dotted", "value", "field", "match"), BAD)
def test_bad_field_named(art: Path, dotted: str, value: Any, field: str, match: str) -> None:
    _edit(art, dotted, value)
    with pytest.raises(RouterArtifactError, match=match) as ei:
        load_model(art)
    assert getattr(ei.value, "field", None) == field
    assert ei.value.path == str(art) and f"field '{field}'" in str(ei.value)


def test_nan_and_infinity_rejected(art: Path) -> None:
    text = (art / "router.json").read_text()
    meta = json.loads(text)
    t = meta["calibration"]["temperature"]
    for bad in ("NaN", "Infinity"):
        body = text.replace(f'"temperature": {json.dumps(t)}', f'"temperature": {bad}', 1)
        assert body != text
        (art / "router.json").write_text(body)
        with pytest.raises(RouterArtifactError, match="finite"):
            load_model(art)


def test_shipped_router_is_valid() -> None:
    model = load_model(default_router_path())
    assert model.temperature > 0 and len(set(model.labels)) == len(model.labels)


def test_label_rule_is_the_expert_name_rule() -> None:
    from experts import registry

    pattern = getattr(registry, "NAME_PATTERN", None) or registry._NAME_RE.pattern
    assert pattern == NAME_PATTERN

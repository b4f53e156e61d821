"""decompose / auto / the synthesis guard on the real base model with LoRA adapters.

The learned router is replaced by a keyword router (tests/orchestrator/test_planning.py) so
the tests pin the execution of a plan, not the router's accuracy (bench/quality.py measures that).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_planning import KeywordRouter

from expertmix.errors import ExpertUnavailable
from experts.backends.base import Generation
from orchestrator.merge.compose import heading, is_meta, sections
from orchestrator.planning import part_messages

Q2 = "How should we hedge our EUR revenue, and what database changes does engineering need?"
NEW = 6


def _config(tmp: Path, adapters: dict[str, Path], extra: str = "") -> Path:
    text = f'[base]\nmodel = "smollm2-135m-instruct"\n[orchestrator]\nmax_new_tokens = {NEW}\n' + extra
    for name, path in adapters.items():
        text += f'\n[[experts]]\nname = "{name}"\nadapter = "{path}"\n'
    p = tmp / "expertmix.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def om(random_adapters, tmp_path_factory):
    from orchestrator import Orchestrator

    o = Orchestrator.from_config(_config(tmp_path_factory.mktemp("dec"), random_adapters), router=KeywordRouter())
    yield o
    o.close()


def test_decompose_answers_each_part_with_its_own_expert_in_one_batch(om) -> None:
    ans = om.ask(Q2, strategy="decompose")
    parts = ans.plan["parts"]
    assert [p["answered_by"] for p in parts] == ["finance", "engineering"]
    assert ans.chosen == "decompose" and ans.fallback is None
    # each part's answer is exactly what that expert says alone to the same messages (batch equivalence)
    plan = om.plan(Q2)
    for p, part in zip(parts, plan.parts):
        alone = om.pool.generate(p["answered_by"], part_messages([{"role": "user", "content": Q2}], plan, part),
                                 om.generation_config(max_new_tokens=NEW))
        assert alone.text and f"**{heading(part.text)}**\n{alone.text}" in ans.text
    assert ans.text.startswith("**How should we hedge our EUR revenue**")
    assert {c.expert for c in ans.contributions} == {"finance", "engineering"}
    assert ans.tokens == sum(p["tokens"] for p in parts)
    d = ans.to_dict()
    assert d["plan"]["planner"] == "segment" and d["chosen_strategy"] == "decompose"
    assert d["finish_reason"] in ("stop", "length")


def test_auto_picks_decompose_for_multi_part_and_top1_for_one_part(om) -> None:
    multi = om.ask(Q2, strategy="auto")
    assert multi.strategy == "auto" and multi.chosen == "decompose" and len(multi.plan["parts"]) == 2
    single = om.ask("How do I reverse a list in Python?", strategy="auto")
    assert single.chosen == "top1" and [c.expert for c in single.contributions] == ["engineering"]
    assert len(single.plan["parts"]) == 1


def test_finish_reason_length_when_a_part_hits_its_limit(om) -> None:
    ans = om.ask(Q2, strategy="decompose", max_new_tokens=2)
    assert ans.finish_reason == "length"


def test_stream_of_a_decomposed_answer(om) -> None:
    from orchestrator import Answer

    items = list(om.stream(Q2, strategy="decompose"))
    assert isinstance(items[-1], Answer) and "".join(items[:-1]).strip() == items[-1].text


class FailingBackend:
    local_weights = False

    def expert_names(self) -> list[str]:
        return ["engineering"]

    def generate(self, requests, config, *, cancel=None) -> list[Generation]:
        raise ExpertUnavailable("injected failure", expert="engineering")

    def stream(self, expert, messages, config, *, cancel=None) -> Iterator[str]:
        raise ExpertUnavailable("injected failure", expert=expert)

    def close(self) -> None:
        pass


def test_failed_part_goes_to_the_base_and_the_answer_survives(random_adapters, tmp_path) -> None:
    from orchestrator import Orchestrator

    cfg = _config(tmp_path, random_adapters)
    with Orchestrator.from_config(cfg, router=KeywordRouter(), backends={"engineering": FailingBackend()}) as o:
        ans = o.ask(Q2, strategy="decompose", k=1)
    parts = ans.plan["parts"]
    assert [p["answered_by"] for p in parts] == ["finance", "__base__"]
    assert "injected failure" in parts[1]["fallback"] and ans.text.count("**") == 4
    assert any(c.expert == "engineering" and c.error for c in ans.contributions)


class MetaAggregator:
    """Stands in for a small aggregator that writes *about* the drafts (the behaviour the guard catches)."""

    local_weights = False

    def expert_names(self) -> list[str]:
        return ["__base__"]

    def generate(self, requests, config, *, cancel=None) -> list[Generation]:
        return [Generation(n, "Here's a rewritten version of the two answers: ...", 9, 0.01) for n, _ in requests]

    def stream(self, expert, messages, config, *, cancel=None) -> Iterator[str]:
        yield from ()

    def close(self) -> None:
        pass


def test_synthesis_guard_replaces_meta_answers_with_sections(random_adapters, tmp_path) -> None:
    from test_core import FixedRouter

    from orchestrator import Orchestrator

    cfg = _config(tmp_path, random_adapters)
    router = FixedRouter({"engineering": 0.6, "product": 0.4})
    with Orchestrator.from_config(cfg, router=router, backends={"__base__": MetaAggregator()}) as o:
        ans = o.ask("How do I profile a slow Python service?", strategy="synthesis", k=2)
    assert "synthesis_guard" in ans.notes and "rewritten version" not in ans.text
    assert ans.text.startswith("**Engineering**") and "**Product**" in ans.text


@pytest.mark.parametrize(
    ("text", "meta"),
    [
        ("Here's a rewritten version of your code using the expertise of the two experts:", True),
        ("This answer provides a detailed breakdown of the costs.", True),
        ("Based on the experts' answers, you should hedge.", True),
        ("The two answers agree that a forward contract works.", True),
        ("Use a forward contract to lock in the EUR/USD rate for the next four quarters.", False),
        ("Profile the service with py-spy, then look at the slowest endpoints first.", False),
    ],
)
def test_is_meta(text: str, meta: bool) -> None:
    assert is_meta(text) is meta


def test_sections_and_headings() -> None:
    assert heading("how should we hedge our EUR revenue?") == "How should we hedge our EUR revenue"
    assert heading(" ".join(["word"] * 20)).endswith("…")
    assert sections([("What is EBITDA?", "Earnings before..."), ("Empty", "  ")]) == "**What is EBITDA**\nEarnings before..."


def test_config_edited_after_training_loads_with_live_routing(random_adapters, tmp_path) -> None:
    """`experts add` / `experts remove` edit the config before a router is retrained: it still loads,
    an added expert is routed to by its description, a removed one never."""
    from orchestrator import Orchestrator
    from orchestrator.routing import Router

    text = f'[base]\nmodel = "smollm2-135m-instruct"\n[orchestrator]\nmax_new_tokens = {NEW}\n'
    for name in ("finance", "engineering"):
        text += f'\n[[experts]]\nname = "{name}"\nadapter = "{random_adapters[name]}"\n'
    text += (f'\n[[experts]]\nname = "legal"\nadapter = "{random_adapters["product"]}"\n'
             'description = "Legal: contracts, NDAs, clauses, liability, compliance and lawsuits."\n')
    cfg = tmp_path / "edited.toml"
    cfg.write_text(text)
    with Orchestrator.from_config(cfg, router=Router.load()) as o:
        assert set(o.router.labels) == {"finance", "engineering", "legal"}
        r = o.route("Which clauses should a mutual NDA with a supplier contain, and who is liable for breaches?")
        assert r.experts[0].name == "legal" and "live expert" in (r.reason or "")
        assert all(e.name != "product" for e in o.route("Write a user story for the checkout page.").experts)
        assert o.route("How do I reverse a list in Python?").experts[0].name == "engineering"

"""Orchestrator on real models: strategies' equivalences, fault tolerance, abstain, errors, JSON schema."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from expertmix.errors import ExpertUnavailable, InputError, StrategyError
from experts.backends.base import Generation, GenerationConfig
from experts.backends.mixture import mixture_generate
from orchestrator.routing import ExpertWeight, Routing

NEW = 10
Q_ENG = "How do I reverse a list in Python?"


def _config(tmp: Path, adapters: dict[str, Path], extra: str = "", timeouts: dict[str, float] | None = None) -> Path:
    text = '[base]\nmodel = "smollm2-135m-instruct"\n[orchestrator]\nmax_new_tokens = 10\nexpert_timeout_s = 300\n' + extra
    for name, path in adapters.items():
        text += f'\n[[experts]]\nname = "{name}"\nadapter = "{path}"\n'
        if timeouts and name in timeouts:
            text += f"timeout_s = {timeouts[name]}\n"
    p = tmp / "expertmix.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def om(random_adapters, tmp_path_factory):
    from orchestrator import Orchestrator

    tmp = tmp_path_factory.mktemp("om")
    o = Orchestrator.from_config(_config(tmp, random_adapters, f'log_file = "{tmp / "log.jsonl"}"\n'))
    yield o
    o.close()


class FailingBackend:
    """A real backend whose expert raises: stands in for a crashed or misbehaving expert server."""

    local_weights = False

    def expert_names(self) -> list[str]:
        return ["product"]

    def generate(self, requests, config, *, cancel=None) -> list[Generation]:
        raise ExpertUnavailable("injected failure", expert="product")

    def stream(self, expert, messages, config, *, cancel=None) -> Iterator[str]:
        raise ExpertUnavailable("injected failure", expert=expert)

    def close(self) -> None:
        pass


class SlowBackend(FailingBackend):
    """Answers after 5 s unless its cancel token fires first (as a well-behaved backend must)."""

    cancelled_after: float | None = None

    def generate(self, requests, config, *, cancel=None) -> list[Generation]:
        t0 = time.monotonic()
        if cancel is not None and cancel.wait(5):
            SlowBackend.cancelled_after = time.monotonic() - t0
            raise cancel.error(what="slow expert")
        return [Generation(n, "late", 1, 5.0) for n, _ in requests]


def _fixed_routing(weights: dict[str, float]) -> Routing:
    return Routing(
        experts=tuple(ExpertWeight(n, w) for n, w in weights.items()),
        abstained=False,
        probabilities=dict(weights),
        confidence=max(weights.values()),
    )


class FixedRouter:
    """Routes every query to fixed weights (isolates merge behaviour from the learned router)."""

    labels = ("finance", "engineering", "product")

    def __init__(self, weights: dict[str, float], abstain: bool = False) -> None:
        self.weights, self.abstain = weights, abstain

    def route(self, query: str, *, k: int = 2, min_weight: float = 0.0) -> Routing:
        r = _fixed_routing(dict(list(self.weights.items())[:k]))
        if self.abstain:
            return Routing(experts=(), abstained=True, probabilities=r.probabilities, confidence=0.1, reason="test")
        return r

    def route_batch(self, queries, *, k: int = 2, min_weight: float = 0.0) -> list[Routing]:
        return [self.route(q, k=k, min_weight=min_weight) for q in queries]


def test_mixture_with_weight_one_zero_equals_single_expert(om) -> None:
    msgs = [{"role": "user", "content": Q_ENG}]
    cfg = GenerationConfig(max_new_tokens=NEW)
    single = om.local.generate([("engineering", msgs)], cfg)[0]
    mixed = mixture_generate(om.local, msgs, {"engineering": 1.0, "finance": 0.0}, cfg)
    assert mixed.text == single.text and mixed.tokens == single.tokens
    # a real two-adapter mixture also decodes (one forward pass per step for both rows)
    both = mixture_generate(om.local, msgs, {"engineering": 0.5, "finance": 0.5}, cfg)
    assert both.tokens > 0


def test_greedy_mixture_picks_the_argmax_of_the_weighted_probabilities() -> None:
    import torch

    from experts.backends.mixture import _processor

    g = torch.Generator().manual_seed(3)
    w = torch.tensor([0.7, 0.3])
    mix = _processor(w, GenerationConfig(max_new_tokens=1), None)
    for _ in range(20):
        scores = torch.randn(2, 500, generator=g) * 4
        want = int(torch.argmax(torch.logsumexp(torch.log_softmax(scores, -1) + torch.log(w)[:, None], dim=0)))
        out = mix(torch.zeros((2, 1), dtype=torch.long), scores)
        assert out.shape == scores.shape and bool((out[:, want] == 0).all())
        assert int(torch.isinf(out).sum()) == 2 * 499  # one token for every row: the rows stay in lockstep


def test_adapter_merge_of_one_expert_equals_that_expert(om) -> None:
    msgs = [{"role": "user", "content": Q_ENG}]
    cfg = GenerationConfig(max_new_tokens=NEW)
    merged = om.local.merged.get({"finance": 1.0})
    assert merged != "finance"
    a = om.local.generate([(merged, msgs)], cfg)[0]
    b = om.local.generate([("finance", msgs)], cfg)[0]
    assert a.text == b.text
    hits = om.local.merged.hits
    assert om.local.merged.get({"finance": 2.0}) == merged  # renormalized → cache hit
    assert om.local.merged.hits == hits + 1


def test_synthesis_prompt_contains_every_contribution_and_weight(om) -> None:
    from orchestrator.merge.base import MergeContext
    from orchestrator.merge.synthesis import build_synthesis_prompt

    ctx = MergeContext([{"role": "user", "content": "Q?"}], "Q?", [], GenerationConfig(), om.settings, om.pool)
    prompt = build_synthesis_prompt(ctx, [("engineering", 0.75), ("product", 0.25)],
                                    {"engineering": "use a profiler", "product": "tell customers"})
    for s in ("Q?", "engineering", "75%", "use a profiler", "product", "25%", "tell customers"):
        assert s in prompt


@pytest.mark.parametrize("strategy", ["synthesis", "top1", "mixture", "adapter_merge"])
def test_every_strategy_answers(om, strategy: str) -> None:
    ans = om.ask(Q_ENG, k=2, strategy=strategy, max_new_tokens=NEW)
    assert ans.text and ans.strategy == strategy and not ans.fallback
    assert abs(sum(e.weight for e in ans.routing.experts) - 1) < 1e-6
    assert ans.routing.experts[0].name == "engineering"
    assert ans.timings.total >= ans.timings.route > 0


def test_failing_expert_is_dropped_and_weights_renormalized(random_adapters, tmp_path: Path) -> None:
    from orchestrator import Orchestrator

    cfg = _config(tmp_path, random_adapters, timeouts={"product": 1.0})
    for backend, err in ((FailingBackend(), "injected failure"), (SlowBackend(), "ExpertTimeout")):
        router = FixedRouter({"engineering": 0.6, "product": 0.2, "finance": 0.2})
        with Orchestrator.from_config(cfg, router=router, backends={"product": backend}) as o:
            ans = o.ask(Q_ENG, k=2, strategy="synthesis")
        assert ans.text and ans.fallback is None
        failed = [c for c in ans.contributions if c.error]
        assert [c.expert for c in failed] == ["product"] and err in failed[0].error
        assert ans.weights == {"engineering": 1.0}
    # the deadline cancelled the slow expert's work instead of abandoning it
    assert SlowBackend.cancelled_after is not None and SlowBackend.cancelled_after < 2.5


def test_all_experts_fail_then_base_answers(random_adapters, tmp_path: Path) -> None:
    from orchestrator import Orchestrator

    cfg = _config(tmp_path, random_adapters)
    with Orchestrator.from_config(cfg, router=FixedRouter({"product": 1.0}), backends={"product": FailingBackend()}) as o:
        ans = o.ask(Q_ENG, k=1, strategy="top1")
    assert ans.fallback == "all experts failed" and ans.text
    assert [c.expert for c in ans.contributions] == ["product", "__base__"]


def test_abstain_uses_base_model(random_adapters, tmp_path: Path) -> None:
    from orchestrator import Orchestrator

    with Orchestrator.from_config(_config(tmp_path, random_adapters), router=FixedRouter({"finance": 1.0}, abstain=True)) as o:
        ans = o.ask("What's the weather in Paris tomorrow?")
        base = o.generate("__base__", "What's the weather in Paris tomorrow?")
    assert ans.routing.abstained and ans.fallback == "abstained"
    assert [c.expert for c in ans.contributions] == ["__base__"] and ans.text == base.text


def test_shipped_router_abstains_on_off_topic(om) -> None:
    ans = om.ask("Set an alarm for 7 am tomorrow and play some jazz.")
    assert ans.routing.abstained and ans.contributions[0].expert == "__base__"


def test_stream_yields_chunks_then_answer(om) -> None:
    from orchestrator import Answer

    items = list(om.stream(Q_ENG, k=1, strategy="top1"))
    assert isinstance(items[-1], Answer)
    assert "".join(items[:-1]).strip() == items[-1].text and len(items) > 2


def test_chat_messages_and_async(om) -> None:
    import asyncio

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q_ENG}]
    ans = asyncio.run(om.aask(msgs, k=1, strategy="top1"))
    assert ans.text and ans.routing.experts[0].name == "engineering"


@pytest.mark.parametrize("bad", ["", "   \n", b"caf\xe9", [], [{"role": "user", "content": ""}], "word " * 9000])
def test_bad_queries_are_input_errors(om, bad) -> None:
    with pytest.raises(InputError):
        om.ask(bad)


def test_unknown_strategy_and_remote_restrictions(om) -> None:
    with pytest.raises(StrategyError, match="unknown merge strategy"):
        om.ask(Q_ENG, strategy="vote")


def test_answer_log_and_stats(om) -> None:
    from orchestrator.trace import utilization

    om.ask(Q_ENG, k=2, strategy="top1")
    lines = Path(om.log.path).read_text().splitlines()
    rec = json.loads(lines[-1])
    assert "query_hmac" in rec and "query" not in rec and rec["id"].startswith("chatcmpl-")
    s = utilization(lines)
    assert s["queries"] == len(lines) and "engineering" in s["experts"]


def test_json_schema_from_cli(random_adapters, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from orchestrator.cli import app

    cfg = _config(tmp_path, random_adapters)
    res = CliRunner().invoke(app, ["ask", Q_ENG, "--config", str(cfg), "--json", "--strategy", "top1", "--k", "2"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert set(d) >= {"answer", "strategy", "routing", "contributions", "timings"}
    assert set(d["routing"]) >= {"experts", "abstained", "probabilities"}
    assert set(d["routing"]["experts"][0]) == {"name", "weight"}
    assert set(d["contributions"][0]) == {"expert", "weight", "text", "tokens", "latency_s", "error"}
    assert set(d["timings"]) == {"route", "experts", "merge", "total"}
    for bad in ("", "   "):
        res = CliRunner().invoke(app, ["ask", bad, "--config", str(cfg)])
        assert res.exit_code == 1 and "error:" in res.output

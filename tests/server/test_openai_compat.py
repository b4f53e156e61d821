"""The OpenAI endpoint behaves like one: finish_reason, response_format, tools, unknown fields,
/v1/completions, docs behind auth, stop limits — each driven by the official ``openai`` client."""

from __future__ import annotations

import json
import time
from dataclasses import replace

import httpx
import pytest

openai = pytest.importorskip("openai")

from srvutil import AUTH, KEY, Q_ENG, Q_FIN, err, msgs


# -- finish_reason -------------------------------------------------------------------------------------
def test_finish_reason_is_length_when_cut_and_stop_when_stopped(client, om) -> None:
    r = client.chat.completions.create(model="expertmix", messages=msgs(Q_FIN), max_tokens=4,
                                       extra_body={"strategy": "top1"})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    d = client.chat.completions.create(model="engineering", messages=msgs(Q_ENG), max_tokens=4)
    assert d.choices[0].finish_reason == "length"
    full = om.generate("engineering", msgs(Q_ENG), max_new_tokens=8).text
    word = full.split()[1]
    cut = client.chat.completions.create(model="engineering", messages=msgs(Q_ENG), max_tokens=8, stop=[word])
    assert cut.choices[0].finish_reason == "stop" and word not in cut.choices[0].message.content
    chunks = list(client.chat.completions.create(model="expertmix", messages=msgs(Q_FIN), max_tokens=4, stream=True,
                                                 extra_body={"strategy": "top1"}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]


def test_finish_reason_stop_when_the_answer_ends_before_the_limit(client) -> None:
    r = client.chat.completions.create(model="__base__", messages=msgs("Say yes."), max_tokens=60)
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens >= 60 else "stop")


# -- response_format -----------------------------------------------------------------------------------
def _json_or_refused(call) -> dict | None:
    """Either a 200 whose content parses and conforms, or a 422 that names response_format."""
    try:
        r = call()
    except openai.UnprocessableEntityError as exc:
        assert exc.body["param"] == "response_format" and "response_format" in exc.body["message"]
        return None
    content = r.choices[0].message.content
    value = json.loads(content)
    assert r.model_extra["expertmix"]["response_format"]["attempts"] >= 1
    return value


def test_response_format_json_object_is_honoured_or_refused_by_name(client) -> None:
    value = _json_or_refused(lambda: client.chat.completions.create(
        model="__base__", messages=msgs("Give the name and age of a person as JSON."), max_tokens=40,
        response_format={"type": "json_object"}))
    assert value is None or isinstance(value, dict)


def test_response_format_json_schema_validated(client) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    value = _json_or_refused(lambda: client.chat.completions.create(
        model="expertmix", messages=msgs("Is 7 prime? Answer in JSON."), max_tokens=40,
        extra_body={"strategy": "top1"},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}))
    assert value is None or isinstance(value.get("answer"), str)


def test_response_format_that_cannot_be_honoured_is_400(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="finance", messages=msgs("hi"), max_tokens=4,
                                       response_format={"type": "grammar", "grammar": "x"})
    assert info.value.body["param"] == "response_format"
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="finance", messages=msgs("hi"), max_tokens=4,
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "x", "schema": {"type": "object", "patternProperties": {}}}})
        assert "patternProperties" in info.value.body["message"]


def test_json_extraction_and_small_validator() -> None:
    from orchestrator.server.jsonmode import extract_json, parse_response_format, validate

    assert extract_json('```json\n{"a": [1, 2]}\n```') == ({"a": [1, 2]}, None)
    assert extract_json("no json here")[1] == "the answer contains no JSON object"
    assert extract_json('{"a": ')[1].startswith("not valid JSON")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}, "tags": {
        "type": "array", "items": {"enum": ["a", "b"]}}}, "required": ["n"], "additionalProperties": False}
    assert validate({"n": 1, "tags": ["a"]}, schema) is None
    assert "n" in validate({"tags": []}, schema)
    assert validate({"n": -1}, schema) is not None
    assert validate({"n": 1, "tags": ["c"]}, schema) is not None
    assert validate({"n": 1, "x": 0}, schema) is not None
    rule = parse_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert rule.check('Here: {"n": 3}') == ({"n": 3}, None)
    assert rule.check('{"n": "3"}')[1].startswith("does not match the schema")
    assert parse_response_format({"type": "text"}) is None


# -- tools ---------------------------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {"name": "get_rate", "description": "Current interest rate",
                                           "parameters": {"type": "object", "properties": {}}}}]


def test_tools_are_refused_by_name_unless_tool_choice_none(client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="expertmix", messages=msgs(Q_FIN), max_tokens=4, tools=TOOLS)
    assert info.value.body["param"] == "tools" and "tools" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="finance", messages=msgs(Q_FIN), max_tokens=4, tool_choice="required")
    assert info.value.body["param"] == "tool_choice"
    r = client.chat.completions.create(model="finance", messages=msgs(Q_FIN), max_tokens=4, tools=TOOLS,
                                       tool_choice="none")
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_tool_messages_are_accepted_in_history(client) -> None:
    history = [
        {"role": "user", "content": "What is the interest rate?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_rate", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4.5%"},
    ]
    r = client.chat.completions.create(model="expertmix", messages=history, max_tokens=4,
                                       extra_body={"strategy": "top1"})
    assert r.choices[0].message.content


# -- unknown / unsupported fields ----------------------------------------------------------------------
def test_unknown_and_unsupported_fields_are_400_unless_drop_params(client, om, local_config) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="finance", messages=msgs("hi"), max_tokens=2,
                                       extra_body={"guided_grammar": "x"})
    assert info.value.body["param"] == "guided_grammar" and "--drop-params" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="finance", messages=msgs("hi"), max_tokens=2, logprobs=True)
    assert info.value.body["param"] == "logprobs"
    ok = client.chat.completions.create(model="finance", messages=msgs("hi"), max_tokens=2, logprobs=False,
                                        user="u1", presence_penalty=0)
    assert ok.choices[0].message.content is not None

    from orchestrator.server.app import create_app
    from orchestrator.server.background import BackgroundServer

    settings = replace(local_config.server, drop_params=True)
    with BackgroundServer(create_app(om, settings=settings, batching=False)) as srv, \
            openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        r = c.chat.completions.create(model="finance", messages=msgs("hi"), max_tokens=2, logprobs=True,
                                      extra_body={"guided_grammar": "x"})
        assert r.choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError):  # tools are never dropped silently
            c.chat.completions.create(model="finance", messages=msgs("hi"), max_tokens=2, tools=TOOLS)


# -- /v1/completions -----------------------------------------------------------------------------------
def test_completions_endpoint_for_prompt_clients(client, om) -> None:
    r = client.completions.create(model="engineering", prompt=Q_ENG, max_tokens=5)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.choices[0].text == om.generate("engineering", msgs(Q_ENG), max_new_tokens=5).text
    streamed = list(client.completions.create(model="engineering", prompt=Q_ENG, max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices).strip() == r.choices[0].text.strip()
    mixed = client.completions.create(model="expertmix", prompt=Q_FIN, max_tokens=4,
                                      extra_body={"strategy": "top1"})
    assert mixed.choices[0].text and mixed.model_extra["expertmix"]["routing"]["experts"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="finance", prompt=["a", "b"], max_tokens=2)


# -- docs, limits --------------------------------------------------------------------------------------
def test_openapi_and_docs_follow_the_v1_auth_rule(server) -> None:
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(server.url + path).status_code == 401
        r = httpx.get(server.url + path, headers=AUTH)
        assert r.status_code == 200
    spec = httpx.get(server.url + "/openapi.json", headers=AUTH).json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/completions" in spec["paths"]


def test_stop_limits_refuse_before_any_work(server) -> None:
    t0 = time.perf_counter()
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "finance", "messages": msgs("hi"), "max_tokens": 4, "stop": ["x"] * 1000})
    assert r.status_code == 400 and err(r)["param"] == "stop"
    assert time.perf_counter() - t0 < 1.0
    r = httpx.post(server.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "finance", "messages": msgs("hi"), "max_tokens": 4, "stop": ["y" * 5000]})
    assert r.status_code == 400 and err(r)["param"] == "stop"


def test_request_id_header_and_internal_urls_hidden() -> None:
    from orchestrator.server.errors import Redactor

    red = Redactor(["http://10.1.2.3:8001/v1", "10.1.2.3:8001"])
    out = red("http://10.1.2.3:8001/v1 refused: ConnectError", request_id="abc")
    assert "10.1.2.3" not in out and "request id abc" in out
    assert "https://" not in red("see https://internal.example/x for details")

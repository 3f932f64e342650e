"""augur serve, driven by the official `openai` Python client.

Run by crates/cli/tests/openai_client.rs, which starts the server on 127.0.0.1 and passes its URL
in AUGUR_SERVER_URL (and the API key it requires in AUGUR_API_KEY).
"""
import os

import openai
import pytest

URL = os.environ["AUGUR_SERVER_URL"]
KEY = os.environ["AUGUR_API_KEY"]


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=URL + "/v1", api_key=KEY, max_retries=0, timeout=120)


def chat(client, **kw):
    args = dict(model="augur", messages=[{"role": "user", "content": "Name three colors."}], max_tokens=12)
    args.update(kw)
    return client.chat.completions.create(**args)


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert len(ids) == 1


def test_chat_completion_has_text_and_usage(client):
    r = chat(client, temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion(client):
    r = client.completions.create(model="augur", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in r.choices[0].text
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_streaming_equals_non_streaming_and_reports_usage(client):
    full = chat(client, temperature=0).choices[0].message.content
    parts, usage, finish = [], None, None
    for chunk in chat(client, temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == full
    assert usage is not None and usage.completion_tokens > 0
    assert finish in ("stop", "length")


def test_stop_strings(client):
    r = client.completions.create(model="augur", prompt="1, 2, 3, 4, 5, 6,", max_tokens=20, temperature=0, stop=[" 9"])
    text = r.choices[0].text
    assert " 9" not in text and r.choices[0].finish_reason == "stop"
    assert "8" in text


def test_seed_reproducibility(client):
    a = chat(client, temperature=1.0, seed=42, max_tokens=16).choices[0].message.content
    b = chat(client, temperature=1.0, seed=42, max_tokens=16).choices[0].message.content
    assert a == b


def test_n_choices(client):
    r = chat(client, temperature=1.0, seed=1, n=2, max_tokens=8)
    assert [c.index for c in r.choices] == [0, 1]


def test_logprobs(client):
    r = chat(client, temperature=0, logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-4
    c = client.completions.create(model="augur", prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 3


def test_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=10_000_000)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        chat(client, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="augur", messages=[], max_tokens=4)
    bad = openai.OpenAI(base_url=URL + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()

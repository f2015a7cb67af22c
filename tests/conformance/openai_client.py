"""Conformance of hermes-gateway's API with the official `openai` Python client.

Usage: python openai_client.py BASE_URL API_KEY
Exits 0 when every check passes; prints what failed otherwise.
"""

import sys

import openai


def main() -> int:
    base_url, api_key = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=20)

    # Models.
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["hermes-agent"], ids

    # Plain chat completion.
    r = client.chat.completions.create(
        model="hermes-agent",
        messages=[{"role": "user", "content": "hello conformance"}],
    )
    assert r.object == "chat.completion", r
    assert r.choices[0].message.role == "assistant", r
    assert r.choices[0].message.content == "hello conformance", r
    assert r.choices[0].finish_reason == "stop", r

    # Streaming chat completion.
    stream = client.chat.completions.create(
        model="hermes-agent",
        messages=[{"role": "user", "content": "streamed words"}],
        stream=True,
    )
    text, finish = "", None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk", chunk
        delta = chunk.choices[0].delta
        if delta.content:
            text += delta.content
        if chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert text == "streamed words", text
    assert finish == "stop", finish

    # A session kept by the gateway through the header: send only the new message.
    session = {"X-Hermes-Session-Id": "conformance-session"}
    for word in ["first", "second"]:
        r = client.chat.completions.create(
            model="hermes-agent",
            messages=[{"role": "user", "content": word}],
            extra_headers=session,
        )
        assert r.choices[0].message.content == word, r
    history = client.get(
        "/sessions/conformance-session", cast_to=object
    )
    contents = [m["content"] for m in history["messages"]]
    assert contents == ["first", "first", "second", "second"], contents

    # Errors arrive as the client's typed exceptions.
    bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    try:
        bad.models.list()
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        assert e.status_code == 401, e
        assert e.code == "invalid_api_key", e.code
    try:
        client.chat.completions.create(model="hermes-agent", messages=[])
        raise AssertionError("empty messages were accepted")
    except openai.BadRequestError as e:
        assert "messages" in str(e), e
        assert e.code is None, e.code
    try:
        client.chat.completions.create(model="hermes-agent", messages=[{"role": "user"}])
        raise AssertionError("a user message without content was accepted")
    except openai.BadRequestError as e:
        assert "messages[0].content" in str(e), e

    print("conformance: all checks passed with openai", openai.__version__)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"conformance check failed: {e!r}", file=sys.stderr)
        raise

"""The Responses API of hermes-gateway with the official `openai` Python client.

Usage: python openai_responses.py BASE_URL API_KEY PHASE [RESPONSE_ID]
  PHASE "main":    create (plain, streamed), previous_response_id over three turns,
                   conversation, retrieve, input_items, delete; prints `keep=<id>` of a
                   response left stored for the next phase.
  PHASE "restart": retrieves RESPONSE_ID (after a gateway restart) and continues it.
The gateway's agent must be the test's `command` agent, which answers
`<number of messages it saw>|<system message or ->|<the last user message>`.
Exits 0 when every check passes.
"""

import sys

import openai


def parse(text):
    count, system, last = text.split("|", 2)
    return int(count), system, last


def main() -> int:
    base_url, api_key, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)

    if phase == "restart":
        rid = sys.argv[4]
        r = client.responses.retrieve(rid)
        assert r.id == rid and r.status == "completed", r
        assert parse(r.output_text)[2] == "kept across a restart", r.output_text
        nxt = client.responses.create(
            model="hermes-agent", input="after the restart", previous_response_id=rid
        )
        # The stored turn (2 messages) and this one.
        assert parse(nxt.output_text) == (3, "-", "after the restart"), nxt.output_text
        print("responses restart: all checks passed")
        return 0

    # Plain.
    r1 = client.responses.create(
        model="hermes-agent", input="first", instructions="be brief", metadata={"k": "v"}
    )
    assert r1.object == "response" and r1.status == "completed", r1
    assert r1.id.startswith("resp_"), r1.id
    assert parse(r1.output_text) == (2, "be brief", "first"), r1.output_text
    assert r1.output[0].type == "message" and r1.output[0].role == "assistant", r1.output
    assert r1.metadata == {"k": "v"}, r1.metadata
    assert r1.instructions == "be brief", r1.instructions

    # Streamed, continuing r1: OpenAI's event sequence, numbered.
    stream = client.responses.create(
        model="hermes-agent", input="second", previous_response_id=r1.id, stream=True
    )
    kinds, seqs, text, completed = [], [], "", None
    for ev in stream:
        kinds.append(ev.type)
        seqs.append(ev.sequence_number)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type == "response.completed":
            completed = ev.response
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], kinds
    assert "response.output_text.delta" in kinds, kinds
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ], kinds
    assert seqs == list(range(len(seqs))), seqs
    # r1's turn (user, assistant) + this user message; r1's instructions are not carried.
    assert parse(text) == (3, "-", "second"), text
    assert completed is not None and completed.output_text == text, completed
    r2 = completed

    # A third turn: the agent sees the whole history.
    r3 = client.responses.create(
        model="hermes-agent", input="third", previous_response_id=r2.id
    )
    assert parse(r3.output_text) == (5, "-", "third"), r3.output_text
    assert r3.previous_response_id == r2.id, r3

    # A branch from r1 sees r1's history only.
    b = client.responses.create(
        model="hermes-agent", input="branch", previous_response_id=r1.id
    )
    assert parse(b.output_text) == (3, "-", "branch"), b.output_text
    # And r3's line goes on where it was.
    r4 = client.responses.create(
        model="hermes-agent", input="fourth", previous_response_id=r3.id
    )
    assert parse(r4.output_text) == (7, "-", "fourth"), r4.output_text

    # A named conversation, kept like a session.
    for i, word in enumerate(["c-one", "c-two"]):
        c = client.responses.create(
            model="hermes-agent", input=word, conversation="conformance-conv"
        )
        assert parse(c.output_text) == (1 + 2 * i, "-", word), c.output_text
    conv = client.get("/sessions/conformance-conv", cast_to=object)
    assert [m["content"] for m in conv["messages"]][::2] == ["c-one", "c-two"], conv

    # store=False: answered, not retrievable.
    e = client.responses.create(model="hermes-agent", input="ephemeral", store=False)
    assert parse(e.output_text) == (1, "-", "ephemeral"), e.output_text
    try:
        client.responses.retrieve(e.id)
        raise AssertionError("a store=False response was retrievable")
    except openai.NotFoundError:
        pass

    # Retrieve and input items.
    got = client.responses.retrieve(r3.id)
    assert got.id == r3.id and got.output_text == r3.output_text, got
    items = list(client.responses.input_items.list(r3.id))
    assert len(items) == 1 and items[0].role == "user", items
    assert items[0].content[0].text == "third", items
    multi = client.responses.create(
        model="hermes-agent",
        input=[
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": [{"type": "input_text", "text": "c"}]},
        ],
    )
    assert parse(multi.output_text) == (3, "-", "c"), multi.output_text
    asc = client.responses.input_items.list(multi.id, order="asc")
    assert [i.content[0].text for i in asc.data] == ["a", "b", "c"], asc
    desc = client.responses.input_items.list(multi.id, limit=2)
    assert [i.content[0].text for i in desc.data] == ["c", "b"], desc
    assert desc.has_more, desc

    # Delete.
    client.responses.delete(r4.id)
    try:
        client.responses.retrieve(r4.id)
        raise AssertionError("a deleted response was retrievable")
    except openai.NotFoundError:
        pass

    # Errors are the client's typed exceptions.
    try:
        client.responses.create(
            model="hermes-agent", input="x", previous_response_id="resp_nope"
        )
        raise AssertionError("an unknown previous_response_id was accepted")
    except openai.NotFoundError:
        pass
    try:
        client.responses.create(
            model="hermes-agent", input="x", previous_response_id=r1.id,
            conversation="c",
        )
        raise AssertionError("conversation with previous_response_id was accepted")
    except openai.BadRequestError:
        pass

    keep = client.responses.create(model="hermes-agent", input="kept across a restart")
    print(f"keep={keep.id}")
    print("responses: all checks passed with openai", openai.__version__)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AssertionError as e:
        print(f"responses check failed: {e!r}", file=sys.stderr)
        raise

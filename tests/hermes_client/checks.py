"""hermes-gateway with the upstream hermes API server's own client.

Usage: python checks.py BASE_URL API_KEY PHASE
  PHASE "main":    probe_capabilities; streams with session id and key; a 256-character
                   id; an agent that fails; an agent silent for 50 s (the client's read
                   timeout is 45 s: only keepalives keep it open).
  PHASE "sigterm": prints STREAMING once a stream is under way; the test then stops the
                   gateway, and the stream must end in a typed terminal event.
Every stream must end in the client's typed terminal event, never a protocol error.
The gateway's agent is the test's `command` agent (see tests/api_hermes_client.rs).
"""

import asyncio
import sys
import time

import hermes_agent_api_client as h
from hermes_agent_api_client import (
    AssistantDeltaEvent,
    KeepaliveEvent,
    TerminalEvent,
    TerminalFailureReason,
    TerminalOutcome,
    UsageEvent,
)


def request(text, **extra):
    return {"model": "hermes-agent", "stream": True,
            "messages": [{"role": "user", "content": text}], **extra}


async def collect(client, text, **kwargs):
    events = []
    async for ev in client.stream_chat_events(request(text), **kwargs):
        events.append(ev)
    return events


def text_of(events):
    return "".join(e.text for e in events if isinstance(e, AssistantDeltaEvent))


def terminal(events):
    assert isinstance(events[-1], TerminalEvent), events
    assert sum(isinstance(e, TerminalEvent) for e in events) == 1, events
    return events[-1]


async def silent(base_url, key):
    async with h.HermesAgentApiClient(base_url, key) as client:
        started = time.monotonic()
        events = await collect(client, "silent")
        took = time.monotonic() - started
    assert took > 46, f"the agent was to be silent for 50 s, the stream took {took:.0f} s"
    t = terminal(events)
    assert t.outcome == TerminalOutcome.SUCCESS, events
    assert text_of(events) == "woke up", events
    keepalives = sum(isinstance(e, KeepaliveEvent) for e in events)
    assert keepalives >= 3, f"{keepalives} keepalives in 50 s"
    return "silent agent: kept open by %d keepalives over %.0f s" % (keepalives, took)


async def quick(base_url, key):
    out = []
    async with h.HermesAgentApiClient(base_url, key) as client:
        caps = await client.probe_capabilities()
        assert caps.platform == "hermes-agent" and caps.model == "hermes-agent", caps
        assert caps.auth_required and caps.chat_completions_streaming, caps
        out.append("capabilities: %r" % caps)

        sid, skey = "client-session-1", "agent:main:client:dm:user-42"
        events = await collect(client, "hello", session_id=sid, session_key=skey)
        assert terminal(events).outcome == TerminalOutcome.SUCCESS, events
        assert text_of(events) == f"1|{skey}|hello", events
        events = await collect(client, "again", session_id=sid)
        assert text_of(events) == f"3|{skey}|again", events
        out.append("session id and key: history kept, key kept and passed")

        long_id = "L" * 256
        events = await collect(client, "long", session_id=long_id, session_key="K" * 256)
        assert terminal(events).outcome == TerminalOutcome.SUCCESS, events
        assert text_of(events) == "1|" + "K" * 256 + "|long", events
        out.append("256-character id and key")

        ev = []
        async for e in client.stream_chat_events(
            request("usage", stream_options={"include_usage": True})
        ):
            ev.append(e)
        assert any(isinstance(e, UsageEvent) for e in ev), ev
        assert terminal(ev).outcome == TerminalOutcome.SUCCESS, ev

        events = await collect(client, "fail")
        t = terminal(events)
        assert t.outcome == TerminalOutcome.UPSTREAM_ERROR, events
        assert t.failure_reason == TerminalFailureReason.AGENT_ERROR, events
        assert t.partial, "a part was sent before the failure"
        out.append("failing agent: %r" % t)
    return out


async def main_phase(base_url, key):
    results = await asyncio.gather(silent(base_url, key), quick(base_url, key))
    for line in results[1]:
        print(line)
    print(results[0])


async def sigterm_phase(base_url, key):
    async with h.HermesAgentApiClient(base_url, key) as client:
        events = []
        async for ev in client.stream_chat_events(request("hang")):
            events.append(ev)
            if isinstance(ev, AssistantDeltaEvent):
                print("STREAMING", flush=True)
        t = terminal(events)
        assert t.outcome == TerminalOutcome.UPSTREAM_ERROR, events
        assert t.partial, events
        print("stream at SIGTERM: %r" % t)


def main():
    base_url, key, phase = sys.argv[1], sys.argv[2], sys.argv[3]
    if phase == "main":
        asyncio.run(main_phase(base_url, key))
    else:
        asyncio.run(sigterm_phase(base_url, key))
    print("hermes client: all checks passed with", h.__version__)


if __name__ == "__main__":
    main()

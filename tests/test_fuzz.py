"""Generated hostile input against a real server (real aiortc peers, real HTTP): control messages on a
live session's data channel and `POST /offer` bodies. Every message gets one clear answer, nothing
reaches a traceback in the server log, and a healthy viewer beside the fuzzer keeps streaming.

Hypothesis generates the corpus (derandomized, so CI runs the same inputs); the corpus is then sent
through the real transport in batches."""
from __future__ import annotations

import asyncio
import json
import urllib.parse

import aiohttp
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .test_serve import StreamClient, run, serving

CONTROL_MESSAGES = 5000
OFFER_BODIES = 2000

json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=12)
transition = st.fixed_dictionaries({}, optional={
    "kind": st.sampled_from(["recache", "blend", "cut", ""]) | json_leaf,
    "chunks": st.integers(-3, 100) | json_leaf,
    "interpolation": st.sampled_from(["linear", "slerp", "cubic"]) | json_leaf})
params = st.fixed_dictionaries({}, optional={
    "seed": st.integers(-2**70, 2**70) | st.floats() | st.sampled_from([6e16, 2**53, 2**63, True]) | json_leaf,
    "steps": st.lists(st.floats(-1e40, 1e40) | st.integers(-5000, 5000) | st.sampled_from([1000, 750, 500, 250]), max_size=10)
             | json_leaf,
    "transition": transition | json_value,
    "guidance": json_value})
structured = st.fixed_dictionaries(
    {"type": st.sampled_from(["prompt", "params", "pause", "resume", "reset", "stats", "ack", "", "PROMPT"])},
    optional={"prompt": st.text(max_size=600) | st.sampled_from(["a blue square", " ", "x" * 501]) | json_value,
              "params": params | json_value, "transition": transition | json_value, "extra": json_value})
control_message = st.one_of(
    structured.map(lambda m: ("object", m)),
    json_value.map(lambda v: ("raw", json.dumps(v))),
    st.text(max_size=200).map(lambda t: ("raw", t)),
    st.binary(max_size=200).map(lambda b: ("raw", b)),
    st.sampled_from(["[" * 5000 + "]" * 5000, '{"type": "prompt", "prompt": "' + "é" * 3000 + '"}', "{" * 40 + "}" * 40,
                     '{"type": "params", "params": {"steps": [1e39, 750, 500, 250]}}', "null", '"prompt"'])
    .map(lambda t: ("raw", t)))


def corpus(strategy, count: int) -> list:
    """`count` examples of `strategy`, drawn by Hypothesis (derandomized: the same every run)."""
    out: list = []

    @settings(max_examples=count, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example) -> None:
        out.append(example)

    collect()
    return out


async def watch(client: StreamClient, seen: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        frame = await client.next_frame(timeout=10)
        seen.append(frame.seq)


def test_fuzzed_control_messages_each_get_one_clear_answer(tracebacks) -> None:
    messages = corpus(control_message, CONTROL_MESSAGES)
    assert len(messages) >= CONTROL_MESSAGES

    async def main() -> None:
        async with serving(control_rate=1e9, max_sessions_per_ip=4) as server:
            async with StreamClient(server.url, prompt="a red circle") as healthy, \
                    StreamClient(server.url, prompt="a green circle") as fuzzer:
                seen: list[int] = []
                stop = asyncio.Event()
                watcher = asyncio.ensure_future(watch(healthy, seen, stop))
                replies: dict[int, list[dict]] = {}
                anonymous: list[dict] = []

                def on_message(raw) -> None:
                    message = json.loads(raw)
                    if message.get("type") in ("stats", "stall"):
                        return
                    if isinstance(message.get("id"), int) and message["id"] >= 10**7:
                        replies.setdefault(message["id"], []).append(message)
                    else:
                        anonymous.append(message)

                fuzzer._channel.on("message", on_message)
                next_id = 10**7
                sent_anonymous = 0
                for start in range(0, len(messages), 100):
                    batch_ids = []
                    for kind, message in messages[start:start + 100] + [("object", {"type": "resume"})]:
                        if kind == "object":
                            message = {**message, "id": next_id}
                            batch_ids.append(next_id)
                            next_id += 1
                            fuzzer.send_raw(json.dumps(message))
                        else:
                            sent_anonymous += 1
                            fuzzer.send_raw(message)
                    for _ in range(600):  # every identified message answered (acks land at chunk boundaries)
                        if all(i in replies for i in batch_ids):
                            break
                        await asyncio.sleep(0.05)
                    missing = [i for i in batch_ids if i not in replies]
                    assert not missing, f"no reply to {len(missing)} messages, e.g. id {missing[0]}"
                stop.set()
                await watcher
                frames_during = len(seen)
                await asyncio.sleep(0.5)
                after = (await healthy.next_frame()).seq
                fuzzed_session = await fuzzer.session()
                fuzzed_frame = (await fuzzer.next_frame()).seq

        assert all(len(r) == 1 for r in replies.values()), "a message was answered twice"
        answers = [r[0] for r in replies.values()] + anonymous
        errors = [a for a in answers if a["type"] == "error"]
        assert all(isinstance(e["message"], str) and e["message"] and "internal error" not in e["message"]
                   and "Traceback" not in e["message"] and "object has no attribute" not in e["message"] for e in errors)
        assert len(anonymous) == sent_anonymous  # messages without a usable id get exactly one error each
        assert {a["type"] for a in answers} <= {"ack", "error"}
        assert any(a["type"] == "ack" for a in answers) and errors
        assert frames_during > 0 and after > seen[-1]  # the healthy viewer kept streaming throughout
        assert fuzzed_session["state"] == "streaming" and fuzzed_frame >= 0  # and so did the fuzzed session

    run(main(), timeout=900)


def _mutations(sdp: str):
    lines = sdp.split("\r\n")
    index = st.integers(0, max(0, len(lines) - 1))
    return st.one_of(
        index.map(lambda i: "\r\n".join(lines[:i] + lines[i + 1:])),  # a line removed (e.g. a=mid:0)
        st.tuples(index, st.text(max_size=40)).map(lambda p: "\r\n".join(lines[:p[0]] + [p[1]] + lines[p[0] + 1:])),
        st.integers(0, len(sdp)).map(lambda n: sdp[:n]),  # truncated
        st.tuples(index, index).map(lambda p: "\r\n".join(lines[:p[0]] + lines[p[1]:p[1] + 1] + lines[p[0]:])),
        st.just(sdp))


async def _real_offer() -> str:
    pc = RTCPeerConnection()
    pc.createDataChannel("control")
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


def test_fuzzed_offer_bodies_are_answered_4xx_with_a_reason(tracebacks) -> None:
    sdp = asyncio.run(_real_offer())
    offers = st.fixed_dictionaries({"sdp": _mutations(sdp) | json_value, "type": st.sampled_from(["offer", "answer"]) | json_leaf},
                                   optional={"prompt": st.text(max_size=600) | json_value, "params": params | json_value,
                                             "session_id": st.text(max_size=20) | json_value, "junk": json_value})
    body = st.one_of(offers.map(json.dumps), json_value.map(json.dumps), st.binary(max_size=300),
                     st.sampled_from(["[" * 5000 + "]" * 5000, "", "{}", "null", '{"sdp": 1}']))
    bodies = corpus(body, OFFER_BODIES)
    assert len(bodies) >= OFFER_BODIES

    async def main() -> None:
        statuses: dict[int, int] = {}
        async with serving(max_sessions=6, max_sessions_per_ip=6, connect_timeout_s=2.0) as server:
            async with StreamClient(server.url, prompt="a red circle") as healthy, aiohttp.ClientSession() as http:
                seen: list[int] = []
                stop = asyncio.Event()
                watcher = asyncio.ensure_future(watch(healthy, seen, stop))
                for raw in bodies:
                    async with http.post(f"{server.url}/offer", data=raw, headers={"Content-Type": "application/json"}) as r:
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                        reply = await r.json(content_type=None)
                        if r.status == 200:  # a mutation that still negotiates: a session, closed at once
                            async with http.delete(f"{server.url}/sessions/{reply['session_id']}") as d:
                                assert d.status == 200
                        else:
                            assert 400 <= r.status < 500, (r.status, reply, raw[:200])
                            assert isinstance(reply["error"], str) and reply["error"], reply
                stop.set()
                await watcher
                after = (await healthy.next_frame()).seq
        assert seen and after > seen[-1]
        assert sum(v for k, v in statuses.items() if k >= 400) > OFFER_BODIES // 2, statuses

    run(main(), timeout=900)


PATHS_AND_HEADERS = 600


def test_fuzzed_paths_and_headers_never_reach_a_traceback(tracebacks) -> None:
    """Odd paths (percent-escapes, NUL, traversal, long names) with every method and hostile headers
    (Origin, Content-Type, Authorization, Range): always a 4xx/2xx JSON or file answer, never a 500."""
    segment = st.text(st.characters(codec="utf-8"), max_size=12).map(lambda t: urllib.parse.quote(t, safe=""))
    paths = st.one_of(
        st.lists(segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
        st.sampled_from(["/static/%00", "/static/" + "a" * 300, "/static/../../etc/passwd", "/sessions/%00",
                         "/sessions/x/recording", "/jobs/%2e%2e", "/whep/%ff", "/offer", "/model", "//", "/static/"]),
        st.tuples(st.sampled_from(["/static/", "/sessions/", "/jobs/", "/whep/"]), segment).map("".join))
    headers = st.fixed_dictionaries({}, optional={
        "Origin": st.sampled_from(["null", "http://evil.example", "file://", ""]) | st.text(st.characters(codec="ascii"), max_size=20),
        "Content-Type": st.sampled_from(["application/json", "application/sdp", "text/plain", "multipart/form-data", ""]),
        "Authorization": st.sampled_from(["Bearer", "Bearer  ", "Basic eA==", "bearer x" * 20]),
        "Range": st.sampled_from(["bytes=0-0", "bytes=-1", "bytes=99999999-", "lines=1-2", "bytes=abc"])})
    requests = corpus(st.tuples(st.sampled_from(["GET", "POST", "DELETE", "PATCH", "HEAD", "PUT"]), paths, headers,
                                st.binary(max_size=64)), PATHS_AND_HEADERS)

    async def main() -> dict[int, int]:
        statuses: dict[int, int] = {}
        async with serving(offer_rate=1000.0) as server:
            async with StreamClient(server.url, prompt="a red circle") as healthy, aiohttp.ClientSession() as http:
                seen: list[int] = []
                stop = asyncio.Event()
                watcher = asyncio.ensure_future(watch(healthy, seen, stop))
                for method, path, hdrs, body in requests:
                    hdrs = {k: v for k, v in hdrs.items() if v.isprintable()}
                    async with http.request(method, server.url + path, headers=hdrs, data=body or None) as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                        assert r.status < 500, (method, path, hdrs, r.status)
                stop.set()
                await watcher
                after = (await healthy.next_frame()).seq
        assert seen and after > seen[-1]
        return statuses

    statuses = run(main(), timeout=600)
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) > PATHS_AND_HEADERS // 2, statuses

"""Input an attacker or a careless client sends (issue 17), against a real server with real aiortc peers:
cross-site requests, wrong content types, broken SDP, offer floods, session takeover, invalid UTF-8 on
the control channel. Each is refused with a clear reason, nothing reaches a traceback, the session of
the client that sent it (and every other) keeps streaming."""
from __future__ import annotations

import json

import aiohttp
from aiortc.rtcsctptransport import WEBRTC_STRING

from .test_serve import StreamClient, offer_sdp, post, run, serving, until


def test_cross_site_and_wrongly_typed_offers_are_refused(tracebacks) -> None:
    async def main() -> None:
        async with serving(allowed_origins=("https://app.example.com",)) as server, aiohttp.ClientSession() as http:
            url, sdp = server.url, await offer_sdp()
            body = json.dumps({"sdp": sdp, "type": "offer"})
            async with http.post(url + "/offer", data=body, headers={"Content-Type": "text/plain"}) as r:
                assert r.status == 415 and "application/json" in (await r.json())["error"]
            evil = {"Content-Type": "application/json", "Origin": "http://evil.example"}
            async with http.post(url + "/offer", data=body, headers=evil) as r:
                reply = await r.json()
                assert r.status == 403 and "'http://evil.example' refused" in reply["error"], reply
            async with http.delete(url + "/sessions/anything", headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 403
            async with http.get(url + "/health", headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 200  # reads stay open: a browser keeps their answers from the other site
            assert not server.manager.sessions
            for origin in (url, "https://app.example.com"):  # the server's own page, and the allowed site
                got, reply = await post(url, {"sdp": await offer_sdp(), "type": "offer"}, {"Origin": origin})
                assert got == 200, (origin, reply)
                async with http.delete(f"{url}/sessions/{reply['session_id']}", headers={"Origin": origin}) as r:
                    assert r.status == 200

    run(main())


def test_an_allowed_sites_preflight_passes_before_the_token_and_its_replies_are_readable(tracebacks) -> None:
    """A WHIP/WHEP player on an --allow-origin site: its OPTIONS preflight carries no token and must not get 401;
    the real request (with the token) gets a reply the page may read, Location included. Other sites: 403."""
    app, evil = "https://app.example.com", "http://evil.example"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}

    async def main() -> dict:
        out = {}
        async with serving(allowed_origins=(app,), token="s3cret") as server, aiohttp.ClientSession() as http:
            for path in ("/whep", "/whip", "/offer"):
                async with http.options(server.url + path, headers={"Origin": app, **preflight}) as r:
                    out[path] = (r.status, dict(r.headers))
            async with http.options(server.url + "/whep", headers={"Origin": evil, **preflight}) as r:
                out["evil"] = (r.status, dict(r.headers), (await r.json())["error"])
            async with http.post(server.url + "/whep", data=await offer_sdp(), headers={
                    "Origin": app, "Content-Type": "application/sdp", "Authorization": "Bearer s3cret"}) as r:
                out["post"] = (r.status, dict(r.headers))
                location = r.headers.get("Location")
            async with http.delete(server.url + location, headers={"Origin": app, "Authorization": "Bearer s3cret"}) as r:
                out["delete"] = r.status
            async with http.post(server.url + "/whep", data="v=0", headers={"Origin": app, "Content-Type": "application/sdp"}) as r:
                out["no_token"] = (r.status, dict(r.headers))
        return out

    out = run(main())
    for path in ("/whep", "/whip", "/offer"):
        status, headers = out[path]
        assert status == 204 and headers["Access-Control-Allow-Origin"] == app, (path, status)
        assert "POST" in headers["Access-Control-Allow-Methods"] and "Authorization" in headers["Access-Control-Allow-Headers"]
    assert out["evil"][0] == 403 and "Access-Control-Allow-Origin" not in out["evil"][1] and "evil.example" in out["evil"][2]
    status, headers = out["post"]
    assert status == 201 and headers["Access-Control-Allow-Origin"] == app and "Location" in headers["Access-Control-Expose-Headers"]
    assert out["delete"] == 200
    assert out["no_token"][0] == 401 and out["no_token"][1]["Access-Control-Allow-Origin"] == app  # the page can read why


def test_broken_sdp_and_odd_paths_are_4xx_without_a_traceback(tracebacks) -> None:
    async def main() -> None:
        async with serving() as server, aiohttp.ClientSession() as http:
            sdp = await offer_sdp()
            no_mid = "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith("a=mid:0"))
            got, reply = await post(server.url, {"sdp": no_mid, "type": "offer"})
            assert got == 400 and "has no a=mid line" in reply["error"], reply
            for path in ("/static/%00", "/static/" + "a" * 300, "/static/../../etc/passwd"):
                async with http.get(server.url + path) as r:
                    assert r.status == 404, (path, r.status)
            assert not server.manager.sessions

    run(main())


def test_an_offer_flood_from_one_address_gets_429_with_retry_after(tracebacks) -> None:
    async def main() -> None:
        async with serving(offer_rate=0.5, offer_burst=3, max_sessions_per_ip=8, max_sessions=8) as server:
            statuses, retry = [], None
            async with aiohttp.ClientSession() as http:
                for _ in range(5):
                    body = json.dumps({"sdp": await offer_sdp(), "type": "offer"})
                    async with http.post(server.url + "/offer", data=body,
                                         headers={"Content-Type": "application/json"}) as r:
                        statuses.append(r.status)
                        reply = await r.json()
                        if r.status == 200:
                            await http.delete(f"{server.url}/sessions/{reply['session_id']}")
                        else:
                            retry = r.headers.get("Retry-After")
                            assert "too many new sessions from this address" in reply["error"], reply
            got, reply = await post(server.url, {"sdp": "v=0", "type": "offer"})  # cheap refusals are not counted
            assert got == 400, reply
        assert statuses == [200, 200, 200, 429, 429], statuses
        assert retry is not None and int(retry) >= 1

    run(main())


def test_resuming_needs_the_resume_token_and_a_live_viewer_is_not_taken_over_silently(tracebacks) -> None:
    async def main() -> None:
        async with serving() as server:
            async with StreamClient(server.url, prompt="a red fox") as owner:
                await owner.next_frame()
                sid, token = owner.session_id, owner.resume_token
                assert token and token != sid
                for resume_token, status, words in ((None, 403, "needs the resume_token"),
                                                    ("guess", 403, "needs the resume_token")):
                    body = {"sdp": await offer_sdp(), "type": "offer", "session_id": sid, "resume_token": resume_token}
                    got, reply = await post(server.url, body)
                    assert (got, words in reply["error"]) == (status, True), reply
                body = {"sdp": await offer_sdp(), "type": "offer", "session_id": sid, "resume_token": token}
                got, reply = await post(server.url, body)
                assert got == 409 and "takeover: true" in reply["error"], reply
                seq = (await owner.next_frame()).seq
                assert (await owner.next_frame()).seq > seq  # the owner never noticed any of it
                async with StreamClient(server.url, session_id=sid, resume_token=token) as successor:  # takeover
                    await successor.next_frame()
                    assert successor.session_id == sid and server.manager.get(sid).peer is not None
                    assert await until(lambda: owner._pc.connectionState in ("closed", "failed"), 15)

    run(main())


def test_invalid_utf8_on_the_control_channel_is_answered_and_the_session_goes_on(tracebacks) -> None:
    async def main() -> None:
        async with serving() as server:
            async with StreamClient(server.url, prompt="a red fox") as client:
                await client.next_frame()
                channel = client._channel
                sctp = channel.transport
                sctp._data_channel_queue.append((channel, WEBRTC_STRING, b'{"type": "pause", "x": "\xff\xfe"}'))
                await sctp._data_channel_flush()
                assert await until(lambda: any(n["type"] == "error" for n in client.notices), 10), client.notices
                [error] = [n for n in client.notices if n["type"] == "error"]
                assert "not valid UTF-8" in error["message"], error
                ack = await client.send_prompt("a blue square")  # the same connection, still steering
                assert ack["of"] == "prompt"
                seq = (await client.next_frame()).seq
                assert (await client.next_frame()).seq > seq

    run(main())

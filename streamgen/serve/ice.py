"""ICE and SDP plumbing: STUN/TURN configuration, loopback-only candidates, offer checks, codec choice.

Measured recipes (spec ecosystem §4–5): aiortc uses Google STUN unless given an empty server list, and
aioice never gathers 127.0.0.1, so a server bound to loopback restricts host candidates to it and
drops the browser's non-loopback (mDNS) candidates from offers.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Callable
from urllib.parse import unquote

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer, RTCRtpSender
from aiortc.rtcrtpparameters import RTCRtpCodecCapability
from aiortc.sdp import SessionDescription

from .encoder import CODECS


def ice_servers(urls: list[str]) -> list[RTCIceServer]:
    """`stun:host:port` or `turn:user:password@host:port[?transport=udp]` → aiortc servers."""
    servers = []
    for url in urls:
        scheme, sep, rest = url.partition(":")
        if not sep or scheme not in ("stun", "stuns", "turn", "turns"):
            raise ValueError(f"ICE server {url!r} must start with stun:, stuns:, turn: or turns:")
        creds, at, host = rest.rpartition("@")
        if at:
            user, _, password = creds.partition(":")
            servers.append(RTCIceServer(f"{scheme}:{host}", username=unquote(user), credential=unquote(password)))
        else:
            servers.append(RTCIceServer(url))
    return servers


def configuration(urls: list[str]) -> RTCConfiguration:
    return RTCConfiguration(iceServers=ice_servers(urls))  # empty list: no STUN (loopback/LAN)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def use_loopback_candidates() -> Callable[[], None]:
    """Gather only 127.0.0.1 in this process (aioice skips it otherwise), for loopback-bound servers;
    returns the undo."""
    original = aioice.ice.get_host_addresses
    aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]

    def restore() -> None:
        aioice.ice.get_host_addresses = original

    return restore


def loopback_candidates_only(sdp: str) -> str:
    return "\r\n".join(line for line in sdp.splitlines()
                       if not line.startswith("a=candidate:") or " 127.0.0.1 " in line) + "\r\n"


def check_offer(sdp: str, control: bool = True) -> str | None:
    """Why this offer cannot be served (None when it can): parse errors, no video, no data channel (when
    `control`: streamgen's own clients steer over one; a WHEP player only watches)."""
    if not sdp.lstrip().startswith("v=0"):
        return "malformed SDP: it must start with 'v=0'"
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # aiortc's parser raises whatever the bad line triggers
        return f"malformed SDP: {type(exc).__name__}: {exc}"[:300]
    kinds = [m.kind for m in description.media]
    if "video" not in kinds:
        return "the offer has no video section: add a receive-only video transceiver"
    if control and "application" not in kinds:
        return "the offer has no data channel: create one labelled 'control' before the offer"
    for index, media in enumerate(description.media):
        if not media.rtp.muxId:
            return f"malformed SDP: media section {index} ({media.kind}) has no a=mid line"
        if media.dtls is None or media.ice is None:
            return f"malformed SDP: media section {index} ({media.kind}) lacks its DTLS fingerprint or ICE credentials"
        if media.kind == "video" and media.direction not in (None, "recvonly", "sendrecv"):
            return f"the offer's video is {media.direction}: it must receive (recvonly or sendrecv)"
    return None


def codec_preferences(preferred: str) -> list[RTCRtpCodecCapability]:
    """The preferred codec first, then the other one, each with its retransmission (rtx) entry."""
    order = [CODECS[preferred]] + [m for m in CODECS.values() if m != CODECS[preferred]]
    codecs = RTCRtpSender.getCapabilities("video").codecs
    return [c for mime in order for c in codecs if c.mimeType == mime] + [c for c in codecs if c.mimeType == "video/rtx"]


def negotiated_codec(answer_sdp: str) -> str:
    """The codec an aiortc answer sends with (its first video codec)."""
    for media in SessionDescription.parse(answer_sdp).media:
        if media.kind == "video" and media.rtp.codecs:
            mime = media.rtp.codecs[0].mimeType
            for name, known in CODECS.items():
                if mime.lower() == known.lower():
                    return name
            raise ValueError(f"negotiated codec {mime} is not one the server encodes ({', '.join(CODECS)})")
    raise ValueError("the answer has no video codec in common with the offer (the server sends VP8 or H.264)")

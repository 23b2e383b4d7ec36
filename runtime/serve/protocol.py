"""The live-session protocol, version 1: the client's messages and their validation (``parse_message``
raises a ``ProtocolError`` naming the key and the rule), the server's events, the close codes and the
per-client ``Limits``; the tables are in the README, "Live sessions"."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

__all__ = ["PROTOCOL_VERSION", "MAX_BLOCKS", "EVENTS", "ERROR_CODES", "STAGES", "CLOSE_CODES", "Limits",
           "ProtocolError", "Start", "Prompt", "Ack", "Stop", "parse_message", "event", "mse_mime", "CLOSE_NORMAL",
           "CLOSE_GOING_AWAY", "CLOSE_TOO_BIG", "CLOSE_INTERNAL", "CLOSE_BUSY", "CLOSE_BAD_MESSAGES",
           "CLOSE_UNAUTHORIZED", "CLOSE_FORBIDDEN_ORIGIN", "CLOSE_TIMEOUT"]

PROTOCOL_VERSION = 1
MAX_BLOCKS = 2**53 - 1  # the largest block count / index a message may carry (no length-scaled work follows)

# WebSocket close codes (RFC 6455 ones where one fits, 4xxx = this application's)
CLOSE_NORMAL = 1000  # the session ended (done, stopped)
CLOSE_GOING_AWAY = 1001  # the server is shutting down
CLOSE_TOO_BIG = 1009  # a message over max_message_bytes
CLOSE_INTERNAL = 1011  # the server failed
CLOSE_BUSY = 1013  # every session slot is taken: try again later
CLOSE_BAD_MESSAGES = 4400  # too many invalid messages
CLOSE_UNAUTHORIZED = 4401  # missing or wrong token
CLOSE_FORBIDDEN_ORIGIN = 4403  # a page of another origin
CLOSE_TIMEOUT = 4408  # no start in time, or the client stopped reading / acknowledging
CLOSE_CODES = frozenset({CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_TOO_BIG, CLOSE_INTERNAL, CLOSE_BUSY,
                         CLOSE_BAD_MESSAGES, CLOSE_UNAUTHORIZED, CLOSE_FORBIDDEN_ORIGIN, CLOSE_TIMEOUT})

EVENTS = frozenset({"hello", "busy", "started", "init", "block", "prompt_queued", "prompt_applied", "tail", "end",
                    "error", "close"})
# where a session can fail (``stage`` of an "internal" error): building its state, encoding a prompt, the
# DiT's steps, the video decoder, the audio decoder, muxing the block; and the connection's own tasks
STAGES = ("setup", "text", "dit", "vae_video", "vae_audio", "writer", "connection")
ERROR_CODES = {
    # a message refused (fatal only where said); the connection stays open until max_bad_messages
    "bad_message": "binary, or not a JSON object", "bad_json": "not JSON (or nested too deeply)",
    "bad_type": "unknown 'type'", "bad_field": "unknown key, wrong type or out of range",
    "bad_prompt": "empty, too long, NUL or lone surrogate, too many tokens",
    "bad_version": "unsupported 'v' (fatal)", "too_large": "over max_message_bytes (fatal, CLOSE_TOO_BIG)",
    "not_started": "prompt / ack before start", "already_started": "a second start",
    "not_running": "a prompt switch while the session ends", "too_many_prompts": "max_pending_prompts waiting",
    # the connection ends (fatal)
    "unauthorized": "CLOSE_UNAUTHORIZED", "forbidden_origin": "CLOSE_FORBIDDEN_ORIGIN",
    "start_timeout": "CLOSE_TIMEOUT", "client_timeout": "CLOSE_TIMEOUT",
    "internal": "the server failed: 'stage' says where (CLOSE_INTERNAL)",
    "stalled": "no block for block_timeout_s (CLOSE_INTERNAL)", "server_shutdown": "CLOSE_GOING_AWAY",
    "replica_lost": "Ray's proxy: the replica died (CLOSE_INTERNAL)", "unavailable": "Ray's proxy: HTTP error",
}


@dataclass(frozen=True)
class Limits:
    """What one connection may do; sent to the client in ``hello``."""

    max_message_bytes: int = 16 * 1024
    max_prompt_chars: int = 2000
    max_blocks: int | None = None  # None: endless streams allowed
    max_future_audio_frames: int = 30
    max_unacked_blocks: int = 4
    client_timeout_s: float = 30.0  # no ack (or a send that does not complete) for this long: dropped
    start_timeout_s: float = 30.0  # connected without a start message for this long: closed
    max_bad_messages: int = 8  # invalid messages before the connection is closed
    max_pending_prompts: int = 4  # prompt switches queued and not yet applied
    block_timeout_s: float = 300.0  # no block for this long (waits for the client excluded): ended, "stalled"

    def as_dict(self) -> dict:
        return asdict(self)


class ProtocolError(ValueError):
    """An invalid client message: ``code`` names the kind, ``fatal`` ends the connection (``close``)."""

    def __init__(self, code: str, message: str, *, fatal: bool = False, close: int = CLOSE_BAD_MESSAGES):
        super().__init__(message)
        self.code, self.fatal, self.close = code, fatal, close


@dataclass(frozen=True)
class Start:
    prompt: str
    seed: int = 0
    blocks: int | None = None
    future_audio_frames: int | None = None


@dataclass(frozen=True)
class Prompt:
    prompt: str


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Stop:
    pass


_FIELDS = {"start": {"prompt", "seed", "blocks", "future_audio_frames"}, "prompt": {"prompt"}, "ack": {"block"},
           "stop": set()}


def _int(msg: dict, key: str, lo: int, hi: int | None, *, default=None, nullable: bool = False):
    if key not in msg:
        return default
    x = msg[key]
    if x is None and nullable:
        return None
    if isinstance(x, bool) or not isinstance(x, int):
        raise ProtocolError("bad_field", f"{key!r} must be an integer{' or null' if nullable else ''}, "
                                         f"got {type(x).__name__}")
    if x < lo or (hi is not None and x > hi):
        raise ProtocolError("bad_field", f"{key!r} must be in {lo}..{'' if hi is None else hi}, got {x}")
    return x


def _prompt(msg: dict, limits: Limits) -> str:
    p = msg.get("prompt")
    if not isinstance(p, str):
        raise ProtocolError("bad_field", f"'prompt' must be a string, got {type(p).__name__}")
    if not p.strip():
        raise ProtocolError("bad_prompt", "'prompt' is empty")
    if len(p) > limits.max_prompt_chars:
        raise ProtocolError("bad_prompt", f"'prompt' has {len(p)} characters, at most {limits.max_prompt_chars}")
    if "\x00" in p:
        raise ProtocolError("bad_prompt", "'prompt' contains a NUL character")
    try:
        p.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ProtocolError("bad_prompt", f"'prompt' is not valid Unicode: a lone surrogate ({p[e.start]!r} at "
                                          f"character {e.start}); send whole characters (a surrogate pair "
                                          f"\\ud83d\\ude00, or the character itself)") from None
    return p


def parse_message(raw: str | bytes, limits: Limits) -> Start | Prompt | Ack | Stop:
    """Validate one client message (type, size, fields, ranges); raises ``ProtocolError`` saying what is wrong."""
    if isinstance(raw, (bytes, bytearray)):
        raise ProtocolError("bad_message", "binary messages are not accepted: send JSON text")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > limits.max_message_bytes:
        raise ProtocolError("too_large", f"message of {size} bytes, at most {limits.max_message_bytes}",
                            fatal=True, close=CLOSE_TOO_BIG)
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays / objects nested thousands deep
        raise ProtocolError("bad_json", f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_message", f"a message is a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError("bad_type", f"'type' must be one of {sorted(_FIELDS)}, got {kind!r}")
    if msg.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {msg.get('v')!r} is not supported: this server "
                                           f"speaks {PROTOCOL_VERSION}", fatal=True)
    extra = set(msg) - _FIELDS[kind] - {"type", "v"}
    if extra:
        raise ProtocolError("bad_field", f"unknown key(s) {sorted(extra)} in a {kind!r} message; allowed: "
                                         f"{sorted(_FIELDS[kind])}")
    if kind == "start":
        return Start(_prompt(msg, limits), seed=_int(msg, "seed", 0, 2**63 - 1, default=0),
                     blocks=_int(msg, "blocks", 1, min(limits.max_blocks or MAX_BLOCKS, MAX_BLOCKS), nullable=True),
                     future_audio_frames=_int(msg, "future_audio_frames", 0, limits.max_future_audio_frames,
                                              nullable=True))
    if kind == "prompt":
        return Prompt(_prompt(msg, limits))
    if kind == "ack":
        if "block" not in msg:
            raise ProtocolError("bad_field", "an 'ack' needs 'block'")
        return Ack(_int(msg, "block", 0, MAX_BLOCKS))
    return Stop()


def event(kind: str, **fields) -> dict:
    return {"type": kind, "v": PROTOCOL_VERSION, **fields}


def mse_mime(init: bytes) -> str:
    """The MediaSource type of our init segment: H.264 profile/level from its avcC box, AAC-LC audio."""
    i = init.find(b"avcC")
    if i < 0 or len(init) < i + 8:
        raise ValueError("the init segment has no avcC box (not an H.264 fMP4)")
    profile, compat, level = init[i + 5], init[i + 6], init[i + 7]  # after configurationVersion
    return f'video/mp4; codecs="avc1.{profile:02x}{compat:02x}{level:02x}, mp4a.40.2"'

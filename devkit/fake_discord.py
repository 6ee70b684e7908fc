"""A protocol-level fake Discord: REST API v10 and the gateway, on 127.0.0.1.

The real discord.py client (or any correct Discord client) talks to it over HTTP
and a WebSocket exactly as it would talk to discord.com, so bot tests exercise the
bot's real Discord code. The fake also *enforces* what Discord enforces (2000-char
content, empty messages, editing others' messages, per-route rate limits with 429s,
the 3-second interaction deadline, single acknowledgement) and records every
violation, so a test fails where real Discord would have said no.

Harness API
-----------
Ids returned by the harness are ``int`` (as discord.py uses them); message and
interaction dicts are Discord JSON (ids are strings). Every method that takes an
id accepts ``int`` or ``str``.

    fake = FakeDiscord()              # rate_limit=(5, 5.0), strict=True, interaction_deadline=3.0
    await fake.start()                # binds 127.0.0.1:0
    fake.api_base                     # "http://127.0.0.1:PORT/api/v10"  -> discord.http.Route.BASE
    fake.gateway_url                  # "ws://127.0.0.1:PORT/gateway"     -> DiscordWebSocket.DEFAULT_GATEWAY
    fake.token                        # the only bot token accepted (others: 401 / close 4004)
    fake.bot_user, fake.bot_id, fake.application_id
    fake.patch_discord_py()           # optional: points discord.py at the fake; stop() restores

    guild = fake.add_guild("Test")                       # also creates @everyone (id == guild id)
    role = fake.add_role(guild, "Trusted", permissions=0) # 8 = administrator
    chan = fake.add_channel(guild, "general")
    user = fake.add_user("alice"); fake.add_member(guild, user, roles=[role])
    thread = fake.add_thread(chan, "topic", owner=user)
    dm = fake.dm_channel(user)

    # acting as users: each dispatches the gateway event(s) Discord would
    msg = await fake.post_message(chan, user, f"hi <@{fake.bot_id}>")   # mentions parsed from content
    msg = await fake.post_message(chan, user, "more", reply_to=msg["id"], files={"a.txt": b"..."})
    await fake.add_reaction(chan, msg["id"], user, "👎"); await fake.remove_reaction(chan, msg["id"], user, "👎")
    it = await fake.slash_command(chan, user, "ask", options={"question": "why?"})   # "group sub" names work
    it = await fake.context_menu(chan, user, "Suggest correction", target_message=msg["id"])
    it2 = await fake.submit_modal(it, user, {"<text input custom_id>": "value"})
    it3 = await fake.click_button(chan, msg["id"], user, "custom-id")
    it4 = await fake.select_option(chan, msg["id"], user, "custom-id", ["value"])
    await it.wait_response(timeout=10)  # -> {"type": ..., "data": ...}; also it.response, it.modal,
                                        #    it.followups (message dicts), it.original (@original message)

    # inspecting
    fake.messages(chan)        # current messages, oldest first, each with "edits": every content version
    fake.message(msg_id)       # one message dict (also deleted ones; "deleted": True then)
    fake.attachment_bytes(att) # bytes of an attachment dict (or its id)
    await fake.wait_for(lambda: len(fake.messages(chan)) > 1, timeout=10.0)
    fake.rejections            # [{method, path, status, code, reason}] for every 4xx Discord would send
    fake.rate_limited          # how many 429s were answered
    fake.unhandled             # [{method, path}] routes the fake does not implement (404)
    fake.typing                # [(channel_id, time)]
    fake.commands              # registered application commands; guild ones carry "guild_id"
    fake.presence              # last op 3 presence update
    fake.requests              # [(method, path, status)] for every REST call
    fake.reactions(msg_id)     # {emoji: [user ids]} currently reacting
    fake.permissions(guild, user)                      # effective guild permissions (int)
    fake.set_role_permissions(guild, role, perms)      # @everyone's role id is the guild id
    fake.set_member_roles(guild, user, [role]); await fake.edit_user_message(msg_id, "new text")
    fake.connected             # a gateway session has a live socket
    await fake.request_reconnect()                  # op 7 RECONNECT
    await fake.disconnect_gateway()                 # the client should RESUME
    await fake.disconnect_gateway(resumable=False)  # the next RESUME gets op 9
    await fake.stop()

Example (a test)::

    async def test_reply(fake):
        client = discord.Client(intents=discord.Intents.all(), guild_ready_timeout=0.05)
        discord.http.Route.BASE = fake.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)
        ... client.event(on_message) ...; task = asyncio.create_task(client.start(fake.token))
        await fake.post_message(chan, user, "ping")
        await fake.wait_for(lambda: any(m["content"] == "pong" for m in fake.messages(chan)))

``strict=False`` keeps recording violations in ``rejections`` but lets the
requests through (for benchmarks that only want the numbers).

What is enforced (all recorded in ``rejections`` unless noted): content over
2000 chars (400 50035 BASE_TYPE_MAX_LENGTH), empty messages (400 50006),
editing another user's message (403 50005), unknown channel/message (404
10003/10008), missing bot permissions from its roles (403 50013: view+send,
send in threads, attach files, add reactions, create threads), a reply to an
unknown message, invalid JSON (50109), rate limits (429 counted in
``rate_limited``; sends and edits share one bucket per channel, webhook writes
one per interaction token, other routes 50/s), interaction callbacks after the
deadline (404 10062) or twice (400 40060), followups before the first response
(404 10015), invalid modals and command payloads (50035). Gateway: bad token
4004, ops before IDENTIFY 4003, second IDENTIFY 4005, bad JSON 4002; events are
filtered by the session's intents and message content is blanked without the
MESSAGE_CONTENT intent (except DMs, mentions of the bot and its own messages).
Messages that discord.py sends are dispatched back as MESSAGE_CREATE/UPDATE
(ephemeral ones are not, as on Discord); the first followup after a "thinking"
defer fills the deferred message, as on Discord.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import itertools
import json
import math
import re
import secrets
import time
import urllib.parse
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Optional, Union

from aiohttp import WSMsgType, web

Id = Union[int, str]

DISCORD_EPOCH_MS = 1420070400000
API_VERSION = 10
MAX_CONTENT_LENGTH = 2000
MAX_EMBEDS = 10
MAX_EMBED_DESCRIPTION = 4096
MAX_COMPONENT_ROWS = 5
MAX_MODAL_TITLE = 45
ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024  # a non-boosted guild's upload limit
HEARTBEAT_INTERVAL_MS = 41250
INTERACTION_DEADLINE_S = 3.0
DEFAULT_RATE_LIMIT = (5, 5.0)  # message sends/edits per channel, as Discord
OTHER_RATE_LIMIT = (50, 1.0)  # everything else (Discord's global limit)
MAX_HISTORY_LIMIT = 100
SESSION_LOG_LIMIT = 10000  # dispatched frames kept per session for RESUME replay

# Message flags
FLAG_SUPPRESS_EMBEDS = 1 << 2
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

# Gateway intents
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_GUILD_MESSAGE_REACTIONS = 1 << 10
INTENT_GUILD_MESSAGE_TYPING = 1 << 11
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_DIRECT_MESSAGE_REACTIONS = 1 << 13
INTENT_MESSAGE_CONTENT = 1 << 15

# Permissions
PERM_ADMINISTRATOR = 1 << 3
PERM_ADD_REACTIONS = 1 << 6
PERM_VIEW_CHANNEL = 1 << 10
PERM_SEND_MESSAGES = 1 << 11
PERM_MANAGE_MESSAGES = 1 << 13
PERM_ATTACH_FILES = 1 << 15
PERM_CREATE_PUBLIC_THREADS = 1 << 35
PERM_SEND_MESSAGES_IN_THREADS = 1 << 38
ALL_PERMISSIONS = (1 << 51) - 1
# What a fresh guild's @everyone may do (view, send, embed, attach, history,
# react, use application commands, public threads, send in threads).
DEFAULT_EVERYONE_PERMISSIONS = (
    (1 << 6) | (1 << 10) | (1 << 11) | (1 << 14) | (1 << 15) | (1 << 16) | (1 << 31) | (1 << 35) | (1 << 38)
)

# Channel types
CHANNEL_TEXT = 0
CHANNEL_DM = 1
CHANNEL_PUBLIC_THREAD = 11
CHANNEL_PRIVATE_THREAD = 12
THREAD_TYPES = (10, CHANNEL_PUBLIC_THREAD, CHANNEL_PRIVATE_THREAD)

# Interaction types and callback types
IT_PING, IT_COMMAND, IT_COMPONENT, IT_AUTOCOMPLETE, IT_MODAL_SUBMIT = 1, 2, 3, 4, 5
CB_MESSAGE, CB_DEFERRED_MESSAGE, CB_DEFERRED_UPDATE, CB_UPDATE, CB_AUTOCOMPLETE, CB_MODAL = 4, 5, 6, 7, 8, 9

# Discord JSON error codes
E_GENERAL = 0
E_UNKNOWN_CHANNEL = 10003
E_UNKNOWN_GUILD = 10004
E_UNKNOWN_MEMBER = 10007
E_UNKNOWN_MESSAGE = 10008
E_UNKNOWN_WEBHOOK = 10015
E_UNKNOWN_USER = 10013
E_UNKNOWN_EMOJI = 10014
E_UNKNOWN_INTERACTION = 10062
E_UNKNOWN_APPLICATION = 10002
E_ENTITY_TOO_LARGE = 40005
E_ALREADY_ACKNOWLEDGED = 40060
E_MISSING_ACCESS = 50001
E_EDIT_OTHERS_MESSAGE = 50005
E_EMPTY_MESSAGE = 50006
E_MISSING_PERMISSIONS = 50013
E_INVALID_FORM_BODY = 50035
E_INVALID_JSON = 50109

MessageDict = dict[str, Any]
# The REST request being handled (each aiohttp handler runs in its own task/context).
_current_request: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("fake_discord_request", default=("-", "-"))


class FakeDiscordError(Exception):
    """A harness misuse (acting as a user in a way the Discord client would not allow)."""


class ApiError(Exception):
    """An error the fake answers with Discord's error JSON."""

    def __init__(self, status: int, code: int, message: str, errors: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.errors = status, code, message, errors

    def body(self) -> dict:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors is not None:
            body["errors"] = self.errors
        return body


def form_error(field_path: str, code: str, message: str) -> ApiError:
    """Discord's 50035 'Invalid Form Body' with one nested field error (dots = nesting)."""
    errors: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(field_path.split(".")):
        errors = {part: errors}
    return ApiError(400, E_INVALID_FORM_BODY, "Invalid Form Body", errors)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def sid(value: Id) -> str:
    """Normalise an id to Discord's string form."""
    return str(int(value))


# --------------------------------------------------------------------------- pure helpers


class Snowflakes:
    """Monotonic Discord snowflakes (timestamp << 22 | increment)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        candidate = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        self._last = max(candidate, self._last + 1)
        return self._last


def parse_mentions(content: str) -> list[str]:
    """User ids mentioned as <@id> or <@!id>, in order, without duplicates."""
    seen: list[str] = []
    for m in re.finditer(r"<@!?(\d+)>", content):
        if m.group(1) not in seen:
            seen.append(m.group(1))
    return seen


def emoji_from_url(raw: str) -> dict:
    """Emoji dict from the URL form discord.py uses: a unicode emoji or name:id."""
    text = urllib.parse.unquote(raw)
    if ":" in text:
        name, _, eid = text.rpartition(":")
        animated = name.startswith("a:")
        return {"id": eid, "name": name[2:] if animated else name, **({"animated": True} if animated else {})}
    return {"id": None, "name": text}


def emoji_key(emoji: dict) -> str:
    return emoji["id"] or emoji["name"]


def walk_components(components: list[dict]):
    """Every component in a (possibly nested, Components V2) tree."""
    for comp in components or []:
        yield comp
        yield from walk_components(comp.get("components") or [])
        for key in ("accessory", "component"):
            if isinstance(comp.get(key), dict):
                yield from walk_components([comp[key]])


def validate_message_payload(payload: dict, *, creating: bool, has_files: bool) -> None:
    """Raise ApiError for what Discord rejects in a message create/edit body."""
    content = payload.get("content")
    if content is not None and not isinstance(content, str):
        raise form_error("content", "STRING_TYPE_CONVERT", "Could not interpret value as string.")
    if content is not None and len(content) > MAX_CONTENT_LENGTH:
        raise form_error(
            "content", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_CONTENT_LENGTH} or fewer in length."
        )
    embeds = payload.get("embeds") or []
    if len(embeds) > MAX_EMBEDS:
        raise form_error("embeds", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBEDS} or fewer in length.")
    for i, embed in enumerate(embeds):
        if len(embed.get("description") or "") > MAX_EMBED_DESCRIPTION:
            raise form_error(
                f"embeds.{i}.description", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_EMBED_DESCRIPTION} or fewer in length."
            )
    components = payload.get("components") or []
    flags = int(payload.get("flags") or 0)
    if len(components) > MAX_COMPONENT_ROWS and not flags & (1 << 15):  # IS_COMPONENTS_V2 allows more
        raise form_error("components", "BASE_TYPE_MAX_LENGTH", f"Must be {MAX_COMPONENT_ROWS} or fewer in length.")
    for comp in walk_components(components):
        cid = comp.get("custom_id")
        if cid is not None and not (1 <= len(cid) <= 100):
            raise form_error("components", "BASE_TYPE_BAD_LENGTH", "custom_id must be between 1 and 100 in length.")
    if creating and not (content or embeds or components or has_files or payload.get("sticker_ids") or payload.get("poll")):
        raise ApiError(400, E_EMPTY_MESSAGE, "Cannot send an empty message")


def validate_modal(data: dict) -> None:
    if not data.get("custom_id"):
        raise form_error("data.custom_id", "BASE_TYPE_REQUIRED", "This field is required")
    title = data.get("title") or ""
    if not 1 <= len(title) <= MAX_MODAL_TITLE:
        raise form_error("data.title", "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_MODAL_TITLE} in length.")
    if not 1 <= len(data.get("components") or []) <= 5:
        raise form_error("data.components", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 5 in length.")


def modal_submit_components(components: list[dict], values: dict[str, Any], used: set[str]) -> list[dict]:
    """The `data.components` Discord sends for a submitted modal, mirroring its layout.

    Action rows stay action rows (legacy layout); label components (type 18) carry
    their single `component` (the layout discord.py 2.6+ emits for ui.Label).
    """
    out: list[dict] = []
    for comp in components:
        kind = comp.get("type")
        base = {"type": kind, "id": comp.get("id")}
        if kind == 1:
            out.append({**base, "components": modal_submit_components(comp.get("components") or [], values, used)})
        elif kind == 18:
            out.append({**base, "component": modal_submit_components([comp["component"]], values, used)[0]})
        elif kind == 4:
            out.append({**base, "custom_id": comp["custom_id"], "value": text_input_value(comp, values, used)})
        elif kind in (3, 5, 6, 7, 8):
            chosen = values.get(comp["custom_id"], [])
            used.add(comp["custom_id"])
            out.append({**base, "custom_id": comp["custom_id"], "values": [str(v) for v in chosen]})
        elif kind == 10:
            out.append(base)
    return out


def text_input_value(comp: dict, values: dict[str, Any], used: set[str]) -> str:
    cid = comp["custom_id"]
    used.add(cid)
    value = str(values.get(cid, comp.get("value") or ""))
    if comp.get("required", True) and not value:
        raise FakeDiscordError(f"text input {cid!r} is required; Discord's client would not submit the modal")
    if len(value) > int(comp.get("max_length") or 4000) or (value and len(value) < int(comp.get("min_length") or 0)):
        raise FakeDiscordError(f"text input {cid!r}: value length {len(value)} outside min/max the modal set")
    return value


def assign_component_ids(components: list[dict]) -> None:
    """Discord numbers every component that has no `id`."""
    counter = itertools.count(1)
    for comp in walk_components(components):
        comp.setdefault("id", next(counter))


# --------------------------------------------------------------------------- rate limits


@dataclass
class Bucket:
    limit: int
    per: float
    remaining: int
    reset_at: float  # monotonic
    name: str


class RateLimiter:
    """Fixed-window buckets with Discord's headers."""

    def __init__(self) -> None:
        self._buckets: dict[tuple, Bucket] = {}

    def take(self, key: tuple, limit: int, per: float, name: str) -> tuple[bool, Bucket]:
        now = time.monotonic()
        b = self._buckets.get(key)
        if b is None or now >= b.reset_at:
            b = self._buckets[key] = Bucket(limit, per, limit, now + per, name)
        if b.remaining <= 0:
            return False, b
        b.remaining -= 1
        return True, b

    @staticmethod
    def headers(b: Bucket) -> dict[str, str]:
        reset_after = max(0.0, b.reset_at - time.monotonic())
        # Round up to the millisecond so a client that sleeps exactly this long is not early.
        reset_after = math.ceil(reset_after * 1000) / 1000
        return {
            "X-RateLimit-Limit": str(b.limit),
            "X-RateLimit-Remaining": str(max(b.remaining, 0)),
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": b.name,
        }


# --------------------------------------------------------------------------- gateway sessions


class Session:
    """One identified gateway session; keeps its dispatched frames for RESUME."""

    def __init__(self, session_id: str, intents: int):
        self.id = session_id
        self.intents = intents
        self.seq = 0
        self.log: list[dict] = []
        self.ws: Optional[web.WebSocketResponse] = None
        self.compressor = None
        self.lock = asyncio.Lock()

    async def send_dispatch(self, event: str, data: dict) -> None:
        async with self.lock:
            self.seq += 1
            frame = {"op": 0, "t": event, "s": self.seq, "d": data}
            self.log.append(frame)
            if len(self.log) > SESSION_LOG_LIMIT:
                del self.log[: len(self.log) - SESSION_LOG_LIMIT]
            await send_frame(self.ws, self.compressor, frame)


async def send_frame(ws: Optional[web.WebSocketResponse], compressor, frame: dict) -> None:
    if ws is None or ws.closed:
        return
    text = json.dumps(frame)
    try:
        if compressor is not None:
            # zlib-stream: one shared context, each frame ends with a sync flush (00 00 ff ff).
            await ws.send_bytes(compressor.compress(text.encode()) + compressor.flush(zlib.Z_SYNC_FLUSH))
        else:
            await ws.send_str(text)
    except (ConnectionError, RuntimeError):
        pass  # the frame stays in the session log; a RESUME replays it


# --------------------------------------------------------------------------- interactions


class FakeInteraction:
    """An interaction the fake created as a user, and what the bot answered."""

    def __init__(self, fake: "FakeDiscord", payload: dict):
        self._fake = fake
        self.payload = payload
        self.id: str = payload["id"]
        self.token: str = payload["token"]
        self.type: int = payload["type"]
        self.channel_id: str = payload["channel_id"]
        self.created = time.monotonic()
        self.response: Optional[dict] = None
        self.modal: Optional[dict] = None
        self.followups: list[MessageDict] = []
        self.late = False
        self.original_id: Optional[str] = None
        self._responded = asyncio.Event()

    @property
    def original(self) -> Optional[MessageDict]:
        """The @original message (current state), if the response created or targets one."""
        return self._fake._msgs.get(self.original_id) if self.original_id else None

    @property
    def component_message_id(self) -> Optional[str]:
        message = self.payload.get("message")
        return message["id"] if message else None

    async def wait_response(self, timeout: float = 10.0) -> dict:
        try:
            await asyncio.wait_for(self._responded.wait(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the bot did not respond to interaction {self.id} within {timeout}s") from None
        assert self.response is not None
        return self.response

    async def wait_followups(self, count: int = 1, timeout: float = 10.0) -> list[MessageDict]:
        await self._fake.wait_for(lambda: len(self.followups) >= count, timeout=timeout)
        return self.followups

    def __repr__(self) -> str:
        return f"<FakeInteraction id={self.id} type={self.type} response={self.response and self.response['type']}>"


# --------------------------------------------------------------------------- the request wrapper


@dataclass
class Req:
    method: str
    path: str
    params: dict
    query: Any
    payload: Any = None
    files: list = field(default_factory=list)  # [(index, filename, bytes, content_type)]


Handler = Callable[[Req], Awaitable[tuple[int, Any]]]


# --------------------------------------------------------------------------- the fake


class FakeDiscord:
    """Discord's REST v10 + gateway, in-process, for tests. See the module docstring."""

    def __init__(
        self,
        *,
        rate_limit: tuple[int, float] = DEFAULT_RATE_LIMIT,
        strict: bool = True,
        interaction_deadline: float = INTERACTION_DEADLINE_S,
        bot_name: str = "loopcord",
        heartbeat_interval_ms: int = HEARTBEAT_INTERVAL_MS,
    ):
        self.rate_limit = rate_limit
        self.strict = strict
        self.interaction_deadline = interaction_deadline
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self._ids = Snowflakes()
        self.bot_id = self._ids.next()
        self.application_id = self.bot_id  # modern apps: the bot user id is the application id
        self.token = self._make_token()
        self.bot_user = self._user_dict(self.bot_id, bot_name, bot=True)
        self._users: dict[str, dict] = {sid(self.bot_id): self.bot_user}
        self.owner_id = self.add_user("owner")  # the application owner (discord.py's is_owner)
        self.application_flags = (1 << 12) | (1 << 14) | (1 << 18)  # intent flags: members, presence, content
        self.application_description = ""

        self.rejections: list[dict] = []
        self.unhandled: list[dict] = []
        self.rate_limited = 0
        self.typing: list[tuple[int, float]] = []
        self.commands: list[dict] = []
        self.presence: Optional[dict] = None
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) for every REST call

        self._guilds: dict[str, dict] = {}
        self._roles: dict[str, dict[str, dict]] = {}  # guild -> role id -> role
        self._members: dict[str, dict[str, dict]] = {}  # guild -> user id -> member (no user)
        self._channels: dict[str, dict] = {}
        self._channel_msgs: dict[str, list[str]] = {}
        self._msgs: dict[str, MessageDict] = {}
        self._reactors: dict[str, dict[str, list[str]]] = {}  # message -> emoji key -> user ids
        self._dms: dict[str, str] = {}  # user -> dm channel
        self._files: dict[str, bytes] = {}
        self._interactions: dict[str, FakeInteraction] = {}
        self._sessions: dict[str, Session] = {}
        self._sockets: set[web.WebSocketResponse] = set()
        self._limiter = RateLimiter()
        self._tasks: set[asyncio.Task] = set()
        self._runner: Optional[web.AppRunner] = None
        self._patched: Optional[tuple] = None
        self.port = 0
        self._routes = self._route_table()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> "FakeDiscord":
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/attachments/{att_id}/{filename}", self._serve_attachment)
        app.router.add_route("*", "/api/v{version:\\d+}/{tail:.*}", self._rest)
        app.router.add_route("*", "/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)
        for task in list(self._tasks):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._restore_discord_py()

    async def __aenter__(self) -> "FakeDiscord":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v{API_VERSION}"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def patch_discord_py(self) -> None:
        """Point discord.py's Route.BASE and DEFAULT_GATEWAY at this fake (undone by stop())."""
        import discord.gateway
        import discord.http
        import yarl

        if self._patched is None:
            self._patched = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        discord.http.Route.BASE = self.api_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(self.gateway_url)

    def _restore_discord_py(self) -> None:
        if self._patched is None:
            return
        import discord.gateway
        import discord.http

        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._patched
        self._patched = None

    def _make_token(self) -> str:
        head = base64.urlsafe_b64encode(str(self.bot_id).encode()).decode().rstrip("=")
        return f"{head}.{secrets.token_urlsafe(4)}.{secrets.token_urlsafe(27)}"

    def _spawn(self, coro) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()  # no loop yet: nobody is connected, nothing to dispatch
            return
        task = loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ world building

    def _user_dict(self, uid: int, name: str, *, bot: bool = False) -> dict:
        return {
            "id": sid(uid), "username": name, "discriminator": "0", "global_name": None if bot else name.title(),
            "avatar": None, "bot": bot, "system": False, "flags": 0, "public_flags": 0,
            "banner": None, "accent_color": None, "avatar_decoration_data": None,
            **({"verified": True, "mfa_enabled": False, "email": None, "locale": "en-US"} if bot else {}),
        }

    def add_user(self, name: str, *, bot: bool = False) -> int:
        uid = self._ids.next()
        self._users[sid(uid)] = self._user_dict(uid, name, bot=bot)
        return uid

    def user(self, user_id: Id) -> dict:
        try:
            return self._users[sid(user_id)]
        except KeyError:
            raise FakeDiscordError(f"unknown user {user_id}; create it with add_user()") from None

    def add_guild(self, name: str, *, owner: Optional[Id] = None, everyone_permissions: int = DEFAULT_EVERYONE_PERMISSIONS) -> int:
        gid = self._ids.next()
        g = sid(gid)
        self._guilds[g] = {
            "id": g, "name": name, "icon": None, "splash": None, "discovery_splash": None, "banner": None,
            "owner_id": sid(owner or self.owner_id), "afk_channel_id": None, "afk_timeout": 300,
            "verification_level": 0, "default_message_notifications": 0, "explicit_content_filter": 0,
            "emojis": [], "stickers": [], "features": [], "mfa_level": 0, "application_id": None,
            "system_channel_id": None, "system_channel_flags": 0, "rules_channel_id": None,
            "vanity_url_code": None, "description": None, "premium_tier": 0, "premium_subscription_count": 0,
            "preferred_locale": "en-US", "public_updates_channel_id": None, "nsfw_level": 0,
            "premium_progress_bar_enabled": False, "max_members": 500000, "max_video_channel_users": 25,
            "safety_alerts_channel_id": None, "incidents_data": None,
        }
        self._roles[g] = {g: self._role_dict(g, "@everyone", everyone_permissions, position=0)}
        self._members[g] = {}
        self.add_member(gid, self.bot_id)
        if owner is None:
            self.add_member(gid, self.owner_id)
        self._after_ready(lambda s: ("GUILD_CREATE", self._guild_create(g)), INTENT_GUILDS)
        return gid

    def _role_dict(self, rid: str, name: str, permissions: int, *, position: int) -> dict:
        return {
            "id": rid, "name": name, "color": 0, "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False, "icon": None, "unicode_emoji": None, "position": position,
            "permissions": str(permissions), "managed": False, "mentionable": False, "flags": 0,
        }

    def add_role(self, guild: Id, name: str, permissions: int = 0) -> int:
        g = self._guild_id(guild)
        rid = self._ids.next()
        role = self._role_dict(sid(rid), name, permissions, position=len(self._roles[g]))
        self._roles[g][sid(rid)] = role
        self._after_ready(lambda s: ("GUILD_ROLE_CREATE", {"guild_id": g, "role": role}), INTENT_GUILDS)
        return rid

    def set_role_permissions(self, guild: Id, role: Id, permissions: int) -> None:
        """Change a role's permissions (the @everyone role's id is the guild id)."""
        g = self._guild_id(guild)
        role_dict = self._roles[g][sid(role)]
        role_dict["permissions"] = str(permissions)
        self._after_ready(lambda s: ("GUILD_ROLE_UPDATE", {"guild_id": g, "role": role_dict}), INTENT_GUILDS)

    def add_member(self, guild: Id, user: Id, roles: Optional[list[Id]] = None, *, nick: Optional[str] = None) -> dict:
        g, u = self._guild_id(guild), sid(user)
        self.user(u)
        for r in roles or []:
            if sid(r) not in self._roles[g]:
                raise FakeDiscordError(f"role {r} is not in guild {g}")
        member = {
            "roles": [sid(r) for r in roles or []], "nick": nick, "avatar": None, "banner": None,
            "joined_at": now_iso(), "premium_since": None, "deaf": False, "mute": False, "flags": 0,
            "pending": False, "communication_disabled_until": None,
        }
        self._members[g][u] = member
        self._after_ready(lambda s: ("GUILD_MEMBER_ADD", {**self._member_with_user(g, u), "guild_id": g}), INTENT_GUILD_MEMBERS)
        return member

    def set_member_roles(self, guild: Id, user: Id, roles: list[Id]) -> None:
        g, u = self._guild_id(guild), sid(user)
        self._members[g][u]["roles"] = [sid(r) for r in roles]
        self._after_ready(lambda s: ("GUILD_MEMBER_UPDATE", {**self._member_with_user(g, u), "guild_id": g}), INTENT_GUILD_MEMBERS)

    def add_channel(self, guild: Id, name: str, *, topic: Optional[str] = None) -> int:
        g = self._guild_id(guild)
        cid = self._ids.next()
        chan = {
            "id": sid(cid), "type": CHANNEL_TEXT, "guild_id": g, "name": name, "position": len(self._guild_channels(g)),
            "permission_overwrites": [], "topic": topic, "nsfw": False, "last_message_id": None,
            "rate_limit_per_user": 0, "parent_id": None, "flags": 0, "default_thread_rate_limit_per_user": 0,
        }
        self._channels[sid(cid)] = chan
        self._channel_msgs[sid(cid)] = []
        self._after_ready(lambda s: ("CHANNEL_CREATE", chan), INTENT_GUILDS)
        return cid

    def add_thread(self, channel: Id, name: str, *, owner: Optional[Id] = None, private: bool = False,
                   thread_id: Optional[Id] = None) -> int:
        parent = self._channel(channel)
        tid = int(thread_id) if thread_id is not None else self._ids.next()
        thread = {
            "id": sid(tid), "type": CHANNEL_PRIVATE_THREAD if private else CHANNEL_PUBLIC_THREAD,
            "guild_id": parent["guild_id"], "parent_id": parent["id"], "owner_id": sid(owner or self.bot_id),
            "name": name, "last_message_id": None, "message_count": 0, "member_count": 1, "total_message_sent": 0,
            "rate_limit_per_user": 0, "flags": 0, "applied_tags": [],
            "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": now_iso(),
                                "locked": False, "create_timestamp": now_iso(), "invitable": True},
        }
        self._channels[sid(tid)] = thread
        self._channel_msgs[sid(tid)] = []
        self._after_ready(lambda s: ("THREAD_CREATE", {**thread, "newly_created": True}), INTENT_GUILDS)
        return tid

    def dm_channel(self, user: Id) -> int:
        u = sid(user)
        if u not in self._dms:
            cid = sid(self._ids.next())
            self._channels[cid] = {"id": cid, "type": CHANNEL_DM, "last_message_id": None,
                                   "recipients": [self.user(u)], "flags": 0}
            self._channel_msgs[cid] = []
            self._dms[u] = cid
        return int(self._dms[u])

    # ------------------------------------------------------------------ lookups

    def _guild_id(self, guild: Id) -> str:
        g = sid(guild)
        if g not in self._guilds:
            raise FakeDiscordError(f"unknown guild {guild}; create it with add_guild()")
        return g

    def _channel(self, channel: Id) -> dict:
        try:
            return self._channels[sid(channel)]
        except KeyError:
            raise FakeDiscordError(f"unknown channel {channel}") from None

    def _guild_channels(self, g: str) -> list[dict]:
        return [c for c in self._channels.values() if c.get("guild_id") == g and c["type"] not in THREAD_TYPES]

    def _guild_threads(self, g: str) -> list[dict]:
        return [c for c in self._channels.values() if c.get("guild_id") == g and c["type"] in THREAD_TYPES]

    def _member_with_user(self, g: str, u: str) -> dict:
        return {**self._members[g][u], "user": self._users[u]}

    def permissions(self, guild: Id, user: Id) -> int:
        """A member's guild-level permissions (roles OR'd; administrator and owner get all)."""
        g, u = self._guild_id(guild), sid(user)
        if self._guilds[g]["owner_id"] == u:
            return ALL_PERMISSIONS
        member = self._members[g].get(u)
        perms = int(self._roles[g][g]["permissions"])
        for r in (member or {}).get("roles", []):
            perms |= int(self._roles[g][r]["permissions"])
        return ALL_PERMISSIONS if perms & PERM_ADMINISTRATOR else perms

    def messages(self, channel: Id) -> list[MessageDict]:
        """Current messages in a channel, oldest first (ephemeral ones included, deleted ones not)."""
        return [self._msgs[m] for m in self._channel_msgs.get(sid(channel), []) if not self._msgs[m].get("deleted")]

    def message(self, message_id: Id) -> MessageDict:
        try:
            return self._msgs[sid(message_id)]
        except KeyError:
            raise FakeDiscordError(f"unknown message {message_id}") from None

    def attachment_bytes(self, attachment: Union[dict, Id]) -> bytes:
        att_id = attachment["id"] if isinstance(attachment, dict) else sid(attachment)
        return self._files[att_id]

    def interaction(self, interaction_id: Id) -> FakeInteraction:
        return self._interactions[sid(interaction_id)]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
        """Poll `predicate` until it returns something truthy; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"condition not met within {timeout}s; rejections={self.rejections[-3:]} unhandled={self.unhandled[-3:]}"
                )
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ payload builders

    def _guild_create(self, g: str) -> dict:
        members = [self._member_with_user(g, u) for u in self._members[g]]
        bot_member = self._members[g].get(sid(self.bot_id), {})
        return {
            **self._guilds[g], "unavailable": False, "large": False, "member_count": len(members),
            "joined_at": bot_member.get("joined_at", now_iso()), "roles": list(self._roles[g].values()),
            "members": members, "channels": [{k: v for k, v in c.items() if k != "guild_id"} for c in self._guild_channels(g)],
            "threads": self._guild_threads(g), "presences": [], "voice_states": [], "stage_instances": [],
            "guild_scheduled_events": [], "soundboard_sounds": [], "embedded_activities": [],
        }

    def _author_fields(self, channel: dict, user_id: str) -> dict:
        fields: dict[str, Any] = {"author": self._users[user_id]}
        g = channel.get("guild_id")
        if g and user_id in self._members.get(g, {}):
            fields["member"] = self._members[g][user_id]
        return fields

    def _mention_list(self, channel: dict, ids: list[str]) -> list[dict]:
        g = channel.get("guild_id")
        out = []
        for u in ids:
            if u not in self._users:
                continue
            entry = dict(self._users[u])
            if g and u in self._members.get(g, {}):
                entry["member"] = self._members[g][u]
            out.append(entry)
        return out

    def _new_message(self, channel: dict, author_id: str, payload: dict, attachments: list[dict], *,
                     msg_type: int = 0, extra: Optional[dict] = None) -> MessageDict:
        mid = sid(self._ids.next())
        content = payload.get("content") or ""
        mentions = payload.get("mentions")
        if mentions is None:
            mentions = parse_mentions(content)
        msg: MessageDict = {
            "id": mid, "channel_id": channel["id"], "type": msg_type, "content": content,
            "timestamp": now_iso(), "edited_timestamp": None, "tts": bool(payload.get("tts")),
            "mention_everyone": False, "mentions": self._mention_list(channel, [sid(m) for m in mentions]),
            "mention_roles": re.findall(r"<@&(\d+)>", content), "mention_channels": [], "attachments": attachments,
            "embeds": payload.get("embeds") or [], "reactions": [], "pinned": False,
            "flags": int(payload.get("flags") or 0), "components": payload.get("components") or [],
            "nonce": payload.get("nonce"), "sticker_items": [], "position": 0,
            **self._author_fields(channel, author_id), **(extra or {}),
        }
        if channel.get("guild_id"):
            msg["guild_id"] = channel["guild_id"]
        ref = payload.get("message_reference")
        if ref and ref.get("message_id"):
            target = self._msgs.get(sid(ref["message_id"]))
            if target is None or target.get("deleted"):
                if ref.get("fail_if_not_exists", True):
                    raise form_error("message_reference", "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
            else:
                msg["type"] = 19 if msg_type == 0 else msg_type
                msg["message_reference"] = {"type": 0, "message_id": target["id"], "channel_id": target["channel_id"],
                                            **({"guild_id": target["guild_id"]} if target.get("guild_id") else {})}
                msg["referenced_message"] = self.wire(target)
        msg["edits"] = [content]
        self._msgs[mid] = msg
        self._channel_msgs.setdefault(channel["id"], []).append(mid)
        if not msg["flags"] & FLAG_EPHEMERAL:
            channel["last_message_id"] = mid
            if channel["type"] in THREAD_TYPES:
                channel["message_count"] = channel.get("message_count", 0) + 1
        return msg

    @staticmethod
    def wire(msg: MessageDict) -> MessageDict:
        """A stored message as Discord sends it (without the fake's bookkeeping keys)."""
        return {k: v for k, v in msg.items() if k not in ("edits", "deleted")}

    def _attachments(self, payload: dict, files: list) -> list[dict]:
        """Attachment objects for uploaded files[n] parts, named by payload_json's `attachments`."""
        described = {str(a.get("id")): a for a in payload.get("attachments") or [] if isinstance(a, dict)}
        out = []
        for index, filename, data, ctype in files:
            if len(data) > ATTACHMENT_SIZE_LIMIT:
                raise ApiError(413, E_ENTITY_TOO_LARGE, "Request entity too large")
            meta = described.get(str(index), {})
            att_id = sid(self._ids.next())
            name = meta.get("filename") or filename or f"file{index}"
            self._files[att_id] = data
            url = f"{self.base_url}/attachments/{att_id}/{urllib.parse.quote(name)}"
            att = {"id": att_id, "filename": name, "size": len(data), "url": url, "proxy_url": url,
                   "content_type": ctype or "application/octet-stream", "ephemeral": False}
            if meta.get("description"):
                att["description"] = meta["description"]
            if ctype and ctype.startswith("image/"):
                att.update(height=None, width=None)
            out.append(att)
        return out

    # ------------------------------------------------------------------ gateway dispatch

    def _after_ready(self, build: Callable[[Session], tuple[str, dict]], intent: int) -> None:
        """Dispatch a world change to connected sessions (nothing to do before anyone connects)."""
        if self._sessions:
            self._spawn(self._dispatch_built(build, intent))

    async def _dispatch_built(self, build, intent: int) -> None:
        for s in list(self._sessions.values()):
            if not intent or s.intents & intent:
                event, data = build(s)
                await s.send_dispatch(event, data)

    async def dispatch(self, event: str, data: dict, *, intent: int = 0) -> None:
        """Send a dispatch event to every session whose intents include `intent` (0: always)."""
        for s in list(self._sessions.values()):
            if not intent or s.intents & intent:
                await s.send_dispatch(event, data)

    async def _dispatch_message(self, event: str, msg: MessageDict) -> None:
        if msg["flags"] & FLAG_EPHEMERAL:
            return  # ephemeral messages never reach the gateway
        channel = self._channels[msg["channel_id"]]
        is_dm = channel["type"] == CHANNEL_DM
        intent = INTENT_DIRECT_MESSAGES if is_dm else INTENT_GUILD_MESSAGES
        data = self.wire(msg)
        for s in list(self._sessions.values()):
            if s.intents & intent:
                await s.send_dispatch(event, self._content_for(s, data, is_dm))

    def _content_for(self, s: Session, data: dict, is_dm: bool) -> dict:
        """Without the MESSAGE_CONTENT intent Discord blanks content the bot may not read."""
        if s.intents & INTENT_MESSAGE_CONTENT or is_dm or data["author"]["id"] == sid(self.bot_id):
            return data
        if any(m["id"] == sid(self.bot_id) for m in data.get("mentions", [])):
            return data
        return {**data, "content": "", "embeds": [], "attachments": [], "components": []}

    # ------------------------------------------------------------------ acting as users

    async def post_message(self, channel: Id, user: Id, content: str = "", *, mentions: Optional[list[Id]] = None,
                           reply_to: Optional[Id] = None, files: Optional[dict[str, bytes]] = None,
                           embeds: Optional[list[dict]] = None) -> MessageDict:
        """A user sends a message; dispatches MESSAGE_CREATE. Returns the stored message dict."""
        chan = self._channel(channel)
        u = sid(user)
        self.user(u)
        self._check_access(chan, u)
        payload: dict[str, Any] = {"content": content, "embeds": embeds or []}
        if mentions is not None:
            payload["mentions"] = [sid(m) for m in mentions]
        if reply_to is not None:
            payload["message_reference"] = {"message_id": sid(reply_to)}
        file_parts = [(i, name, data, "application/octet-stream") for i, (name, data) in enumerate((files or {}).items())]
        try:
            validate_message_payload(payload, creating=True, has_files=bool(file_parts))
            msg = self._new_message(chan, u, payload, self._attachments({}, file_parts))
        except ApiError as e:
            raise FakeDiscordError(f"Discord would reject this user message: {e.message} {e.errors or ''}") from None
        await self._dispatch_message("MESSAGE_CREATE", msg)
        return msg

    async def edit_user_message(self, message_id: Id, content: str) -> MessageDict:
        msg = self.message(message_id)
        msg["content"] = content
        msg["edits"].append(content)
        msg["edited_timestamp"] = now_iso()
        await self._dispatch_message("MESSAGE_UPDATE", msg)
        return msg

    def _check_access(self, chan: dict, u: str) -> None:
        g = chan.get("guild_id")
        if g and u not in self._members[g]:
            raise FakeDiscordError(f"user {u} is not a member of guild {g}; add_member() first")
        if chan["type"] == CHANNEL_DM and chan["recipients"][0]["id"] != u and u != sid(self.bot_id):
            raise FakeDiscordError(f"user {u} is not a recipient of DM channel {chan['id']}")

    async def add_reaction(self, channel: Id, message_id: Id, user: Id, emoji: str) -> None:
        await self._react(self._channel(channel), self.message(message_id), sid(user), self._emoji(emoji), add=True)

    async def remove_reaction(self, channel: Id, message_id: Id, user: Id, emoji: str) -> None:
        await self._react(self._channel(channel), self.message(message_id), sid(user), self._emoji(emoji), add=False)

    @staticmethod
    def _emoji(emoji: str) -> dict:
        m = re.fullmatch(r"<?(a)?:?(\w+):(\d+)>?", emoji)
        if m:
            return {"id": m.group(3), "name": m.group(2), **({"animated": True} if m.group(1) else {})}
        return {"id": None, "name": emoji}

    async def _react(self, chan: dict, msg: MessageDict, u: str, emoji: dict, *, add: bool) -> bool:
        """Add/remove one user's reaction; dispatch the raw event. Returns whether anything changed."""
        users = self._reactors.setdefault(msg["id"], {}).setdefault(emoji_key(emoji), [])
        if add == (u in users):
            return False  # Discord ignores duplicate adds and removes of absent reactions
        users.append(u) if add else users.remove(u)
        self._refresh_reactions(msg)
        data: dict[str, Any] = {"user_id": u, "channel_id": chan["id"], "message_id": msg["id"], "emoji": emoji,
                                "burst": False, "type": 0}
        if chan.get("guild_id"):
            data["guild_id"] = chan["guild_id"]
        if add:
            data.update(message_author_id=msg["author"]["id"], burst_colors=[])
            if chan.get("guild_id") and u in self._members[chan["guild_id"]]:
                data["member"] = self._member_with_user(chan["guild_id"], u)
        intent = INTENT_DIRECT_MESSAGE_REACTIONS if chan["type"] == CHANNEL_DM else INTENT_GUILD_MESSAGE_REACTIONS
        await self.dispatch("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", data, intent=intent)
        return True

    def _refresh_reactions(self, msg: MessageDict) -> None:
        reactions = []
        for key, users in self._reactors.get(msg["id"], {}).items():
            if users:
                emoji = {"id": key, "name": None} if key.isdigit() else {"id": None, "name": key}
                reactions.append({"emoji": emoji, "count": len(users), "count_details": {"burst": 0, "normal": len(users)},
                                  "me": sid(self.bot_id) in users, "me_burst": False, "burst_colors": []})
        msg["reactions"] = reactions

    def reactions(self, message_id: Id) -> dict[str, list[str]]:
        """Emoji -> user ids that currently react on a message."""
        return {k: list(v) for k, v in self._reactors.get(sid(message_id), {}).items() if v}

    # ------------------------------------------------------------------ interactions as users

    def _interaction_base(self, chan: dict, u: str, itype: int, data: Optional[dict]) -> dict:
        g = chan.get("guild_id")
        iid = sid(self._ids.next())
        payload: dict[str, Any] = {
            "id": iid, "application_id": sid(self.application_id), "type": itype, "token": f"aW50ZXJhY3Rpb246{iid}{secrets.token_urlsafe(48)}",
            "version": 1, "channel_id": chan["id"], "channel": dict(chan), "locale": "en-US",
            "entitlements": [], "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
        }
        if data is not None:
            payload["data"] = data
        if g:
            if u not in self._members[g]:
                raise FakeDiscordError(f"user {u} is not a member of guild {g}; add_member() first")
            payload.update(
                guild_id=g, guild={"id": g, "locale": "en-US", "features": []}, guild_locale="en-US",
                member={**self._member_with_user(g, u), "permissions": str(self.permissions(g, u))},
                app_permissions=str(self.permissions(g, self.bot_id)),
                authorizing_integration_owners={"0": g}, context=0,
            )
        else:
            payload.update(user=self.user(u), app_permissions=str(ALL_PERMISSIONS & ~PERM_ADMINISTRATOR),
                           authorizing_integration_owners={"1": u}, context=1)
        return payload

    async def _create_interaction(self, payload: dict) -> FakeInteraction:
        it = FakeInteraction(self, payload)
        self._interactions[it.id] = it
        await self.dispatch("INTERACTION_CREATE", payload)
        return it

    def find_command(self, name: str, guild: Optional[str], ctype: int = 1) -> Optional[dict]:
        """A registered command by name/type: the guild's own first, then global (as Discord shows them)."""
        for scope in ([guild] if guild else []) + [None]:
            for c in self.commands:
                if c["name"] == name and c.get("type", 1) == ctype and c.get("guild_id") == scope:
                    return c
        return None

    async def slash_command(self, channel: Id, user: Id, name: str, options: Optional[dict[str, Any]] = None) -> FakeInteraction:
        """A user invokes a registered chat-input command. `name` may be "group sub"; options by name."""
        chan = self._channel(channel)
        u = sid(user)
        top, *path = name.split()
        cmd = self.find_command(top, chan.get("guild_id"))
        if cmd is None:
            raise FakeDiscordError(f"no registered slash command {top!r}; registered: {[c['name'] for c in self.commands]}")
        resolved: dict[str, dict] = {}
        level_defs = cmd.get("options") or []
        opts_out = self._command_options(level_defs, path, options or {}, chan, resolved)
        data: dict[str, Any] = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": opts_out}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        if resolved:
            data["resolved"] = resolved
        return await self._create_interaction(self._interaction_base(chan, u, IT_COMMAND, data))

    def _command_options(self, defs: list[dict], path: list[str], values: dict, chan: dict, resolved: dict) -> list[dict]:
        if path:
            sub = next((d for d in defs if d["name"] == path[0] and d["type"] in (1, 2)), None)
            if sub is None:
                raise FakeDiscordError(f"no subcommand {path[0]!r}; have {[d['name'] for d in defs]}")
            return [{"name": sub["name"], "type": sub["type"],
                     "options": self._command_options(sub.get("options") or [], path[1:], values, chan, resolved)}]
        out = []
        by_name = {d["name"]: d for d in defs}
        for d in defs:
            if d.get("required") and d["name"] not in values:
                raise FakeDiscordError(f"option {d['name']!r} is required; Discord's client would not send the command")
        for key, value in values.items():
            d = by_name.get(key)
            if d is None:
                raise FakeDiscordError(f"command has no option {key!r}; options: {list(by_name)}")
            out.append({"name": key, "type": d["type"], "value": self._option_value(d, value, chan, resolved)})
        return out

    def _option_value(self, d: dict, value: Any, chan: dict, resolved: dict) -> Any:
        kind = d["type"]
        if kind == 3:
            return str(value)
        if kind == 4:
            return int(value)
        if kind == 5:
            return bool(value)
        if kind == 10:
            return float(value)
        if kind in (6, 9):  # user / mentionable
            u = sid(value)
            resolved.setdefault("users", {})[u] = self.user(u)
            g = chan.get("guild_id")
            if g and u in self._members[g]:
                resolved.setdefault("members", {})[u] = {**self._members[g][u], "permissions": str(self.permissions(g, u))}
            return u
        if kind == 7:
            c = self._channel(value)
            resolved.setdefault("channels", {})[c["id"]] = {"id": c["id"], "type": c["type"], "name": c.get("name"),
                                                           "permissions": str(ALL_PERMISSIONS), **(
                                                               {"parent_id": c["parent_id"], "thread_metadata": c["thread_metadata"]}
                                                               if c["type"] in THREAD_TYPES else {})}
            return c["id"]
        if kind == 8:
            r = sid(value)
            resolved.setdefault("roles", {})[r] = self._roles[chan["guild_id"]][r]
            return r
        return value

    async def context_menu(self, channel: Id, user: Id, name: str, *, target_message: Optional[Id] = None,
                           target_user: Optional[Id] = None) -> FakeInteraction:
        """A user runs a message (target_message) or user (target_user) context-menu command."""
        chan = self._channel(channel)
        ctype = 3 if target_message is not None else 2
        cmd = self.find_command(name, chan.get("guild_id"), ctype)
        if cmd is None:
            raise FakeDiscordError(f"no registered context menu {name!r} of type {ctype}")
        if ctype == 3:
            target = self.message(target_message)  # type: ignore[arg-type]
            resolved = {"messages": {target["id"]: self.wire(target)}}
            target_id = target["id"]
        else:
            target_id = sid(target_user)  # type: ignore[arg-type]
            resolved = {}
            self._option_value({"type": 6}, target_id, chan, resolved)
        data = {"id": cmd["id"], "name": cmd["name"], "type": ctype, "target_id": target_id, "resolved": resolved}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        return await self._create_interaction(self._interaction_base(chan, sid(user), IT_COMMAND, data))

    async def submit_modal(self, interaction: FakeInteraction, user: Id, values: dict[str, Any]) -> FakeInteraction:
        """A user fills in and submits the modal the bot answered `interaction` with."""
        if interaction.modal is None:
            raise FakeDiscordError(f"the bot did not answer {interaction!r} with a modal (response: {interaction.response})")
        used: set[str] = set()
        components = modal_submit_components(interaction.modal["components"], values, used)
        unknown = set(values) - used
        if unknown:
            raise FakeDiscordError(f"the modal has no inputs {sorted(unknown)}; it has {sorted(used)}")
        chan = self._channels[interaction.channel_id]
        data = {"custom_id": interaction.modal["custom_id"], "components": components}
        payload = self._interaction_base(chan, sid(user), IT_MODAL_SUBMIT, data)
        if interaction.payload.get("message"):
            payload["message"] = self.wire(self.message(interaction.payload["message"]["id"]))
        return await self._create_interaction(payload)

    def _find_component(self, msg: MessageDict, custom_id: str) -> dict:
        for comp in walk_components(msg.get("components") or []):
            if comp.get("custom_id") == custom_id:
                if comp.get("disabled"):
                    raise FakeDiscordError(f"component {custom_id!r} is disabled; a user cannot use it")
                return comp
        ids = [c.get("custom_id") for c in walk_components(msg.get("components") or []) if c.get("custom_id")]
        raise FakeDiscordError(f"message {msg['id']} has no component {custom_id!r}; it has {ids}")

    async def click_button(self, channel: Id, message_id: Id, user: Id, custom_id: str) -> FakeInteraction:
        msg = self.message(message_id)
        comp = self._find_component(msg, custom_id)
        if comp.get("type") != 2:
            raise FakeDiscordError(f"component {custom_id!r} is not a button (type {comp.get('type')})")
        return await self._component_interaction(channel, msg, user, comp, {})

    async def select_option(self, channel: Id, message_id: Id, user: Id, custom_id: str, values: list[str]) -> FakeInteraction:
        msg = self.message(message_id)
        comp = self._find_component(msg, custom_id)
        return await self._component_interaction(channel, msg, user, comp, {"values": [str(v) for v in values]})

    async def _component_interaction(self, channel: Id, msg: MessageDict, user: Id, comp: dict, extra: dict) -> FakeInteraction:
        chan = self._channel(channel)
        data = {"custom_id": comp["custom_id"], "component_type": comp["type"], **extra}
        if "id" in comp:
            data["id"] = comp["id"]
        payload = self._interaction_base(chan, sid(user), IT_COMPONENT, data)
        payload["message"] = self.wire(msg)
        return await self._create_interaction(payload)

    # ------------------------------------------------------------------ gateway control

    async def disconnect_gateway(self, *, resumable: bool = True, code: int = 4000) -> None:
        """Close the gateway socket(s); with resumable=False the session is forgotten (RESUME -> op 9)."""
        if not resumable:
            self._sessions.clear()
        for ws in list(self._sockets):
            await ws.close(code=code, message=b"fake discord: disconnect")

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT, as Discord does before moving a session."""
        for s in list(self._sessions.values()):
            await send_frame(s.ws, s.compressor, {"op": 7, "d": None})

    @property
    def connected(self) -> bool:
        return any(s.ws is not None and not s.ws.closed for s in self._sessions.values())

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=16 * 1024 * 1024)
        await ws.prepare(request)
        self._sockets.add(ws)
        compressor = zlib.compressobj() if request.query.get("compress") == "zlib-stream" else None
        session: Optional[Session] = None
        try:
            await send_frame(ws, compressor, {"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for frame in ws:
                if frame.type != WSMsgType.TEXT:
                    if frame.type == WSMsgType.BINARY:
                        await ws.close(code=4002, message=b"Error while decoding payload.")
                    continue
                try:
                    msg = json.loads(frame.data)
                    op = msg["op"]
                except (ValueError, KeyError, TypeError):
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                    break
                session = await self._gateway_op(ws, compressor, session, op, msg.get("d"))
        finally:
            self._sockets.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
        return ws

    async def _gateway_op(self, ws, compressor, session: Optional[Session], op: int, d: Any) -> Optional[Session]:
        if op == 1:
            await send_frame(ws, compressor, {"op": 11})
        elif op == 2:
            if session is not None:
                await ws.close(code=4005, message=b"Already authenticated.")
            else:
                session = await self._identify(ws, compressor, d or {})
        elif op == 6:
            session = await self._resume(ws, compressor, d or {})
        elif session is None:
            await ws.close(code=4003, message=b"Not authenticated.")
        elif op == 3:
            self.presence = d
        elif op == 8:
            await self._members_chunk(session, d or {})
        elif op in (4, 31):
            pass  # voice state / soundboard requests: nothing to do for a text bot
        else:
            await ws.close(code=4001, message=b"Unknown opcode.")
        return session

    async def _identify(self, ws, compressor, d: dict) -> Optional[Session]:
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        if "intents" not in d:
            await ws.close(code=4013, message=b"Invalid intent(s).")
            return None
        # Forget sessions nobody can resume any more (their socket is gone, a new identify started).
        for key in [k for k, s in self._sessions.items() if s.ws is None or s.ws.closed]:
            del self._sessions[key]
        session = Session(secrets.token_hex(16), int(d["intents"]))
        session.ws, session.compressor = ws, compressor
        self._sessions[session.id] = session
        if d.get("presence"):
            self.presence = d["presence"]
        ready = {
            "v": API_VERSION, "user": self.bot_user, "guilds": [{"id": g, "unavailable": True} for g in self._guilds],
            "session_id": session.id, "session_type": "normal", "resume_gateway_url": self.gateway_url,
            "shard": d.get("shard", [0, 1]), "application": {"id": sid(self.application_id), "flags": self.application_flags},
            "private_channels": [], "relationships": [], "presences": [], "guild_join_requests": [],
            "geo_ordered_rtc_regions": [], "user_settings": {}, "auth_session_id_hash": secrets.token_hex(8), "_trace": ["fake-discord"],
        }
        await session.send_dispatch("READY", ready)
        for g in self._guilds:
            await session.send_dispatch("GUILD_CREATE", self._guild_create(g))
        return session

    async def _resume(self, ws, compressor, d: dict) -> Optional[Session]:
        session = self._sessions.get(d.get("session_id", ""))
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        if session is None or (session.ws is not None and not session.ws.closed):
            await send_frame(ws, compressor, {"op": 9, "d": False})
            return None
        session.ws, session.compressor = ws, compressor
        seen = int(d.get("seq") or 0)
        async with session.lock:
            for frame in session.log:
                if frame["s"] > seen:
                    await send_frame(ws, compressor, frame)
        await session.send_dispatch("RESUMED", {"_trace": ["fake-discord"]})
        return session

    async def _members_chunk(self, session: Session, d: dict) -> None:
        g = sid(d.get("guild_id"))
        if g not in self._guilds:
            return
        query, limit = d.get("query"), int(d.get("limit") or 0)
        wanted = [sid(u) for u in d.get("user_ids") or []]
        members = []
        for u in self._members[g]:
            name = self._users[u]["username"]
            if wanted and u not in wanted:
                continue
            if not wanted and query and not name.lower().startswith(query.lower()):
                continue
            members.append(self._member_with_user(g, u))
        if limit:
            members = members[:limit]
        chunk = {"guild_id": g, "members": members, "chunk_index": 0, "chunk_count": 1,
                 "not_found": [u for u in wanted if u not in self._members[g]]}
        if d.get("nonce"):
            chunk["nonce"] = d["nonce"]
        if d.get("presences"):
            chunk["presences"] = []
        await session.send_dispatch("GUILD_MEMBERS_CHUNK", chunk)

    # ------------------------------------------------------------------ REST plumbing

    def _route_table(self) -> list[tuple[str, re.Pattern, Handler, bool]]:
        """(method, path pattern, handler, needs bot auth). Webhook/interaction routes use their token."""
        C, M = r"(?P<channel_id>\d+)", r"(?P<message_id>\d+)"
        APP, G = r"(?P<app_id>\d+)", r"(?P<guild_id>\d+)"
        WH = r"/webhooks/(?P<app_id>\d+)/(?P<token>[^/]+)"
        table = [
            ("GET", "/users/@me", self._r_me, True),
            ("GET", r"/users/(?P<user_id>\d+)", self._r_user, True),
            ("POST", "/users/@me/channels", self._r_create_dm, True),
            ("GET", "/gateway", self._r_gateway, False),
            ("GET", "/gateway/bot", self._r_gateway_bot, True),
            ("GET", "/applications/@me", self._r_app, True),
            ("PATCH", "/applications/@me", self._r_app_edit, True),
            ("GET", "/oauth2/applications/@me", self._r_app, True),
            ("GET", f"/applications/{APP}/commands", self._r_get_commands, True),
            ("PUT", f"/applications/{APP}/commands", self._r_put_commands, True),
            ("GET", f"/applications/{APP}/guilds/{G}/commands", self._r_get_commands, True),
            ("PUT", f"/applications/{APP}/guilds/{G}/commands", self._r_put_commands, True),
            ("GET", f"/channels/{C}", self._r_get_channel, True),
            ("GET", f"/channels/{C}/messages", self._r_history, True),
            ("POST", f"/channels/{C}/messages", self._r_send, True),
            ("GET", f"/channels/{C}/messages/{M}", self._r_get_message, True),
            ("PATCH", f"/channels/{C}/messages/{M}", self._r_edit, True),
            ("DELETE", f"/channels/{C}/messages/{M}", self._r_delete, True),
            ("POST", f"/channels/{C}/typing", self._r_typing, True),
            ("PUT", f"/channels/{C}/messages/{M}/reactions/(?P<emoji>[^/]+)/@me", self._r_react_add, True),
            ("DELETE", f"/channels/{C}/messages/{M}/reactions/(?P<emoji>[^/]+)/@me", self._r_react_remove, True),
            ("POST", f"/channels/{C}/messages/{M}/threads", self._r_thread_from_message, True),
            ("POST", f"/channels/{C}/threads", self._r_thread, True),
            ("GET", f"/guilds/{G}", self._r_guild, True),
            ("GET", f"/guilds/{G}/channels", self._r_guild_channels, True),
            ("GET", f"/guilds/{G}/members/(?P<user_id>\\d+)", self._r_member, True),
            ("GET", f"/guilds/{G}/roles", self._r_roles, True),
            ("POST", r"/interactions/(?P<interaction_id>\d+)/(?P<token>[^/]+)/callback", self._r_callback, False),
            ("POST", WH, self._r_followup, False),
            ("GET", WH + r"/messages/(?P<message_id>@original|\d+)", self._r_wh_get, False),
            ("PATCH", WH + r"/messages/(?P<message_id>@original|\d+)", self._r_wh_edit, False),
            ("DELETE", WH + r"/messages/(?P<message_id>@original|\d+)", self._r_wh_delete, False),
        ]
        return [(m, re.compile(p + "$"), h, auth) for m, p, h, auth in table]

    def _bucket(self, method: str, pattern: str, params: dict) -> tuple[tuple, int, float, str]:
        """Which rate-limit bucket a request counts against (Discord: per route and major parameter)."""
        writes = method in ("POST", "PATCH")
        if writes and "channel_id" in params and pattern.startswith("/channels/(?P<channel_id>\\d+)/messages") \
                and "reactions" not in pattern and "threads" not in pattern:
            # Message sends and edits share one per-channel bucket (5 per 5 s on Discord).
            return ("messages", params["channel_id"]), *self.rate_limit, "msgwrite"
        if writes and pattern.startswith("/webhooks/"):
            return ("webhook", params["token"]), *self.rate_limit, "webhookwrite"
        major = params.get("channel_id") or params.get("guild_id") or params.get("token") or ""
        return (method, pattern, major), *OTHER_RATE_LIMIT, f"r{zlib.crc32((method + pattern).encode()):08x}"

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info.get("tail", "")
        method = request.method
        if "version" in request.match_info and request.match_info["version"] != str(API_VERSION):
            return self._error_response(method, path, ApiError(404, E_GENERAL, f"404: Not Found (API v{request.match_info['version']})"))
        for route_method, pattern, handler, needs_auth in self._routes:
            m = pattern.match(path)
            if m is None or route_method != method:
                continue
            if needs_auth and request.headers.get("Authorization") != f"Bot {self.token}":
                return self._error_response(method, path, ApiError(401, E_GENERAL, "401: Unauthorized"))
            params = m.groupdict()
            key, limit, per, name = self._bucket(method, pattern.pattern, params)
            ok, bucket = self._limiter.take(key, limit, per, name)
            headers = RateLimiter.headers(bucket)
            if not ok:
                return self._rate_limited_response(method, path, headers, bucket)
            _current_request.set((method, path))
            try:
                req = Req(method, path, params, request.query)
                await self._read_body(request, req)
                status, body = await handler(req)
            except ApiError as e:
                return self._error_response(method, path, e, headers)
            self.requests.append((method, path, status))
            if status == 204:
                return web.Response(status=204, headers=headers)
            return self._json(status, body, headers)
        self.unhandled.append({"method": method, "path": path})
        return self._error_response(method, path, ApiError(404, E_GENERAL, "404: Not Found"), record=False)

    @staticmethod
    def _json(status: int, body: Any, headers: Optional[dict] = None) -> web.Response:
        # Exactly "application/json": discord.py only parses bodies with that content type.
        return web.Response(status=status, body=json.dumps(body).encode(),
                            headers={**(headers or {}), "Content-Type": "application/json"})

    def _error_response(self, method: str, path: str, e: ApiError, headers: Optional[dict] = None,
                        *, record: bool = True) -> web.Response:
        if record:
            reason = e.message
            if e.errors:
                reason += " " + json.dumps(e.errors)
            self.rejections.append({"method": method, "path": path, "status": e.status, "code": e.code, "reason": reason})
        self.requests.append((method, path, e.status))
        return self._json(e.status, e.body(), headers)

    def _rate_limited_response(self, method: str, path: str, headers: dict, bucket: Bucket) -> web.Response:
        self.rate_limited += 1
        self.requests.append((method, path, 429))
        retry_after = float(headers["X-RateLimit-Reset-After"])
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
        # discord.py treats a 429 without a Via header as a Cloudflare ban, so send it as Discord does.
        extra = {"Retry-After": str(math.ceil(retry_after)), "X-RateLimit-Scope": "user", "Via": "1.1 google"}
        return self._json(429, body, {**headers, **extra})

    async def _read_body(self, request: web.Request, req: Req) -> None:
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if part.name == "payload_json":
                    req.payload = self._parse_json(await part.text())
                elif part.name and (m := re.fullmatch(r"files\[(\d+)\]", part.name)):
                    data = await part.read(decode=False)
                    req.files.append((int(m.group(1)), part.filename, bytes(data), part.headers.get("Content-Type")))
            req.payload = req.payload or {}
            return
        raw = await request.read()
        req.payload = self._parse_json(raw.decode("utf-8")) if raw else None

    @staticmethod
    def _parse_json(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise ApiError(400, E_INVALID_JSON, "The request body contains invalid JSON.") from None

    async def _serve_attachment(self, request: web.Request) -> web.Response:
        data = self._files.get(request.match_info["att_id"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data)

    def _violation(self, e: ApiError) -> None:
        """Raise a Discord rejection, or (strict=False) only record it and let the request through."""
        if self.strict:
            raise e
        method, path = _current_request.get()
        self.rejections.append({"method": method, "path": path, "status": e.status, "code": e.code,
                                "reason": f"(allowed, strict=False) {e.message} {json.dumps(e.errors) if e.errors else ''}"})

    def _validate(self, payload: dict, *, creating: bool, has_files: bool) -> None:
        try:
            validate_message_payload(payload, creating=creating, has_files=has_files)
        except ApiError as e:
            if e.code == E_EMPTY_MESSAGE:
                raise  # nothing to store, even when lenient
            self._violation(e)

    # ------------------------------------------------------------------ REST: users, gateway, application

    async def _r_me(self, req: Req):
        return 200, self.bot_user

    async def _r_user(self, req: Req):
        u = self._users.get(req.params["user_id"])
        if u is None:
            raise ApiError(404, E_UNKNOWN_USER, "Unknown User")
        return 200, u

    async def _r_create_dm(self, req: Req):
        u = sid((req.payload or {}).get("recipient_id", 0))
        if u not in self._users:
            raise form_error("recipient_id", "USER_NOT_FOUND", "Unknown user")
        return 200, self._channels[sid(self.dm_channel(u))]

    async def _r_gateway(self, req: Req):
        return 200, {"url": self.gateway_url}

    async def _r_gateway_bot(self, req: Req):
        return 200, {"url": self.gateway_url, "shards": 1, "session_start_limit": {
            "total": 1000, "remaining": 999, "reset_after": 14400000, "max_concurrency": 1}}

    def _app_dict(self) -> dict:
        return {
            "id": sid(self.application_id), "name": self.bot_user["username"], "icon": None,
            "description": self.application_description, "summary": "", "type": None, "bot_public": True,
            "bot_require_code_grant": False, "verify_key": "0" * 64, "flags": self.application_flags,
            "owner": self._users[sid(self.owner_id)], "team": None, "bot": self.bot_user,
            "rpc_origins": [], "redirect_uris": [], "interactions_endpoint_url": None, "tags": [],
            "approximate_guild_count": len(self._guilds), "integration_types_config": {"0": {}, "1": {}},
        }

    async def _r_app(self, req: Req):
        return 200, self._app_dict()

    async def _r_app_edit(self, req: Req):
        payload = req.payload or {}
        if "description" in payload:
            self.application_description = payload["description"] or ""
        return 200, self._app_dict()

    # ------------------------------------------------------------------ REST: commands

    def _check_app(self, req: Req) -> Optional[str]:
        if req.params["app_id"] != sid(self.application_id):
            raise ApiError(403, E_MISSING_ACCESS, "Missing Access")
        g = req.params.get("guild_id")
        if g is not None and g not in self._guilds:
            raise ApiError(403, E_MISSING_ACCESS, "Missing Access")
        return g

    async def _r_get_commands(self, req: Req):
        g = self._check_app(req)
        return 200, [c for c in self.commands if c.get("guild_id") == g]

    async def _r_put_commands(self, req: Req):
        g = self._check_app(req)
        payload = req.payload
        if not isinstance(payload, list):
            raise form_error("_root", "LIST_TYPE_CONVERT", "Must be an array of application commands.")
        old = {(c["name"], c.get("type", 1)): c for c in self.commands if c.get("guild_id") == g}
        new = []
        for i, body in enumerate(payload):
            self._validate_command(i, body)
            ctype = body.get("type", 1)
            prev = old.get((body["name"], ctype))
            cmd = {
                "id": prev["id"] if prev else sid(self._ids.next()), "application_id": sid(self.application_id),
                "version": sid(self._ids.next()), "type": ctype, "name": body["name"],
                "description": body.get("description", ""), "options": body.get("options") or [],
                "default_member_permissions": body.get("default_member_permissions"),
                "dm_permission": body.get("dm_permission", True), "nsfw": body.get("nsfw", False),
                "contexts": body.get("contexts"), "integration_types": body.get("integration_types", [0]),
                "name_localizations": body.get("name_localizations"),
                "description_localizations": body.get("description_localizations"),
            }
            if g:
                cmd["guild_id"] = g
            new.append(cmd)
        self.commands = [c for c in self.commands if c.get("guild_id") != g] + new
        return 200, new

    @staticmethod
    def _validate_command(i: int, body: dict) -> None:
        name = body.get("name") or ""
        ctype = body.get("type", 1)
        if ctype == 1 and not re.fullmatch(r"[-_\w]{1,32}", name) or name != name.lower() and ctype == 1:
            raise form_error(f"{i}.name", "APPLICATION_COMMAND_INVALID_NAME", f"Command name is invalid: {name!r}")
        if ctype != 1 and not 1 <= len(name) <= 32:
            raise form_error(f"{i}.name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length.")
        if ctype == 1 and not 1 <= len(body.get("description") or "") <= 100:
            raise form_error(f"{i}.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        if len(body.get("options") or []) > 25:
            raise form_error(f"{i}.options", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")

    # ------------------------------------------------------------------ REST: channels and messages

    def _rest_channel(self, req: Req) -> dict:
        chan = self._channels.get(req.params["channel_id"])
        if chan is None:
            raise ApiError(404, E_UNKNOWN_CHANNEL, "Unknown Channel")
        return chan

    def _rest_message(self, chan: dict, req: Req) -> MessageDict:
        msg = self._msgs.get(req.params["message_id"])
        if msg is None or msg.get("deleted") or msg["channel_id"] != chan["id"] or msg["flags"] & FLAG_EPHEMERAL:
            raise ApiError(404, E_UNKNOWN_MESSAGE, "Unknown Message")
        return msg

    def _require_bot_permission(self, chan: dict, needed: int) -> None:
        """403 50013 when the bot's guild permissions lack `needed` (DMs need none)."""
        g = chan.get("guild_id")
        if not g:
            return
        have = self.permissions(g, self.bot_id)
        needed |= PERM_VIEW_CHANNEL
        if have & needed != needed:
            raise ApiError(403, E_MISSING_PERMISSIONS, "Missing Permissions")

    def _send_permission(self, chan: dict) -> int:
        return PERM_SEND_MESSAGES_IN_THREADS if chan["type"] in THREAD_TYPES else PERM_SEND_MESSAGES

    async def _r_get_channel(self, req: Req):
        return 200, self._rest_channel(req)

    async def _r_history(self, req: Req):
        chan = self._rest_channel(req)
        limit = int(req.query.get("limit", 50))
        if not 1 <= limit <= MAX_HISTORY_LIMIT:
            raise form_error("limit", "NUMBER_TYPE_MAX", f"int value should be between 1 and {MAX_HISTORY_LIMIT}.")
        msgs = [m for m in self.messages(chan["id"]) if not m["flags"] & FLAG_EPHEMERAL]
        if "before" in req.query:
            msgs = [m for m in msgs if int(m["id"]) < int(req.query["before"])]
        if "after" in req.query:
            msgs = [m for m in msgs if int(m["id"]) > int(req.query["after"])][:limit]
        if "around" in req.query:
            pivot = int(req.query["around"])
            older = [m for m in msgs if int(m["id"]) <= pivot][-((limit + 1) // 2):]
            newer = [m for m in msgs if int(m["id"]) > pivot][: limit // 2]
            msgs = older + newer
        return 200, [self.wire(m) for m in reversed(msgs[-limit:])]  # newest first, as Discord

    async def _r_get_message(self, req: Req):
        return 200, self.wire(self._rest_message(self._rest_channel(req), req))

    async def _r_send(self, req: Req):
        chan = self._rest_channel(req)
        self._require_bot_permission(chan, self._send_permission(chan) | (PERM_ATTACH_FILES if req.files else 0))
        payload = req.payload if isinstance(req.payload, dict) else {}
        self._validate(payload, creating=True, has_files=bool(req.files))
        payload = {**payload, "mentions": None}  # the bot's mentions are parsed from its content
        msg = self._new_message(chan, sid(self.bot_id), payload, self._attachments(payload, req.files))
        await self._dispatch_message("MESSAGE_CREATE", msg)
        return 200, self.wire(msg)

    def _apply_edit(self, msg: MessageDict, payload: dict, files: list) -> None:
        """Apply a message edit body (content, embeds, components, attachments, flags)."""
        self._validate(payload, creating=False, has_files=bool(files))
        if "content" in payload:
            content = payload["content"] or ""
            msg["content"] = content
            msg["mentions"] = self._mention_list(self._channels[msg["channel_id"]], parse_mentions(content))
        for key in ("embeds", "components"):
            if key in payload:
                msg[key] = payload[key] or []
        if "attachments" in payload or files:
            keep = {str(a.get("id")) for a in payload.get("attachments") or [] if isinstance(a, dict)}
            kept = [a for a in msg["attachments"] if a["id"] in keep] if "attachments" in payload else msg["attachments"]
            msg["attachments"] = kept + self._attachments(payload, files)
        if "flags" in payload and payload["flags"] is not None:
            msg["flags"] = (msg["flags"] & ~FLAG_SUPPRESS_EMBEDS & ~FLAG_LOADING) | (int(payload["flags"]) & FLAG_SUPPRESS_EMBEDS) | (
                msg["flags"] & FLAG_EPHEMERAL)
        msg["flags"] &= ~FLAG_LOADING  # an edited deferred response is no longer "thinking"
        if not (msg["content"] or msg["embeds"] or msg["components"] or msg["attachments"]):
            raise ApiError(400, E_EMPTY_MESSAGE, "Cannot send an empty message")
        msg["edits"].append(msg["content"])
        msg["edited_timestamp"] = now_iso()

    async def _r_edit(self, req: Req):
        chan = self._rest_channel(req)
        msg = self._rest_message(chan, req)
        if msg["author"]["id"] != sid(self.bot_id):
            raise ApiError(403, E_EDIT_OTHERS_MESSAGE, "Cannot edit a message authored by another user")
        self._apply_edit(msg, req.payload if isinstance(req.payload, dict) else {}, req.files)
        await self._dispatch_message("MESSAGE_UPDATE", msg)
        return 200, self.wire(msg)

    async def _r_delete(self, req: Req):
        chan = self._rest_channel(req)
        msg = self._rest_message(chan, req)
        if msg["author"]["id"] != sid(self.bot_id):
            g = chan.get("guild_id")
            if not g or not self.permissions(g, self.bot_id) & PERM_MANAGE_MESSAGES:
                raise ApiError(403, E_MISSING_PERMISSIONS, "Missing Permissions")
        await self._delete_message(msg)
        return 204, None

    async def _delete_message(self, msg: MessageDict) -> None:
        msg["deleted"] = True
        if msg["flags"] & FLAG_EPHEMERAL:
            return
        data = {"id": msg["id"], "channel_id": msg["channel_id"], **({"guild_id": msg["guild_id"]} if msg.get("guild_id") else {})}
        is_dm = self._channels[msg["channel_id"]]["type"] == CHANNEL_DM
        await self.dispatch("MESSAGE_DELETE", data, intent=INTENT_DIRECT_MESSAGES if is_dm else INTENT_GUILD_MESSAGES)

    async def _r_typing(self, req: Req):
        chan = self._rest_channel(req)
        self._require_bot_permission(chan, self._send_permission(chan))
        self.typing.append((int(chan["id"]), time.time()))
        return 204, None

    async def _r_react_add(self, req: Req):
        chan = self._rest_channel(req)
        msg = self._rest_message(chan, req)
        emoji = emoji_from_url(req.params["emoji"])
        if not self._reactors.get(msg["id"], {}).get(emoji_key(emoji)):
            self._require_bot_permission(chan, PERM_ADD_REACTIONS)  # adding to an existing reaction needs none
        if not emoji["name"] and not emoji["id"]:
            raise ApiError(400, E_UNKNOWN_EMOJI, "Unknown Emoji")
        await self._react(chan, msg, sid(self.bot_id), emoji, add=True)
        return 204, None

    async def _r_react_remove(self, req: Req):
        chan = self._rest_channel(req)
        msg = self._rest_message(chan, req)
        await self._react(chan, msg, sid(self.bot_id), emoji_from_url(req.params["emoji"]), add=False)
        return 204, None

    async def _r_thread_from_message(self, req: Req):
        chan = self._rest_channel(req)
        msg = self._rest_message(chan, req)
        if chan["type"] != CHANNEL_TEXT:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        self._require_bot_permission(chan, PERM_CREATE_PUBLIC_THREADS)
        if msg.get("thread"):
            raise ApiError(400, 160004, "A thread has already been created for this message")
        name = self._thread_name(req)
        tid = self.add_thread(chan["id"], name, owner=self.bot_id, thread_id=msg["id"])  # thread id == message id
        thread = self._channels[sid(tid)]
        msg["thread"] = thread
        return 201, thread

    async def _r_thread(self, req: Req):
        chan = self._rest_channel(req)
        if chan["type"] != CHANNEL_TEXT:
            raise ApiError(400, 50024, "Cannot execute action on this channel type")
        private = int((req.payload or {}).get("type") or CHANNEL_PRIVATE_THREAD) == CHANNEL_PRIVATE_THREAD
        tid = self.add_thread(chan["id"], self._thread_name(req), owner=self.bot_id, private=private)
        return 201, self._channels[sid(tid)]

    @staticmethod
    def _thread_name(req: Req) -> str:
        name = (req.payload or {}).get("name") or ""
        if not 1 <= len(name) <= 100:
            raise form_error("name", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
        return name

    # ------------------------------------------------------------------ REST: guilds

    def _rest_guild(self, req: Req) -> str:
        g = req.params["guild_id"]
        if g not in self._guilds:
            raise ApiError(404, E_UNKNOWN_GUILD, "Unknown Guild")
        return g

    async def _r_guild(self, req: Req):
        g = self._rest_guild(req)
        return 200, {**self._guilds[g], "roles": list(self._roles[g].values()),
                     "approximate_member_count": len(self._members[g])}

    async def _r_guild_channels(self, req: Req):
        return 200, self._guild_channels(self._rest_guild(req))

    async def _r_member(self, req: Req):
        g = self._rest_guild(req)
        u = req.params["user_id"]
        if u not in self._members[g]:
            raise ApiError(404, E_UNKNOWN_MEMBER, "Unknown Member")
        return 200, self._member_with_user(g, u)

    async def _r_roles(self, req: Req):
        return 200, list(self._roles[self._rest_guild(req)].values())

    # ------------------------------------------------------------------ REST: interactions and webhooks

    def _interaction_by_token(self, token: str) -> FakeInteraction:
        for it in self._interactions.values():
            if it.token == token:
                return it
        raise ApiError(404, E_UNKNOWN_WEBHOOK, "Unknown Webhook")

    async def _r_callback(self, req: Req):
        it = self._interactions.get(req.params["interaction_id"])
        if it is None or it.token != req.params["token"]:
            raise ApiError(404, E_UNKNOWN_INTERACTION, "Unknown interaction")
        if it.response is not None:
            raise ApiError(400, E_ALREADY_ACKNOWLEDGED, "Interaction has already been acknowledged.")
        if time.monotonic() - it.created > self.interaction_deadline:
            it.late = True
            self._violation(ApiError(404, E_UNKNOWN_INTERACTION, "Unknown interaction"))
        body = req.payload if isinstance(req.payload, dict) else {}
        cb_type, data = body.get("type"), body.get("data") or {}
        resource = await self._apply_callback(it, cb_type, data, req.files)
        it.response = {"type": cb_type, "data": data}
        it._responded.set()
        if not req.query.get("with_response") or req.query.get("with_response") in ("false", "0"):
            return 204, None
        original = it.original
        result: dict[str, Any] = {"interaction": {
            "id": it.id, "type": it.type,
            "response_message_id": original["id"] if original else None,
            "response_message_loading": bool(original and original["flags"] & FLAG_LOADING),
            "response_message_ephemeral": bool(original and original["flags"] & FLAG_EPHEMERAL),
        }}
        if resource is not None:
            result["resource"] = resource
        return 200, result

    async def _apply_callback(self, it: FakeInteraction, cb_type: Any, data: dict, files: list) -> Optional[dict]:
        """Do what the callback type means; returns the `resource` for with_response."""
        chan = self._channels[it.channel_id]
        component_types = (IT_COMPONENT, IT_MODAL_SUBMIT)
        if cb_type == CB_MESSAGE:
            self._validate(data, creating=True, has_files=bool(files))
            msg = await self._interaction_message(it, chan, data, files)
            return {"type": cb_type, "message": self.wire(msg)}
        if cb_type == CB_DEFERRED_MESSAGE:
            msg = await self._interaction_message(it, chan, {"flags": int(data.get("flags") or 0) | FLAG_LOADING}, [], empty_ok=True)
            return {"type": cb_type, "message": self.wire(msg)}
        if cb_type in (CB_DEFERRED_UPDATE, CB_UPDATE):
            if it.type not in component_types or not it.component_message_id:
                raise form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID", "This response type is only valid for component interactions")
            it.original_id = it.component_message_id
            if cb_type == CB_UPDATE:
                msg = self.message(it.original_id)
                self._apply_edit(msg, data, files)
                await self._dispatch_message("MESSAGE_UPDATE", msg)
                return {"type": cb_type, "message": self.wire(msg)}
            return None
        if cb_type == CB_MODAL:
            if it.type == IT_MODAL_SUBMIT:
                raise form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID", "A modal cannot answer a modal submit")
            validate_modal(data)
            modal = json.loads(json.dumps(data))
            assign_component_ids(modal["components"])
            it.modal = modal
            return None
        if cb_type == CB_AUTOCOMPLETE and it.type == IT_AUTOCOMPLETE:
            return None
        raise form_error("type", "BASE_TYPE_CHOICES", f"Value must be one of (4, 5, 6, 7, 8, 9); got {cb_type!r}.")

    async def _interaction_message(self, it: FakeInteraction, chan: dict, data: dict, files: list, *, empty_ok: bool = False) -> MessageDict:
        user = it.payload.get("member", {}).get("user") or it.payload.get("user")
        command_type = (it.payload.get("data") or {}).get("type", 1)
        msg_type = {1: 20, 2: 23, 3: 23}.get(command_type, 20) if it.type == IT_COMMAND else 0
        extra = {
            "application_id": sid(self.application_id), "webhook_id": sid(self.application_id),
            "interaction_metadata": {"id": it.id, "type": it.type, "user": user,
                                     "authorizing_integration_owners": it.payload.get("authorizing_integration_owners", {})},
        }
        payload = {**data, "mentions": None}
        msg = self._new_message(chan, sid(self.bot_id), payload, self._attachments(data, files), msg_type=msg_type, extra=extra)
        it.original_id = msg["id"]
        await self._dispatch_message("MESSAGE_CREATE", msg)
        return msg

    def _webhook_message(self, it: FakeInteraction, ref: str) -> MessageDict:
        mid = it.original_id if ref == "@original" else ref
        ids = {it.original_id} | {m["id"] for m in it.followups}
        if mid is None or mid not in ids or self._msgs[mid].get("deleted"):
            raise ApiError(404, E_UNKNOWN_MESSAGE, "Unknown Message")
        return self._msgs[mid]

    def _webhook_interaction(self, req: Req) -> FakeInteraction:
        if req.params["app_id"] != sid(self.application_id):
            raise ApiError(404, E_UNKNOWN_WEBHOOK, "Unknown Webhook")
        it = self._interaction_by_token(req.params["token"])
        if it.response is None:
            raise ApiError(404, E_UNKNOWN_WEBHOOK, "Unknown Webhook")  # followups only after the first response
        return it

    async def _r_followup(self, req: Req):
        it = self._webhook_interaction(req)
        payload = req.payload if isinstance(req.payload, dict) else {}
        original = it.original
        if original is not None and original["flags"] & FLAG_LOADING:
            # Discord: the first followup after a "thinking" defer becomes the original response.
            self._apply_edit(original, {k: v for k, v in payload.items() if k != "flags"}, req.files)
            await self._dispatch_message("MESSAGE_UPDATE", original)
            msg = original
        else:
            self._validate(payload, creating=True, has_files=bool(req.files))
            chan = self._channels[it.channel_id]
            extra = {"application_id": sid(self.application_id), "webhook_id": sid(self.application_id)}
            msg = self._new_message(chan, sid(self.bot_id), {**payload, "mentions": None},
                                    self._attachments(payload, req.files), extra=extra)
            await self._dispatch_message("MESSAGE_CREATE", msg)
        it.followups.append(msg)
        wait = req.query.get("wait", "false").lower() in ("true", "1")
        return (200, self.wire(msg)) if wait else (204, None)

    async def _r_wh_get(self, req: Req):
        it = self._webhook_interaction(req)
        return 200, self.wire(self._webhook_message(it, req.params["message_id"]))

    async def _r_wh_edit(self, req: Req):
        it = self._webhook_interaction(req)
        msg = self._webhook_message(it, req.params["message_id"])
        self._apply_edit(msg, req.payload if isinstance(req.payload, dict) else {}, req.files)
        await self._dispatch_message("MESSAGE_UPDATE", msg)
        return 200, self.wire(msg)

    async def _r_wh_delete(self, req: Req):
        it = self._webhook_interaction(req)
        await self._delete_message(self._webhook_message(it, req.params["message_id"]))
        return 204, None

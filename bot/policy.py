"""Decide whether to answer a message: where, who, and how often.

Pure functions over `MessageFacts` (plain data the front-end fills from a
Discord message), so every rule is tested without Discord.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Optional

from model.config import DiscordConfig


@dataclass
class MessageFacts:
    """What the policy needs to know about an incoming message."""

    author_id: int
    author_is_bot: bool = False
    is_self: bool = False
    channel_id: int = 0
    parent_channel_id: Optional[int] = None  # set for threads
    guild_id: Optional[int] = None  # None in DMs
    role_ids: list[int] = field(default_factory=list)
    mentions_bot: bool = False
    replies_to_bot: bool = False  # a reply to one of the bot's messages (ping or not)
    is_dm: bool = False
    in_thread: bool = False
    bot_in_thread: bool = False  # the bot created the thread or took part in it before


def _where(facts: MessageFacts) -> set[int]:
    """The channel ids a message counts as being in (a thread counts as its parent too)."""
    ids = {facts.channel_id}
    if facts.parent_channel_id is not None:
        ids.add(facts.parent_channel_id)
    return ids


def is_addressed(facts: MessageFacts, cfg: DiscordConfig) -> bool:
    """Is this message for the bot: a mention, a DM, a configured channel or its thread?"""
    if facts.is_self or facts.author_is_bot:
        return False
    if facts.is_dm:
        return cfg.respond_in_dms
    if (facts.mentions_bot or facts.replies_to_bot) and cfg.respond_to_mentions:
        return True
    if _where(facts) & set(cfg.channels):
        return True
    return facts.in_thread and facts.bot_in_thread


def is_allowed(facts: MessageFacts, cfg: DiscordConfig) -> bool:
    """Do the allow/block lists let this user, in this place, with these roles, use the bot?"""
    roles, where = set(facts.role_ids), _where(facts)
    if facts.author_id in cfg.blocked_users or roles & set(cfg.blocked_roles):
        return False
    if where & set(cfg.blocked_channels):
        return False
    if cfg.allowed_channels and not facts.is_dm and not where & set(cfg.allowed_channels):
        return False
    # Allowed users and allowed roles widen each other: either list admits a user.
    if cfg.allowed_users or cfg.allowed_roles:
        if facts.author_id not in cfg.allowed_users and not roles & set(cfg.allowed_roles):
            return False
    return True


def should_respond(facts: MessageFacts, cfg: DiscordConfig) -> bool:
    return is_addressed(facts, cfg) and is_allowed(facts, cfg)


def is_trusted(role_ids: list[int], user_id: int, cfg: DiscordConfig) -> bool:
    """Trusted users' corrections are approved without review (admins are trusted too)."""
    roles = set(role_ids)
    return bool(
        roles & set(cfg.trusted_roles)
        or roles & set(cfg.admin_roles)
        or user_id in cfg.admin_users
    )


class RateLimiter:
    """Sliding-window limit: at most `limit` answers per user per `window_s` seconds."""

    def __init__(self, limit: int, window_s: float, clock=time.monotonic):
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._hits: dict[int, deque[float]] = defaultdict(deque)

    def check(self, user_id: int) -> float:
        """Record a request; returns 0 if allowed, else seconds until the next is allowed."""
        if self.limit <= 0:
            return 0.0
        now = self._clock()
        hits = self._hits[user_id]
        while hits and now - hits[0] >= self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return max(self.window_s - (now - hits[0]), 0.001)
        hits.append(now)
        return 0.0

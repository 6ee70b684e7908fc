"""Turn generated token ids into text deltas that are always whole characters.

Byte-level BPE splits one Chinese character over several tokens; decoding each
token alone would yield U+FFFD halves. `IncrementalDetokenizer` (the offsets
scheme vLLM and TGI use) only releases text once it decodes cleanly.
`StopStrings` then holds back any tail that might still grow into a stop
string, so a client never sees part of the stop text.
"""

from __future__ import annotations

from typing import Optional

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the new, complete text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the window decoded for context
        self.read_offset = 0  # tokens before this are already released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is left at the end, minus an incomplete character.

        Generation cut off (max_tokens) in the middle of a multi-byte character
        leaves bytes that decode as U+FFFD; vLLM never emits those, and neither
        do we: a client sees whole characters or nothing.
        """
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)


class StopStrings:
    """Cut generation at the first stop string, never releasing part of one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything generated so far
        self.released = 0  # chars of `text` handed out
        self.stopped = False
        self.matched: Optional[str] = None  # the stop string that ended generation (vLLM's stop_reason)

    def _held_tail(self, start: int) -> int:
        """Length of the longest tail of text[start:] that is a prefix of a stop string."""
        longest = 0
        tail = self.text[start:]
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(tail)), longest, -1):
                if tail.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def feed(self, delta: str) -> str:
        """Add new text; return what can be released now (sets `stopped` on a match)."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        hits = [(i, s) for s, i in ((s, self.text.find(s, self.released)) for s in self.stops) if i >= 0]
        if hits:
            end, self.matched = min(hits, key=lambda h: h[0])
            self.stopped = True
        else:
            end = len(self.text) - self._held_tail(self.released)
        out = self.text[self.released : end]
        self.released = max(self.released, end)
        return out

    def flush(self) -> str:
        """At the end of generation the held tail was not a stop string after all."""
        if self.stopped:
            return ""
        out = self.text[self.released :]
        self.released = len(self.text)
        return out


def make_text_stream(tokenizer, stops: Optional[list[str]]):
    """The pair the engine keeps per sequence."""
    return IncrementalDetokenizer(tokenizer), StopStrings(stops or [])

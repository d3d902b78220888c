"""Text from a stream of tokens: pieces that never split a character, cut before a stop string.

`Detokenizer` turns tokens into text one token at a time. A byte-level tokenizer may spend
several tokens on one character (a CJK character or an emoji is 3-4 byte tokens); decoding
them one by one would print replacement characters. Like vLLM's incremental detokenizer,
it decodes a short window of recent tokens and emits the new text only once it no longer
ends in the replacement character U+FFFD (after 4 such tokens, which complete any UTF-8
character, the text is emitted as it is: those bytes really are invalid). The window
starts with a few prompt tokens, so that a tokenizer which drops a leading space when a
token is decoded alone (SentencePiece) still gets the space right.

`StopText` cuts a stream of text pieces before the first occurrence of any stop string,
holding back a tail that might be the start of one.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_TOKENS = 4  # prompt tokens decoded with the first new tokens (leading spaces)
MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens
REPLACEMENT = "\ufffd"


class Detokenizer:
    """Text pieces of a growing token sequence; their concatenation is the decoded continuation."""

    def __init__(self, tokenizer, context: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = [int(t) for t in context][-CONTEXT_TOKENS:]
        self.prefix = 0              # the window decoded for context starts here
        self.read = len(self.ids)    # tokens before this are already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, force: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        complete = not text.endswith(REPLACEMENT) or len(self.ids) - self.read >= MAX_CHAR_TOKENS
        if len(text) <= len(before) or not (complete or force):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def push(self, token: int) -> str:
        """Add one token; returns the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token))
        return self._emit(force=False)

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end, as U+FFFD)."""
        return self._emit(force=True)


class StopText:
    """Passes text through until the first stop string, which is cut off together with everything after it."""

    def __init__(self, stop_strings: Sequence[str]):
        self.stops = list(stop_strings)
        self.pending = ""     # text held back: it may be the start of a stop string
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)]
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """One row's new text, piece by piece: decoded without split characters, ended before a stop string."""

    def __init__(self, tokenizer, context: Sequence[int] = (), stop_strings: Sequence[str] = ()):
        self.detokenizer = Detokenizer(tokenizer, context)
        self.stop = StopText(stop_strings)

    def push(self, token: int) -> str:
        return self.stop.push(self.detokenizer.push(token))

    def flush(self) -> str:
        return self.stop.push(self.detokenizer.flush()) + self.stop.flush()


def text_pieces(steps, tokenizer, contexts: list[list[int]], stop_strings: Sequence[str] = ()):
    """Text of a stream of `longmem.generation.Step`s: for one row, its non-empty text pieces (str); for several
    rows, a list of one piece per row ("" where a row has nothing new) whenever any row has something."""
    rows = [TextStream(tokenizer, context, stop_strings) for context in contexts]

    def out(pieces: list[str]):
        if any(pieces):
            yield pieces[0] if len(rows) == 1 else pieces

    for step in steps:
        live = step.live.tolist()
        yield from out([row.push(t) if alive else "" for row, t, alive in zip(rows, step.tokens.tolist(), live)])
    yield from out([row.flush() for row in rows])

"""The text of a response as its tokens arrive (block by block): detokenised, released only once it is final,
and ended before the first stop string (the first to be complete).

    text = ResponseText(decode, stop=["\\n\\n"])
    delta = text.feed(tokens)      # text that became final with these tokens ("" if none)
    text.stopped                   # a stop string was found: the response ends before it; feed no more
    delta = text.finish()          # the rest, once the request has ended without a stop string
    text.text, text.completion_tokens

Text is held back while it could still change: trailing U+FFFD (a UTF-8 character whose bytes are split over
tokens decodes so until its last byte arrives) and a tail that could be the start of a stop string. So the
released pieces add up to exactly the response's text, whether it is streamed or not.
"""
from typing import Callable, Optional, Sequence

REPLACEMENT = "\ufffd"


class ResponseText:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self.tokens: list[int] = []
        self.text = ""                       # released so far
        self.stopped = False
        self._stop_end: Optional[int] = None  # in the decoded text: where the first stop string ends

    def feed(self, tokens: Sequence[int]) -> str:
        """Adds committed tokens; returns the text that became final."""
        if self.stopped:
            raise RuntimeError("ResponseText: fed after its stop string")
        self.tokens += tokens
        decoded = self._decode(self.tokens)
        found = self._first_stop(decoded)
        if found is not None:
            start, end = found
            self.stopped, self._stop_end = True, end
            return self._release(decoded[:start])
        return self._release(decoded[:len(decoded) - self._held_back(decoded)])

    def finish(self) -> str:
        """The text not yet released, once no more tokens will come."""
        if self.stopped:
            return ""
        return self._release(self._decode(self.tokens))

    @property
    def completion_tokens(self) -> int:
        """Tokens of the response: all of them, or after a stop string those through the one that completes it."""
        if self._stop_end is None:
            return len(self.tokens)
        low, high = 1, len(self.tokens)                  # the fewest tokens whose text holds the stop string
        while low < high:
            mid = (low + high) // 2
            if len(self._decode(self.tokens[:mid]).rstrip(REPLACEMENT)) >= self._stop_end:
                high = mid
            else:
                low = mid + 1
        return low

    def _first_stop(self, decoded: str) -> Optional[tuple[int, int]]:
        """(start, end) of the first stop string to be complete (ending first; the longest if several end
        there), or None. That is the same whichever blocks the text arrived in."""
        matches = [(at + len(s), at) for s in self._stop if (at := decoded.find(s)) >= 0]
        if not matches:
            return None
        end, start = min(matches)
        return start, end

    def _held_back(self, decoded: str) -> int:
        """How many characters at the end of `decoded` could still change or start a stop string."""
        held = len(decoded) - len(decoded.rstrip(REPLACEMENT))
        body = decoded[:len(decoded) - held]
        for s in self._stop:
            for k in range(min(len(s) - 1, len(body)), 0, -1):
                if body.endswith(s[:k]):
                    held = max(held, len(decoded) - len(body) + k)
                    break
        return held

    def _release(self, upto: str) -> str:
        delta = upto[len(self.text):]
        self.text += delta
        return delta

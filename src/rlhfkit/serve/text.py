"""One answer's text as its tokens arrive: incremental detokenisation, stop strings, and the code base's one
decoding rule (`RolloutEngine.decode_ids`: special tokens dropped, surrounding whitespace stripped).

The whole answer is decoded again at each token (a few microseconds at these lengths) and only the new end
is given out, so multi-token characters and merges come out right; a text ending in an incomplete UTF-8
character waits for the next token. Held back until decided: leading whitespace (dropped), trailing
whitespace (given out only when more text follows) and an end that may be the start of a stop string. So
the pieces of a stream add up to exactly the text of the same answer unstreamed.

Where this departs from OpenAI: a chat answer's surrounding whitespace is stripped (our decoding rule
everywhere); a text completion keeps it (`strip=False`: " blue" continues "The sky is"). A stop string
ends the answer with finish_reason "stop" and is not part of the text (as OpenAI's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Push token ids, get the newly certain text; `stopped` once a stop string appeared."""

    def __init__(
        self, decode: Callable[[list[int]], str], stop: Sequence[str] = (), strip: bool = True
    ) -> None:
        self.decode = decode  # ids -> text, special tokens dropped, whitespace kept
        self.stop = [s for s in stop if s]
        self.strip = strip  # False: the raw continuation (/v1/completions, where a leading space matters)
        self.ids: list[int] = []
        self.raw = ""  # the decoded answer so far (cut before a stop string once one appeared)
        self.sent = 0  # characters of `raw` given out (or dropped as leading whitespace)
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the text it makes certain (often "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        raw = self.decode(self.ids)
        if raw.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for its other bytes
            return ""
        self.raw = raw
        found = [i for i in (raw.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        if found:
            self.raw, self.stopped = raw[: min(found)], True
            return self.finish()
        hold = max((n for s in self.stop for n in range(1, len(s)) if raw.endswith(s[:n])), default=0)
        end = len(raw) - hold
        return self._release(len(raw[:end].rstrip()) if self.strip else end)

    def finish(self) -> str:
        """The rest of the text once the answer ended (trailing whitespace dropped)."""
        return self._release(len(self.raw.rstrip()) if self.strip else len(self.raw))

    @property
    def text(self) -> str:
        """The answer's text so far, by the decoding rule (what the pieces given out add up to at the end)."""
        return self.raw.strip() if self.strip else self.raw

    def _release(self, end: int) -> str:
        start = max(self.sent, len(self.raw) - len(self.raw.lstrip())) if self.strip else self.sent
        if end <= start:
            return ""
        self.sent = end
        return self.raw[start:end]

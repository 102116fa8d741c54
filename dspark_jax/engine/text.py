"""Incremental detokenization of one request's output, with stop strings.

`tokenizers`' DecodeStream turns tokens into text as they arrive, holding back bytes of a UTF-8
character split across tokens; it is seeded with the end of the prompt so the first token's
leading space decodes as in the full text. A stop string ends the request: the text is cut
before it. Text that might still grow into a stop string is held back until it cannot.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

PROMPT_CONTEXT = 8  # prompt tokens the decoder sees before the first generated one


class TextStream:
    def __init__(self, tokenizer, prompt: list[int], stop: tuple[str, ...] = ()):
        self._backend = tokenizer.backend
        self._decoder = DecodeStream(ids=prompt[-PROMPT_CONTEXT:], skip_special_tokens=True)
        self._stop = stop
        self._longest = max(map(len, stop), default=0)
        self.text = ""  # everything decoded so far, cut at a stop string
        self._sent = 0

    def push(self, token: int) -> bool:
        """Add one token; True when the text now holds a stop string (it is cut before it)."""
        piece = self._decoder.step(self._backend, int(token))
        if not piece:
            return False
        search_from = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take(self, final: bool = False) -> str:
        """The text not handed out yet; unless final, minus a tail that may begin a stop string."""
        end = len(self.text)
        if not final:
            end -= self._held_back()
        out = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return out

    def _held_back(self) -> int:
        for size in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0

"""Constrained decoding to one JSON object (OpenAI's `response_format: {"type": "json_object"}`) for the hf engine.

A character-level pushdown automaton checks that text is a prefix of a JSON object with no
whitespace outside strings (as vLLM's `disable_any_whitespace`: a model cannot pad forever).
Each step the engine walks the vocabulary in its preference order (greedy: logits; sampling:
logits / T plus Gumbel noise, which samples exactly from the distribution restricted to the
valid tokens) and takes the first token whose text keeps the prefix valid and leaves a shortest
completion (`closer`, one token per character at worst) that fits in the tokens left, so the
object is closed within `max_tokens` (when that allows one at all: `{}` needs 2). A finished
object ends the sequence (finish_reason `stop`).

States are tuples `(stack, mode, aux)`: `stack` the open containers (`{`/`[`), `mode` what may
come next, `aux` the mode's detail (a string's role, a number's sub-state, a literal's rest).
"""

from __future__ import annotations

START = ((), "start", None)
DIGITS = "0123456789"
NUMBER_END = {"zero", "int", "frac", "exp"}  # number sub-states where the number may end
ESCAPES = '"\\/bfnrtu'
HEX = "0123456789abcdefABCDEF"


def _value_done(stack: tuple) -> tuple:
    return (stack, "after", None) if stack else ((), "done", None)


def _value_start(stack: tuple, ch: str):
    if ch == "{":
        return (stack + ("{",), "obj_first", None)
    if ch == "[":
        return (stack + ("[",), "arr_first", None)
    if ch == '"':
        return (stack, "str", "value")
    if ch == "-":
        return (stack, "num", "sign")
    if ch == "0":
        return (stack, "num", "zero")
    if ch in DIGITS:
        return (stack, "num", "int")
    for word in ("true", "false", "null"):
        if ch == word[0]:
            return (stack, "lit", word[1:])
    return None


def _number(state: tuple, ch: str):
    stack, _, sub = state
    nxt = {
        "sign": {**{d: "int" for d in DIGITS[1:]}, "0": "zero"},
        "zero": {".": "frac0", "e": "exp0", "E": "exp0"},
        "int": {**{d: "int" for d in DIGITS}, ".": "frac0", "e": "exp0", "E": "exp0"},
        "frac0": {d: "frac" for d in DIGITS},
        "frac": {**{d: "frac" for d in DIGITS}, "e": "exp0", "E": "exp0"},
        "exp0": {**{d: "exp" for d in DIGITS}, "+": "exps", "-": "exps"},
        "exps": {d: "exp" for d in DIGITS},
        "exp": {d: "exp" for d in DIGITS},
    }[sub].get(ch)
    if nxt is not None:
        return (stack, "num", nxt)
    if sub in NUMBER_END:  # the number ended: the character belongs to what follows it
        return feed(_value_done(stack), ch)
    return None


def feed(state: tuple | None, ch: str):
    """The state after `ch`, or None when the text can no longer be a JSON object's prefix."""
    if state is None:
        return None
    stack, mode, aux = state
    if mode == "start":
        return (("{",), "obj_first", None) if ch == "{" else None
    if mode == "str":
        if ch == '"':
            return (stack, "colon", None) if aux == "key" else _value_done(stack)
        if ch == "\\":
            return (stack, "esc", aux)
        return None if ord(ch) < 0x20 else state
    if mode == "esc":
        if ch not in ESCAPES:
            return None
        return (stack, "uni", (aux, 4)) if ch == "u" else (stack, "str", aux)
    if mode == "uni":
        role, left = aux
        if ch not in HEX:
            return None
        return (stack, "str", role) if left == 1 else (stack, "uni", (role, left - 1))
    if mode == "num":
        return _number(state, ch)
    if mode == "lit":
        if not aux or ch != aux[0]:
            return None
        return (stack, "lit", aux[1:]) if len(aux) > 1 else _value_done(stack)
    if mode in ("obj_first", "obj_key"):
        if ch == '"':
            return (stack, "str", "key")
        return _value_done(stack[:-1]) if ch == "}" and mode == "obj_first" else None
    if mode == "colon":
        return (stack, "value", None) if ch == ":" else None
    if mode == "value":
        return _value_start(stack, ch)
    if mode == "arr_first":
        return _value_done(stack[:-1]) if ch == "]" else _value_start(stack, ch)
    if mode == "after":
        top = stack[-1]
        if ch == ",":
            return (stack, "obj_key", None) if top == "{" else (stack, "value", None)
        if ch == ("}" if top == "{" else "]"):
            return _value_done(stack[:-1])
        return None
    return None  # done: nothing may follow the object


def feed_text(state: tuple | None, text: str):
    for ch in text:
        state = feed(state, ch)
        if state is None:
            return None
    return state


def is_done(state: tuple | None) -> bool:
    return state is not None and state[1] == "done"


_CLOSING_CHAR = {"start": "{", "str": '"', "esc": "n", "uni": "0", "obj_first": "}", "obj_key": '"', "colon": ":", "value": "0", "arr_first": "]"}


def closer(state: tuple) -> str:
    """The shortest text that completes the object from `state` (empty when it is complete)."""
    out = []
    while not is_done(state):
        stack, mode, aux = state
        end = "}" if stack and stack[-1] == "{" else "]"  # closes the innermost container
        if mode in _CLOSING_CHAR:
            ch = _CLOSING_CHAR[mode]
        elif mode == "num":  # an ended number closes its container (a number is never the top level)
            ch = end if aux in NUMBER_END else "0"
        elif mode == "lit":
            ch = aux[0]
        else:  # after
            ch = end
        out.append(ch)
        state = feed(state, ch)
    return "".join(out)


def piece_text(piece: str) -> str | None:
    """A SentencePiece piece's text as it decodes mid-sequence; None for a byte-fallback piece that
    is only part of a character (it can't be checked on its own)."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            byte = int(piece[3:5], 16)
        except ValueError:
            return piece
        return chr(byte) if byte < 0x80 else None
    return piece.replace("\u2581", " ")


def _after(state: tuple, tid: int, texts: list[str | None], tokens_left: int) -> tuple | None:
    """The state after token `tid` when it keeps `state` valid and its completion (`closer`) still
    fits in the tokens after it (`tokens_left` counts this token); else None."""
    text = texts[tid] if tid < len(texts) else None
    nxt = feed_text(state, text) if text else None
    return nxt if nxt is not None and len(closer(nxt)) <= tokens_left - 1 else None


def choose(state: tuple, order: list[int], texts: list[str | None], tokens_left: int) -> tuple[int, tuple] | None:
    """The first token of `order` (the engine's preference) that keeps `state` valid and leaves a
    completion (`closer`) that fits in the tokens after it, with the state after it. `tokens_left`
    counts this token. None when no token fits (the engine then ends the sequence)."""
    for tid in order:
        if (nxt := _after(state, tid, texts, tokens_left)) is not None:
            return tid, nxt
    return None


def closable(state: tuple, candidates: list[int], texts: list[str | None], tokens_left: int) -> list[int]:
    """The mask form of `choose` (for an engine that samples from a set, vLLM): those of
    `candidates` after which the object still closes in the tokens left (`tokens_left` counts this
    token); when none does, every token that starts the shortest completion (`closer`)."""
    keep = [tid for tid in candidates if _after(state, tid, texts, tokens_left) is not None]
    if keep:
        return keep
    close = closer(state)
    return [tid for tid, text in enumerate(texts) if text and close.startswith(text)]

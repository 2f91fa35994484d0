"""Deterministic plain text for the tiny model: words, number words, sums, templated sentences.

Both the tokenizer corpus and the pretraining corpus are built from these generators with a
seeded `random.Random`, so the same call always yields the same lines. Nothing here uses the
chat format: the pretrained base must meet `[INST]` for the first time during fine-tuning.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

NOUNS = ("cat dog bird fish horse cow sheep goat mouse lion tiger bear wolf fox rabbit frog "
         "tree river mountain city house garden road bridge table chair window door book letter "
         "apple bread water milk cheese stone cloud rain snow sun moon star ship train car boat "
         "teacher doctor farmer child friend king queen student baker painter sailor").split()
ADJS = ("red blue green small large old young quick slow happy quiet bright dark warm cold "
        "soft hard tall short heavy light new clean busy calm").split()
VERBS = ("sees finds likes takes makes holds reads paints builds carries watches follows "
         "helps visits opens closes").split()
PLACES = ("in the park", "near the river", "at the market", "on the hill", "by the sea",
          "in the kitchen", "under the bridge", "behind the house", "at school", "in the forest")
COLORS = "red orange yellow green blue purple black white brown grey".split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999999: 47 -> 'forty-seven', 2305 -> 'two thousand three hundred five'."""
    if not 0 <= n <= 999_999:
        raise ValueError(f"number_words supports 0..999999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        head = _ONES[hundreds] + " hundred"
    else:
        thousands, rest = divmod(n, 1000)
        head = number_words(thousands) + " thousand"
    return head if rest == 0 else f"{head} {number_words(rest)}"


def spell(word: str) -> str:
    """'cat' -> 'c a t'."""
    return " ".join(word)


def sentence(rng: random.Random) -> str:
    """One templated English sentence."""
    a, b = rng.choice(NOUNS), rng.choice(NOUNS)
    adj, verb, place = rng.choice(ADJS), rng.choice(VERBS), rng.choice(PLACES)
    n = rng.randint(2, 99)
    forms = (
        f"The {adj} {a} {verb} the {b} {place}.",
        f"A {a} {verb} a {adj} {b}.",
        f"There are {n} {a}s {place}.",
        f"The {a} is {adj}, and the {b} is {rng.choice(ADJS)}.",
        f"My friend has {number_words(n)} {rng.choice(COLORS)} {b}s.",
        f"Every morning the {a} {verb} the {b}.",
        f"Why does the {a} {verb[:-1]} the {b}? Because it is {adj}.",
    )
    return rng.choice(forms)


def sum_line(a: int, b: int, rng: random.Random) -> str:
    """A sum in one of several plain-text forms (never the chat format)."""
    c = a + b
    forms = (
        f"{a} plus {b} equals {c}.",
        f"{a} + {b} = {c}",
        f"The sum of {a} and {b} is {c}.",
        f"If you add {b} to {a} you get {c}.",
    )
    return rng.choice(forms)


def number_line(n: int, rng: random.Random) -> str:
    w = number_words(n)
    forms = (f"{n} is {w}.", f"The number {n} is written {w}.", f"{w} = {n}")
    return rng.choice(forms)


def spell_line(word: str, rng: random.Random) -> str:
    forms = (f"{word} is spelled {spell(word)}.", f"The letters of {word} are {spell(word)}.",
             f"{spell(word)} spells {word}.")
    return rng.choice(forms)


def reverse_line(word: str, rng: random.Random) -> str:
    fwd, back = spell(word), spell(word[::-1])
    forms = (f"{fwd} backwards is {back}.", f"The letters {fwd} reversed are {back}.",
             f"Read from the end, {fwd} becomes {back}.")
    return rng.choice(forms)


def random_word(rng: random.Random) -> str:
    """3-5 random lowercase letters (the `reverse` task's item space)."""
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))


def counting_line(rng: random.Random) -> str:
    start = rng.randint(0, 90)
    return " ".join(str(i) for i in range(start, start + rng.randint(4, 9)))


def alphabet_line(rng: random.Random) -> str:
    start = rng.randint(0, 20)
    return spell(LETTERS[start : start + rng.randint(4, 6)])


def mixed_lines(n: int, seed: int, keep_sum: Callable[[int, int], bool] = lambda a, b: True,
                keep_number: Callable[[int], bool] = lambda n: True,
                keep_reversal: Callable[[str], bool] | None = lambda w: True) -> Iterable[str]:
    """`n` lines mixing every generator above; items failing a filter are skipped.

    `keep_reversal=None` leaves reversed spellings out entirely.
    """
    rng = random.Random(seed)
    made = 0
    while made < n:
        kind = rng.random()
        if kind < 0.3:
            line = sentence(rng)
        elif kind < 0.52:
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            if not keep_sum(a, b):
                continue
            line = sum_line(a, b, rng)
        elif kind < 0.67:
            k = rng.randint(0, 999) if rng.random() < 0.7 else rng.randint(1000, 9999)
            if not keep_number(k):
                continue
            line = number_line(k, rng)
        elif kind < 0.8:
            line = spell_line(rng.choice(NOUNS + ADJS), rng)
        elif kind < 0.9:
            word = random_word(rng)
            if keep_reversal is None or not keep_reversal(word):
                continue
            line = reverse_line(word, rng)
        elif kind < 0.95:
            line = counting_line(rng)
        else:
            line = alphabet_line(rng)
        made += 1
        yield line


def tokenizer_corpus() -> list[str]:
    """Lines for the tokenizer: every number's words once, then 20k mixed lines."""
    lines = [number_line(k, random.Random(k)) for k in range(1000)]
    lines += list(mixed_lines(20_000, seed=1234))
    return lines

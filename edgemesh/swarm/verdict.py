"""Reading a model's free-text reply: a judge's verdict (A, B or U) or a multiple-choice letter.

Small models answer in every format ("Answer: A", "**B**", "b", "Response A is better because…",
a refusal); anything that does not name one side clearly is U (unsure) — never a guess.
"""

from __future__ import annotations

import re

A, B, U = "A", "B", "U"

_MARKUP = re.compile(r"[*_`#>]+")
# "Answer: A", "verdict - B", "the better answer is (A)", "final answer: response B", "winner = A"
_LABELLED = re.compile(
    r"\b(?:final\s+)?(?:verdict|answer|choice|winner|decision|pick|preference|judgement|judgment|option|result)"
    r"(?:\s+is)?\s*(?::|=|-|is|:\s*is)?\s*(?:answer|response|option|output)?\s*[\(\[\"']?\s*([A-Za-z])\s*[\)\]\"']?"
    r"(?=$|[\s.,;:!)\]\"'])",
    re.IGNORECASE,
)
# "Response A is better", "A is more accurate", "answer B is correct"
_BETTER = re.compile(
    r"\b(?:answer|response|option|output)?\s*([AB])\s+(?:is|was|seems|looks)\s+(?:clearly\s+|much\s+|more\s+|the\s+)?"
    r"(?:better|correct|right|more\s+accurate|more\s+correct|superior|preferable|stronger|winner|best)",
)
_PREFER = re.compile(r"\b(?:prefer|choose|pick|select|go\s+with)\s+(?:answer|response|option|output)?\s*\(?([AB])\b",
                     re.IGNORECASE)
_TIE = re.compile(
    r"\b(?:tie|tied|equal(?:ly)?|both\s+(?:are|answers|responses|equally)|neither|same|unsure|cannot\s+(?:decide|tell|determine)"
    r"|can't\s+(?:decide|tell|determine)|undecided|no\s+preference|hard\s+to\s+(?:say|tell))\b",
    re.IGNORECASE,
)
_LONE = re.compile(r"^\s*[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*(?:[.:)\-]|$)")
_STANDALONE = re.compile(r"(?<![\w'’])([AB])(?![\w'’])")


def _is_article(t: str, end: int) -> bool:
    """A capital "A" followed by a lower-case word is the article ("A cat…"), unless the word
    joins letters ("A or B")."""
    m = re.match(r" ([a-z]+)", t[end:])
    return bool(m) and m.group(1) not in ("or", "and", "vs", "versus", "nor")


def _clean(text: str) -> str:
    return _MARKUP.sub(" ", text or "").strip()


def parse_verdict(text: str) -> str:
    """A, B or U from a judge's reply."""
    t = _clean(text)
    if not t:
        return U
    m = _LONE.match(t)
    if m and m.group(1).upper() in (A, B, U) and (len(t) <= 3 or not t[m.end():].strip()[:1].islower()):
        return m.group(1).upper()
    found = [x.upper() for x in _LABELLED.findall(t)]
    found = [x for x in found if x in (A, B, U)]
    if found:
        return found[-1]  # the last labelled letter is the conclusion ("…so my answer: B")
    for pat in (_BETTER, _PREFER):
        got = {x.upper() for x in pat.findall(t)}
        if len(got) == 1:
            return got.pop()
    if _TIE.search(t):
        return U
    # Last resort: exactly one of the two letters stands alone somewhere ("I'd say B.").
    # A capital "A" followed by a lower-case word is the article, not a verdict.
    letters = {m.group(1) for m in _STANDALONE.finditer(t) if not (m.group(1) == A and _is_article(t, m.end()))}
    if len(letters) == 1:
        return letters.pop()
    return U


def parse_choice(text: str, options: str = "ABCD") -> str | None:
    """The option letter a multiple-choice answer commits to, or None.

    Looks for a labelled letter ("The answer is C", "Answer: (b)"), then a reply that starts with
    a letter ("C) Paris", "**D**"), then a single standalone capital option letter."""
    t = _clean(text)
    if not t:
        return None
    opts = options.upper()
    m = _LONE.match(t)
    if m and m.group(1).upper() in opts and (len(t) <= 3 or not t[m.end():].strip()[:1].islower()
                                              or t[m.end() - 1:m.end()] in ".:)"):
        return m.group(1).upper()
    found = [x.upper() for x in _LABELLED.findall(t) if x.upper() in opts]
    if found:
        return found[0]  # the first labelled letter is the claim; later ones are usually discussion
    letters = []
    for m in re.finditer(r"(?<![\w'’])([A-Z])(?![\w'’])", t):
        x = m.group(1)
        if x in opts and not (x == "A" and _is_article(t, m.end())):
            letters.append(x)
    if len(set(letters)) == 1:
        return letters[0]
    return None

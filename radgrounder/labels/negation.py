"""NegEx-style negation scope for English and German radiology sentences.

``negated_spans(sentence, language)`` returns the character ranges that a negation cue denies;
``is_negated(sentence, start, end, language)`` says whether ``sentence[start:end]`` overlaps one.
A mention is negated when it is part of the phrase whose presence is denied: "no focal liver
lesion" (liver negated), "the gallbladder is not visualized" (negated), but not "the spleen is
not enlarged" (the spleen is asserted, its enlargement denied), "unremarkable", "liver
metastases cannot be excluded" (possible, not denied) or "no change of the liver lesions".

Rules (phrases are matched case-insensitively over word tokens, longest first; umlauts may be
written ae/oe/ue/ss):

* pre-triggers deny the words after them: EN "no", "without", "negative for", "free of",
  "no evidence of", "no signs of", "rules out", "absence of", "nor"; DE "kein/keine/keinen/
  keinem/keiner/keines", "ohne", "kein Nachweis", "kein Hinweis auf", "kein Anhalt
  für", "Ausschluss", "frei von", "weder".
* a bare "not"/"nicht" denies only the next word: it nearly always negates an adjective
  ("the spleen is not enlarged and ...", "nicht dislozierte Fraktur" = a fracture is present).
* post-triggers deny the words before them: EN "is/are absent", "not seen", "not identified",
  "not visualized", "no longer seen"; DE "nicht nachweisbar", "nicht abgrenzbar", "nicht
  darstellbar", "nicht erkennbar", "nicht vorhanden", "fehlt".
* "absent", "ruled out", "excluded", "ausgeschlossen" look forward when a word follows them in
  the clause ("ruled out pulmonary embolism") and backward otherwise ("embolism is ruled out").
* pseudo-triggers contain a cue but deny nothing, and stop a running scope: EN "no change",
  "no interval change", "no increase", "not only", "without change", "cannot be excluded", "not
  ruled out"; DE "nicht auszuschließen", "nicht sicher auszuschließen", "keine (wesentliche)
  Befundänderung", "ohne Befundänderung", "keine Größenzunahme", "nicht nur", "zum Ausschluss".
* terminators end a scope: EN "but", "however", "although", "except", "which", "whereas",
  "other than"; DE "aber", "jedoch", "allerdings", "bei", "wobei", "während", "außer",
  "sondern"; ";" and ":" and the end of the sentence (split with
  :func:`radgrounder.labels.sentences.split_sentences`). "sowie", "and", "und", "or" keep it.
* a comma ends a scope when the stretch on the far side of it (up to the next comma) holds a
  finite verb ("No ascites, the liver is enlarged"); otherwise it separates list items ("No
  mass in the liver, spleen or pancreas") and restarts the word count.
* scope window: at most 6 words (EN) or 8 words (DE, whose articles and genitives make phrases
  longer: "kein Hinweis auf eine Raumforderung der Leber") after a pre-trigger or before a
  post-trigger; punctuation and copulas ("is", "ist") are not counted.
"""

from __future__ import annotations

import re
from functools import cache

from radgrounder.errors import RadGrounderError
from radgrounder.labels.sentences import split_sentences

__all__ = ["is_negated", "negated_spans"]

_PRE, _NARROW, _POST, _EITHER, _PSEUDO, _TERM = "pre", "narrow", "post", "either", "pseudo", "term"
_WINDOW = {"en": 6, "de": 8}

# Phrase lists are "|"-separated: one string per kind keeps the tables compact and greppable.
_RULES: dict[str, dict[str, str]] = {
    "en": {
        _PRE: "no | without | negative for | free of | no evidence of | no evidence for | "
        "no signs of | no sign of | no findings of | no suspicion of | rules out | rule out | "
        "absence of | lack of | nor | neither | none | no longer | never",
        _NARROW: "not",
        _POST: "is absent | are absent | not seen | not identified | not visualized | "
        "not visualised | not demonstrated | not detected | not present | not evident | "
        "not appreciated | not delineated | not depicted | no longer seen | no longer visible | "
        "no longer identified | no longer present",
        _EITHER: "absent | ruled out | excluded",
        _PSEUDO: "no change | no significant change | no interval change | "
        "no significant interval change | no definite change | no relevant change | "
        "no increase | no significant increase | no decrease | no progression | no growth | "
        "not only | without change | without significant change | without interval change | "
        "cannot be excluded | can not be excluded | cannot be ruled out | can not be ruled out | "
        "could not be excluded | could not be ruled out | not be excluded | not be ruled out | "
        "not excluded | not ruled out | not been excluded | not been ruled out | "
        "not necessarily | not significantly changed | gram negative",
        _TERM: "but | however | although | though | except | apart from | aside from | which | "
        "whereas | while | other than | with the exception of | nevertheless | instead",
    },
    "de": {
        _PRE: "kein | keine | keinen | keinem | keiner | keines | ohne | kein nachweis | "
        "kein hinweis auf | keine hinweise auf | kein anhalt für | keine anhaltspunkte für | "
        "kein verdacht auf | ohne nachweis | ohne hinweis auf | ohne anhalt für | ausschluss | "
        "frei von | weder",
        _NARROW: "nicht",
        _POST: "nicht nachweisbar | nicht mehr nachweisbar | nicht sicher nachweisbar | "
        "nicht abgrenzbar | nicht mehr abgrenzbar | nicht sicher abgrenzbar | "
        "nicht darstellbar | nicht mehr darstellbar | nicht erkennbar | nicht sichtbar | "
        "nicht vorhanden | nicht nachzuweisen | nicht abzugrenzen | nicht darzustellen | "
        "nicht zu erkennen | fehlt | fehlen",
        _EITHER: "ausgeschlossen",
        _PSEUDO: "nicht auszuschließen | nicht sicher auszuschließen | "
        "nicht mit sicherheit auszuschließen | nicht ausgeschlossen | "
        "nicht sicher ausgeschlossen | nicht sicher ausgeschlossen werden | "
        "nicht ausgeschlossen werden | keine änderung | keine wesentliche änderung | "
        "keine relevante änderung | keine befundänderung | keine wesentliche befundänderung | "
        "ohne befundänderung | ohne wesentliche befundänderung | ohne änderung | "
        "keine größenänderung | keine größenzunahme | keine wesentliche größenzunahme | "
        "keine größenprogredienz | keine progredienz | keine zunahme | keine abnahme | "
        "keine größenregredienz | kein befundwandel | kein wesentlicher befundwandel | "
        "ohne befundwandel | nicht nur | zum ausschluss | frage nach | fragestellung | "
        "nicht wesentlich",
        _TERM: "aber | jedoch | allerdings | bei | wobei | während | außer | abgesehen | "
        "bis auf | mit ausnahme | dagegen | hingegen | sondern | welche | welcher | welches | "
        "weil | trotz",
    },
}


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_COPULAS = {
    "en": _words("is are was were be been being"),
    "de": _words("ist sind war waren wird werden wurde wurden"),
}
# Finite verbs that make the stretch beyond a comma a clause of its own.
_VERBS = {
    "en": _words(
        "is are was were has have had shows show showed demonstrates demonstrate appears "
        "appear remains remain seems contains extends measures measure there"
    ),
    "de": _words(
        "ist sind war waren zeigt zeigen zeigte findet finden besteht bestehen liegt liegen hat "
        "haben wird werden wurde erscheint erscheinen imponiert imponieren misst messen stellt "
        "stellen kommt lässt sich"
    ),
}
_HARD_STOPS = frozenset(";:")
_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")
_TRANSLIT = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss"})


def _check_language(language: object) -> str:
    if language not in _RULES:
        raise RadGrounderError(
            f"language: unknown value {language!r}; expected one of {', '.join(_RULES)}"
        )
    return str(language)


def _norm(token: str) -> str:
    return "ß".join(part.casefold() for part in token.split("ß"))


@cache
def _trigger_trie(language: str) -> dict:
    """Token trie: each node maps a normalized token to a child; key None holds the kind."""
    trie: dict = {}
    for kind, phrases in _RULES[language].items():
        for phrase in phrases.split("|"):
            for variant in {phrase, phrase.translate(_TRANSLIT)}:
                node = trie
                for token in _TOKEN.findall(variant.strip()):
                    node = node.setdefault(_norm(token), {})
                node[None] = kind
    return trie


def _triggers(tokens: list[str], language: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (first, stop, kind) trigger matches over token indices, leftmost-longest."""
    trie, found, i = _trigger_trie(language), [], 0
    while i < len(tokens):
        node, best = trie, None
        for j in range(i, len(tokens)):
            node = node.get(tokens[j])
            if node is None:
                break
            if None in node:
                best = (i, j + 1, node[None])
        if best:
            found.append(best)
            i = best[1]
        else:
            i += 1
    return found


def _has_verb(tokens: list[str], indices: range, language: str) -> bool:
    for k in indices:
        if tokens[k] in (",", ";", ":"):
            return False
        if tokens[k] in _VERBS[language]:
            return True
    return False


def _is_word(token: str, language: str) -> bool:
    """A token that counts towards the window (no punctuation, no copula)."""
    return token[0].isalnum() and token not in _COPULAS[language]


def _scan(
    tokens: list[str], begin: int, step: int, stops: set[int], language: str, window: int
) -> int:
    """Index one past the last scope token when scanning from ``begin`` in direction ``step``."""
    count, k = 0, begin
    while 0 <= k < len(tokens) and k not in stops:
        token = tokens[k]
        if token in _HARD_STOPS:
            break
        if token == ",":
            beyond = range(k + 1, len(tokens)) if step > 0 else range(k - 1, -1, -1)
            if window == 1 or _has_verb(tokens, beyond, language):
                break
            count = 0  # a list goes on: each item gets the full window
        elif _is_word(token, language):
            count += 1
            if count > window:
                break
        k += step
    return k


def _sentence_spans(text: str, offset: int, language: str) -> list[tuple[int, int]]:
    matches = list(_TOKEN.finditer(text))
    tokens = [_norm(m.group()) for m in matches]
    found = _triggers(tokens, language)
    # A scope stops where any other cue or terminator starts (scanning forward) or ends
    # (scanning backward).
    starts = {first for first, _, _ in found}
    ends = {stop - 1 for _, stop, _ in found}
    spans = []
    for first, stop, kind in found:
        if kind == _EITHER:
            following = tokens[stop] if stop < len(tokens) else ""
            kind = _PRE if following[:1].isalnum() else _POST
        if kind in (_PRE, _NARROW):
            window = 1 if kind == _NARROW else _WINDOW[language]
            lo, hi = stop, _scan(tokens, stop, 1, starts, language, window) - 1
        elif kind == _POST:
            hi = first - 1
            lo = _scan(tokens, hi, -1, ends, language, _WINDOW[language]) + 1
        else:
            continue
        while lo <= hi and not _is_word(tokens[lo], language):
            lo += 1
        while hi >= lo and not _is_word(tokens[hi], language):
            hi -= 1
        if lo <= hi:
            spans.append((offset + matches[lo].start(), offset + matches[hi].end()))
    return spans


def negated_spans(sentence: str, language: str) -> list[tuple[int, int]]:
    """Character ranges of ``sentence`` that lie in a negation scope, in text order."""
    _check_language(language)
    if not isinstance(sentence, str):
        raise RadGrounderError(f"sentence: expected a string, got {type(sentence).__name__}")
    spans: list[tuple[int, int]] = []
    for start, end in split_sentences(sentence, language):
        spans.extend(_sentence_spans(sentence[start:end], start, language))
    return sorted(spans)


def is_negated(sentence: str, start: int, end: int, language: str) -> bool:
    """Whether ``sentence[start:end]`` overlaps a negation scope."""
    if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start <= end:
        raise RadGrounderError(f"start/end: need 0 <= start <= end, got {start!r}, {end!r}")
    if end > len(sentence):
        raise RadGrounderError(f"end: {end} is past the sentence end ({len(sentence)})")
    return any(lo < end and start < hi for lo, hi in negated_spans(sentence, language))

"""Split English and German radiology reports into sentences.

``split_sentences(text, language)`` returns character spans ``(start, end)`` into ``text``; each
span excludes surrounding whitespace and any list marker ("- ", "• ", "1. ", "a) ") that opens
its line, and keeps the sentence's own final punctuation.

Rules, in order:

* Lines. A blank line, a line opening with a list marker, and a line that starts with anything
  but a lowercase letter start a new sentence; a line starting lowercase continues a
  hard-wrapped sentence. A German line starting "3. Lendenwirbelkörper" or "7. bis 9. Rippe" is
  an ordinal, not an enumeration.
* "!" and "?" followed by whitespace end a sentence.
* "." followed by whitespace ends a sentence only if the next word does not start with a
  lowercase letter (reports never open a sentence lowercase) and the word before the period is
  not an abbreviation that needs a continuation ("e.g.", "approx.", "vs.", "Dr.", "z.B.", "V.a.",
  "Z.n.", "bzw.", "ca.", "ggf.", "u.a.", "Pat.", Latin "A."/"V."/"M.", initials). Periods inside
  a token ("2.2 cm", "12.03.2024", "i.v.") are never boundaries.
* Abbreviations that may also close a sentence ("cm.", "mm.", "etc.", "o.B.", German side words
  "re.", "li.", "bds.") end one before a capitalised word, except that a German side word after
  a lowercase word is a prenominal adjective ("der re. Niere").
* German "<number>. <Word>" is an ordinal ("10. Rippe", "am 3. Tag") when the next word is an
  ordinal noun or a range word ("bis", "und") or an article/preposition precedes the number;
  after a vertebra code ("LWK 3. Keine ...") the number is a cardinal and may end a sentence.
"""

from __future__ import annotations

import re

from radgrounder.errors import RadGrounderError

__all__ = ["iter_sentences", "split_sentences"]

_LANGUAGES = ("en", "de")


# Words before a period that always continue the sentence (lowercase, final period removed).
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_NEVER_END = {
    "en": _words("e.g i.e approx appr vs dr mr mrs ms prof cf fig figs incl st nr ca sr jr ref"),
    "de": _words(
        "z.b v.a z.n bzw ca ggf u.a i.v pat dr prof vgl evtl sog inkl exkl max mind nr "
        "z.t d.h u.u o.g i.s m.e a.e vd.a st fr hr abb tel zn va zb insb bzgl ggü ggue lt "
        "aa vv mm lig lnn proc a.p p.a"
    ),
}
# Abbreviations that may also be the last word of a sentence.
_MAY_END = {
    "en": _words("cm mm ml min etc rt lt bilat i.v resp"),
    "de": _words("cm mm ml min etc usw re li bds bdsts o.b s.o s.u"),
}
_DE_SIDE_ABBR = frozenset({"re", "li", "bds", "bdsts"})
_DE_VERTEBRA_CODES = _words("lwk bwk hwk swk l th t c s d segment grad typ nr stadium")
_DE_ORDINAL_NOUNS = tuple(
    _words(
        "rippe lendenwirbel brustwirbel halswirbel sakralwirbel kreuzbeinwirbel zervikalwirbel "
        "thorakalwirbel lumbalwirbel wirbel lwk bwk hwk swk segment icr interkostalraum "
        "intercostalraum zehe finger strahl lebensjahr tag woche monat zyklus kontrolle "
        "voruntersuchung quartal januar februar märz maerz april mai juni juli august september "
        "oktober november dezember"
    )
)
_DE_RANGE_WORDS = frozenset({"bis", "und", "u", "oder", "-", "–", "/"})
_DE_ARTICLES = _words(
    "der die das den dem des im am zum zur vom beim ab seit bis zwischen ein eine einer einem "
    "eines einen in an von auf nach ohne mit bei"
)

_MARKER = re.compile(r"(?:[-–—•*·▪]|\(?\d{1,2}[.)]|\(?[a-z]\))[ \t]+")
_PERIOD = re.compile(r"[.!?]+(?=\s|$)")
_OPENERS = "([{\"'„“‚‘«»"


def _check(text: object, language: object) -> None:
    if language not in _LANGUAGES:
        raise RadGrounderError(
            f"language: unknown value {language!r}; expected one of {', '.join(_LANGUAGES)}"
        )
    if not isinstance(text, str):
        raise RadGrounderError(f"text: expected a string, got {type(text).__name__}")


def _is_ordinal_context(next_word: str) -> bool:
    word = next_word.lower().strip(_OPENERS)
    return word in _DE_RANGE_WORDS or word.startswith(_DE_ORDINAL_NOUNS)


def _marker_length(line: str, language: str) -> int:
    """Length of a list marker opening ``line`` (after indentation), or 0."""
    match = _MARKER.match(line)
    if not match:
        return 0
    marker = match.group().strip()
    if language == "de" and marker[-1] == "." and marker[:-1].isdigit():
        rest = line[match.end() :].split(maxsplit=1)
        if rest and _is_ordinal_context(rest[0]):
            return 0
    return match.end()


def _blocks(text: str, language: str) -> list[tuple[int, int]]:
    """Runs of lines that belong together, list markers already cut off the front."""
    blocks: list[tuple[int, int]] = []
    current: list[int] | None = None
    pos = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        stripped = body.strip()
        if not stripped:
            if current:
                blocks.append((current[0], current[1]))
            current = None
        else:
            indent = len(body) - len(body.lstrip())
            marker = _marker_length(body[indent:], language)
            line_end = pos + len(body.rstrip())
            if current and not marker and stripped[0].islower():
                current[1] = line_end  # a hard-wrapped sentence goes on
            else:
                if current:
                    blocks.append((current[0], current[1]))
                current = [pos + indent + marker, line_end]
        pos += len(line)
    if current:
        blocks.append((current[0], current[1]))
    return blocks


def _words_before(text: str, start: int, stop: int) -> tuple[str, str]:
    """The whitespace-delimited word ending at ``stop`` and the word before it."""
    words = text[start:stop].split()
    word = words[-1] if words else ""
    prev = words[-2] if len(words) > 1 else ""
    return word.lstrip(_OPENERS), prev.strip(_OPENERS + ",;:)")


def _is_boundary(word: str, prev: str, next_word: str, language: str) -> bool:
    """Whether "<prev> <word>. <next_word>" ends a sentence after the period."""
    if not next_word:
        return True
    first = next_word.lstrip(_OPENERS)[:1] or next_word[0]
    if first.islower():
        return False
    key = word.lower().rstrip(".")
    if key in _NEVER_END[language]:
        return key == "mm" and prev[-1:].isdigit()  # "12 mm." vs "Mm. glutei"
    if len(key) == 1 and key.isalpha():
        return False  # initials, Latin "A. iliaca", "V. cava"
    if key in _MAY_END[language]:
        if language == "de" and key in _DE_SIDE_ABBR:
            return bool(prev) and not prev[0].islower()
        return True
    if language == "de" and key.isdigit():
        if prev.lower() in _DE_VERTEBRA_CODES:
            return True
        return not (_is_ordinal_context(next_word) or prev.lower() in _DE_ARTICLES)
    # An unlisted dotted abbreviation ("o.g.", "s.c.") rarely ends a sentence.
    return not re.fullmatch(r"(?:[^\W\d_]{1,3}\.)+[^\W\d_]{1,3}", key)


def _cuts(text: str, start: int, end: int, language: str) -> list[int]:
    cuts = []
    for match in _PERIOD.finditer(text, start, end):
        if "!" in match.group() or "?" in match.group():
            cuts.append(match.end())
            continue
        rest = text[match.end() : end].split(maxsplit=1)
        word, prev = _words_before(text, start, match.start())
        if _is_boundary(word, prev, rest[0] if rest else "", language):
            cuts.append(match.end())
    return cuts


def split_sentences(text: str, language: str) -> list[tuple[int, int]]:
    """Character spans of the sentences in ``text`` (a report or a part of one)."""
    _check(text, language)
    spans: list[tuple[int, int]] = []
    for block_start, block_end in _blocks(text, language):
        start = block_start
        for cut in [*_cuts(text, block_start, block_end, language), block_end]:
            segment = text[start:cut]
            lead = len(segment) - len(segment.lstrip())
            trail = len(segment.rstrip())
            if trail > lead:
                spans.append((start + lead, start + trail))
            start = cut
    return spans


def iter_sentences(text: str, language: str) -> list[str]:
    """The sentences of ``text`` as strings (see :func:`split_sentences`)."""
    return [text[start:end] for start, end in split_sentences(text, language)]

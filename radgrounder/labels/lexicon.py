"""Keyword extraction of anatomy mentions from English and German report sentences.

``extract_mentions(sentence, language)`` / ``LexiconExtractor(language).extract`` return one
:class:`~radgrounder.labels.mentions.Mention` per named class, ``negated`` set by
:mod:`radgrounder.labels.negation`. Candidates from these sources are resolved greedily
leftmost-longest, so phrases never overlap ("left lower lobe" beats "lobe"):

* synonym-table terms (:mod:`radgrounder.anatomy.synonyms`) via a token trie: whole tokens, case-
  and whitespace-insensitive; a side abbreviation keeps its period ("Niere re.", "Nieren bds.").
* coordinated sides name both: "right and left kidney", "rechte und linke Niere", "Niere rechts
  und links".
* vertebra ranges name every level between ("L3-L5", "L3 to L5", "LWK 3-5", "BWK 7 bis 9",
  "Th11-L1"); a disc level ("L4/5", "C5-C6", "L5/S1") names both adjacent vertebrae, there
  being no per-level disc class. Rib lists/ranges: "right 7th and 8th ribs", "7. bis 9. Rippe
  links".
* adjectives (``_ADJ``): "hepatic" -> liver, "renal" -> kidneys, "left renal" -> left kidney,
  German "hepatisch", "pulmonal"... in every declension; "pulmonary" only before a lung-tissue
  noun (not "pulmonary embolism"); none before artery, vein or valve words.
* German compounds: an organ stem (one-word table term or its linking form "Nieren-",
  "Aorten-", "Hüft-") opening a word is a mention of that part ("Leber" in "Leberläsion"), as
  is a head-final organ ("leber" in "Fettleber"). The rest must look like a noun: 3+ letters,
  no adjective suffix ("nierenförmig"), no vessel ("Lebervenen": no class). "-parenchym" and
  "-schlingen" words name the organ itself and take the whole word. An adjacent side word joins
  the mention and picks the side: "Nebennierenadenom links", "des linken Hüftgelenks".

Context filters drop false friends: "T1"/"T2" (MR sequences), TNM stages ("T3 N1"), nerve roots
and segments ("Nervenwurzel S1"), "optic disc", the pelvis as a region ("fluid in the pelvis",
"abdomen and pelvis", "im kleinen Becken").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from radgrounder.anatomy import check_language, load_schema
from radgrounder.anatomy.synonyms import lookup, synonym_table
from radgrounder.errors import RadGrounderError
from radgrounder.labels.mentions import Mention
from radgrounder.labels.negation import negated_spans

__all__ = ["LexiconExtractor", "extract_mentions"]


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")
_SIDES = {"en": _words("left right lt rt"), "de": _words("rechts links re li")}
_DOT_ABBR = _words("re li bds rt lt")
_COORD = _words("and und or oder /")
_DE_POST_SIDE = re.compile(r"\s+(rechts|links|re\.|li\.|beidseits|beidseitig|bds\.)", re.I)
_DE_PRE_SIDE = re.compile(
    r"(?<!\w)(?:(rechts|links|beid)seitig\w*|(recht|link)e[nrms]?|(re|li)\.)\s+\Z", re.I
)
_DE_SIDE_WORD = {"recht": "rechts", "re": "rechts", "link": "links", "li": "links", "beid": "bds"}

# Adjective -> base noun: the base's table entry gives the classes, "<side> <base>" the side.
_ADJ = {
    lang: dict(item.split("=") for item in pairs.split())
    for lang, pairs in {
        "en": "hepatic=liver renal=kidney splenic=spleen pancreatic=pancreas gastric=stomach "
        "colonic=colon duodenal=duodenum esophageal=esophagus oesophageal=esophagus "
        "tracheal=trachea cardiac=heart aortic=aorta sternal=sternum vertebral=vertebra "
        "prostatic=prostate cerebral=brain pulmonary=lung",
        "de": "hepatisch=leber renal=niere lienal=milz splenisch=milz pankreatisch=pankreas "
        "gastral=magen kardial=herz zerebral=hirn aortal=aorta ösophageal=ösophagus "
        "duodenal=duodenum pulmonal=lunge",
    }.items()
}
_ADJ_ENDINGS = ("e", "en", "er", "es", "em")
_ADJ_SIDES = {"left": "left", "right": "right", "bilateral": "bilateral", "both": "bilateral"}
_ADJ_BLOCK = _words(
    "artery arteries arterial vein veins venous valve valves stenosis regurgitation "
    "insufficiency arterie arterien vene venen gefäße gefäß klappe"
)
_LUNG_NOUNS = re.compile(
    r"nodul|mass|metasta|parenchym|emphysem|fibros|consolidat|infiltrat|opacit|lesion|granulom"
    r"|edema|contusion|rundherd|herd|raumforderung|verdichtung|knoten|läsion|stauung"
)
_ADJ_ABSORB = {"renal": "pelvis"}  # "renal pelvis" is kidney, not the bony pelvis

# Compound stems left out: ambiguous ("Dens" in "Densität", "Hepar" in "Heparin"), or a region
# more often than the bone ("Beckenboden").
_STEM_BLOCK = _words(
    "dens atlas axis lien splen hepar gaster becken beckens pulmo pulmones lwk bwk hwk swk lws "
    "bws hws cor sigmas"
)
_HEAD_FINAL_BLOCK = _words("blase blasen magen darm wirbels herzen")  # "Luftblase", "Sanduhr…"
_PREFIX_BLOCK = ("neben",)  # "Nebenmilz" is an accessory spleen, not the spleen
_REST_START_BLOCK = tuple(_words("förmig foermig artig ähnlich aehnlich arterie vene gefäß"))
_REST_END_BLOCK = ("lich", "isch", "ig", "ität")
_WHOLE_WORD_REST = _words("parenchym parenchyms schlinge schlingen")

_LEVELS = [
    f"{r}{n}" for r, top in (("C", 7), ("T", 12), ("L", 5), ("S", 1)) for n in range(1, top + 1)
]
_CODE = r"(?:LWK|BWK|HWK|SWK|Th|T|L|C|S|D)"
_REGION = {"lwk": "L", "bwk": "T", "hwk": "C", "swk": "S", "th": "T", "d": "T"}
_RANGE = re.compile(
    rf"(?<![\w.])(?P<c1>{_CODE}) ?-? ?(?P<n1>\d{{1,2}})(?: ?(?:-|–|/) ?| (?:to|through|bis) )"
    rf"(?:(?P<c2>{_CODE}) ?-? ?)?(?P<n2>\d{{1,2}})(?!\w|\.\d)"
    r"(?: vertebral bodies| vertebrae| vertebral body)?",
    re.I,
)
# Rib lists/ranges, EN and DE alike: "right 7th and 8th ribs", "7. bis 9. Rippe links".
_NUM = r"\d{1,2}(?:st|nd|rd|th|\.)?"
_NUMS = rf"{_NUM}(?:(?:\s*[,/–-]\s*|\s+(?:and|to|through|or|und|bis|oder|u\.)\s+){_NUM})*"
_SIDE_PRE = r"left|right|bilateral|rechte[nrms]?|linke[nrms]?|beide[nr]?|re\.|li\."
_SIDE_POST = r"on the (?:left|right)|bilaterally|on both sides|rechts|links|re\.|li\.|bds\."
_RIBS = re.compile(
    rf"(?<![\w.])(?:(?P<pre>{_SIDE_PRE})\s+)?"
    rf"(?:(?P<nums>{_NUMS})\s+(?:(?P<mid>{_SIDE_PRE})\s+)?(?:ribs?|Rippen?)"
    rf"|(?:ribs?|Rippen?)\s+(?P<nums2>{_NUMS}))(?!\w)(?:\s+(?P<post>{_SIDE_POST}|beidseits))?",
    re.I,
)
_VERTEBRA_DROP_NEIGHBOURS = _words(
    "segment segments root roots nerve wurzel nervenwurzel nervenwurzeln dermatom dermatome "
    "abusus weighted gewichtet w hyperintense hypointense hyperintens hypointens signal "
    "sequence sequenz stir tse fs"
)


@dataclass(frozen=True)
class _Candidate:
    start: int
    end: int
    classes: tuple[str, ...]
    side_at: int = -1  # start of a trailing side word ("kidney, left"), -1 if none


def _union(*groups: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name for group in groups for name in group))


def _norm(token: str) -> str:
    return "ß".join(part.casefold() for part in token.split("ß"))


@cache
def _trie(language: str) -> dict:
    """Token trie over the synonym table; key None holds the classes of a complete term."""
    root: dict = {}
    for key, classes in synonym_table(language).items():
        tokens = _TOKEN.findall(key)
        for variant in [tokens, [*tokens, "."]] if tokens[-1] in _DOT_ABBR else [tokens]:
            node = root
            for token in variant:
                node = node.setdefault(token, {})
            node[None] = classes
    return root


def _walk(trie: dict, tokens: list[str], i: int) -> list[tuple[int, tuple[str, ...]]]:
    """Every table term starting at token ``i``: (index past its last token, classes)."""
    found, node = [], trie
    for j in range(i, len(tokens)):
        node = node.get(tokens[j])
        if node is None:
            break
        if None in node:
            found.append((j + 1, node[None]))
    return found


@cache
def _stems(language: str) -> dict[str, tuple[str, tuple[str, ...]]]:
    """German compound stem -> (base term, classes): one-word terms and their linking forms."""
    table = synonym_table(language)
    plain = {k: (k, c) for k, c in table.items() if k.isalpha() and len(k) >= 4}
    plain = {k: v for k, v in plain.items() if k not in _STEM_BLOCK}
    # Linking forms take the singular as base, so "Nierenbecken links" can look up "niere links".
    linked = {k[:-1] + "en": v for k, v in plain.items() if k[-1] in "ae"}
    hip = ("hüfte", table["hüfte"])
    return {**plain, **linked, "hüft": hip, "hueft": hip}


@cache
def _class_ids() -> dict[str, int]:
    return {c.name: c.id for c in load_schema()}


class LexiconExtractor:
    """Finds anatomy mentions in single report sentences of one language."""

    def __init__(self, language: str) -> None:
        self.language = check_language(language)
        self._trie = _trie(self.language)
        self._stems = _stems(self.language) if self.language == "de" else {}
        self._table = synonym_table(self.language)
        self._ids = _class_ids()

    def extract(self, sentence: str) -> list[Mention]:
        """Mentions in ``sentence``, ordered by position, one per named class."""
        if not isinstance(sentence, str):
            raise RadGrounderError(f"sentence: expected a string, got {type(sentence).__name__}")
        if not sentence.strip():
            return []
        spans = list(_TOKEN.finditer(sentence))
        tokens = [_norm(m.group()) for m in spans]
        found = self._table_terms(spans, tokens) + self._ranges(sentence)
        found += self._adjectives(spans, tokens) + self._compounds(sentence, spans, tokens)
        chosen = _resolve([c for c in found if self._keep(c, sentence, spans, tokens)])
        negated = negated_spans(sentence, self.language) if chosen else []
        mentions = []
        for c in chosen:
            neg = any(lo < c.end and c.start < hi for lo, hi in negated)
            for name in sorted(c.classes, key=self._ids.__getitem__):
                text = sentence[c.start : c.end]
                mentions.append(Mention(c.start, c.end, text, name, self._ids[name], neg))
        return mentions

    # ------------------------------------------------------------------ candidate sources

    def _table_terms(self, spans: list[re.Match], tokens: list[str]) -> list[_Candidate]:
        out = []
        for i in range(len(tokens)):
            for stop, classes in _walk(self._trie, tokens, i):
                last = stop - 1 if tokens[stop - 1] != "." else stop - 2
                side = last > i and tokens[last] in _SIDES[self.language]
                start, end = spans[i].start(), spans[stop - 1].end()
                out.append(_Candidate(start, end, classes, spans[last].start() if side else -1))
                # "right and left kidney": swap in the first side word and look the term up.
                if i >= 2 and self._coord(tokens, i - 2):
                    other = self._exact([tokens[i - 2], *tokens[i + 1 : stop]])
                    if other:
                        out.append(_Candidate(spans[i - 2].start(), end, _union(classes, other)))
                # "Niere rechts und links": swap in the second side word.
                if last > i and self._coord(tokens, last):
                    other = self._exact([*tokens[i:last], tokens[last + 2]])
                    k = last + 2
                    k += tokens[k] in _DOT_ABBR and tokens[k + 1 : k + 2] == ["."]
                    if other:
                        out.append(_Candidate(start, spans[k].end(), _union(classes, other)))
        return out

    def _coord(self, tokens: list[str], k: int) -> bool:
        """Whether tokens k, k+1, k+2 read "<side> and <side>"."""
        return (
            k + 2 < len(tokens)
            and tokens[k + 1] in _COORD
            and self._is_side(tokens[k])
            and self._is_side(tokens[k + 2])
        )

    def _exact(self, tokens: list[str]) -> tuple[str, ...]:
        found = _walk(self._trie, tokens, 0)
        return found[-1][1] if found and found[-1][0] == len(tokens) else ()

    def _is_side(self, token: str) -> bool:
        return token in _SIDES[self.language] or token.rstrip("enrms") in ("recht", "link")

    def _ranges(self, sentence: str) -> list[_Candidate]:
        out = []
        for m in _RANGE.finditer(sentence):
            codes = (m["c1"], m["c2"] or m["c1"])
            first, last = (
                f"{_REGION.get(code.lower(), code.upper())}{int(n)}"
                for code, n in zip(codes, (m["n1"], m["n2"]), strict=True)
            )
            if first not in _LEVELS or last not in _LEVELS or {first, last} <= {"T1", "T2"}:
                continue
            a, b = _LEVELS.index(first), _LEVELS.index(last)
            if 0 < b - a <= 10:
                names = tuple(f"vertebrae_{level}" for level in _LEVELS[a : b + 1])
                out.append(_Candidate(m.start(), m.end(), names))
        for m in _RIBS.finditer(sentence):
            numbers = _rib_numbers(m["nums"] or m["nums2"])
            side = _rib_side(f"{m['pre']} {m['mid']} {m['post']}")
            if numbers and side:
                names = tuple(f"rib_{s}_{n}" for s in side for n in numbers)
                out.append(_Candidate(m.start(), m.end(), names))
        return out

    def _adjectives(self, spans: list[re.Match], tokens: list[str]) -> list[_Candidate]:
        out, lang = [], self.language
        for i, token in enumerate(tokens):
            base = _ADJ[lang].get(token) or self._declined(token)
            following = tokens[i + 1] if i + 1 < len(tokens) else ""
            if not base or following in _ADJ_BLOCK:
                continue
            if base in ("lung", "lunge") and not _LUNG_NOUNS.match(following):
                continue
            first, stop, classes = i, i + 1 + (_ADJ_ABSORB.get(token) == following), ()
            side = _ADJ_SIDES.get(tokens[i - 1]) if i and lang == "en" else None
            if side:
                classes = lookup(f"{side} {base}", lang)
                first -= bool(classes)
            classes = classes or lookup(base, lang)
            if classes:
                out.append(_Candidate(spans[first].start(), spans[stop - 1].end(), classes))
        return out

    def _declined(self, token: str) -> str | None:
        if self.language == "de":
            for ending in _ADJ_ENDINGS:
                if token.endswith(ending) and token[: -len(ending)] in _ADJ["de"]:
                    return _ADJ["de"][token[: -len(ending)]]
        return None

    def _compounds(
        self, sentence: str, spans: list[re.Match], tokens: list[str]
    ) -> list[_Candidate]:
        out = []
        for m, token in zip(spans, tokens, strict=True):
            if not self._stems or len(token) < 7 or not token.isalpha() or token in self._table:
                continue
            found = self._split(token)
            if not found:
                continue
            offset, length, base, classes = found
            start, end = m.start() + offset, m.start() + length if offset == 0 else m.end()
            if offset == 0 and token[length:] in _WHOLE_WORD_REST:
                end = m.end()
            after = _DE_POST_SIDE.match(sentence, m.end())
            before = None if offset else _DE_PRE_SIDE.search(sentence, max(0, start - 20), start)
            if len(classes) > 1 and after and lookup(f"{base} {after[1]}", "de"):
                out.append(_Candidate(start, after.end(), lookup(f"{base} {after[1]}", "de")))
            elif len(classes) > 1 and before:  # "des linken Hüftgelenks"
                word = _DE_SIDE_WORD[(before[1] or before[2] or before[3]).lower().rstrip("s")]
                sided = lookup(f"{base} {word}", "de") or classes
                out.append(_Candidate(before.start(), m.end(), sided))
            else:
                out.append(_Candidate(start, end, classes))
        return out

    def _split(self, token: str) -> tuple[int, int, str, tuple[str, ...]] | None:
        """(offset, length, base, classes) of the organ part of a compound, if any."""
        for n in range(len(token) - 3, 3, -1):
            if token[n - 1] == "s" and token[: n - 1] in self._stems:
                continue  # "Oberlappen|segment", not the genitive "Oberlappens|egment"
            hit = self._stems.get(token[:n])
            if hit:  # the longest stem decides; a shorter one would cut the rest wrongly
                rest = token[n:]
                if rest.startswith(_REST_START_BLOCK) or rest.endswith(_REST_END_BLOCK):
                    return None
                return 0, n, *hit
        for n in range(3, len(token) - 3):
            hit = self._stems.get(token[n:])
            if hit and token[n:] not in _HEAD_FINAL_BLOCK and not token.startswith(_PREFIX_BLOCK):
                return n, len(token), *hit
        return None

    def _keep(self, c: _Candidate, sentence: str, spans: list[re.Match], tokens: list[str]) -> bool:
        """False for known false friends of a candidate (see the module docstring)."""
        text = _norm(sentence[c.start : c.end])
        single = len(c.classes) == 1 and c.classes[0].startswith("vertebrae_")
        if not single and text not in ("pelvis", "becken", "beckens", "disc", "disk"):
            return True  # the common case needs no context
        index = next((k for k, m in enumerate(spans) if m.start() >= c.start), 0)
        stop = next((k for k, m in enumerate(spans) if m.start() >= c.end), len(spans))
        prev2, prev = (["", "", *(t for t in tokens[:index] if t != "-")])[-2:]
        nxt = next((t for t in tokens[stop:] if t != "-"), "")
        if single and re.fullmatch(r"[tcls] ?-? ?\d{1,2}|th ?\d{1,2}", text):
            if prev in _VERTEBRA_DROP_NEIGHBOURS or nxt in _VERTEBRA_DROP_NEIGHBOURS:
                return False
            if re.fullmatch(r"t ?-? ?[12]", text):
                return False  # MR sequence ("T2 hyperintense"), not a vertebra
            if text[0] == "t" and re.fullmatch(r"[nm][0-3x]\w*", nxt):
                return False  # TNM stage
        if text in ("pelvis", "becken", "beckens"):
            region = prev2 in ("in", "within", "into") and prev == "the"
            if region or prev in ("kleinen", "kleines", "kleine", "im") or prev2 == "abdomen":
                return False
        return not (text in ("disc", "disk") and prev == "optic")


def _rib_side(words: str) -> tuple[str, ...]:
    """Sides named in the side words around a rib phrase; () if contradictory."""
    right = re.search(r"\bright\b|recht|\bre\.", words, re.I)
    left = re.search(r"\bleft\b|link|\bli\.", words, re.I)
    if right and left:
        return ()
    return ("right",) if right else ("left",) if left else ("right", "left")


def _rib_numbers(text: str) -> list[int]:
    """Rib numbers in "7th and 8th", "4-6", "7. bis 9." (ranges expanded), [] if invalid."""
    numbers: list[int] = []
    for k, part in enumerate(re.split(r"\s*(?:-|–|to|through|bis)\s*", text)):
        values = [int(v) for v in re.findall(r"\d+", part)]
        if k and numbers and values:  # the end of a range "4-6"
            numbers += range(numbers[-1] + 1, values[0])
        numbers += values
    if len(numbers) < 2 or any(not 1 <= n <= 12 for n in numbers):
        return []
    return sorted(set(numbers))


def _resolve(candidates: list[_Candidate]) -> list[_Candidate]:
    """Leftmost-longest non-overlapping choice; a trailing side word ("kidney, left") yields to
    a longer term that starts with it ("left adrenal gland")."""
    candidates.sort(key=lambda c: (c.start, -c.end))
    chosen: list[_Candidate] = []
    for c in candidates:
        if chosen and c.start < chosen[-1].end:
            continue
        if c.side_at >= 0 and any(d.start == c.side_at and d.end > c.end for d in candidates):
            shorter = [d for d in candidates if d.start == c.start and d.end <= c.side_at]
            c = max(shorter, key=lambda d: d.end, default=c)
        chosen.append(c)
    return chosen


@cache
def _extractor(language: str) -> LexiconExtractor:
    return LexiconExtractor(language)


def extract_mentions(sentence: str, language: str) -> list[Mention]:
    """Anatomy mentions in one report sentence (a cached extractor per language)."""
    return _extractor(check_language(language)).extract(sentence)

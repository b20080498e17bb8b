"""How radiology reports name the 121 schema classes, in English and German.

``synonym_table(language)`` maps a normalized term to the classes it names (a tuple sorted by
class id); ``lookup`` also resolves vertebra shorthand in any spacing ("LWK3", "LWK 3",
"Th 12", "C5"). The fixed vocabulary lives in ``resources/synonyms/anatomy_terms.json``; the
grammar that multiplies it lives here, so every lateral class gets the same forms:

* laterality: "left kidney", "kidney, left", "left-sided kidney"; German adjectives in every
  declension the noun's gender allows ("rechte/rechten/rechter Niere", "rechter/rechtem
  Oberlappen", "rechtes Schulterblatt"), postposed "Niere rechts/re.", prefixed "re. Niere",
  "rechtsseitige Niere", Latin "A. subclavia dextra".
* a structure named without a side means both sides: "kidney", "kidneys", "both kidneys",
  "Nieren", "beide Nieren", "Nieren beidseits" -> (kidney_right, kidney_left).
* every German term with ä/ö/ü/ß is also registered transliterated (ae/oe/ue/ss).

Deliberate choices: region words ("lumbar spine", "LWS", "Wirbelsäule") map to the generic MR
class ``vertebrae`` only, never to the single levels; a bare "Hohlvene"/"vena cava" means the
inferior vena cava. Some terms are ambiguous in running text and need context in an extractor:
"T1"/"T2" (MR sequences), "disc" (optic disc), "atlas", "Dens".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator
from functools import cache

from radgrounder.errors import RadGrounderError
from radgrounder.resources import load_json

__all__ = ["LANGUAGES", "lookup", "normalize_term", "synonym_table", "terms_for"]

LANGUAGES = ("en", "de")

_DATA = "synonyms/anatomy_terms.json"
_SIDES = ("right", "left")

# Adjective endings a German noun of each gender can take across case and strong/weak
# declension: f "rechte/rechten/rechter Niere", m adds "rechtem", n has "rechtes".
_ENDINGS = {
    "m": ("er", "e", "en", "em"),
    "f": ("e", "en", "er"),
    "n": ("es", "e", "en", "em"),
    "p": ("e", "en", "er"),
}
_LATIN_SIDE = {
    "m": {"right": "dexter", "left": "sinister"},
    "f": {"right": "dextra", "left": "sinistra"},
    "n": {"right": "dextrum", "left": "sinistrum"},
}
_DE_STEM = {"right": "recht", "left": "link"}
_DE_POST = {"right": ("rechts", "re.", "rechtsseitig"), "left": ("links", "li.", "linksseitig")}
_DE_PRE = {"right": "re.", "left": "li."}
_EN_ABBR = {"right": "rt", "left": "lt"}
_TRANSLIT = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss"})


def normalize_term(text: str) -> str:
    """Canonical form of a term: how table keys are stored and how lookups are matched.

    Unicode NFC, casefolded except that German ß is kept (``str.casefold`` would turn it into
    "ss"; capital ẞ becomes ß), whitespace runs collapsed to one space, ends stripped. One
    trailing "." is dropped when a letter precedes it ("Niere re." -> "niere re"), so
    sentence-final periods and abbreviation points do not matter; after a digit it stays,
    because there it marks a German ordinal ("10." = tenth).
    """
    text = unicodedata.normalize("NFC", text)
    text = "ß".join(part.casefold() for part in re.split("[ßẞ]", text))
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if len(text) > 1 and text[-1] == "." and text[-2].isalpha():
        text = text[:-1]
    return text


# ---------------------------------------------------------------------------- data helpers


@cache
def _class_ids() -> dict[str, int]:
    return dict(load_json("label_map/merged_label_map.json"))


def _display_names(language: str) -> dict[str, str]:
    return load_json(
        f"label_map/class_2_organ_name_{'english' if language == 'en' else 'german'}.json"
    )


def _check_language(language: object) -> str:
    if language not in LANGUAGES:
        raise RadGrounderError(
            f"language: unknown value {language!r}; expected one of {', '.join(LANGUAGES)}"
        )
    return str(language)


def _spec(spec: str, default_gender: str = "") -> tuple[str, bool, list[tuple[str, str]]]:
    """Parse a German noun spec "g:base|genitive" (see the JSON _doc).

    Returns (gender, latin, pairs): each pair is an adjective ending the gender allows and a
    form with its '*' agreeing. Forms after the first are genitives, which take only "-en"
    in the masculine and neuter ("des rechten Oberlappens", never "rechter Oberlappens").
    """
    gender, latin = default_gender, False
    if len(spec) > 2 and spec[1] == ":" and spec[0].lower() in _ENDINGS:
        gender, latin, spec = spec[0].lower(), spec[0].isupper(), spec[2:]
    forms = spec.split("|")
    if "*" in spec and not gender:
        raise RadGrounderError(f"{spec!r}: a form with '*' needs a gender prefix", path=_DATA)
    pairs = [
        (ending, form.replace("*", ending))
        for i, form in enumerate(forms)
        for ending in _ENDINGS.get(gender, ("",))
        if i == 0 or gender not in ("m", "n") or ending == "en"
    ]
    return gender, latin, pairs


def _bare(spec: str, default_gender: str = "") -> set[str]:
    """All surface forms of a spec standing alone (any ending its '*' can take)."""
    return {form for _, form in _spec(spec, default_gender)[2]}


def _fill(template: str, **subs: str) -> str:
    for key, value in subs.items():
        template = template.replace("{" + key + "}", value)
    return template


def _numeric_ordinal(language: str, n: int) -> str:
    if language == "de":
        return f"{n}."
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


# ------------------------------------------------------------------------- grammar (rules)


def _sided(language: str, spec: str, side: str) -> Iterator[str]:
    """Terms naming one side of a structure given as a singular noun spec."""
    if language == "en":
        abbr = _EN_ABBR[side]
        yield from (f"{side} {spec}", f"{side}-sided {spec}", f"{side} sided {spec}")
        yield from (f"{spec}, {side}", f"{spec} on the {side}", f"{abbr} {spec}", f"{abbr}. {spec}")
        return
    gender, latin, pairs = _spec(spec)
    stem = _DE_STEM[side]
    for ending, noun in pairs:
        yield from (f"{stem}{ending} {noun}", f"{stem}sseitig{ending} {noun}")
    for noun in _bare(spec):
        yield from (f"{noun} {post}" for post in _DE_POST[side])
        yield f"{_DE_PRE[side]} {noun}"
        if latin:
            yield f"{noun} {_LATIN_SIDE[gender][side]}"


def _around(language: str, template: str, side: str) -> Iterator[str]:
    """Terms from templates with the side inside ("upper {side} lobe", "zehnt* {side} Rippe")."""
    if language == "en":
        yield template.replace("{side}", side)
        return
    for ending, form in _spec(template)[2]:
        yield form.replace("{side}", _DE_STEM[side] + ending)


def _both_singular(language: str, spec: str) -> Iterator[str]:
    """A singular noun without a side: the structure on both sides."""
    if language == "en":
        yield from (spec, f"bilateral {spec}")
        return
    for noun in _bare(spec):
        yield from (noun, f"{noun} beidseits", f"{noun} bds.", f"{noun} beidseitig")


def _both_plural(language: str, spec: str) -> Iterator[str]:
    if language == "en":
        yield from (spec, f"both {spec}", f"bilateral {spec}", f"{spec} bilaterally")
        yield from (f"right and left {spec}", f"left and right {spec}", f"{spec} on both sides")
        return
    for noun in _bare(spec, default_gender="p"):
        yield from (noun, f"beide {noun}", f"beiden {noun}", f"beider {noun}")
        yield from (f"{noun} beidseits", f"{noun} bds.", f"{noun} beidseitig")
        yield from (f"beidseitig{e} {noun}" for e in _ENDINGS["p"])


def _classes(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _paired(language: str, entry: dict) -> Iterator[tuple[str, list[str]]]:
    """(term, classes) for one structure that has a right and/or a left class."""
    sides = {side: _classes(entry.get(side)) for side in _SIDES}
    for side, classes in sides.items():
        if not classes:
            continue
        for spec in entry.get("sg", ()):
            yield from ((t, classes) for t in _sided(language, spec, side))
        for template in entry.get("around", ()):
            yield from ((t, classes) for t in _around(language, template, side))
    if sides["right"] and sides["left"]:
        both = sides["right"] + sides["left"]
        for spec in entry.get("sg", ()):
            yield from ((t, both) for t in _both_singular(language, spec))
        for spec in entry.get("pl", ()):
            yield from ((t, both) for t in _both_plural(language, spec))


def _ribs(language: str, data: dict) -> Iterator[tuple[str, list[str]]]:
    ids = _class_ids()
    numbers = sorted(int(name.rsplit("_", 1)[1]) for name in ids if name.startswith("rib_left_"))
    generic = {side: [f"rib_{side}_{n}" for n in numbers] for side in _SIDES}
    ordinals = load_json(_DATA)[language]["ordinals"]
    yield from _paired(language, {**generic, "sg": data["sg"], "pl": data["pl"]})
    for n in numbers:
        subs = {"n": str(n), "num": _numeric_ordinal(language, n), "ord": ordinals[n - 1]}
        entry = {
            key: [_fill(t, **subs) for t in values] for key, values in data["numbered"].items()
        }
        yield from _paired(language, {"right": f"rib_right_{n}", "left": f"rib_left_{n}", **entry})


def _vertebrae(language: str, data: dict) -> Iterator[tuple[str, list[str]]]:
    ordinals = load_json(_DATA)[language]["ordinals"]
    for name in _class_ids():
        match = re.fullmatch(r"vertebrae_([A-Z])(\d+)", name)
        if not match:
            continue
        region, n = data["regions"][match[1]], int(match[2])
        subs = {"n": str(n), "num": _numeric_ordinal(language, n), "ord": ordinals[n - 1]}
        codes, abbrs = region["codes"], region.get("abbreviations", [])
        families = (
            (data["code_templates"], codes + abbrs),
            (data.get("letter_templates", []), codes),
            (data.get("abbreviation_templates", []), abbrs),
        )
        for templates, values in families:
            for template in templates:
                yield from ((_fill(template, code=c, **subs), [name]) for c in values)
        for template in data["name_templates"]:
            for noun in region["names"]:
                # Fill each form separately so genitives stay in their place after the base.
                prefix, _, forms = noun.rpartition(":")
                filled = "|".join(_fill(template, name=f, **subs) for f in forms.split("|"))
                spec = f"{prefix}:{filled}" if prefix else filled
                yield from ((t, [name]) for t in _bare(spec))


@cache
def _vertebra_codes(language: str) -> dict[str, str]:
    """Normalized vertebra shorthand prefix ("lwk", "th", "c") -> region letter."""
    regions = load_json(_DATA)[language]["vertebrae"]["regions"]
    return {
        normalize_term(code): letter
        for letter, region in regions.items()
        for code in region["codes"] + region.get("abbreviations", [])
    }


# ------------------------------------------------------------------------------ the table


@cache
def _table(language: str) -> dict[str, tuple[str, ...]]:
    data = load_json(_DATA)[language]
    ids = _class_ids()
    display = _display_names(language)

    def generated() -> Iterator[tuple[str, list[str]]]:
        yield from ((text, [name]) for name, text in display.items())
        for key, specs in data["fixed"].items():
            for spec in specs:
                yield from ((t, key.split()) for t in _bare(spec))
        for entry in data["paired"]:
            yield from _paired(language, entry)
        yield from _ribs(language, data["ribs"])
        yield from _vertebrae(language, data["vertebrae"])

    table: dict[str, frozenset[str]] = {}

    def put(term: str, classes: Iterable[str]) -> None:
        key, value = normalize_term(term), frozenset(classes)
        unknown = sorted(value - ids.keys())
        if not key or not value or unknown:
            raise RadGrounderError(
                f"{language} term {term!r}: empty, or classes missing/unknown {unknown}", path=_DATA
            )
        if table.setdefault(key, value) != value:
            raise RadGrounderError(
                f"{language} term {key!r} is defined as both {sorted(table[key])} and "
                f"{sorted(value)}",
                path=_DATA,
            )

    for term, classes in generated():
        put(term, classes)
    if language == "de":
        # Reports typed on keyboards without umlauts: "Bauchspeicheldruese", "Gesaessmuskel".
        for key, value in list(table.items()):
            put(key.translate(_TRANSLIT), value)
    return {key: tuple(sorted(value, key=ids.__getitem__)) for key, value in table.items()}


def synonym_table(language: str) -> dict[str, tuple[str, ...]]:
    """Normalized term -> class names it names (sorted by class id) for ``language``.

    Built once per language and cached; each call returns a fresh copy so callers may modify
    it. Unknown ``language`` raises :class:`RadGrounderError`.
    """
    return dict(_table(_check_language(language)))


@cache
def _vertebra_pattern(language: str) -> re.Pattern[str]:
    codes = sorted(_vertebra_codes(language), key=len, reverse=True)
    return re.compile(rf"({'|'.join(map(re.escape, codes))}) ?-? ?(\d{{1,2}})\.?")


def lookup(term: str, language: str) -> tuple[str, ...]:
    """The classes ``term`` names in ``language`` (sorted by class id); () if none.

    The term is normalized first. Vertebra shorthand that the table may not spell out
    ("LWK  3", "Th-12", "L 3.") is matched by pattern; a level that is not a schema class
    ("L6", "S2") gives ().
    """
    if not isinstance(term, str):
        raise RadGrounderError(f"term: expected a string, got {type(term).__name__}")
    table = _table(_check_language(language))
    key = normalize_term(term)
    if key in table:
        return table[key]
    match = _vertebra_pattern(language).fullmatch(key)
    if match:
        name = f"vertebrae_{_vertebra_codes(language)[match[1]]}{int(match[2])}"
        if name in _class_ids():
            return (name,)
    return ()


def terms_for(class_name: str, language: str) -> tuple[str, ...]:
    """Every table term that names exactly ``class_name`` and nothing else.

    The display name comes first, the rest alphabetically. A class that is not in the schema
    raises :class:`RadGrounderError`.
    """
    table = _table(_check_language(language))
    if class_name not in _class_ids():
        raise RadGrounderError(
            f"class_name: unknown class {class_name!r}; not in the unified schema "
            "(label_map/merged_label_map.json)"
        )
    first = normalize_term(_display_names(language)[class_name])
    terms = [key for key, value in table.items() if value == (class_name,)]
    return tuple(sorted(terms, key=lambda t: (t != first, t)))

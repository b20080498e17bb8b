"""Tests for report sentence splitting and NegEx-style negation scope (EN and DE)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radgrounder.errors import RadGrounderError
from radgrounder.labels.negation import is_negated, negated_spans
from radgrounder.labels.sentences import iter_sentences, split_sentences

# ------------------------------------------------------------------------------ sentences


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "The lesion measures 2 cm. The liver is normal.",
            ["The lesion measures 2 cm.", "The liver is normal."],
        ),
        (
            "Findings e.g. cyst vs. hemangioma. Dr. Smith was notified.",
            ["Findings e.g. cyst vs. hemangioma.", "Dr. Smith was notified."],
        ),
        ("Approx. 3 mm nodule at L3. No fracture!", ["Approx. 3 mm nodule at L3.", "No fracture!"]),
        ("Contrast was given i.v. without complications.", None),
        ("Decimal 2.2 cm and date 12.03.2024 stay.", None),
        ("Is there fluid? No.", ["Is there fluid?", "No."]),
    ],
)
def test_split_english(text: str, expected: list[str] | None) -> None:
    assert iter_sentences(text, "en") == (expected or [text])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("V.a. Steatose z.B. bei Adipositas. Z.n. Cholezystektomie.", 2),
        ("Läsion ca. 2,2 cm bzw. 2.2 cm groß. Milz o.B.", 2),
        ("Ggf. Kontrolle, u.a. der Leber. Pat. mit Fieber.", 2),
        ("Fraktur der 10. Rippe rechts.", 1),
        ("Fraktur der 7. bis 9. Rippe links.", 1),
        ("Sinterung des 3. Lendenwirbelkörpers. Keine weitere Fraktur.", 2),
        ("Am 3. Tag Kontrolle. Voruntersuchung vom 12.03.2024 liegt vor.", 2),
        ("Keine Fraktur von LWK 3. Die Bandscheiben sind normal.", 2),
        ("Zyste der re. Niere. Pleuraergüsse bds. Keine Fraktur.", 3),
        ("Verschluss der A. iliaca communis und der V. cava inferior.", 1),
        ("Nach i.v. Kontrastmittelgabe unauffällige Leber.", 1),
        ("Läsion 12 mm. Milz normal. Fettige Atrophie der Mm. glutei.", 3),
        ("DD Zyste.", 1),
    ],
)
def test_split_german(text: str, expected: int) -> None:
    sentences = iter_sentences(text, "de")
    assert len(sentences) == expected, sentences
    assert " ".join(sentences) == text


def test_split_lines_bullets_and_enumerations() -> None:
    text = (
        "Befund:\n- Leber unauffällig.\n  * Milz normal groß\n1. Keine Fraktur.\n"
        "2) Zyste der re. Niere.\n3. Lendenwirbelkörper mit Sinterung.\n\n"
        "Beurteilung: Kein Nachweis\neines akuten Befundes.\r\n• Nieren bds. o.B."
    )
    assert iter_sentences(text, "de") == [
        "Befund:",
        "Leber unauffällig.",
        "Milz normal groß",
        "Keine Fraktur.",
        "Zyste der re. Niere.",
        "3. Lendenwirbelkörper mit Sinterung.",
        "Beurteilung: Kein Nachweis\neines akuten Befundes.",
        "Nieren bds. o.B.",
    ]


def test_split_spans_point_into_text_without_whitespace() -> None:
    text = "  The liver is normal.   \n\n 2. No fracture.  "
    spans = split_sentences(text, "en")
    assert [text[a:b] for a, b in spans] == ["The liver is normal.", "No fracture."]
    assert spans[0] == (2, 22)


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "-", "..."])
def test_split_degenerate(text: str) -> None:
    assert all(text[a:b].strip() for a, b in split_sentences(text, "en"))


def test_split_bad_arguments() -> None:
    with pytest.raises(RadGrounderError, match="language"):
        split_sentences("Text.", "fr")
    with pytest.raises(RadGrounderError, match="text"):
        split_sentences(None, "en")  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab .\n-1:z.B.V?!Ä ")), max_size=60))
def test_split_property(text: str) -> None:
    for language in ("en", "de"):
        spans = split_sentences(text, language)
        assert spans == sorted(spans)
        for k, (a, b) in enumerate(spans):
            assert 0 <= a < b <= len(text)
            assert k + 1 == len(spans) or b <= spans[k + 1][0]
            assert text[a:b] == text[a:b].strip()


# ------------------------------------------------------------------------------- negation


def _negated(sentence: str, language: str) -> list[str]:
    return [sentence[a:b] for a, b in negated_spans(sentence, language)]


def _flag(sentence: str, word: str, language: str) -> bool:
    start = sentence.index(word)
    return is_negated(sentence, start, start + len(word), language)


@pytest.mark.parametrize(
    ("sentence", "word", "negated"),
    [
        ("No focal liver lesion is identified.", "liver", True),
        ("No mass in the liver, spleen or pancreas.", "pancreas", True),
        ("No ascites, the liver is enlarged.", "liver", False),
        ("The gallbladder is not visualized.", "gallbladder", True),
        ("The gallbladder is surgically absent.", "gallbladder", True),
        ("Absent gallbladder after cholecystectomy.", "gallbladder", True),
        ("Involvement of the pancreas is ruled out.", "pancreas", True),
        ("CT ruled out involvement of the pancreas.", "pancreas", True),
        ("The spleen is not enlarged and the liver is normal.", "spleen", False),
        ("The spleen is not enlarged and the liver is normal.", "liver", False),
        ("Liver metastases cannot be excluded.", "Liver", False),
        ("A splenic infarct is not excluded.", "splenic", False),
        ("Early hepatic abscess is not ruled out.", "hepatic", False),
        ("No change in the size of the left renal mass.", "renal", False),
        ("No significant interval change of the hepatic lesions.", "hepatic", False),
        ("Not only the liver but also the spleen is enlarged.", "liver", False),
        ("No hydronephrosis, however a calculus is present in the left kidney.", "kidney", False),
        ("No lesions except for a small cyst in the liver.", "liver", False),
        ("No lymphadenopathy; the spleen is normal.", "spleen", False),
        ("No suspicious lesions in the liver, which is enlarged.", "liver", True),
        ("The nodule in the left lower lobe is no longer seen.", "lobe", True),
        ("Without evidence of vertebral compression fracture.", "vertebral", True),
        ("No abnormality of the pancreas or any other organ in the abdomen.", "abdomen", False),
    ],
)
def test_negation_english(sentence: str, word: str, negated: bool) -> None:
    assert _flag(sentence, word, "en") is negated, _negated(sentence, "en")


@pytest.mark.parametrize(
    ("sentence", "word", "negated"),
    [
        ("Kein Hinweis auf eine Raumforderung der Leber.", "Leber", True),
        ("Keine fokalen Leberläsionen.", "Leber", True),
        ("Ein Befall der Milz ist nicht nachweisbar.", "Milz", True),
        ("Die Gallenblase ist nicht abgrenzbar.", "Gallenblase", True),
        ("Eine Fraktur des Beckens ist ausgeschlossen.", "Beckens", True),
        ("Die Milz fehlt nach Splenektomie.", "Milz", True),
        ("Keine Raumforderung in Leber sowie Milz.", "Milz", True),
        ("Keine Metastasen in Leber, Milz oder Nebennieren.", "Nebennieren", True),
        ("Keine freie Flüssigkeit, die Leber ist vergrößert.", "Leber", False),
        ("Kein Aufstau, jedoch Konkrement in der linken Niere.", "Niere", False),
        ("Keine Fraktur, aber Osteochondrose L4/5.", "L4/5", False),
        ("Kein Harnstau bei Konkrement in der rechten Niere.", "Niere", False),
        ("Lebermetastasen sind nicht sicher auszuschließen.", "Leber", False),
        ("Eine Infiltration des Pankreas ist nicht auszuschließen.", "Pankreas", False),
        ("Ein Tumorbefall des Pankreas kann nicht ausgeschlossen werden.", "Pankreas", False),
        ("Keine Änderung der Nierenzysten.", "Nierenzysten", False),
        ("Keine wesentliche Befundänderung im Bereich der LWS.", "LWS", False),
        ("Ohne Befundänderung der Leberherde.", "Leber", False),
        ("Keine Aenderung der Leberherde.", "Leber", False),
        ("Nicht nur die Leber, sondern auch die Milz ist vergrößert.", "Milz", False),
        ("Milz nicht vergrößert.", "Milz", False),
        ("Nicht dislozierte Fraktur der 10. Rippe rechts.", "Rippe", False),
        ("Im Gehirn keine Ischämiezeichen.", "Gehirn", False),
        ("Leber frei von Metastasen.", "Leber", False),
        ("Ohne Nachweis einer Fraktur der Wirbelsäule.", "Wirbelsäule", True),
    ],
)
def test_negation_german(sentence: str, word: str, negated: bool) -> None:
    assert _flag(sentence, word, "de") is negated, _negated(sentence, "de")


def test_negation_window() -> None:
    # Pre-trigger scope: 6 words in English, 8 in German; punctuation and copulas are free.
    en = "No sign of any new or enlarging lesion anywhere in the liver."
    assert not _flag(en, "liver", "en")
    assert _flag("No enlarging lesion in the liver.", "liver", "en")
    de = "Kein Hinweis auf eine größenprogrediente Raumforderung im Bereich der Leber."
    assert _flag(de, "Leber", "de")
    too_far = (
        "Kein Hinweis auf eine neue oder größenprogrediente Raumforderung im Bereich der Leber."
    )
    assert not _flag(too_far, "Leber", "de")


def test_negated_spans_cover_only_scope_words() -> None:
    assert _negated("Kein Hinweis auf eine Raumforderung der Leber.", "de") == [
        "eine Raumforderung der Leber"
    ]
    assert _negated("Ein Befall der Milz ist nicht nachweisbar.", "de") == ["Ein Befall der Milz"]
    assert _negated("No ascites, the liver is enlarged.", "en") == ["ascites"]
    assert _negated("Liver metastases cannot be excluded.", "en") == []
    # Each sentence of a multi-sentence text has its own scope.
    assert _negated("No ascites. Liver enlarged.", "en") == ["ascites"]


def test_negation_bad_arguments() -> None:
    with pytest.raises(RadGrounderError, match="language"):
        negated_spans("No fluid.", "xx")
    with pytest.raises(RadGrounderError, match="sentence"):
        negated_spans(3, "en")  # type: ignore[arg-type]
    with pytest.raises(RadGrounderError, match="start/end"):
        is_negated("No fluid.", 5, 2, "en")
    with pytest.raises(RadGrounderError, match="end"):
        is_negated("No fluid.", 0, 99, "en")


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_negation_property(text: str) -> None:
    for language in ("en", "de"):
        for a, b in negated_spans(text, language):
            assert 0 <= a < b <= len(text)

"""Tests for the English/German anatomy synonym table."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from radgrounder.anatomy.synonyms import (
    LANGUAGES,
    lookup,
    normalize_term,
    synonym_table,
    terms_for,
)
from radgrounder.errors import RadGrounderError
from radgrounder.resources import load_json

CLASS_IDS: dict[str, int] = load_json("label_map/merged_label_map.json")
DISPLAY = {
    "en": load_json("label_map/class_2_organ_name_english.json"),
    "de": load_json("label_map/class_2_organ_name_german.json"),
}

KIDNEYS = ("kidney_right", "kidney_left")
LUNGS = ("lung_left", "lung_right")
GLUTEI = (
    "gluteus_maximus_left",
    "gluteus_maximus_right",
    "gluteus_medius_left",
    "gluteus_medius_right",
    "gluteus_minimus_left",
    "gluteus_minimus_right",
)
LEFT_GLUTEI = ("gluteus_maximus_left", "gluteus_medius_left", "gluteus_minimus_left")
LEFT_RIBS = tuple(f"rib_left_{n}" for n in range(1, 13))
ALL_RIBS = LEFT_RIBS + tuple(f"rib_right_{n}" for n in range(1, 13))

CASES = [
    # laterality, English
    ("left kidney", "en", ("kidney_left",)),
    ("Right Kidney", "en", ("kidney_right",)),
    ("kidney, left", "en", ("kidney_left",)),
    ("left-sided kidney", "en", ("kidney_left",)),
    ("right psoas muscle", "en", ("iliopsoas_right",)),
    ("left common iliac artery", "en", ("iliac_artery_left",)),
    ("left atrial appendage", "en", ("atrial_appendage_left",)),
    ("LAA", "en", ("atrial_appendage_left",)),
    ("left gluteal muscles", "en", LEFT_GLUTEI),
    # both sides / plural, English
    ("kidney", "en", KIDNEYS),
    ("kidneys", "en", KIDNEYS),
    ("both kidneys", "en", KIDNEYS),
    ("bilateral kidneys", "en", KIDNEYS),
    ("adrenal glands", "en", ("adrenal_gland_right", "adrenal_gland_left")),
    ("lung", "en", LUNGS),
    ("both lungs", "en", LUNGS),
    ("renal cysts", "en", ("kidney_cyst_left", "kidney_cyst_right")),
    ("hips", "en", ("hip_left", "hip_right")),
    ("pelvis", "en", ("hip_left", "hip_right")),
    ("femoral neck", "en", ("femur_left", "femur_right")),
    ("humeri", "en", ("humerus_left", "humerus_right")),
    ("scapulae", "en", ("scapula_left", "scapula_right")),
    ("clavicles", "en", ("clavicula_left", "clavicula_right")),
    ("external iliac veins", "en", ("iliac_vena_left", "iliac_vena_right")),
    (
        "common carotid arteries",
        "en",
        ("common_carotid_artery_right", "common_carotid_artery_left"),
    ),
    ("subclavian arteries", "en", ("subclavian_artery_right", "subclavian_artery_left")),
    ("brachiocephalic veins", "en", ("brachiocephalic_vein_left", "brachiocephalic_vein_right")),
    ("gluteal muscles", "en", GLUTEI),
    ("paraspinal muscles", "en", ("autochthon_left", "autochthon_right")),
    ("psoas muscles", "en", ("iliopsoas_left", "iliopsoas_right")),
    # lobes, English
    ("right upper lobe", "en", ("lung_upper_lobe_right",)),
    ("RUL", "en", ("lung_upper_lobe_right",)),
    ("upper lobe of the left lung", "en", ("lung_upper_lobe_left",)),
    ("lingula", "en", ("lung_upper_lobe_left",)),
    ("middle lobe", "en", ("lung_middle_lobe_right",)),
    ("lower lobes", "en", ("lung_lower_lobe_left", "lung_lower_lobe_right")),
    # organs, vessels, spellings, English
    ("oesophagus", "en", ("esophagus",)),
    ("esophagus", "en", ("esophagus",)),
    ("caecum", "en", ("colon",)),
    ("bladder", "en", ("urinary_bladder",)),
    ("gall bladder", "en", ("gallbladder",)),
    ("IVC", "en", ("inferior_vena_cava",)),
    ("SVC", "en", ("superior_vena_cava",)),
    ("portal vein", "en", ("portal_vein_and_splenic_vein",)),
    ("splenic vein", "en", ("portal_vein_and_splenic_vein",)),
    ("pulmonary veins", "en", ("pulmonary_vein",)),
    ("spine", "en", ("vertebrae",)),
    ("lumbar spine", "en", ("vertebrae",)),
    ("intervertebral discs", "en", ("intervertebral_discs",)),
    # vertebrae, English
    ("L3", "en", ("vertebrae_L3",)),
    ("L 3", "en", ("vertebrae_L3",)),
    ("L3 vertebra", "en", ("vertebrae_L3",)),
    ("L3 vertebral body", "en", ("vertebrae_L3",)),
    ("vertebral body L3", "en", ("vertebrae_L3",)),
    ("third lumbar vertebra", "en", ("vertebrae_L3",)),
    ("lumbar vertebra 3", "en", ("vertebrae_L3",)),
    ("T12", "en", ("vertebrae_T12",)),
    ("Th12", "en", ("vertebrae_T12",)),
    ("D12", "en", ("vertebrae_T12",)),
    ("twelfth thoracic vertebra", "en", ("vertebrae_T12",)),
    ("12th thoracic vertebra", "en", ("vertebrae_T12",)),
    ("C5", "en", ("vertebrae_C5",)),
    ("fifth cervical vertebra", "en", ("vertebrae_C5",)),
    ("S1", "en", ("vertebrae_S1",)),
    ("first sacral vertebra", "en", ("vertebrae_S1",)),
    ("sacrum", "en", ("sacrum",)),
    # ribs, English
    ("left 10th rib", "en", ("rib_left_10",)),
    ("10th left rib", "en", ("rib_left_10",)),
    ("left tenth rib", "en", ("rib_left_10",)),
    ("tenth rib on the left", "en", ("rib_left_10",)),
    ("10th rib, left", "en", ("rib_left_10",)),
    ("right 1st rib", "en", ("rib_right_1",)),
    ("3rd rib", "en", ("rib_left_3", "rib_right_3")),
    ("ribs", "en", ALL_RIBS),
    ("left ribs", "en", LEFT_RIBS),
    # laterality, German: every declension, postposed, abbreviated, -seitig, Latin
    ("rechte Niere", "de", ("kidney_right",)),
    ("rechten Niere", "de", ("kidney_right",)),
    ("rechter Niere", "de", ("kidney_right",)),
    ("Niere rechts", "de", ("kidney_right",)),
    ("Niere links", "de", ("kidney_left",)),
    ("re. Niere", "de", ("kidney_right",)),
    ("li. Niere", "de", ("kidney_left",)),
    ("Niere li.", "de", ("kidney_left",)),
    ("rechtsseitige Niere", "de", ("kidney_right",)),
    ("linker Oberarmknochen", "de", ("humerus_left",)),
    ("linken Oberarmknochens", "de", ("humerus_left",)),
    ("rechtes Schulterblatt", "de", ("scapula_right",)),
    ("rechtem Schulterblatt", "de", ("scapula_right",)),
    ("Schlüsselbein li.", "de", ("clavicula_left",)),
    ("Klavikula rechts", "de", ("clavicula_right",)),
    ("Hüftkopf links", "de", ("femur_left",)),
    ("Schenkelhals rechts", "de", ("femur_right",)),
    ("A. subclavia dextra", "de", ("subclavian_artery_right",)),
    ("rechte A. carotis communis", "de", ("common_carotid_artery_right",)),
    ("linke V. brachiocephalica", "de", ("brachiocephalic_vein_left",)),
    ("A. iliaca externa links", "de", ("iliac_artery_left",)),
    ("linkes Herzohr", "de", ("atrial_appendage_left",)),
    ("M. gluteus maximus rechts", "de", ("gluteus_maximus_right",)),
    ("linker großer Gesäßmuskel", "de", ("gluteus_maximus_left",)),
    ("rechten grossen Gesaessmuskels", "de", ("gluteus_maximus_right",)),
    ("Psoas links", "de", ("iliopsoas_left",)),
    ("Gesäßmuskulatur links", "de", LEFT_GLUTEI),
    # both sides / plural, German
    ("Niere", "de", KIDNEYS),
    ("Nieren", "de", KIDNEYS),
    ("beide Nieren", "de", KIDNEYS),
    ("beiden Nieren", "de", KIDNEYS),
    ("Nieren beidseits", "de", KIDNEYS),
    ("Nebennieren", "de", ("adrenal_gland_right", "adrenal_gland_left")),
    ("Lunge", "de", LUNGS),
    ("Lungen", "de", LUNGS),
    ("beide Lungen", "de", LUNGS),
    ("Beckenarterien beidseits", "de", ("iliac_artery_left", "iliac_artery_right")),
    ("M. iliopsoas", "de", ("iliopsoas_left", "iliopsoas_right")),
    ("Gesäßmuskulatur", "de", GLUTEI),
    ("Nierenzysten", "de", ("kidney_cyst_left", "kidney_cyst_right")),
    ("Darmbein", "de", ("hip_left", "hip_right")),
    ("Os ilium", "de", ("hip_left", "hip_right")),
    ("Becken", "de", ("hip_left", "hip_right")),
    ("Femur", "de", ("femur_left", "femur_right")),
    ("Humerus", "de", ("humerus_left", "humerus_right")),
    ("Skapula", "de", ("scapula_left", "scapula_right")),
    # lobes, German
    ("rechter Lungenoberlappen", "de", ("lung_upper_lobe_right",)),
    ("rechter Oberlappen", "de", ("lung_upper_lobe_right",)),
    ("Oberlappen rechts", "de", ("lung_upper_lobe_right",)),
    ("Oberlappen der linken Lunge", "de", ("lung_upper_lobe_left",)),
    ("Mittellappen", "de", ("lung_middle_lobe_right",)),
    ("Lingula", "de", ("lung_upper_lobe_left",)),
    ("Unterlappen beidseits", "de", ("lung_lower_lobe_left", "lung_lower_lobe_right")),
    # organ nouns and their inflections, German
    ("Milz", "de", ("spleen",)),
    ("Leber", "de", ("liver",)),
    ("Magens", "de", ("stomach",)),
    ("Herzens", "de", ("heart",)),
    ("Dünndarms", "de", ("small_bowel",)),
    ("Kolon", "de", ("colon",)),
    ("Dickdarms", "de", ("colon",)),
    ("Duodenums", "de", ("duodenum",)),
    ("Zwölffingerdarm", "de", ("duodenum",)),
    ("Ösophagus", "de", ("esophagus",)),
    ("Oesophagus", "de", ("esophagus",)),
    ("Luftröhre", "de", ("trachea",)),
    ("Schilddrüse", "de", ("thyroid_gland",)),
    ("Pankreas", "de", ("pancreas",)),
    ("Bauchspeicheldruese", "de", ("pancreas",)),
    ("Blase", "de", ("urinary_bladder",)),
    ("Gallenblase", "de", ("gallbladder",)),
    ("Hauptschlagader", "de", ("aorta",)),
    ("V. cava inferior", "de", ("inferior_vena_cava",)),
    ("unteren Hohlvene", "de", ("inferior_vena_cava",)),
    ("VCI", "de", ("inferior_vena_cava",)),
    ("obere Hohlvene", "de", ("superior_vena_cava",)),
    ("V. cava superior", "de", ("superior_vena_cava",)),
    ("V. portae", "de", ("portal_vein_and_splenic_vein",)),
    ("Milzvene", "de", ("portal_vein_and_splenic_vein",)),
    ("Lungenvenen", "de", ("pulmonary_vein",)),
    ("Myelon", "de", ("spinal_cord",)),
    ("Rueckenmark", "de", ("spinal_cord",)),
    ("Hirn", "de", ("brain",)),
    ("Kalotte", "de", ("skull",)),
    ("Brustbein", "de", ("sternum",)),
    ("Sternum", "de", ("sternum",)),
    ("Rippenknorpel", "de", ("costal_cartilages",)),
    ("Os sacrum", "de", ("sacrum",)),
    ("Bandscheiben", "de", ("intervertebral_discs",)),
    ("Bandscheibe", "de", ("intervertebral_discs",)),
    ("Wirbelsäule", "de", ("vertebrae",)),
    ("LWS", "de", ("vertebrae",)),
    # vertebrae, German
    ("LWK 3", "de", ("vertebrae_L3",)),
    ("LWK3", "de", ("vertebrae_L3",)),
    ("LWK-3", "de", ("vertebrae_L3",)),
    ("L3", "de", ("vertebrae_L3",)),
    ("Lendenwirbelkörper 3", "de", ("vertebrae_L3",)),
    ("3. Lendenwirbelkörper", "de", ("vertebrae_L3",)),
    ("dritter Lendenwirbel", "de", ("vertebrae_L3",)),
    ("dritten Lendenwirbelkörpers", "de", ("vertebrae_L3",)),
    ("BWK 12", "de", ("vertebrae_T12",)),
    ("Th12", "de", ("vertebrae_T12",)),
    ("Th 12", "de", ("vertebrae_T12",)),
    ("Brustwirbelkörper 12", "de", ("vertebrae_T12",)),
    ("12. Brustwirbelkörper", "de", ("vertebrae_T12",)),
    ("zwoelfter Brustwirbel", "de", ("vertebrae_T12",)),
    ("HWK 4", "de", ("vertebrae_C4",)),
    ("Halswirbelkörper 4", "de", ("vertebrae_C4",)),
    ("4. Halswirbelkörper", "de", ("vertebrae_C4",)),
    ("SWK 1", "de", ("vertebrae_S1",)),
    ("S1", "de", ("vertebrae_S1",)),
    ("Kreuzbein", "de", ("sacrum",)),
    # ribs, German
    ("10. Rippe links", "de", ("rib_left_10",)),
    ("linke 10. Rippe", "de", ("rib_left_10",)),
    ("zehnte Rippe links", "de", ("rib_left_10",)),
    ("10. Rippe li.", "de", ("rib_left_10",)),
    ("zehnte linke Rippe", "de", ("rib_left_10",)),
    ("10. Rippe", "de", ("rib_left_10", "rib_right_10")),
    ("Rippen", "de", ALL_RIBS),
    ("Rippen links", "de", LEFT_RIBS),
    ("linke Rippen", "de", LEFT_RIBS),
]


@pytest.mark.parametrize(("term", "language", "expected"), CASES)
def test_lookup_cases(term: str, language: str, expected: tuple[str, ...]) -> None:
    assert lookup(term, language) == expected


def test_cases_cover_both_languages_and_are_sorted_by_id() -> None:
    assert len(CASES) >= 60
    assert {language for _, language, _ in CASES} == set(LANGUAGES)
    for _, _, expected in CASES:
        assert list(expected) == sorted(expected, key=CLASS_IDS.__getitem__)


@pytest.mark.parametrize("language", LANGUAGES)
def test_every_class_reachable_by_its_display_name(language: str) -> None:
    assert len(CLASS_IDS) == 121
    for name, display in DISPLAY[language].items():
        assert lookup(display, language) == (name,), display
        terms = terms_for(name, language)
        assert terms[0] == normalize_term(display)
        assert all(lookup(term, language) == (name,) for term in terms)


@pytest.mark.parametrize("language", LANGUAGES)
def test_table_is_well_formed(language: str) -> None:
    table = synonym_table(language)
    assert len(table) > 1000
    for term, classes in table.items():
        assert term and term == normalize_term(term)
        assert classes, term
        assert set(classes) <= CLASS_IDS.keys(), term
        assert list(classes) == sorted(set(classes), key=CLASS_IDS.__getitem__), term


def test_german_table_is_german_and_transliterated() -> None:
    de, en = synonym_table("de"), synonym_table("en")
    assert not [t for t in de if re.search(r"\b(left|right|both|bilateral|kidney)\b", t)]
    assert not [t for t in en if re.search(r"\b(rechts|links|niere|beide)\b", t)]
    for term, classes in de.items():
        ascii_term = term.translate(str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "ß": "ss"}))
        assert de.get(ascii_term) == classes, term


SIDE_DE = re.compile(r"^(recht|link)(e|er|es) (.+)$")


def test_lateral_forms_exist_for_every_lateral_class() -> None:
    checked = 0
    for name, display in DISPLAY["de"].items():
        match = SIDE_DE.match(display)
        if not match:
            continue
        stem, noun = match[1], match[3]
        post, pre = ("rechts", "re.") if stem == "recht" else ("links", "li.")
        for term in (f"{noun} {post}", f"{pre} {noun}", f"{stem}sseitig{match[2]} {noun}"):
            assert lookup(term, "de") == (name,), term
        checked += 1
    for name, display in DISPLAY["en"].items():
        side, _, noun = display.partition(" ")
        if side not in ("left", "right"):
            continue
        for term in (f"{noun}, {side}", f"{side}-sided {noun}", f"{noun} on the {side}"):
            assert lookup(term, "en") == (name,), term
        partner = (
            name.replace("_left", "_right") if side == "left" else name.replace("_right", "_left")
        )
        if partner in CLASS_IDS:
            expected = tuple(sorted((name, partner), key=CLASS_IDS.__getitem__))
            assert lookup(noun, "en") == expected, noun
        checked += 1
    assert checked >= 2 * 24


@pytest.mark.parametrize(
    ("term", "language", "expected"),
    [
        ("LWK - 3", "de", ("vertebrae_L3",)),
        ("lwk 3.", "de", ("vertebrae_L3",)),
        ("Th-12.", "de", ("vertebrae_T12",)),
        ("HWK5", "de", ("vertebrae_C5",)),
        ("C - 5", "en", ("vertebrae_C5",)),
        ("t 12.", "en", ("vertebrae_T12",)),
        ("L6", "en", ()),
        ("LWK 6", "de", ()),
        ("S2", "de", ()),
        ("C8", "en", ()),
        ("T13", "en", ()),
    ],
)
def test_vertebra_patterns_beyond_the_table(
    term: str, language: str, expected: tuple[str, ...]
) -> None:
    assert lookup(term, language) == expected


def test_pattern_matches_spellings_absent_from_table() -> None:
    assert "lwk - 3" not in synonym_table("de")
    assert lookup("LWK - 3", "de") == ("vertebrae_L3",)


@pytest.mark.parametrize(
    ("term", "language"),
    [("banana", "en"), ("", "de"), ("   ", "en"), ("Niere", "en"), ("left kidney", "de")],
)
def test_unknown_terms_give_empty_tuple(term: str, language: str) -> None:
    assert lookup(term, language) == ()


@pytest.mark.parametrize("language", ["fr", "EN", "", None])
def test_unknown_language_raises(language: object) -> None:
    for call in (
        lambda: synonym_table(language),  # type: ignore[arg-type]
        lambda: lookup("kidney", language),  # type: ignore[arg-type]
        lambda: terms_for("kidney_left", language),  # type: ignore[arg-type]
    ):
        with pytest.raises(RadGrounderError, match=r"language.*en, de"):
            call()


def test_terms_for_unknown_class_raises() -> None:
    with pytest.raises(RadGrounderError, match="class_name"):
        terms_for("kidney", "en")


def test_terms_for_lists_rule_generated_forms() -> None:
    terms = terms_for("kidney_right", "de")
    assert terms[0] == "rechte niere"
    assert {"rechten niere", "rechter niere", "niere rechts", "re. niere"} <= set(terms)
    assert "niere" not in terms  # names both kidneys, not this one alone


def test_synonym_table_returns_a_copy() -> None:
    table = synonym_table("en")
    table["left kidney"] = ("spleen",)
    assert lookup("left kidney", "en") == ("kidney_left",)
    assert synonym_table("en")["left kidney"] == ("kidney_left",)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Rechte   NIERE ", "rechte niere"),
        ("linke\u00a0\tNiere\n", "linke niere"),
        ("Niere re.", "niere re"),
        ("10.", "10."),
        ("LWK 3.", "lwk 3."),
        ("Großer Gesäßmuskel", "großer gesäßmuskel"),
        ("GROẞER", "großer"),
        ("GROSSER", "grosser"),
        ("Bauchspeicheldru\u0308se", "bauchspeicheldrüse"),
        ("V. cava", "v. cava"),
        ("a.", "a"),
        (".", "."),
        ("", ""),
    ],
)
def test_normalize_term(raw: str, expected: str) -> None:
    assert normalize_term(raw) == expected


@given(st.text(alphabet="aAßẞäÄöÜ Lk.3\t\u00a0-"))
def test_normalize_term_is_idempotent(text: str) -> None:
    once = normalize_term(text)
    assert normalize_term(once) == once
    assert once == once.strip() and "  " not in once

"""Tests for METEOR (NLTK's implementation on a local WordNet): hand-computed values from
NLTK's formula, the WordNet search and its error messages.

NLTK's sentence METEOR with m matches, P = m/|pred|, R = m/|ref|, ch chunks:
Fmean = P R / (0.9 P + 0.1 R), score = Fmean (1 - 0.5 (ch/m)^3).
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation import metrics_meteor as T

nltk = pytest.importorskip("nltk", reason="METEOR needs NLTK (pip install 'radgrounder[eval]')")


def _wordnet_or_none():
    try:
        return T.find_wordnet()
    except RadGrounderError:
        return None


WORDNET = _wordnet_or_none()
needs_wordnet = pytest.mark.skipif(
    WORDNET is None,
    reason="no WordNet installed (apt-get install wordnet-base, or "
    "python -m nltk.downloader wordnet); CI installs wordnet-base",
)
needs_debian_wordnet = pytest.mark.skipif(
    T._wordnet_dir_problem(T.DEBIAN_WORDNET_DIR) is not None,
    reason="Debian's wordnet-base is not installed in /usr/share/wordnet",
)


def identical(n: int) -> float:
    """NLTK's METEOR of n matched tokens in one chunk: Fmean = 1, penalty 0.5 / n^3."""
    return 1.0 - 0.5 / n**3


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(T, "_wordnet_cache", {})


# ------------------------------------------------------------------------------ tokens


def test_meteor_tokens():
    assert T.meteor_tokens("T2-weighted, 1.5 cm; 1,000 Größe_x!") == [
        "t2",
        "-",
        "weighted",
        ",",
        "1.5",
        "cm",
        ";",
        "1,000",
        "größe_x",
        "!",
    ]
    assert T.meteor_tokens("  \n ") == []


# ------------------------------------------------------------------------------ scores


@needs_wordnet
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_identical_sentences_score_nltk_maximum(n):
    text = " ".join(["left", "renal", "cyst", "with", "thin", "septa", "noted"][:n])
    assert T.meteor(text, text) == pytest.approx(identical(n))
    # case and spacing do not matter
    assert T.meteor(text.upper(), "  " + text + " ") == pytest.approx(identical(n))


@needs_wordnet
def test_synonym_matches_through_wordnet_only():
    from nltk.translate.meteor_score import exact_match, stem_match, wordnetsyn_match

    pred, ref = ["a", "large", "tumor"], ["a", "large", "neoplasm"]
    assert exact_match(["tumor"], ["neoplasm"])[0] == []
    assert stem_match(["tumor"], ["neoplasm"])[0] == []
    assert wordnetsyn_match(["tumor"], ["neoplasm"], wordnet=WORDNET)[0] == [(0, 0)]
    # all three words match in one chunk
    assert T.meteor(" ".join(pred), " ".join(ref)) == pytest.approx(identical(3))
    # without the synonym: m = 2 of 3 in one chunk -> Fmean 2/3, penalty 0.5 / 2^3
    assert T.meteor("a large tumor", "a large cat") == pytest.approx(2 / 3 * (1 - 0.5 / 8))


@needs_wordnet
def test_nltk_synonym_stage_sees_porter_stems():
    # NLTK looks up the synonyms of the Porter stem "larg", which is no WordNet lemma, so
    # "large"/"big" do not match (documented in meteor's docstring).
    assert T.meteor("large", "big") == 0.0
    assert T.meteor("big", "great") == pytest.approx(identical(1))


@needs_wordnet
def test_stem_match():
    from nltk.translate.meteor_score import exact_match

    assert exact_match(["kidneys"], ["kidney"])[0] == []
    assert T.meteor("kidneys", "kidney") == pytest.approx(identical(1))
    assert T.meteor("both kidneys enlarged", "both kidney enlarged") == pytest.approx(identical(3))


@needs_wordnet
def test_word_order_change_adds_fragmentation_penalty():
    # all 3 words match, but in 2 chunks ("left kidney" | "cyst"): 1 - 0.5 (2/3)^3
    swapped = T.meteor("cyst left kidney", "left kidney cyst")
    assert swapped == pytest.approx(1 - 0.5 * (2 / 3) ** 3)
    assert swapped < T.meteor("left kidney cyst", "left kidney cyst")


@needs_wordnet
def test_partial_overlap_hand_computed():
    # pred 4 tokens, ref 2, m = 2 in one chunk: P = 1/2, R = 1, Fmean = 0.5 / (0.45 + 0.1)
    fmean = 0.5 / (0.9 * 0.5 + 0.1 * 1.0)
    assert T.meteor("small left pleural effusion", "pleural effusion") == pytest.approx(
        fmean * (1 - 0.5 / 8)
    )


@needs_wordnet
def test_empty_strings():
    assert T.meteor("", "") == 1.0
    assert T.meteor("   ", "\n") == 1.0
    assert T.meteor("", "no effusion") == 0.0
    assert T.meteor("no effusion", "") == 0.0
    assert T.meteor("liver", "spleen") == 0.0


@needs_wordnet
def test_german_text_does_not_crash():
    s = T.meteor("Größe der Läsion: 5 mm, unverändert.", "größe der läsion 5mm unverändert")
    assert 0.0 < s < 1.0
    assert T.meteor("Läsion", "Läsion") == pytest.approx(identical(1))
    assert T.meteor("Nierenzyste ß", "Öl über Äste") == 0.0


@needs_wordnet
def test_meteor_is_reexported():
    from radgrounder.evaluation import meteor
    from radgrounder.evaluation.metrics import meteor as meteor2

    assert meteor is meteor2 is T.meteor
    assert T.meteor_available()


# ------------------------------------------------------------------------ find_wordnet


def test_find_wordnet_wrong_explicit_folder(tmp_path, fresh_cache):
    missing = tmp_path / "no_such_wordnet"
    with pytest.raises(RadGrounderError, match="does not exist") as err:
        T.find_wordnet(missing)
    assert str(missing) in str(err.value)
    assert "data.noun" in str(err.value)
    assert not T.meteor_available(missing)
    with pytest.raises(RadGrounderError, match="no_such_wordnet"):
        T.meteor("a", "a", wordnet_dir=missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RadGrounderError, match=r"lacks the WordNet files index\.noun") as err:
        T.find_wordnet(empty)
    assert str(empty) in str(err.value)


def test_find_wordnet_nothing_found_says_how_to_fix(tmp_path, monkeypatch, fresh_cache):
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    monkeypatch.setattr(T, "DEBIAN_WORDNET_DIR", tmp_path / "usr_share_wordnet")
    with pytest.raises(RadGrounderError) as err:
        T.find_wordnet()
    msg = str(err.value)
    for part in ("corpora/wordnet", "nltk_data", "usr_share_wordnet", "wordnet-base"):
        assert part in msg
    assert "python -m nltk.downloader wordnet" in msg
    assert "wordnet_dir=" in msg
    assert not T.meteor_available()


@needs_debian_wordnet
def test_find_wordnet_explicit_debian_folder_is_cached(fresh_cache):
    reader = T.find_wordnet(T.DEBIAN_WORDNET_DIR)
    assert reader is T.find_wordnet(str(T.DEBIAN_WORDNET_DIR))
    assert reader.get_version() == "3.0"
    assert "big" in {lemma.name() for s in reader.synsets("large") for lemma in s.lemmas()}
    # the built-in lexnames table gives the right lexicographer file names
    assert reader.synset("kidney.n.01").lexname() == "noun.body"
    assert reader.synset("large.a.01").lexname() == "adj.all"
    assert reader.synset("run.v.01").lexname() == "verb.motion"


@needs_debian_wordnet
def test_find_wordnet_prefers_nltk_data_path(tmp_path, monkeypatch, fresh_cache):
    # a private copy of the Debian files as NLTK's corpora/wordnet, plain then zipped
    data = tmp_path / "nltk_data"
    corpus = data / "corpora" / "wordnet"
    corpus.mkdir(parents=True)
    for name in T._WORDNET_FILES:
        shutil.copy(T.DEBIAN_WORDNET_DIR / name, corpus / name)
    monkeypatch.setattr(nltk.data, "path", [str(data)])
    monkeypatch.setattr(T, "DEBIAN_WORDNET_DIR", tmp_path / "absent")
    reader = T.find_wordnet()
    assert Path(str(reader.root)).resolve() == corpus.resolve()
    assert T.meteor("tumor", "neoplasm") == pytest.approx(identical(1))

    with zipfile.ZipFile(data / "corpora" / "wordnet.zip", "w") as zf:
        for name in T._WORDNET_FILES:
            zf.write(corpus / name, f"wordnet/{name}")
    shutil.rmtree(corpus)
    monkeypatch.setattr(T, "_wordnet_cache", {})
    reader = T.find_wordnet()
    assert "wordnet.zip" in str(reader.root)
    assert T.meteor("tumor", "neoplasm") == pytest.approx(identical(1))


@needs_debian_wordnet
def test_find_wordnet_accepts_release_layout_with_dict(tmp_path, fresh_cache):
    (tmp_path / "WordNet-3.0").mkdir()
    dict_dir = tmp_path / "WordNet-3.0" / "dict"
    shutil.copytree(T.DEBIAN_WORDNET_DIR, dict_dir)
    reader = T.find_wordnet(tmp_path / "WordNet-3.0")
    assert Path(str(reader.root)).resolve() == dict_dir.resolve()
    assert T.meteor("tumor", "neoplasm", wordnet_dir=tmp_path / "WordNet-3.0") == pytest.approx(
        identical(1)
    )

"""METEOR with NLTK and a local WordNet 3.0 database (optional: the ``eval`` extra).

The WordNet data is never downloaded: :func:`find_wordnet` looks in NLTK's data path and in
Debian's ``wordnet-base`` folder, or takes an explicit folder.
"""

from __future__ import annotations

import functools
import io
import re
import threading
import warnings
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError

__all__ = ["find_wordnet", "meteor", "meteor_available", "meteor_tokens"]

#: Debian's ``wordnet-base`` package installs the WordNet 3.0 database files here.
DEBIAN_WORDNET_DIR = Path("/usr/share/wordnet")

#: The database files NLTK's WordNet reader opens (``lexnames`` is supplied if missing).
_WORDNET_FILES = (
    *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")),
    *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")),
)

#: WordNet 3.0's lexicographer files in file-number order (``lexnames(5WN)``). Debian's
#: wordnet-base ships no ``lexnames`` file, which NLTK's reader requires.
_LEXNAMES = [
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
]
_LEX_CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

_METEOR_TOKEN = re.compile(r"\d+(?:[.,]\d+)+|\w+|[^\w\s]")

_wordnet_cache: dict[str, Any] = {}
_wordnet_lock = threading.Lock()


@functools.cache
def _wordnet_reader_class() -> type:
    """NLTK's ``WordNetCorpusReader`` adapted to a plain WordNet 3.0 ``dict`` folder."""
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class LocalWordNetReader(WordNetCorpusReader):
        """Serves the fixed WordNet 3.0 ``lexnames`` table when the folder has no such file,
        and skips the Open Multilingual WordNet version mapping (which would look for NLTK's
        own ``wordnet`` resource and is not used by METEOR)."""

        def open(self, file: str) -> Any:
            if file == "lexnames":
                try:
                    return super().open(file)
                except (OSError, KeyError, LookupError):
                    return io.StringIO(
                        "".join(
                            f"{i:02d}\t{name}\t{_LEX_CATEGORY[name.split('.')[0]]}\n"
                            for i, name in enumerate(_LEXNAMES)
                        )
                    )
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            return None

    return LocalWordNetReader


def _import_nltk() -> Any:
    try:
        import nltk
    except ImportError as exc:
        raise RadGrounderError(
            "METEOR needs NLTK, which is not installed; install it with "
            "pip install 'radgrounder[eval]' (or pip install 'nltk>=3.8')"
        ) from exc
    return nltk


def _wordnet_dir_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a WordNet database folder, or None if it looks like one."""
    if not folder.exists():
        return "does not exist"
    if not folder.is_dir():
        return "is not a folder"
    missing = [name for name in _WORDNET_FILES if not (folder / name).is_file()]
    if missing:
        return f"lacks the WordNet files {', '.join(missing)}"
    return None


def _load_wordnet(root: Any) -> Any:
    """Build the reader on ``root`` (a folder or an NLTK path pointer)."""
    nltk = _import_nltk()
    if isinstance(root, Path):
        # Recent NLTK releases only open files below an entry of nltk.data.path.
        resolved = str(root.resolve())
        if resolved not in [str(p) for p in nltk.data.path]:
            nltk.data.path.append(resolved)
        root = resolved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available"
        return _wordnet_reader_class()(root, None)


def _find_explicit_wordnet(folder: Path) -> Any:
    if (folder / "dict").is_dir() and not (folder / "data.noun").exists():
        folder = folder / "dict"  # the WordNet-3.0 release layout
    problem = _wordnet_dir_problem(folder)
    if problem is None:
        try:
            return _load_wordnet(folder)
        except Exception as exc:
            problem = f"could not be read as WordNet ({type(exc).__name__}: {exc})"
    raise RadGrounderError(
        f"WordNet folder {problem}; wordnet_dir must be the folder holding WordNet 3.0's "
        "data.noun, index.noun, noun.exc, ... files (Debian's wordnet-base installs them in "
        f"{DEBIAN_WORDNET_DIR}; NLTK's downloader in nltk_data/corpora/wordnet)",
        path=folder,
    )


def _search_wordnet() -> Any:
    nltk = _import_nltk()
    notes: list[str] = []
    pointer = None
    for resource in ("corpora/wordnet", "corpora/wordnet.zip/wordnet/"):  # as NLTK's loader
        try:
            pointer = nltk.data.find(resource)
            break
        except LookupError:
            continue
    if pointer is None:
        notes.append(
            "NLTK's data path (corpora/wordnet and corpora/wordnet.zip) in "
            + ", ".join(str(p) for p in nltk.data.path)
            + ": not there"
        )
    else:
        try:
            return _load_wordnet(pointer)
        except Exception as exc:
            notes.append(f"{pointer}: unreadable ({type(exc).__name__}: {exc})")
    problem = _wordnet_dir_problem(DEBIAN_WORDNET_DIR)
    if problem is None:
        try:
            return _load_wordnet(DEBIAN_WORDNET_DIR)
        except Exception as exc:
            problem = f"unreadable ({type(exc).__name__}: {exc})"
    notes.append(f"{DEBIAN_WORDNET_DIR} (Debian package wordnet-base): {problem}")
    raise RadGrounderError(
        "METEOR needs the WordNet 3.0 database and none was found. Searched: "
        + "; ".join(notes)
        + ". Fix: install Debian's wordnet-base (apt-get install wordnet-base), or run "
        "python -m nltk.downloader wordnet on a machine with network access (and copy its "
        "nltk_data folder here), or pass wordnet_dir=<folder with WordNet's data.noun, "
        "index.noun, ... files>"
    )


def find_wordnet(wordnet_dir: str | Path | None = None) -> Any:
    """Locate a WordNet 3.0 database and return an NLTK ``WordNetCorpusReader`` for it.

    Nothing is downloaded. With ``wordnet_dir`` only that folder is used (the folder holding
    ``data.noun``, ``index.noun``, ``noun.exc``, ...; a release folder with a ``dict``
    subfolder also works); otherwise, in order: NLTK's data path
    (``nltk.data.find("corpora/wordnet")``, plain or zipped), then Debian's ``wordnet-base``
    files in ``/usr/share/wordnet``. A missing ``lexnames`` file (Debian ships none) is
    replaced by WordNet 3.0's fixed table. A folder outside NLTK's data path is appended to
    ``nltk.data.path``, since recent NLTK versions refuse to read files anywhere else.

    Readers are cached per folder (and for the automatic search) for the process lifetime.
    Raises :class:`RadGrounderError` naming what was searched and how to install WordNet
    when nothing usable is found, or when NLTK is not installed.
    """
    if wordnet_dir is not None:
        folder = Path(wordnet_dir).expanduser()
        key = str(folder.resolve())
    else:
        folder, key = None, ""
    with _wordnet_lock:
        reader = _wordnet_cache.get(key)
        if reader is None:
            _import_nltk()
            reader = _search_wordnet() if folder is None else _find_explicit_wordnet(folder)
            _wordnet_cache[key] = reader
        return reader


def meteor_available(wordnet_dir: str | Path | None = None) -> bool:
    """True if :func:`meteor` can run: NLTK is installed and :func:`find_wordnet` finds
    WordNet (for ``wordnet_dir``, or by its automatic search)."""
    try:
        find_wordnet(wordnet_dir)
    except RadGrounderError:
        return False
    return True


def meteor_tokens(text: str) -> list[str]:
    """The tokens :func:`meteor` scores: ``text.lower()``, then, left to right, either a
    number with inner ``.``/``,`` separators (``1.5``, ``1,000``), a maximal run of Unicode
    word characters (letters, digits, ``_``: ``größe``, ``t2``), or any other single
    non-whitespace character (punctuation and symbols are tokens of their own:
    ``"T2-weighted."`` -> ``["t2", "-", "weighted", "."]``). Whitespace only separates."""
    return _METEOR_TOKEN.findall(text.lower())


def meteor(pred: str, ref: str, *, wordnet_dir: str | Path | None = None) -> float:
    """Sentence METEOR of one prediction against one reference: NLTK's
    ``nltk.translate.meteor_score.meteor_score`` with its defaults (α=0.9, β=3, γ=0.5,
    Porter stemmer) and the WordNet from :func:`find_wordnet` (``wordnet_dir`` as there).

    Both strings are tokenised by :func:`meteor_tokens`. Alignment: exact matches, then
    Porter-stem matches, then WordNet-synonym matches (a prediction word matches a reference
    word that is a one-word lemma of one of its synsets), each stage on the words still
    unmatched. As implemented in NLTK, the synonym stage sees the Porter *stems* of the words
    left by the stem stage, so a synonym pair matches only when both stems are themselves
    WordNet lemmas ("tumor"/"neoplasm" match; "large"/"big" do not, "larg" being no lemma).
    With m matches, P = m/|pred|, R = m/|ref|,
    Fmean = P·R / (α·P + (1-α)·R), ch = the number of chunks (maximal runs of matches
    adjacent in both strings), penalty = γ·(ch/m)^β and score = (1 - penalty)·Fmean;
    0.0 when nothing matches. Hence identical n-token strings score 1 - 0.5/n³ (0.5 for a
    single token), not 1.0.
    If either side has no tokens the score is 0.0, except 1.0 when both have none (our
    convention; NLTK returns 0.0 there).

    This is not numerically identical to the Java METEOR 1.5 used by pycocoevalcap
    (paraphrase tables, function-word weighting, other parameters and tokenisation), so its
    values must not be compared with published pycocoevalcap METEOR numbers.
    Raises :class:`RadGrounderError` if NLTK or WordNet is missing.
    """
    wordnet = find_wordnet(wordnet_dir)
    p, r = meteor_tokens(pred), meteor_tokens(ref)
    if not p or not r:
        return float(p == r)
    from nltk.translate.meteor_score import meteor_score

    return float(meteor_score([r], p, wordnet=wordnet))

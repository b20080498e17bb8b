"""Lexicon keyword extraction throughput (sentences/s) per language. Prints JSON.

    .venv/bin/python benchmarks/bench_keywords.py [--n 5000]

The baseline in the same run is a plain regex alternation over the same synonym table
(longest term first), the obvious hand-rolled matcher, so the number is put in context.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time

from radgrounder.anatomy.synonyms import synonym_table
from radgrounder.labels.lexicon import extract_mentions

SENTENCES = {
    "en": "Compared with the prior examination there is a new 8 mm nodule in the right upper lobe "
    "and no pleural effusion, both kidneys without hydronephrosis, degenerative change at L4/5.",
    "de": "Kein Hinweis auf eine Raumforderung der Leber, die Nieren beidseits ohne Harnstau, "
    "Fraktur der 7. bis 9. Rippe links, Osteochondrose LWK 4/5.",
}


def rate(fn, batch) -> float:
    start = time.perf_counter()
    for s in batch:
        fn(s)
    return len(batch) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    out = {}
    for lang, sentence in SENTENCES.items():
        batch = [f"{sentence} ({i})" for i in range(args.n)]
        extract_mentions(sentence, lang)  # build the trie outside the timing
        terms = sorted(synonym_table(lang), key=len, reverse=True)
        pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, terms)) + r")\b", re.IGNORECASE)
        out[lang] = {
            "words_per_sentence": len(sentence.split()),
            "ours_sentences_per_s": round(
                rate(lambda s, lang=lang: extract_mentions(s, lang), batch)
            ),
            "regex_baseline_sentences_per_s": round(rate(pattern.findall, batch)),
        }
    print(
        json.dumps(
            {
                "languages": out,
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()

"""Lexicon keyword extraction throughput (sentences/s) per language. Prints JSON.

    .venv/bin/python benchmarks/bench_keywords.py [--n 2000] [--rounds 7]

The baseline in the same run is a plain regex alternation over the same synonym table
(longest term first), the obvious hand-rolled matcher, so the number is put in context. Each
round runs both over ``--n`` sentences, interleaved (``benchmarks/harness.py``).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys

from harness import MIN_ROUNDS, Machine, interleave, rate, speedup  # benchmarks/harness.py

from radgrounder.anatomy.synonyms import synonym_table
from radgrounder.labels.lexicon import extract_mentions

SENTENCES = {
    "en": "Compared with the prior examination there is a new 8 mm nodule in the right upper lobe "
    "and no pleural effusion, both kidneys without hydronephrosis, degenerative change at L4/5.",
    "de": "Kein Hinweis auf eine Raumforderung der Leber, die Nieren beidseits ohne Harnstau, "
    "Fraktur der 7. bis 9. Rippe links, Osteochondrose LWK 4/5.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="sentences per round")
    parser.add_argument("--rounds", type=int, default=7, help=f"timed rounds (>= {MIN_ROUNDS})")
    args = parser.parse_args()
    if args.rounds < MIN_ROUNDS or args.n < 1:
        parser.error(f"--rounds must be at least {MIN_ROUNDS} and --n positive")
    machine = Machine()
    languages, comparisons = {}, {}
    for lang, sentence in SENTENCES.items():
        batch = [f"{sentence} ({i})" for i in range(args.n)]
        extract_mentions(sentence, lang)  # build the trie outside the timing
        terms = sorted(synonym_table(lang), key=len, reverse=True)
        pattern = re.compile(r"\b(?:" + "|".join(map(re.escape, terms)) + r")\b", re.IGNORECASE)
        seconds = interleave_batches(
            {
                "regex": pattern.findall,
                "ours": lambda s, lang=lang: extract_mentions(s, lang),
            },
            batch,
            args.rounds,
        )
        languages[lang] = {
            "words_per_sentence": len(sentence.split()),
            "ours_sentences_per_s": rate(seconds["ours"], args.n),
            "regex_baseline_sentences_per_s": rate(seconds["regex"], args.n),
        }
        comparisons[f"{lang}_ours_over_regex"] = {
            "what": f"{lang} sentences/s, lexicon extraction / regex alternation",
            **speedup(seconds, "regex", "ours"),
        }
    result = {
        "benchmark": "keywords",
        "command": shlex.join([sys.executable, *sys.argv]),
        "sentences_per_round": args.n,
        "rounds": args.rounds,
        "languages": languages,
        "comparisons": comparisons,
        "unstable": any(c["unstable"] for c in comparisons.values()),
        "machine": machine.report(),
    }
    print(json.dumps(result, indent=2))


def interleave_batches(fns, batch, rounds: int) -> dict[str, list[float]]:
    """Each function over the whole batch, one call per round and side, interleaved."""

    def over_batch(fn):
        return lambda: [fn(s) for s in batch]

    return interleave({name: over_batch(fn) for name, fn in fns.items()}, rounds, min_round_s=0.5)


if __name__ == "__main__":
    main()

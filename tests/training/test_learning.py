"""A tiny model trained a few minutes on CPU learns: held-out loss falls and it writes
well-formed grounding markup for held-out slices (slow; run by CI)."""

import numpy as np
import pytest

from radgrounder.anatomy import load_schema
from radgrounder.grounding import codec
from radgrounder.modeling import generate, load_model
from radgrounder.training import evaluate, load_config, train
from radgrounder.training.collate import make_batch
from radgrounder.training.config import SourceConfig
from radgrounder.training.data import BuiltSource
from tests.conftest import REPO

# Grammar problems only: a box whose corners a barely trained model puts out of order is
# parsed (and repaired), so it still counts as well-formed markup.
GEOMETRY = ("swapped", "clipped")


MAX_NEW = 200


def well_formed(text: str, det, hit_limit: bool) -> bool:
    """Parses with no grammar problem; a tag left open because generation reached the token
    limit is a length cut, not a grammar error."""
    decoded = det.decode(text)
    grammar = [p for p in decoded.problems if not any(g in p for g in GEOMETRY)]
    if hit_limit:
        grammar = [p for p in grammar if "truncated" not in p]
        unclosed = [i for i, p in enumerate(grammar) if p.startswith("unclosed")]
        if unclosed and not text.rstrip().endswith("</p>"):
            del grammar[unclosed[-1]]
    return bool(decoded.spans) and not grammar


@pytest.mark.slow
def test_tiny_model_learns_on_cpu(tmp_path):
    import torch
    from accelerate import Accelerator

    out = tmp_path / "run"
    dataset = tmp_path / "dataset"
    cfg = load_config(
        REPO / "configs/tiny-cpu.yaml",
        [
            f"output_dir={out}",
            f"data.build.out={dataset}",
            f"data.sources.0.path={dataset}",
            f"data.sources.1.path={dataset}",
            f"data.eval_sources.0.path={dataset}",
            "data.build.scans=" + str(REPO / "data/totalseg_example/layout/scans"),
            "data.build.labels=" + str(REPO / "data/totalseg_example/layout/labels"),
            "data.build.reports=" + str(REPO / "data/totalseg_example/reports.jsonl"),
        ],
    )
    result = train(cfg, progress=False)

    # Held-out loss of the untrained model, on the same held-out examples.
    from radgrounder.training.data import make_source

    torch.set_flush_denormal(True)
    init = load_model(out / "init")
    final = load_model(result.final_dir)
    sources = [
        make_source(s, "detection", preset="reference", size=224) for s in cfg.data.eval_sources
    ]
    from radgrounder.training.data import Mixture

    mix = Mixture(sources, [1.0], 1.0, cfg.seed + 1)
    held_out = [mix.example(0, i, "both") for i in range(cfg.eval_samples)]
    acc = Accelerator(cpu=True)
    before = evaluate(init.model, init.tokenizer, held_out, cfg, 256, None, acc)["eval_loss"]
    after = evaluate(final.model, final.tokenizer, held_out, cfg, 256, None, acc)["eval_loss"]
    print({"held_out_loss_before": before, "held_out_loss_after": after})
    assert after < 0.5 * before

    # Well-formed grounding markup on held-out slices: one grounded report per slice.
    src = BuiltSource(
        SourceConfig(path=str(dataset), split="test", tasks=["grounded-report"]),
        "detection",
        preset="reference",
        size=224,
    )
    rng = np.random.default_rng(0)
    examples, seen = [], set()
    for i in range(len(src)):
        ex = src.example(i, rng, "both")
        parts = ex.id.split("/")
        key = (parts[0], parts[2])  # scan, slice
        if key not in seen:
            seen.add(key)
            examples.append(ex)
    det = codec("radgrounder-detect", class_names=load_schema().names_by_id())
    good = 0
    for i in range(0, len(examples), 8):
        chunk = examples[i : i + 8]
        batch = make_batch(chunk, final.tokenizer, n_image_tokens=256, training=False)
        good += sum(
            well_formed(g.text, det, len(g.token_ids) >= MAX_NEW)
            for g in generate(final.model, final.tokenizer, batch, max_new_tokens=MAX_NEW)
        )
    rate = good / len(examples)
    print({"held_out_slices": len(examples), "well_formed": rate})
    # An untrained model writes no grounding markup. Which of the 20 held-out reports come out
    # well-formed after 500 steps depends on float-level noise (1-ulp changes in the pixels or
    # the loss summation order move greedy decoding): with configs/tiny-cpu.yaml we measured
    # 12, 20 and 19 of 20 for seeds 0, 1 and 2 (the misses: German reports with a 3-token box).
    assert rate >= 0.5

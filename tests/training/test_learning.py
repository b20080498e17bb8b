"""The demo's recipe learns on CPU within minutes: held-out loss falls, and on a patient it
never saw the model places organ boxes better than the mean-box location prior, with the
paired bootstrap CI excluding 0 (slow; run by CI). A change that breaks learning fails here."""

import pytest


@pytest.mark.slow
def test_demo_recipe_beats_the_location_prior(tmp_path):
    import torch
    from accelerate import Accelerator

    from radgrounder.demo import example_dir
    from radgrounder.demo_pipeline import CONFIG, _train_config, run_pipeline
    from radgrounder.evaluation.compare import compare_runs
    from radgrounder.modeling import load_model
    from radgrounder.training import evaluate
    from radgrounder.training.data import Mixture, make_source

    out = tmp_path / "demo"
    result = run_pipeline(out, seed=0)

    paired = compare_runs(out / "eval" / "model", out / "eval" / "baseline")
    box = paired["metrics"]["all"]["box_iou"]
    model = result.summary["model"]["metrics"]["all"]["box_iou"]["mean"]
    prior = result.summary["baseline"]["metrics"]["all"]["box_iou"]["mean"]
    print({"box_iou": model, "prior": prior, "paired": box})
    assert box["low"] > 0, f"box IoU {model:.3f} does not beat the prior's {prior:.3f}: {box}"
    page = result.index_html.read_text(encoding="utf-8")
    assert f"{box['diff']:+.3f} [{box['low']:+.3f}, {box['high']:+.3f}]" in page
    assert "places boxes better than the location prior" in page

    # Held-out loss of the untrained model against the trained one, on the same examples.
    torch.set_flush_denormal(True)
    cfg = _train_config(example_dir(), out, CONFIG, None, 0)
    init = load_model(out / "train" / "init")
    final = load_model(result.model)
    sources = [
        make_source(s, "detection", preset="reference", size=224) for s in cfg.data.eval_sources
    ]
    held_out = [
        Mixture(sources, [1.0], 1.0, cfg.seed + 1).example(0, i, "both")
        for i in range(cfg.eval_samples)
    ]
    acc = Accelerator(cpu=True)
    before = evaluate(init.model, init.tokenizer, held_out, cfg, 256, None, acc)["eval_loss"]
    after = evaluate(final.model, final.tokenizer, held_out, cfg, 256, None, acc)["eval_loss"]
    print({"held_out_loss_before": before, "held_out_loss_after": after})
    assert after < 0.5 * before

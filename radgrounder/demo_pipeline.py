"""``make demo``: the whole loop on the bundled real scans, on CPU, in minutes.

1. build the grounded dataset (lexicon keywords, boxes, masks, English and German);
2. train a small random-initialised detection model (``configs/tiny-cpu.yaml``);
3. evaluate it on the held-out scan next to the mean-box baseline, with bootstrap CIs;
4. predict on the bundled DICOM series: overlays and a 3-D summary, in both languages;
5. write ``index.html`` with all of it (:mod:`radgrounder.demo_page`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radgrounder.errors import RadGrounderError

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"
EVAL_METRICS = ("grounding_iou", "box_iou", "f1", "cider", "bleu4", "rouge_l")
# With this seed the whole-scan split holds out the DICOM series (a patient no other bundled
# scan shows); the model is then evaluated on it and step 5 predicts on it too.
SPLIT_SEED = 2


@dataclass
class DemoResult:
    out: Path
    index_html: Path
    model: Path
    seconds: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


def _evaluate_afresh(model: Any, ds: Any, run_dir: Path, opts: Any) -> Any:
    """Evaluate into ``run_dir``; a rerun with other settings (more steps train another
    model, another --eval-limit) starts that evaluation afresh instead of being refused."""
    import shutil

    from radgrounder.evaluation.runner import DifferentRunError, evaluate

    try:
        return evaluate(model, ds, run_dir, opts)
    except DifferentRunError:
        shutil.rmtree(run_dir)
        return evaluate(model, ds, run_dir, opts)


def _train_config(
    data: Path, out: Path, config: Path, max_steps: int | None, seed: int | None = None
):
    from radgrounder.training import load_config

    if not config.is_file():
        raise RadGrounderError("demo training config not found (pass --config)", path=config)
    ds = out / "dataset"
    overrides = [
        f"output_dir={out / 'train'}",
        f"data.build.scans={data / 'layout' / 'scans'}",
        f"data.build.labels={data / 'layout' / 'labels'}",
        f"data.build.reports={data / 'reports.jsonl'}",
        f"data.build.out={ds}",
        # Box- and mask-consistent crops/shifts (spec §4.5): with them the model learns to
        # place organs better than their mean position on the held-out patient; without, it
        # memorises the training patients' layout.
        "data.augment=true",
    ]
    cfg = load_config(config, overrides)
    for src in [*cfg.data.sources, *cfg.data.eval_sources]:
        if src.kind == "built":
            src.path = str(ds)
    if max_steps is not None:
        cfg.max_steps = max_steps
        cfg.eval_every = min(cfg.eval_every, max_steps)
        cfg.save_every = min(cfg.save_every, max_steps)
    if seed is not None:
        cfg.seed = seed
    return cfg


def run_pipeline(
    out_dir: str | Path = "demo_output",
    *,
    max_steps: int | None = None,
    eval_limit: int | None = None,
    max_new_tokens: int = 160,
    config: str | Path = CONFIG,
    seed: int | None = None,
    console: Any = None,
) -> DemoResult:
    """Run every stage into ``out_dir``; stages whose outputs exist are resumed, not redone
    (the dataset build, the training checkpoints and the evaluation records all resume).
    ``seed`` replaces the training config's seed (initialisation, sampling, augmentation);
    the held-out patient stays the same."""
    from rich.console import Console

    from radgrounder.demo import example_dir, run_demo
    from radgrounder.demo_page import write_demo_page
    from radgrounder.evaluation.baseline import MeanBoxBaseline
    from radgrounder.evaluation.compare import compare_runs
    from radgrounder.evaluation.datasets import open_dataset
    from radgrounder.evaluation.runner import EvalOptions
    from radgrounder.inference import Predictor
    from radgrounder.inference.outputs import run_predict
    from radgrounder.labels.build import BuildOptions, build_dataset
    from radgrounder.training import train

    console = console or Console()
    out = Path(out_dir)
    data = example_dir()
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()

    console.rule("1/6 the bundled scans")
    run_demo(out / "data", console=console)
    seconds["inspect"] = time.perf_counter() - t0

    console.rule("2/6 grounded dataset (lexicon keywords, boxes, masks, EN + DE)")
    t = time.perf_counter()
    report = build_dataset(
        data / "layout" / "scans",
        data / "layout" / "labels",
        data / "reports.jsonl",
        out / "dataset",
        BuildOptions(seed=SPLIT_SEED),
        progress=True,
    )
    if report.failed:
        raise RadGrounderError(f"dataset build failed for {sorted(report.failed)}")
    seconds["dataset"] = time.perf_counter() - t

    console.rule("3/6 training a small detection model on CPU")
    t = time.perf_counter()
    cfg = _train_config(data, out, Path(config), max_steps, seed)
    batch = cfg.global_batch_size or cfg.batch_size
    console.print(f"{cfg.max_steps} steps of batch {batch}; log in {out / 'train/logs'}")
    trained = train(cfg, progress=True)
    model = Path(trained.final_dir)
    seconds["train"] = time.perf_counter() - t

    console.rule("4/6 evaluation on the held-out scan, next to the mean-box baseline")
    t = time.perf_counter()
    ds = open_dataset("built", out / "dataset", split="test", tasks=["grounded-report"])
    opts = EvalOptions(max_new_tokens=max_new_tokens, batch_size=16, limit=eval_limit,
                       n_examples=6, meteor=False)  # fmt: skip
    run = _evaluate_afresh(model, ds, out / "eval" / "model", opts)
    base = _evaluate_afresh(MeanBoxBaseline(out / "dataset"), ds, out / "eval" / "baseline", opts)
    diff = compare_runs(out / "eval" / "model", out / "eval" / "baseline")
    for name in EVAL_METRICS:
        m = run.summary["metrics"]["all"].get(name)
        b = base.summary["metrics"]["all"].get(name)
        if m:
            extra = (
                f"  baseline {b['mean']:.3f}" if b and name in ("grounding_iou", "box_iou") else ""
            )
            console.print(
                f"  {name:<15} model {m['mean']:.3f} [{m['low']:.3f}, {m['high']:.3f}]{extra}"
            )
    seconds["eval"] = time.perf_counter() - t

    console.rule("5/6 prediction on the held-out DICOM series (all slices, EN + DE)")
    t = time.perf_counter()
    predictor = Predictor(model, batch_size=20)
    predictions = {}
    for lang in ("en", "de"):
        predictions[lang] = run_predict(
            predictor,
            data / "example_ct_dicom",
            out / "predict" / lang,
            task="grounded-report",
            language=lang,
            all_slices=True,
            max_new_tokens=max_new_tokens,
        )
        console.print(f"  {lang}: {predictions[lang].n} slices -> {predictions[lang].out}")
    seconds["predict"] = time.perf_counter() - t

    console.rule("6/6 the demo page")
    seconds["total"] = time.perf_counter() - t0
    page = write_demo_page(
        out,
        model_run=run.summary,
        baseline_run=base.summary,
        comparison=diff,
        train_log=out / "train" / "logs" / "train.jsonl",
        train_config=cfg,
        seconds=seconds,
    )
    console.print(f"[bold green]demo page:[/] {page.resolve()}")
    return DemoResult(out, page, model, seconds, {"model": run.summary, "baseline": base.summary})

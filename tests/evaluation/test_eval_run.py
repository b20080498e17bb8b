"""End-to-end ``radgrounder eval`` / ``compare`` with tiny models on generated fixtures."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.compare import compare_runs, paired_bootstrap
from radgrounder.evaluation.datasets import open_dataset
from radgrounder.evaluation.runner import EvalOptions, evaluate
from radgrounder.resources import load_json
from tests.helpers import run_cli

OUTPUTS = ("samples.parquet", "samples.csv", "summary.json", "report.html")


def _eval(model, dataset, root, out, *extra):
    return [
        "eval", "--model", str(model), "--dataset", dataset, "--data-root", str(root),
        "--out", str(out), "--quiet", *extra,
    ]  # fmt: skip


def test_vqa_rad_test_split_end_to_end(tiny_models, vqa_rad_root, tmp_path, capsys):
    out = tmp_path / "vqa"
    args = _eval(tiny_models["detection"], "vqa-rad", vqa_rad_root, out)
    code, cap = run_cli(
        [*args, "--split", "test", "--max-new-tokens", "3", "--batch-size", "64"], capsys
    )
    assert code == 0, cap.err
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    split = load_json("vqa_rad/test_fixed_split.json")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"]["n"] == len(split) == 735
    assert summary["metrics"]["all"]["f1"]["n"] == 735
    n_closed = sum(r["q_type"].strip().lower() == "closed" for r in split)
    assert summary["metrics"]["closed"]["accuracy"]["n"] == n_closed == 432
    assert summary["metrics"]["open"]["accuracy"]["n"] == 735 - 432
    assert summary["bootstrap"]["n_resamples"] == 10_000
    assert summary["model"]["sha256"] and summary["dataset"]["sha256"]
    assert {"torch", "transformers", "radgrounder"} <= set(summary["versions"])
    table = pq.read_table(out / "samples.parquet")
    assert table.num_rows == 735 == pacsv.read_csv(out / "samples.csv").num_rows
    rows = table.to_pylist()
    assert rows[0]["question_type"] in ("open", "closed")
    assert rows[0]["reference"] == split[0]["answer"]
    assert rows[0]["prompt"] == f"<image>\n{split[0]['question']}\nAnswer: "
    f1 = np.array([r["f1"] for r in rows])
    assert summary["metrics"]["all"]["f1"]["mean"] == pytest.approx(f1.mean())
    ci = summary["metrics"]["all"]["cider"]
    assert ci["low"] <= ci["mean"] <= ci["high"]
    assert "report ->" in cap.out


def test_slake_english_test_split_and_reference_compat(tiny_models, slake_root, tmp_path):
    ds = open_dataset("slake", slake_root, split="test")
    assert [i.id for i in ds.items] == ["slake:11934", "slake:11935", "slake:11937", "slake:11938"]
    run = evaluate(
        tiny_models["detection"], ds, tmp_path / "s", EvalOptions(max_new_tokens=3, progress=False)
    )
    assert run.n == 4 and not run.failures
    assert run.summary["metrics"]["open"]["f1"]["n"] == 2
    assert run.summary["metrics"]["closed"]["f1"]["n"] == 2
    # The training-time soft-caps by default; the reference's sdpa evaluation under compat.
    gen = run.summary["generation"]
    assert (gen["final_logit_softcap"], gen["attention_softcap"]) == (False, True)
    compat = open_dataset("slake", slake_root, split="test", compat="reference")
    assert compat.file_split == "validate" and len(compat) == 2
    ref = evaluate(
        tiny_models["detection"],
        compat,
        tmp_path / "r",
        EvalOptions(max_new_tokens=3, progress=False, compat="reference"),
    )
    gen = ref.summary["generation"]
    assert (gen["final_logit_softcap"], gen["attention_softcap"]) == (False, False)
    assert gen["mask_threshold"] == "logit"


def test_official_vqa_rad_split_and_failures_keep_going(
    tiny_models, vqa_rad_root, tmp_path, capsys
):
    root = tmp_path / "official"
    root.mkdir()
    entries = json.loads((vqa_rad_root / "VQA_RAD Dataset Public.json").read_text())
    entries.append(dict(entries[0], qid=4, image_name="missing.jpg"))
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(entries))
    args = _eval(tiny_models["detection"], "vqa-rad-official", root, tmp_path / "o")
    code, cap = run_cli(
        [*args, "--images", str(vqa_rad_root / "images"), "--max-new-tokens", "2"], capsys
    )
    assert code == 3
    assert "vqa-rad-official:4" in cap.err and "missing.jpg" in cap.err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["dataset"]["n"] == 2 and summary["dataset"]["n_failed"] == 1
    assert summary["failures"][0]["id"] == "vqa-rad-official:4"
    assert summary["metrics"]["open"]["f1"]["n"] == 1  # "OPEN " with a stray space


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_built_dataset_grounding_metrics(tiny_models, built_eval_dataset, tmp_path, variant):
    ds = open_dataset("built", built_eval_dataset, split="test", variant=variant)
    tasks = {ds.example(i).task for i in ds.items}
    assert "grounded-report" in tasks
    run = evaluate(
        tiny_models[variant],
        ds,
        tmp_path / variant,
        EvalOptions(max_new_tokens=6, batch_size=16, limit=24, n_examples=2, progress=False),
    )
    metrics = run.summary["metrics"]["all"]
    for name in ("grounding_iou_detect_legacy", "grounding_iou_segment_legacy", "f1", "cider"):
        assert name in metrics, name
    rows = pq.read_table(tmp_path / variant / "samples.parquet").to_pylist()
    grounded = [r for r in rows if r["task"] == "grounded-report"]
    assert grounded and all(json.loads(r["ref_spans"]) for r in grounded)
    index = json.loads((tmp_path / variant / "examples" / "index.json").read_text())
    assert len(index) == 2 and (tmp_path / variant / index[0]["file"]).is_file()
    assert "data:image/png;base64," in (tmp_path / variant / "report.html").read_text()
    if variant == "detection":
        assert run.summary["map50"] is not None


def test_resume_after_a_crash_reproduces_the_uninterrupted_run(
    tiny_models, slake_root, tmp_path, monkeypatch
):
    ds = open_dataset("slake", slake_root, split="test")
    opts = EvalOptions(max_new_tokens=4, batch_size=1, progress=False, n_resamples=200)
    full = evaluate(tiny_models["detection"], ds, tmp_path / "full", opts)
    import radgrounder.inference as inference

    real = inference.generate_examples
    calls = {"n": 0}

    def crash_after_two(loaded, examples, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(loaded, examples, **kw)

    monkeypatch.setattr(inference, "generate_examples", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tiny_models["detection"], ds, tmp_path / "cut", opts)
    with (tmp_path / "cut" / "generations.jsonl").open("a") as fh:
        fh.write('{"id": "slake:119')  # a line cut short
    calls["n"] = -100
    monkeypatch.setattr(inference, "generate_examples", crash_after_two)
    resumed = evaluate(tiny_models["detection"], ds, tmp_path / "cut", opts)
    assert calls["n"] == -100 + 2  # only the two missing samples were generated
    cols = ["id", "raw_prediction", "f1", "cider", "bleu4", "rouge_l"]
    a = pq.read_table(tmp_path / "full" / "samples.parquet").select(cols).to_pylist()
    b = pq.read_table(tmp_path / "cut" / "samples.parquet").select(cols).to_pylist()
    assert a == b
    assert full.summary["metrics"] == resumed.summary["metrics"]


def test_a_different_run_in_the_same_folder_is_refused(tiny_models, slake_root, tmp_path):
    opts = EvalOptions(max_new_tokens=2, progress=False, n_resamples=100)
    evaluate(tiny_models["detection"], open_dataset("slake", slake_root), tmp_path, opts)
    other = EvalOptions(max_new_tokens=5, progress=False, n_resamples=100)
    with pytest.raises(RadGrounderError, match="different evaluation"):
        evaluate(tiny_models["detection"], open_dataset("slake", slake_root), tmp_path, other)


def test_paired_bootstrap_hand_cases():
    same = paired_bootstrap(np.array([0.1, 0.5, 0.9]), np.array([0.1, 0.5, 0.9]))
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "p_value": 1.0, "n": 3}
    better = paired_bootstrap(np.ones(50), np.zeros(50))
    assert better["diff"] == 1.0 and better["p_value"] == 0.0 and better["low"] == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.random(200), rng.random(200)
    r = paired_bootstrap(a, b, n_resamples=4000)
    assert r["low"] < r["diff"] < r["high"] and 0.0 < r["p_value"] <= 1.0
    with pytest.raises(RadGrounderError):
        paired_bootstrap(np.array([]), np.array([]))


def test_compare_two_runs(tiny_models, slake_root, tmp_path, capsys):
    from radgrounder.modeling import init_model

    other = init_model("tiny", "detection", tmp_path / "other", seed=1)
    ds = open_dataset("slake", slake_root)
    opts = EvalOptions(max_new_tokens=3, progress=False, n_resamples=500)
    evaluate(tiny_models["detection"], ds, tmp_path / "a", opts)
    evaluate(other, ds, tmp_path / "b", opts)
    result = compare_runs(tmp_path / "a", tmp_path / "a")
    assert all(v["diff"] == 0 and v["p_value"] == 1 for v in result["metrics"]["all"].values())
    code, cap = run_cli(
        ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.json")],
        capsys,
    )
    assert code == 0, cap.err
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["n_shared"] == 4 and "f1" in data["metrics"]["all"]
    f1 = data["metrics"]["all"]["f1"]
    assert f1["diff"] == pytest.approx(f1["a"] - f1["b"])
    assert "A-B" in cap.out


def test_compare_refuses_runs_on_different_data(tiny_models, slake_root, vqa_rad_root, tmp_path):
    opts = EvalOptions(max_new_tokens=2, progress=False, n_resamples=100, limit=3)
    evaluate(tiny_models["detection"], open_dataset("slake", slake_root), tmp_path / "a", opts)
    evaluate(tiny_models["detection"], open_dataset("vqa-rad", vqa_rad_root), tmp_path / "b", opts)
    with pytest.raises(RadGrounderError, match="different data"):
        compare_runs(tmp_path / "a", tmp_path / "b")
    with pytest.raises(RadGrounderError, match=r"no summary\.json"):
        compare_runs(tmp_path / "a", tmp_path)


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_a_perfect_prediction_scores_one(built_eval_dataset, variant):
    """Feed each grounded sample's own target (and masks) back as the generation."""
    from radgrounder.evaluation.generation_pass import sample_record
    from radgrounder.modeling.generation import Generated

    ds = open_dataset("built", built_eval_dataset, variant=variant, tasks=["grounded-report"])
    opts = EvalOptions()
    checked = 0
    for item in ds.items[:12]:
        ex = ds.example(item)
        if "<seg" not in ex.target:
            continue
        gen = Generated(ex.target, [1, 2], masks=list(ex.masks))
        rec, pred, ref = sample_record(item, ex, gen, variant, opts, "exact")
        g = rec["grounding"]
        assert g["grounding_iou"] == pytest.approx(1.0)
        assert g["grounding_iou_detect_legacy"] == pytest.approx(1.0)
        assert g["grounding_iou_segment_legacy"] == pytest.approx(1.0)
        key = "box_iou" if variant == "detection" else "mask_iou"
        assert g[key] == pytest.approx(1.0)
        assert rec["pred_spans"] == rec["ref_spans"] and len(pred.spans) == len(ref.spans)
        assert all(c["iou"] == pytest.approx(1.0) for c in rec["class_ious"])
        checked += 1
    assert checked >= 3


def test_oracle_run_scores_one_everywhere(tiny_models, built_eval_dataset, tmp_path, monkeypatch):
    import radgrounder.inference as inference
    from radgrounder.modeling.generation import Generated

    def oracle(loaded, examples, **kw):
        return [Generated(ex.target, [1], masks=list(ex.masks)) for ex in examples]

    monkeypatch.setattr(inference, "generate_examples", oracle)
    ds = open_dataset("built", built_eval_dataset, variant="detection")
    run = evaluate(
        tiny_models["detection"], ds, tmp_path, EvalOptions(progress=False, n_resamples=200)
    )
    m = run.summary["metrics"]["all"]
    for name in ("f1", "accuracy", "recall", "grounding_iou", "box_iou"):
        assert m[name]["mean"] == pytest.approx(1.0) and m[name]["low"] == pytest.approx(1.0)
    assert run.summary["map50"]["map50"] == pytest.approx(1.0)
    assert run.n == len(ds)


def test_eval_with_an_llm_judge_counts_failures_and_resumes(tiny_models, slake_root, tmp_path):
    from radgrounder.evaluation.judge import LLMJudge
    from tests.evaluation.fake_judge_server import FakeJudgeServer, Fault

    ds = open_dataset("slake", slake_root)
    out = tmp_path / "judged"
    with FakeJudgeServer() as server:
        settings = {"backoff": 0.001, "max_backoff": 0.01, "max_retries": 1, "concurrency": 1}
        judge = LLMJudge(server.url, "fake", max_reply_retries=1, **settings)
        opts = EvalOptions(max_new_tokens=3, progress=False, n_resamples=200, judge=judge)
        server.fail(Fault("content", text="**5**"), times=2)  # one sample: twice garbage
        server.fail(Fault("status", status=503), times=None)  # then the server is down
        first = evaluate(tiny_models["detection"], ds, out, opts)
        j = first.summary["judge"]
        assert (j["ok"], j["unparseable"], j["error"], j["model"]) == (0, 1, 3, "fake")
        assert "llm_score" not in first.summary["metrics"].get("all", {})
        rows = pq.read_table(out / "samples.parquet").to_pylist()
        assert sorted(r["llm_judge_status"] for r in rows) == ["error"] * 3 + ["unparseable"]
        assert all(np.isnan(r["llm_score"]) for r in rows)  # never scored 0

        server._scripts.clear()  # the server is back: the failed items are asked again
        before = server.count()
        second = evaluate(tiny_models["detection"], ds, out, opts)
        assert server.count() - before == 4
        j = second.summary["judge"]
        assert (j["ok"], j["unparseable"], j["error"]) == (4, 0, 0)
        assert second.summary["metrics"]["all"]["llm_score"]["n"] == 4
        assert second.summary["metrics"]["all"]["llm_score"]["mean"] == 1.0  # answers differ
        # Resume asks nothing again of the same judge model ...
        before = server.count()
        evaluate(tiny_models["detection"], ds, out, opts)
        assert server.count() == before
        # ... but another judge model's scores are its own: every item is judged again, and
        # the summary names the model that gave the scores.
        other = LLMJudge(server.url, "other-judge", **settings)
        third = evaluate(tiny_models["detection"], ds, out, replace(opts, judge=other))
        assert server.count() - before == 4
        assert third.summary["judge"]["model"] == "other-judge"
        assert {r.body["model"] for r in server.requests[-4:]} == {"other-judge"}


def test_refrad2d_folder(tiny_models, built_eval_dataset, tmp_path):
    from radgrounder.labels.export_refrad2d import export_refrad2d

    export_refrad2d(built_eval_dataset, tmp_path / "refrad2d")
    ds = open_dataset("refrad2d", tmp_path / "refrad2d", split="test", languages=["de"])
    assert len(ds) > 0 and all(i.id.endswith("/de") for i in ds.items)
    run = evaluate(
        tiny_models["detection"],
        ds,
        tmp_path / "run",
        EvalOptions(max_new_tokens=3, limit=6, progress=False, n_resamples=200),
    )
    assert run.n == 6 and not run.failures
    rows = pq.read_table(tmp_path / "run" / "samples.parquet").to_pylist()
    assert {r["language"] for r in rows} == {"de"}
    assert any(r["task"] == "grounded-report" and "<p bbox=" in r["raw_reference"] for r in rows)


def test_mean_box_baseline(built_eval_dataset, tmp_path):
    from radgrounder.evaluation.baseline import MeanBoxBaseline
    from radgrounder.grounding import codec

    base = MeanBoxBaseline(built_eval_dataset, split="test")
    ds = open_dataset("built", built_eval_dataset, tasks=["grounded-report"], languages=["en"])
    ex = next(ds.example(i) for i in ds.items if "<p bbox" in ds.example(i).target)
    ref, got = (
        codec("radgrounder-detect").decode(ex.target),
        codec("radgrounder-detect").decode(base.answer(ex.target)),
    )
    assert got.text == ref.text and [s.label for s in got.spans] == [s.label for s in ref.spans]
    for s in got.spans:  # the mean box, quantised onto the 512 bins of the grammar
        (box,) = s.boxes
        mean = base.mean_boxes[s.class_id].as_tuple()
        assert np.allclose(box.as_tuple(), mean, atol=1 / 512)
    run = evaluate(base, ds, tmp_path, EvalOptions(progress=False, n_resamples=200, limit=10))
    m = run.summary["metrics"]["all"]
    assert m["f1"]["mean"] == pytest.approx(1.0)
    assert 0.0 < m["box_iou"]["mean"] < 1.0
    assert run.summary["model"]["variant"] == "detection"


def test_eval_cli_reports_judge_failures_and_exits_3(tiny_models, slake_root, tmp_path, capsys):
    from tests.evaluation.fake_judge_server import FakeJudgeServer, Fault

    with FakeJudgeServer() as server:
        server.slots = 2  # llama.cpp's /props: the judge sends 2 at a time
        server.fail(Fault("status", status=503), times=None)
        args = [*_eval(tiny_models["detection"], "slake", slake_root, tmp_path / "j"),
                "--max-new-tokens", "2", "--judge-url", server.url, "--judge-model", "jm",
                "--judge-response-format", "none", "--quiet"]  # fmt: skip
        code, cap = run_cli(args, capsys)
        assert code == 3
        assert "judge jm: ok 0, unparseable 0, error 4 of 4 (concurrency 2, server)" in cap.out
        assert "4 judge item(s) failed" in cap.err
        assert all("response_format" not in r.body for r in server.requests)
        server.reset()
        code, cap = run_cli(args, capsys)  # the server is back: the failed items are redone
        assert code == 0, cap.err
        assert "judge jm: ok 4, unparseable 0, error 0 of 4" in cap.out

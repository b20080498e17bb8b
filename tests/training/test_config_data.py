import numpy as np
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.modeling import build_tokenizer
from radgrounder.prompts import IGNORE_INDEX, TASK_PROMPTS
from radgrounder.training.collate import make_batch
from radgrounder.training.config import SourceConfig, load_config
from radgrounder.training.data import BuiltSource, Mixture
from tests.conftest import REPO


def test_tiny_cpu_config_and_dotted_overrides():
    cfg = load_config(
        REPO / "configs/tiny-cpu.yaml",
        [
            "max_steps=7",
            "model.variant=segmentation",
            "data.sources.0.weight=2.5",
            "optim.lr=1e-3",
            "output_dir=/tmp/x",
        ],
    )
    assert cfg.max_steps == 7 and cfg.model.variant == "segmentation"
    assert cfg.data.sources[0].weight == 2.5 and cfg.optim.lr == 1e-3
    assert cfg.output_dir == "/tmp/x"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["optim.lrate=1"], "optim.lrate"),
        (["model.variant=caption"], "model.variant"),
        (["precision=fp8"], "precision"),
        (["max_steps"], "key=value"),
        (["data.sources.0.kind=coco"], "kind"),
    ],
)
def test_bad_settings_name_the_field(overrides, field):
    with pytest.raises(RadGrounderError, match=field):
        load_config(REPO / "configs/tiny-cpu.yaml", overrides)


def test_every_shipped_config_parses():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)


class _Sized:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def test_mixture_temperature_and_determinism():
    sources = [_Sized(900), _Sized(100)]
    flat = Mixture(sources, [1, 1], 1.0, seed=0)
    assert np.allclose(flat.probs, [0.9, 0.1])
    hot = Mixture(sources, [1, 1], 1e9, seed=0)
    assert np.allclose(hot.probs, [0.5, 0.5], atol=1e-6)
    weighted = Mixture(sources, [1, 9], 1.0, seed=0)
    assert np.allclose(weighted.probs, [0.5, 0.5])
    again = Mixture(sources, [1, 1], 1.0, seed=0)
    assert [flat.draw(5, j)[:2] for j in range(20)] == [again.draw(5, j)[:2] for j in range(20)]
    assert [flat.draw(5, j)[:2] for j in range(20)] != [flat.draw(6, j)[:2] for j in range(20)]
    counts = np.bincount([flat.draw(s, 0)[0] for s in range(4000)], minlength=2)
    assert 0.87 < counts[0] / 4000 < 0.93


@pytest.fixture(scope="module")
def built_dataset(tmp_path_factory):
    from radgrounder.labels.build import BuildOptions, build_dataset
    from tests.labels.test_build import REPORTS, small_layout

    root = tmp_path_factory.mktemp("ds")
    scans, labels = small_layout(root, ids=("ct_upper_abdomen",))
    build_dataset(
        scans, labels, REPORTS, root / "out", BuildOptions(splits=(1, 0, 0)), progress=False
    )
    return root / "out"


def test_segmentation_batch_pairs_masks_with_seg_tokens(built_dataset):
    tok = build_tokenizer("segmentation")
    src = BuiltSource(
        SourceConfig(path=str(built_dataset), tasks=["grounded-report"]),
        "segmentation",
        preset="reference",
        size=224,
    )
    rng = np.random.default_rng(0)
    examples = [src.example(i, rng, "both") for i in range(4)]
    for ex in examples:
        assert ex.prompt.endswith(TASK_PROMPTS[("grounded-report-segment", ex.language)] + " ")
    seg_id = tok.convert_tokens_to_ids("</seg>")
    batch = make_batch(examples, tok, n_image_tokens=256, seg_token_id=seg_id)
    n_masks = sum(len(ex.masks) for ex in examples)
    assert n_masks > 0 and batch["seg_token_pos"].shape == (n_masks, 2)
    rows, cols = batch["seg_token_pos"].T
    assert (batch["input_ids"][rows, cols] == seg_id).all()
    assert (batch["token_type_ids"][rows, cols] == 1).all()
    assert batch["segment_gt"].shape == (n_masks, 224, 224)
    first = examples[0]
    assert np.array_equal(batch["segment_gt"][0].numpy() > 0, first.masks[0])
    labels = batch["labels"]
    assert ((labels != IGNORE_INDEX) == (batch["token_type_ids"] == 1)).all()
    assert batch["pixel_values"].shape == (4, 3, 224, 224)


def test_detection_targets_and_plain_reports(built_dataset):
    src = BuiltSource(
        SourceConfig(path=str(built_dataset), tasks=["grounded-report", "report"]),
        "detection",
        preset="reference",
        size=224,
    )
    rng = np.random.default_rng(1)
    kinds = {}
    for i in range(len(src)):
        ex = src.example(i, rng, "none")
        kinds.setdefault(ex.task, ex)
    assert "<p bbox=" in kinds["grounded-report"].target
    assert "<" not in kinds["report"].target
    report = kinds["report"]
    assert report.prompt.endswith("\n\n" + TASK_PROMPTS[("report", report.language)] + " ")


@pytest.mark.parametrize("variant", ["detection", "segmentation"])
def test_refrad2d_folder_source_reads_the_reference_layout(built_dataset, tmp_path, variant):
    from radgrounder.grounding import codec
    from radgrounder.labels.export_refrad2d import export_refrad2d
    from radgrounder.training.data import make_source

    export_refrad2d(built_dataset, tmp_path / "refrad2d")
    src = make_source(
        SourceConfig(kind="refrad2d", path=str(tmp_path / "refrad2d")),
        variant,
        preset="reference",
        size=224,
    )
    rng = np.random.default_rng(0)
    grounded = [
        ex
        for ex in (src.example(i, rng, "both") for i in range(len(src)))
        if ex.task == "grounded-report"
    ]
    assert grounded
    for ex in grounded[:10]:
        assert ex.image.shape == (3, 224, 224)
        if variant == "detection":
            decoded = codec("radgrounder-detect").decode(ex.target)
            assert decoded.spans and decoded.problems == []
        else:
            assert ex.target.count("</seg>") == len(ex.masks) > 0
            assert all(m.shape == (224, 224) and m.any() for m in ex.masks)

"""Small SLAKE-, VQA-RAD- and built-dataset fixtures and tiny models for the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radgrounder.resources import load_json
from tests.helpers import single_torch_thread


def _jpeg(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = (rng.random((48, 40)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from radgrounder.modeling import init_model

    root = tmp_path_factory.mktemp("eval-models")
    return {v: init_model("tiny", v, root / v, seed=0) for v in ("detection", "segmentation")}


SLAKE_TEST = [
    # (qid, img, question, answer, answer_type, lang)
    (11934, "xmlab1/source.jpg", "Which organ is abnormal?", "Liver", "OPEN", "en"),
    (11935, "xmlab1/source.jpg", "Is the lung healthy?", "Yes", "CLOSED", "en"),
    (11936, "xmlab1/source.jpg", "哪个器官异常?", "肝脏", "OPEN", "zh"),
    (11937, "xmlab2/source.jpg", "What modality is used?", "CT", "OPEN", "en"),
    (11938, "xmlab2/source.jpg", "Does the picture contain the kidney?", "No", "CLOSED", "en"),
]


@pytest.fixture(scope="session")
def slake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SLAKE 1.0 layout: split JSON files and ``imgs/<folder>/source.jpg``."""
    root = tmp_path_factory.mktemp("slake")
    for n, folder in enumerate(("xmlab1", "xmlab2")):
        _jpeg(root / "imgs" / folder / "source.jpg", n)

    def entries(rows):
        return [
            {"qid": q, "img_name": img, "question": qu, "answer": a, "answer_type": t,
             "q_lang": lang, "img_id": 1, "content_type": "Organ", "base_type": "vqa"}
            for q, img, qu, a, t, lang in rows
        ]  # fmt: skip

    (root / "test.json").write_text(json.dumps(entries(SLAKE_TEST), ensure_ascii=False))
    (root / "validate.json").write_text(json.dumps(entries(SLAKE_TEST[:2])))
    (root / "train.json").write_text(json.dumps(entries(SLAKE_TEST[3:])))
    return root


@pytest.fixture(scope="session")
def vqa_rad_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VQA-RAD image folder with every image the shipped test split names, plus the
    official public JSON with two test and one train question."""
    root = tmp_path_factory.mktemp("vqa-rad")
    names = sorted({r["image_name"] for r in load_json("vqa_rad/test_fixed_split.json")})
    for n, name in enumerate(names):
        _jpeg(root / "images" / name, n)
    official = [
        {"qid": 1, "image_name": names[0], "question": "Is this a CT?", "answer": "Yes",
         "answer_type": "CLOSED", "phrase_type": "test_freeform"},
        {"qid": 2, "image_name": names[1], "question": "Where is the mass?", "answer": "Left lung",
         "answer_type": "OPEN ", "phrase_type": "test_para"},
        {"qid": 3, "image_name": names[2], "question": "Is there fluid?", "answer": "no",
         "answer_type": "CLOSED", "phrase_type": "freeform"},
    ]  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(official))
    return root


@pytest.fixture(scope="session")
def built_eval_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset built from one bundled CT scan, all of it in the test split."""
    from radgrounder.labels.build import BuildOptions, build_dataset
    from tests.labels.test_build import REPORTS, small_layout

    root = tmp_path_factory.mktemp("built")
    scans, labels = small_layout(root, ids=("ct_upper_abdomen",))
    build_dataset(
        scans, labels, REPORTS, root / "out", BuildOptions(splits=(0, 0, 1)), progress=False
    )
    return root / "out"


_one_torch_thread = pytest.fixture(autouse=True, scope="package")(single_torch_thread)

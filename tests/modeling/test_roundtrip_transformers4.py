"""Checkpoints travel between radgrounder (transformers 5.x) and a real transformers 4.54, the
version the released RadGrounder checkpoints were trained and shared with (spec §3.6).

The 4.54 side runs in its own virtualenv (``.cache/tf4-venv``, built on first use with pip and
reused while its requirement list is unchanged; ``RADGROUNDER_TF4_PYTHON`` points at another
interpreter instead) through ``tf4_reference.py``, which imports nothing from radgrounder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

from radgrounder.modeling import init_model, load_model
from radgrounder.modeling.checkpoint import read_state_dict
from radgrounder.prompts import build_prompt
from tests.modeling.helpers import reference_keys

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("tf4_reference.py")
VENV = ROOT / ".cache" / "tf4-venv"
TF4_REQUIREMENTS = (
    "torch==2.13.0",
    "transformers==4.54.1",
    "tokenizers==0.21.4",
    "safetensors",
    "sentencepiece",
    "pillow",
    "numpy",
)
ATOL = 1e-4  # float32 logits
PROMPTS = [
    build_prompt("grounded-report-detect", "en", clinical_info="Suspected metastases."),
    build_prompt("vqa", "de", question="Welches Organ ist vergrößert?"),
    "The <p bbox=<loc0100><loc0200><loc0300><loc0512> id=<seg005>>liver</p> is normal.<eos>",
    "Multiple hypodense lesions in the <seg>liver</seg>, largest 2. 2 cm.",
]


def _build_venv() -> Path:
    wanted = "\n".join(TF4_REQUIREMENTS) + "\n"
    python = VENV / "bin" / "python"
    stamp = VENV / "radgrounder-requirements.txt"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the final place and renamed in, so an interrupted install is never reused.
    tmp = VENV.with_name(f"{VENV.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # A plain venv: --system-site-packages would let it see the project's transformers 5.x.
    steps = [
        [sys.executable, "-m", "venv", str(tmp)],
        [str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet", *TF4_REQUIREMENTS],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            shutil.rmtree(tmp, ignore_errors=True)
            pytest.skip(f"cannot build the transformers 4.54 venv: {done.stderr[-2000:]}")
    (tmp / "radgrounder-requirements.txt").write_text(wanted)
    shutil.rmtree(VENV, ignore_errors=True)
    tmp.rename(VENV)
    return python


@pytest.fixture(scope="session")
def tf4_python() -> Path:
    override = os.environ.get("RADGROUNDER_TF4_PYTHON")
    start = time.perf_counter()
    python = Path(override) if override else _build_venv()
    version = subprocess.run(
        [str(python), "-c", "import transformers; print(transformers.__version__)"],
        capture_output=True,
        text=True,
        env=_env(),
    )
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip().startswith("4.5"), version.stdout
    took = time.perf_counter() - start
    print(f"\ntransformers {version.stdout.strip()} venv ready in {took:.1f}s")
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def _run_tf4(python: Path, command: str, folder: Path, inputs: Path, out: Path) -> dict:
    done = subprocess.run(
        [str(python), str(SCRIPT), command, str(folder), str(inputs), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
        cwd=out.parent,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def _inputs(tokenizer, path: Path, *, seg_token: str | None = None) -> dict[str, torch.Tensor]:
    """Two left-padded rows in the reference layout (spec §1.2) with random images."""
    image = tokenizer.convert_tokens_to_ids("<image>")
    texts = ["\nCaption this image and detect keywords: \n", "\nWhat is shown?\nAnswer: \n"]
    if seg_token:
        texts[1] += "The <seg>liver</seg>"
    rows = [[image] * 256 + [tokenizer.bos_token_id] + tokenizer(t)["input_ids"] for t in texts]
    length = max(map(len, rows))
    ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.rand(2, 3, 224, 224, generator=gen) * 2 - 1,
    }
    if seg_token:
        where = (ids == tokenizer.convert_tokens_to_ids(seg_token)).nonzero()
        tensors["seg_token_pos"] = where
    save_file(tensors, str(path), metadata={"prompts": json.dumps(PROMPTS)})
    return tensors


def _ours(model, tensors: dict[str, torch.Tensor]):
    # token_type_ids 0 on the prompt, as radgrounder.generate passes them: transformers 5.x
    # attends causally over a prompt without them, 4.54 always bidirectionally at inference.
    with torch.no_grad():
        return model(**tensors, token_type_ids=torch.zeros_like(tensors["input_ids"]))


def _max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return (a - b).abs()[mask.bool()].max().item()


def _capped(logits_4x: torch.Tensor, model) -> torch.Tensor:
    """4.54's PaliGemma never applies Gemma-2's final-logit soft-cap; 5.x does when the config
    sets it (radgrounder.modeling.softcap decides that), so the 4.54 logits are capped alike."""
    cap = model.config.get_text_config().final_logit_softcapping
    return logits_4x if cap is None else torch.tanh(logits_4x / cap) * cap


def test_transformers4_loads_our_detection_checkpoint(tf4_python, tmp_path):
    folder = init_model("tiny", "detection", tmp_path / "det", seed=0)
    loaded = load_model(folder)
    tensors = _inputs(loaded.tokenizer, tmp_path / "inputs.safetensors")
    report = _run_tf4(tf4_python, "load", folder, tmp_path / "inputs.safetensors", tmp_path / "o")
    assert report["transformers"] == "4.54.1"

    theirs = load_file(str(tmp_path / "o" / "logits.safetensors"))["logits"]
    theirs = _capped(theirs, loaded.model)
    diff = _max_diff(theirs, _ours(loaded.model, tensors).logits, tensors["attention_mask"])
    print(f"\ndetection logits, radgrounder vs transformers 4.54: max |diff| = {diff:.3g}")
    assert diff < ATOL

    tok, ours_tok = report["tokenizer"], loaded.tokenizer
    assert tok["class"] == "GemmaTokenizerFast" and tok["len"] == len(ours_tok)
    assert tok["special"] == {t: ours_tok.convert_tokens_to_ids(t) for t in tok["special"]}
    assert tok["special"]["<mask>"] == 4
    assert tok["ids"] == [ours_tok(p)["input_ids"] for p in PROMPTS]
    assert tok["decoded"] == [
        ours_tok.decode(ours_tok(p)["input_ids"], skip_special_tokens=False) for p in PROMPTS
    ]
    assert tok["padding_side"] == "left"
    assert report["auto_dtype"] == "torch.float32"

    proc = report["processor"]
    assert proc["class"] == proc["same_as_direct"] == "PaliGemmaProcessor"
    assert (proc["image_processor"], proc["tokenizer"]) == (
        "SiglipImageProcessor",
        "GemmaTokenizerFast",
    )
    assert proc["image_seq_length"] == 256
    # 4.54's processor output equals transformers 5.x's processor on the same folder.
    theirs = load_file(str(tmp_path / "o" / "processor.safetensors"))
    image = Image.open(tmp_path / "o" / "image.png")
    ours = AutoProcessor.from_pretrained(folder)(
        text="Caption this image:", images=image, return_tensors="pt"
    )
    expected = [ours_tok.convert_tokens_to_ids("<image>")] * 256 + [ours_tok.bos_token_id]
    expected += ours_tok("Caption this image:\n")["input_ids"]
    assert theirs["input_ids"][0].tolist() == ours["input_ids"][0].tolist() == expected
    pixels = (theirs["pixel_values"] - ours["pixel_values"]).abs().max().item()
    print(f"processor pixel_values, 5.x vs 4.54: max |diff| = {pixels:.3g}")
    assert pixels < 1e-5


def test_transformers4_save_pretrained_loads_in_load_model(tf4_python, tmp_path):
    folder = init_model("tiny", "detection", tmp_path / "det", seed=0)
    loaded = load_model(folder)
    tensors = _inputs(loaded.tokenizer, tmp_path / "inputs.safetensors")
    _run_tf4(tf4_python, "save", folder, tmp_path / "inputs.safetensors", tmp_path / "o")
    theirs = load_file(str(tmp_path / "o" / "logits.safetensors"))["logits"]
    for kind in ("safetensors", "bin"):
        saved = tmp_path / "o" / kind
        assert "radgrounder" not in json.loads((saved / "config.json").read_text())
        assert set(read_state_dict(saved)) >= reference_keys(loaded.config, "detection")
        model, tokenizer = load_model(saved)
        assert len(tokenizer) == len(loaded.tokenizer)
        expected = _capped(theirs, model)
        diff = _max_diff(expected, _ours(model, tensors).logits, tensors["attention_mask"])
        print(f"\n4.54 save_pretrained ({kind}) -> load_model logits: max |diff| = {diff:.3g}")
        assert diff < ATOL
    bf16 = load_model(tmp_path / "o" / "safetensors", dtype="bfloat16").model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


def test_reference_segmentation_class_loads_our_checkpoint(tf4_python, tmp_path):
    folder = init_model("tiny", "segmentation", tmp_path / "seg", seed=0)
    loaded = load_model(folder)
    inputs = tmp_path / "inputs.safetensors"
    tensors = _inputs(loaded.tokenizer, inputs, seg_token="</seg>")
    assert len(tensors["seg_token_pos"]) == 1
    report = _run_tf4(tf4_python, "segment", folder, inputs, tmp_path / "o")
    assert report["tied"]

    theirs = load_file(str(tmp_path / "o" / "logits.safetensors"))
    out = _ours(loaded.model, tensors)
    diff = _max_diff(_capped(theirs["logits"], loaded.model), out.logits, tensors["attention_mask"])
    masks = (theirs["mask_logits"] - out.mask_logits).abs().max().item()
    print(f"\nsegmentation vs the spec-built 4.54 class: logits {diff:.3g}, masks {masks:.3g}")
    assert diff < ATOL and masks < ATOL

    # ... and what that class's save_pretrained writes loads strictly in load_model.
    saved = tmp_path / "o" / "saved"
    assert set(read_state_dict(saved)) == reference_keys(loaded.config, "segmentation")
    again = load_model(saved)
    assert again.variant == "segmentation"
    for key, value in loaded.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value, rtol=0, atol=0, msg=key)

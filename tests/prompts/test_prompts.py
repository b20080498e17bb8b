import random

import numpy as np
import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.modeling import build_tokenizer
from radgrounder.prompts import (
    IGNORE_INDEX,
    build_prefix,
    build_prompt,
    clean_punctuation,
    collate_examples,
    encode_example,
    expand_prompt,
)

SLAKE_Q = "What modality is used to take this image?"


def test_appendix_a_slake_prompt():
    assert build_prompt("vqa", "en", question=SLAKE_Q) == f"<image>\n{SLAKE_Q}\nAnswer: "


def test_appendix_a_slake_tokenizer_a_string():
    prompt = build_prompt("vqa", "en", question=SLAKE_Q)
    assert expand_prompt(prompt) == "<image>" * 256 + "<bos>" + f"\n{SLAKE_Q}\nAnswer: \n"


def test_appendix_a_grounded_report_prompts():
    kwargs = dict(clinical_info="Suspected metastases.", clinical_question="Staging.")
    assert build_prompt("grounded-report-detect", "en", **kwargs) == (
        "<image>\nClinical information: Suspected metastases.\nQuestion: Staging.\n"
        "Caption this image and detect keywords: "
    )
    assert build_prompt("grounded-report-segment", "en", **kwargs).endswith(
        "\nCaption this image and segment keywords: "
    )


def test_appendix_a_decimal_split():
    text = clean_punctuation("Multiple hypodense lesions in the liver , largest 2.2 cm")
    assert text == "Multiple hypodense lesions in the liver, largest 2. 2 cm."


@pytest.mark.parametrize(
    ("task", "language", "expected"),
    [
        ("report", "en", "<image>\n\nCaption this image: "),
        ("report", "de", "<image>\n\nBeschreibe dieses Bild: "),
        (
            "grounded-report-detect",
            "de",
            "<image>\n\nBeschreibe dieses Bild und detektiere Schlüsselwörter: ",
        ),
        (
            "grounded-report-segment",
            "de",
            "<image>\n\nBeschreibe dieses Bild und segmentiere die Schlüsselwörter: ",
        ),
    ],
)
def test_empty_prefix_leaves_an_empty_line(task, language, expected):
    assert build_prompt(task, language, prefix_style="none") == expected


def test_prefix_styles_both_languages():
    assert build_prefix("de", clinical_info="Z.n. OP", clinical_question="Metastasen?") == (
        "Klinische angaben: Z. n. OP.\nFragestellung: Metastasen?"
    )
    # identical fields, including both empty, give only the first label
    assert build_prefix("en") == "Clinical information:"
    assert build_prefix("de") == "Klinische angaben:"
    assert build_prefix("en", clinical_info="Pain.", clinical_question="Pain.") == (
        "Clinical information: Pain."
    )
    # an empty field keeps its label and the space after it inside the block
    assert build_prefix("en", clinical_question="Staging") == (
        "Clinical information: \nQuestion: Staging."
    )
    assert build_prefix("en", clinical_info="Pain") == "Clinical information: Pain.\nQuestion:"
    assert build_prefix("en", clinical_info="Pain", prefix_style="clinical_info") == (
        "Clinical information: Pain."
    )
    assert build_prefix("de", clinical_question="x", prefix_style="fragestellung") == (
        "Fragestellung: x."
    )
    assert build_prefix("en", clinical_question="", prefix_style="clinical_question") == ""
    assert build_prefix("en", clinical_info="x", prefix_style="none") == ""


def test_random_prefix_style_draws_all_four_evenly():
    rng = random.Random(0)
    seen = [
        build_prefix("en", clinical_info="A", clinical_question="B", prefix_style="random", rng=rng)
        for _ in range(4000)
    ]
    counts = {s: seen.count(s) for s in set(seen)}
    assert set(counts) == {
        "",
        "Clinical information: A.",
        "Question: B.",
        "Clinical information: A.\nQuestion: B.",
    }
    assert all(800 < c < 1200 for c in counts.values())
    # a numpy generator works too
    out = build_prefix("en", clinical_info="A", prefix_style="random", rng=np.random.default_rng(1))
    assert out in {"", "Clinical information: A.", "Clinical information: A.\nQuestion:"}


def test_vqa_german_and_multiple_choice():
    assert (
        build_prompt("vqa", "de", question="Welches Organ?") == "<image>\nWelches Organ?\nAntwort: "
    )
    assert build_prompt("vqa", "en", question="Which?", choices=["A: liver", "B: spleen"]) == (
        "<image>\nWhich?\nA: liver\nB: spleen\nAnswer: "
    )
    assert build_prompt("grounded-vqa", "en", question="Is the liver visible?") == (
        "<image>\nIs the liver visible? "
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(task="caption"), "task"),
        (dict(task="report", language="fr"), "language"),
        (dict(task="vqa"), "question"),
        (dict(task="report", question="x"), "question"),
        (dict(task="report", prefix_style="fancy"), "prefix_style"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(RadGrounderError, match=field):
        build_prompt(**kwargs)


def test_clean_punctuation_steps():
    assert clean_punctuation("") == ""
    assert clean_punctuation("  Leber o.B ") == "Leber o. B."
    assert clean_punctuation("Fraglich?") == "Fraglich?"
    assert clean_punctuation("a ,b;c") == "a, b; c."
    assert clean_punctuation("a...b") == "a... b."
    assert clean_punctuation("line one   \nline two") == "line one\nline two."
    assert clean_punctuation("2,2 cm\u00adgroß") == "2, 2 cmgroß."
    assert clean_punctuation("\u0084zitat\u0093") == '"zitat".'


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("detection")


def test_appendix_a_labels_cover_only_target_and_eos(tokenizer):
    prompt = build_prompt("vqa", "en", question=SLAKE_Q)
    ex = encode_example(tokenizer, prompt, "MRI")
    ids, labels, types = ex["input_ids"], ex["labels"], ex["token_type_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert ids[:256] == [image_id] * 256
    assert ids[256] == tokenizer.bos_token_id
    target_ids = tokenizer("MRI", add_special_tokens=False)["input_ids"]
    n_target = len(target_ids) + 1
    assert ids[-n_target:] == [*target_ids, tokenizer.eos_token_id]
    assert labels[-n_target:] == ids[-n_target:]
    assert set(labels[:-n_target]) == {IGNORE_INDEX}
    assert types == [0] * (len(ids) - n_target) + [1] * n_target
    # the prompt part decodes back to the A-string exactly
    a_part = tokenizer.decode(ids[: len(ids) - n_target], skip_special_tokens=False)
    assert a_part == expand_prompt(prompt)


def test_grounding_tokens_are_single_tokens_in_the_target(tokenizer):
    target = "the <p bbox=<loc0123><loc0140><loc0301><loc0322> id=<seg005>>liver</p>."
    ex = encode_example(tokenizer, "<image>\n\nCaption this image and detect keywords: ", target)
    toks = tokenizer.convert_ids_to_tokens(ex["input_ids"])
    for t in ("<p bbox=", "<loc0123>", "<seg005>", "</p>", "id="):
        assert t in toks
    decoded = tokenizer.decode(ex["input_ids"], skip_special_tokens=False)
    assert decoded.endswith(target + "<eos>")


def test_collate_left_pads_and_masks(tokenizer):
    a = encode_example(tokenizer, "<image>\nQ?\nAnswer: ", "yes", image_seq_length=4)
    b = encode_example(
        tokenizer, "<image>\nA much longer question here?\nAnswer: ", "no", image_seq_length=4
    )
    batch = collate_examples([a, b], pad_token_id=tokenizer.pad_token_id)
    n = batch["input_ids"].shape[1]
    assert n == len(b["input_ids"]) > len(a["input_ids"])
    pad = n - len(a["input_ids"])
    assert (batch["input_ids"][0, :pad] == tokenizer.pad_token_id).all()
    assert (batch["attention_mask"][0, :pad] == 0).all()
    assert (batch["labels"][0, :pad] == IGNORE_INDEX).all()
    assert batch["input_ids"][0, pad:].tolist() == a["input_ids"]
    right = collate_examples([a, b], pad_token_id=0, padding_side="right", return_tensors="pt")
    assert right["input_ids"][0, : len(a["input_ids"])].tolist() == a["input_ids"]

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radgrounder.anatomy import load_schema
from radgrounder.errors import RadGrounderError
from radgrounder.grounding import Box, GroundedText, Span, codec

NAMES = load_schema().names_by_id()
APPENDIX_TARGET = (
    "Multiple hypodense lesions in the <p bbox=<loc0123><loc0140><loc0301><loc0322> "
    "id=<seg005>>liver</p>, largest 2. 2 cm."
)


def liver_example() -> GroundedText:
    box = Box(123 / 512, 140 / 512, 301 / 512, 322 / 512)
    return GroundedText.from_phrases(
        [
            "Multiple hypodense lesions in the ",
            ("liver", {"class_id": 5, "class_name": "liver", "boxes": [box]}),
            ", largest 2. 2 cm.",
        ]
    )


def test_detection_appendix_a_target_byte_exact():
    assert codec("radgrounder-detect").encode(liver_example()) == APPENDIX_TARGET


def test_detection_decode_appendix_a():
    gt = codec("radgrounder-detect", class_names=NAMES).decode(APPENDIX_TARGET + "<eos><pad>")
    assert gt.text == "Multiple hypodense lesions in the liver, largest 2. 2 cm."
    assert gt.problems == []
    [span] = gt.spans
    assert (span.label, span.class_id, span.class_name) == ("liver", 5, "liver")
    assert gt.text[span.start : span.end] == "liver"
    assert span.boxes == [Box(123 / 512, 140 / 512, 301 / 512, 322 / 512)]


def test_reference_bin_round_trip_of_appendix_a():
    det = codec("radgrounder-detect")
    box = Box.from_pixels(0, 0, 511, 512, 512, 512)
    assert box.x2 == 223 / 224
    gt = GroundedText.from_phrases([("liver", {"class_id": 5, "boxes": [box]})])
    encoded = det.encode(gt)
    assert encoded == "<p bbox=<loc0000><loc0000><loc0509><loc0512> id=<seg005>>liver</p>"
    decoded = det.decode(encoded).spans[0].boxes[0]
    assert decoded.x2 == pytest.approx(509 / 512) and decoded.x2 * 224 == pytest.approx(
        222.7, abs=0.05
    )
    assert decoded.y2 == 1.0


def test_from_pixels_truncates_like_reference_even_at_float_edges():
    # 3 * 224 / 7 is exactly 96, but 3/7*224 is 95.999... in floating point.
    assert Box.from_pixels(3, 0, 7, 7, 7, 7).x1 == 96 / 224


def test_detection_bins_above_512_are_clipped_with_a_problem():
    gt = codec("radgrounder-detect").decode(
        "<p bbox=<loc0000><loc0010><loc0900><loc0512> id=<seg001>>spleen</p>"
    )
    assert gt.spans[0].boxes == [Box(0.0, 10 / 512, 1.0, 1.0)]
    assert any("clipped" in p for p in gt.problems)


def test_detection_multi_box_extension_round_trips():
    boxes = [Box(0.5, 0.25, 0.75, 0.5), Box(0.0, 0.0, 0.25, 0.25)]
    gt = GroundedText.from_phrases(["both ", ("kidneys", {"class_id": 2, "boxes": boxes})])
    det = codec("radgrounder-detect")
    assert det.decode(det.encode(gt)).spans[0].boxes == boxes


def test_detection_span_without_boxes_is_plain_text():
    gt = GroundedText.from_phrases(["no ", ("liver", {"class_id": 5}), " lesion"])
    assert codec("radgrounder-detect").encode(gt) == "no liver lesion"


def test_detection_rejects_class_ids_beyond_the_seg_codebook():
    gt = GroundedText.from_phrases([("x", {"class_id": 200, "boxes": [Box(0, 0, 1, 1)]})])
    with pytest.raises(RadGrounderError, match="200"):
        codec("radgrounder-detect").encode(gt)


@pytest.mark.parametrize(
    ("raw", "text", "labels", "problem"),
    [
        ("The <p bbox=<loc0100><loc02", "The ", [], "truncated"),
        (
            "The <p bbox=<loc0001><loc0002><loc0003><loc0004> id=<seg005>>liver",
            "The liver",
            ["liver"],
            "unclosed",
        ),
        ("a </p> b", "a  b", [], "stray"),
        (
            "<p bbox=<loc0001><loc0002><loc0003> id=<seg005>>liver</p>",
            "liver",
            ["liver"],
            "multiple of 4",
        ),
        (
            "<p bbox=<loc0004><loc0003><loc0002><loc0001> id=<seg005>>liver</p>",
            "liver",
            ["liver"],
            "swapped",
        ),
        (
            "<p bbox=<loc0001><loc0002><loc0003><loc0004> id=<seg125>>x</p>",
            "x",
            ["x"],
            "not in the schema",
        ),
        ("<p bbox=<loc0001><loc0002><loc0003><loc0004> id=<seg005>></p> ok", " ok", [], "no text"),
    ],
)
def test_detection_malformed_markup_keeps_text_and_reports(raw, text, labels, problem):
    gt = codec("radgrounder-detect", class_names=NAMES).decode(raw)
    assert gt.text == text
    assert [s.label for s in gt.spans] == labels
    assert any(problem in p for p in gt.problems), gt.problems


def test_segmentation_appendix_a_and_text_order_masks():
    seg = codec("radgrounder-segment")
    liver = np.zeros((224, 224), bool)
    liver[10:20, 10:20] = True
    gt = GroundedText.from_phrases(
        [
            "Multiple hypodense lesions in the ",
            ("liver", {"class_id": 5, "mask": liver}),
            ", largest 2. 2 cm.",
        ]
    )
    encoded = seg.encode(gt)
    assert encoded == "Multiple hypodense lesions in the <seg>liver</seg>, largest 2. 2 cm."
    assert len(gt.masks()) == 1 and gt.masks()[0] is liver


def test_segmentation_masks_pair_with_closing_tags_in_text_order():
    m1, m2 = np.eye(4, dtype=bool), np.ones((4, 4), bool)
    gt = codec("radgrounder-segment").decode(
        "The <seg>liver</seg> and the <seg>right kidney</seg>.<eos>", masks=[m1, m2]
    )
    assert [s.label for s in gt.spans] == ["liver", "right kidney"]
    assert gt.spans[0].mask is m1 and gt.spans[1].mask is m2
    assert gt.problems == []


def test_segmentation_stray_close_consumes_a_mask_and_counts_mismatch():
    m1, m2 = np.eye(2, dtype=bool), np.ones((2, 2), bool)
    gt = codec("radgrounder-segment").decode("x</seg> <seg>liver</seg>", masks=[m1, m2])
    assert gt.spans[0].mask is m2
    assert any("stray" in p for p in gt.problems)
    gt = codec("radgrounder-segment").decode("<seg>a</seg> <seg>b</seg>", masks=[m1])
    assert gt.spans[1].mask is None
    assert any("without a mask" in p for p in gt.problems)
    gt = codec("radgrounder-segment").decode("<seg>a</seg>", masks=[m1, m2])
    assert any("dropped" in p for p in gt.problems)


def test_paligemma_is_y_first_with_1024_bins():
    pg = codec("paligemma")
    gt = pg.decode(
        "<loc0256><loc0128><loc0768><loc0512> liver ; <loc0000><loc0000><loc0010><loc0020> kidney"
    )
    assert gt.text == "liver ; kidney"
    assert gt.spans[0].boxes == [Box(0.125, 0.25, 0.5, 0.75)]
    assert gt.spans[1].boxes == [Box(0.0, 0.0, 20 / 1024, 10 / 1024)]
    assert pg.encode(pg.decode("<loc0256><loc0128><loc0768><loc0512> liver")) == (
        "<loc0256><loc0128><loc0768><loc0512> liver"
    )


def test_paligemma_segment_codes_are_kept():
    codes = "".join(f"<seg{i:03d}>" for i in range(16))
    gt = codec("paligemma").decode(f"<loc0001><loc0002><loc0003><loc0004>{codes} cat")
    assert gt.spans[0].meta["seg_codes"] == list(range(16))


def test_brackets_codec():
    br = codec("brackets")
    gt = br.decode(
        "liver [0.12, 0.30, 0.55, 0.71], kidneys [0.1,0.1,0.2,0.2] [0.5, 0.5, 0.6, 0.6]."
    )
    assert gt.text == "liver, kidneys."
    assert gt.spans[0].boxes == [Box(0.12, 0.30, 0.55, 0.71)]
    assert len(gt.spans[1].boxes) == 2
    assert br.encode(gt) == (
        "liver [0.120, 0.300, 0.550, 0.710], kidneys [0.100, 0.100, 0.200, 0.200], "
        "[0.500, 0.500, 0.600, 0.600]."
    )


def test_unknown_codec_names_the_choices():
    with pytest.raises(RadGrounderError, match="radgrounder-detect"):
        codec("yolo")


def test_grounded_text_validates_offsets():
    with pytest.raises(RadGrounderError, match="liver"):
        GroundedText("the liver", [Span(0, 3, "liver")])


# ---- properties -------------------------------------------------------------------------

plain = st.text(alphabet=st.characters(blacklist_characters="<>[]", codec="utf-8"), max_size=20)
label = (
    st.text(
        alphabet=st.characters(blacklist_characters="<>[],.;:!?\n", codec="utf-8"),
        min_size=1,
        max_size=12,
    )
    .map(str.strip)
    .filter(bool)
)


@st.composite
def bin_boxes(draw, bins):
    xs = sorted(draw(st.lists(st.integers(0, bins), min_size=2, max_size=2)))
    ys = sorted(draw(st.lists(st.integers(0, bins), min_size=2, max_size=2)))
    return Box(xs[0] / bins, ys[0] / bins, xs[1] / bins, ys[1] / bins)


@st.composite
def grounded_texts(draw, bins=512, with_boxes=True, sep_plain=plain):
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        parts.append(draw(sep_plain))
        fields = {}
        if with_boxes:
            fields["boxes"] = draw(st.lists(bin_boxes(bins), min_size=1, max_size=3))
            fields["class_id"] = draw(st.integers(1, 121))
            fields["class_name"] = NAMES[fields["class_id"]]
        parts.append((draw(label), fields))
        # A separator keeps two phrases from touching, which no markup can tell apart.
        parts.append(" ")
    parts.append(draw(plain))
    return GroundedText.from_phrases(parts)


@settings(max_examples=150, deadline=None)
@given(grounded_texts())
def test_detection_round_trip(gt):
    det = codec("radgrounder-detect", class_names=NAMES)
    back = det.decode(det.encode(gt))
    assert back.text == gt.text and back.spans == gt.spans and back.problems == []


@settings(max_examples=150, deadline=None)
@given(grounded_texts(with_boxes=False), st.integers(0, 2**31 - 1))
def test_segmentation_round_trip_with_masks(gt, seed):
    rng = np.random.default_rng(seed)
    for span in gt.spans:
        span.mask = rng.random((4, 4)) > 0.5
    seg = codec("radgrounder-segment")
    back = seg.decode(seg.encode(gt), masks=gt.masks())
    assert back.text == gt.text and back.spans == gt.spans and back.problems == []


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(label, bin_boxes(1024).filter(lambda b: max(b.as_tuple()) < 1)), max_size=4)
)
def test_paligemma_round_trip(entries):
    gt = GroundedText.from_phrases(
        [
            p
            for i, (lab, box) in enumerate(entries)
            for p in ([" ; "] if i else []) + [(lab, {"boxes": [box]})]
        ]
    )
    pg = codec("paligemma")
    back = pg.decode(pg.encode(gt))
    assert back.text == gt.text and back.spans == gt.spans


@settings(max_examples=100, deadline=None)
@given(grounded_texts(bins=1000, sep_plain=st.sampled_from(["", ". ", ", ", "; ", "\n"])))
def test_brackets_round_trip(gt):
    for span in gt.spans:
        span.class_id = span.class_name = None
    br = codec("brackets")
    back = br.decode(br.encode(gt))
    assert back.text == gt.text
    assert [s.label for s in back.spans] == [s.label for s in gt.spans]
    for a, b in zip(back.spans, gt.spans, strict=True):
        assert np.allclose(
            [x.as_tuple() for x in a.boxes], [x.as_tuple() for x in b.boxes], atol=5e-4
        )


MARKUP = st.sampled_from(
    [
        "<p bbox=",
        "</p>",
        " id=",
        "<seg005>",
        "<seg>",
        "</seg>",
        "<loc0512>",
        "<loc9999>",
        "<loc01",
        ">",
        "<",
        "[",
        "]",
        "[0.1, 0.2, 0.3, 0.4]",
        ";",
        "<eos>",
        "<pad>",
        "liver",
        " ",
    ]
)
anything = st.lists(st.one_of(MARKUP, st.text(max_size=5)), max_size=25).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    anything,
    st.sampled_from(["radgrounder-detect", "radgrounder-segment", "paligemma", "brackets"]),
)
def test_decoding_arbitrary_strings_never_raises(raw, name):
    c = codec(name, class_names=NAMES) if name == "radgrounder-detect" else codec(name)
    gt = c.decode(raw, masks=[np.ones((2, 2))]) if name == "radgrounder-segment" else c.decode(raw)
    assert isinstance(gt.text, str)
    for span in gt.spans:
        assert gt.text[span.start : span.end] == span.label

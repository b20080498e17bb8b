import numpy as np

from radgrounder.anatomy import load_schema
from radgrounder.grounding import Box, codec
from radgrounder.labels.mentions import Mention
from radgrounder.labels.regions import slice_regions
from radgrounder.labels.targets import SentenceMentions, grounded_report, vqa_items

SCHEMA = load_schema()


def _slice() -> np.ndarray:
    s = np.zeros((64, 64), np.uint8)
    s[10:30, 5:30] = 5  # liver
    s[12:20, 40:50] = 1  # spleen
    s[40:50, 10:20] = 2  # right kidney
    s[40:50, 44:54] = 3  # left kidney
    return s


def m(sentence: str, phrase: str, name: str, negated: bool = False) -> Mention:
    start = sentence.index(phrase)
    return Mention(start, start + len(phrase), phrase, name, SCHEMA.by_name(name).id, negated)


def test_grounded_report_keeps_sentences_with_present_mentions():
    s1 = "The liver is normal."
    s2 = "The pancreas is unremarkable."  # not in the slice: sentence dropped
    s3 = "Both kidneys without hydronephrosis, no splenic lesion."
    regions = slice_regions(_slice())
    gt = grounded_report(
        [
            SentenceMentions(s1, [m(s1, "liver", "liver")]),
            SentenceMentions(s2, [m(s2, "pancreas", "pancreas")]),
            SentenceMentions(
                s3,
                [
                    m(s3, "Both kidneys", "kidney_right"),
                    m(s3, "Both kidneys", "kidney_left"),
                    m(s3, "splenic", "spleen", negated=True),
                ],
            ),
        ],
        regions,
    )
    assert gt.text == f"{s1} {s3}"
    assert [s.label for s in gt.spans] == ["liver", "Both kidneys", "splenic"]
    liver, kidneys, spleen = gt.spans
    assert liver.boxes == [Box.from_pixels(5, 10, 30, 30, 64, 64)]
    assert kidneys.meta["class_ids"] == [2, 3] and kidneys.class_id == 2
    assert kidneys.meta["pixel_boxes"] == [[10, 40, 54, 50]]  # union of both kidneys
    assert spleen.meta["negated"] is True
    encoded = codec("radgrounder-detect").encode(gt)
    assert "id=<seg005>>liver</p>" in encoded and "id=<seg002>>Both kidneys</p>" in encoded


def test_instances_mode_gives_one_box_per_component():
    s = _slice()
    s[55:60, 55:60] = 5  # a second liver component
    regions = slice_regions(s)
    sent = "Liver lesions."
    gt = grounded_report(
        [SentenceMentions(sent, [m(sent, "Liver", "liver")])], regions, instances=True
    )
    assert gt.spans[0].meta["pixel_boxes"] == [[5, 10, 30, 30], [55, 55, 60, 60]]


def test_nothing_present_gives_none():
    sent = "The pancreas is normal."
    regions = slice_regions(_slice())
    assert (
        grounded_report([SentenceMentions(sent, [m(sent, "pancreas", "pancreas")])], regions)
        is None
    )


def test_vqa_items_ground_present_and_name_absent_structures():
    regions = slice_regions(_slice())
    for lang in ("en", "de"):
        items = vqa_items(regions, lang, np.random.default_rng(0), candidate_ids=range(1, 118))
        kinds = [i.template_type for i in items]
        assert kinds == ["yes_no_affirmative", "yes_no_negative", "open"]
        affirmative, negative, open_ = items
        assert affirmative.answer.spans and affirmative.answer.spans[0].class_id in regions.boxes
        assert negative.answer.spans == []
        assert open_.question_type == "open"
        assert {s.class_id for s in open_.answer.spans} == set(regions.boxes)
        for item in items:
            assert "{" not in item.question and "{" not in item.answer.text


def test_bulleted_template_has_real_bullets():
    regions = slice_regions(_slice())
    texts = set()
    for seed in range(40):
        items = vqa_items(regions, "en", np.random.default_rng(seed), candidate_ids=[7])
        texts.add(items[-1].answer.text)
    bulleted = [t for t in texts if "\n- " in t]
    assert bulleted, texts
    for t in bulleted:
        assert t.count("\n- ") == 4 and ", " not in t.split("\n- ", 1)[1]

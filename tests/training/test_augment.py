import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from radgrounder.training.augment import augment_slice, crop_box


def _slice():
    labels = np.zeros((100, 120), np.uint8)
    labels[10:40, 5:50] = 5
    labels[60:90, 70:115] = 2
    pixels = np.where(labels > 0, 60.0, -1000.0).astype(np.float32)
    spans = [
        {
            "start": 4,
            "end": 9,
            "label": "liver",
            "class_id": 5,
            "class_name": "liver",
            "class_ids": [5],
            "pixel_boxes": [[5, 10, 50, 40]],
            "negated": False,
        },
        {
            "start": 14,
            "end": 26,
            "label": "right kidney",
            "class_id": 2,
            "class_name": "kidney_right",
            "class_ids": [2],
            "pixel_boxes": [[70, 60, 115, 90]],
        },
    ]
    return pixels, labels, spans, "The liver and right kidney."


def test_crop_box_intersects_translates_and_drops_slivers():
    assert crop_box((5, 10, 50, 40), 10, 20, 100, 80) == (0, 0, 40, 20)
    assert crop_box((5, 10, 50, 40), 60, 0, 50, 100) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_boxes_and_masks_stay_consistent_with_the_cropped_image(seed):
    pixels, labels, spans, text = _slice()
    out_pixels, out_labels, gt = augment_slice(
        pixels, labels, spans, text, np.random.default_rng(seed)
    )
    h, w = out_pixels.shape
    assert out_labels.shape == (h, w) and 90 <= h <= 100 and 108 <= w <= 120
    assert gt.text == text
    for span in gt.spans:
        mask = np.isin(out_labels, span.meta["class_ids"])
        rows, cols = np.nonzero(mask)
        x1, y1, x2, y2 = span.meta["pixel_boxes"][0]
        # a single-component class: the cropped box is exactly the cropped mask's box
        assert (x1, y1, x2, y2) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        b = span.boxes[0]
        assert b.x1 == int(x1 * 224 / w) / 224 and b.y2 == int(y2 * 224 / h) / 224
    # the organ keeps its intensity relation to air after the intensity transforms
    assert out_pixels[out_labels == 5].mean() > out_pixels[out_labels == 0].mean()


def test_same_seed_same_augmentation():
    pixels, labels, spans, text = _slice()
    a = augment_slice(pixels, labels, spans, text, np.random.default_rng(3))
    b = augment_slice(pixels, labels, spans, text, np.random.default_rng(3))
    assert np.array_equal(a[0], b[0]) and a[2].spans == b[2].spans

import pytest

from radgrounder.errors import RadGrounderError
from radgrounder.evaluation.question_types import (
    question_kind,
    reference_is_closed,
    reference_yes_no,
)


@pytest.mark.parametrize(
    ("label", "kind"),
    [
        ("OPEN", "open"),
        ("CLOSED", "closed"),
        ("closed ", "closed"),
        ("open", "open"),
        ("yesno", "closed"),
        ("multiple", "closed"),
    ],
)
def test_question_kind_from_dataset_labels(label, kind):
    assert question_kind(label) == kind


def test_unknown_question_type_is_an_error():
    with pytest.raises(RadGrounderError, match="question_type"):
        question_kind("essay")


def test_reference_heuristic_reproduces_its_substring_quirks():
    assert reference_is_closed("Yes")
    assert reference_is_closed("Nein, nicht vorhanden")
    assert reference_is_closed("normal")  # "no" inside "normal"
    assert reference_is_closed("nodule")
    assert not reference_is_closed("liver")
    assert reference_yes_no("Yes, the liver is present.") == "yes"
    assert reference_yes_no("abnormal") == "no"
    assert reference_yes_no("Ja") == "yes"
    assert reference_yes_no("CT") is None

import json

import nibabel as nib
import pytest

from radgrounder.anatomy import (
    bundled_totalseg_names,
    load_schema,
    totalseg_to_unified,
    unified_name,
)
from radgrounder.errors import RadGrounderError
from radgrounder.resources import load_json


def test_schema_ids_are_the_released_ones():
    schema = load_schema()
    assert len(schema) == 121 and schema.ids == tuple(range(1, 122))
    assert schema.by_name("spleen").id == 1
    assert schema.by_name("liver").id == 5
    assert schema.by_name("aorta").id == 52
    assert schema.by_name("lung_left").id == 118
    assert schema.by_name("vertebrae").id == 121
    assert schema.by_id(5).token == "<seg005>"
    assert schema.by_id(2).display_name("de") == "rechte Niere"
    assert schema.by_id(2).display_name("en") == "right kidney"


def test_unknown_ids_names_and_languages_are_clear_errors():
    schema = load_schema()
    with pytest.raises(RadGrounderError, match="class id"):
        schema.by_id(0)
    with pytest.raises(RadGrounderError, match="kidney"):
        schema.by_name("kidney")
    with pytest.raises(RadGrounderError, match="language"):
        schema.by_id(1).display_name("fr")
    with pytest.raises(RadGrounderError, match="label task"):
        bundled_totalseg_names("total_v3")


@pytest.mark.parametrize(
    ("task", "shipped"),
    [("total", "total_ct_id_2_frerad_id.json"), ("total_mr", "total_mr_id_2_frerad_id.json")],
)
def test_name_matching_reproduces_the_shipped_id_maps(task, shipped):
    expected = {int(k): v for k, v in load_json(f"label_map/{shipped}").items()}
    assert totalseg_to_unified(task) == expected


def test_mapping_by_name_survives_a_changed_mr_id_set():
    # A later total_mr release with shifted ids and a class the schema lacks.
    names = {1: "liver", 2: "spleen", 3: "lung_left", 4: "tibia", 5: "iliac_vein_left"}
    assert totalseg_to_unified(label_names=names) == {1: 5, 2: 1, 3: 118, 5: 67}
    assert unified_name("tibia") is None


def test_label_names_from_a_real_label_map_extension(examples):
    img = nib.load(examples / "example_seg_mr.nii.gz")
    xml = img.header.extensions[0].get_content().decode()
    assert "<LabelTable>" in xml
    names = {int(k): v for k, v in load_json("label_map/mr_label_map.json").items()}
    assert names[10] == "lung_left" and totalseg_to_unified(label_names=names)[10] == 118
    assert json.dumps(totalseg_to_unified("total_mr"))

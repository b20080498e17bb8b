"""Scan I/O and image preprocessing.

Every 3D volume uses one canonical layout: axes (slice, row, col) running inferior→superior,
anterior→posterior and patient right→left ("SPL"), i.e. the radiological axial view.
"""

from radgrounder.imaging.dicom import read_dicom
from radgrounder.imaging.dicom_series import list_series, read_dicom_files, read_dicom_series
from radgrounder.imaging.load import ScanInfo, inspect_scan, load_scan
from radgrounder.imaging.nifti import nifti_label_names, read_label_map, read_nifti
from radgrounder.imaging.normalize import (
    PRESETS,
    RGB_STATS,
    WINDOWS,
    clamp_ct,
    display_image,
    normalize,
    preprocess_rgb_image,
    preprocess_slice,
    resize_bilinear,
    resize_nearest,
)
from radgrounder.imaging.raster import IMAGE_SUFFIXES, read_image
from radgrounder.imaging.volume import CANONICAL_ORIENTATION, Slice, Volume, to_canonical

__all__ = [
    "CANONICAL_ORIENTATION",
    "IMAGE_SUFFIXES",
    "PRESETS",
    "RGB_STATS",
    "WINDOWS",
    "ScanInfo",
    "Slice",
    "Volume",
    "clamp_ct",
    "display_image",
    "inspect_scan",
    "list_series",
    "load_scan",
    "nifti_label_names",
    "normalize",
    "preprocess_rgb_image",
    "preprocess_slice",
    "read_dicom",
    "read_dicom_files",
    "read_dicom_series",
    "read_image",
    "read_label_map",
    "read_nifti",
    "resize_bilinear",
    "resize_nearest",
    "to_canonical",
]

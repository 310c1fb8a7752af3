"""Data: the phantom generator (embedded default data), loading, datalists and converters."""

from monai_sam.data.datalist import (
    datalist_from_decathlon,
    datalist_from_folders,
    label_names_from_decathlon,
    load_label_map,
    split_datalist,
)
from monai_sam.data.loading import CheckImageLabeld, LoadVolume, LoadVolumed, load_volume
from monai_sam.data.phantom import PHANTOM_KINDS, Phantom, make_phantom, write_phantom_dataset

__all__ = [
    "CheckImageLabeld",
    "LoadVolume",
    "LoadVolumed",
    "PHANTOM_KINDS",
    "Phantom",
    "datalist_from_decathlon",
    "datalist_from_folders",
    "label_names_from_decathlon",
    "load_label_map",
    "load_volume",
    "make_phantom",
    "split_datalist",
    "write_phantom_dataset",
]

"""Data: split protocols, checked IO, cached decoding, augmentation."""

from edgeseg.data.datasets import Decoded, SegDataset, load_decoded
from edgeseg.data.splits import carve_validation, read_split, resolve_data_root, split_hash, train_val_ids
from edgeseg.data.transforms import Augment

__all__ = ["Augment", "Decoded", "SegDataset", "carve_validation", "load_decoded", "read_split",
           "resolve_data_root", "split_hash", "train_val_ids"]

"""monai-sam: Segment Anything (SAM, SAM2) adapted to CT and MRI, shipped as MONAI bundles."""

__version__ = "0.1.0"

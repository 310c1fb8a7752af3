"""The MONAI Label app: interactive 3D annotation with SAM2 memory propagation.

This folder is a MONAI Label app (``monailabel start_server --app monai_sam/label ...``, see
``main.py`` and docs/monai_label.md). The modules: `prompting` (requests -> prompts on the RAS
grid), `feature_store` (per-image encoder features between clicks), `engine` (weights and
segmentation), `infer` / `train` (the MONAI Label tasks), `dicomweb` (DICOM-SEG back to a PACS),
`config` (``--conf`` keys). Nothing is imported here, so ``monai_sam`` does not pull MONAI Label.
"""

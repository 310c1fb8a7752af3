"""The pinned stack holds together: MONAI Label, highdicom and the DICOM network clients.

MONAI Label 0.8.5 imports pydicom-seg, which needs pydicom 2; highdicom, dicomweb-client and
pynetdicom are held at releases that still support pydicom 2. These tests fail the day a
requirement bump breaks that truce.
"""

import importlib

import numpy as np
import pydicom
import pytest


def test_pydicom_is_major_2_for_monailabel():
    assert int(pydicom.__version__.split(".")[0]) == 2, pydicom.__version__
    # the private module pydicom-seg imports; gone in pydicom 3
    importlib.import_module("pydicom._storage_sopclass_uids")


@pytest.mark.parametrize(
    "module",
    ["monailabel", "monailabel.interfaces.app", "pydicom_seg", "highdicom", "dicomweb_client", "pynetdicom",
     "sam2.build_sam", "segment_anything", "monai.apps", "ignite"],
)
def test_module_imports(module):
    importlib.import_module(module)


def test_highdicom_writes_a_segmentation_under_pydicom2(tmp_path):
    """highdicom 0.22 builds a SEG from a tiny CT series with pydicom 2 (the pipeline's path)."""
    import highdicom as hd
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sources = []
    for k in range(3):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "P", "Test^Patient"
        ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime = "", "O", "20260101", "000000"
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 2.5
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
        ds.is_little_endian, ds.is_implicit_VR = True, False
        sources.append(ds)
    mask = np.zeros((3, 8, 8), bool)
    mask[1, 2:5, 3:6] = True
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="liver",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("10200004", "SCT", "Liver"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="monai-sam", version="test", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing")
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="monai-sam",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    out = tmp_path / "seg.dcm"
    seg.save_as(out)
    back = hd.seg.segread(out)
    assert back.number_of_segments == 1
    assert back.get_segment_description(1).segment_label == "liver"

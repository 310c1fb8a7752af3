"""The monai-sam MONAI Label app (this folder is the app: ``--app monai_sam/label``).

    monailabel start_server --app monai_sam/label --studies /data/ct \\
        --conf bundle bundles/sam2_ct_abdominal_organs --conf checkpoint sam2.1_hiera_tiny.pt

Infer tasks: ``monai_sam_interactive`` (clicks/ROI -> 3D mask by SAM2 memory propagation) and,
when the bundle's inference.yaml defines ``auto_prompter``, ``monai_sam_auto``. Train task:
the bundle's name, running its train workflow on the datastore's final labels. A DICOMweb
``--studies`` URL stores final labels back as DICOM-SEG (highdicom). ``--conf`` keys are listed
in `monai_sam.label.config`; docs/monai_label.md shows how to connect 3D Slicer and OHIF.
"""

from __future__ import annotations

import logging
from typing import Any

from monailabel.config import settings as ml_settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from monai_sam.demo import require_weights
from monai_sam.label.config import settings_from_conf
from monai_sam.label.engine import Sam2LabelEngine
from monai_sam.label.infer import AUTO_TASK, INTERACTIVE_TASK, AutoSam2Infer, InteractiveSam2Infer
from monai_sam.label.strategies import Last
from monai_sam.label.train import Sam2BundleTrainTask
from monai_sam.prompts import PromptError

logger = logging.getLogger(__name__)

__all__ = ["MonaiSamLabelApp"]


class MonaiSamLabelApp(MONAILabelApp):
    """Interactive 3D annotation with SAM2 memory propagation, served by MONAI Label."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        import monai_sam

        self.model_settings = settings_from_conf(conf or {})
        # the frozen encoder's official weights, or the user's word that this is a demo
        require_weights(
            self.model_settings.checkpoint, self.model_settings.demo, "MONAI Label app", "--conf demo true"
        )
        self.engine = Sam2LabelEngine(self.model_settings)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf or {},
            name="monai-sam",
            description="SAM2 for CT/MR: click on one slice, get the organ in 3D (memory propagation)",
            version=getattr(monai_sam, "__version__", "0"),
            labels=self.model_settings.labels,
        )

    def init_infers(self) -> dict[str, InferTask]:
        infers: dict[str, InferTask] = {INTERACTIVE_TASK: InteractiveSam2Infer(self.engine)}
        if self.model_settings.has_auto_prompter:
            infers[AUTO_TASK] = AutoSam2Infer(self.engine)
        logger.info("infer tasks: %s", sorted(infers))
        return infers

    def init_strategies(self) -> dict[str, Strategy]:
        return {"random": Random(), "first": First(), "last": Last()}

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        """MONAI Label's next sample, whose encoding then starts in the background."""
        result = super().next_sample(request)
        if result.get("path"):
            self.engine.prefetch(result["path"])
        return result

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer; a request that does not fit its image is the client's error (422)."""
        from fastapi import HTTPException

        try:
            return super().infer(request, datastore)
        except PromptError as err:
            logger.warning("infer request refused: %s", err)
            raise HTTPException(status_code=422, detail=str(err)) from err

    def init_trainers(self) -> dict[str, TrainTask]:
        bundle = self.model_settings.bundle
        if bundle is None or not (bundle / "configs" / "train.yaml").is_file():
            logger.info("no bundle with a train.yaml: no train task")
            return {}
        return {bundle.name: Sam2BundleTrainTask(bundle, self.conf)}

    def init_remote_datastore(self) -> Datastore:
        if ml_settings.MONAI_LABEL_DATASTORE.lower() in ("xnat", "dsa"):
            return super().init_remote_datastore()
        return self._seg_dicomweb_datastore()

    def _seg_dicomweb_datastore(self) -> Datastore:
        """MONAI Label's DICOMweb datastore set up as it does, without the dcmqi download."""
        from dicomweb_client.session_utils import create_session_from_user_pass
        from monailabel.datastore.dicom import DICOMwebClientX

        from monai_sam.io.dicom_seg import AlgorithmInfo
        from monai_sam.label.dicomweb import SegDICOMWebDatastore

        user = ml_settings.MONAI_LABEL_DATASTORE_USERNAME or ml_settings.MONAI_LABEL_DICOMWEB_USERNAME
        password = ml_settings.MONAI_LABEL_DATASTORE_PASSWORD or ml_settings.MONAI_LABEL_DICOMWEB_PASSWORD
        session = create_session_from_user_pass(user, password) if user and password else None
        client = DICOMwebClientX(
            url=self.studies,
            session=session,
            qido_url_prefix=ml_settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=ml_settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=ml_settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache = (ml_settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip() or None
        s = self.model_settings
        algorithm = AlgorithmInfo(
            name=s.bundle.name if s.bundle is not None else s.model_size,
            version=getattr(self, "version", "0") or "0",
            prompt_source="user",
            parameters={"app": "monai-sam MONAI Label", "image_size": str(s.image_size)},
        )
        logger.info(
            "DICOMweb datastore %s: final labels are stored back as DICOM-SEG (highdicom)", self.studies
        )
        return SegDICOMWebDatastore(
            client=client,
            search_filter=ml_settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache,
            fetch_by_frame=ml_settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=ml_settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
            label_names=s.label_names,
            algorithm=algorithm,
        )

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["monai_sam"] = {
            "bundle": str(self.model_settings.bundle) if self.model_settings.bundle else None,
            **self.engine.info(),
        }
        return meta

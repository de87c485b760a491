"""OpenPose body skeletons from photos, with the body network running on OpenVINO.

The post-processing is controlnet-aux's own (``Body.__call__``: heatmap/PAF peaks, limb
matching; ``draw_poses``), only the network forward is replaced by the compiled OpenVINO model, as
the OpenVINO ControlNet notebook does. The skeleton is drawn at the detection resolution (512 on
the short side, what ControlNet OpenPose was trained on) and resized to the input's size.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.core.layout import ModelsLayout
from pipelines.core.pool import ModelPool
from pipelines.core.progress import ProgressFn, no_progress
from pipelines.image.convert import BODY_POSE_IR, DEFAULT_POSE_MODEL
from pipelines.image.request import uint8_pixels
from pipelines.image.sources import ensure_body_pose

DETECT_RESOLUTION = 512
KIND = "pose"  # the model pool's kind


class NoPersonFound(ValueError):
    """The body network found no person in the image."""


NO_PERSON_MESSAGE = (
    "No person was found in the image. Use a photo where one person is clearly visible from head to "
    "hips at least (not too small, not cut off, good light), or upload a ready-made OpenPose skeleton "
    "image instead."
)


def _to_rgb_array(image: Union[Image.Image, np.ndarray, str, Path]) -> np.ndarray:
    if image is None:
        raise ValueError("No photo was given. Upload a photo of a person to extract the pose from.")
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            raise ValueError(f"'{Path(image).name}' could not be read as an image ({error}). Upload a PNG or JPEG photo.") from None
    if isinstance(image, Image.Image):
        return np.array(image.convert("RGB"), dtype=np.uint8)
    if isinstance(image, np.ndarray) and image.ndim in (2, 3) and image.size:
        from controlnet_aux.util import HWC3

        return HWC3(uint8_pixels(image))
    raise ValueError(f"Expected a photo (PIL image, array or file path), not {type(image).__name__}.")


class _OVBodyNetwork:
    """Stands in for ``bodypose_model`` inside controlnet-aux's ``Body``: same call, OpenVINO inside."""

    def __init__(self, compiled):
        import torch

        self.compiled = compiled
        self._device_probe = torch.zeros(1)

    def parameters(self):  # Body.__call__ asks for the device of the first parameter
        return iter([self._device_probe])

    def __call__(self, data):
        import torch

        request = self.compiled.create_infer_request()  # one per call: concurrent estimates are safe
        result = request.infer({"image": np.ascontiguousarray(data.numpy(), dtype=np.float32)})
        paf = torch.from_numpy(np.array(result["paf"], copy=True))
        heatmap = torch.from_numpy(np.array(result["heatmap"], copy=True))
        return paf, heatmap


def poses_from_detection(candidate: np.ndarray, subset: np.ndarray, width: int, height: int) -> list:
    """controlnet-aux ``PoseResult`` list (keypoints normalised to 0..1) from ``Body`` output."""
    from controlnet_aux.open_pose import PoseResult
    from controlnet_aux.open_pose.body import Body, BodyResult, Keypoint

    poses = []
    for body in Body.format_body_result(np.asarray(candidate), np.asarray(subset)):
        keypoints = [
            Keypoint(x=k.x / float(width), y=k.y / float(height)) if k is not None else None for k in body.keypoints
        ]
        poses.append(PoseResult(BodyResult(keypoints, body.total_score, body.total_parts), None, None, None))
    return poses


def draw_skeleton(poses: list, width: int, height: int, size: Optional[tuple[int, int]] = None) -> Image.Image:
    """Draw body skeletons (OpenPose colours on black) at width x height, resized to ``size`` (w, h)."""
    import cv2
    from controlnet_aux.open_pose import draw_poses

    canvas = draw_poses(poses, height, width, draw_body=True, draw_hand=False, draw_face=False)
    if size is not None and tuple(size) != (width, height):
        canvas = cv2.resize(canvas, tuple(size), interpolation=cv2.INTER_LINEAR)
    return Image.fromarray(canvas)


def looks_like_skeleton(image: Image.Image) -> bool:
    """Heuristic: mostly black, and what is not black is saturated colour (an OpenPose drawing)."""
    arr = np.asarray(image.convert("RGB").resize((128, 128), Image.NEAREST)).astype(np.int16)
    brightest = arr.max(axis=2)
    lit = brightest >= 40
    if lit.mean() < 0.002 or lit.mean() > 0.4:
        return False
    saturation = brightest - arr.min(axis=2)
    return bool((saturation[lit] >= 80).mean() > 0.7)


class PoseService:
    """Lazily converts (once, cached) and compiles the OpenPose body network; ``estimate`` draws skeletons.

    The compiled network lives in the model pool (kind ``"pose"``), one per device."""

    def __init__(self, models: "ModelsLayout | Path | str", *, pose_model: str = DEFAULT_POSE_MODEL,
                 device: str = "CPU", ov_config: Optional[dict] = None, local_files_only: bool = False,
                 detect_resolution: int = DETECT_RESOLUTION, pool: Optional[ModelPool] = None):
        self.layout = ModelsLayout.of(models)
        self.cache_root = self.layout.root
        self.pose_model = pose_model
        self.device = device
        self.ov_config = dict(ov_config or {})
        self.local_files_only = local_files_only
        self.detect_resolution = int(detect_resolution)
        self.pool = pool or ModelPool({KIND: 2})
        self._folder_lock = threading.Lock()  # the conversion (and download), which may take minutes
        self._folder: Optional[Path] = None

    def model_folder(self, progress: ProgressFn = no_progress) -> Path:
        with self._folder_lock:
            if self._folder is None:
                self._folder = ensure_body_pose(self.layout, self.pose_model, local_files_only=self.local_files_only,
                                                progress=progress)
            return self._folder

    def compiled(self, device: Optional[str] = None, progress: ProgressFn = no_progress):
        device = device or self.device
        folder = self.model_folder(progress)

        def load() -> _Compiled:
            import openvino as ov

            return _Compiled(ov.Core().compile_model(str(folder / BODY_POSE_IR), device, self.ov_config))

        return self.pool.get((KIND, self.pose_model, device), load).model

    def detect(self, image, device: Optional[str] = None) -> tuple[list, tuple[int, int]]:
        """Poses found in ``image`` (normalised keypoints) and the detection canvas size (w, h)."""
        import torch
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.util import resize_image

        rgb = _to_rgb_array(image)
        detect = resize_image(rgb, self.detect_resolution)
        height, width = detect.shape[:2]
        body = Body.__new__(Body)  # Body's post-processing, without loading a torch network
        body.model = _OVBodyNetwork(self.compiled(device))
        with torch.no_grad():
            candidate, subset = body(np.ascontiguousarray(detect[:, :, ::-1]))  # Body expects BGR
        return poses_from_detection(candidate, subset, width, height), (width, height)

    def estimate(self, image, device: Optional[str] = None) -> Image.Image:
        """An OpenPose skeleton image (same size as ``image``) for the people in ``image``.

        Raises :class:`NoPersonFound` when nobody is detected, ``ValueError`` for a non-image.
        """
        rgb = _to_rgb_array(image)
        poses, (width, height) = self.detect(rgb, device)
        if not poses:
            raise NoPersonFound(NO_PERSON_MESSAGE)
        return draw_skeleton(poses, width, height, size=(rgb.shape[1], rgb.shape[0]))

    def release(self) -> None:
        self.pool.release(KIND)


class _Compiled:
    """A compiled model in the pool (OpenVINO's own objects cannot be weakly referenced)."""

    def __init__(self, model):
        self.model = model

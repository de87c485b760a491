"""The Image tab's ready examples: prompts with OpenPose skeletons the app ships, so a first visitor can
press Generate without recording a prompt or preparing a pose.

The skeletons are the keypoint sets of ``pipelines/image/data/calibration_poses.json`` drawn at 512x512
with the app's own OpenPose drawing (controlnet-aux's), committed as small PNGs in ``ui/examples/``
(drawing them here would import the pose code's model runtime when the page is built);
``tests/test_image_fast_tab.py`` checks that they are those drawings.
"""
from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).parent / "examples"
EXAMPLE_SIZE = 512
#: (prompt, name of the keypoint set in calibration_poses.json): the pose file is ``<name>.png``.
EXAMPLES: tuple[tuple[str, str], ...] = (
    ("an astronaut standing on the moon, the earth in a black sky, detailed, best quality", "standing"),
    ("a ballerina dancing on a theatre stage, spotlight, elegant, best quality", "dancing"),
    ("a superhero with raised arms on a rooftop at night, city lights, dramatic", "arms_raised"),
    ("a marathon runner on a mountain road at sunrise, photo, sharp focus", "running"),
)


def example_pose(name: str) -> Path:
    return EXAMPLES_DIR / f"{name}.png"


def example_rows() -> list[list[str]]:
    """``[prompt, pose file]`` rows for ``gr.Examples`` (inputs: the prompt box and the pose image)."""
    return [[prompt, str(example_pose(name))] for prompt, name in EXAMPLES]

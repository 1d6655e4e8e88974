import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

CAPTIONS = [
    "a photo of an astronaut",
    "a cat lying on a sofa",
    "a cup of coffee on a saucer",
    "a rocket on the launch pad",
    "Two dogs play in the snow.",
    "A man in a red jacket climbs a rock wall .",
    "a diagram",
    "",
]


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only on development machines)")
    return path


@pytest.fixture(scope="session")
def photos():
    """Real photographs as PIL images (scikit-image's sample data)."""
    from PIL import Image
    from skimage import data

    return [Image.fromarray(np.asarray(f())) for f in (data.astronaut, data.chelsea, data.coffee, data.rocket)]

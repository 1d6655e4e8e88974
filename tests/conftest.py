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


# ---- disk used by tests: a passing run removes its temp folders (pyproject's tmp_path_retention_policy
# "failed"), but while it runs every tmp_path is on disk; the largest writers are listed at the end of a
# run so they can be kept small (small configs where the architecture is not the point, large files deleted).
TMP_REPORT_MB = 50
_TMP_SIZES = {}


def _tree_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    tmp = getattr(item, "funcargs", {}).get("tmp_path")
    if call.when == "call" and isinstance(tmp, Path) and tmp.exists():
        size = _tree_bytes(tmp)
        if size >= TMP_REPORT_MB * 2**20:
            _TMP_SIZES[item.nodeid] = size
    return report


def pytest_terminal_summary(terminalreporter):
    if _TMP_SIZES:
        terminalreporter.section(f"tmp_path over {TMP_REPORT_MB} MB (at the end of each test's call)")
        for nodeid, size in sorted(_TMP_SIZES.items(), key=lambda kv: -kv[1])[:15]:
            terminalreporter.write_line(f"{size / 2**20:9.0f} MB  {nodeid}")

"""``clipforge models``: the registered architectures (:func:`clipforge.pretrained.model_rows`)."""
from __future__ import annotations

from ..pretrained import model_rows


def main() -> int:
    """List model architectures and how many pretrained tags each has (tab-separated)."""
    for name, count in model_rows():
        print(f"{name}\t{count}")
    return 0

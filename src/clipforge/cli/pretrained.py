"""``clipforge pretrained``: the known (model, tag) pairs (:func:`clipforge.pretrained.pretrained_rows`)."""
from __future__ import annotations

from typing import Optional

from ..pretrained import pretrained_rows


def main(model: Optional[str] = None) -> int:
    """List pretrained (model, tag) pairs, tab-separated: model, tag, quick_gelu if it needs QuickGELU, sources.

    Each pair loads with `create_model_and_transforms(model, pretrained=tag)`.

    Args:
        model: list only this architecture's tags
    """
    for row in pretrained_rows(model):
        print("\t".join(row))
    return 0

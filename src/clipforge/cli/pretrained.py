"""``clipforge pretrained``: the known (model, tag) pairs (:func:`clipforge.pretrained.pretrained_rows`)."""
from __future__ import annotations

import sys
from typing import Optional

from ..pretrained import pretrained_rows


def main(model: Optional[str] = None) -> int:
    """List pretrained (model, tag) pairs, tab-separated: model, tag, quick_gelu if it needs QuickGELU, sources.

    Each pair loads with `create_model_and_transforms(model, pretrained=tag)`.

    Args:
        model: list only this architecture's tags
    """
    rows = pretrained_rows(model)  # an unknown model is an error naming the closest ones
    for row in rows:
        print("\t".join(row))
    if model and not rows:
        print(f"clipforge pretrained: {model} is a known architecture without pretrained tags "
              f"(train it, or load your own file with --pretrained PATH)", file=sys.stderr)
    return 0

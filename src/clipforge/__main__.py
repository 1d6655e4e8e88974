"""``python -m clipforge ...`` (what ``torchrun -m clipforge train ...`` runs on every rank)."""
import sys

from .cli import main

sys.exit(main())

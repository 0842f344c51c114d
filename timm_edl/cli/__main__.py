"""``python -m timm_edl.cli <command> ...``: the ``timm-edl`` command without its console script."""
import sys

from . import main

sys.exit(main())

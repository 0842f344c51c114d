"""``python -m timm_edl.train`` / ``accelerate launch -m timm_edl.train``: the ``timm-edl train``
command line (:mod:`timm_edl.cli.train`)."""
import sys

from ..cli.train import main

sys.exit(main())

"""``python -m timm_edl.train`` / ``accelerate launch -m timm_edl.train``."""
import sys

from . import main

sys.exit(main())

"""timm-edl: Elastic Dictionary Learning networks (EDLNets) as timm models.

``import timm_edl`` registers the ``edlnet_*`` family with timm's model
registry (timm has no plugin discovery, so the import is what makes
``timm.create_model("edlnet_resnet18")`` work).
"""
from .layers import (
    EDLConv2d,
    edl_conv2d,
    elastic_objective,
    set_beta_mode,
    edl_layer_stats,
)
from .models import *  # noqa: F401,F403  (registers the models with timm)
from .convert import convert_to_edl, set_edl_options

__version__ = "0.1.0"

"""EDL layers: the layer (:mod:`.edl`), its solver (:mod:`.rista`) and its dictionary operators
(:mod:`.dictionary`)."""
from .dictionary import analysis, normalize_atoms, operator_norm_sq, output_padding, synthesis
from .edl import EDLConv2d, edl_layer_stats, edl_layers, set_beta_mode, with_legacy_options
from .rista import (
    INITS,
    LEGACY_OPTIONS,
    REWEIGHTS,
    STEP_RULES,
    default_eps,
    edl_conv2d,
    elastic_objective,
    residual_scale,
    reweight_coefficient,
    rista,
    smoothed_abs,
)

__all__ = [
    'EDLConv2d', 'edl_layers', 'edl_layer_stats', 'set_beta_mode', 'with_legacy_options', 'edl_conv2d', 'rista',
    'elastic_objective', 'smoothed_abs', 'reweight_coefficient', 'residual_scale', 'default_eps', 'analysis',
    'synthesis', 'output_padding', 'operator_norm_sq', 'normalize_atoms', 'STEP_RULES', 'INITS', 'REWEIGHTS',
    'LEGACY_OPTIONS',
]

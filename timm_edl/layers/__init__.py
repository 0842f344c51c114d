from .edl import (
    EDLConv2d,
    STEP_RULES,
    analysis,
    edl_conv2d,
    edl_layer_stats,
    edl_layers,
    elastic_objective,
    normalize_atoms,
    operator_norm_sq,
    output_padding,
    set_beta_mode,
    synthesis,
)

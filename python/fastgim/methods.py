"""Names of the attribution methods of :func:`fastgim.attribute` (a light module: the CLI's ``--help`` reads it
without importing torch)."""

from __future__ import annotations

GIM_RULE_METHODS = ("gim_freeze_norm", "gim_temperature", "gim_qkv_scale", "gim_mlp_scale")
METHODS = (
    "gim", *GIM_RULE_METHODS, "gradient_x_input", "saliency", "integrated_gradients", "occlusion", "random",
)

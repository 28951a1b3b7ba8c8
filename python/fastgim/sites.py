"""Named transformer sites for :meth:`fastgim.tracing.TransformerTracer.trace` (inteprelens' site table).

The ten inteprelens sites keep their names and meanings; fastgim adds ``logit_lens_input``. Layer
sites are stored per layer index, global sites (``final_norm``, ``lm_head_input``) under layer
``None``. Shapes for a batch ``(B, L)``:

* ``block_input``: residual stream entering layer ``l``, ``(B, L, hidden)``;
* ``attn_o_proj_pre``: input of the attention output projection, ``(B, L, Hq * head_dim)``;
* ``attn_output``: attention module output before the residual add, ``(B, L, hidden)``;
* ``post_attn_residual``: residual stream right after the attention write (input of the pre-MLP
  norm), ``(B, L, hidden)``; absent on parallel-residual (GPT-NeoX) and post-norm-only layouts;
* ``mlp_input``: input of the MLP (after its norm), ``(B, L, hidden)``;
* ``mlp_output``: MLP (or MoE block) output, ``(B, L, hidden)``;
* ``block_output``: residual stream leaving layer ``l``, ``(B, L, hidden)``;
* ``final_norm``: the model's final norm output (layer ``None``), ``(B, L, hidden)``;
* ``lm_head_input``: input of the LM head (layer ``None``), ``(B, L, hidden)``;
* ``logits``: logit lens, LM head of the final norm of ``block_output`` of layer ``l``, ``(B, L, vocab)``;
* ``logit_lens_input`` (fastgim): the final norm applied to ``block_output`` of layer ``l``, the
  input of that logit lens, ``(B, L, hidden)``. fastgim <= 0.1 called it ``final_norm``.

``attn_out``, ``mlp_out`` and ``block_out`` (fastgim's earlier names) are accepted as aliases of
``attn_output``, ``mlp_output`` and ``block_output``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SiteName", "SiteSpec", "SITE_SPECS", "ALL_SITES", "LAYER_SITES", "GLOBAL_SITES", "DEFAULT_SITES",
           "SITE_ALIASES", "canonical_site"]

SiteName = Literal[
    "block_input",
    "attn_o_proj_pre",
    "attn_output",
    "post_attn_residual",
    "mlp_input",
    "mlp_output",
    "block_output",
    "final_norm",
    "lm_head_input",
    "logits",
    "logit_lens_input",
]


@dataclass(frozen=True)
class SiteSpec:
    """Where a site sits: ``layer_scoped`` (one tensor per layer) and ``synthetic`` (computed, not hooked)."""

    name: SiteName
    layer_scoped: bool
    synthetic: bool
    description: str


def _spec(name: SiteName, layer_scoped: bool, synthetic: bool, description: str) -> tuple[str, SiteSpec]:
    return name, SiteSpec(name, layer_scoped, synthetic, description)


SITE_SPECS: dict[str, SiteSpec] = dict([
    _spec("block_input", True, False, "Residual stream entering a transformer block."),
    _spec("attn_o_proj_pre", True, False, "Input to the attention output projection before heads are mixed."),
    _spec("attn_output", True, False, "Output of the attention module before residual addition."),
    _spec("post_attn_residual", True, True, "Residual stream immediately after the attention write."),
    _spec("mlp_input", True, False, "Input to the MLP/feed-forward submodule."),
    _spec("mlp_output", True, False, "Output of the MLP/feed-forward submodule before residual addition."),
    _spec("block_output", True, False, "Residual stream leaving a transformer block."),
    _spec("final_norm", False, False, "Output of the model's final normalization before the LM head."),
    _spec("lm_head_input", False, False, "Input to the LM head projection."),
    _spec("logits", True, True, "Per-layer logits projected from intermediate hidden states."),
    _spec("logit_lens_input", True, True, "The model's final norm applied to a layer's block output (fastgim)."),
])
"""Every site fastgim traces, inteprelens' ten first (same names, flags and descriptions)."""

_INTEPRELENS_SITES = tuple(SITE_SPECS)[:10]
ALL_SITES: tuple[str, ...] = _INTEPRELENS_SITES
"""inteprelens' ten sites (``SITE_SPECS`` also lists fastgim's ``logit_lens_input``)."""
LAYER_SITES: tuple[str, ...] = tuple(name for name in ALL_SITES if SITE_SPECS[name].layer_scoped)
GLOBAL_SITES: tuple[str, ...] = tuple(name for name in ALL_SITES if not SITE_SPECS[name].layer_scoped)
DEFAULT_SITES: tuple[str, ...] = ("block_output", "final_norm", "logits")
"""Sites traced when none are requested (as inteprelens)."""
SITE_ALIASES = {"attn_out": "attn_output", "mlp_out": "mlp_output", "block_out": "block_output"}


def canonical_site(name: str) -> str:
    """The site name for ``name`` or one of its aliases; raises ``ValueError`` for unknown names."""
    site = SITE_ALIASES.get(name, name)
    if site not in SITE_SPECS:
        raise ValueError(f"unknown site {name!r}; sites are {', '.join(SITE_SPECS)} "
                         f"(aliases: {', '.join(f'{k}={v}' for k, v in SITE_ALIASES.items())})")
    return site

"""fastgim's bridges to other frameworks, each imported only when asked for.

* :mod:`fastgim.integrations.hf`: transformers' attention and mask registries (``"gim_fused"``);
* :mod:`fastgim.integrations.tlens`: TransformerLens ``HookedTransformer`` (extra ``fastgim[tlens]``);
* :mod:`fastgim.integrations.captum`: :class:`~fastgim.integrations.captum.LayerGIM` for Captum
  (extra ``fastgim[captum]``);
* :mod:`fastgim.integrations.inseq`: the ``"gim"`` attribution method for inseq (extra ``fastgim[inseq]``).

The core package never imports an optional package: each module here imports its framework itself
and raises an ``ImportError`` naming the extra to install when it is missing.
"""

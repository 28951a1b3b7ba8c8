"""A light ``import fastgim``: ``fastgim --help`` imports neither torch nor transformers, and ``gim_fused`` is
still registered with transformers whichever is imported first (fresh interpreters, one per case)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fastgim.cli import COMMANDS


def _run(*pieces: str) -> str:
    """Run the code pieces (each dedented) in a fresh interpreter; its stdout."""
    code = "\n".join(textwrap.dedent(piece) for piece in pieces)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("argv", [["--help"], *[[command, "--help"] for command in COMMANDS]])
def test_help_imports_neither_torch_nor_transformers(argv) -> None:
    out = _run(f"""
        import sys
        from fastgim.cli import main
        try:
            main({argv!r})
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        heavy = sorted(m for m in ("torch", "transformers", "numpy", "triton") if m in sys.modules)
        print("HEAVY", heavy)
    """)
    assert "usage: fastgim" in out
    assert "HEAVY []" in out


REGISTERED = """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert "gim_fused" in AttentionInterface._global_mapping
    assert "gim_fused" in AttentionMaskInterface._global_mapping
"""


def test_gim_fused_registered_when_transformers_comes_first() -> None:
    _run("import transformers.modeling_utils\nimport fastgim\n", REGISTERED)


def test_registered_when_fastgim_comes_first_and_lazy_names() -> None:
    out = _run("""
        import sys
        import types
        import fastgim
        assert "torch" not in sys.modules
        assert fastgim.default_model.DEFAULT_MODEL_DIR.is_dir()  # a submodule, without importing it explicitly
        assert fastgim.DEFAULT_MODEL_DIR == fastgim.default_model.DEFAULT_MODEL_DIR
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                             num_attention_heads=2, attn_implementation="gim_fused")
        assert LlamaForCausalLM(config).config._attn_implementation == "gim_fused"
        import fastgim.explain  # the submodule of the same name does not replace the function
        assert isinstance(fastgim.explain, types.FunctionType) and fastgim.explain.__module__ == "fastgim.explain"
        assert callable(fastgim.attention) and callable(fastgim.GIM) and fastgim.integrations.hf.IMPLEMENTATION == "gim_fused"
        try:
            fastgim.no_such_name
        except AttributeError as error:
            print("ERROR", error)
    """, REGISTERED)
    assert "ERROR module 'fastgim' has no attribute 'no_such_name'" in out

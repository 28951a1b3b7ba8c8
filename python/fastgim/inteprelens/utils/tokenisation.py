"""``inteprelens.utils.tokenisation``."""

from fastgim.chg_compat import PromptTokenizer

__all__ = ["PromptTokenizer"]

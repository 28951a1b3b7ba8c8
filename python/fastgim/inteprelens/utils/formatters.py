"""``inteprelens.utils.formatters``."""

from fastgim.chg_compat import PromptTokenizer
from fastgim.fewshot import (
    assign_split,
    create_fewshot_dataset,
    create_prompts,
    generate_prompt_permutations,
    load_math_dataset,
)

__all__ = ["generate_prompt_permutations", "assign_split", "create_prompts", "create_fewshot_dataset",
           "load_math_dataset"]

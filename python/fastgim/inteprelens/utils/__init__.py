"""``inteprelens.utils``: TensorDict, the datasets, PromptTokenizer, general helpers and the task formatters."""

from fastgim.chg import CHGDataset, MaskedSequenceDataset
from fastgim.chg_compat import PromptTokenizer
from fastgim.fewshot import (
    assign_split,
    create_fewshot_dataset,
    create_prompts,
    generate_prompt_permutations,
    load_math_dataset,
)
from fastgim.tensordict import TensorDict, TensorDictDataset
from fastgim.utils import check_device, cross_entropy, format_memory_size, get_device, seed_all, to_long_df

__all__ = [
    "TensorDict", "TensorDictDataset",
    "format_memory_size", "seed_all", "cross_entropy", "check_device", "get_device", "to_long_df", "CHGDataset",
    "MaskedSequenceDataset", "PromptTokenizer", "create_fewshot_dataset", "assign_split", "create_prompts",
    "generate_prompt_permutations", "load_math_dataset",
]

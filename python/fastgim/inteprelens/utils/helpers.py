"""``inteprelens.utils.helpers``."""

from fastgim.utils import (
    check_device,
    cross_entropy,
    format_memory_size,
    get_device,
    logmeanexp,
    seed_all,
    to_long_df,
)

__all__ = ["format_memory_size", "seed_all", "cross_entropy", "get_device", "check_device", "logmeanexp",
           "to_long_df"]

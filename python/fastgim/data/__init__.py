"""Data shipped with fastgim: the generated facts the default model is trained on (:mod:`.facts`)."""

from fastgim.data.facts import (
    COUNTRIES,
    RELATIONS,
    TEMPLATES,
    Country,
    FactPrompt,
    fact_prompts,
    held_out_prompts,
    is_held_out,
    training_sentences,
    vocabulary_words,
)

__all__ = [
    "COUNTRIES",
    "RELATIONS",
    "TEMPLATES",
    "Country",
    "FactPrompt",
    "fact_prompts",
    "held_out_prompts",
    "is_held_out",
    "training_sentences",
    "vocabulary_words",
]

"""Few-shot prompt datasets for CHG (inteprelens' ``utils.formatters``).

From questions and answers (free response) or questions and ``{option: 1 if correct else 0}`` dicts
(multiple choice, each ordering of the options a separate question) to ``(df_prompts, input_ids,
loss_masks)`` for :class:`fastgim.MaskedSequenceDataset`: the shortest questions become the few-shot
examples, the rest are split into train / validation, and every prompt is the instructions, sampled
examples and the question, tokenised by inteprelens' :class:`~fastgim.chg_compat.PromptTokenizer`.

Signatures, defaults, random draws (Python's ``random``: the global generator for option orderings,
``random.Random(seed)`` elsewhere) and outputs are inteprelens 0.2.1's, so the same seed gives the same
prompts; ``fastgim.inteprelens.utils.formatters`` re-exports these functions. Differences: inputs that
inteprelens silently misreads or fails on obscurely raise a ``ValueError`` naming the problem, the
caller's tokenizer is not modified (the separator token is added to a copy), and
:func:`load_math_dataset` also takes local data and by default gives exactly the requested number of
validation questions (``split_rounding="inteprelens"`` for inteprelens' count, sometimes one fewer).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from fastgim.chg_compat import INTEPRELENS_MARKER, PromptTokenizer, marked_pair, marked_tokenizer
from fastgim.progress import progress_bar

if TYPE_CHECKING:
    import pandas as pd  # imported when used: importing fastgim.inteprelens stays free of pandas

__all__ = ["generate_prompt_permutations", "assign_split", "create_prompts", "create_fewshot_dataset",
           "load_math_dataset", "MATH_INSTRUCTIONS"]

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MATH_INSTRUCTIONS = ("For each problem, explain your reasoning step by step and use LaTeX for all mathematical "
                     "expressions. Indicate your final answer using \\boxed{...}.")
"""The instructions :func:`load_math_dataset` uses when given none (the CHG paper's math notebook)."""
_PROMPT_COLUMNS = ["split", "prompt", "target"]
_LENGTH_CHUNK = 4096  # pairs tokenised per call when measuring a whole dataset


def _correct_letter(ordering: tuple[tuple[str, int], ...]) -> str:
    correct = [i for i, (_, flag) in enumerate(ordering) if flag == 1]
    if len(correct) != 1:
        raise ValueError(f"multiple-choice options must mark exactly one answer correct (value 1), got "
                         f"{dict(ordering)}")
    return OPTION_LETTERS[correct[0]]


def generate_prompt_permutations(prompt: str, options: dict[str, int], max_permutations: int | None = None
                                 ) -> list[dict[str, str]]:
    """Every ordering of a multiple-choice question's options, as ``{"question", "options", "target"}``.

    ``options`` maps each option's text to 1 (correct) or 0; exactly one must be correct, at most 26.
    ``"options"`` is the lettered list (``"A. ...\\nB. ..."``), ``"target"`` the correct letter and
    ``"question"`` the stripped prompt. Orderings come in ``itertools.permutations`` order; with
    ``max_permutations`` below their number, that many are drawn with the global ``random.sample``.
    """
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options (letters A-Z), got {len(options)}")
    orderings = list(itertools.permutations(options.items()))
    if max_permutations is not None and max_permutations < len(orderings):
        orderings = random.sample(orderings, max_permutations)
    return [{"question": prompt.strip(),
             "options": "\n".join(f"{OPTION_LETTERS[i]}. {text}" for i, (text, _) in enumerate(ordering)),
             "target": _correct_letter(ordering)} for ordering in orderings]


def _question_lengths(df: pd.DataFrame) -> pd.Series:
    """Per question (sorted): its length plus all its option lists' lengths (MCQ) or its first target's."""
    groups = df.groupby("question")
    if "options" in df.columns:
        extra = groups["options"].agg(lambda lists: sum(len(text) for text in lists))
    elif "target" in df.columns:
        extra = groups["target"].agg(lambda targets: len(targets.iloc[0]))
    else:
        raise ValueError("DataFrame must contain either 'options' or 'target' column.")
    return extra + extra.index.str.len()


def assign_split(df_questions: pd.DataFrame, num_examples: int, f_validation: float = 0.1,
                 seed: int | None = None) -> pd.DataFrame:
    """A copy of ``df_questions`` with a ``"split"`` column: ``"example"``, ``"train"`` or ``"validation"``.

    The ``num_examples`` shortest questions (question length plus its options, or its first target)
    are the few-shot examples; ``int(f_validation * remaining)`` of the other distinct questions,
    drawn with ``random.Random(seed)``, are validation; the rest train. All rows of a question share
    its split. Among equally long questions at the cut, pandas' default sort decides (numpy's unstable
    quicksort, whose order of equal keys depends on the CPU), exactly as in inteprelens.
    """
    if "question" not in df_questions.columns:
        raise ValueError(f"assign_split needs a 'question' column, got {list(df_questions.columns)}")
    if num_examples < 0 or not 0.0 <= f_validation <= 1.0:
        raise ValueError(f"assign_split needs num_examples >= 0 and 0 <= f_validation <= 1, got {num_examples}, "
                         f"{f_validation}")
    df = df_questions.copy()
    examples = _question_lengths(df).sort_values().head(num_examples).index
    is_example = df["question"].isin(examples)
    df["split"] = "train"
    df.loc[is_example, "split"] = "example"
    rest = list(df.loc[~is_example, "question"].unique())
    validation = set(random.Random(seed).sample(rest, int(len(rest) * f_validation)))
    df.loc[df["question"].isin(validation), "split"] = "validation"
    return df


def _query_block(row: dict[str, Any], question_prefix: str, answer_prefix: str) -> str:
    import pandas as pd

    lines = [f"{question_prefix}{row['question']}"]
    if pd.notna(row.get("options")):
        lines.append(row["options"])
    return "\n".join([*lines, answer_prefix])


def create_prompts(df_questions: pd.DataFrame, num_examples: int, format_example_fn: Callable[[dict[str, Any]], str],
                   instructions: str | None = None, seed: int | None = None, question_prefix: str = "Question: ",
                   answer_prefix: str = "Answer: ", sep: str = "\n") -> pd.DataFrame:
    """One few-shot prompt per train / validation row: ``DataFrame`` with ``"split"``, ``"prompt"``, ``"target"``.

    A prompt is ``instructions + "\\n"`` (if any), ``num_examples`` examples (distinct questions of the
    ``"example"`` split, one random row of each, formatted by ``format_example_fn(row_dict)``) joined
    by ``sep``, then ``sep`` and ``question_prefix + question`` / options / ``answer_prefix`` lines.
    Draws come from ``random.Random(seed)``; train rows first, then validation, in frame order.
    """
    import pandas as pd

    missing = {"question", "target", "split"} - set(df_questions.columns)
    if missing:
        raise ValueError(f"create_prompts needs columns {sorted(missing)} (assign_split adds 'split')")
    rng = random.Random(seed)
    pool = {question: group.to_dict("records")
            for question, group in df_questions[df_questions["split"] == "example"].groupby("question")}
    header = f"{instructions}\n" if instructions else ""
    records = []
    for split in ("train", "validation"):
        for row in df_questions[df_questions["split"] == split].to_dict("records"):
            chosen = [rng.choice(pool[question]) for question in rng.sample(list(pool), min(num_examples, len(pool)))]
            shots = header + sep.join(format_example_fn(example) for example in chosen)
            prompt = sep.join([shots, _query_block(row, question_prefix, answer_prefix)])
            records.append({"split": split, "prompt": prompt, "target": row["target"]})
    return pd.DataFrame.from_records(records, columns=_PROMPT_COLUMNS)


def _example_formatter(question_prefix: str, answer_prefix: str, with_options: bool
                       ) -> Callable[[dict[str, Any]], str]:
    def format_example(example: dict[str, Any]) -> str:
        options = f"{example['options']}\n" if with_options else ""
        return f"{question_prefix}{example['question']}\n{options}{answer_prefix}{example['target']}"

    return format_example


def _question_frame(questions: list[str], targets: list, max_permutations: int | None, verbose: bool
                    ) -> tuple[pd.DataFrame, bool]:
    import pandas as pd

    if len(questions) != len(targets):
        raise ValueError(f"questions and targets must have the same length, got {len(questions)} and {len(targets)}")
    if not (len(targets) > 0 and isinstance(targets[0], dict)):
        return pd.DataFrame({"question": questions, "target": targets}), False
    rows = [row for question, options in zip(questions, targets)
            for row in generate_prompt_permutations(question, options, max_permutations)]
    if verbose:
        print(f"Generated {len(rows)} MCQ permutations.")
    return pd.DataFrame(rows), True


def create_fewshot_dataset(tokenizer: Any, questions: list[str], targets: list[str] | list[dict[str, int]],
                           instructions: str | None = None, max_permutations: int | None = None,
                           example_set_size: int = 50, num_examples: int = 1, f_validation: float = 0.1,
                           seed: int = 0, question_prefix: str = "Question: ", answer_prefix: str = "Answer: ",
                           sep: str = "\n", verbose: bool = True, device: str = "cpu"
                           ) -> tuple[pd.DataFrame, Tensor, Tensor]:
    """``(df_prompts, input_ids (N, L) int64, loss_masks (N, L) bool)`` of few-shot prompts for CHG.

    ``targets`` are answer strings (free response) or ``{option: 1/0}`` dicts (multiple choice: up to
    ``max_permutations`` orderings per question, :func:`generate_prompt_permutations`). Duplicate
    rows are dropped, :func:`assign_split` reserves the ``example_set_size`` shortest questions as
    examples, :func:`create_prompts` builds ``num_examples``-shot prompts for the others, and
    :class:`~fastgim.chg_compat.PromptTokenizer` tokenises them (no BOS; ``loss_masks`` marks the
    target tokens; right-padded with ``tokenizer.pad_token_id`` plus one pad column). ``df_prompts``
    has ``"split"`` (train / validation), ``"prompt"`` and ``"target"``, aligned with the tensor rows.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("create_fewshot_dataset pads with tokenizer.pad_token_id, which is None; set one, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    df_questions, multiple_choice = _question_frame(questions, targets, max_permutations, verbose)
    df_questions = assign_split(df_questions.drop_duplicates().reset_index(drop=True), num_examples=example_set_size,
                                f_validation=f_validation, seed=seed)
    if verbose:
        print(f"Assigned splits: {df_questions['split'].value_counts().to_dict()}. Generating few-shot prompts.")
    df_prompts = create_prompts(df_questions, num_examples=num_examples, instructions=instructions, seed=seed,
                                format_example_fn=_example_formatter(question_prefix, answer_prefix, multiple_choice),
                                question_prefix=question_prefix, answer_prefix=answer_prefix, sep=sep)
    if df_prompts.empty:
        raise ValueError(f"no train or validation questions: example_set_size={example_set_size} reserves all "
                         f"{df_questions['question'].nunique()} distinct questions as few-shot examples; lower it")
    if verbose:
        print(f"Generated {len(df_prompts)} unique prompts. Tokenizing.")
    input_ids, loss_masks = PromptTokenizer(tokenizer, device=device).tokenize_batch(
        df_prompts["prompt"].tolist(), df_prompts["target"].tolist())
    if verbose:
        lengths = (input_ids != tokenizer.pad_token_id).sum(dim=1)
        print(f"Tokenized {len(input_ids)} prompts with min length {lengths.min().item()} and max length "
              f"{lengths.max().item()}.")
    return df_prompts, input_ids, loss_masks


def _read_local_file(path: Path) -> pd.DataFrame:
    import pandas as pd

    readers = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".json": pd.read_json,
               ".jsonl": lambda p: pd.read_json(p, lines=True)}
    if path.suffix not in readers:
        raise ValueError(f"load_math_dataset reads local files ending in {sorted(readers)}, got {path}")
    return readers[path.suffix](path)


def _math_rows(dataset_name: Any, split: str) -> Iterable[dict[str, Any]]:
    """The problems: an in-memory table as given, a local file, else ``datasets.load_dataset(name, split)``."""
    import pandas as pd

    if isinstance(dataset_name, pd.DataFrame):
        return dataset_name.to_dict("records")
    if not isinstance(dataset_name, (str, Path)):
        return dataset_name if hasattr(dataset_name, "__len__") else list(dataset_name)  # Dataset, list of dicts
    if Path(dataset_name).is_file():
        return _read_local_file(Path(dataset_name)).to_dict("records")
    how = ("pass the rows instead (a pandas DataFrame, a datasets.Dataset, a local .parquet/.jsonl/.json/.csv "
           "file or a folder of data files as dataset_name, with columns 'problem', 'generated_solution' and "
           "'expected_answer'), or an existing lengths_cache_path")
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError(f"load_math_dataset loads {dataset_name!r} with the 'datasets' package (pip install "
                          f"datasets); or {how}") from None
    try:
        return load_dataset(str(dataset_name), split=split)
    except (OSError, ConnectionError, ValueError) as error:
        raise RuntimeError(f"could not load the dataset {dataset_name!r} (split {split!r}): {error}. Without "
                           "network, datasets reads it from its cache (download it once online with "
                           f"datasets.load_dataset({str(dataset_name)!r}, split={split!r}); HF_DATASETS_OFFLINE=1 "
                           f"then uses the cache); or {how}") from error


def _pair_lengths(tokenizer: Any, problems: list[str], solutions: list[str]) -> list[int]:
    """Tokens of each (problem, solution) as ``PromptTokenizer.tokenize`` makes them (no truncation)."""
    marked, _ = marked_tokenizer(tokenizer, INTEPRELENS_MARKER)
    lengths: list[int] = []
    for start in range(0, len(problems), _LENGTH_CHUNK):
        texts = [marked_pair(p, s) for p, s in zip(problems[start:start + _LENGTH_CHUNK],
                                                   solutions[start:start + _LENGTH_CHUNK])]
        lengths.extend(len(ids) - 1 for ids in marked(texts, add_special_tokens=False)["input_ids"])
    return lengths


def _measure_problems(tokenizer: Any, rows: Iterable[dict[str, Any]], verbose: bool) -> pd.DataFrame:
    """``problem``, ``solution``, ``answer`` and ``length`` columns (inteprelens' lengths cache)."""
    import pandas as pd

    table = []
    for item in progress_bar(rows, desc="Reading problems", enabled=None if verbose else False):
        missing = {"problem", "generated_solution"} - set(item)
        if missing:
            raise ValueError(f"load_math_dataset: a row lacks {sorted(missing)} (it has {sorted(item)})")
        table.append({"problem": item["problem"], "solution": item["generated_solution"],
                      "answer": item.get("expected_answer", "")})
    df = pd.DataFrame(table, columns=["problem", "solution", "answer"])
    df["length"] = pd.Series(_pair_lengths(tokenizer, df["problem"].tolist(), df["solution"].tolist()),
                             index=df.index, dtype="int64")
    return df


def load_math_dataset(tokenizer: Any, dataset_name: str = "nvidia/OpenMathInstruct-2", split: str = "train_1M",
                      num_examples: int = 50, num_train: int = 50000, num_validation: int = 5000,
                      instructions: str | None = None, num_fewshot_examples: int = 1, seed: int = 0,
                      lengths_cache_path: str | None = None, verbose: bool = True, device: str = "cpu",
                      split_rounding: str = "exact") -> tuple[pd.DataFrame, Tensor, Tensor]:
    """CHG's math task: the shortest OpenMathInstruct-2 problems as few-shot prompts (the CHG paper's setup).

    Rows with ``problem``, ``generated_solution`` and ``expected_answer`` are read from ``dataset_name``:
    a Hugging Face dataset name (``datasets.load_dataset(dataset_name, split=split)``, which works
    offline from the ``datasets`` cache), a local folder of data files, a local ``.parquet`` /
    ``.jsonl`` / ``.json`` / ``.csv`` file, or the rows themselves (a ``pandas.DataFrame``, a
    ``datasets.Dataset`` or a list of dicts). Each pair's token count (``PromptTokenizer`` tokens of
    problem and solution) is measured, or read from ``lengths_cache_path`` (a parquet file with
    ``problem``, ``solution``, ``answer``, ``length``, written on first use, inteprelens' format).
    Problems with an empty answer and repeated problems are dropped; the ``num_examples + num_train +
    num_validation`` shortest go to :func:`create_fewshot_dataset` (``example_set_size=num_examples``,
    ``num_examples=num_fewshot_examples``, ``f_validation=num_validation / (num_train +
    num_validation)``, ``instructions`` default :data:`MATH_INSTRUCTIONS`).
    Returns ``(df_prompts, input_ids, loss_masks)``.

    ``split_rounding``: with enough problems, ``"exact"`` (the default) gives exactly ``num_validation``
    validation and ``num_train`` train questions (fewer problems: ``floor(rest * num_validation /
    (num_train + num_validation))`` validation). ``"inteprelens"`` reproduces inteprelens, whose
    float fraction loses one validation question for some counts (``num_train=7, num_validation=15``:
    14 and 8), the only difference between the two.
    """
    import pandas as pd

    if min(num_train, num_validation) < 0 or num_train + num_validation == 0:
        raise ValueError(f"load_math_dataset needs num_train, num_validation >= 0 with a positive sum, got "
                         f"{num_train}, {num_validation}")
    if split_rounding not in ("exact", "inteprelens"):
        raise ValueError(f"split_rounding must be 'exact' or 'inteprelens', got {split_rounding!r}")
    cache = Path(lengths_cache_path) if lengths_cache_path else None
    if cache is not None and cache.exists():
        if verbose:
            print(f"Loading precomputed lengths from {cache}")
        df_problems = pd.read_parquet(cache)
    else:
        name = dataset_name if isinstance(dataset_name, (str, Path)) else type(dataset_name).__name__
        if verbose:
            print(f"Loading dataset {name} ({split})...")
        rows = _math_rows(dataset_name, split)
        if verbose:
            print(f"Computing sequence lengths for {len(rows)} samples...")
            print("(This may take a while. Use lengths_cache_path to save results.)")
        df_problems = _measure_problems(tokenizer, rows, verbose)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            df_problems.to_parquet(cache)
            if verbose:
                print(f"Saved lengths to {cache}")
    if verbose:
        print("Filtering and selecting shortest problems...")
    df_problems = df_problems[df_problems["answer"].str.len() > 0].drop_duplicates("problem")
    total = num_examples + num_train + num_validation
    df_problems = df_problems.sort_values("length").head(total).reset_index(drop=True)
    if verbose:
        print(f"Selected {len(df_problems)} shortest problems")
        print(f"  Length range: {df_problems['length'].min()} - {df_problems['length'].max()}")
    f_validation = num_validation / (num_train + num_validation)
    if split_rounding == "exact":
        f_validation = _exact_fraction(len(df_problems) - min(num_examples, len(df_problems)), num_train,
                                       num_validation)
    return create_fewshot_dataset(
        tokenizer=tokenizer, questions=df_problems["problem"].tolist(), targets=df_problems["solution"].tolist(),
        instructions=MATH_INSTRUCTIONS if instructions is None else instructions, example_set_size=num_examples,
        num_examples=num_fewshot_examples, f_validation=f_validation, seed=seed, verbose=verbose, device=device)


def _exact_fraction(rest: int, num_train: int, num_validation: int) -> float:
    """An ``f_validation`` for which :func:`assign_split`'s ``int(rest * f)`` is exactly
    ``floor(rest * num_validation / (num_train + num_validation))`` (integer arithmetic, no float loss)."""
    count = rest * num_validation // (num_train + num_validation)
    return min(1.0, (count + 0.5) / rest) if rest else 0.0

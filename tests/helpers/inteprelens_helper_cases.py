"""Inputs shared by scripts/record_inteprelens_helpers_fixture.py (run with the real inteprelens) and
tests/test_inteprelens_helpers_parity.py (run with fastgim): the same fixed or seeded cases on both sides.

Imports neither library: each ``run_*`` function takes the module under test.
"""

from __future__ import annotations

import contextlib
import io
import random
from unittest import mock

import numpy as np
import pandas as pd
import torch

HELPER_NAMES = ["format_memory_size", "seed_all", "cross_entropy", "get_device", "check_device", "logmeanexp",
                "to_long_df"]
FORMATTER_NAMES = ["generate_prompt_permutations", "assign_split", "create_prompts", "create_fewshot_dataset",
                   "load_math_dataset"]

MEMORY_SIZES = [(0,), (1,), (512,), (1023,), (1024,), (1536, 3), (10**6,), (2**30,), (5 * 2**40 + 12345,),
                (2**60,), (-2048,), (1.5 * 2**20,), (123456789, 0), (123456789, 2, "kb"), (2**30, 4, "MB"),
                (7, 1, "B"), (3 * 2**40, 2, "tb")]
SEEDS = [0, 1234]
DEVICE_AVAILABILITY = [(0, False), (0, True), (2, False)]  # (simulated CUDA device count, MPS available)
DEVICE_REQUESTS = [None, "cpu", "cuda:1", "mps"]


def printed(fn, *args, **kwargs) -> tuple[object, str]:
    """``fn``'s result and what it printed on stdout."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn(*args, **kwargs)
    return result, buffer.getvalue()


def seeded_draws() -> list:
    """Draws from every generator ``seed_all`` seeds."""
    return [random.random(), random.randint(0, 10**6), np.random.rand(3).tolist(), torch.rand(4),
            torch.randint(0, 100, (5,))]


def cross_entropy_inputs() -> list[tuple[torch.Tensor, torch.Tensor, str]]:
    """Random logits ``(..., C)`` (odd sizes, fp32 / fp64 / bf16) with class targets, some -100 (ignored)."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for shape, dtype in [((6, 11), torch.float32), ((2, 5, 11), torch.float32), ((2, 5, 11), torch.float64),
                         ((2, 3, 4, 7), torch.float32), ((3, 97, 13), torch.bfloat16)]:
        logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
        target = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        if len(shape) == 3:
            target.view(-1)[::4] = -100
        cases += [(logits, target, reduction) for reduction in ("none", "mean", "sum")]
    return cases


def logmeanexp_inputs() -> list[tuple[torch.Tensor, int]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, generator=gen) * 5
    wide = torch.randn(7, 97, generator=gen, dtype=torch.float64) * 20
    return ([(x, dim) for dim in (0, 1, 2, -1)] + [(wide, 1), (wide, 0), (x.to(torch.bfloat16), -1),
                                                  (x.to(torch.float16), 1)])


def long_df_inputs() -> list[tuple[tuple, dict]]:
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(3, 2, 2, generator=gen)
    return [
        ((torch.randn(2, 3, 4, generator=gen), ["stage", "layer", "head"]), {}),
        ((torch.randn(2, 3, 2, generator=gen), ["a", "b"], ["lo", "hi"]), {}),
        ((masks, ["stage", "layer", "head"]), {"stage_name": np.array(["none", "pos", "neg"]),
                                               "weight": torch.arange(6).reshape(3, 2).float(),
                                               "row": np.arange(12), "scale": torch.tensor(2.5)}),
        ((np.arange(10, dtype=np.int64).reshape(2, 5), ["step", "unit"], "gate"), {"run": np.array([7, 9])}),
        ((torch.randn(2, 2, 3, generator=gen, dtype=torch.float64), ["x", "y"], ["p", "q", "r"]),
         {"tag": np.array(["u", "v"])}),
    ]


def frame_record(df: pd.DataFrame) -> dict:
    """A DataFrame as plain lists (``torch.load(weights_only=True)`` reads them)."""
    return {"columns": [str(c) for c in df.columns], "dtypes": [str(t) for t in df.dtypes],
            "data": [df[c].tolist() for c in df.columns], "index": df.index.tolist()}


@contextlib.contextmanager
def simulated_devices(cuda_count: int, mps: bool):
    """CUDA with ``cuda_count`` fake GPUs (fixed names and memory) and MPS availability, for device queries."""
    def properties(index):
        return mock.Mock(total_memory=(index + 1) * 80 * 2**30 + 12345)

    patches = [mock.patch.object(torch.cuda, "is_available", lambda: cuda_count > 0),
               mock.patch.object(torch.cuda, "device_count", lambda: cuda_count),
               mock.patch.object(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}"),
               mock.patch.object(torch.cuda, "get_device_properties", properties),
               mock.patch.object(torch.cuda, "memory_reserved", lambda i: 3 * 2**30 + i * 2**20),
               mock.patch.object(torch.cuda, "memory_allocated", lambda i: 2**30 + 7),
               mock.patch.object(torch.backends.mps, "is_available", lambda: mps)]
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def run_devices(helpers) -> tuple[list, list]:
    """``get_device`` results and ``check_device`` output under each simulated availability."""
    devices, checks = [], []
    for cuda, mps in DEVICE_AVAILABILITY:
        with simulated_devices(cuda, mps):
            devices.append([str(helpers.get_device(name)) for name in DEVICE_REQUESTS])
            checks.append(printed(helpers.check_device)[1])
    return devices, checks


# len(country) + 2 * len(capital) differs between countries: no two multiple-choice questions are equally long
CAPITALS = {"France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Peru": "Lima", "Chad": "N'Djamena",
            "Japan": "Tokyo", "Kenya": "Nairobi", "Chile": "Santiago"}
PERMUTATION_CASES = [
    ("  What is the capital of France? ", {"Paris": 1, "London": 0, "Berlin": 0}, None),
    ("  What is the capital of France? ", {"Paris": 1, "London": 0, "Berlin": 0}, 4),
    ("Which is even?", {"3": 0, "5": 0, "8": 1, "9": 0}, 5),
    ("Which is even?", {"3": 0, "5": 0, "8": 1, "9": 0}, 30),
    ("Is water wet?", {"yes": 1, "no": 0}, 1),
    ("Is water wet?", {"yes": 1, "no": 0}, 0),
]


def run_permutations(formatters, case: int) -> list:
    """The orderings (global ``random`` seeded first) and the next global draw (to see what was consumed)."""
    random.seed(SEEDS[0])
    return [formatters.generate_prompt_permutations(*PERMUTATION_CASES[case]), random.random()]


def frq_frame(count: int = 40, ties: bool = False) -> pd.DataFrame:
    """Free-response questions, one of them asked twice with another answer.

    Without ``ties`` every question's length plus its first answer's differs (padded by a permutation
    of ``"!"`` runs), so the shortest questions are the same on every machine. With ``ties`` many are
    equally long: which of them become examples then depends on numpy's unstable sort, as in inteprelens.
    """
    rows = [{"question": f"Add {i % 7} and {i}?" + ("" if ties else "!" * (3 * ((i * 17) % count))),
             "target": str(i % 7 + i)} for i in range(count)]
    rows.append({"question": rows[1]["question"], "target": "two"})
    return pd.DataFrame(rows)


def mcq_frame() -> pd.DataFrame:
    """Multiple-choice rows, two orderings per question (built here, not by either library)."""
    rows = []
    for country, capital in list(CAPITALS.items())[:8]:
        for first, second in [(capital, "Oslo"), ("Oslo", capital)]:
            rows.append({"question": f"Capital of {country}?", "options": f"A. {first}\nB. {second}",
                         "target": "A" if first == capital else "B"})
    return pd.DataFrame(rows)


def assign_split_inputs() -> list[tuple[pd.DataFrame, int, float, int]]:
    """The last case has equally long questions at the example cut (see :data:`TIE_CASES`)."""
    return [(frq_frame(), 3, 0.1, 0), (frq_frame(), 5, 0.5, 7), (frq_frame(12), 0, 0.25, 1),
            (frq_frame(), 50, 0.1, 0), (frq_frame(), 2, 0.0, 3), (frq_frame(), 2, 1.0, 3), (mcq_frame(), 2, 0.3, 4),
            (frq_frame(6).drop(columns=["target"]).assign(options="A. x"), 1, 0.5, 2),
            (frq_frame(ties=True), 5, 0.5, 7)]


# Cases whose result depends on how numpy's quicksort (pandas' default sort) orders equal keys, which
# varies with numpy's CPU dispatch (AVX-512, AVX2, ...): compared only where TIE_PROBES sort as recorded.
TIE_CASES = {"assign_split": {8}}
TIE_PROBES = [np.random.default_rng(n).integers(0, 4, n) for n in (8, 12, 17, 40, 100, 1000)]


def tie_order() -> list[list[int]]:
    """How this machine's ``np.argsort(kind="quicksort")`` orders equal keys, on :data:`TIE_PROBES`."""
    return [np.argsort(probe, kind="quicksort").tolist() for probe in TIE_PROBES]


def format_example(example: dict) -> str:
    options = f"\n{example['options']}" if "options" in example else ""
    return f"Q: {example['question']}{options}\nA: {example['target']} [{example['split']}]"


def _with_split(df: pd.DataFrame, example_every: int, validation_every: int) -> pd.DataFrame:
    splits = ["example" if i % example_every == 0 else "validation" if i % validation_every == 1 else "train"
              for i in range(len(df))]
    return df.assign(split=splits)


def create_prompts_inputs() -> list[dict]:
    frq, mcq = _with_split(frq_frame(16), 3, 4), _with_split(mcq_frame(), 5, 3)
    mcq.loc[4, "options"] = np.nan
    return [
        {"df_questions": frq, "num_examples": 1, "format_example_fn": format_example, "seed": 0},
        {"df_questions": frq, "num_examples": 2, "format_example_fn": format_example, "seed": 3,
         "instructions": "Answer briefly."},
        {"df_questions": frq, "num_examples": 0, "format_example_fn": format_example, "seed": 0},
        {"df_questions": frq, "num_examples": 50, "format_example_fn": format_example, "seed": 9, "sep": " || ",
         "question_prefix": "Q> ", "answer_prefix": "A> "},
        {"df_questions": mcq, "num_examples": 2, "format_example_fn": format_example, "seed": 1,
         "instructions": "Pick one."},
        {"df_questions": frq.assign(split="train"), "num_examples": 2, "format_example_fn": format_example,
         "seed": 0},
    ]


# question + answer lengths all differ (no ties in assign_split's sort)
ARITHMETIC = [("What is 2 plus 2?", "4"), ("Add 10 and 5.", "15"), ("What is seven plus eight?", "15"),
              ("Sum of 1 and 99?", "100"), ("What do you get from 12 + 30?", "42"), ("3 + 4 =", "7"),
              ("What is one hundred plus one?", "101"), ("Double 6?", "12"),
              ("What is zero plus zero, exactly?", "0"), ("Nine plus one?", "10")]
FEWSHOT_CASES = [
    {"questions": [q for q, _ in ARITHMETIC], "targets": [t for _, t in ARITHMETIC], "instructions": "Compute.",
     "example_set_size": 3, "f_validation": 0.3, "seed": 0},
    {"questions": [f"Capital of {c}?" for c in list(CAPITALS)[:4]],
     "targets": [{capital: 1, "Oslo": 0, "Bern": 0} for capital in list(CAPITALS.values())[:4]],
     "max_permutations": 2, "example_set_size": 1, "num_examples": 2, "seed": 5},
    {"questions": [q for q, _ in ARITHMETIC] + [ARITHMETIC[0][0]], "targets": [t for _, t in ARITHMETIC] + ["4"],
     "example_set_size": 2, "num_examples": 2, "question_prefix": "Q: ", "answer_prefix": "A:", "sep": "\n\n",
     "verbose": False, "seed": 2},
]


def run_fewshot(formatters, tokenizer, case: int) -> list:
    """``[df_prompts record, input_ids, loss_masks, stdout]`` (global ``random`` seeded first)."""
    random.seed(SEEDS[0])
    (df, ids, masks), text = printed(formatters.create_fewshot_dataset, tokenizer, **FEWSHOT_CASES[case])
    return [frame_record(df), ids, masks, text]


def math_rows(count: int = 16) -> list[dict]:
    """OpenMathInstruct-2-shaped rows: empty answers, a repeated problem, all lengths different (no ties)."""
    rows = []
    for i in range(count):
        a, b = i % 5 + 1, i + 2
        padding = " Checked." * ((i * 7) % count)
        rows.append({"problem": f"Compute ${a} \\times {b}$.", "generated_solution": f"${a} \\times {b} = "
                     f"{a * b}$, so the answer is $\\boxed{{{a * b}}}$.{padding}",
                     "expected_answer": "" if i % 6 == 5 else str(a * b)})
    rows.append(dict(rows[2], generated_solution="Repeated: \\boxed{9}."))
    return rows


MATH_CASES = [
    {"num_examples": 2, "num_train": 5, "num_validation": 2, "seed": 0},
    {"num_examples": 1, "num_train": 3, "num_validation": 1, "num_fewshot_examples": 2, "seed": 3,
     "instructions": "Solve.", "split": "train", "verbose": False},
    {"num_examples": 3, "num_train": 50, "num_validation": 10, "seed": 1},
]

# 23 of 25 usable problems; inteprelens' int(22 * (15 / 22)) is 14: one validation question too few
ROUNDING_CASE = {"num_examples": 1, "num_train": 7, "num_validation": 15, "num_fewshot_examples": 0, "seed": 0,
                 "verbose": False}


def run_math(formatters, tokenizer, case: int, **overrides) -> list:
    """``[df_prompts record, input_ids, loss_masks, stdout]`` of ``load_math_dataset`` on :func:`math_rows`."""
    (df, ids, masks), text = printed(formatters.load_math_dataset, tokenizer, **{**MATH_CASES[case], **overrides})
    return [frame_record(df), ids, masks, text]


PRETOKENIZED_CASES = [
    (["Hello world.", "How are you?"], False),
    (["Paris is the capital of France.", "  ", "", "It is one of Europe's largest cities.\n"], True),
    (["Paris is the capital of France.", "  ", "It is one of Europe's largest cities."], False),
    ([], False),
    (["   "], False),
    (["Ünïcode naïve café.", "2 + 2 = 4"], False),
]

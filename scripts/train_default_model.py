#!/usr/bin/env python
"""Train fastgim's small default model and write it to ``python/fastgim/default_model/``.

The model is a 4-layer ``LlamaForCausalLM`` (hidden 256, 4 query heads of dim 64 over 2 key/value
heads, so GQA is exercised; SwiGLU width 512; tied embeddings; 3.4M parameters, 13.6 MB in fp32) with a byte-level BPE tokenizer. It is trained on the generated fact sentences of
:mod:`fastgim.data.facts` (minus the held-out prompts) mixed with plain English from Python's
``pydoc_data.topics``. Everything is offline and deterministic: fixed seeds, deterministic
algorithms and one torch thread by default (``--threads``), so the result does not depend on how
many cores the machine has. Training is 1200 steps of 32 x 64 tokens (peak learning rate 8e-3) at
about 0.68 CPU-seconds per step: 813 CPU-seconds, about 13.5 minutes on one core (measured for the
shipped model: train accuracy 1.000, held-out 0.933).

Usage::

    python scripts/train_default_model.py [--out DIR] [--steps N] [--threads T] [--eval-every]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import re
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from fastgim.data.facts import COUNTRIES, FactPrompt, fact_prompts, vocabulary_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "python" / "fastgim" / "default_model"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK, BOS, EOS, PAD = range(4)

VOCAB_SIZE = 4096
SEQ_LEN = 64
BATCH = 32
FACT_ROWS_PER_BATCH = 28
ANSWER_WEIGHT = 4.0  # loss weight of the answer token(s) of a fact sentence
SEED = 1234
NAME_REPEATS = 2000  # how often each fact name is shown to the BPE trainer, to make it one token


def english_paragraphs() -> list[str]:
    """Plain English paragraphs from ``pydoc_data.topics`` (whitespace collapsed), fixed order."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if len(text) >= 40 and sum(ch.isalpha() for ch in text) > 0.6 * len(text):
                paragraphs.append(text)
    return paragraphs


def train_tokenizer(facts: list[str], english: list[str]) -> Tokenizer:
    """A byte-level BPE with every fact name as a single (leading-space) token; BOS added on encode."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    country_names = {c.name for c in COUNTRIES}
    names = []
    for word in vocabulary_words():
        names.append(" ".join([word] * NAME_REPEATS))  # " word" form
        if word in country_names:  # sentence-initial "France's ..." form too
            names.append("\n".join([word] * NAME_REPEATS))
    tokenizer.train_from_iterator([*facts, *english, *names], trainer=trainer)
    for token, token_id in zip(SPECIAL_TOKENS, range(4)):
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    check_single_tokens(tokenizer)
    return tokenizer


def check_single_tokens(tokenizer: Tokenizer) -> None:
    """Assert that every fact name is one token (countries also without leading space)."""
    bad = [w for w in vocabulary_words() if len(tokenizer.encode(" " + w, add_special_tokens=False).ids) != 1]
    bad += [c.name for c in COUNTRIES if len(tokenizer.encode(c.name, add_special_tokens=False).ids) != 1]
    assert not bad, f"fact names that are not single tokens: {bad}; raise VOCAB_SIZE or NAME_REPEATS"


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def fact_units(tokenizer: Tokenizer, prompts: list[FactPrompt]) -> list[tuple[list[int], list[float]]]:
    """``<s> sentence </s>`` token ids of each fact, with loss weights (ANSWER_WEIGHT on the answer)."""
    units = []
    for p in prompts:
        prompt, answer = encode(tokenizer, p.prompt), encode(tokenizer, p.answer)
        ids = [BOS, *encode(tokenizer, p.sentence), EOS]
        assert ids[1 : 1 + len(prompt) + len(answer)] == prompt + answer, p.sentence
        weights = [1.0] * len(ids)
        weights[1 + len(prompt) : 1 + len(prompt) + len(answer)] = [ANSWER_WEIGHT] * len(answer)
        units.append((ids, weights))
    return units


def pack_facts(units: list[tuple[list[int], list[float]]], rng: random.Random) -> list[tuple[list[int], list[float]]]:
    """Shuffle the fact units and pack them greedily into rows of at most SEQ_LEN tokens."""
    order = list(range(len(units)))
    rng.shuffle(order)
    rows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    for i in order:
        if len(ids) + len(units[i][0]) > SEQ_LEN:
            rows.append((ids, weights))
            ids, weights = [], []
        ids, weights = ids + units[i][0], weights + units[i][1]
    if ids:
        rows.append((ids, weights))
    return rows


def english_rows(tokenizer: Tokenizer, english: list[str]) -> list[list[int]]:
    """The English text as one token stream cut into ``<s>``-started rows of SEQ_LEN tokens."""
    stream: list[int] = []
    for paragraph in english:
        stream += encode(tokenizer, paragraph) + [EOS]
    step = SEQ_LEN - 1
    return [[BOS, *stream[i : i + step]] for i in range(0, len(stream) - step + 1, step)]


def batches(units, eng_rows: list[list[int]], steps: int, rng: random.Random):
    """Yield ``steps`` (input_ids, loss weights) batches: FACT_ROWS_PER_BATCH fact rows + English rows.

    Padding (right side) has weight 0; causal attention keeps it out of real tokens' context.
    """
    fact_pool: list[tuple[list[int], list[float]]] = []
    eng_pool: list[tuple[list[int], list[float]]] = []
    n_eng = BATCH - FACT_ROWS_PER_BATCH
    for _ in range(steps):
        while len(fact_pool) < FACT_ROWS_PER_BATCH:
            fact_pool += pack_facts(units, rng)
        while len(eng_pool) < n_eng:
            refill = list(eng_rows)
            rng.shuffle(refill)
            eng_pool += [(row, [1.0] * len(row)) for row in refill]
        rows = fact_pool[:FACT_ROWS_PER_BATCH] + eng_pool[:n_eng]
        del fact_pool[:FACT_ROWS_PER_BATCH], eng_pool[:n_eng]
        ids = torch.full((BATCH, SEQ_LEN), PAD, dtype=torch.long)
        weights = torch.zeros((BATCH, SEQ_LEN))
        for r, (row, row_weights) in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            weights[r, : len(row)] = torch.tensor(row_weights)
        yield ids, weights


def build_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train(model: LlamaForCausalLM, data, steps: int, peak_lr: float, evaluate=None) -> None:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr,
        betas=(0.9, 0.98),
    )
    model.train()
    start, cpu_start = time.time(), time.process_time()
    for step, (ids, weights) in enumerate(data):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, peak_lr, warmup=min(100, steps // 10 + 1))
        # Rows are right-padded and padding has weight 0, so causal attention alone keeps
        # padding out of every real token's context: no attention mask needed.
        logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            cpu = time.process_time() - cpu_start
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - start:6.1f}s wall "
                  f"{cpu:6.1f}s cpu", flush=True)
        if evaluate is not None and (step + 1) % 100 == 0:
            evaluate(held_out_only=True)
            model.train()
    model.eval()


@torch.no_grad()
def accuracy(model: LlamaForCausalLM, tokenizer: Tokenizer, prompts: list[FactPrompt]) -> float:
    """Fraction of prompts whose greedy next token is the first token of the answer."""
    groups: dict[int, list[tuple[list[int], int]]] = {}
    for p in prompts:
        ids = tokenizer.encode(p.prompt).ids
        groups.setdefault(len(ids), []).append((ids, encode(tokenizer, p.answer)[0]))
    correct = 0
    for items in groups.values():
        ids = torch.tensor([i for i, _ in items])
        pred = model(input_ids=ids).logits[:, -1].argmax(-1)
        correct += int((pred == torch.tensor([a for _, a in items])).sum())
    return correct / len(prompts)


def save(model: LlamaForCausalLM, tokenizer: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    model.save_pretrained(out)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=512,
    )
    fast.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps")
    parser.add_argument("--lr", type=float, default=8e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the shipped model used 1: same bits on any machine size)")
    parser.add_argument("--eval-every", action="store_true", help="report accuracy every 100 steps")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    t0 = time.time()

    facts = [p.sentence for p in fact_prompts("train")]
    english = english_paragraphs()
    tokenizer = train_tokenizer(facts, english)
    vocab_hash = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]
    units = fact_units(tokenizer, fact_prompts("train"))
    eng_rows = english_rows(tokenizer, english)
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens (sha {vocab_hash}); {len(facts)} fact sentences "
          f"({sum(len(u[0]) for u in units)} tokens), {len(eng_rows)} English rows; {time.time() - t0:.1f}s", flush=True)

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters", flush=True)

    def evaluate(held_out_only: bool = False) -> None:
        model.eval()
        held_acc = accuracy(model, tokenizer, fact_prompts("heldout"))
        train_acc = float("nan") if held_out_only else accuracy(model, tokenizer, fact_prompts("train"))
        print(f"accuracy: train {train_acc:.3f}  held-out {held_acc:.3f}", flush=True)

    train(model, batches(units, eng_rows, args.steps, rng), args.steps, args.lr,
          evaluate if args.eval_every else None)
    evaluate()
    save(model, tokenizer, args.out)
    size = (args.out / "model.safetensors").stat().st_size
    print(f"saved to {args.out} (model.safetensors {size / 2**20:.2f} MiB); total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

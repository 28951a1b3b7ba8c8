"""Runs fastgim.attribute_dataset on a saved model; launched by tests (plain python or torchrun).

usage: dist_runner.py MODEL_DIR TEXTS_JSON OUTPUT [--batch-size N] [--delay SECONDS]
"""

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastgim
from fastgim.distributed import _explain_batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("texts")
    parser.add_argument("output")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0, help="sleep per batch, so a test can kill the run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="gim_fused").eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    texts = json.load(open(args.texts))

    def slow_worker(*worker_args):
        time.sleep(args.delay)
        return _explain_batch(*worker_args)

    fastgim.attribute_dataset(model, tokenizer, texts, args.output, batch_size=args.batch_size,
                              explain_fn=slow_worker if args.delay else None, method="explain")


if __name__ == "__main__":
    main()

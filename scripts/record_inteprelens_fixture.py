"""Record inteprelens 0.2.1's outputs on fastgim's bundled model, for tests/test_inteprelens_parity.py.

Run ONCE in a separate environment holding the real inteprelens (not fastgim's), e.g.::

    python -m venv /tmp/ilens && /tmp/ilens/bin/pip install torch==2.13.0 inteprelens==0.2.1
    /tmp/ilens/bin/python scripts/record_inteprelens_fixture.py python/fastgim/default_model tests/fixtures

It runs every example of inteprelens' README (the model id replaced by the bundled model's folder,
``.cuda()`` dropped) and writes ``inteprelens_0_2_1.pt`` (a dict of tensors, numbers and strings that
``torch.load(..., weights_only=True)`` reads) plus the two files inteprelens' own persistence writes
(``inteprelens_0_2_1_trainer_masks.pt`` from ``CHGTrainer.fit(save_path=)`` and
``inteprelens_0_2_1_results.pt`` from ``CHGResults.save``). Vocabulary-wide tensors are stored as a
SHA-256 of their float32 bytes plus 256 evenly strided values, to keep the fixture small.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

CAPITAL_TEXTS = ["The capital of France is", "2 + 2 equals"]
CAPITAL_TARGETS = ["Paris", "4"]
DOCUMENT = "Paris is the capital of France. It is one of Europe's largest cities."
SENTENCES = ["Paris is the capital of France.", "It is one of Europe's largest cities."]
SUMMARY = "Paris is the capital of France."
FIT_ARGS = {"num_masks": 1, "num_updates": 1, "num_reg_updates": 1, "batch_size": 1, "verbose": False}


def digest(tensor: torch.Tensor) -> str:
    """SHA-256 of the tensor's float32 bytes (row-major)."""
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()


def large(tensor: torch.Tensor) -> dict:
    """A vocabulary-wide tensor as its shape, the digest of all values and 256 evenly strided values."""
    t = tensor.detach().float()
    return {"shape": list(t.shape), "sha256": digest(t), "sample": t.flatten()[:: max(1, t.numel() // 256)].clone()}


def fit_record(results) -> dict:
    """Gates, metrics and inteprelens' analyses of a CHGResults."""
    masks = {k: v.clone() for k, v in results.masks.items() if v is not None}
    return {
        "masks": masks,
        "metrics": [{k: (float(v) if isinstance(v, float) else v) for k, v in m.items()} for m in results.metrics or []],
        "summary": {k: v for k, v in results.summary().items() if k != "taxonomy_counts"},
        "taxonomy_counts": dict(results.summary()["taxonomy_counts"]),
        "necessary_heads": [list(h) for h in results.necessary_heads()],
        "sufficient_heads": [list(h) for h in results.sufficient_heads()],
        "taxonomy": results.head_taxonomy()["taxonomy"].tolist(),
        "facilitating_mask": results.get_facilitating_mask().clone(),
        "to_dataframe_values": torch.tensor(results.to_dataframe()["value"].tolist()),
    }


SIGNATURE_MEMBERS = {
    "LensAPI": ["__init__", "from_pretrained", "fit", "fit_dataset", "fit_pattern_task", "fit_huggingface", "score",
                "trace"],
    "TransformerTracer": ["__init__", "trace"],
    "CHG": ["__init__", "create_masks", "register_mask_hooks", "forward", "get_logp"],
    "CHGTrainer": ["__init__", "fit_stage", "fit", "get_final_masks"],
    "CHGResults": ["__init__", "load", "save", "necessary_heads", "sufficient_heads", "head_taxonomy", "to_dataframe",
                   "get_facilitating_mask", "summary"],
    "CHGDataset": ["from_texts", "from_tokens", "from_huggingface", "from_pattern_task"],
    "CausalCircuitAttribution": ["__init__", "compute_token_gradients", "compute_token_gradients_full_target",
                                 "compute_sentence_importance", "compute_sentence_importance_batch"],
    "TraceResult": ["__init__", "add", "get", "has", "final_log_probs", "final_probs", "layer_log_probs",
                    "layer_probs"],
    "TokenScores": ["__init__", "final_token_logits", "final_token_log_probs", "final_token_probs",
                    "gather_log_probs"],
    "InterventionSpec": ["__init__"], "SiteRequest": ["__init__"], "LayerSiteKey": ["__init__"],
    "ModelAdapter": ["get_layers", "get_attention_output_proj", "get_attention_module", "get_mlp",
                     "get_pre_attention_norm", "get_pre_mlp_norm", "get_final_norm", "get_lm_head"],
}


def signature_of(obj) -> list[list[str]]:
    """``[name, kind, repr(default)]`` per parameter ("" for no default)."""
    import inspect

    return [[p.name, p.kind.name, "" if p.default is inspect.Parameter.empty else repr(p.default)]
            for p in inspect.signature(obj).parameters.values()]


def signatures() -> dict[str, list[list[str]]]:
    """Signatures of inteprelens' public functions and of the public methods of its classes."""
    import inteprelens
    from inteprelens.models.adapters import ModelAdapter, get_adapter

    out = {}
    for name in inteprelens.__all__:
        obj = getattr(inteprelens, name)
        if callable(obj) and not isinstance(obj, type):
            out[name] = signature_of(obj)
    for cls_name, members in SIGNATURE_MEMBERS.items():
        cls = ModelAdapter if cls_name == "ModelAdapter" else getattr(inteprelens, cls_name)
        for member in members:
            out[f"{cls_name}.{member}"] = signature_of(getattr(cls, member))
    out["models.adapters.get_adapter"] = signature_of(get_adapter)
    return out


def main(model_dir: str, out_dir: str) -> None:
    import inteprelens
    from inteprelens import (
        CausalCircuitAttribution,
        CHGDataset,
        CHGTrainer,
        LensAPI,
        capture_gradients,
        capture_kwargs_hook,
        tensor_grad_hook,
    )
    from inteprelens.models.adapters import get_adapter
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict = {"inteprelens_version": "0.2.1", "torch_version": str(torch.__version__),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    record["public_names"] = list(inteprelens.__all__)
    record["signatures"] = signatures()
    del inteprelens

    # Quick start
    torch.manual_seed(0)
    analyzer = LensAPI.from_pretrained(model_dir)
    results = analyzer.fit(texts=["What is the capital of France?"], targets=["Paris"], **FIT_ARGS)
    record["quick_start"] = fit_record(results)

    # CHG analysis
    torch.manual_seed(0)
    analyzer = LensAPI.from_pretrained(model_dir)
    results = analyzer.fit(texts=CAPITAL_TEXTS, targets=CAPITAL_TARGETS, **FIT_ARGS)
    record["chg_analysis"] = fit_record(results)
    dataset = CHGDataset.from_texts(CAPITAL_TEXTS, CAPITAL_TARGETS, AutoTokenizer.from_pretrained(model_dir))
    record["dataset"] = {"input_ids": dataset["input_ids"].clone(), "loss_masks": dataset["loss_masks"].clone()}

    # Trace
    trace = analyzer.trace(texts="Paris is the capital of", layers=[0],
                           sites=["attn_o_proj_pre", "final_norm", "logits"])
    record["trace"] = {"attn_o_proj_pre_0": trace.get("attn_o_proj_pre", 0).clone(),
                       "final_norm": trace.get("final_norm").clone(), "logits_0": large(trace.get("logits", 0)),
                       "final_logits": large(trace.final_logits), "available_sites": list(trace.available_sites),
                       "metadata_sites": list(trace.metadata["requested_sites"]),
                       "layer_probs_0": large(trace.layer_probs(0)), "final_probs": large(trace.final_probs())}
    default_trace = analyzer.trace(texts="Paris is the capital of")
    record["trace_default_sites"] = list(default_trace.available_sites)
    every = analyzer.trace(texts="Paris is the capital of", layers=[1], sites=list(__import__(
        "inteprelens").ALL_SITES))
    record["trace_all_sites"] = {f"{site}:{layer}": large(t)
                                 for site, per in every.activations.items() for layer, t in per.items()}

    # Score, at the README's temperature and at T = 2
    for temperature in (1.0, 2.0):
        scores = analyzer.score(texts=CAPITAL_TEXTS, temperature=temperature)
        target = torch.tensor([[analyzer.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]]
                               * scores.input_ids.shape[1]] * 2)
        record[f"score_T{temperature:g}"] = {
            "logits": large(scores.logits), "log_probs": large(scores.log_probs), "probs": large(scores.probs),
            "final_token_logits": large(scores.final_token_logits()),
            "final_token_log_probs": large(scores.final_token_log_probs()),
            "final_token_probs": large(scores.final_token_probs()),
            "gather_log_probs": scores.gather_log_probs(target).clone(),
            "input_ids": scores.input_ids.clone(), "attention_mask": scores.attention_mask.clone(),
            "temperature": scores.temperature}

    # Gradient-based attribution through facilitating heads
    torch.manual_seed(0)
    analyzer = LensAPI.from_pretrained(model_dir)
    results = analyzer.fit(texts=["The capital of France is"], targets=["Paris"], **FIT_ARGS)
    facilitating_mask = results.get_facilitating_mask()
    attribution = CausalCircuitAttribution(analyzer.model, analyzer.tokenizer)
    sentence_scores = attribution.compute_sentence_importance(document=DOCUMENT, sentences=SENTENCES,
                                                              summary=SUMMARY, facilitating_mask=facilitating_mask)
    doc_ids = analyzer.tokenizer(DOCUMENT, return_tensors="pt")["input_ids"]
    summary_ids = analyzer.tokenizer(SUMMARY, add_special_tokens=False, return_tensors="pt")["input_ids"]
    everything = torch.ones_like(facilitating_mask)
    record["attribution"] = {
        "fit": fit_record(results), "facilitating_mask": facilitating_mask.clone(),
        "sentence_scores": sentence_scores.clone(),
        "token_grad_norms_full": attribution.compute_token_gradients_full_target(doc_ids, summary_ids,
                                                                                 everything).clone(),
        "token_grad_norms_first": attribution.compute_token_gradients(doc_ids, summary_ids, everything).clone(),
        "sentence_scores_all_heads": attribution.compute_sentence_importance(
            document=DOCUMENT, sentences=SENTENCES, summary=SUMMARY, facilitating_mask=everything).clone()}

    # Hook utilities (bf16 as in the README, on the CPU)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16)
    adapter = get_adapter(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer("The Eiffel Tower is in", return_tensors="pt")
    target_id = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    with capture_gradients(adapter.get_attention_module(0), site="output") as grads:
        loss = -model(**inputs).logits[0, -1, target_id]
        loss.backward()
    hooks = {"capture_gradients": grads[0][0].float().clone()}
    with capture_kwargs_hook(adapter.get_layers()[0]) as kw:
        with torch.no_grad():
            model(**inputs)
    hooks["kwargs_attention_mask_is_none"] = kw[0].get("attention_mask") is None
    act_ref = []
    h = adapter.get_mlp(0).register_forward_hook(lambda m, i, o: act_ref.append(o))
    outputs = model(**inputs)
    h.remove()
    with tensor_grad_hook(lambda: act_ref[0]) as grads:
        loss = -outputs.logits[0, -1, target_id]
        loss.backward()
    hooks["tensor_grad_hook"] = grads[0].float().clone()
    record["hooks"] = hooks

    # Training numerics: 10 seeded updates per stage, and inteprelens' two save formats
    torch.manual_seed(0)
    analyzer = LensAPI.from_pretrained(model_dir)
    dataset = CHGDataset.from_texts(CAPITAL_TEXTS, CAPITAL_TARGETS, analyzer.tokenizer)
    trainer = CHGTrainer(analyzer.model, dataset, num_masks=2, batch_size=2, adapter=analyzer.adapter)
    history: dict[str, list] = {"none": [], "positive": [], "negative": []}
    for mask, metrics in trainer.fit(num_updates=10, num_reg_updates=10, verbose=False,
                                     save_path=out / "inteprelens_0_2_1_trainer_masks.pt"):
        history[metrics["regularization"]].append(mask)
    from inteprelens import CHGResults

    trained = CHGResults(masks={k: torch.stack(v) for k, v in history.items()})
    record["training"] = fit_record(trained)
    trained.save(out / "inteprelens_0_2_1_results.pt")
    torch.save(record, out / "inteprelens_0_2_1.pt")
    print(f"wrote {out / 'inteprelens_0_2_1.pt'}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""fastgim.evaluate: comprehensiveness / sufficiency against a one-input-at-a-time reference."""

from __future__ import annotations

import math

import pytest
import torch
from test_attribution import TEXT, WORDS, tiny_llama, tiny_tokenizer

from fastgim.attribution import attribute
from fastgim.evaluation import evaluate

TEXTS = [TEXT, "the big dog sat on a red mat", "a cat ran"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=7)


def reference_metrics(model, tok, text, method, seed, max_k, fractions, baseline=0):
    """The protocol written out: one perturbed input per forward pass."""
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    target = int(logits.argmax())
    full = float(logits[target])
    scores = attribute(model, ids, tokenizer=tok, method=method, target=target, seed=seed,
                       baseline_token_id=baseline, n_steps=4).scores
    eligible = list(range(1, ids.shape[1] - 1))
    ranked = sorted(eligible, key=lambda i: -float(scores[i]))  # sorted() is stable, like the library

    def value(removed):
        x = ids.clone()
        x[0, list(removed)] = baseline
        with torch.no_grad():
            return float(model(input_ids=x).logits[0, -1, target])

    ks = range(1, min(max_k, len(eligible)) + 1)
    comp = sum(full - value(ranked[:k]) for k in ks) / len(ks) / abs(full)
    suff = sum(full - value(ranked[math.floor(q * len(eligible)):]) for q in fractions) / len(fractions) / abs(full)
    return comp, suff


def test_matches_reference_protocol(llama, tok):
    methods = ["random", "occlusion", "gim", "integrated_gradients"]
    fractions = (0.5, 0.8, 0.99)
    result = evaluate(llama, TEXTS, methods=methods, tokenizer=tok, max_k=4, sufficiency_fractions=fractions,
                      method_kwargs={"integrated_gradients": {"n_steps": 4}}, progress=False)
    assert len(result.rows) == len(TEXTS) * len(methods) and result.skipped == 0
    for row in result.rows:
        comp, suff = reference_metrics(llama, tok, TEXTS[row["example"]], row["method"], row["example"], 4, fractions)
        assert math.isclose(row["comprehensiveness"], comp, rel_tol=1e-4, abs_tol=1e-5), row
        assert math.isclose(row["sufficiency"], suff, rel_tol=1e-4, abs_tol=1e-5), row


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_results(llama, tok, batch_size):
    kwargs = dict(methods=["occlusion"], tokenizer=tok, max_k=5, progress=False)
    small = evaluate(llama, TEXTS[:1], batch_size=batch_size, **kwargs).rows[0]
    large = evaluate(llama, TEXTS[:1], batch_size=64, **kwargs).rows[0]
    for key in ("comprehensiveness", "sufficiency"):
        assert math.isclose(small[key], large[key], rel_tol=1e-4, abs_tol=1e-6)


def test_table_and_markdown(llama, tok):
    methods = ["gim", "gradient_x_input", "random"]
    result = evaluate(llama, TEXTS + ["the cat"], methods=methods, tokenizer=tok, max_k=3, progress=False)
    assert result.skipped == 1  # two tokens: nothing between the first and the last
    table = result.table()
    assert list(table.index) == methods and (table["n"] == len(TEXTS)).all()
    frame = result.frame()
    for method in methods:
        mine = frame[frame.method == method]
        assert math.isclose(table.loc[method, "comprehensiveness_mean"], mine.comprehensiveness.mean())
        assert math.isclose(table.loc[method, "sufficiency_sem"], mine.sufficiency.std(ddof=1) / math.sqrt(len(mine)))
    markdown = result.to_markdown()
    assert markdown.splitlines()[0].startswith("| method | comprehensiveness") and markdown.count("\n") == 4
    assert set(result.summary()) == set(methods)


def test_continuation_and_callable_targets(llama, tok):
    data = [{"text": "the cat sat on", "target": " the mat"},
            {"input_ids": tok(TEXT).input_ids, "target": lambda out: out.logits[:, -1, 5] - out.logits[:, -1, 6]}]
    result = evaluate(llama, data, methods=["gradient_x_input", "occlusion"], tokenizer=tok, progress=False)
    assert len(result.rows) == 4
    assert all(math.isfinite(r["comprehensiveness"]) and math.isfinite(r["sufficiency"]) for r in result.rows)
    # the continuation's value is the sum of its log-probs
    ids = tok("the cat sat on the mat").input_ids
    with torch.no_grad():
        logp = llama(input_ids=torch.tensor([ids[:-1]])).logits.log_softmax(-1)[0]
    want = float(logp[3, ids[4]] + logp[4, ids[5]])
    assert math.isclose(result.rows[0]["full_value"], want, rel_tol=1e-5)


def test_progress_bar(llama, tok, capsys):
    evaluate(llama, TEXTS[:1], methods=["random"], tokenizer=tok, progress=True)
    assert "evaluate" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(methods=["shap"]), "unknown or no methods"),
        (dict(methods=[]), "unknown or no methods"),
        (dict(max_k=0), "max_k must be"),
        (dict(sufficiency_fractions=(0.0,)), "sufficiency_fractions"),
        (dict(sufficiency_fractions=(1.5,)), "sufficiency_fractions"),
        (dict(data=[]), "no examples"),
        (dict(data=["the cat"]), "no example had an eligible token"),
        (dict(data=[{"prompt": "x"}]), "exactly one of"),
        (dict(data=[""]), "input text is empty"),
    ],
)
def test_bad_arguments(llama, tok, kwargs, message):
    kwargs = {"data": TEXTS[:1], "tokenizer": tok, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate(llama, **kwargs)


def test_needs_a_baseline_token():
    model = tiny_llama(seed=1)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="baseline token"):
        evaluate(model, [[4, 5, 6, 7]], methods=["random"], progress=False)
    result = evaluate(model, [[4, 5, 6, 7]], methods=["random"], baseline_token_id=WORDS.index("a"), progress=False)
    assert result.rows[0]["n_eligible"] == 2


def test_default_model_held_out_prompts():
    import fastgim
    from fastgim.data.facts import held_out_prompts

    model, tokenizer = fastgim.load_default_model()
    prompts = [p.prompt for p in held_out_prompts()[:3]]
    result = evaluate(model, prompts, methods=["gim", "gradient_x_input"], tokenizer=tokenizer, progress=False)
    assert len(result.rows) == 6 and all(r["n_eligible"] >= 3 for r in result.rows)
    assert all(math.isfinite(r["comprehensiveness"]) for r in result.rows)

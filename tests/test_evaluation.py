"""fastgim.evaluate: comprehensiveness / sufficiency against a one-input-at-a-time reference."""

from __future__ import annotations

import math
import re

import pytest
import torch
from test_attribution import TEXT, WORDS, tiny_llama, tiny_tokenizer

from fastgim.attribution import attribute
from fastgim.evaluation import TARGET_KINDS, evaluate

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
    markdown = result.to_markdown().splitlines()
    assert markdown[0] == f"target: {TARGET_KINDS['logit']}" and "GIM paper" in markdown[0]
    assert markdown[2].startswith("| method | comprehensiveness") and len(markdown) == 7
    assert set(result.summary()) == set(methods) and result.target_kind == "logit"
    assert result.skipped_reasons == {next(iter(result.skipped_reasons)): 1}


def test_callable_targets(llama, tok):
    data = [{"input_ids": tok(TEXT).input_ids, "target": lambda out: out.logits[:, -1, 5] - out.logits[:, -1, 6]}]
    result = evaluate(llama, data, methods=["gradient_x_input", "occlusion"], tokenizer=tok, progress=False)
    assert len(result.rows) == 2 and result.target_kind == "callable"
    assert all(math.isfinite(r["comprehensiveness"]) and math.isfinite(r["sufficiency"]) for r in result.rows)
    assert all(r["normaliser"] == abs(r["full_value"]) for r in result.rows)


def greedy_continuation(model, tok, text: str, n: int) -> str:
    ids = tok(text).input_ids
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return " " + tok.decode(ids[-n:])


def reference_continuation_metrics(model, tok, text, continuation, method, seed, max_k, fractions, baseline=0):
    """Continuations: sum of log-probs, normalised by its drop to chance level f + m ln V."""
    prompt = tok(text).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids

    def value(removed=()):
        ids = torch.tensor([prompt + cont[:-1]])
        ids[0, list(removed)] = baseline
        with torch.no_grad():
            logp = model(input_ids=ids).logits.log_softmax(-1)[0]
        return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont)), logp.shape[-1]

    (full, vocab) = value()
    normaliser = full + len(cont) * math.log(vocab)
    scores = attribute(model, text, tokenizer=tok, method=method, target=continuation, seed=seed,
                       baseline_token_id=baseline).scores
    eligible = list(range(1, len(prompt) - 1))
    ranked = sorted(eligible, key=lambda i: -float(scores[i]))
    ks = range(1, min(max_k, len(eligible)) + 1)
    comp = sum(full - value(ranked[:k])[0] for k in ks) / len(ks) / normaliser
    suff = sum(full - value(ranked[math.floor(q * len(eligible)):])[0] for q in fractions) / len(fractions)
    return full, normaliser, comp, suff / normaliser


def test_continuations_are_normalised_by_the_drop_to_chance(llama, tok):
    texts = [TEXT, "the big dog sat on a red mat"]
    data = [{"text": t, "target": greedy_continuation(llama, tok, t, n)} for t, n in zip(texts, (1, 3))]
    fractions = (0.5, 0.9)
    result = evaluate(llama, data, methods=["occlusion", "gradient_x_input"], tokenizer=tok, max_k=4,
                      sufficiency_fractions=fractions, progress=False)
    assert result.target_kind == "log-prob" and len(result.rows) == 4 and result.skipped == 0
    assert result.to_markdown().startswith(f"target: {TARGET_KINDS['log-prob']}")
    for row in result.rows:
        item = data[row["example"]]
        full, normaliser, comp, suff = reference_continuation_metrics(
            llama, tok, item["text"], item["target"], row["method"], row["example"], 4, fractions)
        assert math.isclose(row["full_value"], full, rel_tol=1e-5)
        assert math.isclose(row["normaliser"], normaliser, rel_tol=1e-5) and normaliser > 0
        assert math.isclose(row["comprehensiveness"], comp, rel_tol=1e-4, abs_tol=1e-5), row
        assert math.isclose(row["sufficiency"], suff, rel_tol=1e-4, abs_tol=1e-5), row


def test_confident_continuation_gives_scores_on_the_logit_scale():
    """The issue's case: a log-prob near 0 divided by itself gave thousands."""
    import fastgim

    model, tokenizer = fastgim.load_default_model()
    data = [{"text": "The capital of France is", "target": " Paris"},
            {"text": "The capital of Germany is", "target": " Berlin"}]
    result = evaluate(model, data, methods=["occlusion", "random"], tokenizer=tokenizer, progress=False)
    for row in result.rows:
        assert -0.5 < row["full_value"] < 0  # confident: the log-prob is near 0 ...
        assert 0 < row["comprehensiveness"] < 2 and abs(row["sufficiency"]) < 2, row  # ... the scores are not huge
        old = row["comprehensiveness"] * row["normaliser"] / abs(row["full_value"])
        assert abs(old) > 10 * abs(row["comprehensiveness"])  # what |f| would have given
    table = result.table()
    assert table.loc["occlusion", "comprehensiveness_mean"] > table.loc["random", "comprehensiveness_mean"]


def test_continuations_at_or_below_chance_are_skipped_with_the_reason(llama, tok):
    with torch.no_grad():
        logits = llama(input_ids=torch.tensor([tok(TEXT).input_ids])).logits[0, -1]
    unlikely = " " + tok.decode([int(logits[4:].argmin()) + 4])  # below chance by Jensen's inequality
    likely = greedy_continuation(llama, tok, TEXT, 1)
    result = evaluate(llama, [{"text": TEXT, "target": unlikely}, {"text": TEXT, "target": likely}],
                      methods=["random"], tokenizer=tok, progress=False)
    assert result.skipped == 1 and [r["example"] for r in result.rows] == [1]
    assert list(result.skipped_reasons) == ["the continuation's log-prob is at or below chance level (nothing to "
                                            "remove)"]
    with pytest.raises(ValueError, match="no example could be evaluated: 1 x the continuation's log-prob is at"):
        evaluate(llama, [{"text": TEXT, "target": unlikely}], methods=["random"], tokenizer=tok, progress=False)


@pytest.mark.parametrize(
    ("data", "listing"),
    [([{"text": TEXT}, {"text": TEXT, "target": " mat"}], "logit: examples 0; log-prob: examples 1"),
     ([TEXT, {"text": TEXT, "contrast": "dog"}, TEXT], "logit: examples 0, 2; logit difference: examples 1")],
)
def test_mixed_target_kinds_are_refused(llama, tok, data, listing):
    with pytest.raises(ValueError, match=re.escape(f"the examples mix target kinds ({listing})")):
        evaluate(llama, data, methods=["random"], tokenizer=tok, progress=False)


def test_default_k_is_the_papers_50(llama, tok):
    text = " ".join(WORDS[4 + i % 20] for i in range(60))  # 58 eligible tokens
    result = evaluate(llama, [text], methods=["random"], tokenizer=tok, sufficiency_fractions=(0.5,), progress=False)
    comp, suff = reference_metrics(llama, tok, text, "random", 0, 50, (0.5,))
    assert math.isclose(result.rows[0]["comprehensiveness"], comp, rel_tol=1e-4, abs_tol=1e-5)
    other = reference_metrics(llama, tok, text, "random", 0, 10, (0.5,))[0]
    assert not math.isclose(comp, other, rel_tol=1e-3)  # k up to 50, not 10, is what was computed


def test_progress_bar(llama, tok, capsys):
    evaluate(llama, TEXTS[:1], methods=["random"], tokenizer=tok, progress=True)
    assert "evaluate" in capsys.readouterr().err
    evaluate(llama, TEXTS[:1], methods=["random"], tokenizer=tok)  # default: only on a terminal
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(methods=["shap"]), "unknown or no methods"),
        (dict(methods=[]), "unknown or no methods"),
        (dict(max_k=0), "max_k must be"),
        (dict(sufficiency_fractions=(0.0,)), "sufficiency_fractions"),
        (dict(sufficiency_fractions=(1.5,)), "sufficiency_fractions"),
        (dict(data=[]), "no examples"),
        (dict(data=["the cat"]), "no example could be evaluated: 1 x fewer than 3 prompt tokens"),
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

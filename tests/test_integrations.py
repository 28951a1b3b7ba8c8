"""Captum, inseq and nnsight adapters: the same numbers as fastgim's own GIM computation."""

from __future__ import annotations

import pytest
import torch

import fastgim
from fastgim.attribution import attribute

SETTINGS = [{}, {"softmax_temperature": 1.5, "q_scale": None}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def default_model():
    from fastgim.default_model import load_default_model

    return load_default_model()


def gim_token_grad_x_embedding(model, ids: list[int], target_id: int, **settings) -> torch.Tensor:
    """fastgim's own computation: d log p(target | ids) / d embedding under GIM, times the embedding, summed."""
    x = torch.tensor([ids])
    with fastgim.GIM(model, **settings):
        emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
        logprob = model(inputs_embeds=emb).logits[0, -1].float().log_softmax(-1)[target_id]
        (grad,) = torch.autograd.grad(logprob, emb)
    return (grad * emb).sum(-1)[0].detach()


def plain_token_grad_x_embedding(model, ids: list[int], target_id: int) -> torch.Tensor:
    x = torch.tensor([ids])
    emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
    logprob = model(inputs_embeds=emb).logits[0, -1].float().log_softmax(-1)[target_id]
    (grad,) = torch.autograd.grad(logprob, emb)
    return (grad * emb).sum(-1)[0].detach()


# ------------------------------------------------------------------------------------------ captum


@pytest.mark.parametrize("settings", SETTINGS, ids=["defaults", "custom"])
def test_captum_llm_gradient_attribution_holds_gim_scores(default_model, settings):
    captum_attr = pytest.importorskip("captum.attr")
    from fastgim.integrations.captum import LayerGIM

    model, tokenizer = default_model
    flags = [p.requires_grad for p in model.parameters()]
    llm_attr = captum_attr.LLMGradientAttribution(LayerGIM(model), tokenizer)
    result = llm_attr.attribute(captum_attr.TextTokenInput(PROMPT, tokenizer), target=" Paris.", **settings)

    prompt_ids = tokenizer(PROMPT).input_ids
    target_ids = tokenizer(" Paris.", add_special_tokens=False).input_ids
    want = torch.stack([
        gim_token_grad_x_embedding(model, prompt_ids + target_ids[:t], tid, **settings)[: len(prompt_ids)]
        for t, tid in enumerate(target_ids)
    ])
    assert result.token_attr.shape == want.shape
    torch.testing.assert_close(result.token_attr, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(result.seq_attr, want.sum(0), rtol=1e-5, atol=1e-5 * want.abs().max().item())
    plain = plain_token_grad_x_embedding(model, prompt_ids, target_ids[0])[: len(prompt_ids)]
    assert (result.token_attr[0] - plain).abs().max() > 1e-3 * plain.abs().max()  # GIM really applied
    assert [p.requires_grad for p in model.parameters()] == flags


def test_captum_layer_gim_plain_layer_argument(default_model):
    pytest.importorskip("captum.attr")
    from fastgim.integrations.captum import LayerGIM

    model, tokenizer = default_model
    layer = model.model.layers[1]
    method = LayerGIM(model, layer=layer, forward_func=lambda ids: model(ids).logits[:, -1])
    ids = torch.tensor([tokenizer(PROMPT).input_ids])
    got = method.attribute(ids, target=5)
    got = got[0] if isinstance(got, tuple) else got  # a tuple when the layer returns one
    assert got.shape == (1, ids.shape[1], model.config.hidden_size)

    with fastgim.GIM(model):
        hidden = {}
        handle = layer.register_forward_hook(
            lambda _m, _a, out: hidden.update(h=out[0] if isinstance(out, tuple) else out)
        )
        try:
            logit = model(ids).logits[0, -1, 5]
        finally:
            handle.remove()
        (grad,) = torch.autograd.grad(logit, hidden["h"])
    torch.testing.assert_close(got, grad * hidden["h"].detach(), rtol=1e-5, atol=1e-6)


def test_captum_layer_gim_needs_a_module():
    pytest.importorskip("captum.attr")
    from fastgim.integrations.captum import LayerGIM

    with pytest.raises(TypeError, match="torch.nn.Module"):
        LayerGIM(lambda x: x)


# ------------------------------------------------------------------------------------------ inseq


@pytest.mark.parametrize("method", ["gim", "gim_temperature"])
def test_inseq_gim_steps_equal_fastgim_attribute(default_model, method, tmp_path):
    inseq = pytest.importorskip("inseq")
    import fastgim.integrations.inseq as fastgim_inseq

    assert method in inseq.list_feature_attribution_methods()
    assert set(fastgim_inseq.METHOD_NAMES) <= set(inseq.list_feature_attribution_methods())
    model, tokenizer = default_model
    inseq_model = inseq.load_model(model, method, tokenizer=tokenizer)
    out = inseq_model.attribute(
        PROMPT, generation_args={"max_new_tokens": 3}, skip_special_tokens=True, attributed_fn="logit",
        show_progress=False,
    )
    seq = out.sequence_attributions[0]
    all_ids = [t.id for t in seq.target]
    n_prompt = len(tokenizer(PROMPT, add_special_tokens=False).input_ids)
    n_generated = len(all_ids) - n_prompt
    assert n_generated == 3
    for step in range(n_generated):
        prefix = all_ids[: n_prompt + step]
        want = attribute(
            model, torch.tensor([prefix]), tokenizer=tokenizer, method=method, target=all_ids[n_prompt + step],
            objective="logit",
        ).scores
        got = seq.target_attributions[: len(prefix), step]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

    path = tmp_path / "gim.json"
    out.save(path, overwrite=True)
    loaded = inseq.FeatureAttributionOutput.load(path)
    torch.testing.assert_close(
        loaded.sequence_attributions[0].target_attributions, seq.target_attributions, equal_nan=True
    )
    aggregated = out.aggregate()
    assert aggregated.sequence_attributions[0].target_attributions.shape == seq.target_attributions.shape
    html = out.show(display=False, return_html=True)
    assert "France" in html


def test_inseq_gim_settings_reach_the_backward(default_model):
    inseq = pytest.importorskip("inseq")
    import fastgim.integrations.inseq  # noqa: F401

    model, tokenizer = default_model
    inseq_model = inseq.load_model(model, "gim", tokenizer=tokenizer)
    kwargs = dict(generated_texts=PROMPT + " Paris", skip_special_tokens=True, attributed_fn="logit",
                  show_progress=False)
    default = inseq_model.attribute(PROMPT, **kwargs).sequence_attributions[0].target_attributions
    changed = inseq_model.attribute(PROMPT, v_scale=None, **kwargs)
    changed = changed.sequence_attributions[0].target_attributions
    ids = tokenizer(PROMPT, add_special_tokens=False).input_ids
    paris = tokenizer(" Paris", add_special_tokens=False).input_ids[0]
    want = attribute(model, torch.tensor([ids]), tokenizer=tokenizer, target=paris, objective="logit",
                     v_scale=None).scores
    torch.testing.assert_close(changed[: len(ids), 0], want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert not torch.allclose(default[: len(ids), 0], changed[: len(ids), 0])


# ------------------------------------------------------------------------------------------ nnsight


def test_nnsight_trace_runs_gim_gradients(default_model):
    nnsight = pytest.importorskip("nnsight")
    model, tokenizer = default_model
    assert model.config._attn_implementation == "gim_fused"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids

    def grad_without_nnsight(gim: bool) -> torch.Tensor:
        context = fastgim.GIM(model) if gim else torch.enable_grad()
        with context:
            emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            model(inputs_embeds=emb).logits[0, -1].max().backward()
        return emb.grad

    wrapped = nnsight.NNsight(model)
    with fastgim.GIM(model):
        with wrapped.trace(ids):
            embeddings = wrapped.model.embed_tokens.output
            logits = wrapped.lm_head.output
            with logits[0, -1].max().backward():
                grad = embeddings.grad.save()
    grad = getattr(grad, "value", grad)
    torch.testing.assert_close(grad, grad_without_nnsight(gim=True), rtol=1e-6, atol=1e-7)
    assert (grad - grad_without_nnsight(gim=False)).abs().max() > 1e-3  # the GIM backward, not the plain one

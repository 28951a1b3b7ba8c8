"""Tests for fastgim.circuits: component and edge attribution, graph pruning / export / plot.

References: brute-force activation patching written here, exact residual-stream identities, and
the induction circuit of a 2-layer model trained in the module set-up.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import fastgim  # noqa: F401  (registers gim_fused)
from fastgim.adapters import get_adapter
from fastgim.circuits import CircuitGraph, activation_patching, component_attribution, edge_attribution

VOCAB = 29
# Plain-gradient attribution patching vs brute-force patching on the small random model below:
# measured Spearman ~0.99; asserted bound leaves margin for seeds and platforms.
SPEARMAN_BOUND = 0.85


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0, kv: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=kv, max_position_embeddings=64,
                         attn_implementation="gim_fused")
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=24, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation="gim_fused")
    return GPT2LMHeadModel(config).to(dtype).eval()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.flatten().argsort().argsort(), b.flatten().argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def brute_force(model: torch.nn.Module, ids: torch.Tensor, corrupted: torch.Tensor, metric) -> torch.Tensor:
    """metric(patched) - metric(clean) per head (patching the o_proj input slice) and per MLP."""
    adapter = get_adapter(model)
    cache: dict = {}
    hooks = [adapter.get_o_proj(i).register_forward_pre_hook(lambda _m, a, i=i: cache.__setitem__(("z", i), a[0]))
             for i in range(adapter.num_layers)]
    hooks += [adapter.get_mlp(i).register_forward_hook(lambda _m, _a, o, i=i: cache.__setitem__(("m", i), o))
              for i in range(adapter.num_layers)]
    with torch.no_grad():
        model(corrupted)
        for h in hooks:
            h.remove()
        clean = metric(model(ids).logits)
        effects = []
        d = adapter.head_dim
        for layer in range(adapter.num_layers):
            for head in range(adapter.num_heads):
                def patch(_m, args, layer=layer, head=head):
                    z = args[0].clone()
                    z[..., head * d:(head + 1) * d] = cache[("z", layer)][..., head * d:(head + 1) * d]
                    return (z,)
                hook = adapter.get_o_proj(layer).register_forward_pre_hook(patch)
                effects.append(metric(model(ids).logits) - clean)
                hook.remove()
        for layer in range(adapter.num_layers):
            hook = adapter.get_mlp(layer).register_forward_hook(lambda _m, _a, _o, layer=layer: cache[("m", layer)])
            effects.append(metric(model(ids).logits) - clean)
            hook.remove()
    return torch.stack(effects).float()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
def test_component_scores_track_activation_patching(make) -> None:
    model = make()
    ids = torch.randint(0, VOCAB, (2, 9))
    corrupted = torch.randint(0, VOCAB, (2, 9))
    metric = lambda logits: logits[:, -1, 4].float().sum()  # noqa: E731
    truth = brute_force(model, ids, corrupted, metric)
    plain = component_attribution(model, ids, corrupted_input_ids=corrupted, metric=metric, gim=None)
    gim = component_attribution(model, ids, corrupted_input_ids=corrupted, metric=metric)
    estimate = torch.cat([plain.heads.flatten(), plain.mlps])
    rho_plain = spearman(estimate, truth)
    rho_gim = spearman(torch.cat([gim.heads.flatten(), gim.mlps]), truth)
    print(f"\n{make.__name__}: Spearman vs activation patching: plain {rho_plain:.3f}, GIM {rho_gim:.3f}")
    assert rho_plain > SPEARMAN_BOUND
    library = activation_patching(model, ids, corrupted, metric)
    torch.testing.assert_close(torch.cat([library.heads.flatten(), library.mlps]), truth, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("baseline", ["corrupted", "zero", "mean"])
def test_component_scores_exact_on_linear_paths(dtype: torch.dtype, baseline: str) -> None:
    """Per-position residual score = (baseline - clean) . grad at the layer output, computed here."""
    model = tiny_llama(dtype, kv=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, VOCAB, (2, 7))
    corrupted = torch.randint(0, VOCAB, (2, 7)) if baseline == "corrupted" else None
    metric = lambda logits: logits[:, -1].logsumexp(-1).sum()  # noqa: E731
    scores = component_attribution(model, ids, corrupted_input_ids=corrupted, baseline=baseline, metric=metric,
                                   gim=None)
    layer = adapter.get_layers()[1]
    outs = []
    handle = layer.register_forward_hook(lambda _m, _a, out: outs.append(out[0] if isinstance(out, tuple) else out))
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(metric(model(inputs_embeds=emb).logits), outs[0])
    clean = outs[0].detach()
    if baseline == "corrupted":
        with torch.no_grad():
            model(corrupted)
        base = outs[-1]
    elif baseline == "zero":
        base = torch.zeros_like(clean)
    else:
        base = clean.mean((0, 1)).expand_as(clean)
    handle.remove()
    expected = ((base - clean) * grad).sum(-1).float()
    tol = {torch.float32: 2e-4, torch.float64: 1e-6}[dtype]  # scores are returned in float32
    torch.testing.assert_close(scores.resid[1], expected, atol=tol, rtol=tol)
    assert scores.heads.shape == (3, 6) and scores.mlps.shape == (3,) and scores.resid.shape == (3, 2, 7)
    torch.testing.assert_close(scores.heads, scores.heads_by_position.sum((1, 2)))


def test_padded_batch_scores_sum_rows() -> None:
    model = tiny_llama(torch.float64)
    ids = torch.randint(1, VOCAB, (2, 8))
    corrupted = torch.randint(1, VOCAB, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    batch = component_attribution(model, ids, attention_mask=mask, corrupted_input_ids=corrupted, target_token_id=5)
    rows = [component_attribution(model, ids[i:i + 1, mask[i].bool()], target_token_id=5,
                                  corrupted_input_ids=corrupted[i:i + 1, mask[i].bool()]) for i in range(2)]
    torch.testing.assert_close(batch.heads, rows[0].heads + rows[1].heads, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(batch.mlps, rows[0].mlps + rows[1].mlps, atol=1e-7, rtol=1e-5)
    assert (batch.resid[:, 1, :3] == 0).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama-gqa", "gpt2"])
@pytest.mark.parametrize("gim", [None, True], ids=["plain", "gim"])
def test_edges_into_each_node_sum_to_its_input_delta(make, gim) -> None:
    """sum_u score(u -> logits) = (corrupted - clean final residual) . grad at the final norm input."""
    model = make(torch.float64)
    adapter = get_adapter(model)
    ids, corrupted = torch.randint(0, VOCAB, (2, 6)), torch.randint(0, VOCAB, (2, 6))
    metric = lambda logits: logits[:, -1, 3].sum()  # noqa: E731
    graph = edge_attribution(model, ids, corrupted_input_ids=corrupted, metric=metric, gim=gim)
    into_logits = graph.scores[:, graph.downstream.index("logits")]
    assert not torch.isnan(into_logits).any()
    resid = component_attribution(model, ids, corrupted_input_ids=corrupted, metric=metric, gim=gim).resid
    torch.testing.assert_close(into_logits.sum(), resid[-1].sum().double().float(), atol=1e-6, rtol=1e-6)
    # edges only run forward in depth; a layer's attention does not feed its own q/k/v
    first_q = graph.downstream.index("a0.h0<q>")
    assert not torch.isnan(graph.scores[0, first_q]) and torch.isnan(graph.scores[1:, first_q]).all()
    assert graph.scores.shape == (1 + adapter.num_layers * (adapter.num_heads + 1),
                                  adapter.num_layers * (adapter.num_heads + 2 * adapter.num_kv_heads + 1) + 1)


def test_graph_selection_export_and_plot(tmp_path) -> None:
    model = tiny_llama()
    ids, corrupted = torch.randint(0, VOCAB, (1, 8)), torch.randint(0, VOCAB, (1, 8))
    graph = edge_attribution(model, ids, corrupted_input_ids=corrupted, target_token_id=2)
    everything = graph.edges()
    top = graph.top_n(12)
    assert [e[:2] for e in top.edges()] == [e[:2] for e in everything[:12]]
    greedy = graph.greedy(15)
    assert len(greedy.edges()) == 15
    kept_sources = {u for u, _v, _s in greedy.edges()}
    for _u, v, _s in greedy.edges():  # greedy grows from logits: each edge ends in logits or a kept source
        assert v == "logits" or set(graph.components_of(v)) & kept_sources
    pruned = top.prune()
    assert set(pruned.edges()) <= set(top.edges())
    pruned_edges = pruned.edges()
    for u, _v, _s in pruned_edges:  # every source is the input or is fed by a kept edge
        assert u == "input" or any(u in graph.components_of(v2) for _u2, v2, _s2 in pruned_edges)
    path = tmp_path / "graph.json"
    text = top.to_json(path)
    assert json.loads(path.read_text()) == json.loads(text)
    again = CircuitGraph.from_json(path)
    assert [e[:2] for e in again.edges()] == [e[:2] for e in top.edges()]
    torch.testing.assert_close(torch.tensor([e[2] for e in again.edges()]), torch.tensor([e[2] for e in top.edges()]))
    png = top.plot(tmp_path / "graph.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_and_hooks_removed_after_exception() -> None:
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (1, 5))
    with pytest.raises(ValueError, match="corrupted_input_ids"):
        component_attribution(model, ids)
    with pytest.raises(ValueError, match="baseline must be one of"):
        component_attribution(model, ids, baseline="noise")
    with pytest.raises(ValueError, match="scalar"):
        component_attribution(model, ids, baseline="zero", metric=lambda logits: logits[:, -1, 0])

    def broken(_logits):
        raise RuntimeError("metric failed")

    for run in (component_attribution, edge_attribution):
        with pytest.raises(RuntimeError, match="metric failed"):
            run(model, ids, baseline="mean", metric=broken)
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    with pytest.raises(ValueError, match="norms after attention"):
        edge_attribution(gemma, ids, baseline="zero")


# --------------------------------------------------------------------------------------------------
# induction: previous-token head -> induction head
# --------------------------------------------------------------------------------------------------
INDUCTION_VOCAB, INDUCTION_LEN = 24, 24


def _repeated_segments(n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens with one segment (length 5-10) repeated right after itself; weights mark the copy."""
    x = torch.randint(0, INDUCTION_VOCAB, (n, INDUCTION_LEN), generator=generator)
    weights = torch.zeros(n, INDUCTION_LEN - 1)
    lengths = torch.randint(5, 11, (n,), generator=generator)
    starts = torch.randint(0, 3, (n,), generator=generator)
    for i in range(n):
        s, a = int(lengths[i]), int(starts[i])
        x[i, a + s:a + 2 * s] = x[i, a:a + s]
        weights[i, a + s:a + 2 * s - 1] = 1
    return x, weights


@pytest.fixture(scope="module")
def induction_model() -> LlamaForCausalLM:
    """A 2-layer Llama trained on repeated segments, with one previous-token head: the circuit is unique.

    Two causes made this recipe's circuit fragile, and both are removed here:

    * the weights came from transformers' own init and the training data from the global RNG after it, so
      the trained model changed whenever transformers changed its init (5.24 does); now one generator draws
      the initial weights (written out below) and every batch, whatever the installed transformers does;
    * with four heads in layer 0, training splits the previous-token job over two of them (e.g. 0.77 and
      0.41 previous-token attention, or 0.65 and 0.56), so the K-composition runs through two edges of
      opposite sign and neither ranks in the top 5. Layer 0 keeps one head (the other heads' output
      projection is zero and frozen), so the previous-token head, and the edges into the induction
      heads' keys, are unique.
    """
    generator = torch.Generator().manual_seed(0)
    config = LlamaConfig(vocab_size=INDUCTION_VOCAB, hidden_size=64, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=INDUCTION_HEADS, num_key_value_heads=INDUCTION_HEADS,
                         max_position_embeddings=64, attn_implementation="eager", tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    _keep_one_head(model.model.layers[0].self_attn)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    average, threads = None, torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest and immune to oversubscription
    try:
        average = _train(model, optimizer, generator)
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.final_loss = average
    return model


def _keep_one_head(attention: torch.nn.Module) -> None:
    """Only head 0 of ``attention`` writes to the residual stream: the o_proj columns of the others are zero
    and get zero gradient (Adam then never moves them)."""
    weight = attention.o_proj.weight
    head_dim = weight.shape[1] // INDUCTION_HEADS
    with torch.no_grad():
        weight[:, head_dim:] = 0
    weight.register_hook(lambda grad: torch.cat([grad[:, :head_dim], torch.zeros_like(grad[:, head_dim:])], 1))


def _train(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, generator: torch.Generator | None) -> float:
    average = None
    for _ in range(INDUCTION_STEPS):
        x, weights = _repeated_segments(32, generator)
        logits = model(x).logits[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, INDUCTION_VOCAB), x[:, 1:].reshape(-1),
                                               reduction="none").view_as(weights)
        loss = (ce * weights).sum() / weights.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        average = loss.item() if average is None else 0.95 * average + 0.05 * loss.item()
        if average < INDUCTION_TARGET_LOSS:
            break
    return average


INDUCTION_HEADS, INDUCTION_STEPS, INDUCTION_TARGET_LOSS = 4, 4000, 0.1


def test_induction_circuit_among_top_edges(induction_model: LlamaForCausalLM) -> None:
    model = induction_model
    assert model.final_loss < 0.5, f"induction training did not converge (loss {model.final_loss:.3f})"
    generator = torch.Generator().manual_seed(1)
    period = 7
    first = torch.randint(0, INDUCTION_VOCAB, (16, period), generator=generator)
    clean = torch.cat([first, first, torch.randint(0, INDUCTION_VOCAB, (16, 10), generator=generator)], 1)
    corrupted = clean.clone()
    corrupted[:, :period] = torch.randint(0, INDUCTION_VOCAB, (16, period), generator=generator)
    with torch.no_grad():
        attentions = model(clean, output_attentions=True).attentions
    prev_score = torch.stack([attentions[0][:, h].diagonal(-1, -2, -1).mean() for h in range(INDUCTION_HEADS)])
    # an induction head at i in the second copy attends to i - period + 1 (the token after the earlier copy)
    ind_score = torch.stack([attentions[1][:, h].diagonal(-(period - 1), -2, -1)[:, 1:period].mean()
                             for h in range(INDUCTION_HEADS)])
    prev_head = int(prev_score.argmax())
    induction_heads = [h for h in range(INDUCTION_HEADS) if ind_score[h] > 0.5]
    print(f"\nprevious-token head a0.h{prev_head} ({prev_score.max():.2f}), induction heads "
          f"{[f'a1.h{h}' for h in induction_heads]} ({ind_score.tolist()}), training loss {model.final_loss:.3f}")
    assert prev_score.max() > 0.5 and induction_heads

    def metric(logits: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits[:, period:2 * period - 1].float(), -1)
        return log_probs.gather(-1, clean[:, period + 1:2 * period, None]).sum()

    circuit = {(f"a0.h{prev_head}", f"a1.h{h}<k>") for h in induction_heads}  # K-composition
    ranks = {}
    for gim in (False, True):
        graph = edge_attribution(model, clean, corrupted_input_ids=corrupted, metric=metric, gim=gim or None)
        edges = [(u, v) for u, v, _ in graph.edges()]
        ranks[gim] = min((edges.index(edge) for edge in circuit if edge in edges), default=len(edges))
        print("GIM" if gim else "plain", "top-5 edges:", edges[:5], "best circuit edge at rank", ranks[gim])
    assert ranks[True] < 5, f"GIM: no previous-token -> induction edge among the top 5 (best rank {ranks[True]})"
    # Plain gradients under-rank the K-composition (the softmax is sharp): GIM's backward ranks it higher.
    assert ranks[True] < ranks[False], ranks

"""Per-layer activation checkpointing (``fastgim.checkpointing``): same attributions, less memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import inspect
import os
import platform
import threading

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fastgim
from fastgim.checkpointing import checkpoint_layers, transformer_blocks


def _model(dtype: torch.dtype = torch.float32, *, kv_heads: int = 2, layers: int = 3, hidden: int = 64,
           intermediate: int = 96, vocab: int = 101) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=kv_heads,
                         max_position_embeddings=2048)
    return LlamaForCausalLM(config).to(dtype).eval()


def _inputs(batch: int, length: int, padded: bool, vocab: int = 101) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(1, vocab, (batch, length))
    if not padded:
        return ids, None
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, : length // 3] = 0  # left padding in row 0
    return ids, mask


def _explain(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return fastgim.explain(model, ids, attention_mask=mask, baseline_token_id=0, target_token_id=5)


TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.mark.parametrize(("batch", "padded"), [(1, False), (3, True)])
@pytest.mark.parametrize("length", [1, 37])
@pytest.mark.parametrize("kv_heads", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explain_with_checkpointing_equals_without(dtype: torch.dtype, kv_heads: int, length: int, batch: int,
                                                   padded: bool) -> None:
    if padded and length == 1:
        pytest.skip("a one-token row cannot be padded")
    model = _model(dtype, kv_heads=kv_heads)
    ids, mask = _inputs(batch, length, padded)
    plain = _explain(model, ids, mask)
    with checkpoint_layers(model):
        checkpointed = _explain(model, ids, mask)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(checkpointed, plain, rtol=tolerance, atol=tolerance * plain.abs().max())
    assert not any("forward" in block.__dict__ for block in transformer_blocks(model))


def test_explain_checkpoint_keyword_equals_context() -> None:
    if "checkpoint" not in inspect.signature(fastgim.explain).parameters:
        pytest.skip("fastgim.explain has no checkpoint= keyword yet (use `with checkpoint_layers(model)`)")
    model = _model()
    ids, _ = _inputs(1, 29, False)
    with checkpoint_layers(model):
        expected = _explain(model, ids, None)
    actual = fastgim.explain(model, ids, baseline_token_id=0, target_token_id=5, checkpoint=True)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("length", [1, 97])
def test_plain_gradients_unchanged(length: int) -> None:
    model = _model(torch.float64)
    ids, _ = _inputs(2, length, False)

    def embedding_grad() -> torch.Tensor:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb).logits[:, -1].logsumexp(-1).sum().backward()
        return emb.grad

    expected = embedding_grad()
    with checkpoint_layers(model):
        actual = embedding_grad()
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_restores_forwards_after_an_error() -> None:
    model = _model()
    blocks = list(transformer_blocks(model))
    assert len(blocks) == 3
    with pytest.raises(RuntimeError, match="boom"), checkpoint_layers(model):
        assert all("forward" in block.__dict__ for block in blocks)
        raise RuntimeError("boom")
    assert not any("forward" in block.__dict__ for block in blocks)


def test_disabled_is_a_no_op_nesting_shares_the_patch_and_a_foreign_patch_is_refused() -> None:
    model = _model()
    blocks = transformer_blocks(model)
    with checkpoint_layers(model, enabled=False) as same:
        assert same is model and not any("forward" in b.__dict__ for b in blocks)
    with checkpoint_layers(model):
        patched = [b.__dict__["forward"] for b in blocks]
        with checkpoint_layers(model):
            assert [b.__dict__["forward"] for b in blocks] == patched
        assert [b.__dict__["forward"] for b in blocks] == patched  # the outer block still checkpoints
    assert not any("forward" in block.__dict__ for block in blocks)
    blocks[1].forward = blocks[1].forward  # someone else's instance forward
    with pytest.raises(RuntimeError, match="already patched"), checkpoint_layers(model):
        pass
    assert "forward" not in blocks[0].__dict__ and "forward" in blocks[1].__dict__


def test_kv_cache_is_off_inside_and_an_explicit_cache_is_refused() -> None:
    model = _model()
    assert model.config.use_cache
    ids, _ = _inputs(1, 4, False)
    with checkpoint_layers(model):
        assert model(ids).past_key_values is None or len(model(ids).past_key_values) == 0
        with pytest.raises(RuntimeError, match="use_cache=False"):
            model(ids, use_cache=True)
    assert model.config.use_cache is True


def test_calls_outside_the_block_keep_their_cache_and_run_unpatched() -> None:
    model = _model()
    ids, _ = _inputs(1, 4, False)
    seen: list = []
    with checkpoint_layers(model):
        assert model.config.use_cache is True  # the config is shared with other threads: never changed
        outside = threading.Thread(target=lambda: seen.append(model(ids).past_key_values))
        outside.start()
        outside.join()
    assert seen[0] is not None and len(seen[0]) > 0, "a call outside the block keeps its cache"


def test_unknown_model_is_an_error_naming_it() -> None:
    with pytest.raises(TypeError, match="Sequential"), checkpoint_layers(nn.Sequential(nn.Linear(2, 2))):
        pass


# --------------------------------------------------------------------------- memory


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if platform.system() == "Linux" and name else None


def _peak_growth(fn) -> int:
    """Bytes the resident set grew to at its peak during ``fn()`` (Linux: VmHWM reset via clear_refs)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    with open("/proc/self/statm") as handle:
        before = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    fn()
    with open("/proc/self/status") as handle:
        peak = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    return peak - before


def test_checkpointing_lowers_peak_memory() -> None:
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        pytest.skip("needs glibc (mallopt) so that freed tensors leave the resident set")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks by mmap, returned to the OS on free
    model = _model(layers=6, hidden=256, intermediate=1024, vocab=256)
    ids = torch.randint(1, 256, (1, 512))
    explain = lambda: fastgim.explain(model, ids, baseline_token_id=0, target_token_id=5)
    explain()  # warm-up: lazy imports and caches
    plain = _peak_growth(explain)

    def checkpointed() -> None:
        with checkpoint_layers(model):
            explain()

    low = _peak_growth(checkpointed)
    # MLP activations alone are 6 layers x 3 x 512 x 1024 x 4 B = 36 MiB without checkpointing.
    assert plain > 24 * 2**20, f"the model is too small to show the saving ({plain / 2**20:.1f} MiB)"
    assert low < 0.6 * plain, f"checkpointed peak {low / 2**20:.1f} MiB vs plain {plain / 2**20:.1f} MiB"


def test_recomputation_on_another_thread_keeps_the_gim_settings() -> None:
    """On CUDA the recomputation runs on an autograd worker thread, where the context variables set
    around the forward (GIM settings, head gates) are unset; emulate that with a fresh thread."""
    import threading

    torch.manual_seed(0)
    model = _model(torch.float64)
    for layer in model.model.layers:  # sharp attention, so the temperature visibly matters
        layer.self_attn.q_proj.weight.data.mul_(20)
    ids = torch.randint(1, 101, (1, 23))

    def gradient(checkpoint: bool, settings: dict) -> torch.Tensor:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with fastgim.GIM(model, **settings), checkpoint_layers(model, enabled=checkpoint):
            score = model(inputs_embeds=emb, use_cache=False).logits[0, -1, 5]
            result = {}
            worker = threading.Thread(target=lambda: result.update(grad=torch.autograd.grad(score, emb)[0]))
            worker.start()
            worker.join()
        return result["grad"]

    gim = gradient(False, {})
    torch.testing.assert_close(gradient(True, {}), gim, rtol=1e-10, atol=1e-12)
    plain = gradient(False, {"softmax_temperature": None})
    assert (plain - gim).abs().max() > 1e-6 * gim.abs().max(), "the temperature must change the gradient"

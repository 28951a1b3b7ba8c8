"""A model loaded with accelerate's ``device_map`` (dispatched, possibly offloaded) explains like the plain one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fastgim

accelerate = pytest.importorskip("accelerate", reason="device_map loading needs accelerate (pip install accelerate)")

VOCAB = 113


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GQA Llama saved with save_pretrained (safetensors)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def _load(path: Path, tmp_path: Path, placement: str) -> LlamaForCausalLM:
    if placement == "plain":
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if placement == "auto":
        kwargs = {"device_map": "auto"}
    else:  # layers 1 and 2 offloaded to disk: accelerate's hooks load their weights at each forward
        kwargs = {"device_map": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                                 "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu",
                                 "lm_head": "cpu"},
                  "offload_folder": str(tmp_path / "offload")}
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    except (ValueError, RuntimeError, ImportError, TypeError) as error:
        pytest.skip(f"accelerate {accelerate.__version__} cannot load this model with {kwargs}: {error}")
    if placement != "auto":  # on a CPU-only machine "auto" may keep everything in place, undispatched
        assert getattr(model, "hf_device_map", None), "from_pretrained ignored device_map"
    return model.eval()


def _explain(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return fastgim.explain(model, ids, attention_mask=mask, baseline_token_id=0, target_token_id=3)


@pytest.mark.parametrize(("batch", "length", "padded"), [(1, 1, False), (1, 31, False), (2, 17, True)])
@pytest.mark.parametrize("placement", ["auto", "disk-offload"])
def test_device_map_explains_like_plain(checkpoint_dir: Path, tmp_path: Path, placement: str, batch: int,
                                        length: int, padded: bool) -> None:
    plain = _load(checkpoint_dir, tmp_path, "plain")
    mapped = _load(checkpoint_dir, tmp_path, placement)
    if placement == "disk-offload":
        assert "disk" in set(mapped.hf_device_map.values())
    ids = torch.randint(1, VOCAB, (batch, length))
    mask = None
    if padded:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[1, :5] = 0
    expected = _explain(plain, ids, mask)
    actual = _explain(mapped, ids, mask)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()) + 1e-12)
    assert torch.isfinite(actual).all() and actual.abs().max() > 0

"""Record inteprelens 0.2.1's data utilities on fixed inputs, for tests/test_inteprelens_data_parity.py.

Run ONCE in a separate environment holding the real inteprelens (not fastgim's), e.g.::

    python -m venv /tmp/ilens && /tmp/ilens/bin/pip install torch==2.13.0 inteprelens==0.2.1
    /tmp/ilens/bin/python scripts/record_inteprelens_data_fixture.py python/fastgim/default_model tests/fixtures

It writes ``inteprelens_0_2_1_data.pt`` (nested dicts of tensors, numbers and strings that
``torch.load(..., weights_only=True)`` reads): the inputs it used and inteprelens' results for

* the signatures of every public method of TensorDict, TensorDictDataset, MaskedSequenceDataset and
  CHGDataset;
* ``TensorDict``: cat / stack (with and without padding), indexing, update, map, partition,
  the tensor methods forwarded to every field, memory_bytes(_str), repr, and the file ``save`` writes;
* ``MaskedSequenceDataset`` with right and with left padding: len, indexing, collate_fn, map,
  to_dataloader and seeded to_iterator batches;
* ``CHGDataset.from_tsv`` (both ``last_token_only`` modes, custom columns, ``max_samples``) and
  ``from_concatenated_texts`` with the bundled model's tokenizer;
* the left-padding case: ``CHG.get_logp`` of the same rows right- and left-padded, and a short
  seeded ``CHGTrainer`` run on each.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

PAD = 3  # the bundled tokenizer's pad id
TSV = ("prompt\ttarget\nThe capital of France is\tParis\n2 + 2 equals\t4\nThe sky is\tblue\n"
       "Water freezes at zero\tdegrees Celsius\n")
SAME_LENGTH_TSV = "prompt\ttarget\n a^ b^ a c^ d^\t c\n e^ f^ e g^ h^\t g\n k^ l^ k m^ n^\t m\n"
QA_TSV = "question\tanswer\tignored\nWho wrote Hamlet?\tShakespeare\tx\nWhat is 3 * 3?\t9\ty\nRed or blue?\tred\tz\n"
TRAIN_TEXTS = ["The capital of France is", "2 + 2 equals", "The largest planet of the solar system is"]
TRAIN_TARGETS = ["Paris", "4", "Jupiter"]
FORWARDED = {  # method: (source TensorDict, args, kwargs)
    "abs": ("signed", (), {}), "bfloat16": ("signed", (), {}), "bool": ("signed", (), {}),
    "byte": ("positive", (), {}), "clone": ("signed", (), {}), "contiguous": ("signed", (), {}),
    "cpu": ("signed", (), {}), "detach": ("signed", (), {}), "double": ("signed", (), {}),
    "float": ("positive", (), {}), "half": ("signed", (), {}), "int": ("positive", (), {}),
    "log_softmax": ("signed", (-1,), {}), "long": ("positive", (), {}), "mean": ("signed", (0,), {}),
    "permute": ("signed", (1, 0), {}), "relu": ("signed", (), {}), "short": ("positive", (), {}),
    "softmax": ("signed", (), {"dim": -1}), "sqrt": ("positive", (), {}), "squeeze": ("unit", (1,), {}),
    "sum": ("signed", (), {"dim": 1}), "tanh": ("signed", (), {}), "to": ("signed", (torch.float64,), {}),
    "transpose": ("signed", (0, 1), {}), "unsqueeze": ("signed", (1,), {}),
}


def plain(value):
    """TensorDicts (and their subclasses) as nested dicts of tensors; lists and dicts recursively."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def tensordict_inputs() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "a": {"x": torch.randn(3, 4, generator=g), "y": torch.randint(0, 9, (3,), generator=g),
              "nested": {"z": torch.randn(3, 2, generator=g)}},
        "b": {"x": torch.randn(2, 5, generator=g), "y": torch.randint(0, 9, (2,), generator=g),
              "nested": {"z": torch.randn(2, 3, generator=g)}},
        "rows": {"x": torch.randn(7, 2, generator=g), "y": torch.arange(7)},
        "signed": {"x": torch.randn(3, 4, generator=g), "nested": {"z": torch.randn(3, 4, generator=g)}},
        "positive": {"x": 5 * torch.rand(3, 4, generator=g), "nested": {"z": 5 * torch.rand(3, 4, generator=g)}},
        "unit": {"x": torch.randn(3, 1, 4, generator=g), "nested": {"z": torch.randn(2, 1, generator=g)}},
    }


def record_tensordict() -> dict:
    from inteprelens.utils.tensor_dict import TensorDict

    inputs = tensordict_inputs()
    td = {name: TensorDict(**value) for name, value in inputs.items()}
    a, b, rows = td["a"], td["b"], td["rows"]
    updated = TensorDict(**inputs["rows"])
    updated.update({"w": torch.ones(7), "nested": {"q": torch.zeros(2)}, "n": 5})
    with tempfile.TemporaryDirectory() as tmp:
        a.save(f"{tmp}/a.pt")
        saved = torch.load(f"{tmp}/a.pt", weights_only=True)
        loaded = TensorDict.load(f"{tmp}/a.pt").to_dict()
    return {
        "inputs": inputs,
        "cat_pad": plain(TensorDict.cat([a, b], dim=0, pad_value=-1.0)),
        "cat_dim1_pad": plain(TensorDict.cat([td["signed"], td["signed"][:2]], dim=1, pad_value=0.5)),
        "cat_rows": plain(TensorDict.cat([rows[:3], rows[5:]])),
        "stack_pad": plain(TensorDict.stack([a, b], dim=0, pad_value=7.0)),
        "stack_dim1": plain(TensorDict.stack([a, a.map(lambda t: t + 1)], dim=1)),
        "getitem_int": plain(a[1]), "getitem_slice": plain(rows[2:5]), "getitem_keys": plain(a[["y", "x"]]),
        "getitem_tensor": plain(rows[torch.tensor([6, 0, 3])]),
        "keys": list(a.keys()), "attribute_x": a.x, "len": len(a),
        "update": plain(updated),
        "map": plain(a.map(lambda t: t * 2 + 1)),
        "partition_counts": plain(rows.partition([3, 2])),
        "partition_fractions_remainder": plain(rows.partition([0.5, 0.25], seed=3, drop_remainder=False)),
        "memory_bytes": a.memory_bytes(), "memory_bytes_rows": rows.memory_bytes(),
        "memory_bytes_str": [a.memory_bytes_str(), a.memory_bytes_str(precision=3, unit="b"),
                             a.memory_bytes_str(precision=0, unit="KB"), TensorDict(x=torch.zeros(1000)).memory_bytes_str()],
        "repr": repr(a), "repr_rows": repr(rows),
        "saved": saved, "loaded": loaded,
        "forwarded": FORWARDED,
        "methods": {name: plain(getattr(td[src], name)(*args, **kwargs)) for name, (src, args, kwargs) in FORWARDED.items()},
    }


def sequence_inputs(pad_right: bool) -> dict:
    """5 rows of real lengths 4, 6, 3, 5, 2 in width 7, padded with PAD on the right or left, plus extra fields."""
    g = torch.Generator().manual_seed(1)
    lengths = [4, 6, 3, 5, 2]
    ids = torch.full((5, 7), PAD)
    masks = torch.zeros(5, 7, dtype=torch.bool)
    weights = torch.zeros(5, 7)
    for row, n in enumerate(lengths):
        cols = slice(0, n) if pad_right else slice(7 - n, 7)
        ids[row, cols] = torch.randint(4, 50, (n,), generator=g)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[-min(2, n - 1):] = True
        masks[row, cols] = mask
        weights[row, cols] = torch.rand(n, generator=g)
    return {"input_ids": ids, "loss_masks": masks, "weights": weights, "label": torch.arange(5) * 10,
            "other": torch.randn(5, 3, generator=g)}


def record_masked_sequence(pad_right: bool) -> dict:
    from inteprelens.utils.ds import MaskedSequenceDataset

    inputs = sequence_inputs(pad_right)
    ds = MaskedSequenceDataset(PAD, pad_right, **inputs)
    mapped = ds.map(lambda t: t[1:4])
    torch.manual_seed(0)
    iterator = ds.to_iterator(batch_size=2, shuffle=True)
    batches = [plain(next(iterator)) for _ in range(5)]
    return {
        "inputs": inputs, "len": len(ds), "item": plain(ds[1]), "items_slice": plain(ds[1:3]),
        "fields": plain(ds[["input_ids", "label"]]), "keys": list(ds.keys()),
        "collate_some": plain(ds.collate_fn([ds[i] for i in (0, 2, 4)])),
        "collate_long": plain(ds.collate_fn([ds[i] for i in (1, 3)])),
        "collate_all": plain(ds.collate_fn([ds[i] for i in range(5)])),
        "map": {"fields": plain(mapped), "pad_token_id": mapped.pad_token_id, "pad_right": mapped.pad_right,
                "type": type(mapped).__name__},
        "iterator": batches,
        "dataloader": [plain(b) for b in ds.to_dataloader(batch_size=3)],
        "repr": repr(ds),
    }


def record_chg_dataset(model_dir: str) -> dict:
    from inteprelens.utils.ds import CHGDataset
    from transformers import AutoTokenizer

    def tokenizer():  # inteprelens' from_texts adds its separator token to the tokenizer: a fresh one each time
        return AutoTokenizer.from_pretrained(model_dir)

    out = {"tsv": TSV, "same_length_tsv": SAME_LENGTH_TSV, "qa_tsv": QA_TSV}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("pairs", TSV), ("same_length", SAME_LENGTH_TSV), ("qa", QA_TSV)):
            Path(tmp, f"{name}.tsv").write_text(text, encoding="utf-8")
        cases = {
            "from_tsv": CHGDataset.from_tsv(f"{tmp}/pairs.tsv", tokenizer()),
            "from_tsv_max_samples": CHGDataset.from_tsv(f"{tmp}/pairs.tsv", tokenizer(), max_samples=2),
            "from_tsv_last_token": CHGDataset.from_tsv(f"{tmp}/same_length.tsv", tokenizer(), last_token_only=True),
            "from_tsv_columns": CHGDataset.from_tsv(f"{tmp}/qa.tsv", tokenizer(), prompt_column="question",
                                                    target_column="answer", max_samples=2),
        }
    texts = [" x^ y^ x y", " g^ h^ g h", " m^ n^ m n"]
    cases["from_concatenated_texts"] = CHGDataset.from_concatenated_texts(texts, tokenizer())
    out["concatenated_texts"] = texts
    for name, ds in cases.items():
        out[name] = {"fields": plain(ds), "pad_token_id": ds.pad_token_id, "pad_right": ds.pad_right,
                     "type": type(ds).__name__}
    return out


def left_padded(input_ids: torch.Tensor, loss_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows with the padding after each row's last target token moved in front of it."""
    ids, masks = torch.full_like(input_ids, PAD), torch.zeros_like(loss_masks)
    width = input_ids.shape[1]
    for row in range(input_ids.shape[0]):
        n = int(loss_masks[row].nonzero().max()) + 1
        ids[row, width - n:], masks[row, width - n:] = input_ids[row, :n], loss_masks[row, :n]
    return ids, masks


def record_left_padding(model_dir: str) -> dict:
    from inteprelens import CHG, CHGTrainer, LensAPI
    from inteprelens.utils.ds import CHGDataset, MaskedSequenceDataset

    analyzer = LensAPI.from_pretrained(model_dir)
    right = CHGDataset.from_texts(TRAIN_TEXTS, TRAIN_TARGETS, analyzer.tokenizer)
    ids, masks = left_padded(right["input_ids"], right["loss_masks"])
    chg = CHG(analyzer.model)
    gates = torch.rand(2, chg.num_layers, chg.num_heads, generator=torch.Generator().manual_seed(2))
    out = {"right": {"input_ids": right["input_ids"], "loss_masks": right["loss_masks"]},
           "left": {"input_ids": ids, "loss_masks": masks}, "gates": gates}
    with torch.no_grad():
        for side in ("right", "left"):
            out[f"{side}_logp"] = chg.get_logp(gates, out[side]["input_ids"], out[side]["loss_masks"], agg="mean")
    for side in ("right", "left"):
        data = MaskedSequenceDataset(right.pad_token_id, side == "right", **out[side])
        torch.manual_seed(0)
        trainer = CHGTrainer(LensAPI.from_pretrained(model_dir).model, data, num_masks=2, batch_size=3)
        out[f"{side}_gates"] = torch.stack([m for m, _ in trainer.fit_stage("none", 3, show_progress=False)])
    return out


def signatures() -> dict:
    """``[name, kind, repr(default)]`` per parameter of every public callable of the two modules."""
    from inteprelens.utils import ds, tensor_dict
    from record_inteprelens_fixture import signature_of  # this folder is on sys.path when run as a script

    out = {}
    for cls in (tensor_dict.TensorDict, ds.TensorDictDataset, ds.MaskedSequenceDataset, ds.CHGDataset):
        for name in sorted(set(dir(cls)) - (set(dir(object)) - {"__init__"})):
            member = getattr(cls, name)
            if callable(member) and (not name.startswith("_") or name in ("__init__", "__getitem__", "__len__")):
                out[f"{cls.__name__}.{name}"] = signature_of(member)
    return out


def main(model_dir: str, out_dir: str) -> None:
    import inteprelens

    record = {
        "inteprelens_version": inteprelens.__version__, "torch_version": str(torch.__version__),
        "signatures": signatures(),
        "tensordict": record_tensordict(),
        "masked_sequence_right": record_masked_sequence(pad_right=True),
        "masked_sequence_left": record_masked_sequence(pad_right=False),
        "chg_dataset": record_chg_dataset(model_dir),
        "left_padding": record_left_padding(model_dir),
    }
    out = Path(out_dir) / "inteprelens_0_2_1_data.pt"
    torch.save(record, out)
    torch.load(out, weights_only=True)  # the test reads it this way
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main(*sys.argv[1:3])

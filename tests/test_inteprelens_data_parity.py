"""inteprelens 0.2.1's data utilities on fastgim: TensorDict, TensorDictDataset, MaskedSequenceDataset, CHGDataset.

The reference values were recorded ONCE with the real inteprelens 0.2.1 by
``scripts/record_inteprelens_data_fixture.py`` (``tests/fixtures/inteprelens_0_2_1_data.pt``, with the
inputs it used); inteprelens is not needed here. Data operations are compared exactly (values and
dtypes). The one place fastgim differs on purpose, training on left-padded rows, is shown against the
recording: inteprelens' loss of a row changes with its left padding, fastgim's equals the right-padded loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fastgim
from fastgim import CHG, CHGDataset, CHGTrainer, LensAPI, MaskedSequenceDataset
from fastgim.default_model import DEFAULT_MODEL_DIR
from fastgim.inteprelens.utils import ds as ds_module
from fastgim.inteprelens.utils import tensor_dict as tensor_dict_module
from fastgim.tensordict import TensorDict, TensorDictDataset

FIXTURES = Path(__file__).parent / "fixtures"
RECORD = torch.load(FIXTURES / "inteprelens_0_2_1_data.pt", weights_only=True)
TD = RECORD["tensordict"]
MODEL = str(DEFAULT_MODEL_DIR)
PAD = 3
FORWARDED = TD["forwarded"]  # method: (source TensorDict, args, kwargs), as recorded


def as_plain(value):
    """TensorDicts as nested dicts; lists recursively (the recording's form)."""
    if isinstance(value, TensorDict):
        return value.to_dict()
    return [as_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def assert_equal(got, want, where: str = "") -> None:
    """Same nesting, keys in the same order, tensors equal in value, dtype and shape."""
    got = as_plain(got)
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: {type(got).__name__}"
        assert got.dtype == want.dtype and torch.equal(got, want), f"{where}: {got} vs {want}"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)} vs {list(want)}"
        for key in want:
            assert_equal(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} items vs {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_equal(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} vs {want!r}"


def tds() -> dict[str, TensorDict]:
    return {name: TensorDict(**value) for name, value in TD["inputs"].items()}


@pytest.fixture(scope="module")
def tokenizer():
    return LensAPI.from_pretrained(MODEL).tokenizer


# --------------------------------------------------------------------------- names and signatures


def test_module_paths_hold_fastgim_objects():
    assert tensor_dict_module.TensorDict is TensorDict
    assert ds_module.TensorDictDataset is TensorDictDataset
    assert ds_module.MaskedSequenceDataset is fastgim.MaskedSequenceDataset is MaskedSequenceDataset
    assert ds_module.CHGDataset is fastgim.CHGDataset
    assert issubclass(MaskedSequenceDataset, TensorDictDataset) and issubclass(CHGDataset, TensorDictDataset)


# Signatures: tests/test_inteprelens_api.py checks every inteprelens signature, these classes' included.


# --------------------------------------------------------------------------- TensorDict


@pytest.mark.parametrize("case", ["cat_pad", "cat_dim1_pad", "cat_rows", "stack_pad", "stack_dim1", "getitem_int",
                                  "getitem_slice", "getitem_keys", "getitem_tensor", "map", "update"])
def test_tensordict_operations(case: str):
    t = tds()
    a, b, rows = t["a"], t["b"], t["rows"]
    updated = TensorDict(**TD["inputs"]["rows"])
    updated.update({"w": torch.ones(7), "nested": {"q": torch.zeros(2)}, "n": 5})
    results = {
        "cat_pad": lambda: TensorDict.cat([a, b], dim=0, pad_value=-1.0),
        "cat_dim1_pad": lambda: TensorDict.cat([t["signed"], t["signed"][:2]], dim=1, pad_value=0.5),
        "cat_rows": lambda: TensorDict.cat([rows[:3], rows[5:]]),
        "stack_pad": lambda: TensorDict.stack([a, b], dim=0, pad_value=7.0),
        "stack_dim1": lambda: TensorDict.stack([a, a.map(lambda x: x + 1)], dim=1),
        "getitem_int": lambda: a[1], "getitem_slice": lambda: rows[2:5], "getitem_keys": lambda: a[["y", "x"]],
        "getitem_tensor": lambda: rows[torch.tensor([6, 0, 3])],
        "map": lambda: a.map(lambda x: x * 2 + 1), "update": lambda: updated,
    }
    assert_equal(results[case](), TD[case], case)


@pytest.mark.parametrize("method", sorted(FORWARDED))
def test_tensor_methods_reach_every_field(method: str):
    source, args, kwargs = FORWARDED[method]
    result = getattr(tds()[source], method)(*args, **kwargs)
    assert type(result) is TensorDict
    assert_equal(result, TD["methods"][method], method)


def test_tensordict_mapping_partition_memory_and_files(tmp_path):
    t = tds()
    a, rows = t["a"], t["rows"]
    assert list(a.keys()) == TD["keys"] and len(a) == TD["len"] and torch.equal(a.x, TD["attribute_x"])
    assert a.get("missing") is None and "x" in a and dict(a.items())["y"] is a["y"]
    assert_equal(rows.partition([3, 2]), TD["partition_counts"], "counts")
    assert_equal(rows.partition([0.5, 0.25], seed=3, drop_remainder=False), TD["partition_fractions_remainder"], "fr")
    assert a.memory_bytes() == TD["memory_bytes"] and rows.memory_bytes() == TD["memory_bytes_rows"]
    strings = [a.memory_bytes_str(), a.memory_bytes_str(precision=3, unit="b"),
               a.memory_bytes_str(precision=0, unit="KB"), TensorDict(x=torch.zeros(1000)).memory_bytes_str()]
    assert strings == TD["memory_bytes_str"]
    assert repr(a) == TD["repr"] and repr(rows) == TD["repr_rows"]
    a.save(tmp_path / "a.pt")
    assert_equal(torch.load(tmp_path / "a.pt", weights_only=True), TD["saved"], "saved")
    assert_equal(TensorDict.load(tmp_path / "a.pt"), TD["loaded"], "loaded")
    torch.save(TD["saved"], tmp_path / "theirs.pt")  # what inteprelens' save wrote
    assert_equal(TensorDict.load(tmp_path / "theirs.pt", map_location="cpu"), TD["loaded"], "theirs")
    pieces = [t["signed"], t["signed"][:2]]  # a negative dim is the same dim (inteprelens pads it as well)
    assert_equal(TensorDict.cat(pieces, dim=-1, pad_value=0.5), TD["cat_dim1_pad"], "cat dim=-1")
    a.y = torch.zeros(3, dtype=torch.long)
    del a["nested"]
    assert a.y.sum() == 0 and list(a) == ["x", "y"]


# --------------------------------------------------------------------------- MaskedSequenceDataset


@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_sequence_dataset_matches_inteprelens(side: str):
    record = RECORD[f"masked_sequence_{side}"]
    ds = MaskedSequenceDataset(PAD, side == "right", **record["inputs"])
    assert len(ds) == record["len"] and list(ds.keys()) == record["keys"] and repr(ds) == record["repr"]
    assert_equal(ds[1], record["item"], "item")
    assert_equal(ds[1:3], record["items_slice"], "slice")
    assert_equal(ds[["input_ids", "label"]], record["fields"], "fields")
    for name, rows in (("collate_some", (0, 2, 4)), ("collate_long", (1, 3)), ("collate_all", range(5))):
        assert_equal(ds.collate_fn([ds[i] for i in rows]), record[name], name)
    mapped = ds.map(lambda t: t[1:4])
    assert_equal(mapped, record["map"]["fields"], "map")
    assert (type(mapped).__name__, mapped.pad_token_id, mapped.pad_right) == (
        record["map"]["type"], record["map"]["pad_token_id"], record["map"]["pad_right"])
    torch.manual_seed(0)
    iterator = ds.to_iterator(batch_size=2, shuffle=True)
    assert_equal([next(iterator) for _ in range(5)], record["iterator"], "to_iterator")
    assert_equal(list(ds.to_dataloader(batch_size=3)), record["dataloader"], "to_dataloader")


@pytest.mark.parametrize("side", ["right", "left"])
def test_masked_sequence_training_batches_are_right_aligned(side: str):
    """CHG batches: the rows moved to the left edge, cut after the last target; the same for both paddings."""
    inputs = RECORD[f"masked_sequence_{side}"]["inputs"]
    reference = RECORD["masked_sequence_right"]["inputs"]
    ds = MaskedSequenceDataset(PAD, side == "right", **inputs)
    batch = ds.batch(torch.tensor([0, 3]))
    assert torch.equal(batch["input_ids"], reference["input_ids"][[0, 3], :5])
    assert torch.equal(batch["loss_masks"], reference["loss_masks"][[0, 3], :5])
    first = next(ds.training_batches(5, shuffle=False))
    assert torch.equal(first["input_ids"], reference["input_ids"][:, :6])
    assert torch.equal(ds.lengths, torch.tensor([4, 6, 3, 5, 2]))


# --------------------------------------------------------------------------- CHGDataset factories


@pytest.mark.parametrize("case", ["from_tsv", "from_tsv_max_samples", "from_tsv_last_token", "from_tsv_columns",
                                  "from_concatenated_texts"])
def test_chg_dataset_factories_match_inteprelens(case: str, tokenizer, tmp_path):
    record = RECORD["chg_dataset"]
    for name, key in (("pairs", "tsv"), ("same_length", "same_length_tsv"), ("qa", "qa_tsv")):
        (tmp_path / f"{name}.tsv").write_text(record[key], encoding="utf-8")
    vocabulary = len(tokenizer)
    build = {
        "from_tsv": lambda: CHGDataset.from_tsv(tmp_path / "pairs.tsv", tokenizer, tokenization="inteprelens"),
        "from_tsv_max_samples": lambda: CHGDataset.from_tsv(tmp_path / "pairs.tsv", tokenizer, max_samples=2,
                                                            tokenization="inteprelens"),
        "from_tsv_last_token": lambda: CHGDataset.from_tsv(tmp_path / "same_length.tsv", tokenizer,
                                                           last_token_only=True),
        "from_tsv_columns": lambda: CHGDataset.from_tsv(tmp_path / "qa.tsv", tokenizer, prompt_column="question",
                                                        target_column="answer", max_samples=2,
                                                        tokenization="inteprelens"),
        "from_concatenated_texts": lambda: CHGDataset.from_concatenated_texts(record["concatenated_texts"],
                                                                              tokenizer),
    }
    data = build[case]()
    assert type(data) is MaskedSequenceDataset and isinstance(data, CHGDataset)  # inteprelens' return type
    assert_equal(data, record[case]["fields"], case)
    assert (data.pad_token_id, data.pad_right) == (record[case]["pad_token_id"], record[case]["pad_right"])
    assert len(tokenizer) == vocabulary  # inteprelens adds its separator to the caller's tokenizer; fastgim does not
    as_inteprelens = MaskedSequenceDataset(data.pad_token_id, **{k: data[k] for k in data.keys()})
    for dataset in (data, as_inteprelens):  # built by hand: the same DataLoader batches
        torch.manual_seed(0)
        batches = [next(iterator) for iterator in [dataset.to_iterator(batch_size=2, shuffle=True)] for _ in range(3)]
        if dataset is data:
            ours = batches
    assert_equal(ours, [{k: v for k, v in b.items()} for b in batches], f"{case} to_iterator")


def test_from_tsv_default_tokenization_is_from_texts(tokenizer, tmp_path):
    (tmp_path / "pairs.tsv").write_text(RECORD["chg_dataset"]["tsv"], encoding="utf-8")
    data = CHGDataset.from_tsv(str(tmp_path / "pairs.tsv"), tokenizer)
    same = CHGDataset.from_texts(["The capital of France is", "2 + 2 equals", "The sky is", "Water freezes at zero"],
                                 ["Paris", "4", "blue", "degrees Celsius"], tokenizer)
    assert torch.equal(data.input_ids, same.input_ids) and torch.equal(data.loss_masks, same.loss_masks)
    assert data.input_ids[0, 0] == tokenizer.bos_token_id  # fastgim's tokenisation: BOS, no separator token


def test_from_concatenated_texts_of_different_lengths_supervise_each_last_token(tokenizer):
    texts = [" x^ y^ x y", " p^ q^ p q", "Hello there"]
    data = CHGDataset.from_concatenated_texts(texts, tokenizer)
    for row, text in enumerate(texts):
        ids = tokenizer(text)["input_ids"]
        assert data.input_ids[row, : len(ids)].tolist() == ids
        assert data.loss_masks[row].nonzero().flatten().tolist() == [len(ids) - 1]
        assert (data.input_ids[row, len(ids):] == data.pad_token_id).all()


# --------------------------------------------------------------------------- left padding in training


def test_left_padding_logp_is_the_right_padded_logp():
    """inteprelens attends to the left padding (its loss changes); fastgim's batches give the right-padded loss."""
    record = RECORD["left_padding"]
    assert (record["left_logp"] - record["right_logp"]).abs().max() > 1e-2  # inteprelens' loss moved
    left = MaskedSequenceDataset(PAD, False, **record["left"])
    right = MaskedSequenceDataset(PAD, True, **record["right"])
    rows = torch.arange(3)
    assert torch.equal(left.batch(rows)["input_ids"], right.batch(rows)["input_ids"])
    chg = CHG(LensAPI.from_pretrained(MODEL).model)
    batch = left.batch(rows)
    with torch.no_grad():
        logp = chg.get_logp(record["gates"], batch["input_ids"], batch["loss_masks"], agg="mean")
    torch.testing.assert_close(logp, record["right_logp"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("numerics", ["fastgim", "inteprelens"])
def test_trainer_on_left_padding_equals_right_padding(numerics: str):
    record = RECORD["left_padding"]
    gates = {}
    for side in ("right", "left"):
        data = MaskedSequenceDataset(PAD, side == "right", **record[side])
        torch.manual_seed(0)
        model = LensAPI.from_pretrained(MODEL).model
        trainer = CHGTrainer(model, data, num_masks=2, batch_size=3, numerics=numerics,
                             seed=0 if numerics == "fastgim" else None)
        gates[side] = torch.stack([m for m, _ in trainer.fit_stage("none", 3, show_progress=False)])
    assert torch.equal(gates["left"], gates["right"])
    if numerics == "inteprelens":  # tracks inteprelens on the right-padded rows; its left-padded run went elsewhere
        assert (gates["right"] - record["right_gates"]).abs().max() < 0.03
        assert (record["left_gates"] - record["right_gates"]).abs().max() > 0.3


def test_fit_dataset_on_left_padding_equals_right_padding():
    record = RECORD["left_padding"]
    analyzer = LensAPI.from_pretrained(MODEL)
    right, left = (analyzer.fit_dataset(MaskedSequenceDataset(PAD, side == "right", **record[side]), num_masks=2,
                                        num_updates=2, num_reg_updates=1, batch_size=2, verbose=False, seed=0)
                   for side in ("right", "left"))
    assert list(right.masks) == list(left.masks) and len(right.masks) == 3
    for stage in right.masks:
        assert torch.equal(right.masks[stage], left.masks[stage]), stage


def test_left_padding_reads_an_attention_mask_field():
    """With pad == the first real token, only an attention_mask tells padding from text."""
    ids = torch.tensor([[1, 1, 1, 7, 8, 9], [1, 5, 6, 7, 8, 9]])
    masks = torch.tensor([[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1]]).bool()
    attention = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    data = MaskedSequenceDataset(1, False, input_ids=ids, loss_masks=masks, attention_mask=attention)
    batch = data.batch(torch.arange(2))
    assert batch["input_ids"].tolist() == [[1, 7, 8, 9, 1, 1], [1, 5, 6, 7, 8, 9]]
    assert batch["loss_masks"][0].nonzero().flatten().tolist() == [3]
    assert MaskedSequenceDataset(1, False, input_ids=ids, loss_masks=masks).batch(torch.arange(1))["input_ids"].tolist() \
        == [[7, 8, 9]]  # without it the leading 1s all read as padding


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("call, error, match", [
    (lambda: TensorDict(x=torch.zeros(2), y=torch.zeros(2, device="meta")), ValueError, "same device"),
    (lambda: TensorDict.cat([]), ValueError, "at least one TensorDict"),
    (lambda: TensorDict.stack([TensorDict(x=torch.zeros(1)), TensorDict(y=torch.zeros(1))]), ValueError, "same keys"),
    (lambda: TensorDict.cat([TensorDict(x=torch.zeros(2)), TensorDict(x=torch.zeros(1, 2))], pad_value=0), ValueError,
     "different ranks"),
    (lambda: TensorDict(name="text"), TypeError, "'name': a str cannot become a tensor"),
    (lambda: setattr(TensorDict(x=torch.zeros(1)), "x", [1.0]), TypeError, "non-tensor"),
    (lambda: TensorDict(x=torch.zeros(4)).partition([1, 0.5]), ValueError, "all floats"),
    (lambda: TensorDict(x=torch.zeros(4)).partition([3, 2]), ValueError, "exceed dataset length 4"),
    (lambda: TensorDict(x=torch.zeros(4), y=torch.zeros(3)).partition([1]), ValueError, "same length along dim=0"),
    (lambda: TensorDict(x=torch.zeros(4)).memory_bytes_str(unit="PB"), ValueError, "Invalid unit"),
    (lambda: TensorDictDataset(x=torch.zeros(4), y=torch.zeros(3)).to_dataloader(), ValueError, "same first dim"),
    (lambda: MaskedSequenceDataset(PAD, loss_masks=torch.zeros(2, 3)), ValueError, "requires 'input_ids'"),
])
def test_bad_tensordict_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("fields, match", [
    ({"input_ids": torch.tensor([[5, 6, 7]])}, "no 'loss_masks' field"),
    ({"input_ids": torch.tensor([[3, 6, 7]]), "loss_masks": torch.tensor([[1, 0, 1]]).bool()}, "marks left padding"),
    ({"input_ids": torch.tensor([[3, 3, 3]]), "loss_masks": torch.tensor([[0, 0, 0]]).bool()}, "all padding"),
    ({"input_ids": torch.tensor([[3, 6, 7]]), "loss_masks": torch.tensor([[0, 0, 0]]).bool()}, "no target token"),
    ({"input_ids": torch.tensor([[3.0, 6, 7]]), "loss_masks": torch.tensor([[0, 0, 1]]).bool()}, "integer token ids"),
    ({"input_ids": torch.tensor([[3, 6, 7]]), "loss_masks": torch.tensor([[0, 1]]).bool()}, "both be"),
])
def test_untrainable_masked_sequence_dataset_is_named(fields, match):
    data = MaskedSequenceDataset(PAD, False, **fields)
    with pytest.raises((ValueError, TypeError), match=match):
        CHGTrainer(LensAPI.from_pretrained(MODEL).model, data)


def test_bad_factory_input_is_named(tokenizer, tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("question\tanswer\nWho?\tme\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no column 'prompt'; its header has \['question', 'answer'\]"):
        CHGDataset.from_tsv(path, tokenizer)
    with pytest.raises(ValueError, match="max_samples must be >= 1"):
        CHGDataset.from_tsv(path, tokenizer, "question", "answer", max_samples=0)
    (tmp_path / "empty.tsv").write_text("prompt\ttarget\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no data rows"):
        CHGDataset.from_tsv(tmp_path / "empty.tsv", tokenizer)
    with pytest.raises(TypeError, match="not a single string"):
        CHGDataset.from_concatenated_texts("a^ b^ a", tokenizer)
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        CHGDataset.from_concatenated_texts(["a b", ""], tokenizer)

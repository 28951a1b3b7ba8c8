"""Data-parallel, resumable attribution over a dataset (``torchrun`` / ``accelerate launch``).

Prompts are cut into fixed global batches (``batch_size`` consecutive prompts); batch
``b`` belongs to rank ``b % world_size``. Because the batches do not depend on the
number of ranks, a run on any number of processes gives the same numbers as a
single process. Each rank appends finished records to its own part file
(``<output>.part-<rank>.jsonl``), flushed and fsynced batch by batch, so a killed
job loses at most the batch in flight; on restart (with any world size) every
record already in any part file is skipped. When all ranks are done, rank 0 merges
the parts into ``output`` ordered by prompt index, each prompt exactly once.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastgim import manifest, validation

Record = dict[str, Any]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size: from torch.distributed, else torchrun's env, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` / ``accelerate launch`` describe in the environment.

    Returns True when a process group is active (already or newly). gloo on CPU, nccl on CUDA.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def _part_path(output: Path, rank: int) -> Path:
    return output.with_name(f"{output.name}.part-{rank}.jsonl")


def _read_records(paths: Sequence[Path | str]) -> dict[int, Record]:
    """Records by index from JSONL files; a torn last line (a killed writer) is ignored."""
    records: dict[int, Record] = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith("\n"):
                    break
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}:{number} is not a complete JSON record ({error}); the file was damaged. Delete "
                        "that line (or the whole part file, to recompute its prompts) and run again"
                    ) from error
                records.setdefault(int(record["index"]), record)
    return records


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line without its newline (a writer killed mid-record), so appends start on a fresh line."""
    if not path.exists():
        return
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return
        end = size
        while end > 0:
            start = max(0, end - (1 << 16))
            handle.seek(start)
            chunk = handle.read(end - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        if end != size:
            handle.truncate(end)
            handle.flush()
            os.fsync(handle.fileno())


def _existing_parts(output: Path) -> list[str]:
    return sorted(glob.glob(str(output.with_name(f"{output.name}.part-*.jsonl"))))


def _append(path: Path, records: Sequence[Record]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _check_output(output: Path) -> Path:
    """``output`` as a writable file path (its folder created); a directory is refused before any work."""
    if output.is_dir():
        raise ValueError(f"output {output} is a directory; pass a file path such as {output / 'attributions.jsonl'}")
    if output.parent.exists() and not output.parent.is_dir():
        raise ValueError(f"the folder of output {output} is a file; pass a path inside a directory")
    output.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(output.parent, os.W_OK):
        raise PermissionError(f"cannot write into {output.parent}; choose another output path")
    return output


def _check_explain_arguments(model: nn.Module, tokenizer: Any, explain_kwargs: dict[str, Any]) -> None:
    """What the built-in worker would refuse, refused before any compute (settings, token ids, tokenizer)."""
    from fastgim.settings import GIMSettings

    validation.require_tokenizer(tokenizer, "attribute_dataset's texts")
    fields = {field.name for field in dataclasses.fields(GIMSettings)}
    GIMSettings(**{k: v for k, v in explain_kwargs.items() if k in fields and k != "freeze_norm"})
    vocab = validation.vocabulary_size(model)
    for name in ("baseline_token_id", "target_token_id", "contrast_token_id"):
        value = explain_kwargs.get(name)
        if value is not None:  # one id for every prompt
            validation.token_id(value, vocab if vocab is not None else 2**63, name)


def _explain_batch(
    model: nn.Module, tokenizer: Any, texts: Sequence[str], explain_kwargs: dict[str, Any]
) -> list[Record]:
    from fastgim.explain import explain

    encoded = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    width = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):  # left padding: the last real token stays at position -1
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention_mask[row, width - len(ids):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1]
    targets = explain_kwargs.pop("target_token_id", None)
    if targets is None:
        targets = logits.argmax(dim=-1)
    else:
        targets = validation.row_token_ids(targets, len(encoded), logits.shape[-1], "target_token_id", device)
    scores = explain(
        model, input_ids, attention_mask=attention_mask, tokenizer=tokenizer, target_token_id=targets,
        **explain_kwargs,
    ).reshape(len(encoded), width)
    records = []
    for row, ids in enumerate(encoded):
        target_id = int(targets[row])
        records.append({
            "text": texts[row],
            "input_ids": ids,
            "tokens": tokenizer.convert_ids_to_tokens(ids),
            "scores": scores[row, width - len(ids):].float().cpu().tolist(),
            "target_token_id": target_id,
            "target_token": tokenizer.decode([target_id]),
        })
    return records


def attribute_dataset(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    output: str | os.PathLike,
    *,
    batch_size: int = 8,
    progress: bool = False,
    explain_fn: Callable[..., list[Record]] | None = None,
    method: str | None = None,
    **explain_kwargs: Any,
) -> list[Record]:
    """GIM attributions for ``texts``, data-parallel across ranks and resumable.

    Args:
        model, tokenizer: a ``gim_fused``-capable causal LM and its tokenizer. With
            ``device_map="auto"`` (accelerate) the model may span several GPUs.
        texts: the prompts; each is explained at its last token for the model's prediction.
        output: the merged JSONL file (one record per prompt, in order); part files live beside it.
        batch_size: prompts per forward/backward; also the unit of work split between ranks.
        progress: show a tqdm bar on each rank.
        explain_fn: replaces the per-batch worker ``(model, tokenizer, texts, kwargs) -> records``.
        method: the name of the attribution recorded in the manifest (default ``"explain"``, or the
            qualified name of ``explain_fn``); give the same name for workers that compute the same records.
        **explain_kwargs: passed to :func:`fastgim.explain` (GIM settings, ``baseline_token_id``...).

    Returns:
        The records of all prompts in order (every rank returns the full list). Each record has
        ``index``, ``text``, ``input_ids``, ``tokens``, ``scores`` (one per token), ``target_token_id``
        and ``target_token``.

    A manifest (``<output>.manifest.json``) records what the results are of: a hash of the texts, the
    settings, the method, the model (name, config and a weights fingerprint), the tokenizer and the
    fastgim version. A rerun resumes only when they match; otherwise it raises before any compute.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    texts = validation.texts(texts)
    output = _check_output(Path(output))
    if explain_fn is None:
        _check_explain_arguments(model, tokenizer, explain_kwargs)
    distributed = init_distributed()
    rank, world = rank_and_world()
    worker = explain_fn or _explain_batch
    expected = manifest.describe_run(
        model, tokenizer, texts, method or manifest.method_name(explain_fn), batch_size, explain_kwargs
    )
    if rank == 0 or not distributed:  # without a process group every rank claims (same content, atomic write)
        manifest.claim(output, expected, _read_records(_existing_parts(output)))
    if distributed:
        dist.barrier()
        manifest.check(output, expected)
    _cut_torn_tail(_part_path(output, rank))
    done = set(_read_records(_existing_parts(output)))
    batches = [range(start, min(start + batch_size, len(texts))) for start in range(0, len(texts), batch_size)]
    mine = [batch for number, batch in enumerate(batches) if number % world == rank]
    todo = [batch for batch in mine if not all(index in done for index in batch)]
    part = _part_path(output, rank)
    iterator = todo
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(todo, desc=f"rank {rank}", unit="batch")
    for batch in iterator:
        indices = [index for index in batch if index not in done]
        records = worker(model, tokenizer, [texts[index] for index in indices], dict(explain_kwargs))
        _append(part, [{"index": index, **record} for index, record in zip(indices, records)])
    if distributed:
        dist.barrier()
    if rank == 0:
        merged = _read_records(_existing_parts(output))
        missing = [index for index in range(len(texts)) if index not in merged]
        if missing:
            raise RuntimeError(f"attribution records missing for prompts {missing[:10]}; rerun to resume")
        tmp = output.with_name(output.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            for index in range(len(texts)):
                handle.write(json.dumps(merged[index]) + "\n")
        os.replace(tmp, output)
    if distributed:
        dist.barrier()
    return [json.loads(line) for line in open(output, encoding="utf-8")]

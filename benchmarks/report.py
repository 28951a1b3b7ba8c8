"""Turn the benchmark JSON in ``benchmarks/results/`` into PNG plots and a markdown table.

Reads every ``<suite>-<scale>.json`` written by the pytest-benchmark suites (``benchmarks/conftest.py``,
format ``fastgim-bench/1``; other JSON files are listed and skipped), and writes next to them:

* ``<suite>-<scale>-time.png`` and ``<suite>-<scale>-memory.png``: time and peak memory vs sequence
  length, one line per method, out-of-memory runs marked with an ``x`` on the top edge;
* ``README.md``: per file the device, versions and date, time and memory tables (method x N), the
  ratios that matter, and for the explain suite the GPU targets with PASS / FAIL / not measured.

usage: python benchmarks/report.py [--results-dir DIR] [--no-plots]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
FORMAT = "fastgim-bench/1"
MiB = 2**20
GPU_MEMORY_BUDGET = 80 * 2**30  # "one 80 GB GPU" (an H100 80GB has 80 GiB)

Result = dict[str, Any]


def load_results(directory: Path) -> tuple[list[Result], list[str]]:
    """``(results, skipped)``: the suite files in ``directory`` (sorted by name) and the other JSON names."""
    results, skipped = [], []
    for path in sorted(directory.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            skipped.append(path.name)
            continue
        if isinstance(payload, dict) and payload.get("format") == FORMAT:
            payload["path"] = path
            results.append(payload)
        else:
            skipped.append(path.name)
    return results, skipped


def memory_key(result: Result) -> str:
    """The memory figure plotted: all allocated memory on a GPU, growth of the resident set on a CPU."""
    return "peak_bytes" if result["environment"].get("device_type") == "cuda" else "peak_extra_bytes"


def _methods(rows: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(row["method"] for row in rows))


def _lengths(rows: Sequence[dict]) -> list[int]:
    return sorted({int(row["length"]) for row in rows})


def _cell(rows: Sequence[dict], method: str, length: int) -> dict | None:
    return next((r for r in rows if r["method"] == method and int(r["length"]) == length), None)


def _ok(row: dict | None, key: str) -> float | None:
    if row is None or row.get("status") != "ok" or row.get(key) is None:
        return None
    return float(row[key])


# --------------------------------------------------------------------------- plots


def plot(result: Result, directory: Path) -> list[Path]:
    """Write the time and memory plots of one result file; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, stem = result["rows"], f"{result['suite']}-{result['scale']}"
    device = result["environment"]["device"]
    paths = []
    for key, label, unit, name in (("time_s", "time per call (s, median)", 1.0, "time"),
                                   (memory_key(result), _memory_label(result), MiB, "memory")):
        figure, axis = plt.subplots(figsize=(7, 4.5))
        for index, method in enumerate(_methods(rows)):
            points = [(n, _ok(_cell(rows, method, n), key)) for n in _lengths(rows)]
            good = [(n, value / unit) for n, value in points if value is not None]
            line = axis.plot(*zip(*good), marker="o", label=method)[0] if good else None
            failed = [n for n in _lengths(rows) if (_cell(rows, method, n) or {}).get("status") == "oom"]
            if failed:
                color = line.get_color() if line is not None else None
                axis.scatter(failed, [1.0 - 0.012 * index] * len(failed), marker="x", s=60, color=color,
                             transform=axis.get_xaxis_transform(), clip_on=False,
                             label=None if line is not None else f"{method} (OOM)")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length N")
        axis.set_ylabel(label)
        axis.set_title(f"{result['suite']}: {name} vs N ({device}); x on top = out of memory", fontsize=9)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"{stem}-{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)
    return paths


def _memory_label(result: Result) -> str:
    if memory_key(result) == "peak_bytes":
        return "peak memory allocated (MiB, weights included)"
    return "peak resident memory above the start of the call (MiB)"


# --------------------------------------------------------------------------- tables


def _status_text(row: dict | None) -> str:
    if row is None:
        return "-"
    return {"oom": "OOM", "error": "error"}.get(row.get("status"), row.get("status", "?"))


def _table(rows: Sequence[dict], key: str, unit: float, digits: int) -> list[str]:
    lengths = _lengths(rows)
    lines = ["| method | " + " | ".join(f"N={n}" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    for method in _methods(rows):
        cells = []
        for n in lengths:
            row = _cell(rows, method, n)
            value = _ok(row, key)
            cells.append(f"{value / unit:.{digits}f}" if value is not None else _status_text(row))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def ratio(rows: Sequence[dict], method: str, other: str, length: int, key: str) -> float | None:
    """``method``'s figure over ``other``'s at ``length`` (None unless both ran)."""
    mine, theirs = _ok(_cell(rows, method, length), key), _ok(_cell(rows, other, length), key)
    return None if mine is None or theirs is None or theirs == 0 else mine / theirs


RATIOS = {
    "explain": (("fastgim", "grad-x-input"), ("fastgim", "gim-explain"), ("naive-gim", "fastgim"),
                ("fastgim-checkpoint", "fastgim")),
    "attention": (("fastgim-triton", "sdpa"), ("fastgim-cuda", "sdpa"), ("fastgim-torch", "sdpa"),
                  ("fastgim-reference", "sdpa"), ("fastgim-plain", "sdpa")),
}


def _ratio_table(result: Result) -> list[str]:
    rows, key = result["rows"], memory_key(result)
    methods = set(_methods(rows))
    pairs = [pair for pair in RATIOS.get(result["suite"], ()) if set(pair) <= methods]
    if not pairs:
        return []
    keys = ["time_s", key] + (["peak_extra_bytes"] if key != "peak_extra_bytes" else [])
    header = "| ratio | N | time | peak memory |" + (" peak memory above start |" if len(keys) == 3 else "")
    lines = [header, "|---|---:|" + "---:|" * len(keys)]
    fmt = lambda value: "-" if value is None else f"{value:.2f}x"
    for mine, theirs in pairs:
        for n in _lengths(rows):
            figures = [ratio(rows, mine, theirs, n, k) for k in keys]
            if any(f is not None for f in figures):
                lines.append(f"| {mine} / {theirs} | {n} | " + " | ".join(fmt(f) for f in figures) + " |")
    return lines


def targets(result: Result) -> list[tuple[str, str, str]]:
    """The issue's GPU targets for the explain suite: ``(target, measured, PASS/FAIL/not measured)``."""
    rows, key = result["rows"], memory_key(result)
    verdict = lambda ok: "PASS" if ok else "FAIL"
    out = []
    time_4k = ratio(rows, "fastgim", "grad-x-input", 4096, "time_s")
    memory_4k = ratio(rows, "fastgim", "grad-x-input", 4096, key)
    out.append(("N=4096: fastgim time <= 1.3x grad-x-input (SDPA)",
                "-" if time_4k is None else f"{time_4k:.2f}x",
                "not measured" if time_4k is None else verdict(time_4k <= 1.3)))
    out.append(("N=4096: fastgim peak memory <= 1.15x grad-x-input (SDPA)",
                "-" if memory_4k is None else f"{memory_4k:.2f}x",
                "not measured" if memory_4k is None else verdict(memory_4k <= 1.15)))
    naive = _cell(rows, "naive-gim", 4096)
    if naive is not None and naive.get("status") == "oom":
        out.append(("N=4096: naive GIM >= 5x slower than fastgim, or OOM", "OOM", "PASS"))
    else:
        slow = ratio(rows, "naive-gim", "fastgim", 4096, "time_s")
        out.append(("N=4096: naive GIM >= 5x slower than fastgim, or OOM", "-" if slow is None else f"{slow:.2f}x",
                    "not measured" if slow is None else verdict(slow >= 5)))
    done = [m for m in ("fastgim", "fastgim-checkpoint") if _ok(_cell(rows, m, 32768), "time_s") is not None]
    if done:
        peak = min(_ok(_cell(rows, m, 32768), "peak_bytes") or float("inf") for m in done)
        fits = result["environment"].get("device_type") == "cuda" and peak <= GPU_MEMORY_BUDGET
        out.append(("N=32768 completes on one 80 GB GPU", f"{', '.join(done)}; peak {peak / 2**30:.1f} GiB",
                    verdict(fits)))
    else:
        tried = [_cell(rows, m, 32768) for m in ("fastgim", "fastgim-checkpoint")]
        measured = any(row is not None for row in tried)
        out.append(("N=32768 completes on one 80 GB GPU", "OOM" if measured else "-",
                    "FAIL" if measured else "not measured"))
    return out


def section(result: Result, plots: Sequence[Path]) -> list[str]:
    """The README section of one result file."""
    env, rows = result["environment"], result["rows"]
    versions = ", ".join(f"{name} {version}" for name, version in env["versions"].items() if version)
    timing = sorted({row.get("timing", "-") for row in rows if row.get("status") == "ok"})
    lines = [f"## {result['suite']} ({result['scale']})", "",
             f"- device: {env['device']}; torch threads: {env.get('torch_threads')}; date: {env['date']}",
             f"- versions: {versions}",
             f"- file: `{Path(result['path']).name}`; timing: {', '.join(timing) or '-'}"]
    lines += [f"- {name}: {value}" for name, value in result.get("setup", {}).items()]
    lines += ["", "Time per call, seconds (median):", "", *_table(rows, "time_s", 1.0, 4), "",
              f"Peak memory, {_memory_label(result)}:", "", *_table(rows, memory_key(result), MiB, 1), ""]
    ratio_lines = _ratio_table(result)
    if ratio_lines:
        lines += ["Ratios:", "", *ratio_lines, ""]
    if result["suite"] == "explain" and result["scale"] != "gpu":
        lines += ["Issue 7's targets apply to the GPU run (`bash scripts/bench.sh --gpu`, 8B-shaped model).", ""]
    elif result["suite"] == "explain":
        lines += ["Targets (issue 7; they are for the GPU run with the 8B-shaped model):", "",
                  "| target | measured | verdict |", "|---|---|---|"]
        lines += [f"| {name} | {measured} | {verdict} |" for name, measured, verdict in targets(result)]
        lines.append("")
    errors = [row for row in rows if row.get("status") in ("oom", "error")]
    if errors:
        lines += ["Failed runs:", ""]
        lines += [f"- {row['method']} N={row['length']}: {row.get('error', row['status'])}" for row in errors]
        lines.append("")
    lines += [f"![{path.stem}]({path.name})" for path in plots]
    return lines + [""]


def markdown(results: Sequence[Result], plots: dict[str, list[Path]], skipped: Sequence[str]) -> str:
    """The whole README."""
    lines = ["# fastgim benchmark results", "",
             "Generated by `python benchmarks/report.py` from the JSON files in this folder "
             "(`bash scripts/bench.sh` for CPU sizes, `bash scripts/bench.sh --gpu` for GPU sizes); "
             "do not edit by hand. OOM = out of memory (a result, not a failure).", ""]
    for result in results:
        lines += section(result, plots.get(str(result["path"]), []))
    if skipped:
        lines += [f"Other JSON files here (not in the {FORMAT} format): " + ", ".join(f"`{s}`" for s in skipped), ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--no-plots", action="store_true", help="write only README.md")
    args = parser.parse_args(argv)
    results, skipped = load_results(args.results_dir)
    if not results:
        print(f"no {FORMAT} result files in {args.results_dir}; run `bash scripts/bench.sh` first")
        return 1
    plots = {} if args.no_plots else {str(r["path"]): plot(r, args.results_dir) for r in results}
    readme = args.results_dir / "README.md"
    readme.write_text(markdown(results, plots, skipped))
    print(f"wrote {readme}" + "".join(f"\nwrote {p}" for paths in plots.values() for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

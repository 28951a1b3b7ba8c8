"""Ahead-of-time compiles of the Triton kernels for a CUDA target, without a GPU.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32))`` runs
the whole pipeline down to the cubin with the ``ptxas`` bundled in the Triton wheel. From it we read
registers per thread and spill bytes (the ``ptxas -v`` log), shared memory (``metadata.shared``),
``num_warps`` and ``num_stages``. The signatures model a typical launch: 16-byte aligned pointers,
unit last-dim strides (the JIT turns an integer equal to 1 into a constant), other strides divisible
by 16, sequence lengths not.

Triton must not run in interpreter mode here (``TRITON_INTERPRET`` unset or 0 before the kernels are
first imported); :func:`compile_in_subprocess` runs a list of jobs in a fresh interpreter for callers
(tests) whose process already imported the kernels interpreted.

Used by ``benchmarks/compile_report.py`` (every kernel x every offered config) and ``tests/test_aot.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
"""Largest dynamic shared memory per block (bytes) by compute capability (sm_86 / sm_89: consumer GPUs)."""

DTYPES = ("fp16", "bf16", "fp32")

# GIM feature sets of the attention kernels: the flags each kernel is specialised on.
# ``gim_a`` / ``gim_b``: GIM with the statistics from the forward (option A) or the backward's stats loop
# (option B); ``all_a`` / ``all_b``: every feature at once (causal, window, softcap, key padding, a bool
# dense mask, gate) with GIM; ``all_plain``: every feature without GIM.
_BASE = dict(IS_CAUSAL=True, HAS_WINDOW=False, HAS_SOFTCAP=False, HAS_PAD=False, MASK_KIND=0, HAS_GATE=False)
_ALL = dict(IS_CAUSAL=True, HAS_WINDOW=True, HAS_SOFTCAP=True, HAS_PAD=True, MASK_KIND=1, HAS_GATE=True)
FEATURE_SETS = {
    "plain": dict(_BASE, GIM=False, OPTION_A=False),
    "gim_a": dict(_BASE, GIM=True, OPTION_A=True),
    "gim_b": dict(_BASE, GIM=True, OPTION_A=False),
    "all_a": dict(_ALL, GIM=True, OPTION_A=True),
    "all_b": dict(_ALL, GIM=True, OPTION_A=False),
    "all_plain": dict(_ALL, GIM=False, OPTION_A=False),
}
ATTENTION_KINDS = ("fwd", "dq", "dkdv")
NORM_KINDS = ("rms_fwd", "rms_bwd", "ln_fwd", "ln_bwd", "gated_fwd", "gated_bwd")
NORM_HIDDEN = (128, 1024, 4096, 8192, 16384, 32768, 65536)


@dataclasses.dataclass(frozen=True)
class Job:
    """One compile: a kernel specialisation and one launch config."""

    kernel: str  # "fwd" / "dq" / "dkdv" (attention) or one of NORM_KINDS
    arch: int
    dtype: str
    size: int  # head_dim (attention), hidden (norms), 0 (gated activation)
    features: str  # a FEATURE_SETS name (attention), "frozen" / "ordinary" / "-" (others)
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    offered: bool = True  # the config is in the table the wrappers use for this specialisation

    def label(self) -> str:
        return (f"{self.kernel} sm_{self.arch} {self.dtype} d={self.size} {self.features} "
                f"{self.block_m}x{self.block_n}/w{self.num_warps}/s{self.num_stages}")


@dataclasses.dataclass
class Result:
    job: Job
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared: int | None = None
    seconds: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> int:
        return (self.spill_stores or 0) + (self.spill_loads or 0)

    @property
    def smem_over_limit(self) -> bool:
        return self.shared is not None and self.shared > SMEM_LIMIT[self.job.arch]

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self.job), "regs": self.regs, "spill_stores": self.spill_stores,
                "spill_loads": self.spill_loads, "shared": self.shared, "seconds": round(self.seconds, 2),
                "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        job = Job(**{f.name: d[f.name] for f in dataclasses.fields(Job)})
        return cls(job, d["regs"], d["spill_stores"], d["spill_loads"], d["shared"], d["seconds"], d["error"])


# --------------------------------------------------------------------------- attention signatures


def _attention_variant(kind: str, dtype: str, flags: dict) -> str:
    from fastgim.kernels.attention import config_variant

    extras = flags["HAS_SOFTCAP"] or flags["HAS_PAD"] or flags["MASK_KIND"] != 0 or flags["HAS_GATE"]
    return config_variant(kind, dtype=dtype, stats=flags["GIM"] and flags["OPTION_A"], gim=flags["GIM"],
                          stats_from_fwd=flags["OPTION_A"], extras=extras)


def attention_constexprs(kind: str, dtype: str, head_dim: int, flags: dict) -> dict:
    """The constexpr values a launch with these features passes (without the block sizes)."""
    const = {k: flags[k] for k in _BASE}
    const.update(D_PAD=head_dim, DV_PAD=head_dim, PREC="ieee" if dtype == "fp32" else "tf32")
    if kind == "fwd":
        const["STATS"] = flags["GIM"] and flags["OPTION_A"]
    else:
        const["GIM"] = flags["GIM"]
        if kind == "dq":
            const["STATS_FROM_FWD"] = flags["GIM"] and flags["OPTION_A"]
    return const


def _pointer_types(kind: str, dtype: str, flags: dict) -> dict:
    dt = f"*{dtype}"
    mask = {0: dt, 1: "*u8", 2: dt}[flags["MASK_KIND"]]
    gate = dt if flags["HAS_GATE"] else "*fp32"
    common = {"Q": dt, "K": dt, "V": dt, "Lse": "*fp32", "LseT": "*fp32", "Gate": gate, "Pad": "*u8",
              "Mask": mask}
    if kind == "fwd":
        return {**common, "Out": dt, "OT": dt}
    if kind == "dq":
        return {**common, "DO": dt, "Out": dt, "OT": dt, "Delta": "*fp32", "DQ": dt}
    return {**common, "DO": dt, "Delta": "*fp32", "DK": dt, "DV_out": dt, "DGate": "*fp32"}


_UNIT_STRIDES = ("sqd", "skd", "svd", "sdd", "smk")
_FLOAT_ARGS = ("scale", "softcap", "temperature", "dq_factor", "dk_factor", "dv_factor")
_UNALIGNED_INTS = ("Lq", "Lk", "window", "LQ_KEY", "LK_KEY", "GROUP", "Hq", "Hkv")


def _signature(fn, pointers: dict, constexprs: dict, unit: Iterable[str], floats: Iterable[str],
               unaligned: Iterable[str]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for ``fn``; any argument not named is an i32 divisible by 16."""
    signature, attrs = {}, {}
    constexprs = dict(constexprs)
    unit, floats, unaligned = set(unit), set(floats), set(unaligned)
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in unit:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in unaligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _attention_source(job: Job):
    from triton.compiler import ASTSource

    from fastgim.kernels import attention

    fn = attention._KERNELS[job.kernel]
    flags = FEATURE_SETS[job.features]
    const = attention_constexprs(job.kernel, job.dtype, job.size, flags)
    const.update(BLOCK_M=job.block_m, BLOCK_N=job.block_n)
    sig, const, attrs = _signature(fn, _pointer_types(job.kernel, job.dtype, flags), const, _UNIT_STRIDES,
                                   _FLOAT_ARGS, _UNALIGNED_INTS)
    return ASTSource(fn, sig, const, attrs)


# --------------------------------------------------------------------------- norm / activation signatures


def _norm_source(job: Job):
    from triton.compiler import ASTSource

    from fastgim.kernels import gated_mlp, layer_norm, rms_norm

    dt = f"*{job.dtype}"
    frozen = job.features == "frozen"
    table = {
        "rms_fwd": (rms_norm._rms_fwd_kernel, dict(HAS_W=True, CAST=0), ("X", "W", "OUT"), ("RSTD",)),
        "rms_bwd": (rms_norm._rms_bwd_kernel, dict(HAS_W=True, WANT_DW=True, CAST=0, FROZEN=frozen),
                    ("DY", "X", "W", "DX"), ("RSTD", "DW_PART")),
        "ln_fwd": (layer_norm._ln_fwd_kernel, dict(HAS_W=True, HAS_B=True), ("X", "W", "B", "OUT"),
                   ("MEAN", "RSTD")),
        "ln_bwd": (layer_norm._ln_bwd_kernel, dict(HAS_W=True, WANT_DW=True, WANT_DB=True, FROZEN=frozen),
                   ("DY", "X", "W", "DX"), ("MEAN", "RSTD", "DW_PART", "DB_PART")),
        "gated_fwd": (gated_mlp._gated_fwd_kernel, dict(ACT=0, BLOCK_SIZE=gated_mlp.BLOCK), ("GATE", "UP", "OUT"),
                      ()),
        "gated_bwd": (gated_mlp._gated_bwd_kernel, dict(ACT=0, BLOCK_SIZE=gated_mlp.BLOCK),
                      ("DOUT", "GATE", "UP", "DGATE", "DUP"), ()),
    }
    fn, const, typed, fp32 = table[job.kernel]
    if not job.kernel.startswith("gated"):
        const = dict(const, BLOCK_M=job.block_m, BLOCK_N=job.block_n)
    pointers = {**{n: dt for n in typed}, **{n: "*fp32" for n in fp32}}
    sig, const, attrs = _signature(fn, pointers, const, (), ("eps", "offset", "gate_scale", "up_scale"),
                                   ("n_rows", "numel", "rows_per_prog"))
    return ASTSource(fn, sig, const, attrs)


# --------------------------------------------------------------------------- jobs


def attention_jobs(archs: Iterable[int], head_dims: Iterable[int], dtypes: Iterable[str],
                   features: Iterable[str], kinds: Iterable[str] = ATTENTION_KINDS,
                   offered_only: bool = True) -> list[Job]:
    """Every offered config for each specialisation, skipping specialisations that compile identically
    (the forward of ``gim_b`` is the plain forward, the dK/dV kernel of option B that of option A)."""
    from fastgim.kernels.attention import config_table

    jobs, seen = [], set()
    for arch in archs:
        for dtype in dtypes:
            for head_dim in head_dims:
                for feat in features:
                    flags = FEATURE_SETS[feat]
                    for kind in kinds:
                        const = attention_constexprs(kind, dtype, head_dim, flags)
                        variant = _attention_variant(kind, dtype, flags)
                        for bm, bn, w, st in config_table(kind, head_dim, (arch // 10, arch % 10), variant):
                            key = (arch, dtype, kind, tuple(sorted(const.items())), bm, bn, w, st)
                            if key in seen:
                                continue
                            seen.add(key)
                            jobs.append(Job(kind, arch, dtype, head_dim, feat, bm, bn, w, st))
    return jobs


def norm_jobs(archs: Iterable[int], dtypes: Iterable[str], hidden: Iterable[int] = NORM_HIDDEN) -> list[Job]:
    """The norm kernels at each hidden size's block config, and the gated activation (one config)."""
    from fastgim.kernels.gated_mlp import BLOCK, NUM_WARPS
    from fastgim.kernels.rms_norm import block_config

    jobs = []
    for arch in archs:
        for dtype in dtypes:
            for h in hidden:
                bm, bn, w = block_config(h)
                jobs += [Job(kind, arch, dtype, h, mode, bm, bn, w, 1)
                         for kind, modes in (("rms_fwd", ["-"]), ("rms_bwd", ["frozen", "ordinary"]),
                                             ("ln_fwd", ["-"]), ("ln_bwd", ["frozen", "ordinary"]))
                         for mode in modes]
            jobs += [Job(kind, arch, dtype, 0, "-", BLOCK, 0, NUM_WARPS, 1) for kind in ("gated_fwd", "gated_bwd")]
    return jobs


# --------------------------------------------------------------------------- compiling

_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptxas_numbers(log: str) -> tuple[int, int, int]:
    regs = [int(m) for m in _REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _SPILL.findall(log)]
    if not regs or not spills:
        raise RuntimeError(f"no register / spill figures in the ptxas log:\n{log}")
    return max(regs), max(s for s, _ in spills), max(lo for _, lo in spills)


def compile_job(job: Job) -> Result:
    """Compile one job for its target; errors are caught into ``Result.error``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    result = Result(job)
    try:
        source = _attention_source(job) if job.kernel in ATTENTION_KINDS else _norm_source(job)
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(source, target=GPUTarget("cuda", job.arch, 32),
                                        options={"num_warps": job.num_warps, "num_stages": job.num_stages})
        result.regs, result.spill_stores, result.spill_loads = _ptxas_numbers(log.getvalue())
        result.shared = int(kernel.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - the report records every failure
        result.error = f"{type(exc).__name__}: {str(exc)[:2000]}"
    result.seconds = time.perf_counter() - start
    return result


def source_hash(job: Job) -> str:
    """The kernel's Triton cache key (its source and that of every jit function it calls, and the Triton
    version): a recorded result stays valid while it is unchanged (config tables are not part of it)."""
    import hashlib

    import triton

    from fastgim.kernels import attention, gated_mlp, layer_norm, rms_norm

    kernels = {**attention._KERNELS, "rms_fwd": rms_norm._rms_fwd_kernel, "rms_bwd": rms_norm._rms_bwd_kernel,
               "ln_fwd": layer_norm._ln_fwd_kernel, "ln_bwd": layer_norm._ln_bwd_kernel,
               "gated_fwd": gated_mlp._gated_fwd_kernel, "gated_bwd": gated_mlp._gated_bwd_kernel}
    key = kernels[job.kernel].cache_key + triton.__version__
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def compile_jobs(jobs: list[Job], workers: int = 1) -> Iterator[Result]:
    """Results in job order; ``workers > 1`` compiles in that many fresh processes."""
    if workers <= 1:
        for job in jobs:
            yield compile_job(job)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers, initializer=_no_interpreter) as pool:
        yield from pool.imap(compile_job, jobs)


def _no_interpreter() -> None:
    os.environ["TRITON_INTERPRET"] = "0"


def compile_in_subprocess(jobs: list[Job], workers: int = 1, timeout: float = 900) -> list[Result]:
    """Compile ``jobs`` in a fresh Python (Triton not in interpreter mode) and return the results."""
    payload = json.dumps({"jobs": [dataclasses.asdict(j) for j in jobs], "workers": workers})
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "fastgim.kernels.aot"], input=payload, capture_output=True,
                          text=True, env=env, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"the AOT compile subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return [Result.from_dict(d) for d in json.loads(proc.stdout.strip().splitlines()[-1])]


def _main() -> None:
    request = json.loads(sys.stdin.read())
    jobs = [Job(**d) for d in request["jobs"]]
    results = [r.as_dict() for r in compile_jobs(jobs, request["workers"])]
    sys.stdout.write("\n" + json.dumps(results) + "\n")


if __name__ == "__main__":
    _main()

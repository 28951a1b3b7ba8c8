"""Ahead-of-time compiles of the Triton kernels for sm_90 and sm_80 on CPU (``fastgim.kernels.aot``).

A representative subset of ``benchmarks/compile_report.py``: every config the head_dim-128 tables offer
(except the small common fallback), fp16, for a specialisation with the most live state among those that
use each table, plus the norm backward kernels. Fails on a compile error, on shared memory over the
target's limit, and on any register spill. The full report covers head_dim 64 / 256, bf16 and fp32.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from fastgim.kernels import aot  # noqa: E402

pytestmark = pytest.mark.aot

# (kernel, feature set) covering the tables (see config_variant) with their heaviest users; the forward's
# unmasked path (three pipelined key loops) can need more registers than its masked path, so both are in.
# Left to the report: the dQ option-B table without extras and the plain dK/dV table (the GIM one is a
# superset in live state and shares its configs).
_PER_TABLE = [("fwd", "all_plain"), ("fwd", "gim_a"), ("dq", "all_a"), ("dq", "all_b"),
              ("dkdv", "all_plain"), ("dkdv", "gim_a"), ("dkdv", "all_a")]


def _jobs() -> list[aot.Job]:
    jobs = []
    for kind, features in _PER_TABLE:
        jobs += [j for j in aot.attention_jobs([90, 80], [128], ["fp16"], [features], kinds=[kind])
                 if (j.block_m, j.block_n, j.num_warps, j.num_stages) != (32, 32, 4, 1)]
    norms = [j for j in aot.norm_jobs([90, 80], ["bf16"], hidden=[8192]) if j.kernel in ("rms_bwd", "ln_bwd")]
    return jobs + norms


def test_offered_configs_compile_within_limits_without_spills():
    results = aot.compile_in_subprocess(_jobs(), workers=2)
    errors = [f"{r.job.label()}: {r.error}" for r in results if r.error]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    too_big = [f"{r.job.label()}: {r.shared} B" for r in results if r.smem_over_limit]
    assert not too_big, "shared memory over the target's limit:\n" + "\n".join(too_big)
    spills = [f"{r.job.label()}: {r.regs} regs, {r.spills} spill bytes" for r in results if r.spills]
    assert not spills, "register spills (prune or reshape the config tables in kernels/attention.py):\n" + \
        "\n".join(spills)

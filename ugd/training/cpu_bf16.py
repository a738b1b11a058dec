"""Whether this CPU multiplies bf16 in hardware, and the one line ``--bf16`` prints where it does not.

bf16 autocast on a CPU is fast only where the CPU has bf16 matrix units: AMX-BF16 (``amx_bf16``,
Intel Sapphire Rapids and later) or AVX512-BF16 (``avx512_bf16``, Intel Cooper Lake, AMD Zen 4 and
later). Elsewhere oneDNN and the ugd_ops kernels convert bf16 to fp32 for every product, and a bf16
step is no faster than an fp32 one (often slower): the run goes on, with one line that says so.
"""

from __future__ import annotations

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # as /proc/cpuinfo and lscpu name them


def cpu_flags() -> frozenset[str] | None:
    """The CPU's flags from /proc/cpuinfo; None where that file is missing (not Linux): unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def bf16_slow_notice(flags: frozenset[str] | None) -> str | None:
    """The line to print for --bf16 on a CPU with these flags, or None (bf16 units present, or unknown)."""
    if flags is None or any(f in flags for f in BF16_FLAGS):
        return None
    return ("[ugd.train] --bf16 on this CPU will be slow: it has neither amx_bf16 nor avx512_bf16 (see lscpu), so "
            "every bf16 product runs converted to fp32; leave out --bf16 to train in fp32")

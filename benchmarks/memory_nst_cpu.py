"""Peak CPU memory above the inputs of NST rbf forward+backward at a 128x128 map.

B = 8, C_s = 256, C_t = 512, fp32, the student requires grad (the issue-4 memory target:
native <= 1/4 of the reference). Each provider runs in its own process; the peak is the
process's maximum resident set size minus its resident size once the inputs exist.
Usage: ``python benchmarks/memory_nst_cpu.py`` (spawns itself per provider).
Stop-gap until ``python -m kdfast.bench`` lands.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import torch


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(provider: str) -> None:
    from kdfast.ops.mmd import native_channel_mmd
    from kdfast.reference.nst import channel_mmd

    student = torch.randn(8, 256, 128, 128, requires_grad=True)
    teacher = torch.randn(8, 512, 128, 128)
    fn = native_channel_mmd if provider == "native" else channel_mmd
    base = resident_bytes()
    fn(student, teacher, kernel="rbf", sigma2=(1.0,)).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"{provider} {(peak - base) / 2**20:.0f}")


def main() -> None:
    if len(sys.argv) > 1:
        measure(sys.argv[1])
        return
    peaks = {}
    for provider in ("native", "reference"):
        out = subprocess.run([sys.executable, __file__, provider], check=True,
                             capture_output=True, text=True).stdout.split()
        peaks[provider] = float(out[-1])
    print("NST rbf, B=8, C_s=256, C_t=512, 128x128, fp32, fwd+bwd (student grad 128 MiB "
          "included)")
    for provider, mib in peaks.items():
        print(f"  {provider}: {mib:.0f} MiB above the inputs")
    print(f"  native / reference = {peaks['native'] / peaks['reference']:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()

"""The learner's precision: `learner.dtype: auto` is bf16 (DeepSpeed's bf16 mode: bf16
weights and activations, fp32 master weights and Adam moments) where the hardware runs
bf16 natively, fp32 elsewhere. Resolved by each learner rank on its own device; the
ranks of a group then agree on the one they all have (learner/learner.py)."""
from __future__ import annotations

from pathlib import Path

# x86: AVX512-BF16 (Cooper Lake, Zen 4 and later) or AMX (Sapphire Rapids and later); aarch64: BF16 (Armv8.6)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, from /proc/cpuinfo ("flags" on x86, "Features" on aarch64);
    empty where there is none (macOS)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    out: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            out.update(value.split())
    return out


def native_bf16(device: str, flags: set[str] | None = None) -> tuple[bool, str]:
    """-> (whether `device` ("cpu" or "cuda") computes in bf16 natively, why)."""
    if device == "cuda":
        import torch

        ok = torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later, not emulated
        return ok, f"{torch.cuda.get_device_name()} {'supports' if ok else 'lacks'} bf16"
    found = [f for f in CPU_BF16_FLAGS if f in (cpu_flags() if flags is None else flags)]
    return bool(found), f"this CPU has {found[0]}" if found else "this CPU has no bf16 instructions"


def resolve(dtype: str, device: str, flags: set[str] | None = None) -> tuple[str, str]:
    """learner.dtype -> (the dtype this rank trains in, why)."""
    if dtype != "auto":
        return dtype, "set in learner.dtype"
    ok, why = native_bf16(device, flags)
    return ("bfloat16" if ok else "float32"), f"auto: {why}"

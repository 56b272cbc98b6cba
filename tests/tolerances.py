"""Agreement tolerances with the plain-PyTorch reference (tests/reference.py, float32),
per token, in nats. Shared by the CPU engine tests and benchmarks/gpu_correctness.py, so the
GPU runs are held to exactly what the CPU tests accept.

float32 engine: vLLM's CPU kernels sum in other orders than the reference's einsums; through
30 layers that is ~1e-5 nats a token. A wrong visible set, position or rotation costs 1e-2 to
1 nat a token.

bfloat16 engine (weights and activations rounded to 8 mantissa bits, the reference still in
float32): rounding alone costs ~0.02-0.03 nats a token on average with a long tail (0.3 on
the least likely tokens), measured on the CPU before any eviction (the control) and the same
after eviction. So the bf16 tolerance bounds the mean, and bounds what the policy adds as a
ratio to the control: after the first eviction, the mean error stays within 1.5x the mean
before it. A dense (no eviction) reading of the same stream is ~0.23 nats away on average.
"""

F32_MAX_ABS = 1e-3
F32_MAX_MEAN = 1e-4
F32_EVICTING_OVER_CONTROL = 5.0

BF16_MAX_ABS = 0.75
BF16_MAX_MEAN = 0.05
BF16_EVICTING_OVER_CONTROL = 1.5


def check(report: dict, dtype: str) -> list[str]:
    """The tolerances ``report`` (max, mean, control_mean, evicting_mean) breaks; empty if
    none. ``dtype``: "float32" or "bfloat16"."""
    if dtype == "float32":
        max_abs, max_mean, ratio, floor = F32_MAX_ABS, F32_MAX_MEAN, F32_EVICTING_OVER_CONTROL, 5e-6
    elif dtype == "bfloat16":
        max_abs, max_mean, ratio, floor = BF16_MAX_ABS, BF16_MAX_MEAN, BF16_EVICTING_OVER_CONTROL, 0.0
    else:
        raise ValueError(f"no tolerance for {dtype}")
    broken = []
    if report["max"] > max_abs:
        broken.append(f"max {report['max']:.3g} > {max_abs}")
    if report["mean"] > max_mean:
        broken.append(f"mean {report['mean']:.3g} > {max_mean}")
    if report["evicting_mean"] > ratio * max(report["control_mean"], floor):
        broken.append(f"mean after eviction {report['evicting_mean']:.3g} > {ratio} x before "
                      f"({report['control_mean']:.3g})")
    return broken

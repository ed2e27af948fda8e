"""The machine a run's seconds were measured on: hosts of one kind differ up to 3x in speed, so every timing the
package records (the real demo's training time, a RULER bench cell's seconds) is written beside this figure; and the
peak memory of a piece of work (a RULER bench cell)."""

import sys
import time


def machine() -> dict:
    """What a computation's numerics depend on besides the model and its precision: the CPU, torch's CPU kernel set, the
    GPU (None without one) and the torch and transformers versions. Greedy answers can differ when any of these does
    (docs/ruler_bench.md, "Precision and host")."""
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def host_speed(size: int = 1024, repeats: int = 10) -> dict:
    """The machine a run's seconds were measured on (`machine`), and how fast it multiplies: fp32 `size`×`size`
    matmuls at torch's thread count, GFLOP/s = 2·size³ / seconds (best of `repeats`). The same 2-core machine kind has
    run the real demo 3.5× slower on one host than on another, so runtimes are read against this figure."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(5):  # warm-up: a cold process measured 29 GFLOP/s on its first matmuls, 67 from then on
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return {
        **machine(),
        "torch_threads": torch.get_num_threads(),
        "matmul_gflops_fp32": round(2 * size**3 / best / 1e9, 1),
    }


# Peak memory of a piece of work (a RULER bench cell): on a GPU the peak of allocated tensors; on a CPU the peak
# resident set of the process (Linux's VmHWM, which writing "5" to /proc/self/clear_refs resets to the current
# resident set; elsewhere the process's peak since it started, never reset).


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window for `peak_memory_gib(device)`."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_gib(device) -> float | None:
    """Peak memory since the last `reset_peak_memory(device)`, in GiB: allocated tensors on a GPU, the process's
    resident set on a CPU (None where neither can be read)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        try:
            import resource
        except ImportError:  # not on this OS
            return None
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        kib = kib / 1024 if sys.platform == "darwin" else kib
    return round(kib / 2**20, 2)

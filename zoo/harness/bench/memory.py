"""Bench probes: the process's peak resident memory (reset per run) and the training-step timer."""

from __future__ import annotations

import gc
import resource
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass



def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ``VmHWM`` via ``/proc/self/clear_refs``); False if
    unsupported.

    The heap is trimmed first (glibc ``malloc_trim``), so memory an earlier run freed but the allocator kept
    does not count as this run's peak (garbage of the earlier run is collected first)."""
    gc.collect()
    trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False



def peak_rss_mb() -> float:
    """Peak resident memory, MB: since the last :func:`reset_peak_rss` on Linux (``VmHWM``), else since start
    (``ru_maxrss``, KB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024



class StepTimer(Callback):
    """Training-step wall time and tokens (attention-mask sum), the first step excluded as warm-up."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []
        self._start = 0.0
        self._tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append((time.perf_counter() - self._start, self._tokens))

    def summary(self) -> dict[str, float]:
        timed = self.steps[1:] if len(self.steps) > 1 else self.steps
        seconds = sum(s for s, _ in timed)
        tokens = sum(t for _, t in timed)
        return {"train_step_s": seconds / max(1, len(timed)),
                "tokens_per_s": tokens / seconds if seconds else None,
                "train_tokens": sum(t for _, t in self.steps)}

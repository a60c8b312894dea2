"""Benchmark: time and peak memory of the LM head + weighted CE, naive vs selected (reference, Triton).

    python -m zoo.kernels.bench_selected_ce                 # CPU: N in {1024, 4096}, fp32
    python -m zoo.kernels.bench_selected_ce --n 1024 4096 8192 --dtype bfloat16   # CUDA, the issue's grid

Each row is one forward + backward of ``sum(loss)`` w.r.t. hidden and the head weight at SmolLM2's
H=576, V=49152 (``--h``, ``--v`` to change), with a random ``keep`` fraction of the N rows given
weight 1 and the rest weight 0. Paths: ``naive`` (full (N, V) logits + ``F.cross_entropy``),
``reference`` (gather + chunked checkpointed PyTorch) and ``triton`` (gather + chunked Triton LSE /
gradient kernels; CUDA, or on CPU with ``--interpret`` through Triton's interpreter, whose peak
memory is meaningful, as the kernels allocate nothing, but whose time is not).

Peak memory is the high-water mark of tensor bytes allocated during the call, above the inputs:
``torch.cuda.max_memory_allocated`` on CUDA; on CPU a dispatch-mode tracker that counts every
storage an op creates until the tensors holding it are freed (CPU has no allocator statistics).
The head's weight gradient (V x H) is part of every path's peak. Times are the median of ``--reps``
runs after ``--warmup`` runs: wall time on CUDA, process CPU time on CPU (a shared CPU makes wall
time meaningless; run with ``OMP_NUM_THREADS=1``). Ratios: ``time/keep1`` against the
same path at keep 1.0 (issue target: <= keep + 0.1 for the selected paths), ``mem/naive`` against
naive at the same N and keep (issue target: <= 0.25 at N = 4096).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.kernels.selected_ce import naive_linear_cross_entropy, selected_linear_cross_entropy_reference


class PeakTensorMemory(TorchDispatchMode):
    """CPU peak of tensor storage bytes created inside the ``with`` block (views and in-place ops share)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage data_ptr -> [nbytes, tensors alive on it]
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def _track(self, tensor: torch.Tensor, input_keys: set[int]) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0:
            return
        if key in self.live:
            self.live[key][1] += 1
        elif key in input_keys:  # a view of / in-place write into memory this block did not allocate
            return
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        weakref.finalize(tensor, self._release, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        input_keys = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t, input_keys)
        return out


def paths(device: torch.device, chunk_size: int, interpret: bool = False) -> dict:
    found = {
        "naive": naive_linear_cross_entropy,
        "reference": lambda *a, **k: selected_linear_cross_entropy_reference(*a, chunk_size=chunk_size, **k),
    }
    if device.type == "cuda" or interpret:
        if device.type != "cuda":
            os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' import
        try:
            from zoo.kernels.selected_ce_triton import triton_selected_linear_cross_entropy
        except ImportError as error:
            print(f"triton unavailable: {error}")
        else:
            found["triton"] = lambda *a, **k: triton_selected_linear_cross_entropy(
                *a, chunk_size=chunk_size, **k)
    return found


def one_step(fn, hidden, weight, labels, token_weights) -> None:
    hidden.grad = weight.grad = None
    fn(hidden, weight, labels, token_weights).sum().backward()


def measure(fn, hidden, weight, labels, token_weights, warmup: int, reps: int) -> tuple[float, float]:
    """(median seconds, peak bytes above the inputs) of one forward + backward."""
    cuda = hidden.is_cuda
    for _ in range(warmup):
        one_step(fn, hidden, weight, labels, token_weights)
    clock = time.perf_counter if cuda else time.process_time  # CPU: immune to other processes' load
    times = []
    for _ in range(max(reps, 1)):
        hidden.grad = weight.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = clock()
        one_step(fn, hidden, weight, labels, token_weights)
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - start)
    hidden.grad = weight.grad = None
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        one_step(fn, hidden, weight, labels, token_weights)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with PeakTensorMemory() as tracker:
            one_step(fn, hidden, weight, labels, token_weights)
        peak = tracker.peak
    hidden.grad = weight.grad = None
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="token counts N (CPU 1024 4096; CUDA + 8192)")
    parser.add_argument("--h", type=int, default=576, help="hidden size H (SmolLM2-135M: 576)")
    parser.add_argument("--v", type=int, default=49152, help="vocabulary V (SmolLM2: 49152)")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                        help="kept fraction of rows")
    parser.add_argument("--dtype", default=None,
                        help="float32 | bfloat16 | float16 (CPU float32, CUDA bfloat16)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="rows per head chunk (selected paths)")
    parser.add_argument("--paths", nargs="+", default=None, help="subset of naive reference triton")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (CPU 0, CUDA 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed runs, median reported (CPU 1, CUDA 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU: also run the Triton path under TRITON_INTERPRET=1 (its memory is real, "
                             "its time is the interpreter's and means nothing)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    ns = args.n or ([1024, 4096, 8192] if cuda else [1024, 4096])
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 0)
    reps = args.reps if args.reps is not None else (5 if cuda else 1)
    available = paths(device, args.chunk_size, args.interpret)
    chosen = {name: fn for name, fn in available.items() if args.paths is None or name in args.paths}
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(args.v, args.h, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    # A small untimed run first so one-off initialisation (kernel compilation, BLAS) is not in row 1.
    for fn in chosen.values():
        small = torch.randn(64, args.h, generator=gen).to(device, dtype).requires_grad_()
        one_step(fn, small, weight, torch.randint(0, args.v, (64,), device=device),
                 torch.ones(64, device=device))

    print(f"device={device} clock={'wall' if cuda else 'process CPU'} "
          f"dtype={str(dtype).removeprefix('torch.')} H={args.h} V={args.v} "
          f"chunk_size={args.chunk_size} warmup={warmup} reps={reps}")
    print("| N | keep | path | time ms | time/keep1 | peak MiB | mem/naive |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for n in ns:
        hidden = torch.randn(n, args.h, generator=gen).to(device, dtype).requires_grad_()
        labels = torch.randint(0, args.v, (n,), generator=gen).to(device)
        order = torch.randperm(n, generator=gen)
        unpruned_time: dict[str, float] = {}
        for keep in args.keep:
            token_weights = torch.zeros(n)
            token_weights[order[: round(keep * n)]] = 1.0
            token_weights = token_weights.to(device)
            naive_peak = None
            for name, fn in chosen.items():
                seconds, peak = measure(fn, hidden, weight, labels, token_weights, warmup, reps)
                if keep == 1.0:
                    unpruned_time[name] = seconds
                if name == "naive":
                    naive_peak = peak
                time_ratio = f"{seconds / unpruned_time[name]:.2f}" if name in unpruned_time else "-"
                mem_ratio = f"{peak / naive_peak:.2f}" if naive_peak else "-"
                print(f"| {n} | {keep:g} | {name} | {seconds * 1e3:.1f} | {time_ratio} | "
                      f"{peak / 2**20:.1f} | {mem_ratio} |", flush=True)
        del hidden


if __name__ == "__main__":
    main()

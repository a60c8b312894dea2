"""GOT-D selection cost against pool size: time and peak memory of scoring + top-k (one table).

    python -m zoo.harness.got_d_scaling --sizes 1000 10000 100000 --target 256

Each pool size runs in a fresh child process, so its peak RSS is its own. Embeddings are synthetic (unit-norm,
384-d like MiniLM, candidates from 12 clusters, the target from two of them), because the OT step is what is
measured here; the encoder's throughput on real pool texts is measured separately (``--embed-sample N``, the
MiniLM encoder on N built-in pool texts) and extrapolated, since it dominates at scale on a CPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def synthetic(n: int, m: int, dim: int = 384, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim), dtype=np.float32)
    pool = centres[rng.integers(0, 12, n)]
    pool += 0.8 * rng.standard_normal((n, dim), dtype=np.float32)
    target = centres[rng.integers(0, 2, m)] + 0.8 * rng.standard_normal((m, dim), dtype=np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    target /= np.linalg.norm(target, axis=1, keepdims=True)
    return target, pool


def one(n: int, m: int, k: int, eps: float) -> dict:
    import numpy as np

    from zoo.datamodules.got_d import gotd_scores

    target, pool = synthetic(n, m)
    base = _rss_mib()
    start = time.perf_counter()
    scores = gotd_scores(target, pool, eps=eps)
    chosen = np.argpartition(scores, min(k, n) - 1)[:k]
    seconds = time.perf_counter() - start
    return {"pool": n, "target": m, "k": len(chosen), "seconds": round(seconds, 2),
            "peak_rss_mib": round(_rss_mib(), 1), "data_rss_mib": round(base, 1),
            "cost_matrix_mib": round(4 * n * m / 2**20, 1)}


def embed_rate(count: int) -> float:
    from zoo.datamodules.embeddings import minilm_encoder
    from zoo.datamodules.selection import builtin_pool, normalize_lengths

    texts = normalize_lengths(builtin_pool(count * 2), 256)[:count]
    encode = minilm_encoder()
    encode(texts[:4])  # load once
    start = time.perf_counter()
    encode(texts)
    return len(texts) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo.harness.got_d_scaling",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--target", type=int, default=256, help="target sample size M")
    parser.add_argument("--k", type=int, default=1000, help="selection budget")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--embed-sample", type=int, default=0, help="also time MiniLM on N pool texts")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one(args.one, args.target, args.k, args.eps)))
        return 0
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-m", "zoo.harness.got_d_scaling", "--one", str(n), "--target",
                              str(args.target), "--k", str(args.k), "--eps", str(args.eps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"done {n}", file=sys.stderr)
    print("| pool N | target M | OT + top-k (s) | peak RSS (MiB) | RSS before OT (MiB) | cost matrix (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['pool']} | {r['target']} | {r['seconds']} | {r['peak_rss_mib']} | {r['data_rss_mib']} "
              f"| {r['cost_matrix_mib']} |")
    if args.embed_sample:
        rate = embed_rate(args.embed_sample)
        print(f"\nMiniLM embedding: {rate:.1f} texts/s here (256-char texts) -> "
              + ", ".join(f"{n}: {n / rate / 60:.1f} min" for n in args.sizes)
              + " (once; cached on disk by content hash)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

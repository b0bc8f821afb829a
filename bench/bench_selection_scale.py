"""How long FedHDS selection takes at realistic scale, client side and server side.

Client: ``cluster_client`` on N samples of hidden-state-sized features (SmolLM2-135M: embedding
output + 30 layers, 576 wide = 17,856 dims), with t-SNE on the raw features (the paper's setting)
and with a PCA-to-50 step first (``pca_dims=50``, standard practice before t-SNE).
Server: ``select_global`` over 1,000 centroids from 10 clients (target: well under 1 s).

    python bench/bench_selection_scale.py            # 5,000 samples, both client variants
    python bench/bench_selection_scale.py --skip-raw # only the PCA-50 variant
    python bench/bench_selection_scale.py --threads 1  # on cores shared with other work
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from fedinstruct.methods.fedhds.clustering import cluster_points, reduce_features, select_global


def clustered_features(n: int, dim: int, n_topics: int, seed: int) -> np.ndarray:
    """Samples around ``n_topics`` centres in a low-rank subspace plus isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(64, dim)).astype(np.float32) / 8.0
    centres = rng.normal(0.0, 3.0, size=(n_topics, 64)).astype(np.float32)
    topic = rng.integers(0, n_topics, size=n)
    latent = centres[topic] + rng.normal(0.0, 1.0, size=(n, 64)).astype(np.float32)
    return latent @ basis + rng.normal(0.0, 0.1, size=(n, dim)).astype(np.float32)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def server_centroids(n_clients: int, per_client: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    groups = rng.uniform(-60, 60, size=(per_client, 2))
    payload = {}
    for client in range(n_clients):
        centroids = groups + rng.normal(0.0, 1.0, size=groups.shape)
        payload[client] = (
            np.arange(per_client),
            centroids.astype(np.float32),
            rng.integers(1, 50, per_client),
        )
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--dims", type=int, default=31 * 576)
    parser.add_argument("--topics", type=int, default=40)
    parser.add_argument("--skip-raw", action="store_true", help="skip t-SNE on raw features")
    parser.add_argument(
        "--threads", type=int, default=None, help="cap BLAS/OpenMP threads (1 on shared cores)"
    )
    args = parser.parse_args()

    print(
        f"cpu cores: {os.cpu_count()}, load average: {os.getloadavg()[0]:.1f}, "
        f"threads: {args.threads or 'library default'}"
    )
    features = clustered_features(args.samples, args.dims, args.topics, seed=0)
    print(f"client features: {features.shape[0]} x {features.shape[1]} float32")
    rows: list[tuple[str, float, str]] = []

    variants = [("PCA-50 then t-SNE", 50)]
    if not args.skip_raw:
        variants.insert(0, ("t-SNE on raw features", None))
    for label, pca_dims in variants:
        reduced, t_reduce = timed(
            lambda p=pca_dims: reduce_features(
                features, method="tsne", seed=0, pca_dims=p, threads=args.threads
            )
        )
        clustering, t_cluster = timed(lambda r=reduced: cluster_points(r, min_cluster_size=2))
        noise = int((clustering.labels == -1).sum())
        rows.append((f"client reduce: {label}", t_reduce, f"{reduced.shape[1]}-D"))
        rows.append(
            ("client HDBSCAN + centroids", t_cluster, f"{clustering.num_clusters} clusters")
        )
        rows.append((f"client total ({label})", t_reduce + t_cluster, f"{noise} noise samples"))

    payload = server_centroids(n_clients=10, per_client=100, seed=1)
    selected, t_server = timed(lambda: select_global(payload, min_cluster_size=2))
    kept = sum(len(ids) for ids in selected.values())
    rows.append(("server select_global (1,000 centroids)", t_server, f"{kept} kept"))

    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'step':<{width}}  {'seconds':>8}  result")
    for name, seconds, note in rows:
        print(f"{name:<{width}}  {seconds:8.2f}  {note}")
    verdict = "OK" if t_server < 1.0 else "SLOW"
    print(f"\nserver target < 1 s: {verdict}")


if __name__ == "__main__":
    main()

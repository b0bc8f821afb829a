"""FedHDS selection and baselines, on data built so that the right answer is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedinstruct.methods.fedhds import (
    LocalClustering,
    SentenceEmbedder,
    cached_features,
    cluster_client,
    coreset_indices,
    last_token_hidden_states,
    matched_counts,
    privatize_centroids,
    random_indices,
    reduce_features,
    select_global,
)

BLOB_SIZES = (12, 25, 40)
BLOB_CENTERS = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]])


def _blob_features(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three 2-D blobs of different sizes, shuffled and embedded in 10-D (PCA recovers them)."""
    rng = np.random.default_rng(seed)
    points = np.concatenate(
        [rng.normal(c, 1.0, (s, 2)) for c, s in zip(BLOB_CENTERS, BLOB_SIZES, strict=True)]
    )
    truth = np.repeat(np.arange(len(BLOB_SIZES)), BLOB_SIZES)
    order = rng.permutation(len(points))
    lift = rng.normal(size=(2, 10))
    features = points[order] @ lift + rng.normal(0.0, 1e-3, (len(points), 10))
    return features.astype(np.float32), truth[order]


# --- client-side clustering ---------------------------------------------------------------


def test_cluster_ids_pair_with_their_own_centroids_and_representatives() -> None:
    features, truth = _blob_features()
    clustering = cluster_client(features, reducer="pca", min_cluster_size=5)
    points = clustering.embedding
    assert clustering.num_clusters == 3
    np.testing.assert_array_equal(clustering.cluster_ids, [0, 1, 2])
    # each cluster is exactly one blob, and its weight is that blob's size (sizes all differ)
    for cluster_id in clustering.cluster_ids:
        members = np.flatnonzero(clustering.labels == cluster_id)
        assert len(np.unique(truth[members])) == 1
        assert clustering.weights[cluster_id] == members.size
        # centroid of id i is the (probability-weighted) mean of the points labelled i
        spread = points[members].std(axis=0).max()
        assert np.linalg.norm(clustering.centroids[cluster_id] - points[members].mean(0)) < (
            0.3 * spread
        )
        # the representative is the member nearest that centroid
        distances = np.linalg.norm(points[members] - clustering.centroids[cluster_id], axis=1)
        assert clustering.representatives[cluster_id] == members[np.argmin(distances)]
    assert sorted(clustering.weights.tolist()) == sorted(BLOB_SIZES)
    assert clustering.centroids.dtype == np.float32
    assert clustering.representatives.dtype == np.int64


def test_selection_follows_dataset_order() -> None:
    features, _ = _blob_features(seed=1)
    clustering = cluster_client(features, reducer="pca", min_cluster_size=5)
    selected = coreset_indices(clustering, clustering.cluster_ids.tolist())
    assert selected == sorted(clustering.representatives.tolist())
    for index in selected:
        cluster_id = clustering.labels[index]
        members = np.flatnonzero(clustering.labels == cluster_id)
        distances = np.linalg.norm(
            clustering.embedding[members] - clustering.centroids[cluster_id], axis=1
        )
        assert index == members[np.argmin(distances)]
    # shuffling the dataset moves the selected indices with their samples
    perm = np.random.default_rng(7).permutation(len(features))
    shuffled = cluster_client(features[perm], reducer="pca", min_cluster_size=5)
    reselected = coreset_indices(shuffled, shuffled.cluster_ids.tolist())
    assert sorted(perm[reselected].tolist()) == selected


def test_tsne_clustering_is_seeded_and_recovers_blobs() -> None:
    features, truth = _blob_features(seed=2)
    clustering = cluster_client(features, reducer="tsne", min_cluster_size=5, seed=3, threads=1)
    assert sorted(clustering.weights.tolist()) == sorted(BLOB_SIZES)
    for cluster_id in clustering.cluster_ids:
        assert len(np.unique(truth[clustering.labels == cluster_id])) == 1
    first = reduce_features(features[:20], method="tsne", seed=3, threads=1)
    np.testing.assert_array_equal(
        first, reduce_features(features[:20], method="tsne", seed=3, threads=1)
    )


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_inputs_reduce_and_cluster_without_error(n: int) -> None:
    features = np.random.default_rng(n).normal(size=(n, 6))
    for method in ("tsne", "pca"):
        reduced = reduce_features(features, method=method, seed=0, threads=1)
        assert reduced.shape == (n, 2) and np.isfinite(reduced).all()
    clustering = cluster_client(features, reducer="pca")
    assert clustering.num_clusters == 0  # HDBSCAN forms no cluster from <= 3 points here
    assert clustering.labels.tolist() == [-1] * n
    assert coreset_indices(clustering, []) == []


def test_empty_and_all_noise_clients() -> None:
    empty = cluster_client(np.zeros((0, 8)))
    assert isinstance(empty, LocalClustering)
    assert empty.num_clusters == 0 and empty.labels.shape == (0,)
    assert empty.centroids.shape == (0, 2)
    # evenly spaced points on a line have no density structure: all noise
    line = np.stack([np.arange(6.0) ** 2, np.zeros(6)], axis=1)
    noise_only = cluster_client(line, reducer="pca", min_cluster_size=4)
    assert noise_only.num_clusters == 0 and (noise_only.labels == -1).all()


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="min_cluster_size"):
        cluster_client(np.zeros((5, 3)), min_cluster_size=1)
    with pytest.raises(ValueError, match="row 2"):
        cluster_client(np.array([[0.0], [1.0], [np.nan]]))
    with pytest.raises(ValueError, match="method"):
        reduce_features(np.zeros((4, 3)), method="umap")
    clustering = cluster_client(_blob_features()[0], reducer="pca", min_cluster_size=5)
    with pytest.raises(ValueError, match=r"\[7\]"):
        coreset_indices(clustering, [0, 7])


# --- server-side selection ------------------------------------------------------------------


def _three_groups() -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Three tight, symmetric groups of centroids (winner = the middle one) and one outlier.

    Client 3 only holds losing centroids; client 2's id 4 is far from everything (noise).
    Ids are deliberately not 0..k-1 in row order, so ids must travel with their centroids.
    """
    return {
        0: (np.array([5, 2, 9]), np.array([[10.0, 0.0], [0.0, 10.4], [-10.4, -10.0]]), np.ones(3)),
        1: (np.array([3, 1, 0]), np.array([[10.5, 0.0], [0.0, 10.0], [-9.6, -10.0]]), np.ones(3)),
        2: (np.array([4, 6]), np.array([[40.0, 40.0], [-10.0, -10.0]]), np.ones(2)),
        3: (np.array([0, 1]), np.array([[9.5, 0.0], [0.0, 9.6]]), np.ones(2)),
    }


def test_select_global_picks_the_centroid_nearest_each_global_centroid() -> None:
    selected = select_global(_three_groups(), min_cluster_size=2)
    assert selected == {0: [5], 1: [1], 2: [6], 3: []}


def test_select_global_keep_noise_keeps_each_outlier() -> None:
    selected = select_global(_three_groups(), min_cluster_size=2, keep_noise=True)
    assert selected == {0: [5], 1: [1], 2: [4, 6], 3: []}


def test_select_global_winner_moves_with_the_global_centroid() -> None:
    groups = _three_groups()
    ids, centroids, weights = groups[3]
    groups[3] = (ids, np.array([[10.3, 0.0], [0.0, 9.6]]), weights)  # group A: 10, 10.3, 10.5
    selected = select_global(groups, min_cluster_size=2)
    assert selected[3] == [0] and selected[0] == []  # 10.3 is now the middle of group A


def test_select_global_with_too_few_centroids() -> None:
    assert select_global({}) == {}
    single = {7: (np.array([2]), np.array([[1.0, 1.0]]), np.array([3]))}
    assert select_global(single) == {7: []}
    assert select_global(single, keep_noise=True) == {7: [2]}
    empty_client = {0: (np.zeros(0, dtype=np.int64), np.zeros((0, 2)), np.zeros(0)), **single}
    assert select_global(empty_client, keep_noise=True) == {0: [], 7: [2]}


def test_select_global_rejects_inconsistent_payloads() -> None:
    with pytest.raises(ValueError, match="client 1.*dimension"):
        select_global(
            {0: ([0], [[0.0, 0.0]], [1]), 1: ([0], [[0.0, 0.0, 0.0]], [1])}  # type: ignore[dict-item]
        )
    with pytest.raises(ValueError, match="client 0.*duplicate"):
        select_global({0: ([1, 1], [[0.0, 0.0], [1.0, 1.0]], [1, 1])})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="client 0.*length"):
        select_global({0: ([0, 1], [[0.0, 0.0]], [1, 1])})  # type: ignore[dict-item]


def test_full_round_trip_two_clients() -> None:
    features, _ = _blob_features(seed=4)
    clients = {
        0: cluster_client(features[:40], reducer="pca", min_cluster_size=3),
        1: cluster_client(features[40:], reducer="pca", min_cluster_size=3),
    }
    payload = {k: (c.cluster_ids, c.centroids, c.weights) for k, c in clients.items()}
    selected = select_global(payload, keep_noise=True)
    chosen = {k: coreset_indices(clients[k], ids) for k, ids in selected.items()}
    total = sum(c.num_clusters for c in clients.values())
    assert 0 < sum(len(v) for v in chosen.values()) <= total
    for k, indices in chosen.items():
        assert set(indices) <= set(clients[k].representatives.tolist())


# --- privacy: the heuristic option (no guarantee; DP centroids: test_centroid_dp.py) -----------


def test_privatize_bounds_and_noise_statistics() -> None:
    """selection.fedhds.noise_sigma: tanh, then N(0, sigma^2); heuristic, no stated epsilon."""
    centroids = np.random.default_rng(0).normal(0.0, 20.0, (5000, 4)).astype(np.float32)
    plain = privatize_centroids(centroids, sigma=0.0, rng=np.random.default_rng(1))
    again = privatize_centroids(centroids, sigma=0.0, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(plain, again)
    np.testing.assert_allclose(plain, np.tanh(centroids), atol=1e-6)
    assert np.abs(plain).max() <= 1.0 and plain.dtype == np.float32
    noisy = privatize_centroids(centroids, sigma=0.5, rng=np.random.default_rng(3))
    noise = noisy.astype(np.float64) - np.tanh(centroids.astype(np.float64))
    assert abs(noise.mean()) < 0.02
    assert abs(noise.std() - 0.5) < 0.02
    replay = privatize_centroids(centroids, sigma=0.5, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(noisy, replay)
    with pytest.raises(ValueError, match="sigma"):
        privatize_centroids(centroids, sigma=-1.0, rng=np.random.default_rng(0))


# --- features -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SentenceEmbedder.default_path()))


def _tiny_llama(vocab_size: int, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def _tiny_gpt2(vocab_size: int, hidden: int = 32, layers: int = 2):
    """Absolute position embeddings: features are only right under left padding if position
    ids follow the attention mask (RoPE models are shift-invariant and would not notice)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


TEXTS = [
    "### Instruction: name a colour\n### Response: blue",
    "x",
    "### Instruction: explain federated learning in two long sentences please\n### Response: "
    "clients train locally and a server averages their updates, so raw data never moves.",
    "what is the capital of France? Paris.",
]


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("build", [_tiny_llama, _tiny_gpt2], ids=["llama", "gpt2"])
def test_last_token_hidden_states_match_unbatched(tokenizer, padding_side: str, build) -> None:
    model = build(tokenizer.vocab_size)
    tokenizer.padding_side = padding_side
    try:
        batched = last_token_hidden_states(model, tokenizer, TEXTS, batch_size=3, progress=False)
        singles = [
            last_token_hidden_states(model, tokenizer, [text], batch_size=1, progress=False)
            for text in TEXTS
        ]
    finally:
        tokenizer.padding_side = "right"
    assert batched.shape == (len(TEXTS), (2 + 1) * 32)  # embedding output + 2 layers
    assert batched.dtype == np.float32
    np.testing.assert_allclose(batched, np.concatenate(singles), atol=1e-5)
    # the first block is the embedding output of the last real token
    if build is _tiny_llama:
        last_id = tokenizer(TEXTS[0])["input_ids"][-1]
        embedding = model.model.embed_tokens.weight[last_id].detach().numpy()
        np.testing.assert_allclose(batched[0, :32], embedding, atol=1e-6)


def test_last_token_hidden_states_keep_order_and_train_mode(tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama(tokenizer.vocab_size)
    reference = last_token_hidden_states(base, tokenizer, TEXTS, progress=False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    reversed_features = last_token_hidden_states(
        model, tokenizer, TEXTS[::-1], batch_size=2, progress=False
    )
    np.testing.assert_allclose(reversed_features, reference[::-1], atol=1e-5)  # LoRA B = 0
    assert model.training
    assert all(m.training for m in model.modules() if m.__class__.__name__ == "Dropout")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        last_token_hidden_states(model, tokenizer, ["ok", None], progress=False)  # type: ignore[list-item]
    empty = last_token_hidden_states(model, tokenizer, [], progress=False)
    assert empty.shape == (0, 3 * 32)


def test_lora_is_folded_for_the_pass_and_the_base_restored_bit_for_bit(tokenizer) -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        _tiny_llama(tokenizer.vocab_size), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter: B != 0, so folding changes the outputs
            torch.nn.init.normal_(param, std=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merged = copy.deepcopy(model).merge_and_unload()
    features = last_token_hidden_states(model, tokenizer, TEXTS, batch_size=2, progress=False)
    np.testing.assert_allclose(
        features, last_token_hidden_states(merged, tokenizer, TEXTS, progress=False), atol=1e-5
    )
    with model.disable_adapter():
        plain = last_token_hidden_states(model, tokenizer, TEXTS, progress=False)
    assert not np.allclose(features, plain, atol=1e-3)  # the adapter did act
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # exact, not merely close
    assert not any(getattr(m, "merged", False) for m in model.modules())
    # the unfolded forward (peft's own) still gives the same features afterwards
    with torch.no_grad():
        ids = tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
        model.eval()
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    np.testing.assert_allclose(features[0, -32:], hidden.numpy(), atol=1e-5)


def test_last_token_hidden_states_on_4bit_model(tokenizer, tmp_path: Path) -> None:
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    model = _tiny_llama(tokenizer.vocab_size, hidden=64)
    reference = last_token_hidden_states(model, tokenizer, TEXTS, progress=False)
    model.save_pretrained(tmp_path)
    quantized = LlamaForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    )
    assert type(quantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    features = last_token_hidden_states(quantized, tokenizer, TEXTS, progress=False)
    assert features.dtype == np.float32 and features.shape == reference.shape
    assert np.corrcoef(features.ravel(), reference.ravel())[0, 1] > 0.95


def test_sentence_embedder_offline() -> None:
    embedder = SentenceEmbedder.load()
    texts = [
        "A man is eating food.",
        "The stock market fell sharply today.",
        "A man is eating a piece of bread.",
    ]
    vectors = embedder.encode(texts, batch_size=2, progress=False)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 2] > similarity[0, 1] + 0.3
    alone = np.concatenate([embedder.encode([t], progress=False) for t in texts])
    np.testing.assert_allclose(vectors, alone, atol=1e-5)  # padding and order do not matter


def test_cached_features_recompute_on_new_fingerprint(tmp_path: Path) -> None:
    calls: list[int] = []

    def compute() -> np.ndarray:
        calls.append(1)
        return np.full((3, 2), float(len(calls)), dtype=np.float32)

    path = tmp_path / "cache" / "client0.npy"
    first = cached_features(path, compute, fingerprint="model-a:data-1")
    second = cached_features(path, compute, fingerprint="model-a:data-1")
    np.testing.assert_array_equal(first, second)
    assert len(calls) == 1
    third = cached_features(path, compute, fingerprint="model-a:data-2")
    assert len(calls) == 2 and third[0, 0] == 2.0
    assert sorted(p.name for p in path.parent.iterdir()) == [
        "client0.npy",
        "client0.npy.fingerprint",
    ]


# --- baselines ------------------------------------------------------------------------------


def test_random_indices_edge_cases() -> None:
    picked = random_indices(100, ratio=0.1, seed=3)
    assert len(picked) == 10 and picked == sorted(set(picked))
    assert all(0 <= i < 100 for i in picked)
    assert picked == random_indices(100, ratio=0.1, seed=3)
    assert picked != random_indices(100, ratio=0.1, seed=4)
    assert len(random_indices(7, ratio=0.1)) == 1  # ceil keeps at least one sample
    assert random_indices(5, count=50) == [0, 1, 2, 3, 4]
    assert random_indices(0, ratio=0.5) == [] and random_indices(5, count=0) == []
    assert random_indices(4, ratio=1.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="ratio or count"):
        random_indices(10)
    with pytest.raises(ValueError, match="ratio or count"):
        random_indices(10, ratio=0.5, count=3)
    with pytest.raises(ValueError, match="ratio"):
        random_indices(10, ratio=1.5)
    with pytest.raises(ValueError, match="count"):
        random_indices(10, count=-1)
    with pytest.raises(ValueError, match="n must"):
        random_indices(-1, count=1)


def test_matched_counts_follow_the_previous_run(tmp_path: Path) -> None:
    rows = [
        {"round": 0, "eval_loss": 1.0},
        {"round": 1, "train_samples_per_client": {"0": 2, "2": 0, "1": 5}},
        {"round": 2, "train_samples_per_client": {"1": 3}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    schedule = matched_counts(tmp_path, num_rounds=2)
    assert schedule == {1: [2, 5, 0], 2: [-1, 3]}  # -1: partition 0 did not train in round 2
    assert matched_counts(tmp_path / "metrics.jsonl", num_rounds=1) == {1: [2, 5, 0]}
    with pytest.raises(ValueError, match=r"no train_samples_per_client for round 3.*\[1, 2\]"):
        matched_counts(tmp_path, num_rounds=3)
    with pytest.raises(FileNotFoundError, match="missing"):
        matched_counts(tmp_path / "missing", num_rounds=1)
    (tmp_path / "metrics.jsonl").write_text('{"round": 1,\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        matched_counts(tmp_path, num_rounds=1)

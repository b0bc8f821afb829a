"""Typed run configuration: the one place defaults live.

`conf/` only picks (group choices, and the values a group file changes); `fedinstruct.compose`
composes it against these dataclasses, so an unknown key or a value of the wrong type fails
before any model is loaded, and each dataclass's `__post_init__` checks its value ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
PARTITIONERS = ("iid", "dirichlet", "pathological", "prepartitioned")
SERVER_OPTIMIZERS = ("none", "fedadam", "fedyogi", "fedavgm", "fedprox")
AGGREGATIONS = ("mean", "median", "trimmed_mean")
DP_MODES = ("none", "central", "client")


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names it."""


def _choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


_RANGES: dict[str, Any] = {  # a rule's text is also its error message; NaN fails every rule
    "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "> 1": lambda v: v > 1,
    ">= 2": lambda v: v >= 2, "> 2": lambda v: v > 2, "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1, "in (0, 1)": lambda v: 0 < v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1, "in [0, 0.5)": lambda v: 0 <= v < 0.5,
}


def _check(section: str, settings: Any, **ranges: str) -> None:
    """`_check("train", self, lr="> 0")`: each named field (None: unset, skipped) in its range."""
    for name, rule in ranges.items():
        if (value := getattr(settings, name)) is not None and not _RANGES[rule](value):
            raise ConfigError(f"{section}.{name}".lstrip(".") + f" must be {rule}, got {value!r}")


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))
    layers_to_transform: list[int] | None = None  # decoder layer indices with LoRA (null: all)

    def __post_init__(self) -> None:
        _check("model.lora", self, r="> 0", alpha="> 0", dropout="in [0, 1)")
        if not self.target_modules:
            raise ConfigError("model.lora.target_modules must name at least one module")
        if (layers := self.layers_to_transform) is not None and (not layers or min(layers) < 0):
            raise ConfigError("model.lora.layers_to_transform must list layer indices >= 0 "
                              f"(or be null), got {layers}")


@dataclass
class TinySettings:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2

    def __post_init__(self) -> None:
        _check("model.tiny", self, **dict.fromkeys(vars(self), "> 0"))
        if self.hidden_size % self.num_attention_heads or (
                self.num_attention_heads % self.num_key_value_heads):
            raise ConfigError("model.tiny: hidden_size must be a multiple of num_attention_heads"
                              ", and num_attention_heads a multiple of num_key_value_heads")


@dataclass
class ModelSettings:
    name_or_path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    gguf_file: str | None = None
    offline_fallback: str | None = "smollm2-gguf"
    quantization: str = "4bit"
    lora: LoraSettings = field(default_factory=LoraSettings)
    tiny: TinySettings = field(default_factory=TinySettings)

    def __post_init__(self) -> None:
        _choice("model.quantization", self.quantization, ("4bit", "8bit", "none"))
        _choice("model.offline_fallback", self.offline_fallback, ("smollm2-gguf", None))


@dataclass
class FieldSettings:
    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"
    category: str | None = "category"


@dataclass
class DatasetSettings:
    name: str = "synthetic"
    source: str | None = None
    format: str = "auto"
    fields: FieldSettings = field(default_factory=FieldSettings)
    partitioner: str = "pathological"  # iid | dirichlet | pathological | prepartitioned
    label_column: str | None = "category"
    alpha: float = 0.5
    shards_per_partition: int = 2
    holdout_per_category: int = 10
    test_source: str | None = None
    test_fraction: float = 0.02
    samples_per_client: int = 64
    test_samples: int = 40

    def __post_init__(self) -> None:
        _choice("dataset.name", self.name, ("synthetic", "dolly", "alpaca", "custom"))
        _choice("dataset.format", self.format, ("auto", "dolly", "alpaca", "generic"))
        _choice("dataset.partitioner", self.partitioner, PARTITIONERS)
        _check("dataset", self, alpha="> 0", shards_per_partition="> 0",
               holdout_per_category=">= 0", test_fraction="in (0, 1)",
               samples_per_client="> 0", test_samples=">= 0")
        if self.name != "synthetic" and not self.source:
            raise ConfigError(f"dataset.source is required for dataset={self.name}")
        if self.partitioner in ("dirichlet", "pathological") and not self.label_column:
            raise ConfigError(f"dataset.label_column is needed for partitioner={self.partitioner}")


@dataclass
class FedBiOTSettings:
    adapter_layers: int = 2
    drop_ratio: float = 0.5
    align: bool = True
    pre_align_steps: int = 20
    align_steps: int = 5
    align_lr: float = 1e-3  # SmolLM2, 6 pre-alignment steps: loss -35% at 1e-3, -8% at 1e-4
    kl_weight: float = 1.0
    layerwise: bool = False
    proximal_eps: float = 0.01
    uniform_weights: bool = False
    public_dataset: str = "synthetic"  # alignment data: a dataset (or synthetic), not the clients'
    public_samples: int = 64
    emulator_path: str | None = None  # a prepared emulator folder (null: sent once, then cached)

    def __post_init__(self) -> None:
        _check("strategy.fedbiot", self, adapter_layers="> 0", drop_ratio="in [0, 1)",
               pre_align_steps=">= 0", align_steps=">= 0", align_lr="> 0", kl_weight=">= 0",
               proximal_eps=">= 0", public_samples="> 0")
        if not self.public_dataset:
            raise ConfigError("strategy.fedbiot.public_dataset must be 'synthetic' or a dataset")


@dataclass
class StrategySettings:
    name: str = "fedit"
    server_optimizer: str = "none"  # none | fedadam | fedyogi | fedavgm | fedprox (fedbiot: none)
    server_lr: float = 1e-2
    server_momentum: float = 0.9
    proximal_mu: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    reject_norm_ratio: float = 10.0  # reject an update whose norm is over this x the median
    # mean (FedAvg) | median | trimmed_mean: coordinate-wise (Flower's FedMedian/FedTrimmedAvg)
    aggregation: str = "mean"
    trim_fraction: float = 0.2  # trimmed_mean: the fraction cut at each end, per coordinate
    # an update farther from the global adapter than this x the previous round's global update
    # norm is scaled down to that distance (0: off); protects where a median cannot (< 3 nodes)
    norm_bound: float = 3.0
    fedbiot: FedBiOTSettings = field(default_factory=FedBiOTSettings)

    def __post_init__(self) -> None:
        _choice("strategy.name", self.name, ("fedit", "fedbiot"))
        _choice("strategy.server_optimizer", self.server_optimizer, SERVER_OPTIMIZERS)
        _choice("strategy.aggregation", self.aggregation, AGGREGATIONS)
        _check("strategy", self, server_lr="> 0", server_momentum="in [0, 1)",
               proximal_mu=">= 0", beta_1="in [0, 1)", beta_2="in [0, 1)", tau="> 0",
               reject_norm_ratio="> 1", trim_fraction="in [0, 0.5)", norm_bound=">= 0")
        fedbiot, robust = self.name == "fedbiot", self.aggregation != "mean"
        if self.server_optimizer != "none" and (fedbiot or robust):
            why = ("strategy=fedbiot (its server merges the averaged adapter with the aligned "
                   "emulator)" if fedbiot else f"strategy.aggregation="
                   f"{self.aggregation} (a server optimizer steps along the mean update)")
            raise ConfigError(f"strategy.server_optimizer must be 'none' with {why}, "
                              f"got {self.server_optimizer!r}")


@dataclass
class FedHDSSettings:
    # global: the global model's last-token hidden states of every layer; null: the offline
    # all-MiniLM-L6-v2 (FedHDS-Turbo); or any hub id / local folder of a sentence embedder
    feature_model: str | None = "global"
    reducer: str = "tsne"  # tsne | pca
    min_cluster_size: int = 2  # 2 for Dolly, 5 for Natural Instructions
    server_min_cluster_size: int = 2
    keep_noise: bool = False
    noise_sigma: float = 0.0  # > 0: tanh then Gaussian noise on the centroids sent up
    feature_batch_size: int = 8
    pca_dims: int | None = None  # PCA to this many dims before t-SNE (faster on big clients)
    max_centroids: int = 4096  # a client's selection reply with more centroids is refused

    def __post_init__(self) -> None:
        _choice("selection.fedhds.reducer", self.reducer, ("tsne", "pca"))
        _check("selection.fedhds", self, min_cluster_size=">= 2", server_min_cluster_size=">= 2",
               noise_sigma=">= 0", feature_batch_size="> 0", pca_dims="> 0",
               max_centroids="> 0")


@dataclass
class RandomSettings:
    ratio: float | None = None  # a fraction of the local data, or
    count: int | None = 8  # a fixed number of samples per client, or
    # a previous run's folder: each client draws, round by round, as many rows as it trained
    # on there (the paper's Random baseline at FedHDS's count); ratio and count then unused
    match_run: str | None = None

    def __post_init__(self) -> None:
        if self.match_run is not None:
            return
        if (self.ratio is None) == (self.count is None):
            raise ConfigError("set exactly one of selection.random.ratio and "
                              "selection.random.count")
        _check("selection.random", self, ratio="in (0, 1]", count="> 0")


@dataclass
class SelectionSettings:
    name: str = "all"
    reselect_every: int = 1
    fedhds: FedHDSSettings = field(default_factory=FedHDSSettings)
    random: RandomSettings = field(default_factory=RandomSettings)

    def __post_init__(self) -> None:
        _choice("selection.name", self.name, ("all", "random", "fedhds"))
        _check("selection", self, reselect_every="> 0")


@dataclass
class FederationSettings:
    num_clients: int = 3
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    round_timeout: float = 3600.0  # seconds a node has to reply to a round's message
    min_replies: int = 1  # fewer replies than this within round_timeout fail the run
    node_wait_timeout: float = 600.0  # seconds to wait for min_available_nodes to connect
    client_cpus: int = 2
    client_gpus: float = 0.0

    def __post_init__(self) -> None:
        _check("federation", self, num_clients="> 0", fraction_train="in [0, 1]",
               min_train_nodes="> 0", min_available_nodes="> 0", round_timeout="> 0", min_replies=
               "> 0", node_wait_timeout="> 0", client_cpus=">= 0", client_gpus=">= 0")
        for name in ("min_train_nodes", "min_available_nodes", "min_replies"):
            if (value := getattr(self, name)) > self.num_clients:  # every round would wait/fail
                raise ConfigError(f"federation.{name}={value} is more than federation."
                                  f"num_clients={self.num_clients}: no round could ever run")


@dataclass
class TrainSettings:
    local_steps: int = 10  # optimizer steps per round (0: use local_epochs)
    local_epochs: float = 0.0  # passes over the local (selected) data, when local_steps is 0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    template: str = "alpaca"  # alpaca | chat
    mask_prompt: bool = True
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check("train", self, local_steps=">= 0", local_epochs=">= 0", batch_size="> 0",
               grad_accum="> 0", lr="> 0", weight_decay=">= 0", max_grad_norm=">= 0",
               max_length="> 0")
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ConfigError("set train.local_steps or train.local_epochs to a value > 0")
        _choice("train.template", self.template, ("alpaca", "chat"))


@dataclass
class EvalSettings:
    every: int = 1  # server-side evaluation every N rounds (0: off)
    max_samples: int = 24  # held-out rows used for loss and Rouge-L (0: all)
    max_new_tokens: int = 16  # the synthetic answers are short; FedIT/FedHDS use 128 on Dolly
    # generation metrics (rougeL, exact_match, numeric_match) on the first N held-out rows
    # only (0: all); loss and choice_accuracy always use every held-out row
    generate_samples: int = 0
    batch_size: int = 8
    federated: bool = False  # also evaluate on each client's held-out share
    federated_fraction: float = 0.1
    quantized_base: bool = False  # the server evaluates on the dense base: CPU NF4 is ~3x slower
    # held-out metrics, each reported as eval_<name> (README, "Evaluation"): loss, rougeL,
    # exact_match, numeric_match (last number), choice_accuracy (options by log-likelihood)
    metrics: list[str] = field(default_factory=lambda: ["loss", "rougeL"])
    choices_column: str = "choices"  # choice_accuracy: the held-out rows' list of options

    METRICS = ("loss", "rougeL", "exact_match", "numeric_match", "choice_accuracy")

    def __post_init__(self) -> None:
        _check("eval", self, every=">= 0", max_samples=">= 0", max_new_tokens="> 0",
               generate_samples=">= 0",
               batch_size="> 0", federated_fraction="in [0, 1]")
        if not self.metrics or len(set(self.metrics)) < len(self.metrics):
            raise ConfigError("eval.metrics must name each metric once (set eval.every=0 to "
                              f"turn evaluation off), got {list(self.metrics)}")
        for name in self.metrics:
            _choice("eval.metrics", name, self.METRICS)
        if not self.choices_column:
            raise ConfigError("eval.choices_column must name a column")


@dataclass
class PrivacySettings:
    """Client-level differential privacy of the adapter updates, DP for FedHDS's centroids, and
    secure aggregation (docs/privacy.md says what each protects against, with numbers)."""

    dp: str = "none"  # none | central (the server clips each update) | client (clients clip)
    noise_multiplier: float = 1.0  # Gaussian noise std on the mean, in units of clip / sampled
    clip: float = 0.5  # L2 bound of one client's adapter update (distance from the global)
    delta: float = 1e-5
    target_epsilon: float | None = None  # pick noise_multiplier for num_rounds; stop at it
    centroid_dp: bool = False  # FedHDS: clip reduced features, add calibrated noise to centroids
    centroid_clip: float = 1.0  # L2 bound of one sample's reduced feature
    centroid_noise_multiplier: float = 1.0  # noise std on a cluster's sum, in units of clip
    secure_aggregation: bool = False  # SecAgg+: the server sees only the sum of the updates
    secagg_num_shares: int = 3  # SecAgg+: shares of each client's secret (>= 3)
    secagg_reconstruction_threshold: int = 2  # shares needed: how many dropouts it survives
    secagg_clipping_range: float = 8.0  # update values are clipped to +-this before quantizing
    secagg_quantization_range: int = 4194304  # quantization levels of the clipped range

    def __post_init__(self) -> None:
        _choice("privacy.dp", self.dp, DP_MODES)
        _check("privacy", self, noise_multiplier=">= 0", clip="> 0", delta="in (0, 1)",
               centroid_clip="> 0", centroid_noise_multiplier=">= 0", secagg_num_shares="> 2",
               secagg_reconstruction_threshold="> 1", secagg_clipping_range="> 0",
               secagg_quantization_range="> 1", target_epsilon="> 0")
        if self.secagg_reconstruction_threshold >= self.secagg_num_shares:
            raise ConfigError("privacy.secagg_reconstruction_threshold must be less than "
                              "privacy.secagg_num_shares: a round must survive a dropout")


@dataclass
class WireSettings:
    """How adapters travel (fedinstruct/wire.py): the server sends the global adapter in
    `format`, clients send their update as a delta from it in the same format."""

    format: str = "fp32"  # fp32 | fp16 | bf16 | int8 | nf4 (int8, nf4: bitsandbytes, blockwise)
    error_feedback: bool = True  # a client adds what it failed to send to its next update
    top_k: float = 0.0  # the fraction of update entries sent, largest first (0: all)
    budget_mb: float | None = None  # stop before a round would take the run past this (1e6 B)

    FORMATS = ("fp32", "fp16", "bf16", "int8", "nf4")

    def __post_init__(self) -> None:
        _choice("wire.format", self.format, self.FORMATS)
        _check("wire", self, top_k="in [0, 1)", budget_mb="> 0")


@dataclass
class RunConfig:
    """The whole run: what `conf/config.yaml` composes into."""

    seed: int = 42
    num_rounds: int = 3
    output_dir: str = "outputs"  # conf/config.yaml dates it; `fedinstruct` uses the job folder
    resume: bool = False
    model: ModelSettings = field(default_factory=ModelSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    wire: WireSettings = field(default_factory=WireSettings)

    def __post_init__(self) -> None:
        _check("", self, seed=">= 0", num_rounds="> 0")
        _check_privacy(self)
        _check_wire(self)
        if self.strategy.name == "fedbiot" and self.model.lora.layers_to_transform is not None:
            raise ConfigError("model.lora.layers_to_transform must be null with strategy=fedbiot:"
                              " FedBiOT puts LoRA on the adapter and emulator layers itself")


def _check_wire(cfg: RunConfig) -> None:
    """An encoded update (any wire setting but plain fp32) is a quantized delta: client-side
    clipping (Flower's clipping mod) and SecAgg+ masking work on the full float32 adapter."""
    wire, privacy = cfg.wire, cfg.privacy
    if wire.format == "fp32" and not wire.top_k:
        return
    if privacy.dp == "client" or privacy.secure_aggregation:
        mode = "privacy.dp=client" if privacy.dp == "client" else "privacy.secure_aggregation"
        raise ConfigError(f"{mode} needs wire.format=fp32 and wire.top_k=0 (got "
                          f"{wire.format!r}, {wire.top_k:g}): it works on the full float32 "
                          "update, not on an encoded delta")


def _check_privacy(cfg: RunConfig) -> None:
    """Refuse the combinations in which a privacy mode would not mean what it says."""
    privacy, strategy = cfg.privacy, cfg.strategy
    if privacy.dp != "none":
        if strategy.name != "fedit":
            raise ConfigError("privacy.dp needs strategy=fedit: FedBiOT's clients send a part of "
                              "the global state, which Flower's DP clipping does not handle")
        if strategy.server_optimizer not in ("none", "fedprox") or strategy.aggregation != "mean":
            raise ConfigError("privacy.dp needs the plain mean of the updates (strategy."
                              "server_optimizer none or fedprox, strategy.aggregation=mean): the "
                              "noise is calibrated to the sensitivity of a mean")
    if privacy.secure_aggregation:
        if strategy.name != "fedit" or cfg.selection.name == "fedhds":
            raise ConfigError("privacy.secure_aggregation runs FedIT only (strategy=fedit, "
                              "selection all or random)")
        if privacy.dp == "central":
            raise ConfigError("privacy.secure_aggregation hides each update from the server, "
                              "which cannot clip it: use privacy.dp=client")
        if strategy.aggregation != "mean":
            raise ConfigError("privacy.secure_aggregation gives the server only the sum of the "
                              f"updates: strategy.aggregation={strategy.aggregation} needs"
                              " each one")
        if cfg.federation.min_train_nodes < 2:
            raise ConfigError("privacy.secure_aggregation needs federation.min_train_nodes >= 2: "
                              "the sum of one update is that update")
    if privacy.centroid_dp and cfg.selection.name != "fedhds":
        raise ConfigError("privacy.centroid_dp applies to selection=fedhds only")

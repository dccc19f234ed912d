"""The config schema: one dataclass per YAML section, each field with its bound and meaning.

`run` holds what is computed (batch, precision, steps); `strategy` only how it is laid out
over ranks, so a strategy change never changes the loss curve.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from tetrad.config.fields import setting, yaml_key
from tetrad.config.validate import (check_world_size, raise_all, strategy_world_errors,
                                    validate_config, validate_strategy)

MAX_DEGREE = 4096  # upper bound on any parallel degree; larger is a typo, not a cluster
MAX_SIZE = 2**31 - 1  # upper bound on sizes and counts: int32 indexing; larger is a typo or overflow


def _nonempty(value: str) -> str | None:
    return None if value.strip() else "a non-empty string"


def _path(value: str) -> str | None:
    if not value.strip():
        return "a non-empty string"
    return "a path without NUL characters" if "\0" in value else None


def _inside_output(value: str) -> str | None:
    """A directory tetrad writes: absolute (anywhere you name), or relative to run.output_dir
    without '..', so a relative path can never write outside the run's directory."""
    if _path(value):
        return _path(value)
    if not os.path.isabs(value) and ".." in value.replace("\\", "/").split("/"):
        return "an absolute path, or a path relative to run.output_dir without '..' components"
    return None


DATA_KINDS = ("text", "tokens", "jsonl", "parquet", "hf")


def _data_source(value: str) -> str | None:
    kind, sep, path = value.partition(":")
    if "\0" in value:
        return "a path without NUL characters"
    if value == "builtin" or (sep and kind in DATA_KINDS and path.strip()):
        return None
    return "'builtin', 'text:PATH', 'tokens:PATH', 'jsonl:PATH', 'parquet:PATH' or 'hf:DIR'"


def _model_type(value: str) -> str | None:
    from tetrad.config.hf import check_model_type

    return check_model_type(value)


class Section:
    """Shared behaviour of every section: dump to plain YAML-able data."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (tuples as lists, YAML key names) that `load_config` reads back."""
        out = {}
        for f in dataclasses.fields(self):
            if f.init:
                out[yaml_key(f)] = _plain(getattr(self, f.name))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    return list(value) if isinstance(value, tuple) else value


@dataclasses.dataclass
class RunConfig(Section):
    output_dir: str = setting("runs/tiny", "where metrics.jsonl, TensorBoard events and checkpoints go; non-empty",
                              check=_path)
    seed: int = setting(1234, "base random seed; 0..2**32-1 (numpy's limit)", ge=0, le=2**32 - 1)
    steps: int = setting(100, "optimizer steps to train; 1..1e9", ge=1, le=10**9)
    global_batch_size: int = setting(8, "sequences per optimizer step summed over all dp ranks; 1..2**31-1",
                                     ge=1, le=MAX_SIZE)
    precision: Literal["fp32", "bf16", "fp16"] = setting("fp32", "compute dtype; master weights stay fp32")
    log_every: int = setting(1, "log metrics every N steps; 1..2**31-1", ge=1, le=MAX_SIZE)
    collective_timeout_s: float = setting(600.0, "seconds a collective waits for a dead or hung peer "
                                          "before the run fails naming it; 1..86400", ge=1.0, le=86400.0)
    max_skipped_steps: int = setting(10, "stop after this many optimizer steps in a row skipped for a "
                                     "non-finite loss or gradient; 1..1e6", ge=1, le=10**6)
    tf32: bool = setting(True, "fp32 matmuls and convolutions use TF32 tensor cores on CUDA "
                               "(10-bit mantissa inputs, fp32 accumulation); no effect on the CPU")
    compile: bool = setting(False, "torch.compile each transformer block (after recompute), as torchtitan "
                                   "does; also runs on the CPU (inductor needs a C++ compiler)")


@dataclasses.dataclass
class ModelConfig(Section):
    arch: Literal["gpt", "llama", "hf"] = setting("gpt", "model family; hf loads a Hugging Face architecture")
    vocab_size: int = setting(256, "token vocabulary size; >= 2", ge=2)
    d_model: int = setting(64, "hidden width; 1..2**31-1, a multiple of n_heads", ge=1, le=MAX_SIZE)
    n_layers: int = setting(2, "transformer blocks; 1..2**31-1", ge=1, le=MAX_SIZE)
    n_heads: int = setting(4, "attention (query) heads; 1..2**31-1, divides d_model", ge=1, le=MAX_SIZE)
    n_kv_heads: Optional[int] = setting(None, "key/value heads (GQA); null = n_heads; divides n_heads",
                                        ge=1, le=MAX_SIZE)
    d_ff: Optional[int] = setting(None, "MLP hidden width; null = the arch's default (4*d_model for gpt)",
                                  ge=1, le=MAX_SIZE)
    seq_len: int = setting(64, "tokens per training sequence; >= 2", ge=2)
    dropout: float = setting(0.0, "dropout probability; in [0, 1)", ge=0.0, lt=1.0)
    norm_eps: float = setting(1e-5, "epsilon of the layer/RMS norms; > 0", gt=0.0)
    rope_theta: float = setting(10000.0, "rotary embedding base (llama); > 0", gt=0.0)
    tie_embeddings: bool = setting(False, "share input embedding and output projection weights")
    hf_model_type: Optional[str] = setting(None, "Hugging Face model_type of a randomly initialised arch hf "
                                           "model: any causal LM of the installed transformers",
                                           check=_model_type)
    hf_path: Optional[str] = setting(None, "arch hf: a local checkpoint directory (config.json + "
                                     "*.safetensors); the architecture keys come from it", check=_path)
    # Keys the source gave explicitly (the loader fills it): with hf_path they must agree.
    given: frozenset = dataclasses.field(default_factory=frozenset, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Resolved here so model and parallel code can read an int without re-deriving it.
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads


@dataclasses.dataclass
class DataConfig(Section):
    source: str = setting("builtin", "'builtin', 'text:PATH' (raw text), 'tokens:PATH' (a token file), "
                          "'jsonl:PATH', 'parquet:PATH' (PATH a file, directory or glob) or 'hf:DIR' "
                          "(datasets.save_to_disk)", check=_data_source)
    tokenizer: str = setting("byte", "'byte' (UTF-8 bytes, vocab 256) or a directory with a saved "
                             "Hugging Face tokenizer", check=_path)
    text_field: str = setting("text", "the column holding each document's text (jsonl, parquet, hf)",
                              check=_nonempty)
    format: Literal["pretrain", "sft"] = setting("pretrain", "pretrain: documents packed with EOS; sft: "
                                                 "prompt/completion or messages, loss on completions only")
    builtin_tokens: int = setting(2_000_000, "tokens in the generated built-in corpus; 1000..2**31-1",
                                  ge=1000, le=MAX_SIZE)

    @property
    def kind(self) -> str:
        """'builtin', 'text', 'tokens', 'jsonl', 'parquet' or 'hf'."""
        return self.source.partition(":")[0]

    @property
    def path(self) -> str | None:
        """The path after 'kind:', or None for the built-in corpus."""
        return self.source.partition(":")[2] or None


@dataclasses.dataclass
class OptimizerConfig(Section):
    name: Literal["adamw"] = setting("adamw", "optimizer algorithm")
    lr: float = setting(3e-4, "peak learning rate; in (0, 10]", gt=0.0, le=10.0)
    betas: tuple[float, float] = setting(factory=lambda: (0.9, 0.95), doc="Adam (beta1, beta2); each in [0, 1)",
                                         ge=0.0, lt=1.0)
    eps: float = setting(1e-8, "Adam denominator epsilon; > 0", gt=0.0)
    weight_decay: float = setting(0.1, "decoupled weight decay; >= 0", ge=0.0)
    grad_clip: float = setting(1.0, "max global gradient norm; >= 0, 0 disables clipping", ge=0.0)
    warmup_steps: int = setting(10, "linear warmup steps from 0 to lr; 0..2**31-1", ge=0, le=MAX_SIZE)
    schedule: Literal["cosine", "constant", "linear"] = setting("cosine", "lr decay after warmup")
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of lr; in [0, 1]", ge=0.0, le=1.0)
    state_dtype: Literal["fp32", "bf16"] = setting(
        "fp32", "dtype Adam's moments (exp_avg, exp_avg_sq) are stored in; bf16 rounds them "
        "stochastically (tetrad.zero.compact); the fp32 masters stay fp32")


@dataclasses.dataclass
class OffloadConfig(Section):
    optimizer: Literal["none", "cpu", "nvme"] = setting("none", "where optimizer state lives")
    params: Literal["none", "cpu", "nvme"] = setting("none", "where sharded parameters rest between uses; zero 3")
    nvme_dir: Optional[str] = setting(None, "directory for nvme-tier files; required by either nvme tier",
                                      check=_nonempty)
    step: Literal["sync", "overlap", "delayed"] = setting(
        "sync", "when the host step runs: sync after backward; overlap each gradient bucket as "
        "backward reduces it (zero 2/3, grad_clip 0, no fp16, pp 1); delayed ZeRO-Offload's "
        "one-step delayed update, during the next forward/backward")
    host_memory_gb: Union[float, Literal["auto"]] = setting(
        0.0, "host memory (GiB) the nvme tiers may keep state in instead of files, the state with "
        "the most disk traffic per byte first (parameters, then fp32 masters, then Adam moments); "
        "auto = memory available at start minus a safety margin; 0 = stream everything from disk "
        "(bounded buffers); >= 0, needs an nvme tier", ge=0.0, le=2.0**40)
    # The two booleans this key replaced fail naming it (tetrad.config.fields.replaced_key).
    REPLACED: ClassVar[dict] = {"overlap_step": ("step", lambda v: "overlap" if v else "sync"),
                                "delayed_update": ("step", lambda v: "delayed" if v else "sync")}

    @property
    def active(self) -> bool:
        """Some state rests below the device."""
        return self.optimizer != "none" or self.params != "none"


@dataclasses.dataclass
class ZeroPPConfig(Section):
    """ZeRO++ (Wang et al., arXiv:2306.10209): less ZeRO-3 traffic across nodes."""

    quantize_weights: bool = setting(False, "qwZ: int8 block-quantized parameter all-gathers (per-block "
                                            "fp32 scales); zero 3; approximate: error <= block max/254")
    quantize_grads: bool = setting(False, "qgZ: gradients averaged by a quantized hierarchical all-to-all "
                                          "(inside the node, then across); zero 2 or 3; approximate")
    hpz: int = setting(1, "hpZ: a secondary copy of the parameter shards within groups of this many dp "
                          "ranks (a node), so backward gathers stay there; 1 = off; zero 3, divides "
                          "dp_shard; 1..4096", ge=1, le=MAX_DEGREE)

    @property
    def active(self) -> bool:
        return self.quantize_weights or self.quantize_grads or self.hpz > 1


@dataclasses.dataclass
class StrategyConfig(Section):
    # `strategy: auto` in YAML is shorthand for a mapping with only `auto: true`.
    SCALAR_FORMS: ClassVar[dict[str, dict]] = {"auto": {"auto": True}}
    SECTIONS: ClassVar[tuple[str, ...]] = ("offload", "zeropp")  # nested sections

    auto: bool = setting(False, "let the selector choose every key not given explicitly")
    tp: int = setting(1, "tensor-parallel degree; 1..4096", ge=1, le=MAX_DEGREE)
    pp: int = setting(1, "pipeline stages; 1..4096", ge=1, le=MAX_DEGREE)
    sp: int = setting(1, "sequence-parallel (Ulysses) degree, own mesh axis; 1..4096", ge=1, le=MAX_DEGREE)
    cp: int = setting(1, "context-parallel (ring attention) degree, own mesh axis; each rank holds 1/cp "
                      "of every sequence; 1..4096", ge=1, le=MAX_DEGREE)
    cp_load_balance: bool = setting(True, "context parallelism: each rank holds two mirrored chunks of "
                                    "2*cp (zigzag), which evens the causal attention work over ranks")
    megatron_sp: bool = setting(False, "Megatron sequence parallelism inside the tp group")
    dp: Union[int, Literal["auto"]] = setting("auto", "data-parallel degree 1..4096, or auto = world/(tp*pp*sp*cp)",
                                              ge=1, le=MAX_DEGREE)
    zero: int = setting(0, "ZeRO stage 0..3: 0 plain DP, 1 +optimizer, 2 +gradients, 3 +parameters sharded",
                        ge=0, le=3)
    dp_shard: Union[int, Literal["auto"]] = setting(
        "auto", "hybrid sharding: ZeRO shards within groups of this many dp ranks and replicates across "
        "dp/dp_shard groups (zero >= 1); auto = dp (flat ZeRO); 1..4096, divides dp", ge=1, le=MAX_DEGREE)
    zeropp: ZeroPPConfig = setting(factory=ZeroPPConfig, doc="ZeRO++ communication: qwZ, qgZ, hpZ")
    ranks_per_node: Union[int, Literal["auto"]] = setting(
        "auto", "ranks on one node (consecutive ranks share a node); auto = the launcher's local world "
        "size (torchrun LOCAL_WORLD_SIZE, MPI local size, SLURM tasks per node); 1..4096",
        ge=1, le=MAX_DEGREE)
    micro_batch_size: int = setting(1, "sequences per micro-batch per dp rank; 1..2**31-1", ge=1, le=MAX_SIZE)
    recompute: Literal["none", "selective", "full", "budget"] = setting("none", "activation recomputation policy")
    recompute_budget_mb: Optional[float] = setting(None, "activation memory budget per rank, MB; > 0, "
                                                   "required by recompute budget", gt=0.0)
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved", "zero_bubble", "zero_bubble_v",
                               "breadth_first"] = setting(
        "1f1b", "pipeline order; zero_bubble_v runs two chunks per rank in a V, breadth_first "
        "virtual_stages looped chunks, every micro-batch through one before the next")
    virtual_stages: int = setting(1, "model chunks per pipeline rank (interleaved, breadth_first); 1..4096",
                                  ge=1, le=MAX_DEGREE)
    pp_split: Optional[tuple[int, ...]] = setting(
        None, "layer boundaries between pipeline chunks (pp*chunks-1 increasing layer indices, e.g. "
        "[3, 6, 8]); null = balanced by modelled cost, the embedding and the output layer counted", ge=1)
    bucket_mb: float = setting(25.0, "gradient communication bucket size, MB; > 0", gt=0.0)
    offload: OffloadConfig = setting(factory=OffloadConfig, doc="CPU/NVMe offload tiers")
    verify: int = setting(0, "under auto: run a few real steps of the K best predicted layouts and keep the "
                          "measured best; 0 trusts the cost model; 0..16", ge=0, le=16)
    # Keys (dotted, e.g. "offload.optimizer") the source gave explicitly; the loader fills it.
    given: frozenset = dataclasses.field(default_factory=frozenset, init=False, compare=False, repr=False)

    @property
    def model_parallel_size(self) -> int:
        """Ranks one model replica spans: tp * pp * sp * cp."""
        return self.tp * self.pp * self.sp * self.cp

    @property
    def chunks_per_rank(self) -> int:
        """Model chunks each pipeline rank holds: two under zero_bubble_v (the V), else
        virtual_stages."""
        return 2 if self.pipeline_schedule == "zero_bubble_v" else self.virtual_stages

    def resolve_dp(self, world_size: int) -> int:
        """The data-parallel degree on `world_size` ranks (dp itself, or world/(tp*pp*sp*cp))."""
        check_world_size(world_size)
        raise_all(strategy_world_errors(self, world_size))
        return world_size // self.model_parallel_size if self.dp == "auto" else self.dp

    def resolve_dp_shard(self, world_size: int) -> int:
        """dp ranks per ZeRO shard group: dp_shard itself, or dp (flat ZeRO)."""
        return self.resolve_dp(world_size) if self.dp_shard == "auto" else self.dp_shard

    def resolve_ranks_per_node(self, launcher: int) -> int:
        """Ranks per node: ranks_per_node itself, or what the launcher says (``launcher``)."""
        return launcher if self.ranks_per_node == "auto" else self.ranks_per_node

    def fixed_keys(self) -> frozenset[str]:
        """Keys the selector must keep: those given explicitly or differing from the default."""
        default = _flatten(StrategyConfig().to_dict(full=True))
        flat = _flatten(self.to_dict(full=True))
        return self.given | {k for k, v in flat.items() if default.get(k) != v}

    def to_dict(self, full: bool = False) -> dict[str, Any]:
        """Under auto, only the fixed keys (so a reload leaves the rest to the selector)."""
        out = super().to_dict()
        if full or not self.auto:
            return out
        keep = self.fixed_keys() | {"auto"}
        part = {k: v for k, v in out.items() if k in keep and k not in self.SECTIONS}
        for section in self.SECTIONS:
            inner = {k: v for k, v in out[section].items() if f"{section}.{k}" in keep}
            part |= {section: inner} if inner else {}
        return part

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError for bad fields, impossible combinations, or a mismatched world."""
        validate_strategy(self, world_size)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out |= _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v}
    return out


@dataclasses.dataclass
class CheckpointConfig(Section):
    dir: Optional[str] = setting(None, "checkpoint directory: absolute, or relative to run.output_dir "
                                 "without '..'; null = <run.output_dir>/checkpoints", check=_inside_output)
    every: int = setting(0, "save every N steps; 0..2**31-1, 0 = only when a preemption signal "
                         "(SIGTERM/SIGINT/SIGUSR1) stops the run", ge=0, le=MAX_SIZE)
    keep: int = setting(2, "most recent checkpoints kept on disk; 1..2**31-1", ge=1, le=MAX_SIZE)
    async_save: bool = setting(True, "flush to disk in the background while training continues", key="async")
    resume: str = setting("auto", "'auto' (latest in dir, if any), 'none', or a checkpoint path", check=_nonempty)
    max_failures: int = setting(3, "stop the run after this many checkpoint saves in a row fail (full disk, "
                                "I/O error, lost directory); a failed save never harms the last committed "
                                "one; 1..1e6", ge=1, le=10**6)

    def resolve_dir(self, output_dir: str) -> str:
        """`dir` (a relative one under `output_dir`), or `<output_dir>/checkpoints` when unset."""
        return os.path.join(output_dir, self.dir if self.dir is not None else "checkpoints")


@dataclasses.dataclass
class LoggingConfig(Section):
    tensorboard: bool = setting(True, "write TensorBoard event files under run.output_dir")
    progress: bool = setting(True, "show a progress bar on rank 0 when attached to a terminal")


@dataclasses.dataclass
class Config(Section):
    run: RunConfig = setting(factory=RunConfig, doc="what is computed: steps, batch, precision")
    model: ModelConfig = setting(factory=ModelConfig, doc="model architecture and size")
    data: DataConfig = setting(factory=DataConfig, doc="training corpus")
    optimizer: OptimizerConfig = setting(factory=OptimizerConfig, doc="optimizer and lr schedule")
    strategy: StrategyConfig = setting(factory=StrategyConfig, doc="how the run is laid out over ranks")
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, doc="saving and resuming")
    logging: LoggingConfig = setting(factory=LoggingConfig, doc="TensorBoard and progress bar")

    @property
    def checkpoint_dir(self) -> str:
        """The checkpoint directory with its default resolved against run.output_dir."""
        return self.checkpoint.resolve_dir(self.run.output_dir)

    def dp_degree(self, world_size: int) -> int:
        """Data-parallel degree on `world_size` ranks."""
        return self.strategy.resolve_dp(world_size)

    def num_micro_batches(self, world_size: int) -> int:
        """Micro-batches each dp rank runs per optimizer step."""
        per_rank = self.dp_degree(world_size) * self.strategy.micro_batch_size
        return self.run.global_batch_size // per_rank

    def validate(self, world_size: int | None = None) -> None:
        """Raise ConfigError for bad fields or combinations; with world_size, the layout too."""
        validate_config(self, world_size)

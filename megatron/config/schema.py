"""Typed configuration tree.

Every leaf field is addressable from YAML by its flat NeoX-style name (``hidden_size``,
``train_iters`` ...), so flat NeoX configs load unchanged; a section may also be written nested
(``sepllm: {mode: sepllm, ...}``). Field names are unique across sections for that reason.
Each field's ``metadata["help"]`` feeds the generated key reference (``docs/config_reference.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from megatron.sepllm.config import SepLLMConfig

__all__ = ["SepLLMConfig"]  # re-exported: every section of Config is importable from here

# Enumerated keys: validate() checks every Literal-typed field, however the config was built
# (megatron/config/checks.py).
Activation = Literal["gelu", "swiglu"]
NormKind = Literal["layernorm", "rmsnorm"]
PosEmb = Literal["rotary", "learned", "none"]
AttentionType = Literal["multihead", "groupedquery"]
InitMethod = Literal["small_init", "normal"]
OutputInitMethod = Literal["wang_init", "scaled_normal", "normal"]
OptimizerType = Literal["adamw", "adam"]
DecayStyle = Literal["constant", "linear", "cosine"]
Precision = Literal["fp32", "bfloat16", "fp16"]
WandbMode = Literal["offline", "online", "disabled"]
LauncherKind = Literal["pdsh", "openmpi", "mpich", "mvapich", "impi", "slurm"]
RankSource = Literal["auto", "slurm", "mpi", "none"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    num_layers: int = _f(2, "Number of transformer blocks.", ge=1)
    hidden_size: int = _f(128, "Model width d_model.", ge=1)
    num_attention_heads: int = _f(4, "Query heads; hidden_size must divide evenly.", ge=1)
    num_kv_heads: int | None = _f(
        None,
        "Key/value heads for grouped-query attention (None = num_attention_heads).",
        ge=1,
    )
    seq_length: int = _f(128, "Training sequence length in tokens.", ge=1)
    max_position_embeddings: int | None = _f(
        None,
        "Largest position the model supports (None = seq_length).",
        ge=1,
    )
    intermediate_size: int | None = _f(
        None,
        "Width of the MLP hidden layer, i.e. the output width of ONE up projection (for swiglu "
        "the gate and the up projection each have this width). None = 4*hidden_size for gelu, "
        "and the Llama rule 256*ceil(8*hidden/3/256) for swiglu. With mlp_multiple_of set it "
        "is read as NeoX reads it instead (see mlp_multiple_of).",
        ge=1,
    )
    mlp_multiple_of: int | None = _f(
        None,
        "NeoX's MLP sizing (NeoX's Llama configs set it): intermediate_size (None = "
        "4*hidden_size) is NeoX's value, and the width of one up projection is, for swiglu, "
        "multiple*ceil((int(I*2/3)//2)/multiple) (llama/7B.yml: 32768 -> 11008), for gelu I "
        "rounded up to 2*multiple. None = our meaning of intermediate_size.",
        ge=1,
    )
    attention_type: AttentionType | None = _f(
        None,
        "NeoX's attention_type: multihead (num_kv_heads must equal the heads) or groupedquery "
        "(needs num_kv_heads); None = decided by num_kv_heads.",
    )
    activation: Activation = _f("gelu", "MLP activation: gelu (NeoX) or swiglu (Llama).")
    gpt_j_residual: bool = _f(False, "Parallel residual: x + attn(ln1(x)) + mlp(ln2(x)).")
    no_weight_tying: bool = _f(False, "Untie the output head from the input embedding.")
    make_vocab_size_divisible_by: int = _f(128, "Pad the vocabulary to a multiple of this.", ge=1)
    init_method: InitMethod = _f("small_init", "Init of input-side weights: small_init or normal.")
    output_layer_init_method: OutputInitMethod = _f(
        "wang_init", "Init of residual-output weights: wang_init, scaled_normal or normal."
    )
    init_method_std: float = _f(0.02, "Std of the `normal` init methods.", gt=0)
    pos_emb: PosEmb = _f("rotary", "Position embedding: rotary, learned or none.")
    rotary_pct: float = _f(
        1.0,
        "Fraction of each head's dims that get rotary (NeoX partial rotary).",
        gt=0,
        le=1,
    )
    rotary_emb_base: float = _f(10000.0, "RoPE base (theta).", gt=0)
    norm: NormKind = _f("layernorm", "layernorm (NeoX) or rmsnorm (Llama).")
    layernorm_epsilon: float = _f(1e-5, "Epsilon of LayerNorm / RMSNorm.", gt=0)
    use_bias_in_attn_linear: bool = _f(True, "Biases in the attention projections.")
    use_bias_in_qkv: bool | None = _f(
        None,
        "Biases in the q/k/v projections (None: use_bias_in_attn_linear); true with "
        "use_bias_in_attn_linear false is Qwen2's layout.",
    )
    use_bias_in_mlp: bool = _f(True, "Biases in the MLP projections.")
    use_bias_in_norms: bool = _f(True, "Bias in LayerNorm (ignored by RMSNorm).")
    attention_dropout: float = _f(
        0.0, "Dropout on attention probabilities (dense kernels only).", ge=0, lt=1
    )
    hidden_dropout: float = _f(0.0, "Dropout on residual branches.", ge=0, lt=1)
    rope_fusion: bool = _f(
        False,
        "Fused rotary kernel (CUDA extension or Triton); falls back to the PyTorch reference "
        "with one warning where none runs (see docs/fused_kernels.md).",
    )
    layernorm_fusion: bool = _f(
        False,
        "Fused LayerNorm kernel (CUDA extension, Triton or apex) when norm is layernorm; "
        "falls back to the PyTorch reference with one warning.",
    )
    rmsnorm_fusion: bool = _f(
        False,
        "Fused RMSNorm kernel (CUDA extension, Triton or apex) when norm is rmsnorm; falls "
        "back to the PyTorch reference with one warning.",
    )

    # Values derived from this section alone: read these, never recompute them.
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        explicit = self.use_bias_in_qkv
        return self.use_bias_in_attn_linear if explicit is None else explicit

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dims(self) -> int:
        """Leading dims of each head that get rotary (0 without rotary)."""
        return int(self.head_dim * self.rotary_pct) if self.pos_emb == "rotary" else 0

    @property
    def ffn_size(self) -> int:
        """Width of one MLP up projection (the Llama rule for swiglu, 4 x hidden for gelu;
        NeoX's rule when mlp_multiple_of is set)."""
        if self.mlp_multiple_of is not None:
            return neox_ffn_sizes(self)[1]
        if self.intermediate_size is not None:
            return self.intermediate_size
        if self.activation == "swiglu":
            return 256 * math.ceil(8 * self.hidden_size / 3 / 256)
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of the fused projection's parts: q (H*D), k (Hkv*D), v (Hkv*D)."""
        return (
            self.num_attention_heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.kv_heads * self.head_dim,
        )


def neox_ffn_sizes(m: ModelConfig) -> tuple[int, int]:
    """NeoX's ParallelMLP sizes for mlp_multiple_of = k: (output width of its first linear,
    input width of its second). Gated: the first linear holds gate and up, so one up
    projection is the second width; gelu: both must agree (validate_model checks)."""
    k = m.mlp_multiple_of or 1
    ffn = m.intermediate_size or 4 * m.hidden_size
    ffn_in = ffn
    if m.activation == "swiglu":
        ffn = int(ffn * 2 / 3)
        ffn_in = ffn // 2
    return 2 * k * math.ceil(ffn / (2 * k)), k * math.ceil(ffn_in / k)


@dataclass
class OptimizerConfig:
    optimizer_type: OptimizerType = _f(
        "adamw", "adamw or adam (decoupled decay both ways, torch AdamW)."
    )
    lr: float = _f(6e-4, "Peak learning rate.", gt=0)
    adam_beta1: float = _f(0.9, "Adam beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.95, "Adam beta2.", ge=0, lt=1)
    adam_eps: float = _f(1e-8, "Adam epsilon.", gt=0)
    weight_decay: float = _f(0.1, "Decoupled weight decay (not applied to biases and norms).", ge=0)
    gradient_clipping: float = _f(1.0, "Clip the global grad norm to this (0 = off).", ge=0)


@dataclass
class ScheduleConfig:
    lr_decay_style: DecayStyle = _f("cosine", "constant, linear or cosine (after warmup).")
    lr_decay_iters: int | None = _f(None, "Decay length in iterations (None = train_iters).", ge=1)
    warmup: float = _f(0.01, "Warmup as a fraction of lr_decay_iters.", ge=0, le=1)
    min_lr: float = _f(0.0, "Floor of the decayed learning rate.", ge=0)
    warmup_iters: int | None = _f(
        None, "Warmup in iterations; when set it replaces `warmup` (a fraction).", ge=0
    )
    decay_lr_to: float | None = _f(
        None,
        "Floor of the decayed learning rate as a fraction of lr (min_lr = decay_lr_to * lr); "
        "not with a nonzero min_lr.",
        ge=0,
        le=1,
    )
    override_lr_scheduler: bool = _f(
        False,
        "On resume, apply this config's lr, min_lr, warmup, decay, weight_decay and Adam "
        "betas/eps from the resumed step on (NeoX's option). Without it a resume whose values "
        "differ from the checkpoint's config is refused, naming the keys.",
    )


@dataclass
class TrainingConfig:
    train_iters: int = _f(100, "Optimizer steps to run.", ge=1)
    train_micro_batch_size_per_gpu: int | None = _f(
        None, "Sequences per rank per micro step.", ge=1
    )
    gradient_accumulation_steps: int | None = _f(None, "Micro steps per optimizer step.", ge=1)
    train_batch_size: int | None = _f(
        None,
        "Global batch = micro * accumulation * data-parallel size; any two give the third.",
        ge=1,
    )
    precision: Precision = _f("fp32", "fp32, bfloat16 or fp16 (fp16 needs a GPU).")
    zero_optimization: dict = _f({"stage": 0}, "DeepSpeed zero_optimization block, passed through.")
    fp16_settings: dict = _f(
        {},
        "Entries of DeepSpeed's fp16 block used when precision is fp16 (loss_scale, "
        "initial_scale_power, loss_scale_window, hysteresis, min_loss_scale, auto_cast, ...); "
        "NeoX's `fp16:` block fills it. Default: dynamic loss scaling from 2**16.",
    )
    exit_interval: int | None = _f(
        None,
        "Stop (with a checkpoint) after this iteration, e.g. to fit a job time limit.",
        ge=1,
    )
    checkpoint_activations: bool = _f(False, "Recompute each block in backward.")
    seed: int = _f(1234, "Seed of init, data order and dropout.", ge=0)
    skip_nonfinite_steps: bool = _f(
        False,
        "Skip an optimizer step whose loss or grad norm is NaN/inf (no update; counted as "
        "`skipped` in the log) instead of stopping the run. Plain engine with ZeRO stage 0.",
    )
    deepspeed_extra: dict = _f({}, "Extra DeepSpeed config entries merged last (expert use).")


@dataclass
class DataConfig:
    data_path: str | None = _f(None, "One .bin/.idx prefix, split by `split`.")
    split: str = _f("969,30,1", "train,valid,test proportions of data_path.")
    train_data_paths: list[str] = _f([], "Train prefixes (instead of data_path).")
    valid_data_paths: list[str] = _f([], "Validation prefixes.")
    test_data_paths: list[str] = _f([], "Test prefixes.")
    train_data_weights: list[float] = _f([], "Blend weights of train_data_paths.")
    valid_data_weights: list[float] = _f([], "Blend weights of valid_data_paths.")
    test_data_weights: list[float] = _f([], "Blend weights of test_data_paths.")
    data_cache_dir: str | None = _f(None, "Where index arrays are cached (None = beside data).")
    tokenizer_type: str = _f("HFTokenizer", "HFTokenizer, SPMTokenizer, GPT2BPETokenizer, ...")
    vocab_file: str | None = _f(None, "Tokenizer file (tokenizer.json, .model, vocab.json ...).")
    merge_file: str | None = _f(None, "merges.txt for GPT2BPETokenizer.")
    eod_mask_loss: bool = _f(False, "Do not train on predicting the token after an EOD.")
    num_workers: int = _f(0, "DataLoader worker processes.", ge=0)
    prepare_data: str | None = _f(
        None, "Bundled corpus to build if data_path is missing: 'shakespeare' or None."
    )


@dataclass
class CheckpointConfig:
    save: str | None = _f(None, "Directory to save checkpoints to.")
    load: str | None = _f(None, "Directory to resume / fine-tune from.")
    checkpoint_factor: int = _f(1000, "Save every this many iterations (and at the end).", ge=1)
    extra_save_iters: list[int] = _f(
        [], "Also save at these iterations (0 = the initial weights, before the first step)."
    )
    keep_last_n_checkpoints: int | None = _f(
        None, "Delete older checkpoints (None = keep all).", ge=1
    )
    finetune: bool = _f(False, "Load weights only and restart at iteration 0.")
    iteration: int | None = _f(None, "Load this iteration instead of `latest`.", ge=0)
    allow_fresh_start: bool = _f(
        False, "If `load` holds no checkpoint, start fresh instead of stopping with an error."
    )
    overwrite_checkpoints: bool = _f(
        False,
        "Let a run that does not resume from `save` start there anyway: the directory's "
        "existing checkpoints and `latest` are deleted before the first step (otherwise such "
        "a run is refused).",
    )
    allow_unsafe_checkpoint_load: bool = _f(
        False,
        "Load checkpoint files with torch.load(weights_only=False), which can run code stored "
        "in them; only for trusted files from older versions holding other objects (warns).",
    )
    save_on_stop: bool = _f(
        True,
        "When SIGTERM / SIGINT stops training, save a checkpoint of the last finished step "
        "before exiting (unless one was just saved). A save cut off by a later SIGKILL leaves "
        "no COMPLETE marker, so `latest` still names the last complete checkpoint.",
    )
    verify_checkpoint_checksums: bool = _f(
        True,
        "Check every file of a COMPLETE checkpoint against the checksums written with it "
        "before loading (one read of the checkpoint, shared by the ranks).",
    )


@dataclass
class LoggingConfig:
    log_interval: int = _f(10, "Iterations between rank-0 log lines.", ge=1)
    eval_interval: int = _f(100, "Iterations between validation runs (0 = never).", ge=0)
    eval_iters: int = _f(10, "Validation batches per evaluation.", ge=1)
    use_wandb: bool = _f(False, "Log to Weights & Biases.")
    wandb_project: str = _f("sepneox", "W&B project.")
    wandb_mode: WandbMode = _f("offline", "W&B mode: offline, online or disabled.")
    wandb_team: str | None = _f(None, "W&B entity (team) of the run.")
    wandb_group: str | None = _f(None, "W&B group of the run.")
    wandb_dir: str | None = _f(None, "W&B directory (None = save dir or ./wandb).")
    tensorboard_dir: str | None = _f(None, "TensorBoard event directory (None = off).")
    metrics_jsonl: str | None = _f(
        None, "Append every step's metrics as one JSON line to this file (rank 0)."
    )


@dataclass
class ParallelConfig:
    model_parallel_size: int = _f(1, "Tensor-parallel degree.", ge=1)
    pipe_parallel_size: int = _f(0, "Pipeline stages (0 = no pipeline engine).", ge=0)
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs TP > 1).")


@dataclass
class LauncherConfig:
    num_gpus: int | None = _f(
        None,
        "Processes per node (GPUs; on CPU-only hosts, CPU ranks). None = all GPUs or 1.",
        ge=1,
    )
    num_nodes: int = _f(
        -1,
        "Nodes to use: the first N hosts of the hostfile or Slurm allocation (-1 = all). "
        "With node_rank it is the job's node count.",
    )
    hostfile: str | None = _f(None, "DeepSpeed hostfile: lines 'host slots=N'.")
    include: str | None = _f(
        None, "Hosts/slots to use, e.g. 'worker-0@worker-1:0,2' (not with num_nodes/num_gpus)."
    )
    exclude: str | None = _f(None, "Hosts/slots to leave out, same syntax as include.")
    master_addr: str | None = _f(
        None, "Rendezvous address (node 0). None = 127.0.0.1, ssh, Slurm's first host or MPI."
    )
    master_port: int = _f(29500, "Rendezvous port.", ge=1, le=65535)
    launcher: LauncherKind = _f(
        "pdsh",
        "Multi-node launcher: pdsh (ssh), openmpi, mpich, mvapich, impi (mpirun through the "
        "DeepSpeed runner) or slurm (srun inside an allocation). See docs/launch.md.",
    )
    launcher_args: str | None = _f(
        None, "Extra arguments for pdsh / mpirun / srun, one string (e.g. '--mca ...')."
    )
    node_rank: int | None = _f(
        None,
        "No-SSH per-node mode: this node's index in [0, num_nodes). Every node runs "
        "`deepy.py ... --node-rank K` and starts its own ranks; needs master_addr.",
        ge=0,
    )
    no_ssh: bool = _f(False, "Start only this node's ranks without pdsh/ssh (needs node_rank).")
    rank_source: RankSource = _f(
        "auto",
        "Where train.py finds its rank when no launcher set RANK: auto (MPI variables under "
        "mpirun; Slurm's when launcher is slurm), slurm, mpi, or none (one process).",
    )
    force_multi: bool = _f(False, "Use the multi-node launcher even on one node.")
    no_ssh_check: bool = _f(False, "Skip the DeepSpeed runner's SSH check.")


@dataclass(frozen=True)
class RunShape:
    """The run's shape, computed once by `finalize` from the config, the world size and the
    tokenizer; the config's own batch keys keep what the user wrote."""

    world_size: int
    data_parallel_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int  # micro_batch * grad_accum * data_parallel_size
    vocab_size: int  # the tokenizer's
    padded_vocab_size: int  # rows of the embedding (a multiple of divisible_by x TP)
    windows: tuple[int, ...]  # SepLLM window of each layer (seq_length = full attention)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    sepllm: SepLLMConfig = field(default_factory=SepLLMConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # Set by finalize(); never read from YAML.
    derived: RunShape | None = None


SECTIONS: tuple[str, ...] = (
    "model",
    "sepllm",
    "optimizer",
    "schedule",
    "training",
    "data",
    "checkpoint",
    "logging",
    "parallel",
    "launcher",
)

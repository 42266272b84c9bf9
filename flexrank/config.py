"""The run recipe: one YAML file, validated up front. Every error names the key, the value and what is allowed."""

import dataclasses
import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .data.sources import CANONICAL_COLUMNS
from .errors import ConfigError, ConfigErrors
from .recipe_paths import resolve_recipe_paths


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string; recipes are full of such learning rates, so read them as floats."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False, validate_assignment=True)


class QuantizationConfig(_Section):
    """bitsandbytes 4-bit (QLoRA; quant_storage other than uint8 lets FSDP/ZeRO-3 shard the packed weights), or
    nncf INT4 quantization-aware training (`method: nncf_int4`: mode, group_size, backup; see adapters/nncf.py), or
    float LoRA then nncf post-training INT4 compression of the merged model (`nncf_int4_ptq`, same keys)."""
    method: Literal["bitsandbytes", "nncf_int4", "nncf_int4_ptq"] = "bitsandbytes"
    mode: Literal["int4_asym", "int4_sym"] = "int4_asym"
    group_size: int = Field(64, gt=0)
    backup: Literal["none", "int8"] = "none"  # none: embeddings/lm_head stay float (no C++ extension build)
    load_in_4bit: Literal[True] = True
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    bnb_4bit_quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "bfloat16"


class ModelConfig(_Section):
    name_or_path: str = "smollm2-135m-instruct"
    task_type: Literal["causal_lm", "seq_cls"] = "causal_lm"
    num_labels: int = Field(2, ge=2)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["auto", "flash_attention_2", "varlen", "sdpa", "eager"] = "auto"
    liger_kernel: Literal["auto", True, False] = False
    quantization: QuantizationConfig | None = None
    gradient_checkpointing: bool = False
    revision: str | None = None      # hub ids: a branch, tag or commit; config.yaml records the commit used
    trust_remote_code: bool = False  # run modelling code shipped with the model (only for models you trust)

    @model_validator(mode="after")
    def _source(self):
        from .models.assets import model_source
        from .models.kernels import attention_dtype_problem

        if (problem := attention_dtype_problem(self.attn_implementation, self.dtype)) is not None:
            raise problem

        source = model_source(self.name_or_path)
        if self.revision is not None and source != "hub":
            raise ConfigError("model.revision", self.revision, "only with a hub id (org/name) in model.name_or_path",
                              f"{self.name_or_path!r} is a {source} model")
        return self




def _check_columns(columns: dict[str, str] | None, key: str) -> dict[str, str] | None:
    for field, column in (columns or {}).items():
        if field not in CANONICAL_COLUMNS:
            raise ConfigError(f"{key}.{field}", column, f"record fields {list(CANONICAL_COLUMNS)} mapped to your column names",
                              f"e.g. {key}: {{instruction: question, output: answer}}")
    return columns


class DataSourceConfig(_Section):
    """One of several mixed sources (data.datasets): a file or hub id, its columns, its share of the mixture."""
    path: str
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    columns: dict[str, str] | None = None
    weight: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _columns(self):
        _check_columns(self.columns, "data.datasets.columns")
        return self


class DataConfig(_Section):
    task: str | None = "analogy"
    path: str | None = None         # a json/jsonl/csv/parquet/txt file, or a hub dataset id (org/name)
    name: str | None = None         # hub dataset config
    split: str = "train"            # hub dataset split ("train[:10%]" slices)
    eval_split: str | None = None   # hub dataset split for the held-out records (default: a seeded share of split)
    revision: str | None = None     # hub dataset branch, tag or commit
    columns: dict[str, str] | None = None  # record field -> your column name, e.g. {instruction: question}
    datasets: list[DataSourceConfig] | None = None  # several sources mixed by weight (instead of path)
    eval_path: str | None = None
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    max_length: int = Field(128, gt=0)
    truncation: Literal["left", "middle"] = "left"  # which part of an over-long prompt goes; the answer stays
    min_prompt_length: int = Field(8, ge=1)         # records whose answer leaves less room for the prompt are dropped
    num_proc: int | None = Field(None, ge=1)        # processes for tokenizing (large sets)
    packing: bool = False
    response_only_loss: bool = True
    train_size: int | None = Field(None, gt=0)
    eval_size: int = Field(200, gt=0)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _path_replaces_default_task(cls, raw):
        if isinstance(raw, dict) and (raw.get("path") or raw.get("datasets")):
            if raw.get("task"):
                raise ConfigError("data.task", raw["task"], "no data.task together with data.path or data.datasets",
                                  "a bundled task or your own data, not both")
            raw = {**raw, "task": None}
        return raw

    @model_validator(mode="after")
    def _one_source(self):
        if not self.task and not self.path and not self.datasets:
            raise ConfigError("data.task", self.task, "a bundled task name, or set data.path (json/jsonl/csv/parquet/"
                              "txt file or hub dataset id) or data.datasets")
        if self.path and self.datasets:
            raise ConfigError("data.datasets", len(self.datasets), "data.path or data.datasets, not both",
                              "list the file under data.datasets with its weight")
        _check_columns(self.columns, "data.columns")
        from .data.sources import is_hub_dataset

        hub_only = {"name": self.name, "eval_split": self.eval_split, "revision": self.revision}
        for key, value in hub_only.items():
            if value is not None and not (self.path and is_hub_dataset(self.path)):
                raise ConfigError(f"data.{key}", value, "only with a hub dataset id (org/name) in data.path",
                                  f"data.path is {self.path!r}")
        return self


class DistillConfig(_Section):
    """In-place distillation (BigNAS, Once-for-All): a sampled subnet other than the maximal one also learns the
    maximal subnet's output on the same batch; its loss is (1 - weight) x the labels' loss + weight x T^2 x
    KL(teacher/T || student/T) over the labelled tokens (elastic/distillation.py)."""
    weight: float = Field(0.5, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)


class ElasticConfig(_Section):
    """Exactly one of `search_space` (flexrank YAML form) or `nncf_config` (a LoNAS/Shears NNCF JSON)."""
    search_space: dict[str, Any] | None = None
    nncf_config: str | None = None
    # LoNAS base widths, e.g. {mlp: [1.0, 0.75, 0.5]} or per layer {mlp: {0: [1536, 768]}} (search_space.py)
    base_widths: dict[str, Any] | None = None
    # Before training, order each elastic base width's channels by importance so its kept prefix is the most
    # important part (elastic/importance.py): none (LoNAS: first channels as they are), activation (on
    # `importance_samples` training records; recommended), magnitude (weights only: on SmolLM2 worse than none,
    # README *Measured*; kept for BootstrapNAS parity)
    importance: Literal["none", "activation", "magnitude"] = "none"
    importance_samples: int = Field(64, gt=0)
    sandwich: bool = False
    # In-place distillation from the maximal subnet: a {weight, temperature} section, `true` for the defaults
    distill: DistillConfig | None = None
    seed: int | None = None
    evaluate_subnets: list[str] = Field(default_factory=lambda: ["maximal", "heuristic", "minimal"])
    export_subnet: str | dict[str, int] = "heuristic"

    @model_validator(mode="before")
    @classmethod
    def _distill_shorthand(cls, raw):
        if isinstance(raw, dict) and isinstance(raw.get("distill"), bool):  # true: the defaults; false: off
            raw = {**raw, "distill": {} if raw["distill"] else None}
        return raw

    @model_validator(mode="after")
    def _one_space(self):
        if (self.search_space is None) == (self.nncf_config is None):
            raise ConfigError("adapter.elastic", "search_space" if self.search_space else None,
                              "exactly one of adapter.elastic.search_space or adapter.elastic.nncf_config")
        named = ("maximal", "heuristic", "minimal")
        for value in self.evaluate_subnets + ([self.export_subnet] if isinstance(self.export_subnet, str) else []):
            if value not in named:
                raise ConfigError("adapter.elastic subnet", value, f"one of {named}",
                                  "export_subnet also takes an explicit {group: width} mapping")
        if self.importance != "none" and self.base_widths is None and self.nncf_config is None:
            raise ConfigError("adapter.elastic.importance", self.importance, "none without base widths",
                              "it orders elastic base widths (adapter.elastic.base_widths); adapter ranks are "
                              "not ordered: at initialisation lora_B = 0 and no rank matters more than another")
        return self


class SoRAScheduleConfig(_Section):
    """SoRA's sparsifying schedule: a dense phase, then the threshold rises from `threshold` to `max_threshold`
    in `stages` equal steps of `stage_steps` optimizer steps."""
    dense_steps: int = Field(0, ge=0)
    max_threshold: float | None = Field(None, gt=0)
    stages: int = Field(1, ge=1)
    stage_steps: int = Field(1, ge=1)
    kind: Literal["linear", "log_linear", "exp_linear"] = "linear"


class SoRAConfig(_Section):
    sparse_lambda: float = Field(1e-3, ge=0.0)   # weight of the L1 term λ·mean|g|
    threshold: float = Field(1e-3, ge=0.0)       # ξ of the proximal step
    prox: Literal["sora", "textbook"] = "sora"
    gate_init: Literal["ones", "normal"] = "ones"
    gate_lr: float | None = Field(None, gt=0)
    schedule: SoRAScheduleConfig = Field(default_factory=SoRAScheduleConfig)
    evaluate_stages: bool = True  # held-out loss and sparsity at the end of the dense phase and of every stage

    @model_validator(mode="after")
    def _schedule(self):
        s = self.schedule
        if s.max_threshold is not None and s.max_threshold < self.threshold:
            raise ConfigError("adapter.sora.schedule.max_threshold", s.max_threshold,
                              f">= adapter.sora.threshold ({self.threshold})")
        if s.kind != "linear" and s.stages > 1 and self.threshold <= 0:
            raise ConfigError("adapter.sora.threshold", self.threshold, "> 0 with a log_linear/exp_linear schedule")
        return self


class AdaLoRAConfig(_Section):
    """AdaLoRA budget scheduling; adapter.r is the initial rank (peft's init_r). total_step is the run's."""
    target_r: int = Field(4, gt=0)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    deltaT: int = Field(1, gt=0)
    beta1: float = Field(0.85, ge=0.0, lt=1.0)
    beta2: float = Field(0.85, ge=0.0, lt=1.0)
    orth_reg_weight: float = Field(0.5, ge=0.0)


class SparsityConfig(_Section):
    """Shears: unstructured Wanda pruning of the frozen base before adapter training."""
    method: Literal["wanda"] = "wanda"
    ratio: float = Field(0.5, ge=0.0, lt=1.0)
    calibration_samples: int = Field(64, gt=0)


class AdapterConfig(_Section):
    method: Literal["lora", "dora", "rslora", "miss", "bat", "elastic", "sora", "adalora"] = "lora"
    r: int = Field(8, gt=0)
    lora_alpha: float | None = None
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"
    layer_replication: list[tuple[int, int]] | None = None
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    mini_r: int | None = Field(None, gt=0)
    elastic: ElasticConfig | None = None
    sora: SoRAConfig | None = None
    adalora: AdaLoRAConfig | None = None
    sparsity: SparsityConfig | None = None

    @model_validator(mode="after")
    def _method_options(self):
        if (self.method == "elastic") != (self.elastic is not None):
            raise ConfigError("adapter.elastic", "set" if self.elastic else None,
                              "an adapter.elastic section with method 'elastic', and none with other methods",
                              f"adapter.method is {self.method!r}")
        if self.method == "sora" and self.sora is None:
            self.sora = SoRAConfig()
        if self.sora is not None and self.method != "sora":
            raise ConfigError("adapter.sora", "set", "an adapter.sora section only with method 'sora'",
                              f"adapter.method is {self.method!r}")
        if self.method == "adalora" and self.adalora is None:
            self.adalora = AdaLoRAConfig()
        if self.adalora is not None and self.method != "adalora":
            raise ConfigError("adapter.adalora", "set", "an adapter.adalora section only with method 'adalora'",
                              f"adapter.method is {self.method!r}")
        if self.adalora is not None and self.adalora.target_r > self.r:
            raise ConfigError("adapter.adalora.target_r", self.adalora.target_r, f"<= adapter.r ({self.r}), the "
                              "initial rank")
        if self.mini_r is not None and self.method != "miss":
            raise ConfigError("adapter.mini_r", self.mini_r, "only with adapter.method 'miss'")
        return self


class EvalConfig(_Section):
    before: bool = True
    after: bool = True
    batch_size: int = Field(32, gt=0)
    max_new_tokens: int = Field(8, gt=0)
    metrics: Any = "auto"  # 'auto' or [loss, exact_match, choice, package.module:function] (evaluation/metrics.py)
    choices: list[str] | None = None  # the closed label set of `choice` (default: the data's distinct answers)
    # Evaluation inputs are cut like training's (data.max_length, truncation, min_prompt_length); a number here
    # replaces data.max_length for evaluation only (e.g. a large one to evaluate untruncated prompts).
    max_length: int | None = Field(None, gt=0)
    # Under ZeRO-3 / FSDP2: gather the full parameters once per evaluation phase (records still sharded) instead
    # of per forward; auto: when the model fits each device with a margin (evaluation/gathering.py).
    gather_parameters: Any = "auto"

    @model_validator(mode="before")
    @classmethod
    def _gather_parameters(cls, raw):
        value = raw.get("gather_parameters", "auto") if isinstance(raw, dict) else "auto"
        if value != "auto" and not isinstance(value, bool):
            raise ConfigError("eval.gather_parameters", value, "auto, true or false")
        return raw

    @model_validator(mode="after")
    def _metrics(self):
        from .evaluation.metrics import check_metrics

        object.__setattr__(self, "metrics", check_metrics(self.metrics))  # a lone name becomes a list
        return self


class DistributedConfig(_Section):
    """How many processes and which backend. More than one process: flexrank re-launches itself through
    `accelerate launch` (and prints the command)."""
    backend: str = "single"
    nproc: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    main_process_ip: str = "127.0.0.1"
    main_process_port: int = Field(29500, gt=0, lt=65536)
    deepspeed_config: str | None = None

    @model_validator(mode="after")
    def _backend(self):
        from .distributed.backends import BACKENDS

        if self.backend not in BACKENDS and not (self.backend.endswith((".yaml", ".yml")) and Path(self.backend).exists()):
            raise ConfigError("distributed.backend", self.backend, f"one of {BACKENDS} or an accelerate YAML file")
        if self.backend == "single" and self.nproc * self.nnodes > 1:
            raise ConfigError("distributed.backend", "single", "ddp, fsdp2, zero2, zero3 or zero3_offload",
                              f"{self.nproc * self.nnodes} processes need a distributed backend")
        if self.node_rank >= self.nnodes:
            raise ConfigError("distributed.node_rank", self.node_rank, f"0 .. nnodes-1 = {self.nnodes - 1}")
        return self


class SearchConfig(_Section):
    """`flexrank search` over an elastic run (NSGA-II, as NNCF BootstrapNAS). Unset keys come from the NNCF
    JSON's bootstrapNAS.search section when the run has one, else NNCF's defaults (flexrank/elastic/search.py)."""
    num_evals: int | None = Field(None, gt=0)
    population: int | None = Field(None, gt=0)
    seed: int | None = Field(None, ge=0)
    ref_acc: float | None = None      # -1 or unset: the maximal subnet's metric
    acc_delta: float | None = Field(None, ge=0)
    crossover_prob: float | None = Field(None, ge=0, le=1)
    crossover_eta: float | None = Field(None, gt=0)
    mutation_prob: float | None = Field(None, ge=0, le=1)
    mutation_eta: float | None = Field(None, gt=0)
    metric: str = "auto"   # auto: the run's task metric (exact match, choice, accuracy, a user metric), else loss; or
    # any metric the run reports (loss, perplexity, exact_match, choice, a user function's name)
    eval_size: int | None = Field(None, gt=0)    # held-out records per evaluation
    eval_offset: int = Field(0, ge=0)            # first held-out record the search uses
    test_size: int = Field(0, ge=0)              # held-out records after the search's, to re-check the best


class RunConfig(_Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    training: dict[str, Any] = Field(default_factory=dict)

    def eval_data(self) -> DataConfig:
        """The data section as evaluation tokenizes with it: eval.max_length, when set, for data.max_length."""
        if self.eval.max_length is None:
            return self.data
        return self.data.model_copy(update={"max_length": self.eval.max_length})

    @model_validator(mode="after")
    def _combinations(self):
        self._nncf_combinations()
        quantized = self.model.quantization is not None and self.model.quantization.method == "bitsandbytes"
        if quantized and self.adapter.sparsity:
            raise ConfigError("adapter.sparsity", self.adapter.sparsity.method, "no sparsity with a 4-bit base",
                              "Wanda prunes full-precision weights: drop model.quantization or adapter.sparsity")
        if quantized and self.adapter.method in ("miss", "bat"):
            raise ConfigError("adapter.method", self.adapter.method, "lora, dora, rslora or elastic with "
                              "model.quantization", "peft has no 4-bit (bitsandbytes) MiSS layer")
        backend = self.distributed.backend
        if quantized and backend in ("fsdp2", "zero3", "zero3_offload") and \
                self.model.quantization.bnb_4bit_quant_storage == "uint8":
            raise ConfigError("model.quantization.bnb_4bit_quant_storage", "uint8",
                              "bfloat16, float16 or float32 with distributed.backend " + backend,
                              "sharding needs the packed 4-bit weights stored in a float dtype")
        elastic = self.adapter.elastic
        if quantized and elastic is not None and elastic.importance != "none":
            raise ConfigError("adapter.elastic.importance", elastic.importance, "none with a 4-bit base "
                              "(model.quantization)", "ordering permutes the base's weights in place, and packed "
                              "4-bit weights (with their per-block scales) are not permuted by flexrank")
        if elastic is not None and elastic.sandwich and backend.startswith("zero"):
            raise ConfigError("adapter.elastic.sandwich", True, f"false with distributed.backend {backend}",
                              "DeepSpeed steps inside every backward, so several backward passes per "
                              "micro-batch would each count as a micro-step")
        if elastic is not None and elastic.distill is not None and self.model.liger_kernel is True:
            raise ConfigError("model.liger_kernel", True, "false or auto with adapter.elastic.distill",
                              "liger's fused cross-entropy never materialises the logits the distillation compares")
        if self.model.task_type == "seq_cls" and self.data.packing:
            raise ConfigError("data.packing", True, "false with model.task_type seq_cls",
                              "packing applies to causal_lm only")
        if self.model.attn_implementation == "varlen" and not self.data.packing:
            raise ConfigError("model.attn_implementation", "varlen", "auto, flash_attention_2, sdpa or eager with "
                              "data.packing false", "varlen attention is for packed rows: set data.packing: true")
        return self

    def _nncf_combinations(self):
        q = self.model.quantization
        if q is None or q.method == "bitsandbytes":
            return
        if q.method == "nncf_int4_ptq" and self.adapter.method != "lora":
            raise ConfigError("adapter.method", self.adapter.method, "lora with model.quantization.method "
                              "nncf_int4_ptq", "the float adapter is merged into the base before INT4 compression")
        if self.adapter.method not in ("lora", "elastic"):
            raise ConfigError("adapter.method", self.adapter.method, "lora (FQ_LORA) or elastic (FQ_LORA_NLS) with "
                              "model.quantization.method nncf_int4")
        if self.adapter.sparsity:
            raise ConfigError("adapter.sparsity", self.adapter.sparsity.method, f"no sparsity with {q.method}")
        if self.distributed.backend not in ("single", "ddp"):
            raise ConfigError("distributed.backend", self.distributed.backend, f"single or ddp with {q.method}",
                              "nncf's quantizer hooks are tested on whole (unsharded) weights only; FSDP2/ZeRO "
                              "shard the weights the hooks read")
        if self.model.task_type != "causal_lm":
            raise ConfigError("model.task_type", self.model.task_type, f"causal_lm with {q.method}")
        if self.adapter.elastic is not None and self.adapter.elastic.base_widths is not None:
            raise ConfigError("adapter.elastic.base_widths", self.adapter.elastic.base_widths,
                              f"unset with {q.method}", "the INT4 paths make only adapter ranks elastic")
        if self.adapter.elastic is not None and self.adapter.elastic.importance != "none":
            raise ConfigError("adapter.elastic.importance", self.adapter.elastic.importance,
                              f"none with {q.method}", "the INT4 paths make only adapter ranks elastic")
        if self.adapter.elastic is not None and self.adapter.elastic.distill is not None:
            raise ConfigError("adapter.elastic.distill", self.adapter.elastic.distill.model_dump(),
                              f"unset with {q.method}", "in-place distillation is not tested on nncf's quantizers")


TRAINING_DEFAULTS = {
    "output_dir": "runs/default", "learning_rate": 1e-3, "per_device_train_batch_size": 16, "max_steps": 60,
    "lr_scheduler_type": "linear", "warmup_steps": 5, "logging_steps": 5, "save_strategy": "no",
    "report_to": ["tensorboard"], "seed": 42, "use_cpu": False, "dataloader_num_workers": 0,
}


def _training_fields() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _check_training(training: dict[str, Any]) -> dict[str, Any]:
    known = _training_fields()
    unknown = [ConfigError(f"training.{key}", training[key], "a transformers.TrainingArguments field",
                           f"did you mean {', '.join(close)}?" if (close := difflib.get_close_matches(key, known, n=3))
                           else "") for key in training if key not in known]
    if unknown:
        raise ConfigErrors(unknown)
    return {**TRAINING_DEFAULTS, **training}


def _format_validation_error(err: ValidationError) -> ConfigError:
    """Every problem pydantic found, each naming its key."""
    return ConfigErrors([_format_one(e) for e in err.errors()])


def _format_one(first: dict) -> ConfigError:
    key = ".".join(str(p) for p in first["loc"]) or "<recipe>"
    if first["type"] == "extra_forbidden":
        section: type[BaseModel] = RunConfig
        for part in first["loc"][:-1]:
            field = section.model_fields.get(str(part))
            ann = getattr(field, "annotation", None)
            section = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), section)
        allowed = sorted(section.model_fields)
        close = difflib.get_close_matches(str(first["loc"][-1]), allowed, n=2)
        return ConfigError(key, first["input"], f"known keys {allowed}", "unknown key" + (f"; did you mean {close[0]}?" if close else ""))
    inner = first.get("ctx", {}).get("error")
    if isinstance(inner, ConfigError):  # raised by a cross-field check, which names its own key
        return inner
    return ConfigError(key, first.get("input"), first["msg"])


def set_override(raw: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError("--set", assignment, "KEY.PATH=VALUE, e.g. training.learning_rate=1e-4")
    path, value = assignment.split("=", 1)
    *parents, leaf = path.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("--set", assignment, f"{part} is not a section")
    node[leaf] = _yaml(value)


def load_config(path: str | Path | None = None, overrides: list[str] = (), raw: dict | None = None) -> RunConfig:
    """Read a YAML recipe (or a dict), apply --set overrides, validate everything before any work starts."""
    if raw is None:
        raw = {}
        if path is not None:
            try:
                raw = _yaml(Path(path).read_text()) or {}
            except FileNotFoundError:
                raise ConfigError("recipe", str(path), "an existing YAML file") from None
            except yaml.YAMLError as exc:
                raise ConfigError("recipe", str(path), "valid YAML", str(exc).splitlines()[0]) from None
            if not isinstance(raw, dict):
                raise ConfigError("recipe", str(path), "a YAML mapping with sections model/data/adapter/eval/training")
            resolve_recipe_paths(raw, Path(path).parent)
    for assignment in overrides:
        set_override(raw, assignment)
    resolve_recipe_paths(raw, Path.cwd())  # --set values and dict recipes: relative to where flexrank runs
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as err:
        raise _format_validation_error(err) from None
    cfg.training = _check_training(cfg.training)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

"""The run config: one YAML file, typed, documented per field, checked at load, closed.

Every model forbids unknown keys. A bad file is reported with *all* its errors at once, each
with its key path, because fixing one error per run is a miserable loop.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunesmith.artifacts import MANIFEST_FILE
from tunesmith.errors import UserError
from tunesmith.humanize import plural
from tunesmith.templates import template_problem


# Bounds that no run can exceed: past them a value is a typo (a seed numpy and torch refuse, a
# length no tokenizer reaches), and refusing it at load beats a traceback or a NaN loss later.
MAX_SEED = 2**32 - 1  # numpy's limit; torch and random take it too
MAX_TOKENS = 1 << 20
MAX_COUNT = 10**9


def _path_text(value: str | None, what: str) -> str | None:
    if value is not None and (not value.strip() or "\x00" in value):
        raise ValueError(f"{what} must be a non-empty path")
    return value


class _Closed(BaseModel):
    # allow_inf_nan=False: `.inf` and `.nan` are YAML floats, and every float field here must be finite.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Closed):
    name: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="Base model: a builtin name (`tunesmith models`), a local Hugging Face folder, "
        "a local .gguf file, or a hub id (needs network).",
    )
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model. Only for models you trust."
    )
    allow_pickle: bool = Field(
        False,
        description="Allow loading .bin/.pt weights, which unpickle and can run code. "
        "Prefer converting them to safetensors.",
    )
    expected_fingerprint: str | None = Field(
        None,
        description="Pin the base model: its sha256 fingerprint (`tunesmith models`). "
        "A different model is refused.",
    )
    chat_template: str | None = Field(
        None,
        description="Chat template every stage renders conversations with: null or `model` (the model's own), "
        "a template shipped with tunesmith (`chatml`, `llama3`, `gemma`, `mistral`, `phi3`), or a .jinja file "
        "relative to the config. Required for a base model that has no template.",
    )

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str | None) -> str | None:
        _path_text(value, "a chat template")
        problem = template_problem(value, None) if value is not None and not value.endswith(".jinja") else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("expected_fingerprint")
    @classmethod
    def _whole_fingerprint(cls, value: str | None) -> str | None:
        # A shortened copy (`tunesmith models` once showed 16 characters) can never match.
        if value is not None and not re.fullmatch(r"[0-9a-f]{64}", value):
            raise ValueError(
                f"a fingerprint is 64 lowercase hex characters, got {len(value)} characters: "
                "copy the whole `expected_fingerprint:` line that `tunesmith models` prints"
            )
        return value


class DataConfig(_Closed):
    train: str = Field(..., min_length=1, description="Training data file (any supported format), relative to the config.")
    eval: str | None = Field(
        None, description="Held-out evaluation file. When absent, `eval_fraction` of `train` is held out."
    )
    format: Literal["auto", "openai", "prompt_completion", "alpaca", "sharegpt", "csv", "tsv", "parquet", "hf_disk"] = (
        Field("auto", description="Input format; `auto` detects it from the file.")
    )
    input_col: str | None = Field(None, description="Tabular formats: the column holding the user input.")
    output_col: str | None = Field(None, description="Tabular formats: the column holding the expected answer.")
    system_prompt: str | None = Field(
        None,
        description="System prompt added to every example without one, and used by the baselines.",
    )
    eval_fraction: float = Field(
        0.15, ge=0.0, lt=1.0, description="Share held out for evaluation when `eval` is not given (0.1-0.2 advised)."
    )
    split_seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the train/eval split.")
    max_length: int = Field(1024, ge=8, le=MAX_TOKENS, description="Longest example in tokens (prompt + answer) after the chat template.")
    truncate: bool = Field(
        False,
        description="Allow truncating examples over `max_length` (reported). Otherwise they stop the run.",
    )

    @field_validator("train", "eval")
    @classmethod
    def _data_path(cls, value: str | None) -> str | None:
        return _path_text(value, "a data file")

    @field_validator("input_col", "output_col")
    @classmethod
    def _column(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("a column name must not be empty (null: guess it)")
        return value


class LoraConfig(_Closed):
    r: int = Field(16, ge=1, le=4096, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters; `all-linear` means every linear projection but the output head."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha/sqrt(r)).")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and (not value or any(not m.strip() for m in value)):
            raise ValueError('list at least one module name (e.g. [q_proj, v_proj]), or write "all-linear"')
        return value


class OpenAIConfig(_Closed):
    model: str = Field(
        "gpt-4o-mini-2024-07-18",
        min_length=1,
        description="The provider's model to fine-tune: a dated snapshot (e.g. gpt-4o-mini-2024-07-18), so a "
        "provider update cannot change what was trained; an undated alias is refused unless `allow_floating_model`.",
    )
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible API root (e.g. http://127.0.0.1:8000/v1 for `tunesmith serve`); null: the "
        "OPENAI_BASE_URL environment variable, else https://api.openai.com/v1.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        min_length=1,
        description="Environment variable holding the API key. The key itself is never put in a config, a manifest "
        "or any file tunesmith writes.",
    )
    learning_rate_multiplier: float | None = Field(
        None, gt=0, le=100, description="The provider's learning-rate multiplier; null: the provider chooses."
    )
    suffix: str | None = Field(
        None, min_length=1, max_length=64, description="Suffix of the fine-tuned model's name; null: the run name."
    )
    allow_floating_model: bool = Field(
        False, description="Accept an undated model alias (its weights may change under the same name)."
    )
    allow_pii: bool = Field(
        False, description="Upload data in which the data check found personal data or secrets (otherwise refused)."
    )
    redact: bool = Field(
        False, description="Upload a copy with personal data replaced by placeholders ([EMAIL], [PHONE], ...)."
    )
    poll_interval_s: float = Field(10.0, gt=0, le=3600, description="Seconds between two looks at a running job.")


class TrainConfig(_Closed):
    backend: Literal["local", "openai"] = Field(
        "local",
        description="Where training runs: `local` (this machine, tunesmith's trainer) or `openai` (a fine-tuning job "
        "through the OpenAI fine-tuning API, on OpenAI or any server speaking it, e.g. `tunesmith serve`).",
    )
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig, description="The openai backend (train.backend: openai).")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="Fine-tuning method.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (lora and qlora).")
    epochs: float = Field(3.0, gt=0, le=10_000, description="Passes over the training data (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, ge=1, le=MAX_COUNT, description="Stop after this many optimizer steps.")
    batch_size: int = Field(8, ge=1, le=65536, description="Examples per micro-batch.")
    grad_accum: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=10.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm; null disables it.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Compute precision. `auto`: bf16 autocast where the hardware runs it fast (CUDA, CPU with AMX), "
        "else fp32. Trainable weights and optimizer state stay fp32.",
    )
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the model (`auto`: on CUDA; off on CPU, where recompiles for varying lengths cost more than a short run saves).")
    packing: bool = Field(False, description="Pack several examples per row (no attention across examples).")
    shared_prefix: bool = Field(
        True, description="Compute a prompt prefix shared by a whole batch once per batch."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory.")
    eval_every: int | None = Field(
        None, ge=1, le=MAX_COUNT,
        description="Eval loss every N steps (and always at the end); null: about 10 evals per run, so the eval loss is a "
        "curve and early stopping has points to judge.",
    )
    eval_loss_examples: int | None = Field(
        256, ge=1, le=MAX_COUNT,
        description="The in-training eval loss runs on a seeded sample of at most this many held-out examples "
        "(the same sample at every eval); null: all of them. The held-out set is still evaluated whole by `tunesmith eval`.",
    )
    initial_eval: bool = Field(
        True, description="Compute the base model's eval loss before step 1, the curve's starting point (one eval pass)."
    )
    save_every: int | None = Field(None, ge=1, le=MAX_COUNT, description="Checkpoint every N steps (and always at the end).")
    early_stopping_patience: int | None = Field(
        None, ge=1, le=MAX_COUNT, description="Stop after this many evals without a better eval loss."
    )
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed for weights init, data order and dropout.")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Checkpoints kept in the run folder (the newest ones).")
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Several processes (torchrun, `--nproc`): `ddp` keeps a whole model on each; `fsdp` shards "
        "weights, gradients and optimizer state over them, for models too big for one device (lora and full).",
    )

    @model_validator(mode="after")
    def _fsdp_method(self) -> "TrainConfig":
        if self.parallel == "fsdp" and self.method == "qlora":
            raise ValueError("parallel fsdp does not shard 4-bit (qlora) weights: use method lora or full, or parallel ddp")
        if self.backend == "openai" and self.max_steps is not None:
            raise ValueError("the openai backend trains whole epochs: unset max_steps and set epochs")
        if self.backend == "openai" and self.epochs != int(self.epochs):
            raise ValueError(f"the openai backend trains whole epochs: epochs {self.epochs} is not a whole number")
        return self


class EndpointConfig(_Closed):
    model: str = Field(..., min_length=1, description="Model name the endpoint serves (e.g. gpt-4o-mini-2024-07-18, ft:..., a vLLM or Ollama model).")
    name: str | None = Field(
        None, min_length=1, max_length=200,
        description="Subject name in the report; null: `openai:MODEL`. Few-shot and prompted add `+fewshot` and `+prompted`.",
    )
    base_url: str | None = Field(
        None, description="API root of any OpenAI-compatible server (vLLM, Ollama, tunesmith serve); null: "
        "train.openai.base_url, else OPENAI_BASE_URL, else https://api.openai.com/v1.",
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", min_length=1, description="Environment variable holding the key (a local server without auth needs none)."
    )
    prompts: list[Literal["zero-shot", "few-shot", "prompted"]] = Field(
        default_factory=lambda: ["zero-shot", "few-shot", "prompted"], min_length=1,
        description="Prompt engineering to evaluate, exactly the messages of base, base-fewshot and base-prompted.",
    )
    usd_per_1m_input_tokens: float | None = Field(None, ge=0, description="Price of prompt tokens; null: prices.json, else no cost shown.")
    usd_per_1m_output_tokens: float | None = Field(None, ge=0, description="Price of completion tokens; null: prices.json, else no cost shown.")


class EvalConfig(_Closed):
    subjects: list[Literal["base", "base-prompted", "base-constrained", "base-fewshot", "majority", "tuned"]] = Field(
        default_factory=lambda: ["base", "base-prompted", "base-fewshot", "majority", "tuned"],
        description="What to evaluate: the base model zero-shot (`base`), with the label set or JSON Schema in its system "
        "prompt (`base-prompted`), that prompt with decoding held to the labels or schema (`base-constrained`, opt-in), "
        "with training examples as prior turns (`base-fewshot`); the most frequent training "
        "label (`majority`, classification); the fine-tune (`tuned`).",
    )
    few_shot_k: int | None = Field(
        None, ge=0, le=MAX_TOKENS, description="Examples in the few-shot prompt; null: as many as fit the context."
    )
    max_new_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, le=65536, description="Prompts generated together.")
    task: Literal["auto", "classification", "json", "text"] = Field(
        "auto", description="Metric family; `auto` infers it from the training answers."
    )
    max_examples: int | None = Field(None, ge=1, le=MAX_COUNT, description="Evaluate only the first N held-out examples.")
    gates: list[str] = Field(
        default_factory=list, description='Gates such as "accuracy>=0.85"; a failure exits 3.'
    )
    few_shot_max_tokens: int = Field(
        1024, ge=0, le=MAX_TOKENS, description="Token budget of the few-shot examples when `few_shot_k` is null (also capped by the context)."
    )
    abstain_label: str | None = Field(
        None,
        description="Classification: the label meaning that no other applies (e.g. out_of_scope); adds in_scope_accuracy, "
        "abstain_recall and abstain_precision.",
    )
    json_schema: str | None = Field(
        None, description="JSON Schema file for json tasks, relative to the config; null: inferred from the training answers."
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Inference precision. `auto`: bf16 on CUDA with bf16 and on CPUs with AMX/AVX512-BF16, else fp32."
    )
    engine: Literal["torch", "vllm"] = Field(
        "torch",
        description="What generates the local subjects' answers: `torch` (tunesmith's batched greedy loop, CPU or GPU) or "
        "`vllm` (vLLM's offline engine, the adapter as a LoRA request; needs vLLM installed and a GPU), for thousands of "
        "prompts on GPUs. The prompts are the same token ids either way, so the scores compare.",
    )
    bootstrap_samples: int = Field(1000, ge=10, le=1_000_000, description="Bootstrap resamples for intervals and paired tests.")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Seed of the few-shot choice and of the bootstrap.")
    endpoints: list[EndpointConfig] = Field(
        default_factory=list,
        description="Models behind OpenAI-compatible APIs to evaluate beside the local subjects (the provider's base "
        "model, a hosted fine-tune, a vLLM/Ollama/tunesmith server). A run trained with train.backend openai "
        "evaluates its hosted fine-tune as `tuned` without being listed here.",
    )
    max_concurrency: int = Field(4, ge=1, le=256, description="Requests in flight at once to an endpoint.")
    max_retries: int = Field(6, ge=0, le=100, description="Retries of a request answered 429 or 5xx (backoff, Retry-After honoured).")

    @field_validator("gates")
    @classmethod
    def _gates(cls, gates: list[str]) -> list[str]:
        from tunesmith.metrics import parse_gate  # the one reader of gate syntax

        for gate in gates:
            try:
                parse_gate(gate)
            except UserError as e:
                raise ValueError(f"{e.message}: {e.hint}") from None
        return gates

    @field_validator("json_schema")
    @classmethod
    def _schema_path(cls, value: str | None) -> str | None:
        return _path_text(value, "a JSON Schema file")

    @model_validator(mode="after")
    def _vllm_subjects(self) -> "EvalConfig":
        if self.engine == "vllm" and "base-constrained" in self.subjects:
            raise ValueError("base-constrained decodes through tunesmith's own loop (xgrammar), not vLLM: "
                             "remove it from eval.subjects, or set eval.engine: torch")
        return self


class ExportConfig(_Closed):
    formats: list[Literal["adapter", "merged", "gguf", "ollama"]] = Field(
        default_factory=lambda: ["adapter"], description="Artifacts to export after evaluation."
    )
    gguf_types: list[Literal["f16", "q8_0", "f32", "bf16", "q4_k_m", "q4_0"]] = Field(
        default_factory=lambda: ["q8_0"],
        description="GGUF tensor types to write. q4_k_m and q4_0 go through llama.cpp's quantizer and need llama-cpp-python (`make llama-cpp`); without it they are skipped with that message.",
    )
    parity_prompts: int = Field(
        16, ge=1, le=1000, description="Probe prompts for the parity checks: a seeded sample of the run's held-out prompts, at most this many."
    )
    min_parity: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Fail the export (exit code 3, after every file is written) when an exported file's share of probe prompts with an unchanged greedy answer is below this (e.g. 0.9); none: report only.",
    )
    license: str | None = Field(
        None,
        description="Licence in the model card of every export (a Hub licence id, e.g. apache-2.0); "
        "null: the base model's when known, else `other`.",
    )
    intended_use: str | None = Field(
        None, description="What the model is for, in the model card; null: a sentence from the task and the data."
    )


class RunConfig(_Closed):
    # Where the YAML file lives; relative paths in it are resolved against this folder. First, so
    # that the output_dir check below sees it.
    base_dir: str = Field(".", exclude=True, description="Folder the config was loaded from (set by the loader).")
    name: str = Field("run", min_length=1, max_length=200, description="Run name; the run folder is `output_dir`.")
    output_dir: str = Field("runs/run", min_length=1, description="Run folder, relative to the config file.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The base model.")
    data: DataConfig = Field(..., description="Training and evaluation data.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation against baselines.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Export.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers that get the config, the per-step metrics, the eval results and the artifacts "
        "(each an optional install: pip install 'tunesmith[tracking]'). MLflow writes to RUN/tracking/mlruns unless "
        "MLFLOW_TRACKING_URI is set; W&B runs offline (RUN/tracking/wandb) unless WANDB_MODE or an API key says otherwise.",
    )


    def resolve(self, relative: str | None) -> Path | None:
        """A path from the config, resolved against the config's folder."""
        if relative is None:
            return None
        path = Path(relative).expanduser()
        return path if path.is_absolute() else (Path(self.base_dir) / path)

    @property
    def run_dir(self) -> Path:
        return self.resolve(self.output_dir)  # type: ignore[return-value]

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # The name becomes file names (RUN/export/gguf/NAME-q8_0.gguf): no separators, no "..".
        if value.strip() in (".", "..") or any(c in value for c in "/\\\x00") or not value.strip():
            raise ValueError("use a plain name (letters, digits, '-', '_', '.'), not a path")
        return value

    @field_validator("output_dir")
    @classmethod
    def _run_folder(cls, value: str, info: ValidationInfo) -> str:
        # The run folder is written into (data/, train/, export/): the filesystem root, the home
        # folder or a folder above the config would mix the run with the user's own files.
        config_dir = Path(info.data.get("base_dir", ".")).resolve()
        path = Path(value).expanduser()
        run_dir = (path if path.is_absolute() else config_dir / path).resolve()
        if run_dir == Path(run_dir.anchor) or run_dir == Path.home().resolve() or run_dir in config_dir.parents:
            raise ValueError(f"{value!r} resolves to {run_dir}, which holds more than this run: use a folder of its own, e.g. runs/NAME")
        # The config's own folder would have its config.yaml and data/train.jsonl replaced by the
        # run's; only a run folder (RUN/config.yaml reloaded by runs.read_run_config) may name itself.
        if run_dir == config_dir and not (config_dir / MANIFEST_FILE).exists():
            raise ValueError(f"{value!r} is the config's own folder, whose config.yaml and data/ the run would replace: use a folder of its own, e.g. runs/NAME")
        return value


def _error_line(e: dict[str, Any]) -> tuple[str, str]:
    """(key path, message) of one pydantic error, in words a config author can act on."""
    path = ".".join(str(p) for p in e["loc"]) or "(top level)"
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `tunesmith init` writes every key with its doc)"
    elif e["type"] == "missing":
        msg = "required key is missing"
    elif e["type"] == "finite_number":
        msg = f"{e.get('input')!r} is not a finite number: write a plain number"
    return path, msg


CONFIG_FIX = "`tunesmith config reference` lists every key with its type and bounds"


def format_validation_error(err: ValidationError, source: str) -> str:
    """Every error of a pydantic failure, one per line, with its key path."""
    lines = [f"{source}: {plural(err.error_count(), 'error')} in the config"]
    for e in err.errors():
        path, msg = _error_line(e)
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def validation_user_error(err: ValidationError, source: str) -> UserError:
    """One error: one line naming the key. Several: every one, each on its line with its key."""
    if err.error_count() == 1:
        path, msg = _error_line(err.errors()[0])
        return UserError(f"{source}: {path}: {msg}", CONFIG_FIX)
    return UserError(format_validation_error(err, source))


def _model_problem(ref: str) -> str | None:
    """Why a model reference cannot resolve, without downloading anything; None when it can."""
    from tunesmith.models import BUILTIN_MODELS, HUB_ID

    if ref in BUILTIN_MODELS:
        return None
    path = Path(ref).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return None
    if path.exists():
        return f"{ref!r} is a file but not a .gguf"
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return None  # a hub id: only a download can tell whether it exists
    return f"{ref!r} is not a builtin name ({', '.join(BUILTIN_MODELS)}), an existing folder or .gguf file, or a hub id (org/name)"


MODEL_FIX = "use a builtin name (`tunesmith models`), a local HF folder or .gguf file, or a hub id org/name"
PATH_FIX = "correct the path: relative paths are read from the config's folder"


def _format_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Export formats the model's family cannot take, when its config is on disk (a local folder
    or a builtin already converted); a hub id or .gguf file is checked at run start instead."""
    from tunesmith.artifacts import models_cache_dir
    from tunesmith.gguf_export import model_format_problems
    from tunesmith.models import BUILTIN_MODELS
    from tunesmith.runs import base_model_ref

    ref = cfg.model.name
    folder = models_cache_dir() / ref if ref in BUILTIN_MODELS else Path(base_model_ref(cfg)).expanduser()
    if not (folder / "config.json").is_file():
        return []
    return [(p, "remove the format from export.formats, or export merged/adapter and convert with llama.cpp") for p in model_format_problems(folder, cfg.export.formats)]


def missing_inputs(cfg: RunConfig) -> list[tuple[str, str]]:
    """(problem, fix) for what a run would fail to find: the model, the data files, the schema.

    Kept out of `load_config`, because eval and export reload a finished run's config whose
    data may have moved since; `tunesmith config check` runs it.
    """
    from tunesmith.data import hub_id_fix, looks_like_hub_id

    problems = []
    model = _model_problem(cfg.model.name)
    if model:
        problems.append((f"model.name: {model}", MODEL_FIX))
    else:
        problems += _format_problems(cfg)
    template = template_problem(cfg.model.chat_template, cfg.base_dir)
    if template:
        problems.append((f"model.chat_template: {template}", PATH_FIX))
    for key, value in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval), ("eval.json_schema", cfg.eval.json_schema)):
        path = cfg.resolve(value)
        if path is None:
            continue
        if not path.exists():
            if key != "eval.json_schema" and looks_like_hub_id(value):
                problems.append((f"{key}: {value} not found: it looks like a Hugging Face Hub dataset id, not a local file", hub_id_fix(value)))
            else:
                problems.append((f"{key}: {path} not found", PATH_FIX))
        elif key == "eval.json_schema" and not path.is_file():
            problems.append((f"{key}: {path} is a folder, not a JSON Schema file", PATH_FIX))
    if cfg.eval.engine == "vllm":
        from tunesmith.vllm_engine import require_vllm

        try:
            require_vllm("eval.engine: vllm", "set eval.engine: torch")
        except UserError as e:
            problems.append((e.message, e.hint))
    return problems


def check_inputs(cfg: RunConfig, source: str) -> None:
    """`tunesmith config check`: UserError naming every missing input (one line when one)."""
    problems = missing_inputs(cfg)
    if len(problems) == 1:
        raise UserError(f"{source}: {problems[0][0]}", problems[0][1])
    if problems:
        raise UserError(f"{source}: {plural(len(problems), 'missing input')}\n" + "\n".join(f"  {p} (fix: {fix})" for p, fix in problems))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lora.r=8` -> (["train", "lora", "r"], 8); the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"--set {text!r} has no '='", "write --set key.path=value")
    key, _, raw = text.partition("=")
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise UserError(f"--set {text!r} has an empty key", "write --set key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {k!r} is not a section", "set a leaf key")
            node = child
        node[keys[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config. Raises UserError listing every problem."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} not found", "pass the path of a YAML config (`tunesmith init DIR` writes one)")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a config file", "pass the path of a YAML config (`tunesmith init DIR` writes one)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: byte {e.start} is not UTF-8 text", "save the config as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})", "fix the YAML syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys", "start from `tunesmith init DIR`")
    data = apply_overrides(data, overrides or [])
    data["base_dir"] = str(path.parent.resolve())
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise validation_user_error(e, str(path)) from None


def config_to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"base_dir"}), sort_keys=False)


def _field_doc_lines(model: type[BaseModel], indent: int, prefix: str, values: dict[str, Any]) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        if name == "base_dir":
            continue
        annotation = field.annotation
        sub = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        lines.append(f"{' ' * indent}# {field.description or ''}")
        if sub is not None:
            lines.append(f"{' ' * indent}{name}:")
            lines.extend(_field_doc_lines(sub, indent + 2, f"{prefix}{name}.", values))
            continue
        key = prefix + name
        if key in values:
            value = values[key]
        else:
            value = None if field.is_required() else field.get_default(call_default_factory=True)
        rendered = yaml.safe_dump({name: value}, default_flow_style=True, width=10_000).strip()[1:-1]
        lines.append(f"{' ' * indent}{rendered}")
    return lines


def starter_yaml(values: dict[str, Any]) -> str:
    """A commented config: every key with its doc; `values` (dotted keys) replace the defaults."""
    return "\n".join(_field_doc_lines(RunConfig, 0, "", values)) + "\n"


def type_text(annotation: Any) -> str:
    """A field's type as a reader writes it: `str`, `float | None`, `Literal['lora', 'full']`.

    `str()` of a plain class gives `<class 'str'>`; of a generic, its module path.
    """
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _bounds_text(field: Any) -> str:
    """` (>= 1, <= 65536)`: the numeric bounds of a field, for the reference."""
    bounds = []
    for item in field.metadata:
        for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >=")):
            value = getattr(item, attr, None)
            if value is not None:
                bounds.append(f"{op} {value}")
    return f" ({', '.join(bounds)})" if bounds else ""


def config_reference_markdown() -> str:
    """The configuration reference, generated from the field docs (docs/config.md)."""
    lines = ["# Configuration reference", "", "Generated from `tunesmith.config`; do not edit by hand.", ""]

    def walk(model: type[BaseModel], prefix: str) -> None:
        rows = []
        subs = []
        for name, field in model.model_fields.items():
            if name == "base_dir":
                continue
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                subs.append((name, annotation, field.description))
                continue
            item = (getattr(annotation, "__args__", None) or [None])[0]
            if getattr(annotation, "__origin__", None) is list and isinstance(item, type) and issubclass(item, BaseModel):
                subs.append((f"{name}[]", item, field.description))  # a list of records: each item's keys
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            type_name = type_text(annotation) + _bounds_text(field)
            rows.append(f"| `{prefix}{name}` | `{type_name}` | `{default}` | {field.description or ''} |")
        if rows:
            lines.extend([f"## `{prefix.rstrip('.') or 'top level'}`", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""])
        for name, sub, doc in subs:
            walk(sub, f"{prefix}{name}.")

    walk(RunConfig, "")
    return "\n".join(lines)

"""Server settings: one object, built once from CLI options or environment, passed down.

Nothing here reads the environment at import time. The CLI builds a :class:`Settings`,
serialises it into ``OPENLLM_CLONE_SETTINGS`` for the BentoML worker processes, and
the service rebuilds it with :meth:`Settings.from_env` in its ``__init__``.
"""

from __future__ import annotations

import json
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "FATAL_FILE_ENV",
    "SETTINGS_ENV",
    "SETTINGS_FILE",
    "AdapterSpec",
    "Settings",
    "parse_adapter_spec",
]

SETTINGS_ENV = "OPENLLM_CLONE_SETTINGS"
# A worker that cannot load its model writes the reason here (``start`` watches it).
FATAL_FILE_ENV = "OPENLLM_CLONE_FATAL_FILE"
# A built bento carries its settings in this file at the root of its src/ folder.
SETTINGS_FILE = "openllm_clone_settings.json"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Compile = Literal["auto", "on", "off"]
Quantize = Literal["int8", "int4", "nf4", "fp4", "gptq", "torchao-int8"]


def _compile_default() -> str:
    """``--compile``'s default: ``OPENLLM_CLONE_COMPILE`` (read when Settings are built,
    so a test suite or a CI can turn background compiles off), else auto; normalised by
    the field's validator like any other value."""
    return os.environ.get("OPENLLM_CLONE_COMPILE") or "auto"


def _compile_value(value: object) -> str:
    """``--compile`` as auto/on/off; booleans and their usual spellings are accepted."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(
        text, text
    )


class AdapterSpec(BaseModel):
    """An adapter to register at start-up: a name and where its files are."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Name requests use to pick the adapter.")
    source: str = Field(description="Local folder, BentoML model store tag, or hub id.")
    pinned: bool = Field(default=False, description="Never evicted by the LRU.")


def parse_adapter_spec(value: str) -> AdapterSpec:
    """Parse ``NAME=PATH`` or a bare ``PATH`` (named after its folder)."""
    if "=" in value:
        name, _, source = value.partition("=")
        name, source = name.strip(), source.strip()
    else:
        source = value.strip()
        name = os.path.basename(os.path.normpath(source)).split(":")[0]
    if not name or not source:
        raise ValueError(f"invalid adapter spec {value!r}: expected NAME=PATH or PATH")
    return AdapterSpec(name=name, source=source)


class Settings(BaseModel):
    """Everything the server needs to run; every field has a CLI flag and env var."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default="smollm2",
        description="Model store tag, local Hugging Face folder, or hub id.",
    )
    model_name: str | None = Field(
        default=None,
        description="Name the base model is served under (OpenAI `model`); "
        "defaults to the store tag's name.",
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=3000, ge=0, le=65535, description="Port to listen on.")
    dtype: Dtype = Field(
        default="auto",
        description="Weights and activations dtype; auto = bfloat16 where the CPU "
        "has native bf16 support (or on CUDA), else float32.",
    )
    device: str = Field(default="auto", description="cpu, cuda, cuda:N or auto.")
    compile: Compile = Field(
        default_factory=_compile_default,
        validate_default=True,
        description="Decode steps through a step compiled ahead of time by AOTInductor (CPU, "
        "unquantized float32/bfloat16, fast runner). auto (the default): load it from the "
        "compile cache if it is there, else serve eagerly at once and compile it in a "
        "background process (~1-2 min for a 135M model), then switch; on: compile before "
        "serving (an error where it cannot run); off: never. Default from "
        "OPENLLM_CLONE_COMPILE, else auto.",
    )
    compile_cache: str | None = Field(
        default=None,
        description="Folder where compiled decode steps are kept for later starts; "
        "default: <BENTOML_HOME>/openllm-clone/compiled; `none` compiles at every start.",
    )
    runner: Literal["auto", "fast", "generic"] = Field(
        default="auto",
        description="What executes the model: fast (hand-written decoder step for the Llama "
        "family: Llama, Mistral, Qwen2), generic (any transformers causal LM through its own "
        "modeling code), or auto (fast where the model fits it, else generic).",
    )
    quantize: Quantize | None = Field(
        default=None,
        description="Weight quantization: bitsandbytes int8/int4(nf4)/nf4/fp4, a GPTQ "
        "checkpoint (gptq), or torchao int8 weight-only.",
    )
    max_batch_size: int = Field(
        default=16, ge=1, le=1024, description="Most sequences in the running batch."
    )
    max_queue: int = Field(
        default=256,
        ge=1,
        description="Most requests waiting to join the batch; beyond it, 503.",
    )
    timeout: float = Field(default=600.0, gt=0, description="Per-request timeout in seconds.")
    workers: int = Field(default=1, ge=1, le=64, description="BentoML worker processes.")
    backend: Literal["bentoml", "ray"] = Field(
        default="bentoml",
        description="bentoml: one BentoML server with --workers processes; ray: Ray Serve "
        "replicas behind an adapter-aware router (extra `ray`).",
    )
    replicas: int = Field(default=1, ge=1, le=1024, description="Ray Serve replicas of the model.")
    max_replicas: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Autoscale Ray replicas between --replicas and this, on ongoing requests.",
    )
    cpus_per_replica: float = Field(default=1.0, gt=0, description="CPUs Ray reserves per replica.")
    gpus_per_replica: float = Field(default=0.0, ge=0, description="GPUs Ray reserves per replica.")
    ray_address: str | None = Field(
        default=None,
        description="Join this Ray cluster (`auto` or host:port); default: start a local one.",
    )
    routing: Literal["affinity", "random"] = Field(
        default="affinity",
        description="Ray routing: affinity sends an adapter's requests to replicas that hold it "
        "(Ray Serve multiplexing); random is the baseline that ignores adapters.",
    )
    api_keys: list[str] = Field(
        default_factory=list,
        description="Accepted bearer keys; empty means no authentication.",
    )
    admin_api_keys: list[str] = Field(
        default_factory=list,
        description="Keys for loading and unloading adapters; when set, plain API keys "
        "can no longer manage adapters.",
    )
    keys_file: str | None = Field(
        default=None,
        description="TOML or YAML file of tenants' API keys with their adapter scopes and "
        "limits (edit with `openllm-clone keys`); re-read when it changes.",
    )
    scheduling: Literal["auto", "fifo", "fair"] = Field(
        default="auto",
        description="Admission order of waiting requests: fifo (arrival), fair (a weighted "
        "virtual token counter per tenant), auto (fair with --keys-file, else fifo).",
    )
    step_stages: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Split the compiled step into this many stages of consecutive layers "
        "(a package each); under fair scheduling a new tenant's prompt is prefilled "
        "between two stages of the step in flight instead of after it. Default: 4 under "
        "fair scheduling, else 1.",
    )
    usage_log: str | None = Field(
        default=None,
        description="Append each finished request (tenant, adapter, status, tokens) to this "
        "JSON-lines file; `openllm-clone usage FILE` sums it per day.",
    )
    max_body_bytes: int = Field(
        default=4 * 2**20, ge=1024, description="Largest request body accepted (413 beyond)."
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        description="Longest prompt + output in tokens; default: the model's context.",
    )
    kv_cache_mb: int = Field(
        default=1024,
        ge=1,
        description="KV-cache pool size in MiB, claimed (zeroed) at start; blocks are handed "
        "out as tokens arrive.",
    )
    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV block.")
    max_prefill_tokens: int | None = Field(
        default=None,
        ge=16,
        description="Prompt tokens prefilled per step (chunked prefill budget). Default: "
        "512, or 64 under fair scheduling (shorter steps: a new tenant's prompt waits less "
        "for the step in flight).",
    )
    prefix_caching: bool = Field(
        default=True,
        description="Reuse the KV blocks of prompt prefixes seen before (automatic prefix caching).",
    )
    adapters: list[AdapterSpec] = Field(
        default_factory=list, description="Adapters registered at start-up."
    )
    lenient_adapters: bool = Field(
        default=False,
        description="Start even when an adapter named at start (--adapter-id, a bento's, "
        "the run-time adapters file) cannot be served: it is logged as an error and listed "
        "as failed, with the reason, in /v1/adapters. Off: start exits non-zero with the "
        "reason before it is ready.",
    )
    max_adapters: int = Field(
        default=8, ge=1, le=1024, description="Adapters held in memory at once (LRU)."
    )
    adapter_registry: str | None = Field(
        default=None,
        description="JSON file recording adapters loaded at run time (POST /v1/adapters), "
        "shared by every worker and read again at the next start; default: "
        "<BENTOML_HOME>/openllm-clone/adapters-<model>-<port>.json; `none` turns it off.",
    )
    max_adapter_rank: int = Field(
        default=64, ge=1, le=1024, description="Highest LoRA rank accepted."
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Folders local adapter paths loaded at run time must lie under; "
        "empty means any path.",
    )
    max_adapter_mb: int = Field(
        default=1024, ge=1, description="Largest adapter weights file accepted, in MiB."
    )
    allow_pickle_adapters: bool = Field(
        default=False,
        description="Accept pickled adapter_model.bin files (unsafe; off by default).",
    )
    seed: int = Field(default=0, description="Seed for requests that give none.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="Level of openllm-clone's own logs in the server."
    )
    log_prompts: bool = Field(
        default=False, description="Add prompt text to the per-request log line (off: privacy)."
    )

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _no_empty_keys(cls, keys: list[str]) -> list[str]:
        return [k for k in (key.strip() for key in keys) if k]

    @model_validator(mode="after")
    def _unique_adapter_names(self) -> Settings:
        names = [a.name for a in self.adapters]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"adapter names must be unique; repeated: {sorted(dupes)}")
        return self

    @field_validator("keys_file", "usage_log")
    @classmethod
    def _absolute_paths(cls, path: str | None) -> str | None:
        # Workers may run in another directory (a bento's src/).
        return os.path.abspath(path) if path else None

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_mode(cls, value: object) -> object:
        return _compile_value(value) if value is not None else "auto"

    @field_validator("compile_cache")
    @classmethod
    def _cache_path(cls, path: str | None) -> str | None:
        if not path or path.lower() == "none":
            return path or None
        return os.path.abspath(os.path.expanduser(path))

    @property
    def fair_scheduling(self) -> bool:
        """True when waiting requests are admitted by tenant fairness, not arrival."""
        return self.scheduling == "fair" or (self.scheduling == "auto" and bool(self.keys_file))

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens per step: ``--max-prefill-tokens``, or its default."""
        if self.max_prefill_tokens is not None:
            return self.max_prefill_tokens
        return 64 if self.fair_scheduling else 512

    @property
    def compiled_stages(self) -> int:
        """The compiled step's stages: ``--step-stages``, or its default."""
        if self.step_stages is not None:
            return self.step_stages
        return 4 if self.fair_scheduling else 1

    def to_env(self) -> dict[str, str]:
        """Environment entries that carry these settings to worker processes."""
        return {SETTINGS_ENV: self.model_dump_json()}

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, cwd: str | None = None) -> Settings:
        """Settings from ``OPENLLM_CLONE_SETTINGS``, else a bento's baked settings file in
        the working directory, else the defaults."""
        env = os.environ if environ is None else environ
        raw = env.get(SETTINGS_ENV)
        if raw:
            return cls.model_validate(json.loads(raw))
        baked = os.path.join(cwd or os.getcwd(), SETTINGS_FILE)
        if os.path.isfile(baked):
            with open(baked) as fh:
                return cls.model_validate(json.load(fh))
        return cls()

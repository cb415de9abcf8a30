"""Settings, read from the environment and `.env` (pydantic-settings). Every setting is listed in
the README's configuration table; an invalid one stops start-up with one clear line."""

from __future__ import annotations

import os
import socket
from decimal import Decimal
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Price(BaseModel):
    """What Replicate bills for a model: per token for official language models, per second of
    `predict_time` for models on dedicated hardware."""

    usd_per_input_token: Decimal | None = None
    usd_per_output_token: Decimal | None = None
    usd_per_second: Decimal | None = None


class ModelProfile(BaseModel):
    """A Replicate model and how a conversation becomes its input.

    `input` is the request's input object; a value that is exactly one of `$prompt`,
    `$system_prompt`, `$image`, `$max_tokens`, `$temperature` is replaced by that value, every
    other value is sent as written."""

    slug: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    version: str | None = None  # community models are run by version: POST /v1/predictions
    prompt_format: Literal["llama3", "plain", "embedding"] = "llama3"
    input: dict[str, Any]
    price: Price = Price()


DEFAULT_CHAT_MODEL = ModelProfile(
    slug="meta/meta-llama-3-8b-instruct",
    prompt_format="llama3",
    # The prompt already carries the Llama 3 chat template, so the model's own template is `{prompt}`.
    input={"prompt": "$prompt", "prompt_template": "{prompt}", "max_tokens": "$max_tokens",
           "temperature": "$temperature"},
    price=Price(usd_per_input_token=Decimal("0.00000005"), usd_per_output_token=Decimal("0.00000025")),
)

DEFAULT_VISION_MODEL = ModelProfile(
    slug="yorickvp/llava-13b",
    version="80537f9eead1a5bfa72d5ac6ea6414379be41d4d4f6679fd776e9535d1eb58bb",
    prompt_format="plain",
    input={"image": "$image", "prompt": "$prompt", "max_tokens": "$max_tokens", "temperature": "$temperature"},
    price=Price(usd_per_second=Decimal("0.000725")),
)


# Embeddings for the knowledge base: 768 dimensions, as kb_chunks.embedding. `$texts` is the
# batch as a JSON list in a string (the model's `text_batch` input); the output is one embedding
# per text.
DEFAULT_EMBEDDING_MODEL = ModelProfile(
    slug="replicate/all-mpnet-base-v2",
    version="b6b7585c9640cd7a9572c6e129c9549d79c9c31f0d3fdce7baac7c67ca38f305",
    prompt_format="embedding",
    input={"text_batch": "$texts"},
    price=Price(usd_per_second=Decimal("0.000225")),
)


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Where the work comes from.
    worker_transport: Literal["auto", "supabase", "postgres"] = "auto"
    supabase_url: str | None = None
    supabase_service_role_key: SecretStr | None = None
    database_url: SecretStr | None = None

    # Replicate.
    replicate_api_token: SecretStr | None = None
    replicate_base_url: str = "https://api.replicate.com"
    chat_model: ModelProfile = DEFAULT_CHAT_MODEL
    vision_model: ModelProfile = DEFAULT_VISION_MODEL
    # More models an assistant may name (assistants.chat_model / vision_model), by slug. A slug
    # with no profile runs with the default profile of its kind under that slug.
    extra_models: list[ModelProfile] = Field(default_factory=list)
    embedding_model: ModelProfile = DEFAULT_EMBEDDING_MODEL
    embedding_dimensions: int = Field(768, ge=1)
    knowledge_match_threshold: float = Field(0.5, ge=-1, le=1)
    knowledge_match_count: int = Field(4, ge=1, le=50)
    knowledge_chunk_chars: int = Field(1200, ge=200, le=8000)
    knowledge_embed_batch: int = Field(16, ge=1, le=256)
    profile_prompt_max_chars: int = Field(1500, ge=0)
    # Images: storage://chat-attachments/<user>/<file> objects, or https URLs on public hosts.
    image_max_bytes: int = Field(10 * 1024 * 1024, ge=1)
    image_signed_url_seconds: int = Field(300, ge=10, le=3600)
    system_prompt: str = "You are a helpful, concise assistant."
    max_output_tokens: int = Field(512, ge=1, le=8192)
    temperature: float = Field(0.6, ge=0, le=2)
    context_token_budget: int = Field(6000, ge=256)
    replicate_prefer_wait_seconds: int = Field(60, ge=1, le=60)
    replicate_timeout_seconds: float = Field(30, gt=0)
    prediction_timeout_seconds: float = Field(300, gt=0)
    replicate_max_http_retries: int = Field(4, ge=0, le=10)
    replicate_max_retry_after_seconds: float = Field(20, ge=0)
    # Replicate allows 600 prediction creates a minute; staying under it avoids paying for 429s.
    # 0 turns the limiter off (benchmarks against the simulator).
    replicate_max_creates_per_minute: int = Field(600, ge=0)

    # The worker.
    worker_id: str = Field(default_factory=_default_worker_id)
    worker_concurrency: int = Field(32, ge=1, le=1000)
    worker_claim_batch: int = Field(16, ge=1, le=1000)
    worker_lease_seconds: int = Field(120, ge=10, le=3600)
    # On the postgres transport, each database call ends after this (0: no limit); on the
    # supabase transport PostgREST's role has its own statement_timeout.
    database_statement_timeout_seconds: float = Field(30, ge=0, le=3600)
    worker_sweep_interval_seconds: float = Field(15, gt=0)
    worker_shutdown_grace_seconds: float = Field(30, ge=0)
    worker_retry_base_seconds: float = Field(2, ge=0)
    worker_retry_max_seconds: float = Field(300, ge=0)
    # uvloop's event loop (libuv) spends less CPU per socket event than asyncio's own; `asyncio`
    # is the fallback where uvloop is not installed (Windows).
    worker_event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    stream_replies: bool = True
    stream_publish_interval_ms: int = Field(100, ge=0, le=5000)
    # All of one worker's stream messages, per second (Supabase Realtime quotas: 100/s Free, 500/s
    # Pro, per project); 0: no budget.
    stream_max_messages_per_second: float = Field(50, ge=0)
    # A reply streams only while the budget above still gives every stream a delta at least this
    # often; past that, new replies are written whole (no event stream read). 0: every reply streams.
    stream_max_interval_ms: int = Field(1000, ge=0, le=60000)
    # A prediction's event stream quiet this long is checked with a read: a prediction that ended
    # without its stream saying so is not waited for until its deadline.
    stream_idle_poll_seconds: float = Field(10, ge=0.1, le=600)
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9108, ge=0, le=65535)

    # Bring your own key, where Supabase Vault is absent: the Fernet key the worker encrypts users'
    # Replicate tokens with (`python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"`).
    byok_encryption_key: SecretStr | None = None
    # Operator reports (materialized views) are refreshed this often by the worker; 0: never.
    usage_report_refresh_seconds: float = Field(300, ge=0)
    # Usage windows past their retention (prune_usage_windows) are deleted this often; 0: never.
    usage_prune_interval_seconds: float = Field(3600, ge=0)

    @field_validator("byok_encryption_key")
    @classmethod
    def _fernet_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from cryptography.fernet import Fernet

            try:
                Fernet(value.get_secret_value().encode())
            except ValueError:
                raise ValueError("must be a Fernet key: 32 url-safe base64-encoded bytes") from None
        return value

    @field_validator("supabase_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _transport_has_what_it_needs(self) -> Settings:
        if self.transport == "supabase":
            if not self.supabase_url or not self.supabase_service_role_key:
                raise ValueError("the supabase transport needs SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY")
        return self

    @property
    def transport(self) -> Literal["supabase", "postgres"]:
        """`auto`: supabase when SUPABASE_URL is set, unless DATABASE_URL is set too (then the
        database is reached directly and Supabase serves only Storage)."""
        if self.worker_transport != "auto":
            return self.worker_transport
        return "supabase" if self.supabase_url and not self.database_url else "postgres"

    @property
    def uses_embedded_database(self) -> bool:
        return self.transport == "postgres" and self.database_url is None


def describe_error(error: ValidationError) -> str:
    """One line naming each bad setting by its environment variable."""
    parts = []
    for item in error.errors():
        name = ".".join(str(p) for p in item["loc"]).upper() or "settings"
        parts.append(f"{name}: {item['msg']}")
    return "invalid configuration: " + "; ".join(parts)

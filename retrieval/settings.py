"""Every knob of the engine in one place, read from the environment (docs/CONFIGURATION.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_IMAGE_MODEL = "timm:tf_efficientnet_lite0"
DEFAULT_TEXT_MODEL = "sentence-transformers:all-MiniLM-L6-v2"


class Settings(BaseSettings):
    """Store, models and defaults. `QDRANT_URL` selects a server; otherwise the embedded store at `QDRANT_PATH`."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", env_file=None)

    qdrant_url: str | None = Field(default=None, description="Qdrant server URL, e.g. http://localhost:6333")
    qdrant_api_key: str | None = Field(default=None, description="API key for the Qdrant server")
    qdrant_path: Path | None = Field(default=None, description="folder of the embedded store (default: ./data/qdrant)")
    # How a server (QDRANT_URL) lays out a new catalogue's collection (docs/SCALE.md); existing
    # collections keep theirs. The embedded engines have one shard; the edge engine takes the storage
    # choices (on disk, int8) for a new catalogue, local mode none.
    qdrant_shards: int = Field(default=1, ge=1, le=1_000, description="server: shards of a new collection")
    qdrant_replicas: int = Field(default=1, ge=1, le=16, description="server: copies of each shard")
    qdrant_write_consistency: int = Field(
        default=1, ge=1, le=16, description="server: replicas that must confirm a write (at most QDRANT_REPLICAS)"
    )
    qdrant_on_disk: bool = Field(
        default=False,
        description="server and edge engine: original vectors (server: and payload) on disk, memory-mapped",
    )
    qdrant_quantization: Literal["none", "int8"] = Field(
        default="none",
        description="server and edge engine: int8 scalar quantization of the dense vectors, kept in RAM; queries "
        "rescore the oversampled candidates with the original vectors",
    )
    store_backend: Literal["auto", "local", "edge"] = Field(
        default="auto",
        description=(
            "embedded store engine: qdrant-edge-py (edge) or qdrant-client local mode (local); auto: the engine "
            "that wrote the folder, edge for a new one"
        ),
    )
    image_model: str = Field(default=DEFAULT_IMAGE_MODEL, description="image encoder spec")
    text_model: str = Field(default=DEFAULT_TEXT_MODEL, description="text encoder spec")
    image_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="timm backbones: bf16 where the CPU computes it natively (auto), or fp32"
    )
    inference: Literal["auto", "torch", "onnx"] = Field(
        default="auto",
        description="what runs the image backbone's forward: onnx (ONNX Runtime, float32, its export kept in "
        "MODELS_PATH/onnx), torch, or auto (for a timm backbone: onnx in the service and wherever torch would run "
        "it in float32, torch in bf16 for ingest and other batch work: docs/BENCHMARKS.md)",
    )
    text_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="sentence-transformers: bf16 where the CPU computes it natively (auto), or fp32"
    )
    default_catalogue: str = Field(default="products", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    batch_size: int = Field(default=8, ge=1, le=1024, description="images per ingest encoder batch")
    decode_workers: int = Field(default=2, ge=1, le=64, description="threads that read and decode images")
    ingest_chunk: int = Field(default=256, ge=1, le=10_000, description="products read, checked and stored together")
    max_image_pixels: int = Field(default=40_000_000, ge=1, description="larger images are refused (bombs)")
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_job_products: int = Field(default=1_000, ge=1, le=100_000, description="products one HTTP match job takes")
    ocr: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "read the text on product photos at ingest (and on query photos of such a catalogue): on, off, or "
            "auto (a sample of the catalogue's first photos decides, and the catalogue keeps the decision)"
        ),
    )
    query_crops: str = Field(
        default="0.8,0.6",
        max_length=100,
        description=(
            "a query photo is also embedded as these centre crops (shares of its width and height, comma "
            "separated) and searches with the mean direction; empty: the whole photo only"
        ),
    )
    query_crops_margin: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "a query photo whose best catalogue photo (the whole photo searched alone, within the query's "
            "filters) beats the second by this cosine margin skips the crops: one forward instead of three; "
            "0 (default): always the crops (measured slower with EfficientNet-Lite0 on a 2-core CPU)"
        ),
    )
    ocr_deadline_s: float = Field(
        default=3.0,
        gt=0,
        le=60,
        description="longest read of a query photo's text; past it the search answers without the ocr ranking",
    )
    ocr_queue: int = Field(default=8, ge=1, le=1_000, description="query photos waiting to be read; more: 503")
    micro_batching: bool = Field(default=True, description="gather concurrent requests' photos / texts into one batch")
    batch_window_ms: float = Field(
        default=0.0, ge=0, le=1_000, description="extra wait for a query batch to fill (0: take what is queued)"
    )
    batch_max: int = Field(default=32, ge=1, le=1_024, description="most photos (or texts) in one query batch")
    torch_threads: int = Field(
        default=0, ge=0, le=256, description="service, micro-batching on: torch threads (0: half the cores, min 1)"
    )
    encoder_queue: int = Field(default=256, ge=1, le=100_000, description="requests waiting per encoder; more: 503")
    request_timeout_s: float = Field(default=30.0, gt=0, le=600, description="longest wait for an encoder")
    allow_private_urls: bool = Field(
        default=False, description="fetch image URLs whose host resolves to a private / loopback / link-local address"
    )
    url_allow_hosts: str = Field(default="", description="comma-separated host names exempt from that check")
    url_retries: int = Field(default=3, ge=0, le=10, description="retries of an image URL (connection, 5xx, 429)")
    url_timeout_s: float = Field(
        default=15.0, gt=0, le=300, description="longest fetch of one image URL, redirects and retries included"
    )
    url_concurrency: int = Field(default=8, ge=1, le=64, description="image URL requests in flight at once")
    sources_path: Path | None = Field(
        default=None, description="where zip inputs are extracted (default: a 'sources' folder beside the store)"
    )
    max_archive_bytes: int | None = Field(
        default=None,
        ge=1,
        description="uncompressed size cap of a zip input (default: 8 GiB or a quarter of the sources disk's free "
        "space, whichever is less)",
    )
    jobs_path: Path | None = Field(
        default=None,
        description="the service's job records, kept across restarts (default: jobs.sqlite in the store's folder)",
    )
    labels_path: Path | None = Field(
        default=None,
        description="what reviewers said of pairs (the review loop's labels; default: labels.sqlite in the store's "
        "folder): kept across restarts and re-ingests",
    )
    max_labels: int = Field(
        default=1_000_000, ge=1, description="review labels a catalogue keeps at most (more: 429 until some go)"
    )
    max_archive_entries: int = Field(default=200_000, ge=1, description="entry count cap of a zip input")
    models_path: Path | None = Field(
        default=None,
        description="fine-tuned models (text encoders, re-rankers), one folder per SHA-256 digest, named by "
        "catalogue records (default: a 'models' folder beside the store)",
    )
    # The HTTP service's hardening and operations (docs/OPERATIONS.md).
    api_key: SecretStr | None = Field(
        default=None, description="when set, write and admin endpoints need it in the X-API-Key header"
    )
    cors_origins: str = Field(default="", description="comma-separated origins allowed by CORS ('*': any); none")
    allowed_hosts: str = Field(
        default="",
        max_length=4_000,
        description="comma-separated host names a request's Host header may name (others: 400); always the "
        "loopback names and the served --host; '*': any (behind a proxy that checks them)",
    )
    max_ingest_upload_bytes: int = Field(
        default=512 * 1024**2, ge=1024, description="largest catalogue file or zip POST /catalogues/{c}/ingest takes"
    )
    max_queued_jobs: int = Field(default=8, ge=1, le=10_000, description="jobs waiting at once; more: 429")
    max_stored_uploads_bytes: int = Field(
        default=2 * 1024**3,
        ge=1024,
        description="bytes of uploads waiting for their ingest jobs, all together; more: 429",
    )
    shutdown_timeout_s: int = Field(
        default=30, ge=0, le=3_600, description="on SIGTERM, seconds in-flight requests get to finish"
    )
    log_format: Literal["json", "text"] = Field(default="json", description="service logs: JSON lines, or plain text")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")

    @field_validator("query_crops", mode="after")
    @classmethod
    def _crops(cls, value: str) -> str:
        try:
            shares = [float(part) for part in value.split(",") if part.strip()]
        except ValueError:
            raise ValueError("QUERY_CROPS: shares between 0 and 1, comma separated (e.g. 0.8,0.6)") from None
        if any(not 0.1 <= share < 1 for share in shares) or len(shares) > 4:
            raise ValueError("QUERY_CROPS: up to 4 shares, each at least 0.1 and below 1 (e.g. 0.8,0.6)")
        return value

    @property
    def query_crop_shares(self) -> tuple[float, ...]:
        return tuple(float(part) for part in self.query_crops.split(",") if part.strip())

    @field_validator("api_key", mode="after")
    @classmethod
    def _no_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        return value if value is not None and value.get_secret_value() else None  # API_KEY= means no key

    @model_validator(mode="after")
    def _one_store(self) -> Settings:
        if self.qdrant_url and self.qdrant_path is not None:
            raise ValueError(
                "both QDRANT_URL and QDRANT_PATH are set: unset QDRANT_PATH to use the server, "
                "or unset QDRANT_URL to use the embedded store"
            )
        if self.qdrant_url and self.store_backend != "auto":
            raise ValueError(
                f"STORE_BACKEND={self.store_backend} chooses an embedded engine, but QDRANT_URL points at a server: "
                "unset one of them"
            )
        if self.qdrant_api_key and not self.qdrant_url:
            raise ValueError("QDRANT_API_KEY is set without QDRANT_URL: the embedded store takes no key")
        server_only = {
            "QDRANT_SHARDS": self.qdrant_shards != 1,
            "QDRANT_REPLICAS": self.qdrant_replicas != 1,
            "QDRANT_WRITE_CONSISTENCY": self.qdrant_write_consistency != 1,
        }
        if not self.qdrant_url and (named := [name for name, used in server_only.items() if used]):
            raise ValueError(f"{', '.join(named)} lay out a Qdrant server's collections: set QDRANT_URL too")
        if self.store_backend == "local" and (self.qdrant_on_disk or self.qdrant_quantization != "none"):
            raise ValueError(
                "QDRANT_ON_DISK and QDRANT_QUANTIZATION need the edge engine or a server: qdrant-client's local "
                "mode (STORE_BACKEND=local) keeps every vector in memory"
            )
        if self.qdrant_write_consistency > self.qdrant_replicas:
            raise ValueError("QDRANT_WRITE_CONSISTENCY cannot exceed QDRANT_REPLICAS: no write could be confirmed")
        return self

    @property
    def store_path(self) -> Path:
        return (self.qdrant_path or Path("data") / "qdrant").resolve()

    @property
    def sources_root(self) -> Path:
        return (self.sources_path or self.store_path.parent / "sources").resolve()

    @property
    def models_root(self) -> Path:
        return (self.models_path or self.store_path.parent / "models").resolve()

    @property
    def jobs_file(self) -> Path:
        # inside the store's folder: two stores under one parent (stores/a, stores/b) keep their jobs apart
        return (self.jobs_path or self.store_path / "jobs.sqlite").resolve()

    @property
    def labels_file(self) -> Path:
        return (self.labels_path or self.store_path / "labels.sqlite").resolve()

    @property
    def allowed_host_list(self) -> list[str]:
        return [host.strip().lower() for host in self.allowed_hosts.split(",") if host.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    def redact_paths(self, text: str) -> str:
        """`text` with this machine's data folders named, not shown (messages that reach clients)."""
        for path, name in (
            (self.sources_root, "<sources>"),
            (self.models_root, "<models>"),
            (self.store_path, "<store>"),
            (self.jobs_file.parent, "<data>"),
            (self.store_path.parent, "<data>"),
            (Path.cwd(), "<cwd>"),
        ):
            if len(path.parts) > 2:  # never `/` or `/tmp` alone
                text = text.replace(str(path), name)
        return text

    def describe_store(self, engine: str, *, public: bool = False) -> str:
        """Which store, for logs and the command line (`engine`: the opened store's, `ProductStore.engine`);
        `public`: for HTTP clients, naming no path or host."""
        if self.qdrant_url:
            return "Qdrant server" if public else f"Qdrant server {self.qdrant_url}"
        name = {"edge": "qdrant-edge", "local": "qdrant-client local mode"}.get(engine, engine)
        return f"embedded Qdrant ({name})" if public else f"embedded Qdrant ({name}) at {self.store_path}"

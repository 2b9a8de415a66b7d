"""Service settings: environment variables prefixed CHARRNN_ (e.g. CHARRNN_MODEL_STORE), one instance per app.

Every limit a client can hit is a named setting here, and the error that enforces it names the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from charrnn.runtime import available_cpus


RATE_PATTERN = r"^(|\d+\s*/\s*(second|minute|hour|day))$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHARRNN_", protected_namespaces=())

    model_store: Path = Path("model_store")  # folder of <name>.safetensors checkpoints
    reload_interval_s: float = Field(0.0, ge=0)  # rescan the model store this often (0: only POST /admin/reload)
    default_model: str = "shakespeare"  # used when a request names no model (else the only/first loaded one)

    # Request limits
    max_prime_chars: int = Field(10_000, ge=0)  # characters of `prime`
    max_chars: int = Field(5_000, ge=1)  # upper bound of `max_chars` (characters generated per request)
    max_temperature: float = Field(5.0, gt=0)
    max_stop_strings: int = Field(8, ge=0)  # entries of `stop`
    max_stop_chars: int = Field(64, ge=1)  # length of one stop string
    max_repetition_window: int = Field(1024, ge=1)  # characters `repetition_window` may look back over
    max_n: int = Field(16, ge=1)  # POST /v1/completions: `n` and prompts per request (each choice is a stream)
    max_body_bytes: int = Field(1_000_000, ge=1_000)  # request body size
    max_inspect_chars: int = Field(2_000, ge=1)  # text of POST /inspect (the answer has a row per character)
    max_inspect_units: int = Field(64, ge=1)  # units one POST /inspect may name (each adds a number per character)
    inspect_queue: int = Field(4, ge=0)  # POST /inspect waiting behind the one that computes; past it: 429

    # Capacity
    max_streams: int = Field(256, ge=1)  # generations running at once; past it: 429 with Retry-After
    max_sessions: int = Field(10_000, ge=1)  # sessions kept; the least recently used is evicted past it
    session_ttl_s: float = Field(3600.0, gt=0)  # idle sessions expire after this many seconds
    # Where sessions live: "memory" (this process) or a Redis URL (redis://host:6379/0) shared by replicas.
    session_store: str = Field("memory", pattern=r"^(memory|rediss?://.+)$")
    session_lock_ttl_s: float = Field(30.0, gt=0)  # Redis: a generation's lock lapses this long after a crash

    # Decoding
    batching: bool = True  # off: every stream steps its own model call (the naive baseline)
    # auto: bf16 where the CPU has bf16 units, else fp32. Either way each row's result is independent of its
    # batch (charrnn/engine.py); loss and speed of both in docs/benchmarks.md.
    decode_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # torch CPU threads for model steps and primes; unset: one less than the CPUs this process may use (its
    # affinity and cgroup quota), at least 1, leaving a CPU to the event loop that frames and sends the
    # characters. Two compute threads that wait for each other lose badly to any CPU-bound neighbour; one
    # thread keeps a stream's rate beside them (docs/benchmarks.md, "Fair under contention").
    threads: int | None = Field(None, ge=1)

    # Access (docs/security.md)
    # API keys, comma-separated, and/or a file of keys (one per line, # comments). Set: every route but
    # /healthz, /readyz and the page needs `Authorization: Bearer <key>`, and sessions belong to their key.
    api_keys: SecretStr = SecretStr("")
    api_keys_file: Path | None = None
    # Keys for /admin/* (they also work as API keys). Unset: /admin/* answers only on loopback.
    admin_keys: SecretStr = SecretStr("")
    admin_keys_file: Path | None = None
    # Browser origins allowed to call the API from other sites (comma-separated; off by default). Other
    # sites' POST and DELETE requests are refused (403) even when they need no CORS preflight.
    cors_origins: str = ""
    access_log: bool = True  # one JSON line per request on stderr (request id, client, route, status, time)

    # Per-client limits: a client is its API key, or its address without keys (shared through Redis when the
    # session store is Redis). Rates are `<count>/<second|minute|hour|day>`, empty to turn one off; 429 past them.
    client_rate: str = Field("600/minute", pattern=RATE_PATTERN)  # requests (all but health, readiness, page)
    client_sessions: str = Field("1000/hour", pattern=RATE_PATTERN)  # new sessions: one client cannot evict all
    client_max_streams: int = Field(32, ge=0)  # generations running at once per client (0: no limit)

    # Streaming and lifecycle
    sse_ping_s: float = Field(15.0, gt=0)  # keep-alive comment interval on idle streams
    shutdown_grace_s: float = Field(5.0, ge=0)  # on SIGTERM: time for open streams to get their final event

    # Connections (app/connections.py; applied by `charrnn serve`, not by a bare `uvicorn app.main:app`)
    # A connection is closed if its request head is not complete this long after it opens or after its last
    # response: slowloris and silent sockets cannot hold a file descriptor forever.
    header_timeout_s: float = Field(10.0, gt=0)
    keep_alive_s: float = Field(5.0, gt=0)  # an idle keep-alive connection is closed after this long
    # Connections held at once; past it a new one is answered 503 (Retry-After) and closed. Never more than the
    # open-file limit (raised to its hard limit at start) less app.connections.FD_RESERVE.
    max_connections: int = Field(1000, ge=1)

    def decode_threads(self) -> int:
        """Torch threads for model compute: `threads`, or derived from the CPUs this process may use."""
        return self.threads or max(1, available_cpus() - 1)

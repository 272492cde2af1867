"""Configuration, the bottom layer: small dataclasses, validated on construction, and the flags made
from them. The package imports nothing of flexemr outside itself (nor torch or numpy), so every layer
may use it. This module holds the sections and their flags; beside it:

- `model`: `ModelSource`, where the weights come from (loading them is `flexemr.model.source`'s);
- `plan`: `ShardingPlan`, which server holds which rows (making one is `flexemr.sharding.plan`'s);
- `cache`: the ranker's cache tuning (`CacheConfig`, its load monitor and cost gate);
- `security`: the shared secret, what each server proves it holds (`Identity`), TLS contexts;
- `spec`: `ClusterSpec`, all of the above for one deployment in one JSON file.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

LookupMode = Literal["partial", "raw"]
EngineMode = Literal["single", "shared", "mapped"]
CreditMode = Literal["priority", "piggyback", "off"]
TransportKind = Literal["tcp", "ucx"]
CacheKind = Literal["off", "fixed", "adaptive"]
HttpParser = Literal["httptools", "h11"]


@dataclass(frozen=True)
class Flag:
    """A config field's command-line flag. `cli.flags` makes the argparse flag from it and the
    field (type, choices of a Literal, default), so each default is written once, here."""

    name: str
    """The flag, e.g. `--io-threads`."""
    help: str
    unit: Literal["bytes", "ms"] | None = None
    """`bytes`: the flag takes sizes like 64MiB; `ms`: milliseconds, for a field in seconds."""


def flag(name: str, help: str, unit: Literal["bytes", "ms"] | None = None) -> dict[str, Flag]:
    """Field metadata giving the field a command-line flag: `field(default=..., metadata=flag(...))`."""
    return {"flag": Flag(name, help, unit)}


# Byte sizes as people write them on a command line or in a spec file: 4096, 64MiB, 1.5GB.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """`"64MiB"` -> 67108864. KiB/MiB/GiB/TiB and bare K/M/G/T are powers of 1024; KB/MB/GB/TB are
    powers of 1000 (case-insensitive). Fractions are rounded down to whole bytes."""
    match = _PATTERN.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 4096, 64MiB, 1.5GB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int) -> str:
    """2147483648 -> '2.0GiB' (for logs and stats)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f}{unit}" if unit != "B" else f"{n}B"
        value /= 1024
    return f"{value:.1f}TiB"


@dataclass(frozen=True)
class CacheMode:
    """The ranker's `--cache` setting, parsed (once: from its flag, or from a spec file)."""

    kind: CacheKind = "off"
    fixed_bytes: int = 0
    """Capacity of the `fixed` mode."""

    @classmethod
    def parse(cls, text: str) -> CacheMode:
        """`off`, `adaptive` or `fixed:BYTES` (BYTES like 4096, 64MiB, 1.5GB)."""
        name, _, size = text.strip().partition(":")
        if name == "fixed" and size:
            return cls("fixed", parse_bytes(size))
        if name in ("off", "adaptive") and not size:
            return cls(name)  # type: ignore[arg-type]
        raise ValueError(f"cache mode must be off, fixed:BYTES (e.g. fixed:64MiB) or adaptive, got {text!r}")

    def __str__(self) -> str:
        return f"fixed:{self.fixed_bytes}" if self.kind == "fixed" else self.kind


@dataclass(frozen=True)
class Endpoint:
    host: str = "127.0.0.1"
    port: int = 0
    """0 lets the OS choose (local clusters report the chosen port back)."""

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class RankerConfig:
    host: str = field(default="127.0.0.1", metadata=flag("--host", "the ranker's HTTP address"))
    port: int = field(default=8000, metadata=flag("--port", "HTTP port (0: any free port)"))
    grpc_port: int | None = field(
        default=None, metadata=flag("--grpc-port", "also serve KServe v2 gRPC here (0: any free port)")
    )
    """KServe v2 gRPC port (0: any free port); None: no gRPC front."""
    model_name: str = field(
        default="dlrm", metadata=flag("--model-name", "the name clients use in /v2/models/NAME")
    )
    http_parser: HttpParser = field(
        default="httptools",
        metadata=flag("--http-parser", "HTTP parser and event loop: httptools + uvloop, or h11 + asyncio"),
    )
    """`httptools`: the compiled HTTP parser on uvloop (the default: about half the event loop's time
    per request); `h11`: pure Python on asyncio's loop, for comparison."""
    lookup: LookupMode = field(
        default="partial", metadata=flag("--lookup", "server-side pooling (partial) or raw rows")
    )
    """`partial`: servers pool their rows per bag; `raw`: servers return rows, the ranker pools."""
    max_batch: int = field(
        default=8192, metadata=flag("--max-batch", "largest batch accepted (samples per request)")
    )
    """Largest batch (samples per request) accepted; larger ones get HTTP 400."""
    max_indices_per_sample: int = 4096
    """Largest number of indices per sample on average; bounds request memory."""
    request_timeout_s: float = 10.0
    """A lookup that has not completed by then fails the request (HTTP 503)."""
    torch_threads: int = field(
        default=0,
        metadata=flag(
            "--torch-threads",
            "the ranker's CPU threads per torch op (0: auto, the cores shared with the embedding "
            "servers a serve starts beside it, else all)",
        ),
    )
    """Intra-op threads of the ranker's torch kernels. An op split over a core another process
    holds waits for it (queries 20x slower seen on 2 cores shared with the servers), so `auto`
    divides the cores among the ranker and the servers started on its host."""
    device: str = field(
        default="auto", metadata=flag("--device", "dense model device: auto, cpu, cuda, cuda:1")
    )
    """Where the dense model runs: `auto` picks `cuda` when available, else `cpu`."""
    batching: bool = field(
        default=False,
        metadata=flag(
            "--batching", "dynamic batching: requests that wait for the model are merged into its next batch"
        ),
    )
    """Dynamic batching: the model runs one batch at a time, and the requests that arrived meanwhile
    are merged into the next one (up to `max_batch`). A `batch_window_ms` above 0 turns it on."""
    batch_window_ms: float = field(
        default=0.0,
        metadata=flag("--batch-window-ms", "dynamic batching: wait this long for more requests (0: none)"),
    )
    """With dynamic batching, how long a batch waits for more requests after its first (0: it takes
    only those already waiting); above 0 it turns batching on."""
    cache: CacheMode = field(
        default=CacheMode(),
        metadata=flag("--cache", "embedding cache on the ranker: off, fixed:BYTES (fixed:64MiB), adaptive"),
    )
    """Embedding cache on the ranker's device: `off`, `fixed:BYTES` (e.g. fixed:64MiB) or `adaptive`
    (written so in a spec file); its tuning is the spec's `cache` section."""
    device_memory_bytes: int | None = field(
        default=None,
        metadata=flag(
            "--device-memory",
            "bytes the dense model and cache share (default: GPU free memory, or 1/4 of RAM on CPU)",
            "bytes",
        ),
    )
    """Memory budget the dense model's activations and the cache share; None: the GPU's free memory,
    or a quarter of RAM on a CPU."""
    max_in_flight_samples: int | None = field(
        default=None,
        metadata=flag(
            "--max-in-flight",
            "admission bound: samples in flight before requests get 429 (default: 2 x --max-batch)",
        ),
    )
    """Admission bound: samples admitted and not yet answered; a request beyond it gets HTTP 429 at
    once. None: 2 x max_batch."""
    deadline_s: float = field(
        default=10.0,
        metadata=flag(
            "--deadline-ms",
            "a request's default deadline (header Flexemr-Timeout-Ms overrides); expired work is dropped",
            "ms",
        ),
    )
    """A request's time budget from arrival, unless its `Flexemr-Timeout-Ms` header sets one; work
    not yet started when it passes is dropped (HTTP 504)."""
    max_body_bytes: int = field(
        default=256 * 2**20,
        metadata=flag("--max-body", "largest request body, chunked too (413 beyond it)", "bytes"),
    )
    """Largest request body, chunked or not (HTTP 413 as soon as a body passes it); its JSON part
    may be 1/16 of it (parsed JSON numbers take about 16 times their text)."""

    def __post_init__(self) -> None:
        if self.lookup not in ("partial", "raw"):
            raise ValueError(f"lookup must be 'partial' or 'raw', got {self.lookup!r}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {self.max_batch}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.max_in_flight_samples is not None and self.max_in_flight_samples < self.max_batch:
            raise ValueError(
                f"max_in_flight_samples ({self.max_in_flight_samples}) must be at least max_batch "
                f"({self.max_batch}), or no full batch could ever be admitted"
            )
        if not isinstance(self.cache, CacheMode):  # parsed once, where the text is read
            raise TypeError(
                f"cache must be a CacheMode, e.g. CacheMode.parse('fixed:64MiB'), got {self.cache!r}"
            )
        if self.deadline_s <= 0 or self.max_body_bytes < 1:
            raise ValueError(
                f"deadline_s and max_body_bytes must be positive, got {self.deadline_s}, "
                f"{self.max_body_bytes}"
            )

    @property
    def in_flight_limit(self) -> int:
        return self.max_in_flight_samples or 2 * self.max_batch


@dataclass(frozen=True)
class EngineConfig:
    """The ranker's I/O engine (`flexemr.engine`): threads, connections, credits, migration."""

    mode: EngineMode = field(
        default="mapped",
        metadata=flag(
            "--engine", "I/O engine: mapped (thread-owned connections), shared (locked), single (one thread)"
        ),
    )
    """`mapped`: each connection owned by one I/O thread, no locks; `single`: one I/O thread;
    `shared`: threads share all connections under per-connection locks (the naive baseline)."""
    transport: TransportKind = field(
        default="tcp",
        metadata=flag(
            "--transport", "node links: tcp, or ucx (UCX: RDMA, shared memory or TCP; the ucx extra)"
        ),
    )
    """What every node link runs over (ranker and updaters to embedding servers; the servers listen
    with it): `tcp` sockets, or `ucx` (`protocol.ucx_stream`: UCX picks RDMA, shared memory or TCP,
    as `UCX_TLS` allows; needs the `ucx` extra and a shared secret; no TLS)."""
    io_threads: int = field(default=2, metadata=flag("--io-threads", "I/O threads"))
    """I/O threads (`single` uses one whatever this says)."""
    connections_per_server: int = field(
        default=0,
        metadata=flag("--connections-per-server", "data connections per embedding server (0: auto)"),
    )
    """Data connections per server; 0 = enough to give every thread one, at least 2."""
    credits: CreditMode = field(
        default="priority",
        metadata=flag(
            "--credits", "flow control: credits on a priority control channel, piggybacked on lookups, or off"
        ),
    )
    """Flow control: credits on a high-priority control connection, piggybacked on lookups, or off."""
    credit_capacity: int = 64
    """Response slots per data connection: the most responses a server may send ahead."""
    migration: bool = field(
        default=True, metadata=flag("--migration", "move connections between I/O threads under skew")
    )
    """Move connections from busy to idle I/O threads under skew (`mapped` mode only)."""
    migration_interval_s: float = 0.005
    """How often the migration policy samples per-connection queues."""
    migration_window: int = 20
    """Samples the policy averages over."""
    migration_imbalance: float = 1.5
    """Move when the busiest thread's load exceeds this times the least busy thread's."""
    migration_cooldown: int = 20
    """Samples to wait after a move before the next one (hysteresis)."""
    max_in_flight_per_connection: int = 4096
    """Bounds the engine's queues: beyond this many subrequests queued or in flight per data
    connection (summed over all connections), new ones fail at once (overload is refused)."""
    reconnect_interval_s: float = 0.5
    """How often connections that went down are retried."""
    debug_ownership: bool = False
    """Check on every socket operation that only the owning thread touches a connection."""

    def __post_init__(self) -> None:
        if self.mode not in ("single", "shared", "mapped"):
            raise ValueError(f"engine mode must be single, shared or mapped, got {self.mode!r}")
        if self.credits not in ("priority", "piggyback", "off"):
            raise ValueError(f"credits must be priority, piggyback or off, got {self.credits!r}")
        if self.io_threads < 1 or self.connections_per_server < 0 or self.credit_capacity < 1:
            raise ValueError(
                f"need io_threads >= 1, connections_per_server >= 0, credit_capacity >= 1; got "
                f"{self.io_threads}, {self.connections_per_server}, {self.credit_capacity}"
            )
        if self.migration_interval_s <= 0 or self.reconnect_interval_s <= 0:
            raise ValueError("migration_interval_s and reconnect_interval_s must be positive")


@dataclass(frozen=True)
class SecurityConfig:
    """How ranker <-> embedding server links prove who is at each end (README: threat model).

    The shared secret itself is never in a spec file or on a command line: it is read from
    `secret_file`, else from the environment variable `secret_env`. Without one, links still check
    identities but prove nothing, and embedding servers bind loopback addresses only."""

    secret_file: str | None = field(
        default=None,
        metadata=flag(
            "--secret-file",
            "file holding the shared secret of node links (default: $FLEXEMR_SECRET; serve makes one)",
        ),
    )
    """File holding the cluster's shared secret (surrounding whitespace ignored)."""
    secret_env: str = "FLEXEMR_SECRET"
    """Environment variable holding the secret when there is no `secret_file`."""
    tls_cert: str | None = None
    """PEM certificate of this node: turns on TLS for node links (with `tls_key` and `tls_ca`)."""
    tls_key: str | None = None
    """PEM private key of `tls_cert`."""
    tls_ca: str | None = None
    """PEM CA bundle that peers' certificates must chain to (both ways: mutual TLS)."""

    def __post_init__(self) -> None:
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(tls) and not all(tls):
            raise ValueError(f"TLS needs tls_cert, tls_key and tls_ca together, got {tls}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclass(frozen=True)
class NodeLimits:
    """Bounds of an embedding server, what it spends on counting lookups, and the ranker's
    heartbeat to it."""

    max_connections: int = 256
    """Connections a server holds at once (each has a thread); when all of them have proven the
    secret, new ones are closed at once."""
    max_handshakes: int = 128
    """Of those, connections still in their handshake (not yet proven the secret). When this or
    `max_connections` is reached, a new connection takes the slot of the oldest one still in its
    handshake: peers without the secret cannot lock out a ranker that holds it."""
    handshake_timeout_s: float = 5.0
    """A connection that has not completed its whole handshake this long after it was accepted is
    closed (a deadline, however often the peer sends a byte)."""
    idle_timeout_s: float = 300.0
    """A connection silent for this long is closed (the ranker keeps its own alive)."""
    max_held_bytes: int = 64 * 2**20
    """Answers a connection holds back for want of credits, in bytes; beyond, it stops reading."""
    heartbeat_interval_s: float = 0.2
    """How often the ranker pings each server on its control connection."""
    heartbeat_timeout_s: float = 1.0
    """A server whose oldest unanswered ping is this old is marked not ready, its subrequests failed."""
    range_sample: int = field(
        default=16,
        metadata=flag("--range-sample", "servers count one lookup in N per row range, for plan --from-stats"),
    )
    """Embedding servers count the rows of one lookup subrequest in this many, drawn at random, each
    as this many lookups (`GET /v2/stats/ranges`, for `flexemr plan --from-stats`): estimates that
    cost 1/N of exact counts' CPU (up to a quarter of a busy server's, counting all). 1: every
    subrequest, exact counts."""

    def __post_init__(self) -> None:
        values = dataclasses.asdict(self)
        if any(v <= 0 for v in values.values()):
            raise ValueError(f"node limits must all be positive, got {values}")
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise ValueError(
                f"heartbeat_timeout_s ({self.heartbeat_timeout_s}) must exceed heartbeat_interval_s "
                f"({self.heartbeat_interval_s})"
            )


@dataclass(frozen=True)
class FrameLimits:
    """What a received frame may declare before any of its body is read (a spec's `frames`)."""

    max_buffers: int = 8
    """Arrays per frame."""
    max_frame_bytes: int = 512 * 2**20
    """Bytes of a frame's body (all its arrays)."""
    max_dim: int = 2**31 - 1
    """Largest extent of an array's dimension."""

    def __post_init__(self) -> None:
        if min(self.max_buffers, self.max_frame_bytes, self.max_dim) < 1:
            raise ValueError(f"frame limits must all be positive, got {self}")


@dataclass(frozen=True)
class StorageConfig:
    """Where embedding servers keep their rows (`flexemr.embedding_server.storage`)."""

    kind: Literal["dram", "mmap"] = field(
        default="dram",
        metadata=flag(
            "--storage", "embedding servers keep rows in memory, or in a file they memory-map (SSD tier)"
        ),
    )
    """`dram`: in memory; `mmap`: in a file each server memory-maps (the SSD tier)."""
    directory: str | None = field(
        default=None,
        metadata=flag("--storage-dir", "--storage mmap: folder of the row files (reused on restart)"),
    )
    """`mmap`: the folder of the row files (one per server, reused across restarts)."""

    def __post_init__(self) -> None:
        if self.kind not in ("dram", "mmap"):
            raise ValueError(f"storage must be 'dram' or 'mmap', got {self.kind!r}")
        if self.kind == "mmap" and not self.directory:
            raise ValueError("--storage mmap needs --storage-dir (a folder on the SSD for the row files)")


@dataclass(frozen=True)
class UpdatesConfig:
    """Row updates while serving (`flexemr.updates`, `embedding_server.versions`)."""

    log_dir: str | None = field(
        default=None,
        metadata=flag(
            "--update-log-dir",
            "folder of the embedding servers' update logs, replayed when one restarts (default: serve's "
            "own temporary one; on Ray, a folder every node reaches)",
        ),
    )
    """Folder of the embedding servers' update logs (`server-N.updates`), replayed at start so a
    restarted server comes back at its version; None: servers refuse updates (a local cluster
    gives its servers one of its own)."""
    max_staged_bytes: int = field(
        default=256 * 2**20,
        metadata=flag("--max-staged-bytes", "update bytes a server holds staged, not yet committed", "bytes"),
    )
    """Update bytes a server holds staged (not yet committed); beyond, updates are refused."""
    max_changelog_keys: int = field(
        default=1 << 20,
        metadata=flag("--max-changelog-keys", "changed row keys a server remembers for caches"),
    )
    """Changed row keys a server remembers for rankers' caches; older versions are dropped (a
    ranker that falls further behind clears its cache)."""
    max_history_bytes: int = 64 * 2**20
    """Bytes of overwritten rows a server keeps so lookups at recent versions are still answered
    while commits go on (a ranker reads at its version until it next syncs); 0: only the newest
    version is answered, and every commit turns the lookups in flight STALE."""
    max_log_bytes: int = 256 * 2**20
    """Bytes a server's update log grows to before it is compacted: the server writes a snapshot
    of its state (`server-N.updates.snapshot`) and starts the log afresh."""
    max_decided_versions: int = 1 << 18
    """Versions whose token and write set a server remembers (8 + 8 x servers bytes each): a
    server down through at most this many catches up from them; one further behind resyncs its
    rows from a replica."""
    max_applied_sequences: int = 1 << 20
    """(source, sequence) pairs embedding server 0 remembers having applied; an older sequence of
    a source is refused rather than applied a second time."""

    def __post_init__(self) -> None:
        if self.max_history_bytes < 0:
            raise ValueError(f"max_history_bytes must be >= 0, got {self.max_history_bytes}")
        positive = {
            "max_staged_bytes": self.max_staged_bytes,
            "max_changelog_keys": self.max_changelog_keys,
            "max_log_bytes": self.max_log_bytes,
            "max_decided_versions": self.max_decided_versions,
            "max_applied_sequences": self.max_applied_sequences,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")

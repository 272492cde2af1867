"""A Jepsen-style checker of row updates (issue #27), over real processes on 127.0.0.1.

    cluster   `flexemr serve --rankers 2` (row shards x replicas, supervised servers, an update log
              folder, on a small tmpfs when the full-disk fault is asked for) and one more
              `flexemr ranker` with a cache on its own port (the one the ranker-restart fault kills)
    writers   HTTP pushes through serve's rankers (`?source=hN&sequence=n`), `flexemr update FILE
              --source cN --sequence n` subprocesses, and XADDs to a Redis stream that a
              `flexemr update --redis` consumer applies (one entry, one version)
    readers   score one batch that reads rows of every table on every shard, through serve's port
              (new connections spread over both rankers) and the extra ranker, each carrying the
              highest version acknowledged to any writer so far (`Flexemr-Min-Row-Version`)
    nemesis   the faults, one at a time (`FAULTS`)

Then the history is made whole: every update is sent again with its (source, sequence), in
process, which answers the version that applied it or applies it now; so every version is one
known update. Each 200 score is compared with an independent forward pass of the monolithic model
at every prefix of the versions. Violations:

    MIXED          a score no prefix gives (a torn version, a wrong row)
    stale          a read below the version it asked for (read-your-writes across rankers)
    non-monotonic  the extra ranker going back to an older version (across its restarts too)
    lost           an acknowledged update not at its version, or not in the final state
    visible failed an update reported as failed that was applied, or a read of a state that was
                   never acknowledged before the reads ended
    not live       after healing: an update refused, the stream not drained, or a final read not exact

Refusals (503s, failed updates) are allowed and counted: they are never a wrong score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch

from flexemr.client import Client, InferenceError
from flexemr.config import CacheMode
from flexemr.config.model import ModelSource
from flexemr.config.security import admin_token
from flexemr.config.spec import ClusterSpec
from flexemr.entrypoints.child import AnnouncedProcess
from flexemr.model import rows as stored_rows
from flexemr.model.dlrm import DLRM
from flexemr.model.source import load_weights, model_spec
from flexemr.model.spec import ModelSpec
from flexemr.model.weights import build_monolithic
from flexemr.updates import RowUpdates, UpdateFailed, Updater

FAULTS = ("kill-server-N", "stop-server-N", "kill-cli", "kill-consumer", "restart-ranker", "full-disk")
"""What the nemesis does (N: a server index): kill -9 (its supervisor restarts it), SIGSTOP for
`hold_s`, kill -9 of a running `flexemr update` subprocess or of the stream consumer (restarted),
kill -9 and restart of the extra ranker, a full update-log file system for `hold_s`."""
STREAM = "rows"
PYTHON = [sys.executable, "-m", "flexemr.cli.main"]


@dataclasses.dataclass(frozen=True)
class CheckerConfig:
    faults: tuple[str, ...] = (
        "kill-server-1",
        "stop-server-3",
        "kill-cli",
        "restart-ranker",
        "kill-server-0",
    )
    shards: int = 2
    replicas: int = 2
    http_writers: int = 2
    cli_writers: int = 1
    redis: bool = True
    """A stream writer and its consumer (needs redis-server and the `redis` extra)."""
    readers: int = 3
    rows_per_update: int = 6
    min_updates: int = 8
    """Updates each writer tries at least (it goes on until the faults are over)."""
    pause_s: float = 0.2
    """Between one writer's updates."""
    hold_s: float = 2.0
    """How long a SIGSTOP or a full disk lasts."""
    quiet_s: float = 1.0
    """Fault-free time before, between and after the faults."""
    max_staged_bytes: int | None = None
    max_changelog_keys: int | None = None
    log_fs_bytes: int = 32 * 2**20
    """Size of the tmpfs the update logs go on, for the full-disk fault."""
    seed: int = 41
    carry_version: bool = True
    """Readers send the highest acknowledged version (`Flexemr-Min-Row-Version`); False shows
    what a client that does not gets across rankers (stale reads)."""

    def __post_init__(self) -> None:
        for fault in self.faults:
            if not any(re.fullmatch(f.replace("N", r"\d+"), fault) for f in FAULTS):
                raise ValueError(f"unknown fault {fault!r}; known: {FAULTS}")


@dataclasses.dataclass
class Update:
    kind: str
    """http, cli or redis."""
    updates: RowUpdates
    phase: str
    outcome: str = "pending"
    """acknowledged, failed, unknown (no answer: it may be applied), or for redis: added."""
    version: int | None = None
    """The version it was acknowledged with (then resolved: the version holding it)."""
    note: str = ""


@dataclasses.dataclass
class Read:
    reader: str
    pinned: bool
    """Through the extra ranker (one process at a time): its reads must not go back."""
    floor: int
    phase: str
    score: np.ndarray | None
    error: str = ""


@dataclasses.dataclass
class PhaseCounts:
    reads: int = 0
    refused_reads: int = 0
    updates: int = 0
    acknowledged: int = 0
    mixed: int = 0
    stale: int = 0
    backwards: int = 0
    lost: int = 0
    visible_failed: int = 0


@dataclasses.dataclass
class Report:
    config: CheckerConfig
    phases: dict[str, PhaseCounts]
    states_seen: int
    versions: int
    live: bool
    liveness: list[str]
    skipped: list[str]
    problems: list[str]
    """Every violation, described (empty: none)."""
    outcomes: dict[str, int]
    """Updates per "writer outcome" (e.g. "cli unknown": a killed `flexemr update`)."""

    def violations(self) -> int:
        return sum(
            p.mixed + p.stale + p.backwards + p.lost + p.visible_failed for p in self.phases.values()
        ) + (0 if self.live else 1)

    def table(self) -> str:
        lines = [
            "| phase (fault) | reads checked | reads refused | updates ack / tried | MIXED | stale | "
            "non-monotonic | lost ack | visible failed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        total = PhaseCounts()
        for name, p in self.phases.items():
            lines.append(_row(name, p))
            for f in dataclasses.fields(PhaseCounts):
                setattr(total, f.name, getattr(total, f.name) + getattr(p, f.name))
        lines.append(_row("**all**", total))
        bounds = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("max_staged_bytes", self.config.max_staged_bytes),
                ("max_changelog_keys", self.config.max_changelog_keys),
            )
            if v is not None
        )
        lines += [
            "",
            f"{self.versions} versions (the resends of unacknowledged updates included), "
            f"{self.states_seen} states seen by readers; "
            f"bounds: {bounds or 'defaults'}; after healing: "
            + ("live, exact" if self.live else "NOT LIVE: " + "; ".join(self.liveness))
            + (f"; skipped: {'; '.join(self.skipped)}" if self.skipped else ""),
            "",
            "updates by writer and outcome (after healing): "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items())),
        ]
        return "\n".join(lines)


def _row(name: str, p: PhaseCounts) -> str:
    return (
        f"| {name} | {p.reads:,} | {p.refused_reads:,} | {p.acknowledged} / {p.updates} | {p.mixed} | "
        f"{p.stale} | {p.backwards} | {p.lost} | {p.visible_failed} |"
    )


# -- the independent forward pass -------------------------------------------------------------------


def apply_monolithic(model: DLRM, updates: RowUpdates) -> None:
    """Write `updates` into the monolithic model's tables, encoded in each table's row format."""
    for t, bag in enumerate(model.emb_l):
        mine = updates.tables == t
        if not mine.any():
            continue
        assert isinstance(bag, torch.nn.EmbeddingBag)
        weight = bag.weight.detach().numpy()
        encoded = np.empty((int(mine.sum()), weight.shape[1]), dtype=weight.dtype)
        stored_rows.encode(updates.values[mine], model.spec.formats[t], encoded)
        weight[updates.rows[mine]] = encoded


def expected_scores(
    source: ModelSource,
    history: list[RowUpdates],
    dense: np.ndarray,
    indices: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """float32 [len(history) + 1, B]: the monolithic model's scores at every prefix of `history`."""
    model = build_monolithic(load_weights(source))
    states = []
    for step in [None, *history]:
        if step is not None:
            apply_monolithic(model, step)
        with torch.no_grad():
            out = model.forward_sparse(
                torch.from_numpy(dense), torch.from_numpy(indices), torch.from_numpy(lengths)
            )
        states.append(out.numpy().astype(np.float32))
    return np.stack(states)


def read_batch(
    spec: ModelSpec, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """dense, indices, lengths of 4 samples reading rows spread over every table's whole range (so
    every row shard), and the distinct (table, row) pairs they read (the rows writers update)."""
    rng = np.random.default_rng(seed)
    batch, bag = 4, 3
    lengths = np.full((spec.num_tables, batch), bag, dtype=np.int32)
    indices = np.concatenate(
        [
            (np.linspace(0, rows - 1, batch * bag) + rng.integers(0, 2, batch * bag)).clip(0, rows - 1)
            for rows in spec.table_rows
        ]
    ).astype(np.int64)
    dense = rng.standard_normal((batch, spec.num_dense)).astype(np.float32)
    tables = np.repeat(np.arange(spec.num_tables, dtype=np.int64), batch * bag)
    pairs = np.unique(np.stack([tables, indices]), axis=1)
    return dense, indices, lengths.reshape(-1), pairs[0], pairs[1]


# -- processes ----------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The pids whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def freeze(pid: int, timeout_s: float = 30) -> None:
    """SIGSTOP `pid` and return once every thread of it is stopped (kill returns before)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    tasks = Path(f"/proc/{pid}/task")

    def state(stat: Path) -> str:
        try:
            return stat.read_text().rpartition(")")[2].split()[0]
        except OSError:
            return "T"

    while not all(state(s) == "T" for s in tasks.glob("*/stat")) and time.monotonic() < deadline:
        time.sleep(0.01)


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


class Cluster:
    """serve --rankers 2, the extra ranker, the update log folder and (optionally) Redis."""

    def __init__(self, config: CheckerConfig, folder: Path) -> None:
        self.config = config
        self.folder = folder
        self.secret = folder / "secret"
        self.secret.write_text("a secret of the update checker")
        self.spec_path = folder / "cluster.json"
        self.log_dir = folder / "logs"
        self.log_dir.mkdir()
        self.mounted = False
        self.skipped: list[str] = []
        self.stack = contextlib.ExitStack()
        self.extra: AnnouncedProcess | None = None
        self.consumer: subprocess.Popen[bytes] | None = None
        self.redis_url: str | None = None

    def start(self) -> None:
        c = self.config
        if any(f == "full-disk" for f in c.faults):
            self._mount()
        command = [
            *PYTHON, "serve", "--preset", "tiny", "--seed", str(c.seed), "--row-dtype", "fp32",
            "--sharding", "row", "--embedding-servers", str(c.shards), "--replicas", str(c.replicas),
            "--rankers", "2", "--port", "0", "--secret-file", str(self.secret),
            "--spec-out", str(self.spec_path), "--update-log-dir", str(self.log_dir), "--grpc-port", "0",
            "--watch-stdin",
        ]  # fmt: skip
        if c.max_staged_bytes is not None:
            command += ["--max-staged-bytes", str(c.max_staged_bytes)]
        if c.max_changelog_keys is not None:
            command += ["--max-changelog-keys", str(c.max_changelog_keys)]
        self.serve = self.stack.enter_context(AnnouncedProcess(command, "flexemr ready:", 300))
        self.url = self.serve.url
        grpc = re.search(r"grpc=(\S+)", "".join(self.serve.output))
        self.grpc = grpc.group(1) if grpc else None
        """gRPC address of serve's first ranker (the others serve HTTP only)."""
        self.spec = ClusterSpec.load(self.spec_path)
        self.token = admin_token(self.secret.read_bytes())
        extra = dataclasses.replace(
            self.spec.ranker, port=0, grpc_port=None, lookup="raw", cache=CacheMode.parse("fixed:1MiB")
        )
        self.extra_spec = self.folder / "extra-ranker.json"
        dataclasses.replace(self.spec, ranker=extra).save(self.extra_spec)
        self.restart_extra()
        if c.redis:
            self._start_redis()

    def _mount(self) -> None:
        if os.geteuid() != 0:
            self.skipped.append("full-disk: not root (no tmpfs for the update logs)")
            return
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.config.log_fs_bytes}", "tmpfs", str(self.log_dir)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            self.skipped.append(f"full-disk: cannot mount a tmpfs ({result.stderr.strip()})")
            return
        self.mounted = True

    def _start_redis(self) -> None:
        try:
            from flexemr.entrypoints.redis_server import RedisServer

            redis_server = RedisServer()
        except (ImportError, FileNotFoundError, RuntimeError, OSError) as exc:
            self.skipped.append(f"redis writer: {exc}")
            return
        self.stack.callback(redis_server.stop)
        self.redis_url = redis_server.url
        self.restart_consumer()

    def restart_extra(self) -> None:
        if self.extra is not None:
            self.extra.close()
        self.extra = AnnouncedProcess(
            [
                *PYTHON,
                "ranker",
                "--spec",
                str(self.extra_spec),
                "--secret-file",
                str(self.secret),
                "--watch-stdin",
            ],
            "flexemr ranker ready:",
            300,
        )

    def restart_consumer(self) -> None:
        if self.consumer is not None:
            self.consumer.kill()
            self.consumer.wait()
        assert self.redis_url is not None
        command = [
            *PYTHON, "update", "--spec", str(self.spec_path), "--secret-file", str(self.secret),
            "--redis", self.redis_url, "--stream", STREAM, "--group", "checker", "--consumer", "c0",
            "--batch", "1",
        ]  # fmt: skip
        self.consumer = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def server_pid(self, index: int) -> int | None:
        for pid in children(self.serve.proc.pid):
            args = cmdline(pid)
            if "embedding-server" in args and args[args.index("--index") + 1] == str(index):
                return pid
        return None

    def wait_server(self, index: int, timeout_s: float = 120) -> bool:
        """Until server `index` is restarted and listening (its supervisor restarts it on its port)."""
        port = self.spec.embedding_servers[index].port
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.server_pid(index) is not None and port_open(port):
                return True
            time.sleep(0.2)
        return False

    def stop(self) -> None:
        if self.consumer is not None:
            self.consumer.kill()
            self.consumer.wait()
        if self.extra is not None:
            self.extra.close()
        self.stack.close()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.log_dir)], check=False)
            self.mounted = False


# -- the run ----------------------------------------------------------------------------------------


class Run:
    def __init__(self, config: CheckerConfig, cluster: Cluster) -> None:
        self.config = config
        self.cluster = cluster
        self.model = model_spec(cluster.spec.model)
        self.dense, self.indices, self.lengths, self.hot_tables, self.hot_rows = read_batch(
            self.model, config.seed
        )
        self.updates: list[Update] = []
        self.reads: list[Read] = []
        self.phase = "none"
        self.acknowledged = 0
        """The highest version acknowledged to any writer so far: readers ask for it at least."""
        self.lock = threading.Lock()
        self.faulting = threading.Event()
        self.faulting.set()
        self.reading = threading.Event()
        self.reading.set()
        self.cli: subprocess.Popen[str] | None = None
        self.cli_started = 0.0
        self.end = 0
        """The cluster's version once the writers and readers stopped (set when healing)."""
        self.unhealed: list[str] = []
        """Faults the cluster did not recover from (a server not restarted): not live."""

    def random_update(self, rng: np.random.Generator, source: str, sequence: int) -> RowUpdates:
        n = min(self.config.rows_per_update, self.hot_tables.size)
        pick = rng.choice(self.hot_tables.size, n, replace=False)
        values = rng.standard_normal((n, self.model.dim)).astype(np.float32)
        return RowUpdates(self.hot_tables[pick], self.hot_rows[pick], values, source, sequence)

    def record(self, update: Update) -> None:
        with self.lock:
            self.updates.append(update)
            if update.outcome == "acknowledged" and update.version is not None:
                self.acknowledged = max(self.acknowledged, update.version)

    def pause(self, update: Update) -> None:
        """Between updates; longer after a refusal (a producer backing off while a server is away)."""
        time.sleep(self.config.pause_s * (1 if update.outcome == "acknowledged" else 5))

    def keep_writing(self, done: int, least: int | None = None) -> bool:
        return done < (self.config.min_updates if least is None else least) or self.faulting.is_set()

    def http_writer(self, w: int) -> None:
        rng = np.random.default_rng(1000 + w)
        with httpx.Client(base_url=self.cluster.url, timeout=60) as http:
            for sequence in range(10**6):
                if not self.keep_writing(sequence):
                    return
                rows = self.random_update(rng, f"h{w}", sequence)
                update = Update("http", rows, self.phase)
                body = io.BytesIO()
                np.savez(body, table=rows.tables, row=rows.rows, values=rows.values)
                try:
                    response = http.post(
                        f"/v2/models/dlrm/updates?source={rows.source}&sequence={sequence}",
                        content=body.getvalue(),
                        headers={"Authorization": f"Bearer {self.cluster.token}"},
                    )
                    if response.status_code == 200:
                        update.outcome, update.version = "acknowledged", int(response.json()["version"])
                    else:
                        error = response.json().get("error", response.text)
                        update.outcome = "unknown" if "outcome unknown" in error else "failed"
                        update.note = f"{response.status_code}: {error}"
                except httpx.HTTPError as exc:  # the ranker may have taken it: no answer
                    update.outcome, update.note = "unknown", f"no answer: {exc!r}"
                self.record(update)
                self.pause(update)

    def cli_writer(self, w: int) -> None:
        rng = np.random.default_rng(2000 + w)
        for sequence in range(10**6):
            if not self.keep_writing(sequence, max(1, self.config.min_updates // 4)):  # seconds each
                return
            rows = self.random_update(rng, f"c{w}", sequence)
            update = Update("cli", rows, self.phase)
            path = self.cluster.folder / f"c{w}-{sequence}.npz"
            np.savez(path, table=rows.tables, row=rows.rows, values=rows.values)
            command = [
                *PYTHON, "update", str(path), "--spec", str(self.cluster.spec_path),
                "--secret-file", str(self.cluster.secret), "--source", rows.source or "",
                "--sequence", str(sequence),
            ]  # fmt: skip
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            with self.lock:
                self.cli, self.cli_started = proc, time.monotonic()
            output, _ = proc.communicate()
            with self.lock:
                self.cli = None
            found = re.search(r"^version (\d+):", output, re.MULTILINE)
            if proc.returncode == 0 and found:
                update.outcome, update.version = "acknowledged", int(found.group(1))
            elif proc.returncode < 0 or "outcome unknown" in output:
                update.outcome, update.note = "unknown", f"rc {proc.returncode}: {output[-300:]}"
            else:
                update.outcome, update.note = "failed", f"rc {proc.returncode}: {output[-300:]}"
            self.record(update)
            self.pause(update)

    def redis_writer(self) -> None:
        import redis

        from flexemr.updates.redis_stream import sequence_of

        assert self.cluster.redis_url is not None
        rng = np.random.default_rng(3000)
        client = redis.Redis.from_url(self.cluster.redis_url)
        try:
            for n in range(10**6):
                if not self.keep_writing(n):
                    return
                rows = self.random_update(rng, STREAM, 0)
                entry = client.xadd(
                    STREAM,
                    {
                        "table": rows.tables.astype("<i8").tobytes(),
                        "row": rows.rows.astype("<i8").tobytes(),
                        "values": rows.values.astype("<f4").tobytes(),
                    },
                )
                rows = dataclasses.replace(
                    rows, sequence=sequence_of(entry if isinstance(entry, bytes) else entry.encode())
                )
                self.record(Update("redis", rows, self.phase, outcome="added"))
                time.sleep(2 * self.config.pause_s)  # each entry is a version
        finally:
            client.close()

    def reader(self, r: int, pinned: bool) -> None:
        client: Client | None = None
        url = ""
        reads = 0
        try:
            while self.reading.is_set():
                target = (
                    self.cluster.extra.url if pinned and self.cluster.extra is not None else self.cluster.url
                )
                if client is None or target != url or (not pinned and reads % 10 == 0):
                    if client is not None:
                        client.close()
                    client, url = Client(target, timeout=30), target  # new connections: another ranker
                floor, phase = self.acknowledged, self.phase
                ask = floor if self.config.carry_version else None
                reads += 1
                try:
                    score = client.infer(self.dense, self.indices, self.lengths, min_row_version=ask)
                    read = Read(f"r{r}", pinned, floor, phase, score)
                except (InferenceError, httpx.HTTPError, ValueError) as exc:
                    read = Read(f"r{r}", pinned, floor, phase, None, repr(exc)[:200])
                    time.sleep(0.05)
                with self.lock:
                    self.reads.append(read)
        finally:
            if client is not None:
                client.close()

    def fault(self, name: str) -> None:
        c, cluster = self.config, self.cluster
        self.phase = name
        if name.startswith("kill-server-"):
            index = int(name.rpartition("-")[2])
            pid = cluster.server_pid(index)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
            if not cluster.wait_server(index, 300):
                output = "".join(cluster.serve.output[-15:])
                self.unhealed.append(f"embedding server {index} not back 300 s after kill -9:\n{output}")
        elif name.startswith("stop-server-"):
            pid = cluster.server_pid(int(name.rpartition("-")[2]))
            if pid is not None:
                freeze(pid)
                time.sleep(c.hold_s)
                os.kill(pid, signal.SIGCONT)
        elif name == "kill-cli":
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with self.lock:
                    proc, age = self.cli, time.monotonic() - self.cli_started
                if proc is not None and age > 1.5:  # past its start (imports): mid-update, or nearly
                    proc.kill()
                    break
                time.sleep(0.05)
        elif name == "kill-consumer":
            if cluster.consumer is not None:
                cluster.consumer.kill()
                time.sleep(c.hold_s)
                cluster.restart_consumer()
        elif name == "restart-ranker":
            assert cluster.extra is not None
            cluster.extra.proc.kill()
            cluster.restart_extra()
        elif name == "full-disk":
            if cluster.mounted:
                filler = cluster.log_dir / "filler"
                with contextlib.suppress(OSError), filler.open("wb") as out:
                    while True:  # until ENOSPC
                        out.write(b"\0" * 2**20)
                        out.flush()
                time.sleep(c.hold_s)
                # Appends fill the last pages of the logs first: hold until an update is refused.
                deadline = time.monotonic() + 60
                while not self.refused_in(name) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not self.refused_in(name):
                    cluster.skipped.append(
                        "full-disk: no update was refused while the log file system was full"
                    )
                filler.unlink()
        self.phase = "none"

    def refused_in(self, phase: str) -> bool:
        with self.lock:
            return any(u.phase == phase and u.outcome in ("failed", "unknown") for u in self.updates)

    def nemesis(self) -> None:
        try:
            time.sleep(self.config.quiet_s)
            for name in self.config.faults:
                self.fault(name)
                time.sleep(self.config.quiet_s)
        finally:
            self.faulting.clear()


def resolve(updater: Updater, update: Update) -> int | None:
    """The version holding `update`: sent again with its (source, sequence), it is answered with
    the version that applied it, or applied now. None when it cannot be."""
    for _ in range(10):
        try:
            return updater.apply(update.updates)
        except UpdateFailed as exc:
            update.note += f"; resend: {exc}"
            time.sleep(1)
    return None


def drain_stream(cluster: Cluster, timeout_s: float = 120) -> bool:
    """Until the consumer has applied and acknowledged every entry (liveness after healing)."""
    import redis

    assert cluster.redis_url is not None
    client = redis.Redis.from_url(cluster.redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            group = next(g for g in client.xinfo_groups(STREAM) if g["name"] == b"checker")
            if group["pending"] == 0 and group.get("lag", 1) == 0:
                return True
            time.sleep(0.5)
        return False
    finally:
        client.close()


def check(config: CheckerConfig, folder: Path | None = None, log: Callable[[str], None] = print) -> Report:
    """Run the checker once (a cluster of its own, stopped at the end) and report."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flexemr-checker-")))
        cluster = Cluster(config, folder)
        stack.callback(cluster.stop)
        cluster.start()
        log(f"cluster up: {cluster.url}, extra ranker {cluster.extra.url if cluster.extra else '-'}")
        return _check(config, cluster, log)
    raise AssertionError("unreachable")


def _check(config: CheckerConfig, cluster: Cluster, log: Callable[[str], None]) -> Report:
    run = Run(config, cluster)
    writers = [threading.Thread(target=run.http_writer, args=(w,)) for w in range(config.http_writers)]
    writers += [threading.Thread(target=run.cli_writer, args=(w,)) for w in range(config.cli_writers)]
    if cluster.redis_url is not None:
        writers.append(threading.Thread(target=run.redis_writer))
    readers = [threading.Thread(target=run.reader, args=(r, r == 0)) for r in range(config.readers)]
    nemesis = threading.Thread(target=run.nemesis)
    threads = [*writers, *readers, nemesis]
    try:
        for thread in threads:
            thread.start()
        nemesis.join()
        log("faults over")
        for thread in writers:
            thread.join()
    finally:
        run.faulting.clear()
        run.reading.clear()
        for thread in threads:
            thread.join(120)
    log(f"{len(run.reads)} reads, {len(run.updates)} updates; healing")
    liveness: list[str] = list(run.unhealed)
    problems: list[str] = []
    if cluster.redis_url is not None and not drain_stream(cluster):
        liveness.append("the stream consumer did not apply every entry within 120 s")
    history, last = heal(run, liveness, problems)
    expected = expected_scores(cluster.spec.model, history, run.dense, run.indices, run.lengths)
    phases, seen = judge(config.faults, run.updates, run.reads, run.end, expected, problems)
    if not liveness:
        final_reads(run, last, expected[-1], liveness)
    outcomes = Counter(f"{u.kind} {u.outcome}" for u in run.updates)
    report = Report(
        config,
        phases,
        len(seen),
        len(history),
        not liveness,
        liveness,
        cluster.skipped,
        problems,
        dict(outcomes),
    )
    log(report.table())
    return report


def heal(run: Run, liveness: list[str], problems: list[str]) -> tuple[list[RowUpdates], int]:
    """Make the history whole: resend every update with its (source, sequence), acknowledged ones
    first (each must be answered with the version it was acknowledged with), then one more update
    (liveness). Returns the updates of versions 1, 2, ... and the last version."""
    cluster = run.cluster
    security = dataclasses.replace(cluster.spec.security, secret_file=str(cluster.secret))
    updater = Updater(dataclasses.replace(cluster.spec, security=security))
    final = RowUpdates(run.hot_tables, run.hot_rows, np.random.default_rng(7).standard_normal(
        (run.hot_tables.size, run.model.dim)).astype(np.float32), "checker-final", 0)  # fmt: skip
    try:
        run.end = end = updater.version()  # every read and acknowledgement came before it
        order = {"acknowledged": 0, "added": 1, "unknown": 2, "failed": 3}
        for update in sorted(run.updates, key=lambda u: order[u.outcome]):
            held = resolve(updater, update)
            name = f"{update.kind} {update.updates.source}/{update.updates.sequence}"
            if held is None:
                liveness.append(f"{name} cannot be applied after healing")
            elif update.outcome == "acknowledged" and held != update.version:
                problems.append(f"lost: {name} acknowledged at {update.version}, held at {held}")
                update.outcome = "lost"
            elif update.outcome == "failed" and held <= end:
                problems.append(f"visible failed: {name} applied at {held} ({update.note})")
                update.outcome = "visible failed"
            elif update.outcome == "added":  # the drained consumer acknowledged it: it is committed
                update.outcome = "acknowledged" if held <= end else "lost"
                if held > end:
                    problems.append(f"lost: {name} acknowledged by the consumer, applied only at {held}")
            update.version = held
        try:
            last = updater.apply(final)
        except UpdateFailed as exc:
            liveness.append(f"an update after healing failed: {exc}")
            last = 0
    finally:
        updater.close()
    by_version: dict[int, RowUpdates] = {last: final} if last else {}
    for update in run.updates:
        if update.version is not None:
            if update.version in by_version:
                problems.append(f"lost: version {update.version} answered for two updates")
            by_version[update.version] = update.updates
    missing = sorted(set(range(1, max(by_version, default=0) + 1)) - set(by_version))
    if missing:
        problems.append(f"versions with no known update: {missing[:20]}")
    return [by_version[v] for v in sorted(by_version)], last


def judge(
    faults: tuple[str, ...],
    updates: list[Update],
    reads: list[Read],
    end: int,
    expected: np.ndarray,
    problems: list[str],
) -> tuple[dict[str, PhaseCounts], set[int]]:
    """Count updates and reads per phase, and every violation; the states the readers saw."""
    phases = {name: PhaseCounts() for name in ("none", *faults)}
    for update in updates:
        counts = phases[update.phase]
        counts.updates += 1
        counts.acknowledged += update.outcome in ("acknowledged", "lost")
        counts.lost += update.outcome == "lost"
        counts.visible_failed += update.outcome == "visible failed"
    seen: set[int] = set()
    last_pinned = 0
    for read in reads:
        counts = phases[read.phase]
        if read.score is None:
            counts.refused_reads += 1
            continue
        counts.reads += 1
        match = np.flatnonzero(np.all(np.abs(expected - read.score) <= 1e-5, axis=1))
        if match.size == 0:
            counts.mixed += 1
            problems.append(f"MIXED: {read}")
            continue
        seen.update(match.tolist())
        if match.max() < read.floor:
            counts.stale += 1
            problems.append(f"stale: {read.reader} needed {read.floor}, read {match.tolist()}")
        if match.min() > end:
            counts.visible_failed += 1
            problems.append(f"visible: {read.reader} read {match.tolist()}, beyond the last committed {end}")
        if read.pinned:
            if match.max() < last_pinned:
                counts.backwards += 1
                problems.append(
                    f"non-monotonic: the extra ranker went from {last_pinned} to {match.tolist()}"
                )
            last_pinned = max(last_pinned, int(match.min()))
    return phases, seen


def final_reads(run: Run, last: int, want: np.ndarray, liveness: list[str]) -> None:
    """Liveness after healing: the final state, exact, through every ranker (new connections to
    serve's port reach both of its rankers)."""
    extra = run.cluster.extra
    for url, tries in ((run.cluster.url, 6), (extra.url if extra is not None else "", 1)):
        for _ in range(tries):
            with Client(url, timeout=30) as client:
                try:
                    score = client.infer(run.dense, run.indices, run.lengths, min_row_version=last)
                except (InferenceError, httpx.HTTPError) as exc:
                    liveness.append(f"final read through {url}: {exc}")
                    continue
            if not np.allclose(score, want, atol=1e-5, rtol=0):
                liveness.append(f"final read through {url} is not the final state")

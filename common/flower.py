"""Driving Flower's own programs: shared by ``fedcbir simulate``, ``fedcbir server`` and ``edge-client``.

Nothing here imports Flower: the ``flwr`` CLI and the ``flower-*`` programs run as child
processes, found next to this interpreter (``sys.executable``'s ``bin``), with:

* :func:`flower_env`: the offline settings (no telemetry, no update check, no runtime
  dependency installation), the virtual environment's ``bin`` first on ``PATH`` (the
  SuperLink and SuperNode start ``flower-superexec`` by name) and a private ``FLWR_HOME``;
* :class:`ManagedProcess`: a child in its own session that dies with us
  (``PR_SET_PDEATHSIG`` on Linux) and is stopped by PID, with every process it started;
* :class:`FlowerCLI`: a private ``FLWR_HOME`` whose ``config.toml`` holds exactly one
  connection; every ``flwr`` call names it and runs from that directory (never from a
  project folder: ``flwr`` migrates and comments out ``[tool.flwr.federations]`` in a
  ``pyproject.toml`` in its working directory);
* :func:`watch_run`: poll ``RUN/metrics.jsonl`` (one callback per new round) and
  ``flwr ls`` until the run is ``finished:*``.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

from common.errors import FedcbirError

FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


# ----------------------------------------------------------------------------- small helpers


def bin_dir() -> Path:
    return Path(sys.executable).parent


def tool(name: str) -> str:
    """Absolute path of a Flower program installed next to this interpreter."""
    path = bin_dir() / name
    if not path.exists():
        raise FedcbirError(f"{name} not found next to {sys.executable}: is flwr installed in this environment?")
    return str(path)


def flower_env(home: str | os.PathLike | None = None, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENV)
    if home is not None:
        env["FLWR_HOME"] = str(home)
    env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # numpy's OpenBLAS on one thread in every Flower process we start: its server-side work is
    # small (the initial projection's QR/SVD), clients train with one thread anyway, and once
    # (1 of 5 federations, study of 2026-12-06) the simulation process spun for 15 minutes in
    # OpenBLAS's exec_blas inside a 1280x256 QR with its worker threads gone
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    return env


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        text = repr(v)
        return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"
    return json.dumps(str(v))  # a TOML basic string (JSON escapes are valid TOML escapes)


def app_pyproject(config: dict[str, Any], name: str = "fedcbir-sim") -> str:
    """pyproject.toml of a Flower app that runs fedcbir's installed components."""
    from common import __version__

    lines = [
        "[build-system]", 'requires = ["setuptools>=68"]', 'build-backend = "setuptools.build_meta"', "",
        "[project]", f'name = "{name}"', f'version = "{__version__}"',
        'description = "fedcbir federation (components from the installed fedcbir package)"',
        'license = "Apache-2.0"', "dependencies = []", "",
        "[tool.flwr.app]", 'publisher = "fedcbir"', "",
        "[tool.flwr.app.components]", 'serverapp = "server.app:app"', 'clientapp = "edge_client.app:app"', "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {toml_value(v)}" for k, v in config.items()]
    return "\n".join(lines) + "\n"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether something listens on (host, port); connections in TIME_WAIT do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return True
    return False


def parse_address(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port); a clear error otherwise."""
    text = (text or "").strip()
    if "://" in text:
        raise FedcbirError(f"{what} {text!r}: give HOST:PORT without a URL scheme")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text:
        raise FedcbirError(f"{what} {text!r}: expected HOST:PORT, e.g. 192.168.1.10:9092")
    try:
        port = int(port_text)
    except ValueError:
        raise FedcbirError(f"{what} {text!r}: the port must be a number") from None
    if not 0 < port < 65536:
        raise FedcbirError(f"{what} {text!r}: the port must be in 1..65535")
    return host, port


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a line being written (cut) is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def round_line(row: dict[str, Any], total: int) -> str:
    """One line for a ``metrics.jsonl`` row: round, clients ok/failed, recall@1, seconds."""
    if row["round"] == 0:
        return f"round 0/{total} (before training): recall@1 {row['recall@1']:.3f}  map@r {row['map@r']:.3f}"
    clients = row.get("clients", [])
    by: dict[str, int] = {}
    for c in clients:
        by[c["status"]] = by.get(c["status"], 0) + 1
    failed = ", ".join(f"{n} {s}" for s, n in sorted(by.items()) if s != "ok") or "0 failed"
    dp = row.get("dp")
    eps = ""
    if dp:
        e = dp.get("epsilon")
        eps = f" | epsilon {e:.3g} (delta {dp.get('delta'):g})" if e is not None else " | epsilon inf (no noise)"
    return (f"round {row['round']}/{total}: {by.get('ok', 0)} ok, {failed} | recall@1 {row['recall@1']:.3f}  "
            f"map@r {row['map@r']:.3f} | {row.get('seconds', 0):.1f} s wall, "
            f"{row.get('simulated_round_seconds', 0):.1f} s on the slowest device{eps}")


@contextlib.contextmanager
def signals_as_exit(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn ``signals`` into ``SystemExit(128 + signum)`` so that ``finally`` blocks stop what
    we started (children live in their own sessions and are not signalled with us).
    SIGINT already raises KeyboardInterrupt. Only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except Exception:  # noqa: BLE001 - best effort
            pass


# ----------------------------------------------------------------------------- processes


class ManagedProcess:
    """A child program in its own session, stopped by PID together with everything it started.

    Output goes to ``log_file`` (appended) or, with ``pipe=True``, to ``self.proc.stdout``
    (text, merged with stderr) for the caller to read. On Linux the child gets SIGTERM
    when the thread that started it dies (so a SIGKILLed parent leaves nothing behind).
    """

    def __init__(self, cmd: Sequence[str], env: dict[str, str], cwd: str | os.PathLike,
                 log_file: Path | None = None, pipe: bool = False):
        self.cmd = list(cmd)
        self.descendants: set[int] = set()
        self._log: IO | None = open(log_file, "a", encoding="utf-8") if log_file is not None else None
        out = subprocess.PIPE if pipe else (self._log if self._log is not None else subprocess.DEVNULL)
        self.proc = subprocess.Popen(self.cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=pipe, bufsize=1 if pipe else -1,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def collect_descendants(self) -> set[int]:
        import psutil

        try:
            self.descendants.update(p.pid for p in psutil.Process(self.pid).children(recursive=True))
        except psutil.Error:
            pass
        return self.descendants

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM the program (it shuts down its own children), wait, SIGKILL if needed, then
        terminate/kill any process it started that is still alive (each by PID)."""
        import psutil

        self.collect_descendants()
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        left = []
        for pid in sorted(self.descendants):
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.Error:
                pass
        if left:
            _, alive = psutil.wait_procs(left, timeout=10)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.terminate()
            _, alive = psutil.wait_procs(alive, timeout=5)
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode


def wait_healthy(proc: ManagedProcess, host: str, port: int, *, ca_file: str | os.PathLike | None = None,
                 timeout: float = 60.0, log_tail: Callable[[], str] = lambda: "") -> None:
    """Poll the SuperLink's ``/health`` (https with ``ca_file``, else http) until it answers 200."""
    import httpx

    scheme = "https" if ca_file else "http"
    verify: Any = ssl.create_default_context(cafile=str(ca_file)) if ca_file else False
    url = f"{scheme}://{host}:{port}/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise FedcbirError(f"flower-superlink exited with code {proc.proc.returncode}:\n{log_tail()}")
        try:
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise FedcbirError(f"flower-superlink did not answer {url} within {timeout:.0f} s:\n{log_tail()}")


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class SuperLinkProcess:
    """A ``flower-superlink`` this process starts and stops: a context manager that starts
    :meth:`command` in ``cli.home`` with ``env``, waits for ``/health`` (https when
    :meth:`ca_file` gives a CA) and on exit or failure stops it and everything it started,
    by PID. Subclasses set ``cli``, ``env``, ``log_file``, ``local_host``, ``port``."""

    cli: "FlowerCLI"
    env: dict[str, str]
    log_file: Path
    local_host: str
    port: int
    startup_timeout: float = 60.0
    tail_lines: int = 20
    link: ManagedProcess | None = None
    pid: int | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ca_file(self) -> Path | None:
        return None

    def __enter__(self):
        self.link = ManagedProcess(self.command(), env=self.env, cwd=self.cli.home, log_file=self.log_file)
        self.pid = self.link.pid
        try:
            wait_healthy(self.link, self.local_host, self.port, ca_file=self.ca_file(),
                         timeout=self.startup_timeout, log_tail=self.log_tail)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, n: int | None = None) -> str:
        return tail(self.log_file, n or self.tail_lines)

    def check_alive(self) -> None:
        if self.link is not None and not self.link.alive():
            raise FedcbirError(f"flower-superlink exited with code {self.link.proc.returncode}:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the SuperLink (its SuperExec and apps follow), then end any process it
        started that is still alive, each by PID; remove the private FLWR_HOME."""
        if self.link is not None:
            self.link.stop()
            self.link = None
        self.cli.remove()


# ----------------------------------------------------------------------------- the flwr CLI


class FlowerCLI:
    """A private ``FLWR_HOME`` with one connection; every ``flwr`` call names it."""

    def __init__(self, connection: str, address: str, *, insecure: bool = False,
                 root_certificates: str | os.PathLike | None = None, prefix: str = "fedcbir-flwr-"):
        self.connection = connection
        self.home = Path(tempfile.mkdtemp(prefix=prefix))
        self.env = flower_env(self.home)
        lines = ["[superlink]", f'default = "{connection}"', "", f"[superlink.{connection}]",
                 f"address = {toml_value(address)}"]
        if insecure:
            lines.append("insecure = true")
        elif root_certificates is not None:
            lines.append(f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def __call__(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([tool("flwr"), *args], env=self.env, cwd=self.home, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise FedcbirError(f"flwr {' '.join(args[:2])} failed (code {proc.returncode}): "
                               f"{(proc.stdout + proc.stderr).strip()[-2000:]}")
        return proc

    def submit(self, app_dir: Path, run_config_file: Path, federation_config: str | None = None) -> str:
        args = ["run", str(app_dir), self.connection, "--format", "json"]
        if federation_config:
            args += ["--federation-config", federation_config]
        proc = self(*args, "--run-config", str(run_config_file))
        try:
            res = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise FedcbirError(f"flwr run printed no JSON: {proc.stdout[-2000:]} {proc.stderr[-2000:]}") from None
        if not res.get("success", False) or "run-id" not in res:
            raise FedcbirError(f"flwr run failed: {res}")
        return str(res["run-id"])

    def status(self, run_id: str) -> dict[str, Any]:
        proc = self("ls", self.connection, "--run-id", run_id, "--format", "json", timeout=60)
        runs = json.loads(proc.stdout).get("runs", [])
        return runs[0] if runs else {}

    def logs(self, run_id: str) -> str:
        proc = self("log", run_id, self.connection, "--show", timeout=120, check=False)
        return proc.stdout + proc.stderr

    def stop_run(self, run_id: str) -> None:
        self("stop", run_id, self.connection, timeout=60, check=False)

    def register_node(self, public_key: Path, name: str | None = None) -> str:
        """``flwr supernode register``; returns the node id the SuperLink assigned."""
        args = ["supernode", "register", "--format", "json"]
        if name:
            args += ["--name", name]
        proc = self(*args, str(public_key), self.connection, timeout=60, check=False)
        try:
            res = json.loads(proc.stdout)
        except json.JSONDecodeError:
            res = {}
        if proc.returncode != 0 or not res.get("success", False):
            detail = res.get("error-message") or (proc.stdout + proc.stderr).strip()[-500:]
            raise FedcbirError(f"could not register device key {public_key}: {detail}")
        return str(res.get("node-id", "?"))

    def nodes(self) -> list[dict[str, Any]]:
        proc = self("supernode", "ls", self.connection, "--format", "json", timeout=60, check=False)
        try:
            return list(json.loads(proc.stdout).get("nodes", []))
        except (json.JSONDecodeError, AttributeError):
            return []


def watch_run(cli: FlowerCLI, run_id: str, metrics: Path, *, seen: set[int] | None = None,
              on_row: Callable[[dict[str, Any]], None] | None = None,
              on_tick: Callable[[], None] | None = None, poll: float = 1.0, status_every: float | None = None,
              finished_hint: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Until the run is ``finished:*``: report each new ``metrics.jsonl`` row once and call
    ``on_tick``; asks ``flwr ls`` every ``status_every`` s (default ``3 * poll``; each call
    costs a Python start) and at once when ``finished_hint()`` turns true. Returns the last
    ``flwr ls`` status."""
    seen = set() if seen is None else seen
    every = 3 * poll if status_every is None else status_every

    def drain():
        for row in read_rows(metrics):
            if int(row["round"]) not in seen:
                seen.add(int(row["round"]))
                if on_row:
                    on_row(row)

    last_ls = 0.0
    hinted = False
    while True:
        drain()
        hint = bool(finished_hint and not hinted and finished_hint())
        if hint or time.monotonic() - last_ls >= every:
            hinted = hinted or hint
            last_ls = time.monotonic()
            if on_tick:
                on_tick()
            status = cli.status(run_id)
            if str(status.get("status", "")).startswith("finished"):
                drain()
                return status
            if hint:
                last_ls -= every - 2 * poll  # finishing: ask again soon
        time.sleep(poll)

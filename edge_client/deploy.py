"""``edge-client``: this machine joins a real SuperLink as one device of a profile.

What :func:`join` does:

1. checks everything it can locally first (address, CA file, device key, profile,
   framework installed, catalog, partition), each with a one-line error;
2. applies the device profile to itself (children inherit it): one training thread (the
   virtual clock scales single-threaded host time to the device) and, where cgroup v1
   works (root, Linux), a CPU quota that runs about as fast as the device
   (``Emulator.cpu_quota_cores``) and a memory limit of its usable RAM; otherwise the
   ClientApp's emulator alone times the work and checks the peak memory;
3. runs ``flower-supernode`` (own session, dies with us) with the node config
   ``partition-id``, ``num-partitions``, ``framework``, ``profile``, ``catalog`` (read by
   ``edge_client.app``/``node.py``: they override the run config's round-robin), a bounded
   ``--max-retries`` and a private ``FLWR_HOME``; its output goes to ``--log`` and one
   line per round is printed here;
4. forwards SIGINT/SIGTERM/SIGHUP to it, stops everything it started by PID and exits
   with its status (0 after a requested stop);
5. if the SuperNode fails before it ever connected, turns its output into one clear
   line (wrong address, TLS mismatch, untrusted certificate, unregistered key); if it
   loses a SuperLink it was connected to (the server stopped or was restarted, e.g.
   ``fedcbir server --resume``), starts a new SuperNode and keeps trying for
   ``--reconnect-timeout`` seconds. A restarted SuperLink has forgotten the node: Flower's
   SuperNode then either exits (401) or keeps polling under its old id, which only its
   heartbeat thread notices ("does not recognize this SuperNode"); and a connected SuperNode
   whose retries ran out logs the error but does not exit (Flower 1.42): all lead to a new one.
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from common.errors import FedcbirError

FRAMEWORK_MODULES = {"torch": "torch", "tf": "tensorflow", "jax": "jax"}
GRACEFUL_CODES = (0, 1, 2, 3)  # Flower: success, SIGINT, SIGQUIT, SIGTERM
GAVE_UP_GRACE = 5.0  # s a connected SuperNode may take to exit after its retries ran out
REJOIN_PAUSE = 2.0  # s between losing a SuperLink and starting a new SuperNode
RETRY_PAUSE = 3.0  # s between attempts while a lost SuperLink is not back yet

_ROUND_RE = re.compile(r"\[RUN (\d+)(?:, ROUND (\S+?))?\]")
_MSG_RE = re.compile(r"(Receiving|Sending): (\w+) message")
_NODE_RE = re.compile(r"SuperNode ID: (-?\d+)")
_STALE = "does not recognize this SuperNode"  # heartbeat after a SuperLink restart (state lost)
_GAVE_UP = "Giving up reconnection"  # Flower's retries ran out; a connected SuperNode may then hang
_APP_RE = re.compile(r"\[fedcbir\] (round \d+.*)")  # a ClientApp line, if the app prints one
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ConnectError(FedcbirError):
    """The SuperNode could not join; ``kind`` says why (for reconnect decisions and tests)."""

    exit_code = 3

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def classify_failure(output: str, code: int | None, superlink: str, *, insecure: bool,
                     root_certificates: str | None, auth_key: str | None, tries: int) -> ConnectError:
    """One clear line from a SuperNode that exited before it connected."""
    text = _ANSI.sub("", output)
    low = text.lower()
    m = re.search(r"Failed to initialize the connection to the SuperLink\.\s*\n\s*(.+)", text)
    detail = re.sub(r"\s*\(_ssl\.c:\d+\)", "", m.group(1).strip()) if m else ""
    if "[code: 2001]" in text or "must be registered via the cli" in low:
        return ConnectError("auth-required", f"the SuperLink at {superlink} accepts registered devices only: make a "
                            "key with 'edge-client keygen DIR', have its .pub registered, pass --auth-key")
    if "[code: 2004]" in text or "failed to activate supernode" in low:
        return ConnectError("unregistered", f"the SuperLink at {superlink} refused this device's key {auth_key}: "
                            "it is not registered there (put the .pub file in the server's --authorized-keys "
                            "folder and restart the server, or run 'flwr supernode register KEY.pub')")
    if "unable to parse the private key" in low:
        return ConnectError("bad-key", f"flower-supernode could not read the device key {auth_key}")
    if "wrong_version_number" in low or "wrong version number" in low or "record layer failure" in low \
            or "packet length too long" in low or "http_request" in low:
        return ConnectError("tls-mismatch", f"the SuperLink at {superlink} does not speak TLS (started with "
                            "--insecure?): pass --insecure here too, or start the server with TLS")
    if "certificate verify failed" in low or "certificate_verify_failed" in low:
        m = re.search(r"certificate verify failed: ([^\n]+)", text, re.IGNORECASE)
        why = re.sub(r"\s*\(_ssl\.c:\d+\)", "", m.group(1)).strip(" )") if m else "not trusted"
        if "mismatch" in why.lower() or "not valid for" in why.lower():
            hint = "the server certificate does not name this address: connect with a name it has, or have the " \
                   "server issue one with --advertise"
        elif root_certificates:
            hint = f"it was not issued by {root_certificates}: use the ca.pem the server printed"
        else:
            hint = "pass --root-certificates with the server's ca.pem"
        return ConnectError("bad-certificate", f"the SuperLink's TLS certificate at {superlink} was rejected "
                            f"({why}): {hint}")
    if "ssl" in low and "handshake" in low:
        return ConnectError("bad-certificate", f"TLS handshake with {superlink} failed ({detail or 'no detail'}): "
                            "check --root-certificates / --insecure")
    if insecure and ("server disconnected without sending a response" in low or "remoteprotocolerror" in low):
        return ConnectError("tls-required", f"the SuperLink at {superlink} requires TLS: pass --root-certificates "
                            "CA.pem (the server's ca.pem) instead of --insecure")
    if "name or service not known" in low or "nodename nor servname" in low or "temporary failure in name" in low \
            or "no address associated" in low:
        return ConnectError("unreachable", f"cannot resolve the SuperLink host in {superlink}: check --superlink")
    if "connection refused" in low or "all connection attempts failed" in low or "connecterror" in low \
            or "timed out" in low or "network is unreachable" in low or "no route to host" in low \
            or "server disconnected" in low:
        return ConnectError("unreachable", f"no SuperLink answered at {superlink} after {tries} tries: check "
                            "--superlink (HOST:PORT of 'fedcbir server') and that the server is running and "
                            "reachable from here")
    if "address already in use" in low:
        return ConnectError("port-in-use", "the SuperNode's local port is in use: pass another --port")
    if detail:
        return ConnectError("failed", f"could not join the SuperLink at {superlink}: {detail}")
    last = [ln.strip() for ln in text.splitlines() if ln.strip()][-3:]
    return ConnectError("failed", f"flower-supernode exited with code {code}: {' | '.join(last) or 'no output'}")


@dataclass
class JoinOptions:
    superlink: str
    profile: str
    framework: str
    catalog: Path
    partition_id: int
    num_partitions: int
    insecure: bool = False
    root_certificates: str | None = None
    auth_key: str | None = None
    port: int | None = None
    max_retries: int = 5
    reconnect_timeout: float = 600.0
    limits: str = "auto"
    log: Path | None = None
    verbose: bool = False
    node_config: dict[str, Any] = field(default_factory=dict)


def check_options(o: JoinOptions) -> None:
    """Everything that can be checked here, before any process starts."""
    from device_profiles import load_profile
    from common.certs import read_private_key, read_root_certificates
    from common.flower import parse_address

    parse_address(o.superlink, "--superlink")
    if o.insecure and o.root_certificates:
        raise FedcbirError("give either --root-certificates CA.pem or --insecure, not both")
    if o.root_certificates:
        o.root_certificates = str(read_root_certificates(o.root_certificates))
    if o.auth_key:
        if o.insecure:
            raise FedcbirError("--auth-key needs TLS: Flower authenticates devices only over TLS (drop --insecure)")
        read_private_key(o.auth_key)
        o.auth_key = str(Path(o.auth_key).expanduser().resolve())
    load_profile(o.profile)
    if o.framework not in FRAMEWORK_MODULES:
        raise FedcbirError(f"--framework {o.framework!r}: choose torch, tf or jax")
    if importlib.util.find_spec(FRAMEWORK_MODULES[o.framework]) is None:
        raise FedcbirError(f"--framework {o.framework}: {FRAMEWORK_MODULES[o.framework]} is not installed here")
    if o.num_partitions < 1 or not 0 <= o.partition_id < o.num_partitions:
        raise FedcbirError(f"--partition-id must be in 0..{o.num_partitions - 1} (--num-partitions {o.num_partitions})")
    if not o.catalog.is_dir() or not any(o.catalog.iterdir()):
        raise FedcbirError(f"catalog {o.catalog} is missing or empty")
    if o.port is not None and not 0 < o.port < 65536:
        raise FedcbirError("--port must be in 1..65535")
    if o.max_retries < 0 or o.reconnect_timeout < 0:
        raise FedcbirError("--max-retries and --reconnect-timeout must be >= 0")


# ----------------------------------------------------------------------------- device limits


def apply_device_limits(o: JoinOptions, say: Callable[[str], None]):
    """Threads and (where possible) cgroup v1 limits for this process and its children."""
    from device_profiles import Emulator, apply_cgroup_limits, apply_thread_limits

    apply_thread_limits(1, pin=False)
    emu = Emulator(o.profile)
    p = emu.profile
    if o.limits == "none":
        say(f"device {p.name}: no cgroup limits (--limits none); the emulator times the work and checks memory")
        return None
    cpu = None if o.limits == "memory" or not p.emulate else round(emu.cpu_quota_cores(), 3)
    lim = apply_cgroup_limits(cpu_cores=cpu, memory_mb=int(p.usable_ram_mb), name=f"fedcbir-edge-{os.getpid()}")
    parts = []
    if lim.cpu_applied:
        parts.append(f"CPU {cpu:g} cores")
    if lim.memory_applied:
        parts.append(f"memory {p.usable_ram_mb} MB")
    if parts:
        say(f"device {p.name}: cgroup v1 limits {', '.join(parts)}"
            + (f" (not applied: {'; '.join(lim.reasons)})" if lim.reasons else ""))
    else:
        say(f"device {p.name}: cgroup limits unavailable ({'; '.join(lim.reasons)}); "
            f"the emulator times the work and checks memory")
    return lim if (lim.cpu_path or lim.memory_path) else None


# ----------------------------------------------------------------------------- the SuperNode


class _Attempt:
    """One flower-supernode process and what its output said."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, log_file, echo: Callable[[str], None],
                 verbose: bool, trains: dict[str, int], on_connect: Callable[[str], None] = lambda node: None):
        from common.flower import ManagedProcess

        self.node_id: str | None = None
        self.connected = threading.Event()
        self.stale = threading.Event()
        self.gave_up: float | None = None
        self.lines: list[str] = []
        self._log = log_file
        self._echo = echo
        self._verbose = verbose
        self._round: tuple[str, str] | None = None
        self._started: dict[tuple[str, str, str], float] = {}
        self._trains = trains  # run id -> train messages answered (shared by attempts)
        self._app_line = False
        self._on_connect = on_connect
        self.proc = ManagedProcess(cmd, env=env, cwd=cwd, pipe=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.proc.stdout:  # type: ignore[union-attr]
            line = _ANSI.sub("", raw.rstrip("\n"))
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()
            self.lines.append(line)
            del self.lines[:-200]
            if self._verbose:
                self._echo(line)
            self._parse(line)

    def _parse(self, line: str) -> None:
        if _STALE in line:
            self.stale.set()
            return
        if _GAVE_UP in line and self.connected.is_set() and self.gave_up is None:
            self.gave_up = time.monotonic()
            return
        m = _NODE_RE.search(line)
        if m:
            self.node_id = m.group(1)
            self.connected.set()
            self._on_connect(self.node_id)
            return
        m = _APP_RE.search(line)
        if m:
            self._app_line = True
            if not self._verbose:
                self._echo(m.group(1))
            return
        m = _ROUND_RE.search(line)
        if m:
            self._round = (m.group(1), m.group(2) or "")
            return
        m = _MSG_RE.search(line)
        if m and self._round is not None:
            run, rnd = self._round
            key = (run, rnd, m.group(2))
            if m.group(1) == "Receiving":
                self._started[key] = time.monotonic()
            elif m.group(2) == "train" and key in self._started:
                secs = time.monotonic() - self._started.pop(key)
                self._trains[run] = self._trains.get(run, 0) + 1
                if self._app_line:  # the ClientApp already said which round
                    self._app_line = False
                else:
                    label = f"round {rnd}" if rnd else f"train #{self._trains[run]}"
                    self._echo(f"{label}: trained and replied in {secs:.1f} s (run {run})")
            else:
                self._started.pop(key, None)

    def output(self) -> str:
        self._reader.join(timeout=5)
        return "\n".join(self.lines)


def supernode_command(o: JoinOptions, node_config_file: Path, port: int) -> list[str]:
    from common.flower import tool

    cmd = [tool("flower-supernode"), "--superlink", o.superlink, "--max-retries", str(o.max_retries),
           "--node-config", str(node_config_file), "--host", "127.0.0.1", "--port", str(port)]
    if o.insecure:
        cmd.append("--insecure")
    elif o.root_certificates:
        cmd += ["--root-certificates", o.root_certificates]
    if o.auth_key:
        cmd += ["--auth-supernode-private-key", o.auth_key]
    return cmd


def join(o: JoinOptions, say: Callable[[str], None] = print) -> int:
    """Run the device until stopped (see module doc); returns the exit status."""
    import tempfile

    from device_profiles import remove_cgroup
    from common.flower import flower_env, free_port, toml_value

    check_options(o)
    home = Path(tempfile.mkdtemp(prefix="fedcbir-edge-"))
    node_config = {"partition-id": o.partition_id, "num-partitions": o.num_partitions, "framework": o.framework,
                   "profile": o.profile, "catalog": str(o.catalog), **o.node_config}
    ncfile = home / "node-config.toml"
    ncfile.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in node_config.items()), encoding="utf-8")
    env = flower_env(home)
    log_file = open(o.log, "a", encoding="utf-8") if o.log else None

    stop = {"signal": 0}
    current: dict[str, _Attempt | None] = {"attempt": None}

    def on_signal(signum, frame):
        first = not stop["signal"]
        stop["signal"] = signum
        att = current["attempt"]
        if att is not None and first:
            att.proc.signal(signum if signum in (signal.SIGINT, signal.SIGTERM) else signal.SIGTERM)

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in handled}
    limits = None
    rc = 0
    try:
        limits = apply_device_limits(o, say)
        connected_once = False
        reconnect_until = 0.0
        trains: dict[str, int] = {}
        while not stop["signal"]:
            port = o.port or free_port()
            verb = "reconnected" if connected_once else "connected"

            def on_connect(node_id: str, verb: str = verb) -> None:
                say(f"{verb} to the SuperLink at {o.superlink} as node {node_id} ({o.profile}, {o.framework}, "
                    f"partition {o.partition_id}/{o.num_partitions}); waiting for rounds")

            att = _Attempt(supernode_command(o, ncfile, port), env, home, log_file, say, o.verbose, trains,
                           on_connect)
            current["attempt"] = att
            if stop["signal"]:  # a signal arrived while it started
                att.proc.signal(signal.SIGTERM)
            stale_sent = False
            last_scan = 0.0
            while att.proc.alive():
                if time.monotonic() - last_scan > 1.0:  # its SuperExec and ClientApps, to stop them by PID
                    last_scan = time.monotonic()  # even after the SuperNode itself has exited
                    att.proc.collect_descendants()
                hung = att.gave_up is not None and time.monotonic() - att.gave_up > GAVE_UP_GRACE
                if (att.stale.is_set() or hung) and not stale_sent:
                    # the SuperLink was restarted and forgot this node (Flower's SuperNode would keep
                    # polling under the old node id), or it was unreachable for all retries (the
                    # SuperNode then logs the error but does not exit): start a new one instead
                    stale_sent = True
                    att.proc.signal(signal.SIGTERM)
                time.sleep(0.2)
            code = att.proc.proc.wait()
            att.proc.stop()  # its SuperExec / ClientApp processes, by PID
            output = att.output()
            current["attempt"] = None
            if stop["signal"]:
                name = signal.Signals(stop["signal"]).name
                say(f"stopped ({name}); flower-supernode exited with code {code}")
                # Flower's graceful codes, or killed by the signal we passed on: a requested stop
                rc = 0 if code in GRACEFUL_CODES or code < 0 else code
                break
            if att.connected.is_set():
                connected_once = True
                if o.reconnect_timeout <= 0:
                    raise ConnectError("lost", f"lost the SuperLink at {o.superlink} (flower-supernode exited "
                                               f"with code {code})")
                reconnect_until = time.monotonic() + o.reconnect_timeout
                why = "it was restarted and no longer knows this node" if att.stale.is_set() else \
                    "unreachable for all retries" if att.gave_up is not None else \
                    f"flower-supernode exited with code {code}"
                say(f"lost the SuperLink at {o.superlink} ({why}); reconnecting for up to "
                    f"{o.reconnect_timeout:.0f} s")
                _sleep_unless(stop, REJOIN_PAUSE)
                continue
            err = classify_failure(output, code, o.superlink, insecure=o.insecure,
                                   root_certificates=o.root_certificates, auth_key=o.auth_key,
                                   tries=o.max_retries + 1)
            transient = err.kind in ("unreachable", "unregistered", "auth-required")  # a server restarting
            if connected_once and time.monotonic() < reconnect_until and transient:
                _sleep_unless(stop, RETRY_PAUSE)
                continue
            raise err
    finally:
        att = current["attempt"]
        if att is not None:
            att.proc.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        if limits is not None:
            remove_cgroup(limits)
        if log_file is not None:
            log_file.close()
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    return rc


def _sleep_unless(stop: dict[str, int], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stop["signal"] and time.monotonic() < deadline:
        time.sleep(0.1)


def keygen(directory: str | os.PathLike, name: str | None, say: Callable[[str], None] = print) -> int:
    import socket

    from common.certs import generate_device_key

    name = name or socket.gethostname() or "device"
    priv, pub = generate_device_key(directory, name)
    say(f"device key (ECDSA P-384, OpenSSH): private {priv} (keep it on this device, mode 600), public {pub}")
    say(f"register it: copy {pub.name} into the server's --authorized-keys folder, then start this device with "
        f"--auth-key {priv}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the edge-client command")

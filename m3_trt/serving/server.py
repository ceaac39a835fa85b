"""Start, watch and stop a real ``tritonserver`` process over a model repository.

Binary resolution (:func:`find_tritonserver`):

1. a system Triton — ``tritonserver`` on ``PATH`` or ``/opt/tritonserver/bin`` (the NGC
   container), with its own ``backends/`` next to ``bin/``;
2. else the Triton 2.51 that ``nvidia-pytriton`` 0.7.0 bundles: ``pytriton/tritonserver/bin``,
   libraries in ``nvidia_pytriton.libs/`` (``tritonserver/external_libs`` in an editable
   pytriton). Its python backend ships without a stub; the stub for the running Python
   (``python_backend_stubs/3.X/triton_python_backend_stub``) is copied into a private backend
   directory under a cache folder (symlinks for the rest), so site-packages is never modified.

The python-backend stub embeds ``libpython`` and finds its ``sys.prefix`` by looking ``python3``
up on ``PATH``: putting the running interpreter's ``bin/`` first makes the stub see this venv's
site-packages (torch, m3_trt) — the same trick PyTriton's own launcher uses.

Safe by default (what :class:`TritonServer` always passes to tritonserver):

- HTTP, gRPC and metrics bind to ``host`` (``127.0.0.1`` unless the caller exposes them);
- ``--model-control-mode=none``: every model of the repository is loaded at start-up and nothing
  can be loaded, unloaded or replaced afterwards (a load request would otherwise let anyone who
  reaches the port run Python: a ``file:1/model.py`` override);
- the ``model-repository``, ``shared-memory``, ``trace`` and ``logging`` APIs are restricted
  (``--http-restricted-api`` / ``--grpc-restricted-protocol``) to requests carrying the header
  :data:`ADMIN_HEADER` (HTTP; gRPC: ``triton-grpc-protocol-`` + it) with the operator's
  ``admin_key``; without one a random key that is never shown is used, so they are unreachable;
- SageMaker and Vertex AI front ends off.

Triton's log goes where ``log_path`` says: a file the caller names (appended to, kept), ``"-"``
for this process's own stdout (``m3-trt serve``), or by default an unnamed temporary file (``O_TMPFILE``:
it never has a name in the temp folder, so even a SIGKILLed run leaves nothing behind); its tail
is in every :class:`TritonServerError`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from m3_trt.serving.openai_server import OpenAIServer

__all__ = ["ADMIN_HEADER", "RESTRICTED_APIS", "TritonBinary", "TritonServer", "TritonServerError", "find_tritonserver",
           "free_port", "is_loopback", "serve"]

ADMIN_HEADER = "m3-trt-admin-key"
# APIs no inference client needs, and that change the server or reach its files and memory.
RESTRICTED_APIS = ("model-repository", "shared-memory", "trace", "logging")


class TritonServerError(RuntimeError):
    """The server could not start or died; the message carries the tail of its log."""


@dataclasses.dataclass(frozen=True)
class TritonBinary:
    """A runnable tritonserver: executable, backend directory, extra environment, origin."""

    executable: Path
    backend_dir: Path
    env: dict
    origin: str  # "system" | "pytriton"


def _system_tritonserver() -> Path | None:
    found = shutil.which("tritonserver")
    if found:
        return Path(found).resolve()
    candidate = Path("/opt/tritonserver/bin/tritonserver")
    return candidate if candidate.is_file() else None


def _python_env() -> dict:
    """PATH/LD_LIBRARY_PATH additions so a python-backend stub runs *this* interpreter's env."""
    bin_dir = str(Path(sys.executable).parent)
    env = {"PATH": bin_dir}
    libdir = sysconfig.get_config_var("LIBDIR")
    ldlib = sysconfig.get_config_var("LDLIBRARY")
    # The stub links libpython3.X.so.1.0 by soname; prefer the running interpreter's own copy
    # over the distribution's (pyenv 3.11.7 vs Debian 3.11.2 here).
    if libdir and ldlib and (Path(libdir) / ldlib).exists():
        env["LD_LIBRARY_PATH"] = libdir
    return env


def _merge_env(base: dict, extra: dict) -> dict:
    env = dict(base)
    for key, value in extra.items():
        env[key] = f"{value}:{env[key]}" if env.get(key) else value
    return env


def _pytriton_binary(cache_dir: Path | None) -> TritonBinary:
    try:
        import pytriton  # noqa: F401  (located, never imported for its side effects)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise TritonServerError(
            "no tritonserver found: none on PATH or in /opt/tritonserver, and nvidia-pytriton "
            "is not installed (pip install 'm3-trt[serve]')"
        ) from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    libs = [root.parent.parent / "nvidia_pytriton.libs", root / "external_libs"]
    libs = [p for p in libs if p.is_dir()]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonServerError(f"nvidia-pytriton has no python backend stub for Python {version}: {stub}")
    key = hashlib.sha1(f"{root}|{stub.stat().st_mtime_ns}|{sys.executable}".encode()).hexdigest()[:12]
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "m3_trt" / "tritonserver"
    backend_dir = cache_dir / f"backends-py{version}-{key}"
    if not (backend_dir / "python" / "triton_python_backend_stub").is_file():
        # Build in a temp folder and rename into place so concurrent starts never see half a farm.
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".backends-", dir=cache_dir))
        for backend in (root / "backends").iterdir():
            dst = tmp / backend.name
            dst.mkdir()
            for item in backend.iterdir():
                if item.name != "__pycache__":
                    (dst / item.name).symlink_to(item)
        shutil.copy2(stub, tmp / "python" / "triton_python_backend_stub")
        try:
            tmp.rename(backend_dir)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    extra = _python_env()
    # The stub's RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) does not hold from the private
    # copy, so the bundled libraries go on LD_LIBRARY_PATH (inherited by the stub processes).
    extra["LD_LIBRARY_PATH"] = ":".join(filter(None, [extra.get("LD_LIBRARY_PATH"), *map(str, libs)]))
    return TritonBinary(root / "bin" / "tritonserver", backend_dir, extra, "pytriton")


def find_tritonserver(*, prefer_system: bool = True, cache_dir: Path | None = None) -> TritonBinary:
    """Locate a tritonserver: the system one first (NGC container), else pytriton's bundled one."""
    system = _system_tritonserver() if prefer_system else None
    if system is not None:
        backends = system.parent.parent / "backends"
        return TritonBinary(system, backends, _python_env(), "system")
    return _pytriton_binary(cache_dir)


def _parent_death_sigterm() -> None:
    """In the child before exec: SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG; Linux only)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 == PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the server then outlives a SIGKILLed parent, as before


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1, IPv4-mapped ::ffff:127.x)."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _client_host(host: str) -> str:
    """Where a local client reaches a server bound to ``host`` (wildcards -> loopback; IPv6 bracketed)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]" if ":" in host else host


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (racy by nature; good enough for loopback tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver subprocess over ``repo``; a context manager that waits for readiness.

    Ports left as ``None`` are chosen free on ``host``. ``log_path`` collects stdout+stderr: a
    file path (appended to, kept), ``"-"`` (inherit this process's stdout/stderr), or ``None`` for
    an unnamed temporary file (see the module doc); :attr:`log` reads it. Every model is loaded at start
    (``--model-control-mode=none``) and startup fails if any fails. ``admin_key`` unlocks the
    restricted APIs (:data:`RESTRICTED_APIS`) for requests that carry it in :data:`ADMIN_HEADER`.
    ``exit_timeout_s`` is Triton's ``--exit-timeout-secs``: how long a stop waits for in-flight
    requests and model unloads before Triton gives up and exits 1.
    ``die_with_parent`` (Linux) has the kernel SIGTERM Triton when the thread that started it
    dies, even by SIGKILL; ``serve`` uses it so a killed ``m3-trt serve`` leaves no server behind.
    """

    def __init__(
        self,
        repo: str | Path,
        *,
        grpc_port: int | None = None,
        http_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        admin_key: str | None = None,
        startup_timeout_s: float = 180.0,
        exit_timeout_s: int = 30,
        log_verbose: int = 0,
        log_path: str | Path | None = None,
        shm_default_byte_size: int = 1 << 20,
        extra_args: tuple[str, ...] = (),
        env: dict | None = None,
        die_with_parent: bool = False,
        binary: TritonBinary | None = None,
    ):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise TritonServerError(f"model repository {self.repo} does not exist")
        self.host = host
        if admin_key is not None and (not admin_key or any(c in admin_key for c in ",:= \t\n")):
            raise TritonServerError("admin_key must be non-empty and contain no ',', ':', '=' or whitespace "
                                    "(tritonserver's option syntax)")
        self.admin_key = admin_key or secrets.token_urlsafe(32)
        self.grpc_port = grpc_port or free_port(host)
        self.http_port = http_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = int(exit_timeout_s)
        self.log_verbose = log_verbose
        self.shm_default_byte_size = shm_default_byte_size
        self.extra_args = tuple(extra_args)
        self.extra_env = dict(env or {})
        self.die_with_parent = die_with_parent
        self.binary = binary or find_tritonserver()
        self.shm_prefix = f"m3trt_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._inherit_log = log_path == "-"
        self._log_path = Path(log_path) if log_path and not self._inherit_log else None
        self._log_file = None
        self._log_tail = ""
        self.proc: subprocess.Popen | None = None

    # -- addresses -------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{_client_host(self.host)}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{_client_host(self.host)}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{_client_host(self.host)}:{self.metrics_port}/metrics"

    @property
    def log_location(self) -> str:
        """Where Triton's log is, in words."""
        if self._inherit_log:
            return "this process's output"
        return str(self._log_path) if self._log_path else "an unnamed temporary file (gone when the server stops)"

    @property
    def log(self) -> str:
        if self._log_path is not None:
            return self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
        if self._log_file is None:
            return self._log_tail
        # pread: Triton writes through the same open file description; never move its offset.
        fd = self._log_file.fileno()
        return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")

    def command(self) -> list[str]:
        return [
            str(self.binary.executable),
            f"--model-repository={self.repo}",
            f"--backend-directory={self.binary.backend_dir}",
            f"--grpc-port={self.grpc_port}",
            f"--http-port={self.http_port}",
            f"--metrics-port={self.metrics_port}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            "--allow-metrics=true",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            # Load everything at start, never again: no remote load/unload (see the module doc).
            "--model-control-mode=none",
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_key}",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
            # Python models exchange tensors through /dev/shm; start small, grow on demand.
            f"--backend-config=python,shm-default-byte-size={self.shm_default_byte_size}",
            "--backend-config=python,shm-growth-byte-size=1048576",
            # Stubs' /dev/shm regions are named by this prefix: two servers sharing the default
            # one (tests, a demo and a benchmark on one host) corrupt each other's shutdown.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, abort: threading.Event | None = None) -> "TritonServer":
        """Launch and wait until ready (``abort`` set by another thread ends the wait)."""
        if self.proc is not None:
            raise TritonServerError("server already started")
        if self._inherit_log:
            self._log_file = None
        elif self._log_path is None:
            self._log_file = tempfile.TemporaryFile(prefix="tritonserver-", suffix=".log")  # O_TMPFILE: no name
        else:
            self._log_file = open(self._log_path, "ab")  # appends: a named file is never truncated
        env = _merge_env(os.environ, self.binary.env)
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT if self._log_file is not None else None,
            env=env,
            start_new_session=True,  # our own process group: signals reach the stubs too
            preexec_fn=_parent_death_sigterm if self.die_with_parent else None,
        )
        try:
            self.wait_ready(self.startup_timeout_s, abort)
        except BaseException:
            self.stop()
            raise
        return self

    def _fail(self, why: str) -> TritonServerError:
        tail = "\n".join(self.log.splitlines()[-60:])
        return TritonServerError(
            f"tritonserver {why} ({self.binary.origin} binary {self.binary.executable}, "
            f"repository {self.repo}, log: {self.log_location}):\n{tail}"
        )

    def is_ready(self) -> bool:
        try:
            url = f"http://{self.http_url}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def wait_ready(self, timeout_s: float, abort: threading.Event | None = None) -> None:
        """Poll readiness; raise if the process exits, ``timeout_s`` passes or ``abort`` is set."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if abort is not None and abort.is_set():
                raise TritonServerError("startup interrupted")
            if self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode} before becoming ready")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise self._fail(f"not ready after {timeout_s:.0f} s")

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM (Triton drains in-flight requests and unloads models), then SIGKILL.

        Returns Triton's exit code: 0 after a clean unload, 1 when its exit timeout expired
        (a model never unloaded), -9 when it had to be killed; None if it was never started.
        The default wait is Triton's exit timeout plus 15 s for the stubs to exit.
        """
        proc, self.proc = self.proc, None
        code = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(self.exit_timeout_s + 15 if timeout_s is None else timeout_s)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            code = proc.returncode
        if self._log_file is not None:
            self._log_tail = self.log[-20000:]  # an unnamed log vanishes on close; keep its tail for errors
            self._log_file.close()
            self._log_file = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    repo: str | Path,
    grpc_port: int | None = None,
    http_port: int | None = None,
    metrics_port: int | None = None,
    *,
    host: str = "127.0.0.1",
    admin_key: str | None = None,
    openai_port: int | None = None,
    served_model_name: str | None = None,
    log_path: str | Path = "-",
    log_verbose: int = 0,
) -> int:
    """Run tritonserver in the foreground until SIGINT/SIGTERM; forward the signal; return its exit code.

    Triton runs in its own session (a terminal's Ctrl-C reaches only this process), so the signal
    is forwarded as SIGTERM: Triton drains requests, unloads every model and exits 0. A signal
    during startup stops the server as well. Everything binds to ``host`` (loopback unless the
    operator exposes it; a warning says so). ``openai_port`` also serves the OpenAI-compatible
    endpoint (:mod:`m3_trt.serving.openai_server`) on ``host``, forwarding to the ensemble over gRPC.
    Triton's log goes to this process's output unless ``log_path`` names a file.
    """
    if not is_loopback(host):
        print(f"WARNING: exposing tritonserver on {host}: anyone who can reach ports {grpc_port or 8001}/"
              f"{http_port or 8000}/{metrics_port or 8002}{f'/{openai_port}' if openai_port else ''} can run "
              f"inference and read metrics (the model-repository API stays disabled). Put it behind a "
              f"firewall or an authenticating proxy.", file=sys.stderr, flush=True)
    server = TritonServer(
        repo, grpc_port=grpc_port or 8001, http_port=http_port or 8000,
        metrics_port=metrics_port or 8002, host=host, admin_key=admin_key, log_path=log_path,
        log_verbose=log_verbose, die_with_parent=True,
    )
    # Made (and its port bound) before Triton starts: a bad repository or a taken port fails at once.
    front = OpenAIServer(repo, server.grpc_url, host=host, port=openai_port, served_model_name=served_model_name) \
        if openai_port is not None else None
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start(abort=stop)
        except TritonServerError:
            if stop.is_set():
                print("interrupted during startup", flush=True)
                return 130
            raise
        b = server.binary
        print(f"tritonserver ({b.origin}: {b.executable}) on {host}: gRPC {server.grpc_url}, HTTP {server.http_url}, "
              f"metrics {server.metrics_url}; log: {server.log_location}", flush=True)
        if front is not None:
            front.start()
            print(f"OpenAI-compatible endpoint: {front.url}/v1 (model {front.model_name!r})", flush=True)
        print(f"tritonserver ready: gRPC {server.grpc_url}", flush=True)
        while not stop.is_set():
            if server.proc.poll() is not None:
                raise server._fail(f"exited with code {server.proc.returncode}")
            stop.wait(0.5)
        if front is not None:
            front.stop()
            front = None
        print("stopping tritonserver ...", flush=True)
        code = server.stop()
        print(f"tritonserver exited with code {code}", flush=True)
        return 0 if code == 0 else 1
    finally:
        if front is not None:
            front.stop()
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)

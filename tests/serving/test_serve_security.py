"""`m3-trt serve` is safe by default: loopback only, no model control, restricted admin APIs, no stray log.

One `m3-trt serve` subprocess over the echo repository for the whole module, started the way a user
starts it (defaults, plus an admin key from the environment so the restriction can be shown to be
the reason for a refusal). The last test SIGKILLs it and checks that nothing was left in its temp
folder.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from m3_trt.serving.client import M3Client  # noqa: E402
from m3_trt.serving.server import ADMIN_HEADER, TritonServer, TritonServerError, free_port, is_loopback  # noqa: E402
from proc_util import alive, descendants, stop_tree  # noqa: E402

ECHO_REPO = Path(__file__).parent / "echo_repo"
KEY = "operator-secret-123"


def _hex_addr(text: str) -> str:
    """/proc/net/tcp{,6} address (little-endian 32-bit words) -> printable IP."""
    raw = bytes.fromhex(text)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def listening_sockets(pids) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket owned by ``pids`` (from /proc; Linux)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                addr, port = f[1].split(":")
                found.add((_hex_addr(addr), int(port, 16)))
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The running `m3-trt serve` process, its ports, its private TMPDIR and its output so far."""
    tmpdir = tmp_path_factory.mktemp("serve-tmp")
    ports = dict(grpc=free_port(), http=free_port(), metrics=free_port())
    exe = Path(sys.executable).with_name("m3-trt")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "m3_trt.cli.main"]
    env = dict(os.environ, TMPDIR=str(tmpdir), M3_TRT_ADMIN_KEY=KEY)
    proc = subprocess.Popen([*cmd, "serve", str(ECHO_REPO), "--grpc-port", str(ports["grpc"]), "--http-port",
                             str(ports["http"]), "--metrics-port", str(ports["metrics"])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    out: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    try:
        while not (out and " ready: gRPC " in out[-1]):
            out.append(lines.get(timeout=120))
            assert out[-1] is not None, "".join(out[:-1])
        yield dict(proc=proc, ports=ports, tmpdir=tmpdir, out=out, family=descendants(proc.pid) | {proc.pid})
    finally:
        stop_tree(proc)


def _http(port: int, method: str, path: str, headers: dict | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=b"{}" if method == "POST" else None,
                                 method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_default_binds_loopback_only(served):
    found = listening_sockets(served["family"])
    ports = {p for _, p in found}
    assert set(served["ports"].values()) <= ports, (found, served["ports"])
    # gRPC listens on an IPv6 socket bound to the v4-mapped ::ffff:127.0.0.1, loopback as well
    assert all(is_loopback(addr) and addr.endswith("127.0.0.1") for addr, _ in found), found
    # negative control: the same inspection reports a wildcard listener
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        assert ("0.0.0.0", s.getsockname()[1]) in listening_sockets([os.getpid()])


def test_repository_api_refused_over_http(served):
    http = served["ports"]["http"]
    for action in ("load", "unload"):
        code, body = _http(http, "POST", f"/v2/repository/models/echo/{action}")
        assert code == 403 and ADMIN_HEADER in body, (action, code, body)
    assert _http(http, "POST", "/v2/repository/index")[0] == 403
    assert _http(http, "GET", "/v2/logging")[0] == 403
    # With the operator's key the API answers (so the key is what refused it above) ...
    code, body = _http(http, "POST", "/v2/repository/index", {ADMIN_HEADER: KEY})
    assert code == 200 and {m["name"] for m in json.loads(body)} == {"echo", "echo_stream"}
    # ... but the repository is fixed at start-up: load/unload are refused even with the key.
    for action in ("load", "unload"):
        code, body = _http(http, "POST", f"/v2/repository/models/echo/{action}", {ADMIN_HEADER: KEY})
        assert code >= 400 and "not allowed" in body, (action, code, body)
    assert _http(http, "GET", "/v2/models/echo/ready")[0] == 200
    assert M3Client(f"127.0.0.1:{served['ports']['grpc']}", "echo").generate("still served", max_tokens=1) \
        .startswith("still served")


def test_repository_api_refused_over_grpc(served):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(f"127.0.0.1:{served['ports']['grpc']}")
    try:
        for call in (lambda: c.load_model("echo"), lambda: c.unload_model("echo"),
                     lambda: c.get_model_repository_index()):
            with pytest.raises(InferenceServerException, match="restricted"):
                call()
        with pytest.raises(InferenceServerException, match="not allowed"):
            c.load_model("echo", headers={f"triton-grpc-protocol-{ADMIN_HEADER}": KEY})
        assert c.is_model_ready("echo")
    finally:
        c.close()
    assert M3Client(f"127.0.0.1:{served['ports']['grpc']}", "echo").generate("grpc ok", max_tokens=1) \
        .startswith("grpc ok")


def test_metrics_endpoint_on_loopback(served):
    code, body = _http(served["ports"]["metrics"], "GET", "/metrics")
    assert code == 200 and 'nv_inference_request_success{model="echo",version="1"}' in body


def test_command_without_key_locks_admin_apis_with_a_random_key():
    a, b = TritonServer(ECHO_REPO), TritonServer(ECHO_REPO)
    cmd = a.command()
    assert "--model-control-mode=none" in cmd and not any(x.startswith("--load-model") for x in cmd)
    restricted = [x for x in cmd if x.startswith(("--http-restricted-api=", "--grpc-restricted-protocol="))]
    assert len(restricted) == 2 and all(f"model-repository,shared-memory,trace,logging:{ADMIN_HEADER}=" in x
                                        for x in restricted)
    assert a.admin_key != b.admin_key and len(a.admin_key) >= 40
    for bad in ("", "a,b", "k=v", "x y"):
        with pytest.raises(TritonServerError, match="admin_key"):
            TritonServer(ECHO_REPO, admin_key=bad)


def test_exposing_warns(capsys, tmp_path):
    from m3_trt.serving.cli import ServeOptions, cmd_serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("::")
    with pytest.raises(TritonServerError, match="does not exist"):  # fails before starting anything
        cmd_serve(ServeOptions(repo=tmp_path / "missing", host="0.0.0.0"))
    assert "WARNING: exposing tritonserver on 0.0.0.0" in capsys.readouterr().err
    with pytest.raises(TritonServerError, match="does not exist"):
        cmd_serve(ServeOptions(repo=tmp_path / "missing"))
    assert "WARNING" not in capsys.readouterr().err


def test_sigkill_leaves_no_log_in_temp(served):
    """Runs last: an unclean stop (SIGKILL of `m3-trt serve`) leaves nothing in the temp folder."""
    assert "log: this process's output" in "".join(served["out"])
    assert "Started GRPCInferenceService" in "".join(served["out"])  # Triton's log reached the user
    proc = served["proc"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 60
    while [p for p in served["family"] if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.25)
    assert not [p for p in served["family"] if alive(p)]
    assert sorted(p.name for p in served["tmpdir"].iterdir()) == []


def test_openai_port_needs_a_repository_of_ours_and_fails_before_starting():
    from m3_trt.serving.cli import ServeOptions, cmd_serve

    with pytest.raises(ValueError, match="manifest.json: the OpenAI endpoint needs a repository written by"):
        cmd_serve(ServeOptions(repo=ECHO_REPO, openai_port=free_port()))

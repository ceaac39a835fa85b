"""The real tritonserver over a trivial echo repository: launcher, gRPC round trips, errors."""

from __future__ import annotations

import shutil
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton")
pytest.importorskip("tritonclient.grpc")

from m3_trt.serving.client import M3Client, M3ClientError, build_inputs  # noqa: E402
from m3_trt.serving.server import TritonServer, TritonServerError, find_tritonserver  # noqa: E402
from proc_util import alive, descendants, stop_tree  # noqa: E402

ECHO_REPO = Path(__file__).parent / "echo_repo"


@pytest.fixture(scope="module")
def echo_server():
    server = TritonServer(ECHO_REPO, exit_timeout_s=15).start()
    yield server
    log = server.log
    code = server.stop()
    assert code == 0, f"tritonserver did not unload every model after the tests (exit {code}):\n{log[-3000:]}"


def test_binary_resolution_uses_private_backend_dir():
    b = find_tritonserver()
    assert b.executable.is_file()
    stub = b.backend_dir / "python" / "triton_python_backend_stub"
    assert stub.is_file()
    if b.origin == "pytriton":
        import pytriton

        # site-packages is never modified: the stub lives only in our cache copy
        assert not (Path(pytriton.__file__).parent / "tritonserver/backends/python/triton_python_backend_stub").exists()


def test_echo_round_trip_runs_venv_torch_in_stub(echo_server):
    import torch

    out = M3Client(echo_server.grpc_url, "echo").generate("hello Triton", max_tokens=4)
    assert out == f"hello Triton | torch {torch.__version__}"
    assert echo_server.grpc_port != echo_server.http_port != echo_server.metrics_port


def test_echo_image_rows_padded_and_stripped(echo_server):
    blobs = [b"\x89PNG" + bytes(range(1, 40)), b"\xff\xd8tiny\xff\xd9"]
    out = M3Client(echo_server.grpc_url, "echo").generate("x", blobs, max_tokens=1)
    assert out.endswith(f"| images {[len(b) for b in blobs]}")


def test_echo_stream_piece_by_piece(echo_server):
    pieces = list(M3Client(echo_server.grpc_url, "echo_stream").stream("one two three four", max_tokens=4))
    assert pieces == ["one", " two", " three", " four"]


@pytest.mark.parametrize("model", ["echo", "echo_stream"])
def test_error_reaches_client_and_server_keeps_serving(echo_server, model):
    client = M3Client(echo_server.grpc_url, model)
    with pytest.raises(M3ClientError, match="the thing is broken"):
        client.generate("fail:the thing is broken", max_tokens=1)
    assert client.generate("again fine", max_tokens=1).startswith("again")


def test_wrong_dtype_rejected_by_server(echo_server):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(echo_server.grpc_url)
    inputs = build_inputs("x", max_tokens=2)
    bad = grpcclient.InferInput("max_tokens", [1, 1], "INT64")
    bad.set_data_from_numpy(np.array([[2]], np.int64))
    with pytest.raises(InferenceServerException, match="max_tokens"):
        c.infer("echo", [inputs[0], bad])


def test_unknown_model_is_a_clear_error(echo_server):
    with pytest.raises(M3ClientError, match="unknown model"):
        M3Client(echo_server.grpc_url, "no_such_model").generate("x", max_tokens=1)


def test_broken_model_fails_startup_with_its_log(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ECHO_REPO / "echo", repo / "echo")
    (repo / "echo/1/model.py").write_text("raise RuntimeError('deliberately broken model')\n")
    with pytest.raises(TritonServerError, match="deliberately broken model"):
        TritonServer(repo, startup_timeout_s=60).start()


# SIGTERM takes the same handler as SIGINT in serve(); one run of each kind of ending is enough here.
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_serve_command_forwards_signal_and_exits_cleanly(sig):
    """``m3-trt serve`` as a user runs it: ready on the given ports, a signal stops Triton and its stubs.

    SIGINT/SIGTERM are forwarded (exit 0 after a clean unload); SIGKILL cannot be caught, and the
    kernel's parent-death signal still stops Triton.
    """
    from m3_trt.serving.server import free_port

    grpc, http, metrics = free_port(), free_port(), free_port()
    exe = Path(sys.executable).with_name("m3-trt")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "m3_trt.cli.main"]
    proc = subprocess.Popen([*cmd, "serve", str(ECHO_REPO), "--grpc-port", str(grpc), "--http-port", str(http),
                             "--metrics-port", str(metrics)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    out = []
    try:
        while not (out and " ready: gRPC " in out[-1]):  # what the user waits for
            out.append(lines.get(timeout=120))
            assert out[-1] is not None, "".join(out[:-1])
        assert M3Client(f"127.0.0.1:{grpc}", "echo_stream").is_ready()
        family = descendants(proc.pid)
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in family if alive(p)}
        assert "tritonserver" in names and any(n.startswith("triton_python") for n in names), names  # comm: 15 chars
        assert M3Client(f"127.0.0.1:{grpc}", "echo").generate("still here", max_tokens=1).startswith("still here")
        proc.send_signal(sig)
        proc.wait(60)
        while (line := lines.get(timeout=60)) is not None:  # EOF once Triton, which shares stdout, is gone too
            out.append(line)
        out = "".join(out)
    finally:
        stop_tree(proc)  # the test failed early: still leave no server behind
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        deadline = time.monotonic() + 60
        while [p for p in family if alive(p)] and time.monotonic() < deadline:
            time.sleep(0.25)
    else:
        assert proc.returncode == 0, out
        assert "tritonserver exited with code 0" in out
    assert not [p for p in family if alive(p)], "tritonserver or a stub outlived m3-trt serve"

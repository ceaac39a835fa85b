"""``m3-trt`` serving commands: ``triton-repo``, ``serve``, ``client`` (one options dataclass each).

    m3-trt triton-repo CKPT --out REPO [--backend torch] [--instances N]
    m3-trt triton-repo CKPT --export ONNX_DIR --backend onnxruntime --out REPO
    m3-trt triton-repo ONNX_DIR --backend onnxruntime --out REPO     (the export names its checkpoint)
    m3-trt triton-repo BUILD_DIR --backend tensorrt --out REPO  (GPU layout; runs only on GPU hosts)
    m3-trt serve REPO [--host H] [--grpc-port P] [--http-port P] [--metrics-port P] [--openai-port P]
    m3-trt client --url HOST:PORT --prompt TEXT [--image FILE ...] [--stream] [--max-tokens N]
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from m3_trt.options import add_command, opt
from m3_trt.serving.client import M3Client, M3ClientError
from m3_trt.serving.repository import write_repository
from m3_trt.serving.server import serve

__all__ = ["TritonRepoOptions", "ServeOptions", "ClientOptions", "cmd_triton_repo", "cmd_serve", "cmd_client"]


@dataclass(frozen=True, kw_only=True)
class TritonRepoOptions:
    source: Path = field(metadata=opt(
        help="a checkpoint (or a build folder naming one); with --backend onnxruntime and no --export, the ONNX "
             "export folder; with --backend tensorrt, a build-engine output with TensorRT engines"))
    out: Path = field(metadata=opt("--out"))
    backend: str = field(default="torch", metadata=opt(
        "--backend", choices=("torch", "onnxruntime", "tensorrt"),
        help="what runs vision_encoder and llm (tensorrt: the GPU layout from a build-engine output, TensorRT "
             "vision engines + TensorRT-LLM; it runs only on GPU hosts with those backends)"))
    export: Path | None = field(default=None, metadata=opt(
        "--export", help="ONNX export folder (m3-trt export) for --backend onnxruntime"))
    instances: int = field(default=1, metadata=opt("--instances"))
    no_bls: bool = field(default=False, metadata=opt("--no-bls", help="only the ensemble, not the BLS alternative"))
    max_input_len: int | None = field(default=None, metadata=opt(
        "--max-input-len", help="prompt tokens incl. images (default 4096; onnxruntime: the export's max_seq_len - 1)"))
    max_pixels: int = field(default=16 * 1024 * 1024, metadata=opt("--max-pixels"))
    overwrite: bool = field(default=False, metadata=opt(
        "--overwrite", help="replace an existing --out that is not a previous repository of ours (never an input)"))


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    repo: Path = field(metadata=opt())
    grpc_port: int | None = field(default=None, metadata=opt("--grpc-port"))
    http_port: int | None = field(default=None, metadata=opt("--http-port"))
    metrics_port: int | None = field(default=None, metadata=opt("--metrics-port"))
    host: str = field(default="127.0.0.1", metadata=opt(
        "--host", help="address every port binds to (default loopback only; 0.0.0.0 exposes the server, with a "
                       "warning)"))
    admin_key: str | None = field(default=None, metadata=opt(
        "--admin-key", env="M3_TRT_ADMIN_KEY",
        help="unlocks Triton's model-repository (read-only: no load/unload), shared-memory, trace and logging APIs "
             "for requests with header m3-trt-admin-key (gRPC: triton-grpc-protocol-m3-trt-admin-key); default "
             "$M3_TRT_ADMIN_KEY, else they stay locked"))
    openai_port: int | None = field(default=None, metadata=opt(
        "--openai-port", help="also serve the OpenAI-compatible /v1 endpoint on this port"))
    served_model_name: str | None = field(default=None, metadata=opt(
        "--served-model-name", help="model name of the OpenAI endpoint (default: the checkpoint folder's name)"))
    log_file: Path | None = field(default=None, metadata=opt(
        "--log-file", help="write Triton's log here (default: this command's stdout)"))


@dataclass(frozen=True, kw_only=True)
class ClientOptions:
    url: str = field(default="localhost:8001", metadata=opt("--url"))
    prompt: str = field(metadata=opt("--prompt"))
    image: list[Path] = field(default_factory=list, metadata=opt("--image"))
    stream: bool = field(default=False, metadata=opt("--stream"))
    max_tokens: int = field(default=32, metadata=opt("--max-tokens"))
    model: str = field(default="ensemble", metadata=opt("--model", choices=("ensemble", "m3_bls")))
    temperature: float = field(default=0.0, metadata=opt("--temperature"))
    seed: int | None = field(default=None, metadata=opt("--seed"))


def cmd_triton_repo(o: TritonRepoOptions) -> int:
    print(f"triton-repo: source={o.source} export={o.export} out={o.out} backend={o.backend} instances={o.instances} "
          f"bls={not o.no_bls} max_input_len={o.max_input_len or 'default'} max_pixels={o.max_pixels}")
    path = write_repository(o.source, o.out, backend=o.backend, export=o.export, instances=o.instances,
                            bls=not o.no_bls, max_input_len=o.max_input_len, max_pixels=o.max_pixels,
                            overwrite=o.overwrite)
    settings = json.loads((path / "manifest.json").read_text())["settings"]
    print(f"wrote {path} (checkpoint {settings['checkpoint']}, max_input_len {settings['max_input_len']}; "
          f"see {path / 'README.md'})")
    return 0


def cmd_serve(o: ServeOptions) -> int:
    print(f"serve: repo={o.repo} host={o.host} grpc_port={o.grpc_port or 8001} http_port={o.http_port or 8000} "
          f"metrics_port={o.metrics_port or 8002} openai_port={o.openai_port} "
          f"admin_key={'set' if o.admin_key else 'none (repository/shared-memory/trace/logging APIs unreachable)'} "
          f"log={o.log_file or 'stdout'}", flush=True)
    return serve(o.repo, o.grpc_port, o.http_port, o.metrics_port, host=o.host, admin_key=o.admin_key,
                 openai_port=o.openai_port, served_model_name=o.served_model_name, log_path=o.log_file or "-")


def cmd_client(o: ClientOptions) -> int:
    blobs = [Path(p).read_bytes() for p in o.image]
    t0 = time.perf_counter()
    try:
        for piece in M3Client(o.url, o.model).stream(o.prompt, blobs, stream=o.stream, max_tokens=o.max_tokens,
                                                     temperature=o.temperature, seed=o.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except M3ClientError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(f"\n[{o.model} at {o.url}: {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``triton-repo``, ``serve`` and ``client`` to the ``m3-trt`` command line."""
    add_command(sub, "triton-repo", TritonRepoOptions, cmd_triton_repo,
                help="write a Triton Inference Server model repository")
    add_command(sub, "serve", ServeOptions, cmd_serve,
                help="start tritonserver on a model repository (Ctrl-C stops it)")
    add_command(sub, "client", ClientOptions, cmd_client,
                help="send a prompt (and images) to a running server over gRPC")

"""``m3-trt`` serving commands as plain functions (the lead wires them into ``m3_trt.cli.main``).

    m3-trt triton-repo CKPT --out REPO [--backend torch] [--instances N]
    m3-trt triton-repo CKPT --export ONNX_DIR --backend onnxruntime --out REPO
    m3-trt triton-repo ONNX_DIR --backend onnxruntime --out REPO     (the export names its checkpoint)
    m3-trt triton-repo BUILD_DIR --backend tensorrt --out REPO  (GPU layout; runs only on GPU hosts)
    m3-trt serve REPO [--host H] [--grpc-port P] [--http-port P] [--metrics-port P] [--openai-port P]
    m3-trt client --url HOST:PORT --prompt TEXT [--image FILE ...] [--stream] [--max-tokens N]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["cmd_triton_repo", "cmd_serve", "cmd_client"]


def cmd_triton_repo(source: Path, out: Path, backend: str = "torch", instances: int = 1, *,
                    export: Path | None = None, bls: bool = True, max_input_len: int | None = None,
                    max_pixels: int = 16 * 1024 * 1024, overwrite: bool = False) -> int:
    import json

    from m3_trt.serving.repository import write_repository

    print(f"triton-repo: source={source} export={export} out={out} backend={backend} instances={instances} "
          f"bls={bls} max_input_len={max_input_len or 'default'} max_pixels={max_pixels}")
    path = write_repository(source, out, backend=backend, export=export, instances=instances, bls=bls,
                            max_input_len=max_input_len, max_pixels=max_pixels, overwrite=overwrite)
    settings = json.loads((path / "manifest.json").read_text())["settings"]
    print(f"wrote {path} (checkpoint {settings['checkpoint']}, max_input_len {settings['max_input_len']}; "
          f"see {path / 'README.md'})")
    return 0


def cmd_serve(repo: Path, grpc_port: int | None = None, http_port: int | None = None,
              metrics_port: int | None = None, *, host: str = "127.0.0.1", admin_key: str | None = None,
              openai_port: int | None = None, served_model_name: str | None = None,
              log_file: Path | None = None) -> int:
    from m3_trt.serving.server import serve

    print(f"serve: repo={repo} host={host} grpc_port={grpc_port or 8001} http_port={http_port or 8000} "
          f"metrics_port={metrics_port or 8002} openai_port={openai_port} "
          f"admin_key={'set' if admin_key else 'none (repository/shared-memory/trace/logging APIs unreachable)'} "
          f"log={log_file or 'stdout'}", flush=True)
    return serve(repo, grpc_port, http_port, metrics_port, host=host, admin_key=admin_key, openai_port=openai_port,
                 served_model_name=served_model_name, log_path=log_file or "-")


def cmd_client(url: str, prompt: str, images: list[Path] = (), stream: bool = False, max_tokens: int = 32, *,
               model: str = "ensemble", temperature: float = 0.0, seed: int | None = None) -> int:
    from m3_trt.serving.client import M3Client, M3ClientError

    blobs = [Path(p).read_bytes() for p in images]
    t0 = time.perf_counter()
    try:
        for piece in M3Client(url, model).stream(prompt, blobs, stream=stream, max_tokens=max_tokens,
                                                 temperature=temperature, seed=seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except M3ClientError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    print(f"\n[{model} at {url}: {time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    return 0


def register(sub) -> None:
    """Add ``triton-repo``, ``serve`` and ``client`` to the ``m3-trt`` command line."""
    s = sub.add_parser("triton-repo", help="write a Triton Inference Server model repository")
    s.add_argument("source", type=Path, help="a checkpoint (or a build folder naming one); with --backend "
                   "onnxruntime and no --export, the ONNX export folder; with --backend tensorrt, a build-engine "
                   "output with TensorRT engines")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                   help="what runs vision_encoder and llm (tensorrt: the GPU layout from a build-engine output, "
                        "TensorRT vision engines + TensorRT-LLM; it runs only on GPU hosts with those backends)")
    s.add_argument("--export", type=Path, help="ONNX export folder (m3-trt export) for --backend onnxruntime")
    s.add_argument("--instances", type=int, default=1)
    s.add_argument("--no-bls", action="store_true", help="only the ensemble, not the BLS alternative")
    s.add_argument("--max-input-len", type=int, help="prompt tokens incl. images (default 4096; "
                   "onnxruntime: the export's max_seq_len - 1)")
    s.add_argument("--max-pixels", type=int, default=16 * 1024 * 1024)
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out that is not a previous repository of ours (never an input)")
    s.set_defaults(fn=lambda a: cmd_triton_repo(a.source, a.out, a.backend, a.instances, export=a.export,
                                                bls=not a.no_bls,
                                                max_input_len=a.max_input_len, max_pixels=a.max_pixels,
                                                overwrite=a.overwrite))

    s = sub.add_parser("serve", help="start tritonserver on a model repository (Ctrl-C stops it)")
    s.add_argument("repo", type=Path)
    s.add_argument("--grpc-port", type=int)
    s.add_argument("--http-port", type=int)
    s.add_argument("--metrics-port", type=int)
    s.add_argument("--host", default="127.0.0.1",
                   help="address every port binds to (default loopback only; 0.0.0.0 exposes the server, with a "
                        "warning)")
    s.add_argument("--admin-key", default=os.environ.get("M3_TRT_ADMIN_KEY"),
                   help="unlocks Triton's model-repository (read-only: no load/unload), shared-memory, trace and "
                        "logging APIs for requests with header m3-trt-admin-key (gRPC: "
                        "triton-grpc-protocol-m3-trt-admin-key); default $M3_TRT_ADMIN_KEY, else they stay locked")
    s.add_argument("--openai-port", type=int, help="also serve the OpenAI-compatible /v1 endpoint on this port")
    s.add_argument("--served-model-name", help="model name of the OpenAI endpoint (default: the checkpoint "
                   "folder's name)")
    s.add_argument("--log-file", type=Path, help="write Triton's log here (default: this command's stdout)")
    s.set_defaults(fn=lambda a: cmd_serve(a.repo, a.grpc_port, a.http_port, a.metrics_port, host=a.host,
                                          admin_key=a.admin_key, openai_port=a.openai_port,
                                          served_model_name=a.served_model_name, log_file=a.log_file))

    s = sub.add_parser("client", help="send a prompt (and images) to a running server over gRPC")
    s.add_argument("--url", default="localhost:8001")
    s.add_argument("--prompt", required=True)
    s.add_argument("--image", type=Path, action="append", default=[])
    s.add_argument("--stream", action="store_true")
    s.add_argument("--max-tokens", type=int, default=32)
    s.add_argument("--model", default="ensemble", choices=("ensemble", "m3_bls"))
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int)
    s.set_defaults(fn=lambda a: cmd_client(a.url, a.prompt, a.image, a.stream, a.max_tokens, model=a.model,
                                           temperature=a.temperature, seed=a.seed))

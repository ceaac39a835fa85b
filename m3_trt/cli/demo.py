"""``m3-trt demo``: the whole product on the embedded tiny checkpoint, stage by stage.

make-tiny → info → build-engine (``--target cpu``: weights, layer-by-layer ONNX verified in ONNX
Runtime) → TensorRT-RTX engines for the exported components (built on CPU; they cannot run
without a GPU) → Triton model repository → ``tritonserver`` on loopback → one image+text request
over gRPC (streamed) → ``compare`` summaries (ONNX Runtime layer by layer, the live server end to
end) → server stopped. Every stage's output stays in the workdir for inspection.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from m3_trt.checkpoints.tiny import make_tiny
from m3_trt.cli.commands import InfoOptions, cmd_info
from m3_trt.compare.cli import CompareOptions, cmd_compare
from m3_trt.options import add_command, opt
from m3_trt.processing.samples import demo_image_png


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    workdir: Path = field(default=Path("artifacts/demo"), metadata=opt("--workdir"))
    prompt: str = field(default="Describe the picture.", metadata=opt("--prompt"))
    max_tokens: int = field(default=12, metadata=opt("--max-tokens"))


class _Stages:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.rows: list[tuple[str, float, str]] = []
        self._name, self._start = "", 0.0

    def start(self, name: str) -> None:
        self._name, self._start = name, time.perf_counter()
        print(f"\n=== {name} " + "=" * max(0, 72 - len(name)), flush=True)

    def done(self, note: str = "") -> None:
        self.rows.append((self._name, time.perf_counter() - self._start, note))

    def summary(self) -> None:
        print("\n=== summary " + "=" * 65)
        for name, secs, note in self.rows:
            print(f"  {name:44s} {secs:7.1f}s  {note}")
        print(f"  {'total':44s} {time.perf_counter() - self.t0:7.1f}s")


def run_demo(o: DemoOptions) -> int:
    st = _Stages()
    workdir, prompt, max_tokens = Path(o.workdir), o.prompt, o.max_tokens
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = workdir / "tiny-ckpt"

    st.start("1. make-tiny")
    if not (ckpt / "config.json").is_file():
        make_tiny(ckpt, seed=0)
        print(f"wrote {ckpt}")
    else:
        print(f"reusing {ckpt}")
    st.done(str(ckpt))

    st.start("2. info")
    cmd_info(InfoOptions(ckpt=ckpt))
    st.done()

    st.start("3. build-engine --target cpu")
    build_dir = workdir / "build-cpu"
    onnx_dir = _build_cpu(ckpt, build_dir)
    st.done(str(build_dir))

    st.start("4. TensorRT-RTX engines (built on CPU; running them needs a GPU)")
    engines_note = _tensorrt_engines(onnx_dir)
    st.done(engines_note)

    st.start("5. triton-repo")
    from m3_trt.serving.repository import write_repository

    repo = workdir / "triton-repo"
    write_repository(ckpt, repo, backend="torch", bls=True, max_input_len=4096, overwrite=True)
    print(f"wrote {repo}: {sorted(p.name for p in repo.iterdir() if p.is_dir())}")
    st.done(str(repo))

    image = workdir / "demo.png"
    image.write_bytes(demo_image_png())
    from m3_trt.serving.client import M3Client
    from m3_trt.serving.server import TritonServer

    st.start("6. tritonserver + gRPC client (image + text, streamed)")
    with TritonServer(repo) as server:
        print(f"server ready: gRPC {server.grpc_url}")
        client = M3Client(server.grpc_url, "ensemble")
        print(f"prompt: {prompt!r} + {image.name}\nanswer: ", end="", flush=True)
        pieces = []
        for piece in client.stream(prompt, [image.read_bytes()], stream=True, max_tokens=max_tokens):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(f"\n({len(pieces)} streamed pieces)")
        st.done(f"{len(pieces)} pieces")

        st.start("7. compare: live server vs torch reference (end to end)")
        rc_triton = _compare(ckpt, workdir / "compare-triton", backend="triton", url=server.grpc_url,
                             layers=False, tokens=max_tokens)
        st.done("PASS" if rc_triton == 0 else "FAIL")
    print("server stopped")

    st.start("8. compare: ONNX Runtime components vs torch reference (layer by layer)")
    rc_onnx = _compare(ckpt, workdir / "compare-onnxruntime", backend="onnxruntime", backend_path=onnx_dir,
                       layers=True, tokens=8)
    st.done("PASS" if rc_onnx == 0 else "FAIL")
    st.summary()
    return 0 if rc_onnx == 0 and rc_triton == 0 else 1


def _build_cpu(ckpt: Path, out: Path) -> Path:
    """``build-engine --target cpu`` (resumable); returns the folder of its verified ONNX export."""
    from m3_trt.build.builder import build
    from m3_trt.build.targets import load_target

    manifest = build(ckpt, load_target("cpu"), out, resume=out.exists(), progress=True)
    onnx_dir = out / "rank0" / "onnx"  # the cpu target is one rank with ONNX on
    verify = json.loads((onnx_dir / "manifest.json").read_text()).get("verify", {})
    print(f"build manifest: {out / 'build.json'} (ranks: {len(manifest.get('ranks', [])) or 1}); "
          f"ONNX components in {onnx_dir}, verified in ONNX Runtime: {verify.get('ok', 'not run')}")
    return onnx_dir


def _tensorrt_engines(onnx_dir: Path) -> str:
    from m3_trt.export.tensorrt import trt_available, trt_unavailable_reason
    from m3_trt.export.tensorrt_build import build_engines

    if not trt_available():
        msg = f"skipped: {trt_unavailable_reason()}"
        print(msg)
        return msg
    reports = build_engines(onnx_dir)
    ok = sum(r["ok"] for r in reports.values())
    return f"{ok}/{len(reports)} engines built"


def _compare(ckpt: Path, out: Path, **kw) -> int:
    return cmd_compare(CompareOptions(ckpt=ckpt, out=out, **kw))


def register(sub) -> None:
    """Add ``demo`` to the ``m3-trt`` command line."""
    add_command(sub, "demo", DemoOptions, run_demo, help="run the whole product on the embedded tiny checkpoint")

"""The GPU layout of the Triton repository, from a ``build-engine`` output with TensorRT engines.

``m3-trt triton-repo BUILD_DIR --backend tensorrt`` writes::

    preprocessing/     python          the same step as the CPU layout (tokenizer, chat template, pixels)
    vision_encoder/    python          grid -> engine inputs; calls the two engines below through the server (BLS)
    vision_tower/      tensorrt_plan   1/model.plan = the build's vision_encoder engine
    vision_projector/  tensorrt_plan   1/model.plan = the build's projector engine
    llm/               python          TensorRT-LLM's LLM API; 1/model.yaml = the build's handoff model.yaml
    ensemble/          ensemble        preprocessing -> vision_encoder -> llm (same inputs/outputs as the CPU one)

This layout runs only on a GPU host with Triton's TensorRT backend and TensorRT-LLM (e.g. NGC's
``tritonserver:<yy.mm>-trtllm-python-py3``); nothing here can load it (no GPU, no TensorRT-LLM,
and TensorRT-RTX engines built on this machine target other GPUs). The tests check its structure
and that every ``config.pbtxt`` parses as Triton's ``ModelConfig``.

Where things come from in BUILD_DIR (``build.json``): the checkpoint (``checkpoint``), the target's
limits (``target.max_batch``, ``target.max_input_len``), the vision engines (``onnx.engines.reports``
under ``rank0/engines`` for one rank, ``replicated/engines`` for several; their tensors from the
engine report, their profile from the ONNX manifest) and ``trtllm/triton/tensorrt_llm/1/model.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from m3_trt.export.tensorrt_build import profile_for  # the function the build used for the engines' profiles

from m3_trt.serving.pbtxt import render

__all__ = ["EngineBuild", "TensorRTLayoutError", "resolve_build", "write_gpu_models", "GPU_MODELS"]

GPU_MODELS = ("preprocessing", "vision_encoder", "vision_tower", "vision_projector", "llm", "ensemble")
BUILD_FORMAT = "m3-trt-build/"
# TensorRT's DataType names (engine reports) and ONNX's (export manifests) -> Triton's.
TRITON_TYPES = {"FLOAT": "TYPE_FP32", "HALF": "TYPE_FP16", "BF16": "TYPE_BF16", "INT64": "TYPE_INT64",
                "INT32": "TYPE_INT32", "BOOL": "TYPE_BOOL", "float": "TYPE_FP32", "float16": "TYPE_FP16",
                "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64", "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
ENGINES = {"vision_tower": ("vision_encoder", "the build's vision tower engine: patches -> vision features"),
           "vision_projector": ("projector", "the build's projector engine: vision features -> image tokens")}


class TensorRTLayoutError(ValueError):
    """BUILD_DIR cannot give the GPU layout; the message names the missing piece."""


@dataclasses.dataclass(frozen=True)
class EngineBuild:
    """What the GPU layout takes from a build folder (paths absolute)."""

    build_dir: Path
    checkpoint: Path
    target: dict
    export_dir: Path  # the ONNX export whose engines/ hold the vision engines
    export_manifest: dict
    engines: dict  # model name -> (engine .plan path, engine report dict, ONNX component dict)
    model_yaml: Path


def resolve_build(source: str | Path) -> EngineBuild:
    """Read ``source/build.json`` and find every file the GPU layout needs, or say which is missing."""
    build_dir = Path(source).resolve()
    path = build_dir / "build.json"
    if not path.is_file():
        raise TensorRTLayoutError(f"--backend tensorrt takes a `m3-trt build-engine` output folder; {build_dir} has "
                                  f"no build.json")
    manifest = json.loads(path.read_text())
    if not str(manifest.get("format", "")).startswith(BUILD_FORMAT):
        raise TensorRTLayoutError(f"{path}: format {manifest.get('format')!r} is not a build of ours ({BUILD_FORMAT}*)")
    ckpt = Path(manifest.get("checkpoint") or "")
    if not (ckpt / "config.json").is_file() or not (ckpt / "tokenizer.json").is_file():
        raise TensorRTLayoutError(f"{path}: checkpoint {str(ckpt)!r} (its tokenizer and processor files feed "
                                  f"preprocessing) is not a checkpoint on this machine")
    onnx = manifest.get("onnx") or {}
    reports = (onnx.get("engines") or {}).get("reports")
    if not reports:
        raise TensorRTLayoutError(f"the build {build_dir} has no TensorRT engines (target backend "
                                  f"{manifest.get('target', {}).get('backend')!r}); rebuild with "
                                  f"`m3-trt build-engine CKPT --target T --set backend=tensorrt --out DIR`")
    # Several ranks: the vision engines are built once, in replicated/ (rankN/engines hold layer parts).
    group = "replicated/engines" if "replicated/engines" in reports else "rank0/engines"
    holder = onnx.get("replicated", {}) if group == "replicated/engines" else onnx.get("ranks", {}).get("0", {})
    export_rel = holder.get("dir")
    if group not in reports or not export_rel:
        raise TensorRTLayoutError(f"the build {build_dir} has no vision engines (no rank0/engines or "
                                  f"replicated/engines in build.json)")
    export_dir = build_dir / export_rel
    export_manifest = json.loads((export_dir / "manifest.json").read_text())
    components = {c["name"]: c for c in export_manifest.get("components", [])}
    engines = {}
    for model, (component, _) in ENGINES.items():
        rep = reports[group].get(component)
        if rep is None or component not in components:
            raise TensorRTLayoutError(f"the build {build_dir} has no {component} engine (none in {group}); the GPU "
                                      f"layout needs the vision encoder and projector engines")
        if not rep.get("ok") or not rep.get("engine_path"):
            raise TensorRTLayoutError(f"the build {build_dir}'s {component} engine failed to build: {rep.get('error')}")
        plan = export_dir / rep["engine_path"]
        if not plan.is_file():
            raise TensorRTLayoutError(f"the {component} engine {plan} named by {path} is missing")
        engines[model] = (plan, rep, components[component])
    model_yaml = build_dir / "trtllm" / "triton" / "tensorrt_llm" / "1" / "model.yaml"
    if not model_yaml.is_file():
        raise TensorRTLayoutError(f"the build {build_dir} has no TensorRT-LLM handoff {model_yaml}")
    return EngineBuild(build_dir, ckpt.resolve(), manifest.get("target", {}), export_dir, export_manifest, engines,
                       model_yaml)


def _tensors(infos: list[dict]) -> str:
    """Text-format ``input``/``output`` entries for an engine's tensors (dynamic dims as -1)."""
    rows = []
    for t in infos:
        kind = TRITON_TYPES.get(str(t["dtype"]).removeprefix("DataType."))
        if kind is None:
            raise TensorRTLayoutError(f"engine tensor {t['name']!r} has dtype {t['dtype']!r}, which has no Triton type")
        dims = ", ".join(str(d) if isinstance(d, int) and d >= 0 else "-1" for d in t["shape"])
        rows.append(f'  {{ name: "{t["name"]}" data_type: {kind} dims: [ {dims} ] }}')
    return ",\n".join(rows)


def _max_patches(build: EngineBuild, component: dict) -> int:
    return int(profile_for(component, build.export_manifest)["pixel_values"][2][0])


def write_gpu_models(tmp: Path, build: EngineBuild, values: dict, templates: Path) -> list[str]:
    """Write the GPU layout's models into ``tmp`` (the repository being built); returns their names.

    ``values`` are the repository's template values (checkpoint, limits, instances ...); the
    layout's own (``engine_dtype``, ``max_patches``, ``build_dir``) are added to it, so the
    manifest records them. ``templates`` is the ``triton_repo`` template root (the CPU
    preprocessing step and ``gpu/``).
    """
    gpu = templates / "gpu"
    tower = build.engines["vision_tower"]
    values.update(engine_dtype=build.export_manifest["dtype"], max_patches=_max_patches(build, tower[2]),
                  build_dir=str(build.build_dir))

    def write(name: str, template: Path, extra: dict | None = None, raw=frozenset()) -> Path:
        (tmp / name / "1").mkdir(parents=True)
        text = render((template / "config.pbtxt").read_text(), {**values, **(extra or {})}, raw=raw)
        (tmp / name / "config.pbtxt").write_text(text)
        if (template / "1" / "model.py").is_file():
            shutil.copy2(template / "1" / "model.py", tmp / name / "1" / "model.py")
        return tmp / name

    write("preprocessing", templates / "preprocessing")
    write("vision_encoder", gpu / "vision_encoder")
    for model, (component, comment) in ENGINES.items():
        plan, rep, comp = build.engines[model]
        ins = rep.get("inputs") or comp["inputs"]  # the engine's own tensors; the ONNX graph's otherwise
        outs = rep.get("outputs") or comp["outputs"]
        folder = write(model, gpu / "tensorrt_plan", {"name": model, "comment": comment, "inputs": _tensors(ins),
                                                      "outputs": _tensors(outs)}, raw=frozenset({"inputs", "outputs"}))
        shutil.copy2(plan, folder / "1" / "model.plan")
    llm = write("llm", gpu / "llm")
    shutil.copy2(build.model_yaml, llm / "1" / "model.yaml")
    write("ensemble", gpu / "ensemble")
    return list(GPU_MODELS)

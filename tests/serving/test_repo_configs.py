"""Every repository layout's config.pbtxt parses as Triton's ModelConfig; values are escaped; --out is safe.

Layouts: torch (ensemble + BLS), onnxruntime (over an export manifest), tensorrt (the GPU layout,
from a build folder whose engines are stand-in bytes: this machine cannot build a CUDA engine that
Triton's TensorRT backend could load, and the layout is checked for structure only). The ensemble's
wiring is checked against the composing models' own configs.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

from m3_trt.outputs import OutputError  # noqa: E402
from m3_trt.serving.repository import TEMPLATES, write_repository  # noqa: E402
from m3_trt.serving.tensorrt_repo import TensorRTLayoutError  # noqa: E402


def parse(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def parse_repo(repo: Path) -> dict:
    """model name -> ModelConfig for every model folder (each must parse and carry its folder's name)."""
    configs = {}
    for d in sorted(p for p in repo.iterdir() if p.is_dir()):
        cfg = parse(d / "config.pbtxt")
        assert cfg.name == d.name
        configs[d.name] = cfg
    return configs


def check_ensemble_wiring(configs: dict) -> None:
    """Every ensemble step names a model of the repository and only tensors that model declares."""
    ens = configs["ensemble"]
    assert ens.platform == "ensemble"
    produced = {i.name for i in ens.input}
    for step in ens.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert set(step.input_map) <= {i.name for i in model.input}, step.model_name
        assert set(step.input_map.values()) <= produced, step.model_name  # fed by the client or an earlier step
        assert set(step.output_map) <= {o.name for o in model.output}, step.model_name
        produced |= set(step.output_map.values())
    assert {o.name for o in ens.output} <= produced


def _fake_export(tiny_ckpt, folder: Path) -> Path:
    """An ONNX export folder as far as the repository writer reads it (manifest only)."""
    from m3_trt.model.config import M3Config

    folder.mkdir(parents=True)
    comps = [{"name": n} for n in ("embedding", "head", "vision_encoder", "projector")] + [{"name": "decoder", "layers": {}}]
    (folder / "manifest.json").write_text(json.dumps({
        "format": "m3-trt-onnx/1", "source": str(tiny_ckpt), "dtype": "fp32", "max_seq_len": 128, "components": comps,
        "config": M3Config.from_pretrained(tiny_ckpt).to_hf_dict()}))
    return folder


def _fake_engine_build(tiny_ckpt, folder: Path, *, vision: bool = True, engines: bool = True,
                       ranks: int = 1) -> Path:
    """A build-engine output with the files the GPU layout reads: build.json, the export manifest's
    vision components, two .plan files (stand-in bytes) with real engine reports, the real handoff.
    One rank keeps the vision engines under ``rank0/``, several under ``replicated/`` (as build.py)."""
    from m3_trt.model.config import M3Config
    from m3_trt.export.tensorrt.builder import BuildReport, TensorInfo
    from m3_trt.export.trtllm import write_trtllm
    from m3_trt.build.targets import load_target

    cfg = M3Config.from_pretrained(tiny_ckpt)
    v = cfg.vision
    target = load_target("cpu", {"backend": "tensorrt"})
    group = "rank0" if ranks == 1 else "replicated"
    export = folder / group / "onnx"
    (export / "engines").mkdir(parents=True)
    tower_in = [("pixel_values", ["patches", v.patch_dim], "float", "FLOAT"),
                ("vision_pos", ["patches", 3], "int64", "INT64"), ("segment_ids", ["patches"], "int64", "INT64")]
    tower_out = [("vision_feats", ["patches", v.hidden_size], "float", "FLOAT")]
    proj_out = [("image_embeds", ["merged", cfg.text.hidden_size], "float", "FLOAT")]

    def comp(name, ins, outs):
        desc = lambda ts: [{"name": n, "shape": s, "dtype": o} for n, s, o, _ in ts]  # noqa: E731
        return {"name": name, "file": f"{name}.onnx", "inputs": desc(ins), "outputs": desc(outs)}

    def report(name, ins, outs):
        (export / "engines" / f"{name}.plan").write_bytes(f"stand-in engine {name}".encode())
        info = lambda ts: [TensorInfo(n, tuple(-1 if isinstance(d, str) else d for d in s), t) for n, s, _, t in ts]  # noqa: E731
        return BuildReport(ok=True, stage="done", engine_path=f"engines/{name}.plan", engine_bytes=1,
                           inputs=info(ins), outputs=info(outs)).to_dict()

    components = [comp("vision_encoder", tower_in, tower_out), comp("projector", tower_out, proj_out)]
    (export / "manifest.json").write_text(json.dumps({"format": "m3-trt-onnx/1", "dtype": "fp32", "max_batch": 1,
                                                      "max_seq_len": 256, "components": components}))
    reports = {"vision_encoder": report("vision_encoder", tower_in, tower_out),
               "projector": report("projector", tower_out, proj_out)}
    if not vision:
        del reports["vision_encoder"]
    write_trtllm(cfg, target, folder / "trtllm", checkpoint=str(tiny_ckpt))
    onnx = {"ranks": {str(r): {"dir": f"rank{r}/onnx"} for r in range(ranks)}}
    if ranks > 1:
        onnx["replicated"] = {"dir": "replicated/onnx"}
    if engines:
        onnx["engines"] = {"reports": {f"{group}/engines": reports, **{f"rank{r}/engines": {} for r in range(ranks)
                                                                          if ranks > 1}},
                           "built": len(reports), "failed": []}
    (folder / "build.json").write_text(json.dumps({"format": "m3-trt-build/1", "checkpoint": str(tiny_ckpt),
                                                   "target": target.to_dict(), "onnx": onnx}))
    return folder


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "tensorrt", "tensorrt-W2"])
def test_every_generated_config_parses_as_model_config(tiny_ckpt, tmp_path, backend):
    if backend == "torch":
        repo = write_repository(tiny_ckpt, tmp_path / "repo", bls=True)
    elif backend == "onnxruntime":
        repo = write_repository(_fake_export(tiny_ckpt, tmp_path / "export"), tmp_path / "repo", backend="onnxruntime",
                                bls=True)
    else:
        ranks = 2 if backend.endswith("W2") else 1
        build = _fake_engine_build(tiny_ckpt, tmp_path / "build", ranks=ranks)
        repo = write_repository(build, tmp_path / "repo", backend="tensorrt")
        engines_dir = build / ("rank0" if ranks == 1 else "replicated") / "onnx" / "engines"
    configs = parse_repo(repo)
    check_ensemble_wiring(configs)
    settings = json.loads((repo / "manifest.json").read_text())["settings"]
    assert sorted(configs) == sorted(json.loads((repo / "manifest.json").read_text())["models"])
    if not backend.startswith("tensorrt"):
        assert {"preprocessing", "vision_encoder", "llm", "postprocessing", "ensemble", "m3_bls"} == set(configs)
        assert configs["llm"].parameters["backend"].string_value == backend
        return
    assert set(configs) == {"preprocessing", "vision_encoder", "vision_tower", "vision_projector", "llm", "ensemble"}
    for name, engine in (("vision_tower", "vision_encoder"), ("vision_projector", "projector")):
        cfg = configs[name]
        assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert (repo / name / "1" / "model.plan").read_bytes() == (engines_dir / f"{engine}.plan").read_bytes()
    tower = {i.name: (list(i.dims), i.data_type) for i in configs["vision_tower"].input}
    from m3_trt.model.config import M3Config

    patch_dim = M3Config.from_pretrained(tiny_ckpt).vision.patch_dim
    assert tower == {"pixel_values": ([-1, patch_dim], model_config_pb2.TYPE_FP32),
                     "segment_ids": ([-1], model_config_pb2.TYPE_INT64),
                     "vision_pos": ([-1, 3], model_config_pb2.TYPE_INT64)}
    assert (repo / "llm" / "1" / "model.yaml").read_text() == \
        (build / "trtllm" / "triton" / "tensorrt_llm" / "1" / "model.yaml").read_text()
    assert configs["llm"].model_transaction_policy.decoupled
    assert (repo / "vision_encoder" / "1" / "model.py").is_file() and (repo / "llm" / "1" / "model.py").is_file()
    assert configs["vision_encoder"].parameters["max_patches"].string_value == str(settings["max_patches"]) == "1024"
    assert "runs only on a GPU host" in (repo / "README.md").read_text()


def test_corrupted_config_fails_to_parse(tiny_ckpt, tmp_path):
    """Negative control: the parse check catches a broken or misspelt config."""
    repo = write_repository(tiny_ckpt, tmp_path / "repo")
    text = (repo / "llm" / "config.pbtxt").read_text()
    for bad in (text.replace("model_transaction_policy", "model_transaction_polcy"),  # unknown field
                text.rstrip().rstrip("]") + "\n",  # unbalanced bracket
                text.replace("max_batch_size: 8", 'max_batch_size: "eight"')):  # wrong type
        (repo / "llm" / "config.pbtxt").write_text(bad)
        with pytest.raises(text_format.ParseError):
            parse(repo / "llm" / "config.pbtxt")


HOSTILE = 'ck"} parameters { key: "backend" value: { string_value: "evil" } } #\\ \'x\nline2\ttab'


def test_hostile_checkpoint_path_is_one_escaped_string(tiny_ckpt, tmp_path):
    ckpt = tmp_path / HOSTILE
    shutil.copytree(tiny_ckpt, ckpt)
    repo = write_repository(ckpt, tmp_path / "repo", bls=True)
    for name, cfg in parse_repo(repo).items():
        params = dict(cfg.parameters)
        if "checkpoint" in params:
            assert params["checkpoint"].string_value == str(ckpt.resolve()), name
        assert "evil" not in {p.string_value for p in params.values()}, name
    # negative control: the same template filled without escaping is not the config we meant
    raw = string.Template((TEMPLATES / "llm" / "config.pbtxt").read_text()).safe_substitute(
        checkpoint=str(ckpt.resolve()), backend="torch", export_dir="", torch_threads=1, instances=1, max_batch_size=8)
    try:
        cfg = text_format.Parse(raw, model_config_pb2.ModelConfig())
    except text_format.ParseError:
        return
    assert cfg.parameters["checkpoint"].string_value != str(ckpt.resolve())


def test_out_refuses_inputs_and_foreign_folders(tiny_ckpt, tmp_path, capsys):
    from m3_trt.cli.main import main

    user = tmp_path / "my-notes"
    user.mkdir()
    (user / "thesis.txt").write_text("do not delete")
    with pytest.raises(OutputError, match="not a previous triton-repo output"):
        write_repository(tiny_ckpt, user)
    assert (user / "thesis.txt").read_text() == "do not delete"
    before = sorted(p.name for p in tiny_ckpt.iterdir())
    for out in (tiny_ckpt, tiny_ckpt / "repo", tiny_ckpt.parent):
        with pytest.raises(OutputError, match="the input"):
            write_repository(tiny_ckpt, out, overwrite=True)
    assert sorted(p.name for p in tiny_ckpt.iterdir()) == before
    # the command line says the same and exits non-zero
    assert main(["triton-repo", str(tiny_ckpt), "--out", str(user)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # a previous repository of ours is replaced; --overwrite replaces a user's folder deliberately
    repo = write_repository(tiny_ckpt, tmp_path / "repo")
    (repo / "stale").mkdir()
    write_repository(tiny_ckpt, repo)
    assert not (repo / "stale").exists() and (repo / "manifest.json").is_file()
    assert main(["triton-repo", str(tiny_ckpt), "--out", str(user), "--overwrite", "--no-bls"]) == 0
    assert not (user / "thesis.txt").exists() and (user / "ensemble" / "config.pbtxt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial/old siblings left


@pytest.mark.parametrize("case", ["no-engines", "no-vision-engine", "not-a-build"])
def test_tensorrt_layout_names_what_is_missing(tiny_ckpt, tmp_path, case):
    if case == "not-a-build":
        source, match = tiny_ckpt, "no build.json"
    else:
        source = _fake_engine_build(tiny_ckpt, tmp_path / "build", engines=case != "no-engines",
                                    vision=case != "no-vision-engine")
        match = {"no-engines": "has no TensorRT engines", "no-vision-engine": "has no vision_encoder engine"}[case]
    with pytest.raises(TensorRTLayoutError, match=match):
        write_repository(source, tmp_path / "repo", backend="tensorrt")
    assert not (tmp_path / "repo").exists()

"""The built wheel works without the source tree: targets and repository templates are package data.

Builds the wheel, installs it (no dependencies) into a fresh target folder, and runs
``build-engine --list-targets``, ``make-tiny`` and ``triton-repo`` from that folder, in a working
directory outside the repository, checking that the code that ran is the installed copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], *, env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("wheel")
    dist, target, src = tmp / "dist", tmp / "site", tmp / "src"
    # build from a copy: an in-tree setuptools build would leave build/ and *.egg-info in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("m3_trt", "plugins", "export", "engines", "triton_repo"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], env=dict(os.environ),
             cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("m3_trt-*.whl")
    r = _run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)], env=dict(os.environ), cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(target))
    return target, env


def test_wheel_carries_targets_and_templates(installed, tmp_path):
    target, env = installed
    names = {p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()}
    for want in ("m3_trt/engines/cpu.toml", "m3_trt/engines/b200x8-fp8.toml", "m3_trt/triton_repo/llm/config.pbtxt",
                 "m3_trt/triton_repo/llm/1/model.py", "m3_trt/triton_repo/ensemble/config.pbtxt"):
        assert want in names, f"{want} missing from the wheel"
    # negative control: the source tree's folders are not what the installed code reads
    r = _run([sys.executable, "-c", "import m3_trt, m3_trt.build.targets as t, m3_trt.serving.repository as r; "
              "print(m3_trt.__file__); print(t.TARGETS_DIR); print(r.TEMPLATES)"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for line in r.stdout.split():
        assert Path(line).is_relative_to(target), f"{line} is not inside the installed wheel {target}"


def test_wheel_commands_run(installed, tmp_path):
    target, env = installed
    cli = [sys.executable, "-m", "m3_trt.cli.main"]
    r = _run(cli + ["build-engine", "--list-targets"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.strip()}
    assert {"cpu", "b200x8-fp8", "b200x8-bf16", "h100x1-bf16"} <= listed
    assert str(target) in r.stdout  # the listed files are the wheel's own

    r = _run(cli + ["make-tiny", str(tmp_path / "tiny")], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 4

    r = _run(cli + ["triton-repo", str(tmp_path / "tiny"), "--out", str(tmp_path / "repo")], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    for step in ("preprocessing", "vision_encoder", "llm", "postprocessing", "ensemble"):
        assert (tmp_path / "repo" / step / "config.pbtxt").is_file(), step
    assert (tmp_path / "repo" / "llm" / "1" / "model.py").read_bytes() == \
        (target / "m3_trt" / "triton_repo" / "llm" / "1" / "model.py").read_bytes()

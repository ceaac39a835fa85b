"""The ``m3-trt`` command-line surface, declared once per command (``m3_trt.options``), stays as it was.

``tests/data/cli_options.json`` is every subcommand's options (flags, dest, action, default,
choices, required, nargs, type, metavar, help) plus its help line and description, taken from the
parser before the options became dataclasses; scripts, the README and tests call these flags, so
any change fails here. A deliberate change of the surface regenerates the file:

    .venv/bin/python tests/test_cli_options.py --update     (then review the diff of the json)

Also: ``m3-trt --help`` and each command's ``--help`` work with the optional libraries
(onnxruntime, tensorrt, tritonclient, pytriton, transformers, onnx) unimportable, and the
dataclass → argparse mapping of ``m3_trt.options`` (each rule with a failing case).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from m3_trt.options import add_command, from_args, opt

SNAPSHOT = Path(__file__).parent / "data" / "cli_options.json"
ADMIN_ENV = "M3_TRT_ADMIN_KEY"  # serve's --admin-key defaults to it: unset while the surface is read
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "tensorrt", "tensorrt_rtx", "tritonclient", "pytriton",
            "transformers", "matplotlib")


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def surface(parser: argparse.ArgumentParser) -> dict:
    """{subcommand: {help, description, formatter, options: {flag or positional: settings}}}."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    out = {}
    for name, sp in sub.choices.items():
        opts = {}
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            opts[a.option_strings[0] if a.option_strings else a.dest] = {
                "flags": list(a.option_strings), "dest": a.dest, "action": type(a).__name__,
                "default": _plain(a.default), "choices": None if a.choices is None else _plain(a.choices),
                "required": a.required, "nargs": _plain(a.nargs), "type": getattr(a.type, "__name__", None),
                "metavar": _plain(a.metavar), "help": a.help}
        out[name] = {"help": helps.get(name), "description": sp.description,
                     "formatter": sp.formatter_class.__name__, "options": opts}
    return out


def differences(want: dict, got: dict, path: str = "") -> list[str]:
    """Human-readable paths where two surfaces differ (missing / extra / changed)."""
    if not (isinstance(want, dict) and isinstance(got, dict)):
        return [] if want == got else [f"{path}: {want!r} -> {got!r}"]
    out = [f"{path}/{k}: missing" for k in want.keys() - got.keys()]
    out += [f"{path}/{k}: new (not in the snapshot)" for k in got.keys() - want.keys()]
    for k in sorted(want.keys() & got.keys()):
        out += differences(want[k], got[k], f"{path}/{k}")
    return sorted(out)


def current_surface() -> dict:
    from m3_trt.cli.main import build_parser

    return surface(build_parser())


def test_cli_surface_matches_the_snapshot(monkeypatch):
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    diff = differences(json.loads(SNAPSHOT.read_text()), current_surface())
    assert not diff, "the m3-trt command line changed (see this file's docstring to update):\n" + "\n".join(diff)


def test_snapshot_check_catches_a_changed_default_flag_and_choice(monkeypatch):
    """Negative control: the comparison names a changed default, a renamed flag and a dropped choice."""
    monkeypatch.delenv(ADMIN_ENV, raising=False)
    want = json.loads(SNAPSHOT.read_text())
    got = json.loads(json.dumps(want))
    got["build-engine"]["options"]["--target"]["default"] = "cuda"
    got["export"]["options"]["--max-seq-len2"] = got["export"]["options"].pop("--max-seq-len")
    got["compare"]["options"]["--backend"]["choices"].remove("torch")
    assert differences(want, got) == [
        "/build-engine/options/--target/default: 'cpu' -> 'cuda'",
        "/compare/options/--backend/choices: ['torch', 'transformers', 'onnxruntime', 'sharded', 'triton'] -> "
        "['transformers', 'onnxruntime', 'sharded', 'triton']",
        "/export/options/--max-seq-len2: new (not in the snapshot)",
        "/export/options/--max-seq-len: missing",
    ]


def test_env_default_is_read_when_the_parser_is_built(monkeypatch):
    from m3_trt.cli.main import build_parser

    monkeypatch.setenv(ADMIN_ENV, "k3y")
    assert build_parser().parse_args(["serve", "repo"]).admin_key == "k3y"
    monkeypatch.delenv(ADMIN_ENV)
    assert build_parser().parse_args(["serve", "repo"]).admin_key is None


def test_parsed_arguments_become_the_command_options():
    """argv → the command's dataclass, field by field (what the command function receives)."""
    from m3_trt.build.cli import BuildEngineOptions
    from m3_trt.cli.main import build_parser
    from m3_trt.serving.cli import ClientOptions

    a = build_parser().parse_args(["build-engine", "ck", "--set", "tp=2", "--set", "kv_cache_dtype=fp8",
                                   "--no-progress", "--workers", "3", "--out", "o"])
    assert from_args(BuildEngineOptions, a) == BuildEngineOptions(
        ckpt=Path("ck"), out=Path("o"), sets=["tp=2", "kv_cache_dtype=fp8"], no_progress=True, workers=3)
    a = build_parser().parse_args(["client", "--prompt", "hi", "--image", "a.png", "--image", "b.png",
                                   "--temperature", "0.5"])
    assert from_args(ClientOptions, a) == ClientOptions(prompt="hi", image=[Path("a.png"), Path("b.png")],
                                                        temperature=0.5)


# -- m3_trt.options: the dataclass → argparse rules ----------------------------------------------

@dataclass(frozen=True, kw_only=True)
class _Demo:
    src: Path = field(metadata=opt(help="input"))
    out: Path | None = field(default=None, metadata=opt("--out"))
    name: str = field(metadata=opt("--name", choices=("a", "b")))
    n: int = field(default=3, metadata=opt("--n", metavar="N"))
    tags: list[str] = field(default_factory=list, metadata=opt("--tag"))
    fast: bool = field(default=False, metadata=opt("--fast"))
    key: str | None = field(default=None, metadata=opt("--key", env="M3_TRT_TEST_OPTIONS_KEY"))


def _parser(cls):
    p = argparse.ArgumentParser(prog="t")
    ran = []
    add_command(p.add_subparsers(dest="c"), "x", cls, ran.append)
    return p, ran


def test_options_dataclass_to_argparse(monkeypatch):
    monkeypatch.setenv("M3_TRT_TEST_OPTIONS_KEY", "from-env")
    p, ran = _parser(_Demo)
    a = p.parse_args(["x", "in", "--name", "b", "--tag", "t1", "--tag", "t2", "--fast", "--n", "5"])
    a.fn(a)
    assert ran == [_Demo(src=Path("in"), name="b", n=5, tags=["t1", "t2"], fast=True, key="from-env")]
    s = surface(p)["x"]["options"]
    assert s["--name"]["required"] and not s["--out"]["required"] and s["src"]["required"]
    assert (s["--fast"]["action"], s["--tag"]["action"], s["--n"]["metavar"]) == ("_StoreTrueAction", "_AppendAction",
                                                                                  "N")
    assert (s["--out"]["type"], s["--n"]["type"], s["--name"]["type"]) == ("Path", "int", None)
    # negative controls: argparse enforces what the fields declare
    for bad in (["x", "in"], ["x", "in", "--name", "c"], ["x", "in", "--name", "a", "--n", "five"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)


def test_options_refuse_what_they_cannot_express():
    @dataclass(frozen=True)
    class NoMeta:
        x: int = 1

    @dataclass(frozen=True)
    class TrueFlag:
        on: bool = field(default=True, metadata=opt("--on"))

    @dataclass(frozen=True)
    class Union2:
        v: int | str = field(default=1, metadata=opt("--v"))

    for cls, msg in ((NoMeta, "field 'x' has no metadata=opt"), (TrueFlag, "'on': a bool option is a store_true"),
                     (Union2, "'v': only 'T | None' unions")):
        with pytest.raises(TypeError, match=msg):
            _parser(cls)
    with pytest.raises(ValueError, match="flag 'out' must start with '-'"):
        opt("out")


# -- --help without the optional libraries ----------------------------------------------------------

HELP_SCRIPT = """
import sys
for name in {optional!r}:
    sys.modules[name] = None  # `import name` now raises ImportError
try:
    import onnxruntime
except ImportError:
    print("blocked")
from m3_trt.cli.main import build_parser, main
import argparse
parser = build_parser()
names = list(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)
for argv in [["--help"]] + [[n, "--help"] for n in names]:
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print("commands", len(names))
"""


def test_help_works_without_optional_libraries():
    r = subprocess.run([sys.executable, "-c", HELP_SCRIPT.format(optional=OPTIONAL)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("blocked\n")  # control: the block holds in that process
    assert "usage: m3-trt [-h]" in r.stdout and "usage: m3-trt build-engine" in r.stdout
    assert f"commands {len(json.loads(SNAPSHOT.read_text()))}" in r.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    import os

    os.environ.pop(ADMIN_ENV, None)
    SNAPSHOT.write_text(json.dumps(current_surface(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SNAPSHOT}")

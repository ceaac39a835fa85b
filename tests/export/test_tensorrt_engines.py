"""TensorRT-RTX (CPU, no GPU) parses and builds every exported component into a serialized engine.

``plugins=none``: standard ops only. ``plugins=m3``: the m3 nodes resolve to our IPluginV3
creators (registered in the build subprocess) and become PLUGIN_V3 layers. Engines cannot be
*run* here (no CUDA driver), so outputs are not compared; docs/tensorrt_rtx.md has the limits.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trt


@pytest.mark.parametrize("mode", ["none", "m3"], ids=["plugins-none", "plugins-m3"])
def test_every_component_builds(tiny_export, mode):
    from m3_trt.export.tensorrt import trt_available, trt_unavailable_reason
    from m3_trt.export.tensorrt_build import build_engines

    if not trt_available():
        pytest.skip(trt_unavailable_reason())
    out = tiny_export(mode)
    reports = build_engines(out, progress=None)
    manifest = json.loads((out / "manifest.json").read_text())
    expected = {"embedding", "head", "vision_encoder", "projector"} | {f"layer_{i}" for i in range(4)}
    assert set(reports) == expected
    failed = {k: r["error"] for k, r in reports.items() if not r["ok"]}
    assert not failed, failed
    for name, r in reports.items():
        assert r["engine_bytes"] > 0 and (out / "engines" / f"{name}.plan").stat().st_size == r["engine_bytes"]
    plugin_layers = {k: r["layer_types"].get("PLUGIN_V3", 0) for k, r in reports.items()}
    if mode == "m3":
        # sparse-moe: indexer + attention + MoE; sparse-dense: indexer + attention; full-moe: MoE
        assert (plugin_layers["layer_1"], plugin_layers["layer_2"], plugin_layers["layer_3"]) == (3, 2, 1)
    else:
        assert not any(plugin_layers.values())
    # engine IO = the ONNX graph's IO
    for comp in manifest["components"]:
        name = "layer_0" if comp["name"] == "decoder_full_dense" else comp["name"]
        if name in reports:
            assert [t["name"] for t in reports[name]["inputs"]] == [i["name"] for i in comp["inputs"]]

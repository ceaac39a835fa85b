"""Export one decoder layer of the full-size MiniMax-M3-VL configuration to ONNX on this machine.

Hidden 6144, 64/4 heads, head_dim 128, a sparse-attention + MoE layer (128 experts, top-4,
intermediate 3072, shared expert 3072), random bf16 weights (~14.8 GB), plugin nodes (``m3``),
static cache length ``--max-seq-len``. Records wall time per phase, the peak RSS of the process
and the file sizes, and checks the written weight file byte for byte against the tensors it came
from (sampled rows). Results: ``benchmarks/results/export_full_layer-<host>.json``.

    .venv/bin/python benchmarks/export_full_layer.py [--max-seq-len 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import socket
import tempfile
import time
import types
from dataclasses import replace
from pathlib import Path

import torch


def rss_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    from m3_trt.model.config import full_size
    from m3_trt.export.onnx import exporter as E
    from m3_trt.export.onnx.components import DecoderLayerComponent
    from m3_trt.model.modeling import DecoderLayer

    ap = argparse.ArgumentParser()
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--experts", type=int, default=128, help="fewer experts for a quick dry run")
    args = ap.parse_args()

    t = replace(full_size().text, num_hidden_layers=1, layer_types=("minimax_m3_sparse",), mlp_layer_types=("sparse",),
                num_local_experts=args.experts)
    phases = {}
    t0 = time.perf_counter()
    with torch.device("meta"):
        layer = DecoderLayer(t, 0)
    layer = layer.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() >= 2:
                for chunk in p.view(-1, p.shape[-1]).split(4096):  # bounded temporaries
                    chunk.normal_(0, p.shape[-1] ** -0.5, generator=g)
            else:
                p.normal_(0, 0.1, generator=g)
        layer.mlp.gate.e_score_correction_bias.zero_()
    n_params = sum(p.numel() for p in layer.parameters())
    phases["init_s"] = time.perf_counter() - t0
    shim = types.SimpleNamespace(config=types.SimpleNamespace(text=t),
                                 model=types.SimpleNamespace(language_model=types.SimpleNamespace(layers=[layer])))
    comp = DecoderLayerComponent(shim, 0).eval()
    for m in comp.modules():
        if hasattr(m, "kernels"):
            m.kernels = "custom_op"
    opts = E.ExportOptions(dtype="bf16", plugins="m3", max_seq_len=args.max_seq_len, max_batch=8)
    T, G, D, H = opts.max_seq_len, t.num_key_value_heads, t.head_dim, t.hidden_size
    dt = torch.bfloat16
    spec = E.Spec("decoder_sparse_moe", comp,
                  [("hidden", (2, 5, H), dt), ("position_ids", (2, 5), torch.int64), ("k_cache", (2, G, T, D), dt),
                   ("v_cache", (2, G, T, D), dt), ("idx_cache", (2, T, t.index_head_dim), dt)],
                  ["hidden_out", "k_cache_out", "v_cache_out", "idx_cache_out", "block_idx"],
                  {"hidden": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
                   "k_cache": {0: "batch"}, "v_cache": {0: "batch"}, "idx_cache": {0: "batch"}}, [0])
    out = args.out or Path(tempfile.mkdtemp(prefix="m3_full_layer_"))
    out.mkdir(parents=True, exist_ok=True)
    cfg = types.SimpleNamespace(text=t)
    t1 = time.perf_counter()
    layout = E._export_one(spec, out / "decoder_sparse_moe.onnx", cfg, "m3", "layer_0.data")
    phases["export_s"] = time.perf_counter() - t1
    # spot-check the weight file against the tensors (first and last rows of every parameter)
    state = dict(comp.state_dict())
    checked = 0
    with open(out / "layer_0.data", "rb") as f:
        for name, (offset, length) in layout.items():
            buf = E._tensor_buffer(state[name])
            row = buf.nbytes // max(1, state[name].shape[0]) if state[name].dim() else buf.nbytes
            for start in (0, buf.nbytes - row):
                f.seek(offset + start)
                assert f.read(row) == bytes(buf[start:start + row]), f"{name}: weight bytes differ"
            checked += 1
    import onnx

    model = onnx.load(str(out / "decoder_sparse_moe.onnx"), load_external_data=False)
    result = {
        "what": "one full-size sparse-attention + MoE decoder layer exported to ONNX (bf16, m3 plugin nodes)",
        "host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
        "cores": __import__("os").cpu_count(), "memory_gib": round(__import__("os").sysconf("SC_PAGE_SIZE")
                                                                   * __import__("os").sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_avg": __import__("os").getloadavg(), "torch": torch.__version__,
        "params": n_params, "weight_bytes": sum(length for _, length in layout.values()),
        "max_seq_len": opts.max_seq_len, "nodes": len(model.graph.node),
        "custom_ops": sorted({n.op_type for n in model.graph.node if n.domain == "m3"}),
        "phases_s": {k: round(v, 1) for k, v in phases.items()}, "peak_rss_gib": round(rss_peak_gib(), 2),
        "weights_checked": checked,
        "graph_bytes": (out / "decoder_sparse_moe.onnx").stat().st_size,
        "data_bytes": (out / "layer_0.data").stat().st_size,
    }
    print(json.dumps(result, indent=2))
    result["experts"] = args.experts
    if args.experts == 128:
        dst = Path(__file__).parent / "results" / f"export_full_layer-{socket.gethostname()}.json"
        dst.write_text(json.dumps(result, indent=2) + "\n")
    if args.out is None:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()

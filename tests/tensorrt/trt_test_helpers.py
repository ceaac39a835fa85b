"""Helpers for tests/tensorrt: ONNX IO as TensorRT names it, tiny torch modules to export."""

from __future__ import annotations

# ONNX elem_type → TensorRT DataType name
ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 16: "BF16", 6: "INT32", 7: "INT64", 9: "BOOL"}


def onnx_io(path) -> tuple[list, list]:
    """([(name, shape with -1 for symbolic dims, TRT dtype name)] for inputs, same for outputs)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def rows(vis):
        out = []
        for v in vis:
            if v.name in init:
                continue
            tt = v.type.tensor_type
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            out.append((v.name, shape, ONNX_TO_TRT[tt.elem_type]))
        return out

    return rows(m.graph.input), rows(m.graph.output)


def report_io(report) -> tuple[list, list]:
    return ([(t.name, tuple(t.shape), t.dtype) for t in report.inputs],
            [(t.name, tuple(t.shape), t.dtype) for t in report.outputs])


# -- tiny torch modules in M3's shapes of computation (fixed seed weights) ---------------------
D = 64  # hidden


def _modules():
    import torch
    from torch import nn

    class RMSNorm(nn.Module):
        """Gemma RMSNorm, fp32 inside: x * rsqrt(mean(x²) + eps) * (1 + w)."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(D) * 0.1)

        def forward(self, x):
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.w.float())
            return y.to(x.dtype)

    class SwiGLUMLP(nn.Module):
        """Linear [gate; up] halves → SwiGLU-OAI (alpha 1.702, limit 7) → down."""

        def __init__(self):
            super().__init__()
            self.gate_up = nn.Linear(D, 2 * 96, bias=False)
            self.down = nn.Linear(96, D, bias=False)

        def forward(self, x):
            g, u = self.gate_up(x).chunk(2, -1)
            g = g.clamp(max=7.0)
            return self.down(g * torch.sigmoid(1.702 * g) * (u.clamp(-7.0, 7.0) + 1))

    class CausalAttention(nn.Module):
        """4 heads, additive causal mask (0 / -inf) in the input dtype."""

        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            B, S, _ = x.shape
            H, d = 4, D // 4
            q, k, v = (p(x).view(B, S, H, d).transpose(1, 2) for p in (self.q, self.k, self.v))
            i = torch.arange(S)
            mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf")).to(x.dtype)
            a = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + mask, -1)
            return (a @ v).transpose(1, 2).reshape(B, S, D)

    class KVWrite(nn.Module):
        """Scatter new K rows into a static cache at per-batch start positions, gather them back."""

        def forward(self, cache, new, pos):
            B, S, Dd = new.shape
            idx = (pos[:, None] + torch.arange(S)[None, :])[:, :, None].expand(B, S, Dd)
            c = cache.scatter(1, idx, new)
            return c, c.gather(1, idx)

    class TopK(nn.Module):
        def forward(self, x):
            return torch.topk(x, 4, dim=-1)

    class PatchConv3d(nn.Module):
        """Vision patch embed: Conv3d kernel = stride = (2, 14, 14)."""

        def __init__(self):
            super().__init__()
            self.c = nn.Conv3d(3, 32, (2, 14, 14), stride=(2, 14, 14), bias=False)

        def forward(self, x):
            return self.c(x).flatten(1)

    return dict(rmsnorm=RMSNorm, mlp=SwiGLUMLP, attention=CausalAttention, kv_write=KVWrite, topk=TopK, conv3d=PatchConv3d)


# name → (example args builder, dynamic dims spec, TensorRT profiles)
def _cases():
    import torch

    Dim = torch.export.Dim
    B, S = Dim("batch", min=1, max=8), Dim("seq", min=1, max=512)
    x_prof = {"x": ((1, 1, D), (2, 16, D), (4, 64, D))}
    return {
        "rmsnorm": (lambda: (torch.randn(2, 8, D),), {"x": {0: B, 1: S}}, x_prof),
        "mlp": (lambda: (torch.randn(2, 8, D),), {"x": {0: B, 1: S}}, x_prof),
        "attention": (lambda: (torch.randn(2, 8, D),), {"x": {0: B, 1: S}}, x_prof),
        "kv_write": (
            lambda: (torch.zeros(2, 32, D), torch.randn(2, 3, D), torch.tensor([0, 5])),
            {"cache": {0: B}, "new": {0: B, 1: Dim("new", min=1, max=16)}, "pos": {0: B}},
            {"cache": ((1, 32, D), (2, 32, D), (4, 32, D)), "new": ((1, 1, D), (2, 4, D), (4, 16, D)),
             "pos": ((1,), (2,), (4,))},
        ),
        "topk": (lambda: (torch.randn(2, 8, 32),), {"x": {0: B, 1: S}},
                 {"x": ((1, 1, 32), (2, 16, 32), (4, 64, 32))}),
        "conv3d": (lambda: (torch.randn(4, 3, 2, 14, 14),), {"x": {0: Dim("patches", min=1, max=4096)}},
                   {"x": ((1, 3, 2, 14, 14), (64, 3, 2, 14, 14), (256, 3, 2, 14, 14))}),
    }


def export_case(name: str, dtype: str, out_dir) -> tuple:
    """Export one tiny module to ONNX (dynamo, opset 20, external data); returns (path, profiles)."""
    import io
    import contextlib
    import warnings

    import torch

    torch.manual_seed(0)
    module = _modules()[name]().eval()
    make_args, dyn, profiles = _cases()[name]
    args = make_args()
    tdt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    module = module.to(tdt)
    args = tuple(a.to(tdt) if a.is_floating_point() else a for a in args)
    path = out_dir / f"{name}-{dtype}.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=True, opset_version=20, dynamic_shapes=dyn,
                          external_data=True)
    return path, profiles


# -- single-node graphs for the m3 plugin ops ----------------------------------------------------
# op → (inputs: name → (ONNX elem type, dims with 'B'/'S'/'T'/'N' symbolic), initializers, attrs,
#       profiles, expected output (dims with -1 for dynamic, TRT dtype))
def plugin_cases():
    import numpy as np

    F, I32, I64 = 1, 6, 7
    rng = np.random.default_rng(0)
    E, Dm, Ff = 4, 64, 32
    return {
        "indexer_topk": (
            {"q_BHSD": (F, ["B", 4, "S", 32]), "k_BTD": (F, ["B", "T", 32]), "q_pos_BS": (I64, ["B", "S"])},
            {},
            {"block_size": 16, "topk": 4, "local_blocks": 1},
            {"q_BHSD": ((1, 4, 1, 32), (1, 4, 8, 32), (2, 4, 16, 32)), "k_BTD": ((1, 1, 32), (1, 64, 32), (2, 128, 32)),
             "q_pos_BS": ((1, 1), (1, 8), (2, 16))},
            ((-1, 4, -1, -1), "INT32"),  # K = min(topk, ceil(T / block_size)): dynamic with T
        ),
        "block_sparse_attention": (
            {"q_BHSD": (F, ["B", 8, "S", 32]), "k_BGTD": (F, ["B", 2, "T", 32]), "v_BGTD": (F, ["B", 2, "T", 32]),
             "block_idx_BGSK": (I32, ["B", 2, "S", 4]), "q_pos_BS": (I64, ["B", "S"])},
            {},
            {"block_size": 16, "scale": 32**-0.5},
            {"q_BHSD": ((1, 8, 1, 32), (1, 8, 8, 32), (2, 8, 16, 32)), "k_BGTD": ((1, 2, 1, 32), (1, 2, 64, 32), (2, 2, 128, 32)),
             "v_BGTD": ((1, 2, 1, 32), (1, 2, 64, 32), (2, 2, 128, 32)),
             "block_idx_BGSK": ((1, 2, 1, 4), (1, 2, 8, 4), (2, 2, 16, 4)), "q_pos_BS": ((1, 1), (1, 8), (2, 16))},
            ((-1, 8, -1, 32), "FLOAT"),
        ),
        "swiglu_moe": (
            {"x_TD": (F, ["N", Dm])},
            {"router_w_ED": rng.standard_normal((E, Dm), np.float32), "e_bias_E": np.zeros(E, np.float32),
             "w13_EFD": rng.standard_normal((E, 2 * Ff, Dm), np.float32), "w2_EDF": rng.standard_normal((E, Dm, Ff), np.float32),
             "w13s_FD": rng.standard_normal((2 * Ff, Dm), np.float32), "w2s_DF": rng.standard_normal((Dm, Ff), np.float32)},
            {"top_k": 2, "routed_scaling": 2.0, "alpha": 1.702, "limit": 7.0},
            {"x_TD": ((1, Dm), (8, Dm), (64, Dm))},
            ((-1, Dm), "FLOAT"),
        ),
    }


def plugin_onnx(op: str, path) -> None:
    """Write a one-node graph ``m3::<op>`` with TensorRT's plugin_version / plugin_namespace attributes."""
    import onnx
    from onnx import helper, numpy_helper

    from m3_trt.export.tensorrt.plugins import SPECS

    spec = SPECS[op]
    inputs, inits, attrs, _profiles, _out = plugin_cases()[op]
    order = [n for n, _ in spec.inputs]
    out_type = {"int32": 6, "int64": 7}.get(spec.outputs[0][1], 1)
    node = helper.make_node(spec.name, order, [spec.outputs[0][0]], name=f"{op}_0", domain="m3",
                            plugin_version=spec.version, plugin_namespace=spec.namespace, **attrs)
    graph = helper.make_graph(
        [node], op,
        [helper.make_tensor_value_info(n, t, dims) for n, (t, dims) in inputs.items()],
        # TensorRT's parser needs the output's elem type (an untyped output fails to parse);
        # the shape is left out: it comes from the plugin's get_output_shapes
        [helper.make_tensor_value_info(spec.outputs[0][0], out_type, None)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("m3", 1)])
    onnx.save(model, str(path))

"""The custom ops survive ``torch.export`` as one node each and the exported program computes
what eager does."""

from __future__ import annotations

import pytest
import torch
from plugin_helpers import fresh_seed
from tolerances import TOLERANCES, rel_err

from m3_trt.plugins.block_sparse_attention import block_sparse_attention
from m3_trt.plugins.indexer_topk import indexer_topk
from m3_trt.plugins.swiglu_moe import swiglu_moe


class SparseAttn(torch.nn.Module):
    """Indexer selection feeding block-sparse attention, as in one M3 sparse layer."""

    def forward(self, iq, ik, q, k, v, pos):
        idx = indexer_topk(iq, ik, pos, block_size=16, topk=3, local_blocks=1, impl="torch")
        return block_sparse_attention(q, k, v, idx, pos, block_size=16, scale=0.125, impl="torch")


class Moe(torch.nn.Module):
    """``experts``: the expert range this module holds, ``(offset, count)``; None = all 8."""

    def __init__(self, E=8, D=32, F=16, experts=None):
        super().__init__()
        self.range = dict(expert_offset=experts[0], expert_count=experts[1]) if experts else {}
        sl = slice(experts[0], experts[0] + experts[1]) if experts else slice(None)
        self.router = torch.nn.Parameter(torch.randn(E, D))
        self.bias = torch.nn.Parameter(torch.randn(E) * 0.1)
        self.w13 = torch.nn.Parameter((torch.randn(E, 2 * F, D) * 0.3)[sl])
        self.w2 = torch.nn.Parameter((torch.randn(E, D, F) * 0.3)[sl])
        self.w13s = torch.nn.Parameter(torch.randn(2 * F, D) * 0.3)
        self.w2s = torch.nn.Parameter(torch.randn(D, F) * 0.3)

    def forward(self, x):
        return swiglu_moe(x, self.router, self.bias, self.w13, self.w2, self.w13s, self.w2s,
                          top_k=2, routed_scaling=2.0, alpha=1.702, limit=7.0, **self.range, impl="torch")


def _op_nodes(ep):
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and str(n.target).startswith("m3.")]


def _check(module, inputs, expected_ops, seed):
    ep = torch.export.export(module, inputs)
    assert _op_nodes(ep) == expected_ops, f"seed={seed}: graph ops {_op_nodes(ep)}"
    err = rel_err(ep.module()(*inputs), module(*inputs))
    assert err <= TOLERANCES[("kernel", "fp32")], f"seed={seed}: exported != eager ({err:.3e})"


@pytest.mark.parametrize("S", [40, 1], ids=["S40-prefill", "S1-decode"])
def test_sparse_attention_exports_as_two_nodes(S):
    seed = fresh_seed()
    B, G, Hq, T, D = 1, 2, 4, 64, 32
    pos = torch.arange(S)[None] + (T - S - 3)
    inputs = (torch.randn(B, G, S, 16), torch.randn(B, T, 16), torch.randn(B, Hq, S, D),
              torch.randn(B, G, T, D), torch.randn(B, G, T, D), pos)
    _check(SparseAttn(), inputs, ["m3.indexer_topk.default", "m3.block_sparse_attention.default"], seed)


@pytest.mark.parametrize("experts", [None, (4, 4)], ids=["E8-all", "E8-range-4+4"])
def test_moe_exports_as_one_node(experts):
    seed = fresh_seed()
    _check(Moe(experts=experts), (torch.randn(12, 32),), ["m3.swiglu_moe.default"], seed)


def test_sparse_attention_exports_with_dynamic_lengths():
    """Dynamic S and T; T's lower bound must be >= topk * block_size so the output width
    ``min(topk, ceil(T / block))`` is the constant ``topk`` (a static cache always is)."""
    seed = fresh_seed()
    B, G, Hq, T, D, S = 1, 2, 4, 64, 32, 40
    s, t = torch.export.Dim("S", max=4096), torch.export.Dim("T", min=48, max=65536)

    def make(S, T):
        pos = torch.arange(S)[None] + (T - S - 3)
        return (torch.randn(B, G, S, 16), torch.randn(B, T, 16), torch.randn(B, Hq, S, D),
                torch.randn(B, G, T, D), torch.randn(B, G, T, D), pos)

    ep = torch.export.export(SparseAttn(), make(S, T),
                             dynamic_shapes=({2: s}, {1: t}, {2: s}, {2: t}, {2: t}, {1: s}))
    other = make(7, 80)
    err = rel_err(ep.module()(*other), SparseAttn()(*other))
    assert err <= TOLERANCES[("kernel", "fp32")], f"seed={seed}: exported != eager at S=7, T=80 ({err:.3e})"

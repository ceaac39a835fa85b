"""Route (b): TensorRT networks for the M3 components written layer by layer from a loaded model.

Legend: B batch, S new tokens, T cache slots (== positions, ``max_seq_len``), Dm hidden, Hq/G
query/KV heads, D head dim, R rotated dims, Hi/Di indexer heads (== G) / head dim, N key blocks
of ``bs`` slots, K selected blocks, E experts, F expert intermediate.

Each component gets the IO of its ONNX counterpart (``export/onnx``; names, dtypes, dynamic
batch/seq axes, static cache length):

* ``embedding``: ``input_ids [B,S] int64 -> inputs_embeds [B,S,Dm]`` (one gather).
* ``layer_<i>``: ``hidden [B,S,Dm], position_ids [B,S] int64, k_cache/v_cache [B,G,T,D]
  [, idx_cache [B,1,T,Di]] -> hidden_out, k_cache_out, v_cache_out [, idx_cache_out [B,1,T,Di],
  block_idx [B,G,S,K] int32]``. The one IO change: the ONNX ``idx_cache`` is ``[B,T,Di]``;
  ``add_kv_cache_update`` needs a 4-D cache that is itself a network input ("The cache tensor
  must be a network input"), so route (b) takes it with a unit head axis (same bytes, same
  buffer; ``DOCUMENTED_IO_CHANGES``).
* ``head``: ``hidden -> logits [B,S,V], final_norm [B,S,Dm]`` (the final-norm hidden state, named
  as in the ONNX head so the engines of both routes are interchangeable).

Native layers used: ``add_attention_v2`` with a bool keep-mask (token-causal over the static
cache; on sparse layers also the selected blocks), ``add_rotary_embedding`` (partial, rotate-half),
``add_kv_cache_update`` (LINEAR, int32 start slot), ``add_topk``. Standard layers: Gemma RMSNorm
(``add_normalization_v2`` is LayerNorm), SwiGLU-OAI, and the MoE as a dense combine over all
experts (``add_moe`` never builds on TensorRT-RTX 1.7.1; same formulation as
``plugins/swiglu_moe/portable.py``, with the combine weight applied before the down projection so
all experts' down projections are one GEMM over ``[B,S,E·F]``). The sparse layers' indexer
selection is written with native layers too (scores matmul, causal ``-inf``, block max by a
reshape + reduce, local-block ``+inf``, ``topk``, ascending repack by a second ``topk``) and
turned into the attention mask; no plugin is needed (the network API cannot add plugins anyway).

Where the interface differs from the ONNX route (semantics, not IO): ``add_kv_cache_update``
writes the S new rows at ONE start slot per batch row, ``min(position_ids[b])``, where the ONNX
graph scatters each token at its own position. Both agree when each row's positions are
contiguous (``start_b, start_b+1, …``), which is how prefill and decode call a layer; arbitrary
per-token positions (gaps, reordering) are not supported by route (b). The write also needs
``start_b + S <= T``. ``T`` must be a multiple of ``index_block_size`` on sparse layers (the
block max is a reshape).

Where it is used: ``m3-trt build-engine --set backend=tensorrt --set trt_route=network``
(``m3_trt.export.tensorrt_build.network_route_engines``); builds run in a child process
(``network_build``), and each component's writer is checked against torch on the shadow network
(``network_check``), because the engines cannot run without a GPU.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

PRECISIONS = ("fp32", "fp16", "bf16")


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _trt_dtype(trt, dtype: str):
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(PRECISIONS)}")
    return {"fp32": trt.float32, "fp16": trt.float16, "bf16": trt.bfloat16}[dtype]


# -- blocks shared by the components (w: a LayerWriter over a real or shadow network) --------------

def rope_tables(w, pos_BS, rotary_dim: int, theta: float, dt):
    """cos/sin ``[B, S, R/2]`` in ``dt`` from int64 positions (computed in fp32, like the reference)."""
    trt = w.trt
    inv = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    freqs = w.ew(w.reshape(w.cast(pos_BS, trt.float32), (0, 0, 1)), w.const(inv.reshape(1, 1, -1)), "PROD")
    return w.cast(w.unary(freqs, "COS"), dt), w.cast(w.unary(freqs, "SIN"), dt)


def heads(w, x_BSX, n_heads: int, head_dim: int, norm=None, eps: float = 1e-6):
    """``[B,S,n·d] -> [B,n,S,d]``, with the per-head RMSNorm applied before the transpose."""
    x = w.reshape(x_BSX, (0, 0, n_heads, head_dim))
    if norm is not None:
        x = w.rmsnorm(x, _np(norm.weight), eps)
    return w.transpose(x, (0, 2, 1, 3))


def slot_positions(w, T: int):
    """Key slot numbers ``[1,1,1,T]`` int64 (slot == absolute position)."""
    return w.const(np.arange(T, dtype=np.int64).reshape(1, 1, 1, T))


def causal_keep(w, pos_BS, T: int):
    """Bool ``[B,1,S,T]``: key slot t is visible to the query at position p iff t <= p."""
    q = w.reshape(pos_BS, (0, 1, -1, 1))
    return w.unary(w.ew(slot_positions(w, T), q, "GREATER"), "NOT")


def indexer_block_idx(w, iq_BHSD, ik_B1TD, pos_BS, *, T: int, block_size: int, topk: int, local_blocks: int):
    """The lightning indexer's choice (``plugins/indexer_topk/reference.py``) in native layers.

    Returns ``block_idx [B,Hi,S,K]`` int32: valid ids ascending, -1 padding after them.
    """
    trt = w.trt
    f32 = trt.float32
    N = T // block_size
    scores = w.matmul(w.cast(iq_BHSD, f32), w.cast(ik_B1TD, f32), transpose_b=True)       # [B,Hi,S,T]
    q_pos = w.reshape(pos_BS, (0, 1, -1, 1))
    future = w.ew(slot_positions(w, T), q_pos, "GREATER")
    scores = w.select(future, w.scalar(-np.inf, scores), scores)
    blocks = w.reduce(w.reshape(scores, (0, 0, 0, N, block_size)), "MAX", 4)                # [B,Hi,S,N]
    if local_blocks > 0:
        q_blk = w.ew(q_pos, w.const(np.full((1, 1, 1, 1), block_size, np.int64)), "FLOOR_DIV")
        ids = w.const(np.arange(N, dtype=np.int64).reshape(1, 1, 1, N))
        zero = w.const(np.zeros((1, 1, 1, 1), np.int64))
        local = None
        for j in range(local_blocks):
            lj = w.ew(w.ew(q_blk, w.const(np.full((1, 1, 1, 1), j, np.int64)), "SUB"), zero, "MAX")
            hit = w.ew(ids, lj, "EQUAL")
            local = hit if local is None else w.ew(local, hit, "OR")
        blocks = w.select(local, w.scalar(np.inf, blocks), blocks)
    k = min(topk, N)
    vals, idx = w.topk(blocks, k)
    invalid = w.ew(vals, w.scalar(-np.inf, vals), "EQUAL")
    # ascending repack: invalid ids become a key above every block id, then the k smallest in order
    big = float(N + 1)
    key = w.select(invalid, w.scalar(big, vals), w.cast(idx, f32))
    key, _ = w.topk_min(key, k)
    key = w.cast(key, trt.int32)
    return w.select(w.ew(key, w.const(np.full((1, 1, 1, 1), N + 1, np.int32)), "EQUAL"),
                    w.const(np.full((1, 1, 1, 1), -1, np.int32)), key)


def block_keep(w, block_idx_BGSK, causal_B1ST, *, T: int, block_size: int, q_heads: int):
    """Bool ``[B,Hq,S,T]`` keep-mask: slot in a selected block of the query's KV group and causal."""
    trt = w.trt
    G, K = block_idx_BGSK.shape[1], block_idx_BGSK.shape[3]
    slot_block = w.const((np.arange(T, dtype=np.int32) // block_size).reshape(1, 1, 1, 1, T))
    hit = w.ew(w.reshape(block_idx_BGSK, (0, 0, 0, K, 1)), slot_block, "EQUAL")            # [B,G,S,K,T]
    sel = w.reduce(w.cast(hit, trt.float32), "MAX", 3)                                       # [B,G,S,T]
    keep = w.ew(sel, w.cast(causal_B1ST, trt.float32), "PROD")
    keep = w.reshape(keep, (0, 0, 1, -1, T))                                                 # [B,G,1,S,T]
    keep = w.ew(keep, w.const(np.ones((1, 1, q_heads // G, 1, 1), np.float32)), "PROD")     # query heads of group g
    keep = w.reshape(keep, (0, q_heads, -1, T))
    return w.ew(keep, w.scalar(0.5, keep), "GREATER")


def moe_dense(w, x_BSD, moe, cfg):
    """SwiGLU-OAI MoE with sigmoid routing, every expert on every token (dense combine)."""
    trt = w.trt
    f32 = trt.float32
    E, F, K = cfg.num_local_experts, cfg.intermediate_size, cfg.num_experts_per_tok
    probs = w.sigmoid(w.cast(w.linear(x_BSD, _np(moe.gate.weight)), f32))                  # [B,S,E]
    bias = w.const(_np(moe.gate.e_score_correction_bias).reshape(1, 1, E))
    _, chosen = w.topk(w.ew(probs, bias, "SUM"), K)                                         # [B,S,K] int32
    onehot = w.ew(w.reshape(chosen, (0, 0, K, 1)), w.const(np.arange(E, dtype=np.int32).reshape(1, 1, 1, E)), "EQUAL")
    picked = w.ew(probs, w.reduce(w.cast(onehot, f32), "MAX", 2), "PROD")                  # [B,S,E]
    combine = w.ew(picked, w.reduce(picked, "SUM", 2, keepdims=True), "DIV")
    w13 = _np(moe.experts.gate_up_proj)                                                      # [E,2F,D]
    gate = w.linear(x_BSD, w13[:, :F].reshape(E * F, -1))
    up = w.linear(x_BSD, w13[:, F:].reshape(E * F, -1))
    h = w.reshape(w.swiglu_oai(gate, up, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit), (0, 0, E, F))
    h = w.ew(h, w.reshape(w.cast(combine, x_BSD.dtype), (0, 0, E, 1)), "PROD")
    w2 = _np(moe.experts.down_proj)                                                          # [E,D,F]
    y = w.linear(w.reshape(h, (0, 0, E * F)), w2.transpose(1, 0, 2).reshape(w2.shape[1], E * F))
    y = w.ew(y, w.scalar(cfg.routed_scaling_factor, y), "PROD")
    sh = moe.shared_experts
    shared = w.swiglu_mlp(x_BSD, _np(sh.gate_up_proj.weight), _np(sh.down_proj.weight),
                          alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    return w.ew(y, shared, "SUM")


# -- components ------------------------------------------------------------------------------------

def write_embedding(w, model, dtype: str) -> None:
    table = _np(model.model.language_model.embed_tokens.weight)
    ids = w.input("input_ids", w.trt.int64, (-1, -1))
    w.output(w.gather(w.const(table, _trt_dtype(w.trt, dtype)), ids, 0), "inputs_embeds")


def write_head(w, model, dtype: str) -> None:
    lm = model.model.language_model
    x = w.input("hidden", _trt_dtype(w.trt, dtype), (-1, -1, model.config.text.hidden_size))
    normed = w.rmsnorm(x, _np(lm.norm.weight), lm.norm.eps)
    w.output(w.linear(normed, _np(model.lm_head.weight)), "logits")
    w.output(w.net.add_identity(normed).get_output(0), "final_norm")


def write_decoder_layer(w, model, index: int, dtype: str, max_seq_len: int, *, num_heads: int | None = None) -> None:
    """Layer ``index`` with its caches. ``num_heads`` overrides the query head count (negative control)."""
    c = model.config.text
    layer = model.model.language_model.layers[index]
    attn = layer.self_attn
    trt, dt = w.trt, _trt_dtype(w.trt, dtype)
    T, Dm, G, D = max_seq_len, c.hidden_size, c.num_key_value_heads, c.head_dim
    Hq = num_heads or c.num_attention_heads
    sparse = attn.indexer is not None
    if sparse and T % c.index_block_size:
        raise ValueError(f"max_seq_len={T} must be a multiple of index_block_size={c.index_block_size} "
                         "(route (b) takes the block max with a reshape)")
    if sparse and c.index_head_dim < c.rotary_dim:
        raise ValueError(f"index_head_dim={c.index_head_dim} < rotary_dim={c.rotary_dim}: the sliced "
                         "RoPE table is not a rotate-half RoPE the native layer can express")
    for proj, n in ((attn.q_proj, Hq), (attn.k_proj, G), (attn.v_proj, G)):
        # TensorRT only says "Could not get tensor shape" for an impossible reshape: name the cause
        if proj.weight.shape[0] != n * D:
            raise ValueError(f"layer {index}: projection has {proj.weight.shape[0]} output rows, but "
                             f"{n} heads x head_dim {D} = {n * D}")
    x = w.input("hidden", dt, (-1, -1, Dm))
    pos = w.input("position_ids", trt.int64, (-1, -1))
    k_cache = w.input("k_cache", dt, (-1, G, T, D))
    v_cache = w.input("v_cache", dt, (-1, G, T, D))
    # the cache-update layer wants [B, heads, T, D] and its cache must be a network input itself
    # ("The cache tensor must be a network input"), so the idx cache carries a unit head axis
    idx_cache = w.input("idx_cache", dt, (-1, 1, T, c.index_head_dim)) if sparse else None

    cos, sin = rope_tables(w, pos, c.rotary_dim, c.rope_theta, dt)
    h = w.rmsnorm(x, _np(layer.input_layernorm.weight), c.rms_norm_eps)
    q = w.rope(heads(w, w.linear(h, _np(attn.q_proj.weight)), Hq, D, attn.q_norm, c.rms_norm_eps),
               cos, sin, rotary_dim=c.rotary_dim)
    k = w.rope(heads(w, w.linear(h, _np(attn.k_proj.weight)), G, D, attn.k_norm, c.rms_norm_eps),
               cos, sin, rotary_dim=c.rotary_dim)
    v = heads(w, w.linear(h, _np(attn.v_proj.weight)), G, D)
    # one start slot per row (add_kv_cache_update's contract): positions are contiguous per row
    start = w.cast(w.reduce(pos, "MIN", 1), trt.int32)
    k_all = w.kv_cache_update(k_cache, k, start)
    v_all = w.kv_cache_update(v_cache, v, start)
    causal = causal_keep(w, pos, T)
    if sparse:
        ix = attn.indexer
        iq = w.rope(heads(w, w.linear(h, _np(ix.q_proj.weight)), c.index_n_heads, c.index_head_dim, ix.q_norm,
                          c.rms_norm_eps), cos, sin, rotary_dim=c.rotary_dim)
        ik = w.rope(heads(w, w.linear(h, _np(ix.k_proj.weight)), 1, c.index_head_dim, ix.k_norm, c.rms_norm_eps),
                    cos, sin, rotary_dim=c.rotary_dim)                                   # [B,1,S,Di]
        ik_all = w.kv_cache_update(idx_cache, ik, start)                                   # [B,1,T,Di]
        block_idx = indexer_block_idx(w, iq, ik_all, pos, T=T, block_size=c.index_block_size,
                                      topk=c.index_topk_blocks, local_blocks=c.index_local_blocks)
        keep = block_keep(w, block_idx, causal, T=T, block_size=c.index_block_size, q_heads=Hq)
    else:
        keep = causal
    # TensorRT's attention applies no 1/sqrt(d): the query is scaled first (its fused-attention guide)
    q = w.ew(q, w.scalar(D ** -0.5, q), "PROD")
    o = w.attention(q, k_all, v_all, mask=keep)                                          # [B,Hq,S,D]
    o = w.reshape(w.transpose(o, (0, 2, 1, 3)), (0, 0, Hq * D))
    x = w.ew(x, w.linear(o, _np(attn.o_proj.weight)), "SUM")
    h2 = w.rmsnorm(x, _np(layer.post_attention_layernorm.weight), c.rms_norm_eps)
    mlp = layer.mlp
    if hasattr(mlp, "experts"):
        m = moe_dense(w, h2, mlp, c)
    else:
        m = w.swiglu_mlp(h2, _np(mlp.gate_up_proj.weight), _np(mlp.down_proj.weight),
                         alpha=c.swiglu_alpha, limit=c.swiglu_limit)
    w.output(w.ew(x, m, "SUM"), "hidden_out")
    w.output(k_all, "k_cache_out")
    w.output(v_all, "v_cache_out")
    if sparse:
        w.output(ik_all, "idx_cache_out")
        w.output(block_idx, "block_idx")


# -- expected IO, profiles, builds -------------------------------------------------------------------

_MANIFEST_DT = {"float": "FLOAT", "float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
                "bool": "BOOL"}


def manifest_io(entry: dict) -> tuple[list, list]:
    """An ONNX manifest component's IO as ``[(name, shape with -1 for named dims, TRT dtype name)]``."""
    def rows(values):
        return [(v["name"], tuple(d if isinstance(d, int) else -1 for d in v["shape"]), _MANIFEST_DT[v["dtype"]])
                for v in values]
    return rows(entry["inputs"]), rows(entry["outputs"])


# The one IO change route (b) makes, and why: add_kv_cache_update needs a 4-D [B, heads, T, D] cache
# that is itself a network input, so the indexer cache gets a unit head axis (same bytes).
DOCUMENTED_IO_CHANGES = {"idx_cache": 1, "idx_cache_out": 1}   # name -> axis where a 1 is inserted


def expected_io(entry: dict) -> tuple[list, list]:
    """The IO route (b) must have for an ONNX manifest entry: its IO with DOCUMENTED_IO_CHANGES applied."""
    def adjust(rows):
        out = []
        for name, shape, dt in rows:
            if name in DOCUMENTED_IO_CHANGES:
                a = DOCUMENTED_IO_CHANGES[name]
                shape = shape[:a] + (1,) + shape[a:]
            out.append((name, shape, dt))
        return out
    ins, outs = manifest_io(entry)
    return adjust(ins), adjust(outs)


def io_differences(report: dict, entry: dict, *, documented: bool = True) -> list[str]:
    """Differences between a build report's IO and a manifest entry's ([] = same). With
    ``documented`` the entry is first adjusted by DOCUMENTED_IO_CHANGES; without, raw."""
    want_in, want_out = expected_io(entry) if documented else manifest_io(entry)
    diffs = []
    for what, want, got in (("input", want_in, report["inputs"]), ("output", want_out, report["outputs"])):
        got = [(t["name"], tuple(t["shape"]), t["dtype"]) for t in got]
        if got != want:
            diffs.append(f"{what}s: route (b) {got} != expected {want}")
    return diffs


def network_limits(text_cfg, max_seq_len: int, dtype: str) -> list[str]:
    """Why the network route cannot write this model at ``max_seq_len`` / ``dtype`` ([] = it can)."""
    c = text_cfg
    why = []
    if dtype not in PRECISIONS:
        why.append(f"dtype={dtype!r}: the network route writes {', '.join(PRECISIONS)} networks")
    sparse = [i for i in range(c.num_hidden_layers) if c.layer_variant(i).startswith("sparse")]
    if sparse and max_seq_len % c.index_block_size:
        why.append(f"max_seq_len={max_seq_len} must be a multiple of index_block_size={c.index_block_size} "
                   f"(sparse layers {sparse}: the network takes the block max with a reshape)")
    if sparse and c.index_head_dim < c.rotary_dim:
        why.append(f"index_head_dim={c.index_head_dim} < rotary_dim={c.rotary_dim}: the indexer's RoPE is not one "
                   "the native rotary layer can express")
    return why


def component_plan(model, max_seq_len: int) -> list[tuple[str, str, Callable]]:
    """``(engine name, ONNX component name, writer(w, dtype))`` for every text component."""
    c = model.config.text
    plan = [("embedding", "embedding", lambda w, dt: write_embedding(w, model, dt))]
    for i in range(c.num_hidden_layers):
        onnx_name = "decoder_" + c.layer_variant(i).replace("-", "_")
        plan.append((f"layer_{i}", onnx_name, lambda w, dt, i=i: write_decoder_layer(w, model, i, dt, max_seq_len)))
    plan.append(("head", "head", lambda w, dt: write_head(w, model, dt)))
    return plan


def profiles_for(report_inputs: list, max_batch: int, max_seq_len: int, opt_seq: int = 16) -> dict:
    """min/opt/max per input: dim 0 is the batch, a second dynamic dim is the sequence."""
    prof = {}
    for t in report_inputs:
        shape = t.shape if hasattr(t, "shape") else t["shape"]
        name = t.name if hasattr(t, "name") else t["name"]
        lo, opt, hi = [], [], []
        for a, d in enumerate(shape):
            if d != -1:
                lo.append(d), opt.append(d), hi.append(d)
            elif a == 0:
                lo.append(1), opt.append(1), hi.append(max_batch)
            else:
                lo.append(1), opt.append(min(opt_seq, max_seq_len)), hi.append(max_seq_len)
        prof[name] = (tuple(lo), tuple(opt), tuple(hi))
    return prof


def build_one(model, name: str, engine_path, *, dtype: str, max_batch: int, max_seq_len: int,
              num_heads: int | None = None, timeout_s: float | None = None):
    """Write component ``name`` ('embedding' | 'layer_<i>' | 'head') and build it in this process."""
    from m3_trt.export.tensorrt.network_layers import LayerWriter

    w = LayerWriter.create()
    t0 = time.monotonic()
    if name.startswith("layer_"):
        write_decoder_layer(w, model, int(name[6:]), dtype, max_seq_len, num_heads=num_heads)
    else:
        {"embedding": write_embedding, "head": write_head}[name](w, model, dtype)
    write_s = time.monotonic() - t0
    from m3_trt.export.tensorrt.builder import tensor_infos

    report = w.build(engine_path, profiles=profiles_for(tensor_infos(w.net, "inputs"), max_batch, max_seq_len),
                     timeout_s=timeout_s)
    report.seconds += write_s
    return report


def shadow_run(model, name: str, feeds: dict, *, dtype: str, max_seq_len: int,
               num_heads: int | None = None) -> dict:
    """Run component ``name``'s network-writing code on the torch shadow network (``network_shadow``)
    with ``feeds`` (input name -> tensor); returns output name -> tensor."""
    from m3_trt.export.tensorrt.network_shadow import shadow_writer

    w = shadow_writer(feeds)
    if name.startswith("layer_"):
        write_decoder_layer(w, model, int(name[6:]), dtype, max_seq_len, num_heads=num_heads)
    else:
        {"embedding": write_embedding, "head": write_head}[name](w, model, dtype)
    return w.net.run()

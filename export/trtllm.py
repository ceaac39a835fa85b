"""TensorRT-LLM handoff: launch options for TensorRT-LLM's PyTorch backend serving MiniMax-M3-VL.

Writes ``trtllm/`` for a target:

* ``extra_llm_api_options.yaml`` — LLM API arguments (``tensorrt_llm/llmapi/llm_args.py``):
  ``tensor_parallel_size``, ``moe_expert_parallel_size``, ``moe_tensor_parallel_size``,
  ``max_batch_size``, ``max_num_tokens``, ``max_seq_len``, ``kv_cache_config`` (``dtype``,
  ``free_gpu_memory_fraction``), ``moe_config.backend`` and ``sparse_attention_config`` — the
  ``MiniMaxM3SparseAttentionConfig`` (``algorithm: minimax_m3``, ``sparse_num_index_heads``,
  ``sparse_index_dim``, ``sparse_block_size``, ``sparse_topk_blocks``, ``sparse_init_blocks``,
  ``sparse_local_blocks``, ``sparse_score_type``, ``sparse_disable_index_value``);
* ``serve.sh`` — the ``trtllm-serve`` command line (``--backend pytorch --tp_size --ep_size
  --max_batch_size --max_num_tokens --max_seq_len --kv_cache_free_gpu_memory_fraction
  --extra_llm_api_options``);
* ``triton/tensorrt_llm/1/model.yaml`` — the same LLM arguments plus ``model``, ``backend`` and a
  ``triton_config`` block (``max_batch_size``, ``decoupled``), which is what tensorrtllm_backend's
  ``all_models/llmapi/tensorrt_llm/1/model.py`` reads (everything but ``triton_config`` goes to
  ``LLM(**args)``).

The field names are checked against lists extracted from those sources in
``tests/engines/test_trtllm.py`` (file + commit cited there). Values come from the target and the
model config; nothing here needs TensorRT-LLM installed.
"""

from __future__ import annotations

import shlex
from pathlib import Path

KV_DTYPE = {"fp8": "fp8", "bf16": "auto", "fp16": "auto", "fp32": "auto"}  # "auto" = the model's dtype
# the checkpoint's FP8 block-scaled experts run on TRTLLM-gen kernels on Blackwell; CUTLASS elsewhere
MOE_BACKEND = {"fp8": "TRTLLM", "bf16": "CUTLASS", "fp16": "CUTLASS", "fp32": "CUTLASS"}


def llm_args(cfg, target, checkpoint: str = "CHECKPOINT") -> dict:
    """The LLM API arguments for ``target`` (a plain dict, YAML-ready)."""
    t = cfg.text
    free = round(min(0.95, max(0.05, 1.0 - target.runtime_reserve_gib / target.gpu_memory_gib - 0.05)), 2)
    args = {
        "tensor_parallel_size": target.world,
        "moe_expert_parallel_size": target.ep,
        "moe_tensor_parallel_size": target.moe_tp,
        "max_batch_size": target.max_batch,
        "max_num_tokens": target.max_num_tokens,
        "max_seq_len": target.max_seq_len,
        "kv_cache_config": {"dtype": KV_DTYPE[target.kv_cache_dtype], "free_gpu_memory_fraction": free},
        "moe_config": {"backend": MOE_BACKEND[target.weight_dtype]},
    }
    if target.tp == 1 and target.world > 1:
        args["enable_attention_dp"] = True  # our tp=1 layout: attention replicated per rank
    if t.has_sparse_layers:
        args["sparse_attention_config"] = {
            "algorithm": "minimax_m3",
            "sparse_num_index_heads": t.index_n_heads,
            "sparse_index_dim": t.index_head_dim,
            "sparse_block_size": t.index_block_size,
            "sparse_topk_blocks": t.index_topk_blocks,
            "sparse_init_blocks": 0,
            "sparse_local_blocks": t.index_local_blocks,
            "sparse_score_type": "max",
            "sparse_disable_index_value": True,
        }
    return args


def _yaml(obj, indent: int = 0) -> str:
    """Minimal YAML for nested dicts of scalars (no dependency on PyYAML)."""
    lines = []
    for k, v in obj.items():
        pad = "  " * indent
        if isinstance(v, dict):
            lines.append(f"{pad}{k}:")
            lines.append(_yaml(v, indent + 1))
        elif isinstance(v, bool):
            lines.append(f"{pad}{k}: {'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            lines.append(f"{pad}{k}: {v}")
        else:
            lines.append(f"{pad}{k}: {json_str(v)}")
    return "\n".join(lines)


def json_str(v) -> str:
    import json

    return json.dumps(str(v))


def serve_command(cfg, target, checkpoint: str, options_file: str = "extra_llm_api_options.yaml") -> list[str]:
    a = llm_args(cfg, target, checkpoint)
    return ["trtllm-serve", checkpoint, "--backend", "pytorch", "--tp_size", str(a["tensor_parallel_size"]),
            "--ep_size", str(a["moe_expert_parallel_size"]), "--max_batch_size", str(a["max_batch_size"]),
            "--max_num_tokens", str(a["max_num_tokens"]), "--max_seq_len", str(a["max_seq_len"]),
            "--kv_cache_free_gpu_memory_fraction", str(a["kv_cache_config"]["free_gpu_memory_fraction"]),
            "--extra_llm_api_options", options_file]


def write_trtllm(cfg, target, out: str | Path, checkpoint: str = "CHECKPOINT") -> list[Path]:
    """Write the handoff folder; returns the files written."""
    out = Path(out)
    (out / "triton" / "tensorrt_llm" / "1").mkdir(parents=True, exist_ok=True)
    args = llm_args(cfg, target, checkpoint)
    opts = out / "extra_llm_api_options.yaml"
    opts.write_text(f"# TensorRT-LLM LLM API options for target {target.name} (m3-trt build-engine)\n"
                    + _yaml(args) + "\n")
    serve = out / "serve.sh"
    serve.write_text("#!/bin/sh\n# Serve MiniMax-M3-VL with TensorRT-LLM's PyTorch backend (OpenAI-compatible HTTP)\n"
                     "cd \"$(dirname \"$0\")\"\n" + shlex.join(serve_command(cfg, target, checkpoint)) + " \"$@\"\n")
    serve.chmod(0o755)
    model_yaml = out / "triton" / "tensorrt_llm" / "1" / "model.yaml"
    model_yaml.write_text(f"# tensorrtllm_backend all_models/llmapi model config for target {target.name}\n"
                          + _yaml({"model": checkpoint, "backend": "pytorch", **args,
                                   "triton_config": {"max_batch_size": target.max_batch, "decoupled": True}}) + "\n")
    return [opts, serve, model_yaml]

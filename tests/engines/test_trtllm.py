"""TensorRT-LLM handoff: every option we write is a field TensorRT-LLM / tensorrtllm_backend defines.

Field lists extracted by reading (never importing) these sources:
* NVIDIA/TensorRT-LLM tensorrt_llm/llmapi/llm_args.py @ fcd3f31682808ae56118ae43c1d7864a3a945e6f:
  BaseLlmArgs/TorchLlmArgs (tensor_parallel_size, moe_tensor_parallel_size, moe_expert_parallel_size,
  enable_attention_dp, max_batch_size, max_num_tokens, max_seq_len, kv_cache_config, moe_config,
  sparse_attention_config, backend, model), MoeConfig.backend Literal, KvCacheConfig
  (dtype, free_gpu_memory_fraction), MiniMaxM3SparseAttentionConfig (algorithm "minimax_m3", sparse_*).
* NVIDIA/TensorRT-LLM trtllm CLI click options (tensorrt_llm/commands, same option set as trtllm-serve):
  --backend --tp_size --ep_size --max_batch_size --max_num_tokens --max_seq_len
  --kv_cache_free_gpu_memory_fraction --extra_llm_api_options.
* triton-inference-server/tensorrtllm_backend all_models/llmapi/tensorrt_llm/1/model.py
  @ dbae4e889f8fab69963fb2223bb4269aa71aa7d0: model.yaml = LLM args + triton_config{decoupled, max_batch_size}.
"""

from __future__ import annotations

import shlex

import pytest

from m3_trt.model.config import full_size, tiny
from m3_trt.export.trtllm import write_trtllm
from m3_trt.build.targets import load_target

LLM_ARGS = {"model", "backend", "tensor_parallel_size", "moe_tensor_parallel_size", "moe_expert_parallel_size",
            "enable_attention_dp", "max_batch_size", "max_num_tokens", "max_seq_len", "kv_cache_config",
            "moe_config", "sparse_attention_config"}
KV_CACHE_CONFIG = {"dtype", "free_gpu_memory_fraction"}
MOE_CONFIG = {"backend"}
MOE_BACKENDS = {"AUTO", "CUTLASS", "CUTEDSL", "WIDEEP", "TRTLLM", "DEEPGEMM", "DENSEGEMM", "VANILLA", "TRITON",
                "MARLIN", "MEGAMOE_DEEPGEMM"}
M3_SPARSE = {"algorithm", "sparse_num_index_heads", "sparse_index_dim", "sparse_block_size", "sparse_topk_blocks",
             "sparse_init_blocks", "sparse_local_blocks", "sparse_score_type", "sparse_disable_index_value"}
TRITON_CONFIG = {"decoupled", "max_batch_size"}
SERVE_FLAGS = {"--backend", "--tp_size", "--ep_size", "--max_batch_size", "--max_num_tokens", "--max_seq_len",
               "--kv_cache_free_gpu_memory_fraction", "--extra_llm_api_options"}


def _check(d: dict, allowed_top: set[str]) -> None:
    assert set(d) <= allowed_top, set(d) - allowed_top
    assert set(d["kv_cache_config"]) <= KV_CACHE_CONFIG
    assert set(d["moe_config"]) <= MOE_CONFIG and d["moe_config"]["backend"] in MOE_BACKENDS
    if "sparse_attention_config" in d:
        s = d["sparse_attention_config"]
        assert set(s) <= M3_SPARSE and s["algorithm"] == "minimax_m3" and s["sparse_score_type"] == "max"


@pytest.mark.parametrize("target", ["b200x8-fp8", "b200x8-bf16", "h100x1-bf16"])
def test_written_options_use_only_known_fields(target, tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg = full_size()
    write_trtllm(cfg, load_target(target), tmp_path, checkpoint="/models/M3")
    opts = yaml.safe_load((tmp_path / "extra_llm_api_options.yaml").read_text())
    _check(opts, LLM_ARGS)
    assert opts["tensor_parallel_size"] == load_target(target).world
    assert opts["sparse_attention_config"]["sparse_topk_blocks"] == cfg.text.index_topk_blocks
    model = yaml.safe_load((tmp_path / "triton/tensorrt_llm/1/model.yaml").read_text())
    _check(model, LLM_ARGS | {"triton_config"})
    assert set(model["triton_config"]) == TRITON_CONFIG and model["backend"] == "pytorch"
    cmd = shlex.split((tmp_path / "serve.sh").read_text().splitlines()[-1])
    assert cmd[0] == "trtllm-serve" and {a for a in cmd if a.startswith("--")} <= SERVE_FLAGS


def test_negative_control_unknown_field_is_caught(tmp_path):
    yaml = pytest.importorskip("yaml")
    write_trtllm(tiny(), load_target("cpu"), tmp_path)
    opts = yaml.safe_load((tmp_path / "extra_llm_api_options.yaml").read_text())
    opts["sparse_attention_config"]["sparse_topk"] = 16  # a plausible but invented name
    with pytest.raises(AssertionError):
        _check(opts, LLM_ARGS)

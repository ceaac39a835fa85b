"""Run the per-rank ONNX of a sharded build in ONNX Runtime, the collectives done between graphs.

``RankOnnx(rank_dir)`` holds one rank's sessions (two per decoder layer, see
:mod:`m3_trt.export.onnx.ranks`); ``ShardedOnnxModel(build_dir)`` runs every rank of a build in one
process in lock step, each collective a numpy sum over the ranks' partials (in rank order) — the
CPU check that the graphs plus the recorded collectives reproduce the unsharded model (an FP8
build's Q/DQ graphs: the one-rank FP8 emulation). Across processes the same ``RankOnnx`` calls are
joined by ``torch.distributed.all_reduce`` instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class RankOnnx:
    def __init__(self, rank_dir: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        from m3_trt.model.config import M3Config
        from m3_trt.export.onnx.runtime import layer_model, session_options

        self.dir = Path(rank_dir)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        if self.manifest["dtype"] == "bf16":
            raise RuntimeError("bf16 graphs cannot run in ONNX Runtime's CPU provider; build them with TensorRT")
        self.dtype = {"fp32": np.float32, "fp16": np.float16}[self.manifest["dtype"]]
        self.config = M3Config.from_dict(self.manifest["config"])
        so = session_options(self.manifest["plugins"] == "m3")
        self.layers = self.manifest["layers"]
        self.sessions = [{part: ort.InferenceSession(layer_model(self.dir, e[part]["file"], e[part]["data"])
                                                     .SerializeToString(), so, providers=list(providers))
                          for part in ("attn", "mlp")} for e in self.layers]

    def new_cache(self, batch: int) -> list[list[np.ndarray]]:
        t, G = self.config.text, self.manifest["local_text"]["num_key_value_heads"]
        T = self.manifest["max_seq_len"]
        caches = []
        for lt in t.layer_types:
            kv = [np.zeros((batch, G, T, t.head_dim), self.dtype) for _ in range(2)]
            if lt == "minimax_m3_sparse":
                kv.append(np.zeros((batch, T, t.index_head_dim), self.dtype))
            caches.append(kv)
        return caches

    def attn(self, i: int, hidden: np.ndarray, pos: np.ndarray, cache: list[np.ndarray]) -> np.ndarray:
        """The rank's ``attn_out`` of layer ``i``; ``cache`` updated in place."""
        sess = self.sessions[i]["attn"]
        names = [x.name for x in sess.get_inputs()]
        out, *new = sess.run(None, dict(zip(names, [hidden, pos, *cache])))
        cache[:] = new[:len(cache)]
        return out

    def mlp(self, i: int, hidden: np.ndarray, attn_sum: np.ndarray) -> list[np.ndarray]:
        """``[hidden_mid, mlp_out(, mlp_local)]`` of layer ``i``."""
        return self.sessions[i]["mlp"].run(None, {"hidden": hidden, "attn": attn_sum})


def all_reduce(parts: list[np.ndarray]) -> np.ndarray:
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


class ShardedOnnxModel:
    """Every rank of a sharded ``build-engine`` output, in lock step in this process."""

    def __init__(self, build_dir: str | Path):
        from m3_trt.export.onnx.runtime import OnnxModel

        build_dir = Path(build_dir)
        manifest = json.loads((build_dir / "build.json").read_text())
        world = manifest["layout"]["world"]
        self.ranks = [RankOnnx(build_dir / f"rank{r}" / "onnx") for r in range(world)]
        self.shared = OnnxModel((self.ranks[0].dir / self.ranks[0].manifest["replicated"]).resolve())
        self.config = self.ranks[0].config
        self.max_seq_len = self.ranks[0].manifest["max_seq_len"]

    def new_cache(self, batch: int):
        return [rk.new_cache(batch) for rk in self.ranks]

    def forward(self, input_ids: np.ndarray, caches, start: int) -> np.ndarray:
        B, S = input_ids.shape
        if start + S > self.max_seq_len:
            raise ValueError(f"{start + S} tokens exceed the build's max_seq_len={self.max_seq_len}")
        h0, = self.shared.run("embedding", input_ids=input_ids.astype(np.int64))
        pos = np.broadcast_to(np.arange(start, start + S, dtype=np.int64), (B, S)).copy()
        W = len(self.ranks)
        h = [h0] * W
        for i, entry in enumerate(self.ranks[0].layers):
            col = entry["collectives"]
            a = [rk.attn(i, h[r], pos, caches[r][i]) for r, rk in enumerate(self.ranks)]
            if col["attn_out"] == "all_reduce":
                a = [all_reduce(a)] * W
            m = [rk.mlp(i, h[r], a[r]) for r, rk in enumerate(self.ranks)]
            mo = [x[1] for x in m]
            if col["mlp_out"] == "all_reduce":
                mo = [all_reduce(mo)] * W
            h = [m[r][0] + (mo[r] + m[r][2] if col["mlp_local"] else mo[r]) for r in range(W)]
        logits, _ = self.shared.run("head", hidden=h[0])
        return logits

    def generate(self, input_ids: np.ndarray, max_new_tokens: int) -> list[int]:
        caches = self.new_cache(1)
        logits = self.forward(input_ids, caches, 0)
        pos, out = input_ids.shape[1], []
        for _ in range(max_new_tokens):
            out.append(int(np.argmax(logits[0, -1])))
            logits = self.forward(np.array([[out[-1]]], np.int64), caches, pos)
            pos += 1
        return out

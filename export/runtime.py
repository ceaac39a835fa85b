"""``m3-trt compare --backend onnxruntime``: the exported components behind the compare adapter.

``load_for_compare(export_dir, dtype=...)`` returns a runner whose ``components`` gives the
layer-by-layer view (vision tower, projector, spliced embeddings, each decoder layer, each sparse
layer's block choices, final norm, logits) and whose ``greedy`` decodes token by token through
the exported graphs with their caches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from m3_trt.export.onnx.runtime import OnnxModel


class OnnxCompareRunner:
    def __init__(self, export_dir: Path):
        self.model = OnnxModel(export_dir)

    def _embeds(self, pixel_values, image_grid_thw):
        if pixel_values is None:
            return None, None
        return self.model.vision_and_projector(np.asarray(pixel_values, np.float32), np.asarray(image_grid_thw))

    def components(self, input_ids, *, pixel_values=None, image_grid_thw=None, layers: bool = False) -> dict:
        feats, emb = self._embeds(pixel_values, image_grid_thw)
        ids = np.asarray(input_ids, np.int64)
        caches = self.model.new_cache(ids.shape[0])
        logits, hidden = self.model.forward(ids, caches, 0, image_embeds=emb, return_hidden=True)
        out: dict[str, torch.Tensor] = {}
        if layers:
            if feats is not None:
                out["vision_encoder"], out["projector"] = torch.from_numpy(feats), torch.from_numpy(emb)
            out["embedding"] = torch.from_numpy(hidden[0])
            for i, h in enumerate(hidden[1:-1]):
                if i in self.model.last_block_idx:
                    out[f"indexer.{i}"] = torch.from_numpy(self.model.last_block_idx[i])
                out[f"layer.{i}"] = torch.from_numpy(h)
            out["final_norm"] = torch.from_numpy(hidden[-1])
        out["logits"] = torch.from_numpy(logits)
        return out

    def greedy(self, input_ids, n: int, *, pixel_values=None, image_grid_thw=None, eos_token_id=None) -> list[int]:
        _, emb = self._embeds(pixel_values, image_grid_thw)
        return self.model.generate(np.asarray(input_ids, np.int64), n, image_embeds=emb, eos_token_id=eos_token_id)


def load_for_compare(path: str | Path, *, dtype: str = "fp32") -> OnnxCompareRunner:
    if path is None:
        raise ValueError("--backend onnxruntime needs --backend-path: the folder `m3-trt export` wrote")
    runner = OnnxCompareRunner(Path(path))
    exported = runner.model.manifest["dtype"]
    if exported != dtype:
        raise ValueError(f"the export at {path} is {exported}, the comparison asked for {dtype}")
    return runner

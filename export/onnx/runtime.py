"""Run an exported model in ONNX Runtime, component by component.

``OnnxModel(export_dir)`` opens one session per component (and one per decoder layer, the
layer's weight file swapped into its variant's graph), chains them like the torch reference —
embedding → image tokens spliced at placeholder ids → decoder layers with their caches → head —
and generates greedily. Plugin nodes (``m3`` domain) run through the ONNX Runtime custom ops
registered by ``m3_trt.plugins.onnx_ops``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def layer_graph(export_dir: Path, graph_file: str, data_file: str):
    """A shared variant graph re-pointed at one layer's weight file (weights not loaded)."""
    import onnx

    model = onnx.load(str(export_dir / graph_file), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = data_file
    return model


def layer_model(export_dir: Path, graph_file: str, data_file: str):
    """The variant graph of one decoder layer with that layer's weight file (in memory)."""
    from onnx.external_data_helper import load_external_data_for_model

    model = layer_graph(export_dir, graph_file, data_file)
    load_external_data_for_model(model, str(export_dir))
    return model


def session_options(plugins: bool, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # constant-folding notes about CastLike are noise here
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if plugins:
        from m3_trt.plugins import onnx_ops

        onnx_ops.register_ort(so)
    return so


class OnnxModel:
    def __init__(self, export_dir: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        """``threads``: intra-op threads per session (None: ONNX Runtime's default, all cores)."""
        import onnxruntime as ort

        from m3_trt.model.config import M3Config

        self.dir = Path(export_dir)
        self.manifest = json.loads((self.dir / "manifest.json").read_text())
        self.config = M3Config.from_dict(self.manifest["config"])
        self.dtype = {"fp32": np.float32, "fp16": np.float16, "bf16": None}[self.manifest["dtype"]]
        if self.dtype is None:
            raise RuntimeError("bf16 exports cannot run in ONNX Runtime's CPU provider (no bf16 kernels); "
                               "build them with TensorRT")
        so = session_options(self.manifest["plugins"] == "m3", threads)
        self.sessions: dict[str, object] = {}
        self.layer_sessions: dict[int, object] = {}
        for comp in self.manifest["components"]:
            if "layers" in comp:
                for i, data in comp["layers"].items():
                    m = layer_model(self.dir, comp["file"], data)
                    self.layer_sessions[int(i)] = ort.InferenceSession(m.SerializeToString(), so,
                                                                       providers=list(providers))
            else:
                self.sessions[comp["name"]] = ort.InferenceSession(str(self.dir / comp["file"]), so,
                                                                   providers=list(providers))
        self.max_seq_len = self.manifest["max_seq_len"]

    # -- pieces ------------------------------------------------------------------------------
    def run(self, name: str, **inputs) -> list[np.ndarray]:
        return self.sessions[name].run(None, inputs)

    def image_embeds(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray) -> np.ndarray:
        return self.vision_and_projector(pixel_values, image_grid_thw)[1]

    def vision_and_projector(self, pixel_values: np.ndarray, image_grid_thw: np.ndarray):
        """``(vision tower output [N, Dv], image tokens [N/merge², D])``."""
        import torch

        from m3_trt.model.vision import vision_position_ids, vision_segment_ids

        grid = torch.as_tensor(np.asarray(image_grid_thw)).reshape(-1, 3)
        pos = vision_position_ids(grid, self.config.vision.spatial_merge_size).numpy()
        seg = vision_segment_ids(grid).numpy()
        feats, = self.run("vision_encoder", pixel_values=np.asarray(pixel_values, self.dtype), vision_pos=pos,
                          segment_ids=seg)
        emb, = self.run("projector", vision_feats=feats)
        return feats, emb

    def new_cache(self, batch: int) -> list[list[np.ndarray]]:
        t = self.config.text
        caches = []
        for lt in t.layer_types:
            kv = [np.zeros((batch, t.num_key_value_heads, self.max_seq_len, t.head_dim), self.dtype) for _ in range(2)]
            if lt == "minimax_m3_sparse":
                kv.append(np.zeros((batch, self.max_seq_len, t.index_head_dim), self.dtype))
            caches.append(kv)
        return caches

    def embed(self, input_ids: np.ndarray, image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings ``[B, S, D]`` with ``image_embeds`` rows at the image placeholder ids."""
        h, = self.run("embedding", input_ids=input_ids.astype(np.int64))
        if image_embeds is not None:
            mask = input_ids == self.config.image_token_id
            if int(mask.sum()) != image_embeds.shape[0]:
                raise ValueError(f"image placeholders: {int(mask.sum())}, image embeddings: {image_embeds.shape[0]}")
            h = h.copy()
            h[mask] = image_embeds.astype(h.dtype)
        return h

    def forward_embeds(self, h: np.ndarray, pos: np.ndarray, caches, hidden: list | None = None) -> np.ndarray:
        """Hidden states ``h [B, S, D]`` at positions ``pos [B, S]`` (one row each) through every
        decoder layer; caches updated in place; each layer's output appended to ``hidden``."""
        self.last_block_idx: dict[int, np.ndarray] = {}
        for i, sess in sorted(self.layer_sessions.items()):
            names = [x.name for x in sess.get_inputs()]
            feeds = dict(zip(names, [h, pos, *caches[i]]))
            h, *new = sess.run(None, feeds)
            n_cache = len(caches[i])
            caches[i][:] = new[:n_cache]
            if len(new) > n_cache:
                self.last_block_idx[i] = new[n_cache]
            if hidden is not None:
                hidden.append(h)
        return h

    def head(self, h: np.ndarray) -> np.ndarray:
        """Final norm + LM head: logits ``[B, S, V]``."""
        return self.run("head", hidden=h)[0]

    def forward(self, input_ids: np.ndarray, caches, start: int, *, image_embeds: np.ndarray | None = None,
                return_hidden: bool = False):
        """Logits for ``input_ids [B, S]`` at positions ``start..start+S-1``; caches updated in place.

        ``return_hidden`` adds ``[embeddings, after layer 0, …, after layer L-1, final norm]``; the
        sparse layers' block choices of the last call are in ``self.last_block_idx``.
        """
        B, S = input_ids.shape
        if start + S > self.max_seq_len:
            raise ValueError(f"{start + S} tokens exceed the export's max_seq_len={self.max_seq_len}")
        h = self.embed(input_ids, image_embeds)
        pos = np.broadcast_to(np.arange(start, start + S, dtype=np.int64), (B, S)).copy()
        hidden = [h]
        h = self.forward_embeds(h, pos, caches, hidden)
        logits, normed = self.run("head", hidden=h)
        hidden.append(normed)
        return (logits, hidden) if return_hidden else logits

    def generate(self, input_ids: np.ndarray, max_new_tokens: int, *, image_embeds=None,
                 eos_token_id: int | tuple[int, ...] | None = None) -> list[int]:
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or ()))
        caches = self.new_cache(1)
        logits = self.forward(input_ids, caches, 0, image_embeds=image_embeds)
        pos, out = input_ids.shape[1], []
        for _ in range(max_new_tokens):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            if tok in eos:
                break
            logits = self.forward(np.array([[tok]], np.int64), caches, pos)
            pos += 1
        return out

"""The two sides of a streamed comparison, one piece in memory at a time.

A *side* runs the model piece by piece on lists of prompts (one piece loaded per call, used for
every prompt, then dropped):

* ``vision(pixels) -> [feats [N, Dv]]`` (the vision tower) and ``project(feats) -> [tokens [N/m², D]]``;
* ``embed(ids, image_tokens) -> [h [1, S, D]]``: token embeddings with image tokens spliced in at
  the image placeholder ids (``None``: a text prompt);
* ``new_cache(i, max_len)``; ``with side.layer(i) as l: h, block_idx = l.run(h, pos, cache)``
  (``block_idx_BGSK`` int32 on sparse layers, else None);
* ``head(hs) -> [(final norm, logits)]``.

Tensors come back as float32 (block choices as int32). :class:`TorchPieces` is the torch model
from :class:`m3_trt.model.pieces.PieceModel` in a dtype, with kernels, optionally with the FP8 E4M3
emulation of an FP8 build (activation scales calibrated layer by layer,
:func:`m3_trt.quant.fp8.calibrate_layerwise`). :class:`OnnxPieces` is an ``m3-trt export`` folder in
ONNX Runtime: one session per decoder layer, built from the layer's variant graph and its
``layer_<i>.data`` when the layer is entered, dropped on exit.


:class:`ShardedPieces` is a sharded ``build-engine`` output (``build.json`` + ``rank<r>/weights.safetensors``):
for layer i, every rank's slice of layer i is read from its file (memory-mapped) into that rank's
:class:`m3_trt.model.rank.RankDecoderLayer`; the ranks run as threads in lock-step and their
all-reduces are summed on the host in rank order (:class:`HostAllReduce`), so one full layer (all
ranks' slices) is in memory. Replicated pieces (embedding, vision, projector, head) come from rank 0.

A backend without per-layer pieces (transformers' model, a live Triton server) is not offered here:
``m3-trt compare`` runs those whole-model.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import m3_trt.model.rank as rank_module
from m3_trt.model.cache import LayerCache
from m3_trt.model.config import M3Config
from m3_trt.model.modeling import DTYPES as MODEL_DTYPES, M3ForConditionalGeneration, rope_cos_sin
from m3_trt.model.pieces import PieceModel
from m3_trt.model.rank import RankModel
from m3_trt.model.shard import Layout
from m3_trt.model.vision import vision_position_ids, vision_segment_ids
from m3_trt.quant.fp8 import Fp8Emulation, calibrate_layerwise, calibration_inputs, is_fp8_weight, qdq_weight

DTYPES = {k: MODEL_DTYPES[k] for k in ("fp32", "bf16")}
STREAMED_BACKENDS = ("torch", "onnxruntime", "sharded")


class TorchPieces:
    """The torch reference from a checkpoint (``dtype``, ``kernels``, optional FP8 emulation), one piece at a time."""

    def __init__(self, ckpt: Path, dtype: str = "fp32", kernels: str = "reference", fp8: bool = False,
                 progress=None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        self.pm = PieceModel(ckpt)
        self.pm.model.set_kernels(kernels)
        self.cfg = self.pm.cfg
        self.dt = DTYPES[dtype]
        self.dtype = "fp8-emulated" if fp8 else dtype
        self.emu: Fp8Emulation | None = None
        self._hooked: set[int] = set()
        if fp8:
            # the build's calibration, carried layer by layer on a PieceModel of its own (it hooks its modules);
            # the same scales as the whole-model calibrate() the unstreamed torch backend uses
            if progress:
                progress(f"calibrating FP8 activation scales layer by layer on {ckpt}")
            self.emu, _ = calibrate_layerwise(PieceModel(ckpt), calibration_inputs(ckpt), self.dt)
            self.emu.mode = "quantize"

    @torch.no_grad()
    def vision(self, pixels: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """The vision tower's output ``[N, Dv]`` for each ``(pixel_values, image_grid_thw)``."""
        merge = self.cfg.vision.spatial_merge_size
        tower = self.pm.model.model.vision_tower
        with self.pm.loaded("vision", self.dt):
            return [tower(pv.to(self.dt), vision_position_ids(g.reshape(-1, 3), merge),
                          vision_segment_ids(g.reshape(-1, 3))).float() for pv, g in pixels]

    @torch.no_grad()
    def project(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        with self.pm.loaded("projector", self.dt):
            return [self.pm.model.model.multi_modal_projector(f.to(self.dt)).float() for f in feats]

    @torch.no_grad()
    def embed(self, ids: list[torch.Tensor], image_tokens: list[torch.Tensor | None]) -> list[torch.Tensor]:
        emb = self.pm.model.model.language_model.embed_tokens
        out = []
        with self.pm.loaded("embedding", self.dt):
            for x, t in zip(ids, image_tokens):
                h = emb(x)
                if t is not None:
                    h = M3ForConditionalGeneration.splice(h, x, t.to(self.dt), self.cfg.image_token_id)
                out.append(h.float())
        return out

    def new_cache(self, i: int, max_len: int) -> LayerCache:
        t = self.cfg.text
        kv = dict(k_BGTD=torch.zeros(1, t.num_key_value_heads, max_len, t.head_dim, dtype=self.dt),
                  v_BGTD=torch.zeros(1, t.num_key_value_heads, max_len, t.head_dim, dtype=self.dt))
        if t.layer_types[i] == "minimax_m3_sparse":
            kv["idx_k_BTD"] = torch.zeros(1, max_len, t.index_head_dim, dtype=self.dt)
        return LayerCache(**kv)

    def layer(self, i: int):
        """Context manager: ``run(h_BSD, pos_BS, cache) -> (h_BSD, block_idx | None)`` with layer ``i`` loaded."""
        return _TorchLayer(self, i)

    @torch.no_grad()
    def head(self, hs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(final norm, logits)`` for each hidden state, the head loaded once."""
        lm = self.pm.model.model.language_model
        with self.pm.loaded("head", self.dt):
            return [(n.float(), self.pm.model.lm_head(n).float()) for n in (lm.norm(h.to(self.dt)) for h in hs)]


class _TorchLayer:
    def __init__(self, pieces: TorchPieces, i: int):
        self.p, self.i = pieces, i

    def __enter__(self):
        self._ctx = self.p.pm.loaded(f"layer.{self.i}", self.p.dt)
        self._ctx.__enter__()
        self.mod = self.p.pm.model.model.language_model.layers[self.i]
        emu = self.p.emu
        if emu is not None:
            prefix = f"model.language_model.layers.{self.i}"
            if self.i not in self.p._hooked:  # QDQ weights + input hooks; the hooks outlive the weights
                emu.attach(self.mod, prefix)
                self.p._hooked.add(self.i)
            else:  # reloaded weights: QDQ them again (the hooks are still in place)
                with torch.no_grad():
                    for name, w in self.mod.named_parameters(prefix=prefix):
                        if is_fp8_weight(name, w):
                            w.copy_(qdq_weight(w, emu.block_scales.get(name)))
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    @torch.no_grad()
    def run(self, h_BSD: torch.Tensor, pos_BS: torch.Tensor, cache: LayerCache):
        cos, sin = rope_cos_sin(pos_BS, self.p.cfg.text, self.p.dt)
        h, block_idx = self.mod(h_BSD.to(self.p.dt), cos, sin, pos_BS, cache, return_block_idx=True)
        return h.float(), block_idx


def _read_manifest(folder: Path, name: str, what: str) -> dict:
    """``folder/name`` as JSON, or the ``--backend-path`` error naming what the folder should have been."""
    mf = Path(folder) / name
    if not mf.is_file():
        raise ValueError(f"--backend-path {folder}: no {name} (not {what})")
    return json.loads(mf.read_text())


class OnnxPieces:
    """An ``m3-trt export`` folder in ONNX Runtime: small components' sessions, one layer session at a time."""

    def __init__(self, export_dir: Path, dtype: str = "fp32"):
        import onnxruntime as ort

        from m3_trt.export.onnx.runtime import layer_model, session_options

        self.dir = Path(export_dir)
        self.manifest = _read_manifest(export_dir, "manifest.json", "an `m3-trt export` folder")
        if self.manifest["dtype"] != dtype:
            raise ValueError(f"the export at {export_dir} is {self.manifest['dtype']}, the comparison asked for "
                             f"{dtype}")
        self.dtype = dtype
        self.cfg = M3Config.from_dict(self.manifest["config"])
        self.max_seq_len = self.manifest["max_seq_len"]
        self._ort, self._layer_model = ort, layer_model
        self.so = session_options(self.manifest["plugins"] == "m3")
        self.files: dict[int, tuple[str, str]] = {}
        self.graphs: dict[str, Path] = {}
        for comp in self.manifest["components"]:
            if "layers" in comp:
                self.files.update({int(i): (comp["file"], data) for i, data in comp["layers"].items()})
            else:
                self.graphs[comp["name"]] = self.dir / comp["file"]

    def _session(self, name: str):
        if name not in self.graphs:
            raise ValueError(f"the export at {self.dir} has no {name!r} component")
        return self._ort.InferenceSession(str(self.graphs[name]), self.so, providers=["CPUExecutionProvider"])

    def vision(self, pixels: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        merge = self.cfg.vision.spatial_merge_size
        sess = self._session("vision_encoder")
        return [torch.from_numpy(sess.run(None, {
            "pixel_values": pv.float().numpy(), "vision_pos": vision_position_ids(g.reshape(-1, 3), merge).numpy(),
            "segment_ids": vision_segment_ids(g.reshape(-1, 3)).numpy()})[0]).float() for pv, g in pixels]

    def project(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        sess = self._session("projector")
        return [torch.from_numpy(sess.run(None, {"vision_feats": f.float().numpy()})[0]).float() for f in feats]

    def embed(self, ids: list[torch.Tensor], image_tokens: list[torch.Tensor | None]) -> list[torch.Tensor]:
        sess = self._session("embedding")
        out = []
        for x, t in zip(ids, image_tokens):
            h = torch.from_numpy(sess.run(None, {"input_ids": x.numpy().astype(np.int64)})[0]).float()
            if t is not None:
                h = M3ForConditionalGeneration.splice(h, x, t, self.cfg.image_token_id)
            out.append(h)
        return out

    def new_cache(self, i: int, max_len: int) -> list[np.ndarray]:
        if max_len > self.max_seq_len:
            raise ValueError(f"{max_len} positions exceed the export's max_seq_len={self.max_seq_len}")
        t = self.cfg.text
        kv = [np.zeros((1, t.num_key_value_heads, self.max_seq_len, t.head_dim), np.float32) for _ in range(2)]
        if t.layer_types[i] == "minimax_m3_sparse":
            kv.append(np.zeros((1, self.max_seq_len, t.index_head_dim), np.float32))
        return kv

    def layer(self, i: int):
        return _OnnxLayer(self, i)

    def head(self, hs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sess = self._session("head")
        out = []
        for h in hs:
            logits, normed = sess.run(None, {"hidden": h.numpy().astype(np.float32)})
            out.append((torch.from_numpy(normed).float(), torch.from_numpy(logits).float()))
        return out


class _OnnxLayer:
    def __init__(self, pieces: OnnxPieces, i: int):
        self.p, self.i = pieces, i

    def __enter__(self):
        if self.i not in self.p.files:
            raise ValueError(f"the export at {self.p.dir} has no decoder layer {self.i}")
        graph, data = self.p.files[self.i]
        model = self.p._layer_model(self.p.dir, graph, data)
        self.sess = self.p._ort.InferenceSession(model.SerializeToString(), self.p.so,
                                                 providers=["CPUExecutionProvider"])
        del model
        self.names = [x.name for x in self.sess.get_inputs()]
        return self

    def __exit__(self, *exc):
        del self.sess
        return False

    def run(self, h_BSD: torch.Tensor, pos_BS: torch.Tensor, cache: list[np.ndarray]):
        feeds = dict(zip(self.names, [h_BSD.numpy().astype(np.float32), pos_BS.numpy().astype(np.int64), *cache]))
        h, *new = self.sess.run(None, feeds)
        n = len(cache)
        cache[:] = new[:n]
        return torch.from_numpy(h).float(), (torch.from_numpy(new[n]) if len(new) > n else None)


class HostAllReduce:
    """``dist.all_reduce`` for ``world`` ranks run as threads of one process: each rank deposits its
    tensor, all wait, each gets the sum in rank order (in place, like ``dist.all_reduce``)."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.slots: list[torch.Tensor | None] = [None] * world
        self.local = threading.local()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        r = self.local.rank
        self.slots[r] = x.clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for t in self.slots[1:]:
            total += t
        self.barrier.wait()  # every rank has read the slots before the next reduction overwrites them
        x.copy_(total)
        return x

    def run(self, fns: list) -> list:
        """Call ``fns[r]()`` for every rank in its own thread; their results in rank order."""
        out, errors = [None] * self.world, []

        def work(r):
            self.local.rank = r
            try:
                with torch.no_grad():  # grad mode is per thread: a new thread starts with it on
                    out[r] = fns[r]()
            except BaseException as e:  # free the other ranks waiting at the barrier
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if errors:
            raise (real or errors)[0]
        return out


@contextmanager
def _host_all_reduce(reducer: HostAllReduce):
    # the rank layers call m3_trt.model.rank._all_reduce (torch.distributed in a real run); here the ranks
    # are threads of this process, so it is replaced for the duration of one layer (one compare at a time)
    original = rank_module._all_reduce
    rank_module._all_reduce = reducer
    try:
        yield
    finally:
        rank_module._all_reduce = original


class ShardedPieces:
    """A sharded ``build-engine`` output: each rank's slice of one decoder layer at a time (module docstring)."""

    def __init__(self, build_dir: Path, dtype: str = "fp32"):
        self.dir = Path(build_dir)
        manifest = _read_manifest(build_dir, "build.json", "an `m3-trt build-engine` output")
        self.cfg = M3Config.from_dict(manifest["config"])
        self.layout = Layout(**manifest["layout"])
        built = manifest["target"]["dtype"]
        if built != dtype:
            raise ValueError(f"the build at {build_dir} is {built}, the comparison asked for {dtype}")
        if any((self.dir / f"rank{r}" / "fp8_scales.safetensors").is_file() for r in range(self.layout.world)):
            raise ValueError(f"the build at {build_dir} stores FP8 weights; compare has no tolerance for a sharded FP8 "
                             f"build (compare --backend torch --fp8-emulate is the FP8 reference)")
        self.dtype, self.dt = dtype, DTYPES[dtype]
        self.files = [self.dir / f"rank{r}" / "weights.safetensors" for r in range(self.layout.world)]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise ValueError(f"the build at {build_dir} lacks {', '.join(missing)}")
        self.ranks = [RankModel.on_meta(self.cfg, self.layout, r) for r in range(self.layout.world)]

    def _read(self, r: int, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        with safe_open(str(self.files[r]), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefixes)}

    @contextmanager
    def _replicated(self, mods: dict[str, torch.nn.Module]):
        """Rank 0's modules ``{prefix: module}`` filled from its file in ``dtype``; back to ``meta`` on exit."""
        state = self._read(0, tuple(mods))
        try:
            for prefix, mod in mods.items():
                local = {k[len(prefix):]: v.to(self.dt) for k, v in state.items() if k.startswith(prefix)}
                mod.load_state_dict(local, assign=True)  # names and shapes checked (strict)
            yield
        finally:
            for mod in mods.values():
                mod.to("meta")

    @torch.no_grad()
    def vision(self, pixels):
        merge, tower = self.cfg.vision.spatial_merge_size, self.ranks[0].model.vision_tower
        with self._replicated({"model.vision_tower.": tower}):
            return [tower(pv.to(self.dt), vision_position_ids(g.reshape(-1, 3), merge),
                          vision_segment_ids(g.reshape(-1, 3))).float() for pv, g in pixels]

    @torch.no_grad()
    def project(self, feats):
        proj = self.ranks[0].model.multi_modal_projector
        with self._replicated({"model.multi_modal_projector.": proj}):
            return [proj(f.to(self.dt)).float() for f in feats]

    @torch.no_grad()
    def embed(self, ids, image_tokens):
        emb = self.ranks[0].model.language_model.embed_tokens
        out = []
        with self._replicated({"model.language_model.embed_tokens.": emb}):
            for x, t in zip(ids, image_tokens):
                h = emb(x)
                if t is not None:
                    h = M3ForConditionalGeneration.splice(h, x, t.to(self.dt), self.cfg.image_token_id)
                out.append(h.float())
        return out

    def new_cache(self, i: int, max_len: int) -> list[LayerCache]:
        caches = []
        for rank in self.ranks:
            t = rank.local_text
            kv = dict(k_BGTD=torch.zeros(1, t.num_key_value_heads, max_len, t.head_dim, dtype=self.dt),
                      v_BGTD=torch.zeros(1, t.num_key_value_heads, max_len, t.head_dim, dtype=self.dt))
            if t.layer_types[i] == "minimax_m3_sparse":
                kv["idx_k_BTD"] = torch.zeros(1, max_len, t.index_head_dim, dtype=self.dt)
            caches.append(LayerCache(**kv))
        return caches

    def layer(self, i: int):
        return _ShardedLayer(self, i)

    @torch.no_grad()
    def head(self, hs):
        m = self.ranks[0]
        lm = m.model.language_model
        with self._replicated({"model.language_model.norm.": lm.norm, "lm_head.": m.lm_head}):
            return [(n.float(), m.lm_head(n).float()) for n in (lm.norm(h.to(self.dt)) for h in hs)]


class _ShardedLayer:
    def __init__(self, pieces: ShardedPieces, i: int):
        self.p, self.i = pieces, i

    def __enter__(self):
        p, prefix = self.p, f"model.language_model.layers.{self.i}."
        self._ctxs = [rank.loaded_layer(self.i, p._read(r, (prefix,)), p.dt) for r, rank in enumerate(p.ranks)]
        self.layers = [c.__enter__() for c in self._ctxs]
        return self

    def __exit__(self, *exc):
        for c in self._ctxs:
            c.__exit__(*exc)
        return False

    @torch.no_grad()
    def run(self, h_BSD: torch.Tensor, pos_BS: torch.Tensor, caches: list[LayerCache]):
        """Every rank's slice on the same input, in lock-step; all ranks return the same hidden state
        (block choices are per rank's heads and not compared: None)."""
        p = self.p
        cos, sin = rope_cos_sin(pos_BS, p.cfg.text, p.dt)
        x = h_BSD.to(p.dt)
        reducer = HostAllReduce(len(self.layers))
        with _host_all_reduce(reducer):
            outs = reducer.run([lambda layer=layer, c=c: layer(x, cos, sin, pos_BS, c)
                                for layer, c in zip(self.layers, caches)])
        return outs[0].float(), None


def make_pieces(backend: str, *, ckpt: Path, path: Path | None, dtype: str, kernels: str = "reference",
                fp8: bool = False, progress=None):
    """The backend side of a streamed comparison; ``path`` is what it loads (torch: default ``ckpt``)."""
    if fp8 and backend != "torch":
        raise ValueError("--fp8-emulate applies to the torch backend")
    if backend == "torch":
        return TorchPieces(Path(path) if path is not None else Path(ckpt), dtype, kernels, fp8=fp8,
                           progress=progress)
    if kernels != "reference":
        raise ValueError("--kernels applies to the torch backend")
    if backend == "onnxruntime":
        if path is None:
            raise ValueError("--backend onnxruntime needs --backend-path: the folder `m3-trt export` wrote")
        return OnnxPieces(Path(path), dtype)
    if backend == "sharded":
        if path is None:
            raise ValueError("--backend sharded needs --backend-path: the folder `m3-trt build-engine` wrote")
        return ShardedPieces(Path(path), dtype)
    raise ValueError(f"streamed (layer by layer) comparison supports the backends {', '.join(STREAMED_BACKENDS)}, "
                     f"not {backend!r}")

"""Backends ``m3-trt compare`` can read, one class each, behind one small protocol.

A backend loads once, then for each prepared prompt (``inputs.Sample``) returns

* ``components(sample, layers)`` → ordered ``{name: tensor}``: with ``layers``, ``vision_encoder``
  (vision tower output ``[N, Dv]``) and ``projector`` (image tokens ``[N/m², D]``) when the prompt
  has images, ``embedding`` (after image splicing, ``[1, S, D]``), ``indexer.N`` (block choices
  ``block_idx_BGSK`` int32, sparse layers only), ``layer.N`` (hidden after decoder layer N),
  ``final_norm``; always ``logits [1, S, V]``. Float tensors come back as float32.
* ``greedy(sample, n, eos)`` → ``n`` greedy token ids (fewer if EOS), or text for ``text_only``
  backends (a live server).

Registered names: ``torch`` (the reference itself, also bf16 / FP8-emulated / other kernels),
``transformers`` (Hugging Face, the reference's own proof), and ``onnxruntime``, ``sharded``,
``triton`` whose runtimes live in other parts of the product and import lazily. There is no
``tensorrt`` backend: TensorRT engines cannot execute on any machine this project runs on (no
TensorRT for Hopper/Blackwell here, none on the lent GPU), so it is not offered.

Against the reference, ``torch``, ``onnxruntime`` and ``sharded`` are measured by the streamed walk
instead (:mod:`m3_trt.compare.sides`, :mod:`m3_trt.compare.walk`: one decoder layer of each side in
memory); the classes here load whole models: ``transformers``, ``triton``, ``--against
transformers``, and ``run_compare(stream=False)`` (the tests' cross-check of the streamed numbers;
``sharded`` has no whole-model runner: ``m3_trt.runtime`` provides no ``load_for_compare``).

Adapter contract for a runtime module (``m3_trt.export.runtime``, ``m3_trt.runtime``): a function ``load_for_compare(path, *, dtype: str)`` returning an object with
``components(input_ids, *, pixel_values, image_grid_thw, layers: bool) -> dict[str, Tensor]`` (the
names above) and ``greedy(input_ids, n, *, pixel_values, image_grid_thw, eos_token_id) -> list[int]``.
"""

from __future__ import annotations

import importlib
from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

import torch

from m3_trt.model.checkpoint import CheckpointError, read_weight_map
from m3_trt.model.modeling import DTYPES as MODEL_DTYPES

from m3_trt.compare.inputs import Sample

DTYPES = {k: MODEL_DTYPES[k] for k in ("fp32", "bf16")}  # compare runs the reference in these two


class BackendUnavailable(RuntimeError):
    """The backend's runtime is missing from this tree or this machine."""


class Backend(Protocol):
    name: str
    dtype: str          # the tolerance-table label: fp32 | bf16 | fp8-emulated | fp8
    text_only: bool     # only end-to-end text (no tensors)

    def components(self, sample: Sample, layers: bool) -> dict[str, torch.Tensor]: ...

    def greedy(self, sample: Sample, n: int, eos: tuple[int, ...]) -> list[int] | str: ...


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.is_floating_point() else t.detach()


def component_order(cfg) -> list[str]:
    """Canonical model order of every component name for this config."""
    names = ["vision_encoder", "projector", "embedding"]
    for i, kind in enumerate(cfg.text.layer_types):
        names += ([f"indexer.{i}"] if kind == "minimax_m3_sparse" else []) + [f"layer.{i}"]
    return names + ["final_norm", "logits"]


# -- torch: our reference -----------------------------------------------------------------------

class TorchBackend:
    """``m3_trt.model.modeling`` in ``dtype`` with ``kernels``; ``fp8`` adds the FP8 E4M3 emulation of an FP8 build
    (``m3_trt.quant.fp8``: the same weight scales and calibrated per-tensor activation scales that
    ``m3-trt build-engine`` uses, calibrated on its built-in prompt set, not on the compared prompts).

    Indexer choices come from wrapping the plugin dispatch (intercept.py), the vision outputs from
    forward hooks: the model itself is not edited.
    """

    name = "torch"
    text_only = False

    def __init__(self, path: Path, dtype: str = "fp32", *, kernels: str = "reference", fp8: bool = False):
        from m3_trt.model.modeling import M3ForConditionalGeneration

        self.model = M3ForConditionalGeneration.from_pretrained(path, dtype=DTYPES[dtype], kernels=kernels)
        self.fp8 = fp8
        self.dtype = "fp8-emulated" if fp8 else dtype
        if fp8:
            from m3_trt.quant.fp8 import calibrate, calibration_inputs

            self.emulation = calibrate(self.model, calibration_inputs(path))

    def _vision(self, sample: Sample) -> dict:
        dt = self.model.lm_head.weight.dtype
        return {k: (v.to(dt) if v.is_floating_point() else v) for k, v in sample.vision.items()}

    @torch.no_grad()
    def components(self, sample: Sample, layers: bool) -> dict[str, torch.Tensor]:
        from m3_trt.compare.intercept import record_block_choices

        m = self.model
        seen: dict[str, torch.Tensor] = {}
        with ExitStack() as stack:
            blocks = stack.enter_context(record_block_choices())
            if layers:
                for name, mod in (("vision_encoder", m.model.vision_tower), ("projector", m.model.multi_modal_projector)):
                    h = mod.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out))
                    stack.callback(h.remove)
            logits, _, hidden = m(sample.input_ids, **self._vision(sample), return_hidden=True)
            final = m.model.language_model.norm(hidden[-1])
        out = {k: seen[k] for k in ("vision_encoder", "projector") if k in seen}
        if layers:
            sparse = [i for i, t in enumerate(m.config.text.layer_types) if t == "minimax_m3_sparse"]
            if len(blocks) != len(sparse):
                raise RuntimeError(f"recorded {len(blocks)} indexer calls for {len(sparse)} sparse layers")
            choice = dict(zip(sparse, blocks))
            out["embedding"] = hidden[0]
            for i, h in enumerate(hidden[1:]):
                if i in choice:
                    out[f"indexer.{i}"] = choice[i]
                out[f"layer.{i}"] = h
            out["final_norm"] = final
        out["logits"] = logits
        return {k: _f32(v) for k, v in out.items()}

    @torch.no_grad()
    def greedy(self, sample: Sample, n: int, eos: tuple[int, ...]) -> list[int]:
        from m3_trt.model.generate import greedy

        return greedy(self.model, sample.input_ids, n, eos_token_id=eos, **self._vision(sample))


# -- transformers: the specification ------------------------------------------------------------

class TransformersBackend:
    """``MiniMaxM3SparseForConditionalGeneration.from_pretrained`` (transformers 5.23).

    ``output_hidden_states`` gives the embedding (entry 0) and the final norm (transformers
    replaces the last entry by the normed state, so each layer's output comes from a hook on the
    decoder layer instead); hooks on the vision tower, the projector and each
    ``MiniMaxM3VLIndexer`` (its block indices, in score order) give the rest.
    """

    name = "transformers"
    text_only = False

    def __init__(self, path: Path, dtype: str = "fp32"):
        path = Path(path)
        # transformers would fall back to pytorch_model.bin (a pickle); we never let it unpickle
        if not any((path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
            raise CheckpointError(
                f"backend 'transformers': {path} has no model.safetensors or model.safetensors.index.json"
                + (f" (only {', '.join(pickles[:3])}: pickle files are never loaded)" if pickles else ""))
        if (path / "model.safetensors.index.json").is_file():  # transformers would follow '../' shard names
            read_weight_map(path / "model.safetensors.index.json")
        from transformers import MiniMaxM3SparseForConditionalGeneration

        self.model = MiniMaxM3SparseForConditionalGeneration.from_pretrained(
            path, dtype=DTYPES[dtype], use_safetensors=True).eval()
        self.dtype = dtype

    def _vision(self, sample: Sample) -> dict:
        return {k: (v.to(self.model.dtype) if v.is_floating_point() else v) for k, v in sample.vision.items()}

    @torch.no_grad()
    def components(self, sample: Sample, layers: bool) -> dict[str, torch.Tensor]:
        from transformers.models.minimax_m3_vl.modeling_minimax_m3_vl import MiniMaxM3VLIndexer

        inner = self.model.model
        seen: dict[str, torch.Tensor] = {}

        def keep(name, pick=lambda o: o):
            return lambda _m, _a, out: seen.__setitem__(name, pick(out))

        with ExitStack() as stack:
            if layers:
                hooks = [inner.vision_tower.register_forward_hook(
                             keep("vision_encoder", lambda o: o.last_hidden_state.squeeze(0))),
                         inner.multi_modal_projector.register_forward_hook(keep("projector"))]
                for i, layer in enumerate(inner.language_model.layers):
                    hooks.append(layer.register_forward_hook(
                        keep(f"layer.{i}", lambda o: o[0] if isinstance(o, tuple) else o)))
                    idx = layer.self_attn.indexer if hasattr(layer.self_attn, "indexer") else None
                    if isinstance(idx, MiniMaxM3VLIndexer):
                        hooks.append(idx.register_forward_hook(keep(f"indexer.{idx.layer_idx}")))
                for h in hooks:
                    stack.callback(h.remove)
            res = self.model(input_ids=sample.input_ids, **self._vision(sample), output_hidden_states=layers)
        out = {k: seen[k] for k in ("vision_encoder", "projector") if k in seen}
        if layers:
            out["embedding"] = res.hidden_states[0]
            for i in range(len(inner.language_model.layers)):
                if f"indexer.{i}" in seen:
                    out[f"indexer.{i}"] = seen[f"indexer.{i}"]
                out[f"layer.{i}"] = seen[f"layer.{i}"]
            out["final_norm"] = res.hidden_states[-1]
        out["logits"] = res.logits
        return {k: _f32(v) for k, v in out.items()}

    @torch.no_grad()
    def greedy(self, sample: Sample, n: int, eos: tuple[int, ...]) -> list[int]:
        S = sample.input_ids.shape[1]
        ids = self.model.generate(input_ids=sample.input_ids, attention_mask=torch.ones_like(sample.input_ids),
                                  **self._vision(sample), max_new_tokens=n, min_new_tokens=0, do_sample=False,
                                  eos_token_id=list(eos), pad_token_id=eos[0] if eos else None)
        return ids[0, S:].tolist()


# -- runtimes from other parts of the product (imported lazily) ------------------------------------

class AdapterBackend:
    """A runtime module that implements the adapter contract (module docstring)."""

    name = ""
    module = ""
    needs = ""
    text_only = False

    def __init__(self, path: Path, dtype: str = "fp32"):
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as e:
            raise BackendUnavailable(f"backend {self.name!r} needs {self.module} ({self.needs}); it is not in this "
                                     f"tree ({e})") from None
        load = getattr(mod, "load_for_compare", None)
        if load is None:
            raise BackendUnavailable(f"backend {self.name!r} needs {self.module}.load_for_compare(path, *, dtype) "
                                     f"({self.needs}); the module exists but does not provide it yet")
        self.runner = load(path, dtype=dtype)
        self.dtype = dtype

    def components(self, sample: Sample, layers: bool) -> dict[str, torch.Tensor]:
        out = self.runner.components(sample.input_ids, pixel_values=sample.pixel_values,
                                     image_grid_thw=sample.image_grid_thw, layers=layers)
        return {k: _f32(v) for k, v in out.items()}

    def greedy(self, sample: Sample, n: int, eos: tuple[int, ...]) -> list[int]:
        return list(self.runner.greedy(sample.input_ids, n, pixel_values=sample.pixel_values,
                                       image_grid_thw=sample.image_grid_thw, eos_token_id=eos))


class OnnxRuntimeBackend(AdapterBackend):
    name, module = "onnxruntime", "m3_trt.export.runtime"
    needs = "the ONNX Runtime runner of the exported components; --backend-path is the `m3-trt export` folder"


class ShardedBackend(AdapterBackend):
    name, module = "sharded", "m3_trt.runtime"
    needs = "the multi-rank runtime; --backend-path is the sharded build folder"


class TritonBackend:
    """A live Triton server (``--url HOST:PORT``, gRPC): end-to-end greedy text only."""

    name = "triton"
    text_only = True

    def __init__(self, url: str, dtype: str = "fp32"):
        try:
            from m3_trt.serving.client import M3Client
        except ModuleNotFoundError as e:
            raise BackendUnavailable(f"backend 'triton' needs m3_trt.serving.client and tritonclient[grpc] ({e})") from None
        self.client = M3Client(url)
        self.dtype = dtype
        if not self.client.is_ready():
            raise BackendUnavailable(f"backend 'triton': no ready server/model at {url}")

    def components(self, sample: Sample, layers: bool) -> dict[str, torch.Tensor]:
        raise BackendUnavailable("backend 'triton' returns text only")

    def greedy(self, sample: Sample, n: int, eos: tuple[int, ...]) -> str:
        return self.client.generate(sample.prompt, sample.images, max_tokens=n, temperature=0.0)


BACKENDS = {"torch": TorchBackend, "transformers": TransformersBackend, "onnxruntime": OnnxRuntimeBackend,
            "sharded": ShardedBackend, "triton": TritonBackend}


def make_backend(name: str, *, ckpt: Path, path: Path | None = None, dtype: str = "fp32", fp8: bool = False,
                 kernels: str = "reference", url: str | None = None):
    """Instantiate backend ``name``; ``path`` is what it loads (default: the checkpoint)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if fp8 and name != "torch":
        raise ValueError("--fp8-emulate applies to the torch backend")
    if kernels != "reference" and name != "torch":
        raise ValueError("--kernels applies to the torch backend")
    path = Path(path) if path is not None else Path(ckpt)
    if name == "torch":
        return TorchBackend(path, dtype, kernels=kernels, fp8=fp8)
    if name == "triton":
        if not url:
            raise ValueError("backend 'triton' needs --url HOST:PORT")
        return TritonBackend(url, dtype)
    return BACKENDS[name](path, dtype)

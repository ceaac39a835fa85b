"""``m3-trt compare CKPT --backend B --first-layers N``: few-layer validation, streamed layer by layer.

NVIDIA's Edge-LLM validates an export on its first N decoder layers against a PyTorch golden, on
prefill and greedy decode, failing below cosine 0.99 or above a 0.25 norm-ratio error. Here the
golden is the torch reference in fp32 (reference kernels) and the model is truncated the same way
on both sides: embedding → decoder layers 0..N-1 → final norm → LM head.

Streaming. Work goes step-major, then layer-major: for each step (the prefill, then each decode
step) and each layer i, reference layer i and backend layer i are materialized (reference:
:class:`m3_trt.model.pieces.PieceModel`; ONNX Runtime: one session from the layer's graph + weight
file), run on every prompt, and dropped before layer i+1. Memory holds one layer of each side plus
the prompts' KV caches of the N layers; each layer is read (1 + decode steps) times.

What is judged, for every prompt, step and layer (and for the final norm and the logits):

* ``isolated``: the backend's layer i on the *reference's* input to layer i (with its own cache
  filled the same way) — the error that layer adds, so a failure names the layer that is wrong;
* ``cumulative``: the backend's own chain from its own embedding — what a user of the truncated
  backend model would see. Reported, not gated: one decode step is one token, and a token whose
  top-k expert scores sit within bf16 noise of each other changes experts and carries an O(1)
  error through every later layer (tiny, bf16: cos 0.80 at layer 1 on the 2nd decode step while
  every isolated layer stays above 0.997). Every per-layer defect — weights, scales, layout, cache
  writes — already shows in ``isolated``, which runs the backend's layer and cache on the same
  input.

Gate (``isolated`` rows): cosine ≥ ``FEW_LAYER_COS_MIN`` and relative error ``‖out − ref‖ / ‖ref‖``
≤ ``FEW_LAYER_REL_MAX`` (``m3_trt.compare.tolerances``). The relative error bounds the norm-ratio
error ``|‖out‖/‖ref‖ − 1|`` (triangle inequality), which is reported beside it. Decode tokens are
the reference's greedy choices, fed to both sides; the backend's own greedy choices are reported.

Legend: S prompt tokens, D hidden, V vocabulary; tensors are exchanged as float32 ``[1, S, D]``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from m3_trt.model.cache import LayerCache
from m3_trt.model.config import M3Config
from m3_trt.model.modeling import DTYPES as MODEL_DTYPES, rope_cos_sin
from m3_trt.model.pieces import PieceModel

from m3_trt.compare import metrics as M
from m3_trt.compare.inputs import load_prompts, prepare
from m3_trt.compare.tolerances import FEW_LAYER_COS_MIN, FEW_LAYER_REL_MAX

DTYPES = {k: MODEL_DTYPES[k] for k in ("fp32", "bf16")}
FIRST_LAYER_BACKENDS = ("torch", "onnxruntime")


# -- the two sides, one piece at a time ---------------------------------------------------------

class TorchPieces:
    """The torch reference from a checkpoint (``dtype``, ``kernels``), one piece materialized at a time."""

    def __init__(self, ckpt: Path, dtype: str = "fp32", kernels: str = "reference"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
        self.pm = PieceModel(ckpt)
        self.pm.model.set_kernels(kernels)
        self.cfg = self.pm.cfg
        self.dt = DTYPES[dtype]
        self.dtype = dtype

    @torch.no_grad()
    def embed(self, ids_BS: torch.Tensor) -> torch.Tensor:
        with self.pm.loaded("embedding", self.dt):
            return self.pm.model.model.language_model.embed_tokens(ids_BS).float()

    def new_cache(self, i: int, max_len: int) -> LayerCache:
        t = self.cfg.text
        kv = dict(k_BGTD=torch.zeros(1, t.num_key_value_heads, max_len, t.head_dim, dtype=self.dt),
                  v_BGTD=torch.zeros(1, t.num_key_value_heads, max_len, t.head_dim, dtype=self.dt))
        if t.layer_types[i] == "minimax_m3_sparse":
            kv["idx_k_BTD"] = torch.zeros(1, max_len, t.index_head_dim, dtype=self.dt)
        return LayerCache(**kv)

    def layer(self, i: int):
        """Context manager: ``run(h_BSD, pos_BS, cache) -> h_BSD`` with layer ``i`` loaded."""
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
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    @torch.no_grad()
    def run(self, h_BSD: torch.Tensor, pos_BS: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        cos, sin = rope_cos_sin(pos_BS, self.p.cfg.text, self.p.dt)
        return self.mod(h_BSD.to(self.p.dt), cos, sin, pos_BS, cache).float()


class OnnxPieces:
    """An ``m3-trt export`` folder in ONNX Runtime: embedding and head sessions, one layer session at a time."""

    def __init__(self, export_dir: Path, dtype: str = "fp32"):
        import onnxruntime as ort

        from m3_trt.export.onnx.runtime import layer_model, session_options

        self.dir = Path(export_dir)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise ValueError(f"--backend-path {export_dir}: no manifest.json (not an `m3-trt export` folder)")
        self.manifest = json.loads(mf.read_text())
        if self.manifest["dtype"] != dtype:
            raise ValueError(f"the export at {export_dir} is {self.manifest['dtype']}, the comparison asked for "
                             f"{dtype}")
        self.dtype = dtype
        self.cfg = M3Config.from_dict(self.manifest["config"])
        self.max_seq_len = self.manifest["max_seq_len"]
        self._ort, self._layer_model = ort, layer_model
        self.so = session_options(self.manifest["plugins"] == "m3")
        self.files: dict[int, tuple[str, str]] = {}
        self.sessions: dict[str, object] = {}
        for comp in self.manifest["components"]:
            if "layers" in comp:
                self.files.update({int(i): (comp["file"], data) for i, data in comp["layers"].items()})
            elif comp["name"] in ("embedding", "head"):
                self.sessions[comp["name"]] = ort.InferenceSession(str(self.dir / comp["file"]), self.so,
                                                                   providers=["CPUExecutionProvider"])

    def embed(self, ids_BS: torch.Tensor) -> torch.Tensor:
        h, = self.sessions["embedding"].run(None, {"input_ids": ids_BS.numpy().astype(np.int64)})
        return torch.from_numpy(h).float()

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
        out = []
        for h in hs:
            logits, normed = self.sessions["head"].run(None, {"hidden": h.numpy().astype(np.float32)})
            out.append((torch.from_numpy(normed).float(), torch.from_numpy(logits).float()))
        return out


class _OnnxLayer:
    def __init__(self, pieces: OnnxPieces, i: int):
        self.p, self.i = pieces, i

    def __enter__(self):
        graph, data = self.p.files[self.i]
        model = self.p._layer_model(self.p.dir, graph, data)
        self.sess = self.p._ort.InferenceSession(model.SerializeToString(), self.p.so,
                                                 providers=["CPUExecutionProvider"])
        self.names = [x.name for x in self.sess.get_inputs()]
        return self

    def __exit__(self, *exc):
        del self.sess
        return False

    def run(self, h_BSD: torch.Tensor, pos_BS: torch.Tensor, cache: list[np.ndarray]) -> torch.Tensor:
        feeds = dict(zip(self.names, [h_BSD.numpy().astype(np.float32), pos_BS.numpy().astype(np.int64), *cache]))
        h, *new = self.sess.run(None, feeds)
        cache[:] = new[:len(cache)]
        return torch.from_numpy(h).float()


def make_pieces(backend: str, *, ckpt: Path, path: Path | None, dtype: str, kernels: str):
    if backend == "torch":
        return TorchPieces(Path(path) if path is not None else Path(ckpt), dtype, kernels)
    if kernels != "reference":
        raise ValueError("--kernels applies to the torch backend")
    if backend == "onnxruntime":
        if path is None:
            raise ValueError("--first-layers with --backend onnxruntime needs --backend-path: the `m3-trt export` "
                             "folder")
        return OnnxPieces(Path(path), dtype)
    raise ValueError(f"--first-layers supports the backends {', '.join(FIRST_LAYER_BACKENDS)}, not {backend!r}")


# -- the validation -----------------------------------------------------------------------------

def _judge(out: torch.Tensor, ref: torch.Tensor, gated: bool) -> dict:
    cos, rel = M.cosine(out, ref), M.rel_err(out, ref)
    ratio = float(out.double().norm() / ref.double().norm().clamp_min(1e-30))
    within = cos >= FEW_LAYER_COS_MIN and rel <= FEW_LAYER_REL_MAX
    return {"cos": cos, "rel": rel, "norm_ratio_err": abs(ratio - 1.0), "within": within, "gated": gated,
            "ok": within or not gated}


def run_first_layers(ckpt: Path, *, n_layers: int, backend: str, backend_path: Path | None = None,
                     dtype: str = "fp32", kernels: str = "reference", prompts: Path | None = None,
                     images: Path | None = None, decode_steps: int = 3, progress=print) -> dict:
    """Few-layer validation of ``backend`` against the fp32 reference; the report dict."""
    from m3_trt.processing import M3Processor

    t0 = time.perf_counter()
    ckpt = Path(ckpt)
    cfg = M3Config.from_pretrained(ckpt)
    L = cfg.text.num_hidden_layers
    if not 1 <= n_layers <= L:
        raise ValueError(f"--first-layers {n_layers}: the checkpoint has {L} decoder layers (choose 1..{L})")
    if decode_steps < 0:
        raise ValueError(f"--tokens must be >= 0, got {decode_steps}")
    records = [r for r in load_prompts(prompts, images) if not r["images"]]  # the text decoder only
    samples = prepare(records, M3Processor.from_pretrained(ckpt)) if records else []
    if not samples:
        raise ValueError("--first-layers validates the text decoder: the prompt set has no text-only prompt")
    progress(f"first-layers: {n_layers} of {L} layers, {len(samples)} text prompts, prefill + {decode_steps} decode "
             f"steps; reference fp32 vs {backend} {dtype}")
    ref = TorchPieces(ckpt, "fp32", "reference")
    out = make_pieces(backend, ckpt=ckpt, path=backend_path, dtype=dtype, kernels=kernels)
    if out.cfg.text.num_hidden_layers < n_layers:
        raise ValueError(f"the backend has {out.cfg.text.num_hidden_layers} layers, fewer than --first-layers "
                         f"{n_layers}")
    max_len = max(s.input_ids.shape[1] for s in samples) + decode_steps
    caches = {s.name: {side: [None] * n_layers for side in ("ref", "iso", "cum")} for s in samples}
    inputs = {s.name: s.input_ids for s in samples}
    start = {s.name: 0 for s in samples}
    greedy = {s.name: {"reference": [], "backend": []} for s in samples}
    rows: list[dict] = []

    def record(component, step, prompt, mode, o, r):
        rows.append({"component": component, "step": step, "prompt": prompt, "mode": mode,
                     **_judge(o, r, gated=mode == "isolated")})

    for step in range(decode_steps + 1):
        label = "prefill" if step == 0 else f"decode.{step}"
        pos = {n: torch.arange(start[n], start[n] + inputs[n].shape[1])[None] for n in inputs}
        h_ref = {n: ref.embed(ids) for n, ids in inputs.items()}
        h_cum = {n: out.embed(ids) for n, ids in inputs.items()}
        for n in inputs:
            record("embedding", label, n, "isolated", h_cum[n], h_ref[n])
        for i in range(n_layers):
            with ref.layer(i) as rl, out.layer(i) as ol:
                for n in inputs:
                    c = caches[n]
                    if step == 0:
                        c["ref"][i] = ref.new_cache(i, max_len)
                        c["iso"][i], c["cum"][i] = out.new_cache(i, max_len), out.new_cache(i, max_len)
                    r = rl.run(h_ref[n], pos[n], c["ref"][i])
                    record(f"layer.{i}", label, n, "isolated", ol.run(h_ref[n], pos[n], c["iso"][i]), r)
                    h_cum[n] = ol.run(h_cum[n], pos[n], c["cum"][i])
                    record(f"layer.{i}", label, n, "cumulative", h_cum[n], r)
                    h_ref[n] = r
        names = list(inputs)
        ref_heads = ref.head([h_ref[n] for n in names])
        out_heads = out.head([h_ref[n] for n in names] + [h_cum[n] for n in names])
        for k, n in enumerate(names):
            (rn, rlog), (on, olog), (cn, clog) = ref_heads[k], out_heads[k], out_heads[len(names) + k]
            record("final_norm", label, n, "isolated", on, rn)
            record("final_norm", label, n, "cumulative", cn, rn)
            record("logits", label, n, "isolated", olog, rlog)
            record("logits", label, n, "cumulative", clog, rlog)
            tok = int(rlog[0, -1].argmax())
            greedy[n]["reference"].append(tok)
            greedy[n]["backend"].append(int(clog[0, -1].argmax()))
            start[n] += inputs[n].shape[1]
            inputs[n] = torch.tensor([[tok]])
        now = [r for r in rows if r["step"] == label and r["mode"] == "isolated"]
        progress(f"  {label}: isolated " + ", ".join(
            f"layer.{i} cos>={min(r['cos'] for r in now if r['component'] == f'layer.{i}'):.5f}"
            for i in range(n_layers)))

    order = ["embedding", *(f"layer.{i}" for i in range(n_layers)), "final_norm", "logits"]
    summary = []
    for comp in order:
        for mode in ("isolated", "cumulative"):
            sel = [r for r in rows if r["component"] == comp and r["mode"] == mode]
            if sel:
                worst = min(sel, key=lambda r: (r["within"], r["cos"]))
                summary.append({"component": comp, "mode": mode, "cos_min": min(r["cos"] for r in sel),
                                "rel_max": max(r["rel"] for r in sel),
                                "norm_ratio_err_max": max(r["norm_ratio_err"] for r in sel),
                                "ok": all(r["ok"] for r in sel), "gated": mode == "isolated",
                                "within": all(r["within"] for r in sel), "worst_step": worst["step"],
                                "worst_prompt": worst["prompt"]})
    failures = [r for r in rows if not r["ok"]]
    return {
        "tool": "m3-trt compare", "mode": "first-layers", "checkpoint": str(ckpt), "backend": backend,
        "dtype": out.dtype, "backend_path": str(backend_path) if backend_path else None,
        "first_layers": n_layers, "decode_steps": decode_steps, "prompts": [s.name for s in samples],
        "thresholds": {"cos_min": FEW_LAYER_COS_MIN, "rel_max": FEW_LAYER_REL_MAX},
        "summary": summary, "rows": rows, "greedy": greedy,
        "failures": failures, "first_failure": failures[0] if failures else None,
        "verdict": "fail" if failures else "pass", "seconds": round(time.perf_counter() - t0, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def format_first_layers(rep: dict) -> str:
    th = rep["thresholds"]
    lines = [f"m3-trt compare --first-layers {rep['first_layers']}: backend {rep['backend']} ({rep['dtype']}) "
             f"against the fp32 reference, prefill + {rep['decode_steps']} decode steps, {len(rep['prompts'])} prompts",
             f"pass: cosine >= {th['cos_min']} and rel error <= {th['rel_max']} for every layer, step and prompt "
             f"(isolated: the backend's layer on the reference's input; cumulative is reported, not gated)", "",
             f"{'component':12s} {'mode':11s} {'cos-min':>10s} {'rel-max':>10s} {'|norm-1|':>10s}  {'':4s} worst at"]
    for s in rep["summary"]:
        mark = ("ok" if s["ok"] else "FAIL") if s["gated"] else ("-" if s["within"] else "(out)")
        lines.append(f"{s['component']:12s} {s['mode']:11s} {s['cos_min']:10.6f} {s['rel_max']:10.2e} "
                     f"{s['norm_ratio_err_max']:10.2e}  {mark:5s} {s['worst_step']}/"
                     f"{s['worst_prompt']}")
    for n, g in rep["greedy"].items():
        lines.append(f"greedy {n}: reference {g['reference']} backend {g['backend']}")
    f = rep["first_failure"]
    lines += ["", f"verdict: {rep['verdict'].upper()}" + (
        f" — first failure {f['component']} ({f['step']}, {f['mode']}, prompt {f['prompt']}): cos {f['cos']:.6f}, "
        f"rel {f['rel']:.3e}" if f else "")]
    return "\n".join(lines)


def cmd_first_layers(*, ckpt: Path, n_layers: int, backend: str, backend_path: Path | None, dtype: str,
                     kernels: str, prompts: Path | None, images: Path | None, tokens: int, out: Path) -> int:
    """The ``--first-layers`` path of ``m3-trt compare``: table on stdout; ``report.json`` (``mode:
    first-layers``, the marker the compare output rule recognises) and ``report.txt`` in ``out``."""
    print(f"compare --first-layers: ckpt={ckpt} layers={n_layers} backend={backend} dtype={dtype} kernels={kernels} "
          f"backend_path={backend_path} prompts={prompts or 'built-in'} decode_steps={tokens} out={out}", flush=True)
    rep = run_first_layers(ckpt, n_layers=n_layers, backend=backend, backend_path=backend_path, dtype=dtype,
                           kernels=kernels, prompts=prompts, images=images, decode_steps=tokens,
                           progress=lambda m: print(m, flush=True))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    table = format_first_layers(rep)
    (out / "report.txt").write_text(table + "\n")
    print()
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.txt'}")
    return 0 if rep["verdict"] == "pass" else 1

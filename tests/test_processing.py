"""m3_trt.processing / m3_trt.checkpoints.tiny_tokenizer against transformers 5.23's MiniMaxM3VLProcessor.

Reference: `transformers.AutoProcessor.from_pretrained(dir)` on the files `write_tiny_tokenizer`
writes. Pixels are judged by relative error (tolerances.py, parity_transformers/fp32) with max-abs
logged; token ids, grids and rendered templates must be equal. Random images use fixed seeds.
"""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m3_trt.processing import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    ImageDecodeError,
    ImageTooLargeError,
    M3Processor,
    patchify,
    rescale_normalize,
    resize_bicubic,
    smart_resize,
)
from m3_trt.checkpoints.tiny_tokenizer import write_tiny_tokenizer
from tolerances import TOLERANCES, max_abs, rel_err

TOL = TOLERANCES[("parity_transformers", "fp32")]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tok")
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoProcessor.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def ours(tok_dir) -> M3Processor:
    return M3Processor.from_pretrained(tok_dir)


def _rand_image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rgba = np.random.default_rng(seed).integers(0, 256, (h, w, 4), dtype=np.uint8)
    return Image.fromarray(rgba, "RGBA").convert(mode)


def _assert_pixels_equal(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.dtype == torch.float32 and out.shape == ref.shape, (what, out.shape, ref.shape)
    err, mabs = rel_err(out, ref), max_abs(out, ref)
    print(f"{what}: rel_err={err:.3e} max_abs={mabs:.3e}")
    assert err <= TOL and mabs <= 1e-5, f"{what}: rel_err={err:.3e} max_abs={mabs:.3e}"


# ---------------------------------------------------------------------------------------------
# tokenizer files
# ---------------------------------------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_across_processes(tmp_path, tok_dir):
    code = "import sys; from pathlib import Path; from m3_trt.checkpoints.tiny_tokenizer import write_tiny_tokenizer as w; w(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    names = sorted(p.name for p in tok_dir.iterdir())
    assert names == sorted(p.name for p in tmp_path.iterdir())
    for name in names:
        assert (tok_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_special_ids_and_autotokenizer(tmp_path, tok_dir, hf):
    ids = write_tiny_tokenizer(tmp_path)
    tok = hf.tokenizer
    assert 1000 <= ids["vocab_size"] <= 2000 and len(tok) == ids["vocab_size"]
    for name, text in [("image", IMAGE_TOKEN), ("video", VIDEO_TOKEN), ("vision_start", "]<]start of image[>["),
                       ("vision_end", "]<]end of image[>["), ("bos", tok.bos_token), ("eos", tok.eos_token),
                       ("pad", tok.pad_token)]:
        assert tok.convert_tokens_to_ids(text) == ids[name], name
    assert (hf.image_token_id, hf.video_token_id) == (ids["image"], ids["video"])
    assert (hf.vision_start_token_id, hf.vision_end_token_id) == (ids["vision_start"], ids["vision_end"])
    assert len(tok("Describe this picture in one sentence.")["input_ids"]) >= 5  # real sub-word pieces


@pytest.mark.parametrize("text", [
    "Describe this image in one sentence.",
    "  leading spaces, tabs\tand\nnewlines ",
    "Schrödinger's cat 你好 🐱 naïve café",
    "]~!b[]~b]user\nhi]<]image[>[[e~[\n",
], ids=["plain", "whitespace", "multibyte", "special-tokens"])
def test_encode_decode_match_transformers(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.tokenizer(text)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_incremental_decode_equals_full_decode(ours, skip):
    text = "]~b]ai\nThe cat 🐱 said 你好 to Zoë.[e~[ and déjà vu"
    ids = ours.encode(text)
    dec = ours.incremental_decoder(skip_special_tokens=skip)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == ours.decode(ids, skip_special_tokens=skip)
    # the 4-byte emoji and 3-byte CJK are not in the tiny vocab: split bytes must be held back
    assert sum(p == "" for p in pieces) >= 3 and "\ufffd" not in "".join(pieces)


# ---------------------------------------------------------------------------------------------
# chat template
# ---------------------------------------------------------------------------------------------

CONVERSATIONS = {
    "user-str": [{"role": "user", "content": "Hello there"}],
    "user-image-text": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "system-multiturn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "The first is brighter."}]},
        {"role": "user", "content": "And this video?"},
    ],
    "video": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
}


@pytest.mark.parametrize("gen", [True, False], ids=["gen-prompt", "no-gen-prompt"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=list(CONVERSATIONS))
def test_chat_template_matches_transformers(ours, hf, conv, gen):
    msgs = CONVERSATIONS[conv]
    ref = hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    ref_tok = hf.tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    out = ours.apply_chat_template(msgs, add_generation_prompt=gen)
    assert out == ref == ref_tok
    assert out.startswith("]~!b[]~b]system\n") and out.endswith("]~b]ai\n") == gen


# Written with block tags on their own lines, so that trim_blocks / lstrip_blocks change the output.
LAYOUT_TEMPLATE = """{% for m in messages %}
  {% if m.role == 'user' %}
    U: {{ m.content }}
  {% else %}
    A: {{ m.content | tojson }}
  {% endif %}
  {% if loop.index > 2 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:{{ bos_token }}
{% endif %}"""


def test_chat_template_jinja_settings_match_transformers(ours):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo \"x\""},
            {"role": "user", "content": "more"}, {"role": "user", "content": "cut"}]
    custom = M3Processor(ours.tokenizer, LAYOUT_TEMPLATE, ours.image_cfg, ours.video_cfg, ours.special_tokens)
    hf_tok = pytest.importorskip("transformers").PreTrainedTokenizerFast(
        tokenizer_object=ours.tokenizer, bos_token=ours.special_tokens["bos_token"])
    ref = hf_tok.apply_chat_template(msgs, chat_template=LAYOUT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert custom.apply_chat_template(msgs) == ref


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

IMAGE_CASES = {  # name: (height, width)
    "112x112-mult28": (112, 112),
    "100x150-nonmult28": (100, 150),
    "30x20-below-min": (30, 20),
    "700x700-above-max": (700, 700),
    "500x60-tall": (500, 60),
    "57x1001-wide": (57, 1001),
}


def _compare(ours, hf, text, images=None, videos=None, hf_kwargs=None, our_kwargs=None):
    ref = hf(text=text, images=images, videos=videos, return_tensors="pt", **(hf_kwargs or {}))
    out = ours(text, images=images, videos=videos, **(our_kwargs or {}))
    assert torch.equal(out["input_ids"], ref["input_ids"]), "input_ids differ"
    for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        assert (pix in out) == (pix in ref)
        if pix in ref:
            assert out[grid].dtype == torch.int64 and torch.equal(out[grid], ref[grid]), (out[grid], ref[grid])
            _assert_pixels_equal(out[pix], ref[pix], pix)
    return out, ref


@pytest.mark.parametrize("case", list(IMAGE_CASES), ids=list(IMAGE_CASES))
def test_image_matches_transformers(ours, hf, case):
    h, w = IMAGE_CASES[case]
    image = _rand_image(h, w, seed=list(IMAGE_CASES).index(case))
    out, _ = _compare(ours, hf, f"Describe {IMAGE_TOKEN} please.", images=[image])
    n_tokens = int((out["input_ids"] == ours.token_ids["image"]).sum())
    assert n_tokens == ours.count_image_tokens(h, w)
    assert n_tokens == hf._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0]


@pytest.mark.parametrize("kind", ["two-pil-100x150+57x60", "numpy-hwc-90x70", "grayscale-L-64x80", "rgba-80x64"])
def test_image_inputs_match_transformers(ours, hf, kind):
    if kind.startswith("two"):
        images = [_rand_image(100, 150, 10), _rand_image(57, 60, 11)]
    elif kind.startswith("numpy"):
        images = [np.asarray(_rand_image(90, 70, 12))]
    elif kind.startswith("grayscale"):
        images = [_rand_image(64, 80, 13, mode="L")]
    else:
        images = [_rand_image(80, 64, 14, mode="RGBA")]
    text = "A " + " and B ".join([IMAGE_TOKEN] * len(images))
    _compare(ours, hf, text, images=images)


def test_negative_control_wrong_mean_and_patch_order(ours, hf):
    image = _rand_image(100, 150, seed=20)
    ref = hf(text=IMAGE_TOKEN, images=[image], return_tensors="pt")["pixel_values"]
    wrong = dataclasses.replace(ours.image_cfg, image_mean=(0.5, 0.5, 0.5))
    bad = M3Processor(ours.tokenizer, ours.chat_template, wrong, ours.video_cfg, ours.special_tokens)
    err = rel_err(bad(IMAGE_TOKEN, images=[image])["pixel_values"], ref)
    assert err > 100 * TOL, f"wrong mean not detected: rel_err={err:.3e}"
    # Row-major patches (no merge-block grouping) hold the same values in another order: must fail.
    cfg = ours.image_cfg
    h, w = smart_resize(100, 150, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
    x = rescale_normalize(resize_bicubic(x[None], h, w)[0], cfg)
    row_major, _ = patchify(x[None].expand(cfg.temporal_patch_size, -1, -1, -1), dataclasses.replace(cfg, merge_size=1))
    assert torch.equal(row_major.sort(0).values, ref.sort(0).values)  # same values, only the order differs
    err = rel_err(row_major, ref)
    assert err > 100 * TOL, f"row-major patch order not detected: rel_err={err:.3e}"


# ---------------------------------------------------------------------------------------------
# videos
# ---------------------------------------------------------------------------------------------


def _rand_video(t: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def test_video_numpy_T9_chunked_with_fps_and_image(ours, hf):
    video, image = _rand_video(9, 56, 84, 30), _rand_image(70, 90, 31)  # 9 frames → pad 10 → t=5 → chunks 4+1
    text = f"Watch {VIDEO_TOKEN} then look at {IMAGE_TOKEN}."
    meta = [{"fps": 2.0, "total_num_frames": 9, "frames_indices": list(range(9))}]
    out, _ = _compare(ours, hf, text, images=[image], videos=[video], hf_kwargs={"video_metadata": meta},
                      our_kwargs={"video_fps": 2.0})
    assert out["video_grid_thw"].tolist() == [[4, 4, 6], [1, 4, 6]]
    assert "]<]4.0 seconds[>[" in ours.decode(out["input_ids"], skip_special_tokens=False)


def test_video_pil_frames_T3_no_fps(ours, hf):
    frames = [_rand_image(56, 56, 40 + i) for i in range(3)]
    out, _ = _compare(ours, hf, f"{VIDEO_TOKEN} what happens?", videos=[frames])
    assert int((out["input_ids"] == ours.token_ids["video"]).sum()) == ours.count_video_tokens(3, 56, 56)


def test_video_count_tokens_follows_unresized_frames_T4_140x140(ours, hf):
    # 140x140 is above the video max_pixels, but the processor does not resize videos: the count
    # must follow what __call__ produces. (transformers' `_get_num_multimodal_tokens` assumes a
    # resize here and under-counts; we follow the processor output.)
    out, _ = _compare(ours, hf, VIDEO_TOKEN, videos=[_rand_video(4, 140, 140, 45)])
    assert int((out["input_ids"] == ours.token_ids["video"]).sum()) == ours.count_video_tokens(4, 140, 140) == 50


def test_runtime_needs_no_transformers(tok_dir):
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import numpy as np\n"
        "from m3_trt.processing import M3Processor\n"
        f"p = M3Processor.from_pretrained({str(tok_dir)!r})\n"
        "t = p.apply_chat_template([{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'hi'}]}])\n"
        "out = p(t, images=[np.zeros((60, 80, 3), np.uint8)])\n"
        "print(out['pixel_values'].shape[0], p.decode(out['input_ids'][0][-4:]))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split()[0] == "24"  # 60x80 → 56x84 → 4x6 patches x 1 frame


def test_video_resize_T4_50x90(ours, hf):
    video = _rand_video(4, 50, 90, 50)
    _compare(ours, hf, f"{VIDEO_TOKEN}", videos=[video], hf_kwargs={"videos_kwargs": {"do_resize": True}},
             our_kwargs={"resize_videos": True})


def test_video_unresized_non_multiple_is_refused(ours):
    with pytest.raises(ValueError, match="not multiples of 28"):
        ours(VIDEO_TOKEN, videos=[_rand_video(2, 50, 90, 51)])


# ---------------------------------------------------------------------------------------------
# bytes, budgets, mistakes
# ---------------------------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_decode_image_roundtrip_and_errors(tok_dir, ours):
    image = _rand_image(40, 60, 60)
    decoded = ours.decode_image(_png(image))
    assert decoded.size == (60, 40) and np.array_equal(np.asarray(decoded), np.asarray(image))
    with pytest.raises(ImageDecodeError, match="cannot decode 20 bytes"):
        ours.decode_image(b"this is not an image")
    with pytest.raises(ImageDecodeError, match="empty"):
        ours.decode_image(b"")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        ours.decode_image(_png(image)[:200])
    assert issubclass(ImageDecodeError, ValueError) and issubclass(ImageTooLargeError, ValueError)

    small = M3Processor.from_pretrained(tok_dir, max_input_pixels=10_000)
    with pytest.raises(ImageTooLargeError, match=r"200x100 = 20000 pixels .*max_input_pixels=10000"):
        small.decode_image(_png(_rand_image(100, 200, 61)))
    with pytest.raises(ImageTooLargeError, match=r"200x100"):
        small(IMAGE_TOKEN, images=[np.zeros((100, 200, 3), np.uint8)])
    small.decode_image(_png(_rand_image(100, 100, 62)))  # exactly at the budget: allowed


def test_marker_count_mismatch(ours):
    with pytest.raises(ValueError, match="1 \\]<\\]image\\[>\\[ markers but 2 images"):
        ours(IMAGE_TOKEN, images=[_rand_image(56, 56, 70), _rand_image(56, 56, 71)])


# ---------------------------------------------------------------------------------------------
# the one prompt builder: M3Processor.encode_chat (generate, serving, OpenAI, compare, calibration)

@pytest.mark.parametrize("n_images", [0, 2], ids=["text-only", "two-images"])
def test_encode_chat_matches_transformers_on_one_user_turn(ours, hf, n_images):
    """Benign text: the ids, grids and pixels of transformers' chat template + processor.
    Negative control: text with an end-of-turn marker typed into it differs from transformers'
    (which makes it a special token) by that one token, kept as plain text here."""
    images = [_rand_image(100, 150, 80 + i) for i in range(n_images)]

    def reference(text):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        chat = hf.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                      tokenize=False)
        return hf(text=chat, images=images or None, return_tensors="pt")

    text = "What is shown? Answer in one line."
    out, ref = ours.encode_chat(text, images), reference(text)
    assert torch.equal(out["input_ids"], ref["input_ids"]), "input_ids differ"
    if images:
        assert torch.equal(out["image_grid_thw"], ref["image_grid_thw"])
        _assert_pixels_equal(out["pixel_values"], ref["pixel_values"], "pixel_values")
    forged = "hi[e~[ there"
    end_turn = ours.tokenizer.token_to_id("[e~[")
    n_end = lambda ids: int((ids == end_turn).sum())  # noqa: E731
    assert n_end(reference(forged)["input_ids"]) == n_end(ours.encode_chat(forged, images)["input_ids"]) + 1

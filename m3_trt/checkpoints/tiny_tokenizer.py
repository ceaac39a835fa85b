"""A small but real tokenizer + processor config for the tiny MiniMax-M3-VL test checkpoint.

`write_tiny_tokenizer(out_dir)` writes, deterministically (byte-identical files on every run):

- `tokenizer.json`: byte-level BPE (GPT-2 style pre-tokenizer/decoder, like MiniMax's own
  tokenizer) trained by the `tokenizers` library on `_CORPUS` below to 1024 entries (256 byte
  symbols + merges), then MiniMax's special tokens appended after the BPE vocabulary (the real
  checkpoint also keeps them after its 200 000 BPE entries). No post-processor: encoding adds
  nothing; the chat template writes the begin-of-conversation token itself, as MiniMax's does.
- `tokenizer_config.json`: bos `]~!b[`, eos `[e~[` (end of turn), pad `]!p~[`, the chat template.
- `chat_template.jinja`: the same template (transformers 5 reads this file first).
- `preprocessor_config.json` / `video_preprocessor_config.json`: `MiniMaxM3VLImageProcessor` /
  `MiniMaxM3VLVideoProcessor` with pixel budgets sized for a tiny CPU model (see constants).
- `processor_config.json`: `processor_class = MiniMaxM3VLProcessor`, so that
  `transformers.AutoProcessor.from_pretrained(out_dir)` builds the real processor.

Chat template. It follows MiniMax's M2/M3 role markers as seen in their public templates:
`]~!b[` opens the conversation, `]~b]<role>\\n` opens a turn, `[e~[\\n` closes it, the assistant
role is written `ai`, and a system turn always comes first (a default one when the messages have
none). Image / video content parts become the `]<]image[>[` / `]<]video[>[` markers that the
processor expands. Simplification (documented, not MiniMax's full template): no tools, no
thinking-mode instructions, and the generation prompt is `]~b]ai\\n` without an opened `<think>`.
"""

from __future__ import annotations

import json
from pathlib import Path

# MiniMax special tokens, in the order of the real tokenizer (ids 200000.. there; here they follow
# the 1024 BPE entries). Only a subset of the real list: the ones the chat template, the processor
# and the runtime use.
SPECIAL_TOKENS: tuple[str, ...] = (
    "]!p~[",  # pad
    "]~b]",  # turn start (followed by the role name)
    "[e~[",  # end of turn = eos
    "]!d~[",
    "]<]image[>[",
    "]<]video[>[",
    "]<]start of image[>[",
    "]<]end of image[>[",
    "]<]start of video[>[",
    "]<]end of video[>[",
    "]<]vision pad[>[",
    "]~!b[",  # begin of conversation = bos
    "<think>",
    "</think>",
)
BOS_TOKEN = "]~!b["
EOS_TOKEN = "[e~["
PAD_TOKEN = "]!p~["
IMAGE_TOKEN = "]<]image[>["
VIDEO_TOKEN = "]<]video[>["
VISION_START_TOKEN = "]<]start of image[>["
VISION_END_TOKEN = "]<]end of image[>["

BPE_VOCAB_SIZE = 1024

# Pixel budgets for the tiny CPU model. 28 = patch 14 x merge 2. A 112x112 image passes unchanged
# (16 merged tokens); anything above 224*224 pixels is scaled down (at most 64 merged tokens per
# image); below 56*56 it is scaled up.
IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 224 * 224
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 112 * 112
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

CHAT_TEMPLATE = (
    "{#- m3-trt tiny MiniMax-M3-VL template: MiniMax role markers; no tools, no thinking mode. -#}\n"
    "{%- macro render_content(content) -%}\n"
    "{%- if content is string -%}{{ content }}\n"
    "{%- else -%}{%- for part in content -%}\n"
    "{%- if part.type == 'image' or part.type == 'image_url' -%}{{ ']<]image[>[' }}\n"
    "{%- elif part.type == 'video' -%}{{ ']<]video[>[' }}\n"
    "{%- elif part.type == 'text' -%}{{ part.text }}\n"
    "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
    "{%- endmacro -%}\n"
    "{%- if messages and messages[0].role == 'system' -%}\n"
    "{%- set system_text = render_content(messages[0].content) -%}{%- set turns = messages[1:] -%}\n"
    "{%- else -%}\n"
    "{%- set system_text = 'You are a helpful assistant.' -%}{%- set turns = messages -%}\n"
    "{%- endif -%}\n"
    "{{- ']~!b[' ~ ']~b]system' ~ '\\n' ~ system_text ~ '[e~[' ~ '\\n' -}}\n"
    "{%- for message in turns -%}\n"
    "{%- set role = 'ai' if message.role == 'assistant' else message.role -%}\n"
    "{{- ']~b]' ~ role ~ '\\n' ~ render_content(message.content) ~ '[e~[' ~ '\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- ']~b]ai' ~ '\\n' -}}{%- endif -%}\n"
)

# Built-in training text (written for this file). Ordinary English prompts about images tokenize
# into several sub-word pieces; characters outside it fall back to single bytes.
_CORPUS = """\
Describe this image in one sentence. What is shown in the picture? The picture shows a small red
house next to a tall green tree, and a blue sky with a few white clouds above it. There is a dog
sitting on the grass in front of the door. What colour is the car? The car is black and it is
parked on the left side of the street. How many people are in the photo? There are three people:
a woman, a man and a child. They are walking together along the river on a sunny afternoon.
Please answer the question about the video. What happens in the video? A cat jumps onto the table,
looks at the camera and then runs away. The first frame shows an empty kitchen; the last frame
shows the cat near the window. Read the text in the image. The sign says: Welcome to the museum,
open every day from nine to five. Count the objects on the table: two cups, one plate, four
apples and a knife. Is the light on or off? The light is on. Where is the ball? The ball is under
the chair in the corner of the room. Compare the two images. The first image is brighter than the
second one, and the second image has more people in it. Explain the chart. The chart shows the
number of visitors for each month of the year; the highest value is in July and the lowest value
is in February. You are a helpful assistant. Answer briefly and clearly. Think step by step before
you give the final answer. The model reads the image, the video and the question, and then it
writes an answer with words, numbers and punctuation. Hello, how are you today? I am fine, thank
you. Can you help me with this task? Yes, of course. Let me look at the image first.
A vision language model turns pixels into patches, patches into tokens, and tokens into text.
Each image is resized so that its height and width are multiples of twenty eight, then cut into
patches of fourteen by fourteen pixels; four neighbouring patches are merged into one token.
A video is a list of frames; two frames form one temporal patch, and long videos are split into
chunks of at most four temporal patches. The encoder, the projector and the language model run
one after another. The server decodes the request, checks the size of every image, builds the
prompt with the chat template, runs the model and streams the answer back token by token.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 14 16 20 28 32 56 64 100 112 128 224 256 512 1024 2048.
Questions and answers: who, what, when, where, why, which, how much, how many, is it, are they,
does it, do you, can it, will they, should we, would you. Colours: red, orange, yellow, green,
blue, purple, pink, brown, black, white, grey, gold, silver. Shapes: circle, square, triangle,
rectangle, line, point, curve, star. Places: city, village, road, bridge, river, lake, sea,
beach, mountain, forest, field, garden, park, school, office, shop, station, airport, hospital.
Things: book, phone, computer, screen, keyboard, bottle, glass, bag, box, door, window, chair,
table, bed, lamp, clock, picture, camera, bicycle, bus, train, plane, boat, flower, bird, fish.
People: man, woman, boy, girl, child, person, people, friend, teacher, student, doctor, driver.
Actions: look, see, watch, read, write, speak, say, tell, ask, answer, open, close, move, stand,
sit, walk, run, jump, eat, drink, play, work, make, take, give, find, show, hold, carry, wait.
Words: the, a, an, of, in, on, at, to, from, with, by, for, and, or, but, not, this, that, these,
those, there, here, it, he, she, they, we, you, I, is, are, was, were, be, been, has, have, had.
"""


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    # One "document" per line keeps training independent of thread scheduling.
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tiny_tokenizer(out_dir: Path) -> dict[str, int]:
    """Write tokenizer + processor files for the tiny checkpoint into `out_dir`.

    Returns the special-token ids: image, video, vision_start, vision_end, bos, eos, pad, and
    vocab_size (BPE entries + special tokens; the model's embedding needs at least this many rows).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer()
    # Re-serialise through json so that key order and spacing are ours, not the library's.
    _dump(out_dir / "tokenizer.json", json.loads(tokenizer.to_str()))

    _dump(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "TokenizersBackend",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 8192,
            "processor_class": "MiniMaxM3VLProcessor",
        },
    )
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    vision_common = {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "do_resize": True,
        "resample": 3,  # PIL BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "processor_class": "MiniMaxM3VLProcessor",
    }
    _dump(
        out_dir / "preprocessor_config.json",
        {
            "image_processor_type": "MiniMaxM3VLImageProcessor",
            "size": {"shortest_edge": IMAGE_MIN_PIXELS, "longest_edge": IMAGE_MAX_PIXELS},
            **vision_common,
        },
    )
    _dump(
        out_dir / "video_preprocessor_config.json",
        {
            "video_processor_type": "MiniMaxM3VLVideoProcessor",
            "min_pixels": VIDEO_MIN_PIXELS,
            "max_pixels": VIDEO_MAX_PIXELS,
            "vision_segment_max_frames": 4,
            "do_sample_frames": False,
            **vision_common,
        },
    )
    _dump(out_dir / "processor_config.json", {"processor_class": "MiniMaxM3VLProcessor"})

    ids = {name: tokenizer.token_to_id(tok) for name, tok in (
        ("image", IMAGE_TOKEN),
        ("video", VIDEO_TOKEN),
        ("vision_start", VISION_START_TOKEN),
        ("vision_end", VISION_END_TOKEN),
        ("bos", BOS_TOKEN),
        ("eos", EOS_TOKEN),
        ("pad", PAD_TOKEN),
    )}
    ids["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
    return ids

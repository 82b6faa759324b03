"""Both processors as transformers processors: typed kwargs and their precedence, chat templates saved and reloaded,
multimodal token counts and replacement offsets, RGB conversion of every PIL mode, and named bad-input errors."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoProcessor

from leanvlp import (
    MergeBridgeConfig,
    MergeBridgeForConditionalGeneration,
    MergeBridgeProcessor,
    PatchAlignConfig,
    PatchAlignProcessor,
)
from leanvlp.data.schema import to_rgb as data_to_rgb
from leanvlp.processing.inputs import prepare_images, to_rgb
from leanvlp.tiny import (
    build_bert_word_tokenizer,
    build_word_tokenizer,
    tiny_image_processor,
    tiny_llama_config,
    tiny_vision_config,
)

CORPUS = [
    "a large red circle to the left of a small blue square",
    "there is a green star above a yellow triangle",
    "question: what colour is the bus? short answer: red blue green yellow",
]
IMAGE = 32
TOKENS = 5  # visual tokens per image
CONTEXT = 64  # LLM / text encoder positions


def mb_processor(**kw) -> MergeBridgeProcessor:
    kw = {"num_image_tokens": TOKENS, "max_length": CONTEXT, **kw}
    return MergeBridgeProcessor(tiny_image_processor(IMAGE), build_word_tokenizer(CORPUS), **kw)


def pa_processor(tokenizer=None, **kw) -> PatchAlignProcessor:
    kw = {"patch_size": 8, "max_position_embeddings": CONTEXT, **kw}
    return PatchAlignProcessor(tiny_image_processor(IMAGE), tokenizer or build_bert_word_tokenizer(CORPUS), **kw)


def images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for _ in range(n)]


TEXTS = ["a red circle", "there is a green star above a yellow triangle"]


def call(proc, **kw):
    """Two samples of different lengths (the shorter one shows the padding side), any kwargs."""
    if isinstance(proc, MergeBridgeProcessor):
        return proc(images=images(2), text=["", "question: " + TEXTS[1]], **kw)
    return proc(images=images(2), text=TEXTS, **kw)


def width_and_side(batch) -> tuple[int, str]:
    mask = batch["attention_mask"]
    return mask.shape[1], "left" if mask[0, 0] == 0 else "right"


# ----------------------------------------------------------------------------- kwargs


# (kwargs, width or None for "longest", padding side or None for the processor's default). transformers refuses a key
# given both flat and in its modality dict (tested below), and `common_kwargs` reach every modality, so they carry
# keys valid for all (return_tensors, below); text keys there fail the image processor's validation.
PRECEDENCE = [
    ({}, None, None),
    ({"text_kwargs": {"padding": "max_length", "max_length": 40}}, 40, None),
    ({"padding": "max_length", "max_length": 44}, 44, None),
    ({"text_kwargs": {"padding": "max_length"}, "max_length": 48}, 48, None),
    ({"text_kwargs": {"padding": "max_length", "max_length": 52, "padding_side": "left"}}, 52, "left"),
    ({"padding_side": "right"}, None, "right"),
    ({"text_kwargs": {"padding_side": "left"}}, None, "left"),
    ({"padding": "longest", "pad_to_multiple_of": 16}, "multiple of 16", None),
]


@pytest.mark.parametrize("make", [mb_processor, pa_processor], ids=["merge_bridge", "patch_align"])
@pytest.mark.parametrize("kwargs, width, side", PRECEDENCE)
def test_text_kwargs_precedence_call_over_modality_over_common_over_defaults(make, kwargs, width, side):
    proc = make()
    longest = width_and_side(call(proc))[0]
    got_width, got_side = width_and_side(call(proc, **kwargs))
    if width == "multiple of 16":
        assert got_width == -(-longest // 16) * 16 and got_width > longest
    else:
        assert got_width == (longest if width is None else width)
    default_side = "left" if isinstance(proc, MergeBridgeProcessor) else "right"  # generation / the tokenizer's
    assert got_side == (side or default_side)


@pytest.mark.parametrize("make", [mb_processor, pa_processor], ids=["merge_bridge", "patch_align"])
def test_image_kwargs_reach_the_image_processor_with_the_same_precedence(make):
    proc = make()
    reference = lambda **kw: proc.image_processor(images(2), return_tensors="pt", **kw)["pixel_values"]  # noqa: E731
    torch.testing.assert_close(call(proc)["pixel_values"], reference(), rtol=0, atol=0)
    table = [  # kwargs -> the image processor's own output with `expected`
        ({"common_kwargs": {"rescale_factor": 1 / 510}}, {"rescale_factor": 1 / 510}),
        ({"common_kwargs": {"rescale_factor": 1 / 510}, "images_kwargs": {"rescale_factor": 1 / 1020}},
         {"rescale_factor": 1 / 1020}),
        ({"common_kwargs": {"rescale_factor": 1 / 510}, "rescale_factor": 1 / 2040}, {"rescale_factor": 1 / 2040}),
        ({"do_normalize": False}, {"do_normalize": False}),
    ]
    for kwargs, expected in table:
        torch.testing.assert_close(call(proc, **kwargs)["pixel_values"], reference(**expected), rtol=0, atol=0)


@pytest.mark.parametrize("make", [mb_processor, pa_processor], ids=["merge_bridge", "patch_align"])
def test_a_kwarg_given_twice_or_unknown_is_an_error(make):
    proc = make()
    with pytest.raises(ValueError, match="max_length was passed two times"):
        call(proc, max_length=40, text_kwargs={"max_length": 48})
    with pytest.raises(TypeError, match=r"unexpected arguments: \['colour'\]"):
        call(proc, colour="red")


@pytest.mark.parametrize("make", [mb_processor, pa_processor], ids=["merge_bridge", "patch_align"])
def test_common_kwargs_rank_below_modality_dicts_and_call_kwargs(make):
    proc = make()
    kinds = lambda batch: {type(batch[k]) for k in ("input_ids", "pixel_values")}  # noqa: E731
    if isinstance(proc, MergeBridgeProcessor):  # PatchAlign returns torch only (its box targets are torch)
        assert kinds(call(proc, common_kwargs={"return_tensors": "np"})) == {np.ndarray}
    assert kinds(call(proc, common_kwargs={"return_tensors": "np"}, return_tensors="pt")) == {torch.Tensor}
    both = {"text_kwargs": {"return_tensors": "pt"}, "images_kwargs": {"return_tensors": "pt"}}
    assert kinds(call(proc, common_kwargs={"return_tensors": "np"}, **both)) == {torch.Tensor}


def test_tokenizer_defaults_set_patch_align_padding_side_but_not_merge_bridges():
    """The tokenizer's own padding side is PatchAlign's default; MergeBridge pads by task (left to generate,
    right to train) whatever the LLM tokenizer says, unless the call asks."""
    bert = build_bert_word_tokenizer(CORPUS)
    bert.init_kwargs["padding_side"] = bert.padding_side = "left"
    proc = pa_processor(bert)
    assert width_and_side(call(proc))[1] == "left"
    assert width_and_side(call(proc, padding_side="right"))[1] == "right"
    mb = mb_processor()
    mb.tokenizer.init_kwargs["padding_side"] = mb.tokenizer.padding_side = "right"
    assert width_and_side(call(mb))[1] == "left"
    assert width_and_side(mb(images=images(2), text=["", "question: red"], targets=["red", "blue"]))[1] == "right"
    assert width_and_side(call(mb, padding_side="right"))[1] == "right"


def test_merge_bridge_return_tensors_and_attention_mask_kwargs():
    proc = mb_processor()
    batch = call(proc, return_tensors="np", return_attention_mask=False)
    assert isinstance(batch["input_ids"], np.ndarray) and isinstance(batch["pixel_values"], np.ndarray)
    assert "attention_mask" not in batch
    unpadded = proc(images=images(2), text=["", "question: red"], padding=False, return_tensors=None)
    assert [len(row) for row in unpadded["input_ids"]] == [1 + TOKENS, 1 + TOKENS + 3]  # BOS, image, words
    no_bos = proc(images=images(1), text=[""], add_special_tokens=False)
    assert no_bos["input_ids"][0].tolist() == [proc.image_token_id] * TOKENS
    with pytest.raises(ValueError, match="truncation is not supported"):
        call(proc, truncation=True)


def test_max_length_init_value_is_the_default_and_calls_may_not_exceed_the_context():
    proc = pa_processor(max_length=8)
    assert call(proc)["input_ids"].shape[1] == 8  # truncated to the init max_length
    assert call(proc, max_length=12)["input_ids"].shape[1] == 11  # [CLS] + 9 words + [SEP], not truncated
    with pytest.raises(ValueError, match=r"max_length=65 is larger .*max_position_embeddings=64"):
        call(proc, max_length=65)
    mb = mb_processor()
    with pytest.raises(ValueError, match=r"max_length=65 is larger than the LLM context .*max_length=64"):
        call(mb, max_length=65)
    with pytest.raises(ValueError, match=r"sample 1 is 17 tokens .*max_length=12"):
        call(mb, max_length=12)


# ----------------------------------------------------------------------------- chat template


def test_merge_bridge_default_chat_template_renders_build_prompts():
    proc = mb_processor()
    vqa = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the bus?"}]}]
    assert proc.apply_chat_template(vqa) == proc.build_prompt("vqa", question="What colour is the bus?")
    assert proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}]) == proc.build_prompt("caption")
    answered = vqa + [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    assert proc.apply_chat_template(answered) == proc.build_prompt("vqa", question="What colour is the bus?") + " red</s>"
    custom = mb_processor(prompt_templates={"caption": "A picture of", "vqa": "Q: {question} A:"})
    assert custom.apply_chat_template(vqa) == "<image>Q: What colour is the bus? A:"
    assert custom.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}]) == "<image>A picture of"


def test_merge_bridge_chat_template_tokenized_equals_the_processor_call():
    proc = mb_processor()
    image = images(1)[0]
    chat = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "What colour is the bus?"}]}]
    out = proc.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
    ref = proc(images=[image], text=[proc.build_prompt("vqa", question="What colour is the bus?")])
    assert out["input_ids"].tolist() == ref["input_ids"].tolist()
    torch.testing.assert_close(out["pixel_values"], ref["pixel_values"], rtol=0, atol=0)


@pytest.mark.parametrize("make", [mb_processor, pa_processor], ids=["merge_bridge", "patch_align"])
def test_chat_template_saved_as_jinja_and_reloaded(make, tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for i, proc in enumerate([make(chat_template=template), make()]):
        if proc.chat_template is None:
            continue  # PatchAlign has no default template
        proc.save_pretrained(tmp_path / str(i))
        assert (tmp_path / str(i) / "chat_template.jinja").read_text() == proc.chat_template
        reloaded = AutoProcessor.from_pretrained(tmp_path / str(i))
        assert type(reloaded) is type(proc) and reloaded.chat_template == proc.chat_template
        assert reloaded.max_length == proc.max_length
    reloaded = AutoProcessor.from_pretrained(tmp_path / "0")
    assert reloaded.apply_chat_template([{"role": "user", "content": "a red circle"}]) == "a red circle"


def test_pipeline_captions_an_image_only_chat(tmp_path):
    from transformers import pipeline

    tokenizer = build_word_tokenizer(CORPUS)
    config = MergeBridgeConfig(
        vision_config=tiny_vision_config(IMAGE, 8, 32, 2).to_dict(),
        text_config=tiny_llama_config(len(tokenizer), 32, 2, max_position_embeddings=CONTEXT).to_dict(),
        bridge_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        bridge_merging={"r": 4}, image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = MergeBridgeForConditionalGeneration(config).eval()
    proc = MergeBridgeProcessor(tiny_image_processor(IMAGE), tokenizer, num_image_tokens=config.num_image_tokens,
                                max_length=CONTEXT)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    image = images(1)[0]
    pipe = pipeline("image-text-to-text", model=str(tmp_path))
    out = pipe([{"role": "user", "content": [{"type": "image", "image": image}]}], max_new_tokens=4,
               return_tensors=True)
    with torch.no_grad():
        expected = model.generate(**proc(images=[image]), max_new_tokens=4, do_sample=False)
    assert out[0]["generated_token_ids"].tolist() == expected[0].tolist()
    plain = pipe(images=image, text="", max_new_tokens=4, return_tensors=True)  # the pipeline insists on a text
    assert plain[0]["generated_token_ids"].tolist() == expected[0].tolist()


# ----------------------------------------------------------------------------- token counts and offsets


def test_num_multimodal_tokens_equal_the_image_tokens_the_processor_inserts():
    proc = mb_processor()
    batch = proc(images=images(1, size=(40, 48)) + images(1, size=(20, 30)), text=["<image>", "<image>question: red"])
    counts = (batch["input_ids"] == proc.image_token_id).sum(1).tolist()
    data = proc._get_num_multimodal_tokens(image_sizes=[(40, 48), (20, 30)])
    assert data.num_image_tokens == counts == [TOKENS, TOKENS] and data.num_image_patches == [1, 1]
    clips = proc(videos=[images(3, seed=1), images(3, seed=2)], text=["", ""])
    video_counts = (clips["input_ids"] == proc.image_token_id).sum(1).tolist()
    assert proc._get_num_multimodal_tokens(video_sizes=[(3, 40, 48)] * 2).num_video_tokens == video_counts


def test_mm_token_type_ids_and_text_replacement_offsets():
    proc = mb_processor()
    prompts = ["<image>question: red", "a <image> and <image>"]
    batch = proc(images=images(3), text=prompts, return_mm_token_type_ids=True, return_text_replacement_offsets=True)
    assert torch.equal(batch["mm_token_type_ids"], (batch["input_ids"] == proc.image_token_id).long())
    offsets = batch["text_replacement_offsets"]
    assert [len(o) for o in offsets] == [1, 2]
    expanded = [p.replace("<image>", "<image>" * TOKENS) for p in prompts]
    for prompt, new, sample in zip(prompts, expanded, offsets):
        for entry in sample:
            assert entry["type"] == "image" and prompt[slice(*entry["span"])] == "<image>"
            assert new[slice(*entry["new_span"])] == entry["replacement"] == "<image>" * TOKENS


# ----------------------------------------------------------------------------- images


def _mode_image(mode: str) -> PIL.Image.Image:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 255, (6, 7, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0  # a fully transparent row
    base = PIL.Image.fromarray(rgba, "RGBA")
    if mode == "I;16":
        return PIL.Image.fromarray(rng.integers(0, 65535, (6, 7), dtype=np.uint16))
    if mode == "P+transparency":
        image = base.convert("RGB").convert("P")
        image.info["transparency"] = image.getpixel((0, 0))
        return image
    return base if mode == "RGBA" else base.convert(mode)


MODES = ["L", "LA", "P", "P+transparency", "RGBA", "CMYK", "I;16", "I", "F", "1", "RGB"]


@pytest.mark.parametrize("mode", MODES)
def test_every_pil_mode_becomes_rgb_by_its_documented_rule(mode):
    """Alpha modes: composited on white (to within PIL's rounding); 16/32-bit grey: value / 256 as 8-bit grey;
    every other mode: PIL's own RGB conversion. The loaders use this very function."""
    assert data_to_rgb is to_rgb
    image = _mode_image(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == image.size
    got = np.asarray(out).astype(int)
    if mode in ("LA", "RGBA", "P+transparency"):
        rgba = np.asarray(image.convert("RGBA")).astype(float)
        alpha = rgba[..., 3:] / 255
        expected = rgba[..., :3] * alpha + 255 * (1 - alpha)
        assert np.abs(got - expected).max() <= 1
        assert (got[np.asarray(image.convert("RGBA"))[..., 3] == 0] == 255).all()
    elif mode in ("I;16", "I"):
        grey = np.asarray(image).astype(float) / 256
        assert np.abs(got - grey[..., None]).max() <= 1
    else:
        assert np.array_equal(got, np.asarray(image.convert("RGB")).astype(int))


def test_transparent_pixels_turn_white_even_when_the_image_processor_skips_rgb_conversion():
    image = _mode_image("RGBA")
    assert (np.asarray(to_rgb(image))[0] == 255).all()
    proc = pa_processor()
    proc.image_processor.do_convert_rgb = False
    pixels = proc(images=[image, _mode_image("L")], text=TEXTS)["pixel_values"]
    expected = proc.image_processor([to_rgb(image), to_rgb(_mode_image("L"))], return_tensors="pt")["pixel_values"]
    assert pixels.shape[1] == 3
    torch.testing.assert_close(pixels, expected, rtol=0, atol=0)
    mb = mb_processor()
    mb.image_processor.do_convert_rgb = False
    torch.testing.assert_close(mb(images=[image])["pixel_values"], expected[:1], rtol=0, atol=0)


# ----------------------------------------------------------------------------- errors


def _truncated_png() -> PIL.Image.Image:
    buffer = io.BytesIO()
    images(1)[0].save(buffer, format="PNG")
    return PIL.Image.open(io.BytesIO(buffer.getvalue()[:200]))  # the header parses, the pixels do not


@pytest.mark.parametrize("make", [mb_processor, pa_processor], ids=["merge_bridge", "patch_align"])
def test_bad_inputs_name_the_sample(make):
    proc = make()
    name = type(proc).__name__
    with pytest.raises(ValueError, match=f"{name}: nothing to process"):
        proc()
    with pytest.raises(ValueError, match=f"{name}: image 1 is None"):
        proc(images=[images(1)[0], None], text=TEXTS)
    with pytest.raises(ValueError, match=f"{name}: image 1 could not be decoded"):
        proc(images=[images(1)[0], _truncated_png()], text=TEXTS)
    with pytest.raises(ValueError, match=rf"{name}: text\[1\] is not valid text: '\\ud800' at position 6"):
        proc(images=images(2), text=["a red", "a red \ud800 circle"])
    if name == "MergeBridgeProcessor":
        with pytest.raises(ValueError, match="3 images/videos for 2 text prompts"):
            proc(images=images(3), text=TEXTS)
    else:  # unequal sets are retrieval input; with boxes the samples are pairs
        assert proc(images=images(3), text=TEXTS)["pixel_values"].shape[0] == 3
        with pytest.raises(ValueError, match="text has 2 entries for 3 images"):
            proc(images=images(3), text=TEXTS, boxes=[[[0, 0, 4, 4]]] * 3, box_labels=[["circle"]] * 3)
    with pytest.raises(ValueError, match=f"{name}: image 0 is a int"):
        proc(images=[3], text=TEXTS[:1])


def test_merge_bridge_target_errors_name_counts_and_index():
    proc = mb_processor()
    with pytest.raises(ValueError, match="3 targets for 2 prompts"):
        proc(images=images(2), text=["", ""], targets=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"targets\[0\] is not valid text"):
        proc(images=images(2), text=["", ""], targets=["a \udfff", "b"])
    with pytest.raises(ValueError, match="video 1 frame 0 is None"):
        proc(videos=[images(2), [None, images(1)[0]]], text=["", ""])


def test_patch_align_refuses_geometry_kwargs_with_boxes():
    proc = pa_processor(object_classes=["circle"])
    boxes = dict(boxes=[[[0, 0, 10, 10]]], box_labels=[["circle"]])
    assert proc(images=images(1), text=["a circle"], **boxes)["patch_labels"].shape == (1, (IMAGE // 8) ** 2)
    resized = proc(images=images(1), text=["a circle"], size={"height": 64, "width": 64})["pixel_values"]
    assert resized.shape[-2:] == (64, 64)  # without boxes the kwarg simply reaches the image processor
    with pytest.raises(ValueError, match=r"image kwargs \['size'\] change the resize / crop geometry"):
        proc(images=images(1), text=["a circle"], size={"height": 64, "width": 64}, **boxes)


def test_patch_align_max_length_beyond_the_text_encoder_fails_at_construction():
    with pytest.raises(ValueError, match=r"max_length=512 is larger .*max_position_embeddings=64"):
        pa_processor(max_length=512)
    tokenizer = build_bert_word_tokenizer(CORPUS)
    tokenizer.model_max_length = 128  # no saved positions: the tokenizer's limit is the bound
    with pytest.raises(ValueError, match=r"max_length=512 is larger .*model_max_length=128"):
        pa_processor(tokenizer, max_length=512, max_position_embeddings=None)
    assert pa_processor(tokenizer, max_length=128, max_position_embeddings=None).max_length == 128


def test_patch_align_learns_the_position_limit_from_the_model_config(tmp_path):
    tiny_image_processor(IMAGE).save_pretrained(tmp_path / "vision")
    build_bert_word_tokenizer(CORPUS).save_pretrained(tmp_path / "text")  # model_max_length=512
    config = PatchAlignConfig(
        vision_config=dict(model_type="vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, image_size=IMAGE, patch_size=8),
        text_config=dict(model_type="bert", vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=48),
        cls_token_id=2, sep_token_id=3, mask_token_id=4, patch_detector=dict(layer=1, keep_ratio=0.5))
    with pytest.raises(ValueError, match=r"max_length=64 is larger .*max_position_embeddings=48"):
        PatchAlignProcessor.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"),
                                                        config=config, max_length=64)
    proc = PatchAlignProcessor.from_vision_text_pretrained(str(tmp_path / "vision"), str(tmp_path / "text"),
                                                           config=config)
    proc.save_pretrained(tmp_path / "saved")
    assert PatchAlignProcessor.from_pretrained(tmp_path / "saved").max_position_embeddings == 48
    with pytest.raises(ValueError, match=r"max_length=49 is larger .*max_position_embeddings=48"):
        proc(text=["a red circle"], max_length=49)

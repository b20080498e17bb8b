"""Runs under a stock transformers 4.5x (a separate virtualenv), never under the project's
transformers 5.x: it imports nothing from radgrounder. Driven by test_roundtrip_transformers4.py.

    python tf4_reference.py load DIR INPUTS OUT      stock PaliGemma + processor read DIR
    python tf4_reference.py save DIR INPUTS OUT      4.5x save_pretrained of a fresh model
    python tf4_reference.py segment DIR INPUTS OUT   the reference's GroundedGemma reads DIR

INPUTS is a safetensors file with ``input_ids``, ``attention_mask``, ``pixel_values`` (and
``seg_token_pos`` for ``segment``) plus JSON metadata ``prompts``; results go to OUT/.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
)
from transformers.models.paligemma.modeling_paligemma import (
    PaliGemmaModel,
    PaliGemmaPreTrainedModel,
)


def _inputs(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _check_loading(info: dict) -> None:
    problems = {k: list(v) for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"from_pretrained was not strict: {problems}")


def _tokenizer_report(tokenizer, prompts: list[str]) -> dict:
    return {
        "class": type(tokenizer).__name__,
        "len": len(tokenizer),
        "ids": [tokenizer(p)["input_ids"] for p in prompts],
        "decoded": [
            tokenizer.decode(tokenizer(p)["input_ids"], skip_special_tokens=False) for p in prompts
        ],
        "special": {
            t: tokenizer.convert_tokens_to_ids(t)
            for t in ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<image>", "<loc0000>")
        },
        "padding_side": tokenizer.padding_side,
    }


def _processor_report(folder: str, out: Path) -> dict:
    processor = AutoProcessor.from_pretrained(folder)
    if not isinstance(processor, PaliGemmaProcessor):
        raise SystemExit(f"AutoProcessor gave {type(processor).__name__}")
    again = PaliGemmaProcessor.from_pretrained(folder)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (97, 130, 3), dtype=np.uint8))
    batch = processor(text="Caption this image:", images=image, return_tensors="pt")
    save_file(
        {"input_ids": batch["input_ids"].contiguous(), "pixel_values": batch["pixel_values"]},
        str(out / "processor.safetensors"),
    )
    image.save(out / "image.png")
    return {
        "class": type(processor).__name__,
        "image_processor": type(processor.image_processor).__name__,
        "tokenizer": type(processor.tokenizer).__name__,
        "image_seq_length": processor.image_seq_length,
        "same_as_direct": type(again).__name__,
    }


def _forward(model, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            input_ids=tensors["input_ids"],
            attention_mask=tensors["attention_mask"],
            pixel_values=tensors["pixel_values"],
        ).logits


def load(folder: str, inputs: str, out: Path) -> None:
    tensors, meta = _inputs(inputs)
    # Eager attention applies Gemma-2's attention soft-cap, as radgrounder does by default.
    model, info = PaliGemmaForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager"
    )
    _check_loading(info)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    report = {
        "transformers": transformers.__version__,
        "model_dtype": str(model.dtype),
        "auto_dtype": str(
            PaliGemmaForConditionalGeneration.from_pretrained(folder, torch_dtype="auto").dtype
        ),
        "tokenizer": _tokenizer_report(tokenizer, json.loads(meta["prompts"])),
        "processor": _processor_report(folder, out),
    }
    save_file({"logits": _forward(model, tensors)}, str(out / "logits.safetensors"))
    (out / "report.json").write_text(json.dumps(report, indent=2))


def save(folder: str, inputs: str, out: Path) -> None:
    """A fresh random model written the way the reference wrote its checkpoints."""
    tensors, _ = _inputs(inputs)
    config = PaliGemmaConfig.from_pretrained(folder, attn_implementation="eager")
    delattr(config, "radgrounder")  # the reference's configs carry no radgrounder block
    torch.manual_seed(1234)
    model = PaliGemmaForConditionalGeneration(config).eval()
    processor = AutoProcessor.from_pretrained(folder)
    for name, safe in (("safetensors", True), ("bin", False)):
        model.save_pretrained(out / name, safe_serialization=safe)
        processor.save_pretrained(out / name)
    save_file({"logits": _forward(model, tensors)}, str(out / "logits.safetensors"))
    (out / "report.json").write_text(json.dumps({"transformers": transformers.__version__}))


# The reference's segmentation model, rebuilt from the spec (§3.2) with plain torch: module
# names and the decoder's maths are written from the spec, not copied from radgrounder.


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, q, k, v):
        def split(x):
            b, n, c = x.shape
            return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(q)), split(self.k_proj(k)), split(self.v_proj(v))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).flatten(2))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, first: bool) -> None:
        super().__init__()
        self.first = first
        self.self_attn = _Attention(dim, heads)
        self.cross_attn_token_to_image = _Attention(dim, heads)
        self.cross_attn_image_to_token = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        for i in range(1, 5):
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=1e-5))

    def forward(self, queries, keys, pe):
        q = queries if self.first else queries + pe
        queries = self.norm1(queries + self.self_attn(q, q, queries))
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + pe, keys, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys, queries + pe, queries))
        return queries, keys


class _Transformer(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Block(dim, heads, i == 0) for i in range(2))
        self.final_attn_token_to_image = _Attention(dim, heads)
        self.norm_final_attn = nn.LayerNorm(dim, eps=1e-5)


class SegmentationDecoder(nn.Module):
    def __init__(self, img_dim: int, dim: int) -> None:
        super().__init__()
        self.img_projection = nn.Linear(img_dim, dim)
        self.transformer = _Transformer(dim, 8)
        self.output_proj = nn.Linear(dim, 1)

    def forward(self, image_tokens, query):
        keys = self.img_projection(image_tokens)
        pe = queries = query[:, None]
        for layer in self.transformer.layers:
            queries, keys = layer(queries, keys, pe)
        t = self.transformer
        queries = t.norm_final_attn(queries + t.final_attn_token_to_image(queries, keys, keys))
        logits = self.output_proj(keys + queries)
        side = math.isqrt(logits.shape[1])
        grid = logits.transpose(1, 2).reshape(-1, 1, side, side)
        return F.interpolate(grid, size=(224, 224), mode="bilinear", align_corners=False)


class GroundedGemmaForConditionalGeneration(PaliGemmaPreTrainedModel):
    # The forward mapping of spec §3.6; 4.54 reverses it in save_pretrained for any class whose
    # MRO names "paligemma".
    _checkpoint_conversion_mapping: ClassVar = {
        "^language_model.model": "model.language_model",
        "^vision_tower": "model.vision_tower",
        "^multi_modal_projector": "model.multi_modal_projector",
        "^language_model.lm_head": "lm_head",
    }
    _tied_weights_keys: ClassVar = ["lm_head.weight"]

    def __init__(self, config: PaliGemmaConfig) -> None:
        super().__init__(config)
        self.model = PaliGemmaModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        vision = config.vision_config
        self.segmentation_head = SegmentationDecoder(vision.hidden_size, vision.projection_dim)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask, pixel_values, seg_token_pos):
        image_tokens = self.model.vision_tower(pixel_values).last_hidden_state
        hidden = self.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values
        ).last_hidden_state
        queries = hidden[seg_token_pos[:, 0], seg_token_pos[:, 1]]
        masks = self.segmentation_head(image_tokens[seg_token_pos[:, 0]], queries)
        return self.lm_head(hidden), masks


def segment(folder: str, inputs: str, out: Path) -> None:
    tensors, _ = _inputs(inputs)
    model, info = GroundedGemmaForConditionalGeneration.from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager"
    )
    _check_loading(info)
    model.eval()
    with torch.no_grad():
        logits, masks = model(**tensors)
    save_file({"logits": logits, "mask_logits": masks}, str(out / "logits.safetensors"))
    delattr(model.config, "radgrounder")
    model.save_pretrained(out / "saved")
    AutoProcessor.from_pretrained(folder).save_pretrained(out / "saved")
    report = {
        "transformers": transformers.__version__,
        "tied": model.lm_head.weight is model.get_input_embeddings().weight,
        "keys": sorted(model.state_dict()),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    command, folder, inputs, out = sys.argv[1:5]
    Path(out).mkdir(parents=True, exist_ok=True)
    {"load": load, "save": save, "segment": segment}[command](folder, inputs, Path(out))

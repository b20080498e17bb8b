"""Loading and saving RadGrounder checkpoints (spec §3.6).

Weights may be ``.safetensors`` or PyTorch ``.bin``, single or sharded, in the legacy key layout
the reference saved (``language_model.model.*``, ``vision_tower.vision_model.*``, …) or in the
layout of the installed transformers' models (``model.language_model.*``,
``model.vision_tower.*``, ``lm_head.weight``). Keys are normalised here, explicitly, and loaded
strictly: a checkpoint that does not fit the config is an error, never a silent re-init.

``save_model`` writes what stock transformers 4.5x and 5.x both load strictly: the legacy key
layout (what 4.54's ``save_pretrained`` writes, and 5.x maps on load), a ``config.json`` with
both versions' field names, a portable tokenizer and a SigLIP ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

from radgrounder.errors import RadGrounderError
from radgrounder.fileio import apply_umask
from radgrounder.modeling import keys
from radgrounder.modeling.configs import (
    DETECTION_ARCH,
    IMAGE_TOKEN,
    MASK_THRESHOLDS,
    SEG_TOKEN,
    SEGMENTATION_ARCH,
    attn_implementation,
    radgrounder_settings,
    settings_of,
)
from radgrounder.modeling.grounded_gemma import GroundedGemmaForConditionalGeneration
from radgrounder.modeling.keys import legacy_state_dict
from radgrounder.modeling.softcap import apply_softcaps
from radgrounder.modeling.tokenizer import (
    GROUNDING_TOKENS,
    MASK_TOKEN,
    load_tokenizer,
    save_tokenizer,
)

MODEL_CLASSES: dict[str, type[PaliGemmaForConditionalGeneration]] = {
    DETECTION_ARCH: PaliGemmaForConditionalGeneration,
    SEGMENTATION_ARCH: GroundedGemmaForConditionalGeneration,
}
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
PREPROCESSOR_CONFIG = "preprocessor_config.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3

__all__ = ["LoadedModel", "legacy_state_dict", "load_model", "read_state_dict", "save_model"]


@dataclass
class LoadedModel:
    """A loaded checkpoint; unpacks as ``model, tokenizer = load_model(...)``."""

    model: PaliGemmaForConditionalGeneration
    tokenizer: Any
    variant: str
    config: PaliGemmaConfig
    path: Path

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer))


def _resolve(path_or_hub_id: str | os.PathLike[str]) -> Path:
    """A local folder, or ``owner/name[/subfolder]`` fetched from the HF hub (only when no
    such local path exists)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise RadGrounderError("expected a checkpoint folder, got a file", path=path)
    text = str(path_or_hub_id)
    parts = text.split("/")
    if len(parts) < 2 or text.startswith((".", "/", "~")) or not all(parts):
        raise RadGrounderError("no such checkpoint folder", path=path)
    repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(repo_id, allow_patterns=[f"{sub}/*"] if sub else None)
    except Exception as exc:  # hub errors come in many types; the message is what matters
        raise RadGrounderError(
            f"not a local folder and the hub download failed: {exc}", path=text
        ) from exc
    folder = Path(root) / sub
    if not folder.is_dir():
        raise RadGrounderError(f"hub repository {repo_id} has no folder {sub!r}", path=text)
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RadGrounderError("file is missing", path=path) from None
    except (OSError, ValueError) as exc:
        raise RadGrounderError(f"unreadable JSON: {exc}", path=path) from exc
    if not isinstance(data, dict):
        raise RadGrounderError("expected a JSON object", path=path)
    return data


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RadGrounderError("weight file is missing", path=path) from None
    except Exception as exc:  # corrupt pickles/safetensors raise assorted types
        raise RadGrounderError(f"unreadable weights: {exc}", path=path) from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise RadGrounderError("expected a flat dict of tensors", path=path)
    return data


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files, safetensors preferred, shards in index order."""
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index = folder / index_name
        if index.exists():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise RadGrounderError("weight_map: missing or empty", path=index)
            return [folder / name for name in dict.fromkeys(weight_map.values())]
        if (folder / single).exists():
            return [folder / single]
    raise RadGrounderError(
        f"no weights found (expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})",
        path=folder,
    )


def read_state_dict(folder: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, keys as stored."""
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(Path(folder)):
        state.update(_load_file(file))
    return state


def _parse_dtype(dtype: str | torch.dtype | None, state: dict[str, torch.Tensor]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        # Keep the checkpoint's precision: bf16 weights stay bf16 instead of doubling in size.
        for tensor in state.values():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise RadGrounderError(f"dtype: not a floating torch dtype: {dtype!r}")
    return value


class _DefaultDtype:
    """Build modules directly in the target dtype, as from_pretrained does, so a 3B model
    never exists in fp32 on the way to bf16."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype, self.saved = dtype, torch.get_default_dtype()

    def __enter__(self) -> None:
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc: object) -> None:
        torch.set_default_dtype(self.saved)


def build_empty(config: PaliGemmaConfig, variant: str, dtype: torch.dtype) -> Any:
    """The model for ``variant`` without running weight init (weights are loaded next)."""
    from transformers.initialization import no_init_weights

    cls = MODEL_CLASSES[SEGMENTATION_ARCH if variant == "segmentation" else DETECTION_ARCH]
    with no_init_weights(), _DefaultDtype(dtype):
        model = cls(config)
    # no_init_weights also skips tying; tie before loading so one copy serves both names.
    model.tie_weights()
    return model


def variant_of(model: Any) -> str:
    """``segmentation`` for the model with a mask head, else ``detection``."""
    if isinstance(model, GroundedGemmaForConditionalGeneration):
        return "segmentation"
    return "detection"


def _check_tokenizer(tokenizer: Any, config: PaliGemmaConfig, variant: str, folder: Path) -> None:
    vocab = config.text_config.vocab_size
    if len(tokenizer) == vocab + 1 and tokenizer.convert_tokens_to_ids(MASK_TOKEN) == vocab:
        raise RadGrounderError(
            f"the tokenizer has {MASK_TOKEN} at id {vocab}, one past the model's vocabulary: the "
            f"saved vocabulary lacks Gemma's {MASK_TOKEN} and transformers' Gemma tokenizer "
            "appended it (load the tokenizer with mask_token=None, or with load_model)",
            path=folder,
        )
    if len(tokenizer) != vocab:
        raise RadGrounderError(
            f"text_config.vocab_size is {vocab} but the tokenizer has {len(tokenizer)} tokens "
            "(the embeddings must be resized to the tokenizer)",
            path=folder / "config.json",
        )
    for token in (*GROUNDING_TOKENS[variant], IMAGE_TOKEN):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise RadGrounderError(
                f"tokenizer: the {variant} token {token!r} is missing", path=folder
            )
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != config.image_token_index:
        raise RadGrounderError(
            f"image_token_index is {config.image_token_index} but the tokenizer's <image> is "
            f"{image_id}",
            path=folder / "config.json",
        )


def _detect_variant(raw: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    # The reference config names the class but has no auto_map (spec §3.6), so AutoModel would
    # load a plain PaliGemma and drop the head; the head's keys are a second witness.
    archs = raw.get("architectures") or []
    if SEGMENTATION_ARCH in archs or any(k.startswith(keys.HEAD_PREFIX) for k in state):
        return "segmentation"
    if settings_of(raw).get("variant") == "segmentation":
        return "segmentation"
    return "detection"


def _config_from(raw: dict[str, Any], path: Path) -> PaliGemmaConfig:
    if raw.get("model_type") != "paligemma":
        raise RadGrounderError(
            f"model_type: expected 'paligemma', got {raw.get('model_type')!r}", path=path
        )
    # The dtype the weights are built in is chosen by load_model; a stored per-sub-config
    # dtype (4.5x writes ``torch_dtype`` into every block) would make transformers 5.x build
    # those sub-models in it regardless, leaving a half-fp32 model behind a bf16 request.
    raw = dict(raw)
    raw.pop("torch_dtype", None)
    for name in ("text_config", "vision_config"):
        if isinstance(raw.get(name), dict):
            raw[name] = {k: v for k, v in raw[name].items() if k not in ("torch_dtype", "dtype")}
    try:
        return PaliGemmaConfig.from_dict(raw)
    except Exception as exc:  # transformers' strict configs raise several error types
        raise RadGrounderError(f"invalid PaliGemma config: {exc}", path=path) from exc


def check_device(device: str | torch.device | None) -> None:
    """Refuse a device this torch cannot use, in one line naming the device, the installed
    torch build and what to do (instead of torch's traceback on the first tensor moved)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise RadGrounderError(f"--device {device}: not a torch device ({exc})") from None
    if dev.type != "cuda":
        return
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        raise RadGrounderError(
            f"--device {device}: this torch ({build}) is a CPU-only build; use --device cpu, "
            "or install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
        )
    if not torch.cuda.is_available():
        raise RadGrounderError(
            f"--device {device}: no CUDA GPU is visible to {build} (CUDA "
            f"{torch.version.cuda}); check nvidia-smi and CUDA_VISIBLE_DEVICES, or use "
            "--device cpu"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RadGrounderError(
            f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )


def load_model(
    path_or_hub_id: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    mask_threshold: str | None = None,
    attn: str = "sdpa",
    final_logit_softcap: bool | None = None,
    attention_softcap: bool | None = None,
) -> LoadedModel:
    """Load a RadGrounder checkpoint folder (or hub id) with its tokenizer, in eval mode.

    The variant is read from ``architectures`` or the presence of ``segmentation_head.*``
    weights. ``dtype`` defaults to the stored precision. ``mask_threshold``
    (``probability``/``logit``) overrides the checkpoint's default for :func:`generate`.
    ``final_logit_softcap`` / ``attention_softcap`` switch Gemma-2's soft-caps (default:
    what the checkpoint records, else how the released checkpoints were trained: no final
    cap, attention cap on; see :mod:`radgrounder.modeling.softcap`).
    """
    from transformers import GenerationConfig

    check_device(device)
    folder = _resolve(path_or_hub_id)
    raw = _read_json(folder / "config.json")
    config = _config_from(raw, folder / "config.json")
    state = read_state_dict(folder)
    variant = _detect_variant(raw, state)
    tokenizer = load_tokenizer(folder, vocab_size=config.text_config.vocab_size)
    tokenizer.padding_side = "left"
    _check_tokenizer(tokenizer, config, variant, folder)

    stored = settings_of(config)
    threshold = mask_threshold or stored.get("mask_threshold", "probability")
    if threshold not in MASK_THRESHOLDS:
        raise RadGrounderError(
            f"mask_threshold: unknown value {threshold!r} (expected one of "
            f"{', '.join(MASK_THRESHOLDS)})"
        )
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN) if variant == "segmentation" else None
    settings = radgrounder_settings(
        variant, seg_token_id=seg_id, mask_threshold=threshold, head=stored.get("head")
    )
    config.radgrounder = {**stored, **settings}
    config.architectures = [SEGMENTATION_ARCH if variant == "segmentation" else DETECTION_ARCH]
    config._attn_implementation = attn_implementation(attn)
    apply_softcaps(
        config, final_logit_softcap=final_logit_softcap, attention_softcap=attention_softcap
    )

    target = _parse_dtype(dtype, state)
    model = build_empty(config, variant, target)
    keys.load_strict(model, state, folder)
    del state
    if (folder / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, variant, model.config, folder)


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(model: Any, folder: Path, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    state = keys.legacy_state_dict(model, include_tied=False)
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / SAFE_SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2), encoding="utf-8")


def _write_config(config: PaliGemmaConfig, folder: Path) -> None:
    """``config.json`` as transformers 5.x writes it plus ``text_config.rope_theta``, which
    4.5x reads instead of ``rope_parameters``. ``torch_dtype`` (4.5x's name for ``dtype``) is
    left out: 5.x would build the sub-models in that dtype whatever the caller asks for, and
    4.5x's ``torch_dtype="auto"`` falls back to the weights' dtype without it."""
    config.save_pretrained(str(folder))
    path = folder / "config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    text = data.get("text_config")
    if isinstance(text, dict):
        rope = text.get("rope_parameters")
        if isinstance(rope, dict) and "rope_theta" in rope:
            text.setdefault("rope_theta", rope["rope_theta"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def preprocessor_config(config: PaliGemmaConfig) -> dict[str, Any]:
    """The stock PaliGemma-2 ``SiglipImageProcessor`` settings for this model's input size:
    resize (bicubic), /255, then (x - 0.5) / 0.5, i.e. RGB into [-1, 1] (what
    ``PaliGemmaProcessor`` feeds the model; RadGrounder's own pipeline normalises scans itself,
    spec §4)."""
    vision = config.vision_config
    side = int(vision.image_size)
    return {
        "do_convert_rgb": None,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_seq_length": (side // int(vision.patch_size)) ** 2,
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "PaliGemmaProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": side, "width": side},
    }


def save_model(
    model: Any,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write a checkpoint folder that stock transformers 4.5x and 5.x load strictly.

    - ``model.safetensors`` (sharded with an index above ``max_shard_bytes``) in the legacy
      key layout of the released checkpoints (``language_model.model.*``,
      ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``segmentation_head.*``;
      the tied LM head is left out, as ``save_pretrained`` does);
    - ``config.json`` (architectures + the ``radgrounder`` block, fields in both versions'
      spellings) and ``generation_config.json``;
    - the tokenizer (``tokenizer.json``, ``tokenizer_config.json`` as ``GemmaTokenizerFast``,
      ``special_tokens_map.json``) and ``preprocessor_config.json``, so
      ``PaliGemmaProcessor.from_pretrained`` works on the folder.

    Everything goes to a sibling temp folder that is renamed into place at the end, so a
    crash never leaves a half-written model at ``out_dir``. An earlier checkpoint there (a
    folder with ``config.json``) is replaced unless ``overwrite`` is false; any other
    non-empty folder is refused.
    """
    from transformers import GenerationConfig

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RadGrounderError("exists and is not a folder", path=out)
    if out.exists() and any(out.iterdir()):
        if not (out / "config.json").exists():
            raise RadGrounderError("folder is not empty and holds no checkpoint", path=out)
        if not overwrite:
            raise RadGrounderError(
                "a checkpoint exists here (overwrite=True, or --overwrite, replaces it)", path=out
            )
    variant = variant_of(model)
    config = model.config
    _check_tokenizer(tokenizer, config, variant, out)
    seg_id = tokenizer.convert_tokens_to_ids(SEG_TOKEN) if variant == "segmentation" else None
    stored = settings_of(config)
    # Written back to the in-memory config too, so the live model and the files agree.
    config.radgrounder = {
        **stored,
        **radgrounder_settings(
            variant,
            seg_token_id=seg_id,
            mask_threshold=stored.get("mask_threshold", "probability"),
            head=stored.get("head"),
        ),
    }
    config.architectures = [SEGMENTATION_ARCH if variant == "segmentation" else DETECTION_ARCH]
    config.dtype = model.dtype

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_weights(model, tmp, max_shard_bytes)
        _write_config(config, tmp)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
            num_beams=1,
            max_new_tokens=200,
        ).save_pretrained(str(tmp))
        save_tokenizer(tokenizer, tmp)
        (tmp / PREPROCESSOR_CONFIG).write_text(
            json.dumps(preprocessor_config(config), indent=2) + "\n", encoding="utf-8"
        )
        apply_umask(tmp)  # safetensors writes 0600 whatever the umask
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out

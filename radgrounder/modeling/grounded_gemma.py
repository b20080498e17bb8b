"""The segmentation model, its mask decoder and the training losses (spec §3.2-3.3).

``GroundedGemmaForConditionalGeneration`` is a stock PaliGemma with a ``segmentation_head``: a
SAM-like two-way decoder that reads the SigLIP tokens (after SigLIP's post-LayerNorm, before the
multimodal projector) and the language model's final hidden state at each ``</seg>`` position,
and returns 224x224 mask logits. Module and parameter names match the reference checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.paligemma.modeling_paligemma import (
    PaliGemmaCausalLMOutputWithPast,
    PaliGemmaModel,
    PaliGemmaPreTrainedModel,
)
from transformers.utils import can_return_tuple

from radgrounder.errors import RadGrounderError
from radgrounder.modeling.configs import head_settings, settings_of

IGNORE_INDEX = -100


class MultiHeadAttention(nn.Module):
    """Plain multi-head attention with separate biased projections (SAM style, no dropout,
    no downsampling), so the state-dict keys are ``{q,k,v,out}_proj.{weight,bias}``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise RadGrounderError(f"num_heads: {num_heads} does not divide the width {dim}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = (
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(k)),
            self._heads(self.v_proj(v)),
        )
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        out = (attn @ v).transpose(1, 2).flatten(2)
        return self.out_proj(out)


class TwoWayAttentionBlock(nn.Module):
    """Self-attention, token→image, MLP, image→token; post-norm with residuals throughout.

    Unlike SAM, the first layer keeps the self-attention residual (it only skips adding the
    query PE), and the image side never gets a positional encoding.
    """

    def __init__(
        self, dim: int, num_heads: int, mlp_dim: int, *, skip_first_layer_pe: bool, eps: float
    ) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_token_to_image = MultiHeadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.norm4 = nn.LayerNorm(dim, eps=eps)
        self.cross_attn_image_to_token = MultiHeadAttention(dim, num_heads)
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = queries if self.skip_first_layer_pe else queries + query_pe
        queries = self.norm1(queries + self.self_attn(q, q, queries))
        q = queries + query_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, keys, keys))
        queries = self.norm3(queries + self.mlp(queries))
        q = queries + query_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    def __init__(self, depth: int, dim: int, num_heads: int, mlp_dim: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(dim, num_heads, mlp_dim, skip_first_layer_pe=i == 0, eps=eps)
            for i in range(depth)
        )
        self.final_attn_token_to_image = MultiHeadAttention(dim, num_heads)
        self.norm_final_attn = nn.LayerNorm(dim, eps=eps)

    def forward(self, query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The query doubles as its own positional term, as in the reference.
        queries = query
        for layer in self.layers:
            queries, keys = layer(queries, keys, query)
        queries = self.norm_final_attn(
            queries + self.final_attn_token_to_image(queries, keys, keys)
        )
        return queries, keys


class SegmentationDecoder(nn.Module):
    """Mask decoder: image tokens ``(N, T, img_dim)`` + one query ``(N, D)`` → logits
    ``(N, num_classes, mask_size, mask_size)``.

    T must be a square number (16x16 for PaliGemma-2/224); token t is grid row t // side,
    column t % side, SigLIP's raster order. The grid logits are bilinearly upsampled
    (align_corners False) to ``mask_size``.
    """

    def __init__(
        self,
        img_feat_dim: int,
        dim: int,
        *,
        num_classes: int = 1,
        num_heads: int = 8,
        num_layers: int = 2,
        mlp_ratio: int = 4,
        mask_size: int = 224,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.mask_size = mask_size
        self.img_projection = nn.Linear(img_feat_dim, dim)
        self.transformer = TwoWayTransformer(
            num_layers, dim, num_heads, dim * mlp_ratio, layer_norm_eps
        )
        self.output_proj = nn.Linear(dim, num_classes)
        self.reset_parameters()

    @staticmethod
    @torch.no_grad()
    def init_module(module: nn.Module) -> None:
        """Xavier-uniform Linear weights, zero biases, LayerNorm 1/0 (the reference's init)."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def reset_parameters(self) -> None:
        for module in self.modules():
            self.init_module(module)

    def forward(self, image_features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        n, tokens, _ = image_features.shape
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise RadGrounderError(f"image_features: {tokens} tokens do not form a square grid")
        dtype = self.img_projection.weight.dtype
        keys = self.img_projection(image_features.to(dtype))
        queries, keys = self.transformer(query.to(dtype).unsqueeze(1), keys)
        logits = self.output_proj(keys + queries.expand(-1, tokens, -1))
        grid = logits.transpose(1, 2).reshape(n, self.num_classes, side, side)
        if n == 0:
            return grid.new_zeros(0, self.num_classes, self.mask_size, self.mask_size)
        return F.interpolate(
            grid, size=(self.mask_size, self.mask_size), mode="bilinear", align_corners=False
        )


def decoder_from_config(config: PaliGemmaConfig) -> SegmentationDecoder:
    head = head_settings(config)
    return SegmentationDecoder(
        config.vision_config.hidden_size,
        config.vision_config.projection_dim,
        num_classes=head["num_classes"],
        num_heads=head["num_heads"],
        num_layers=head["num_layers"],
        mlp_ratio=head["mlp_ratio"],
        mask_size=head["mask_size"],
        layer_norm_eps=head["layer_norm_eps"],
    )


@dataclass
class GroundedGemmaOutput(PaliGemmaCausalLMOutputWithPast):
    """PaliGemma's output plus ``mask_logits`` ``(N, 1, 224, 224)``, one per ``seg_token_pos``
    row, in that order (``None`` when no positions were given)."""

    mask_logits: torch.FloatTensor | None = None


class GroundedGemmaForConditionalGeneration(PaliGemmaForConditionalGeneration):
    """PaliGemma plus ``segmentation_head`` (the released RadGrounder segmentation model)."""

    def __init__(self, config: PaliGemmaConfig) -> None:
        # Build every module before the single post_init so the base init runs once and the
        # decoder's own init is re-applied on top of it (see _init_weights).
        PaliGemmaPreTrainedModel.__init__(self, config)
        self.model = PaliGemmaModel(config)
        self.lm_head = nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.segmentation_head = decoder_from_config(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # Re-applied on top of the base normal(0, 0.02). It has to happen per leaf module:
        # transformers skips container modules without own parameters in custom-code models,
        # so a hook on SegmentationDecoder itself would never run. Inside initialize_weights
        # torch.nn.init is guarded, so weights loaded by from_pretrained are left alone.
        head = getattr(self, "segmentation_head", None)
        if head is not None and any(module is m for m in head.modules()):
            SegmentationDecoder.init_module(module)

    @property
    def seg_token_id(self) -> int | None:
        return settings_of(self.config).get("seg_token_id")

    def set_seg_token_id(self, seg_token_id: int) -> None:
        """Kept for the reference's API; the loader sets it from the tokenizer."""
        settings = settings_of(self.config)
        settings["seg_token_id"] = int(seg_token_id)
        self.config.radgrounder = settings

    def decode_masks(
        self,
        hidden_states: torch.Tensor,
        image_features: torch.Tensor,
        seg_token_pos: torch.Tensor,
    ) -> torch.Tensor:
        """Mask logits for the final LM hidden states at ``seg_token_pos`` rows
        ``[batch_row, token_index]``, each with its own row's SigLIP tokens."""
        pos = torch.as_tensor(seg_token_pos, dtype=torch.long, device=hidden_states.device)
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise RadGrounderError(f"seg_token_pos: expected shape (N, 2), got {tuple(pos.shape)}")
        batch, length = hidden_states.shape[:2]
        if pos.numel() and (pos.min() < 0 or pos[:, 0].max() >= batch or pos[:, 1].max() >= length):
            raise RadGrounderError(
                f"seg_token_pos: positions must lie in batch 0..{batch - 1}, tokens 0..{length - 1}"
            )
        queries = hidden_states[pos[:, 0], pos[:, 1]]
        return self.segmentation_head(image_features.to(queries.device)[pos[:, 0]], queries)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any = None,
        token_type_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, Any] | None = None,
        seg_token_pos: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> GroundedGemmaOutput:
        """PaliGemma's forward; with ``seg_token_pos`` also ``mask_logits``.

        The SigLIP tokens come from the same vision pass that feeds the language model
        (``image_outputs.last_hidden_state``), so the vision tower runs once per call.
        """
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            token_type_ids=token_type_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.text_config.vocab_size,
                **kwargs,
            )
        mask_logits = None
        if seg_token_pos is not None:
            if outputs.image_outputs is None:
                raise RadGrounderError(
                    "seg_token_pos: mask decoding needs pixel_values (or mm_encoder_outputs)"
                )
            mask_logits = self.decode_masks(
                hidden_states, outputs.image_outputs.last_hidden_state, seg_token_pos
            )
        return GroundedGemmaOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            mask_logits=mask_logits,
        )


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over every label that is not -100, and that count.

    Dividing the summed losses of a whole accumulation window by its summed count gives HF's
    ``num_items_in_batch`` normalisation (spec §3.3).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise RadGrounderError(
            f"labels: shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)}"
        )
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (shift_labels != IGNORE_INDEX).sum()


def mask_loss(mask_logits: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bce, dice)`` for ``mask_logits`` ``(N, 1, H, W)`` against binary ``gt`` ``(N, H, W)``.

    BCE-with-logits is averaged over all masks and pixels; Dice is the mean over masks of
    ``1 - 2·Σ(σ·gt) / (Σσ + Σgt + 1e-6)``. The reference trains on ``bce + dice`` weighted 0.1.
    """
    if mask_logits.ndim == 3:
        mask_logits = mask_logits.unsqueeze(1)
    if gt.ndim == 3:
        gt = gt.unsqueeze(1)
    if mask_logits.ndim != 4 or mask_logits.shape[1] != 1 or gt.shape != mask_logits.shape:
        raise RadGrounderError(
            f"segment_gt: shape {tuple(gt.shape)} does not match mask logits "
            f"{tuple(mask_logits.shape)}"
        )
    if mask_logits.shape[0] == 0:
        zero = mask_logits.sum() * 0.0
        return zero, zero.clone()
    logits = mask_logits.float()
    target = gt.to(device=logits.device, dtype=torch.float32)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probs = torch.sigmoid(logits)
    num = 2 * (probs * target).sum(dim=(2, 3))
    den = probs.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1e-6
    return bce, (1 - num / den).mean()

"""The training objective as one module, so the distributed engine wraps exactly what runs.

``TrainingObjective(model)(batch)`` returns per-row summed target-token cross-entropy, target
counts and, for the segmentation variant, the summed mask loss. The LM head runs only at
target positions, ``chunk`` positions at a time under activation checkpointing: the
``(batch, length, 257k)`` fp32 logits of the whole window are never materialised (at 3B and
batch 24 they alone would take ~10 GB), and the loss is the same (same head, same final-logit
soft-capping, fp32 cross-entropy).

A segmentation micro-batch without a single mask still runs the mask head once, with weight
zero, so every rank's backward touches the same parameters: DDP, FSDP and DeepSpeed reduce
gradients per parameter bucket and would wait forever for a rank that skipped the head.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _base_model(model: nn.Module) -> nn.Module:
    """The PaliGemma/GroundedGemma module under a peft wrapper (LoRA layers sit inside it)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _head_loss(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, cap):
    # The head is called as a module (not via its weight) so engines that gather parameters
    # in module hooks (ZeRO-3) see it run.
    logits = lm_head(hidden)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.float(), targets, reduction="none")


def _agreed_chunks(n_chunks: int, device: torch.device) -> int:
    """The most LM-head chunks any rank of a multi-process run has in this micro-batch.

    Every rank calls the head that many times (a rank with fewer targets on empty chunks):
    ZeRO-3 gathers a module's parameters in hooks on each call and checks that the ranks'
    module call sequences agree, so one rank calling the head once more than another waits
    forever in that rank's next collective. One process: ``n_chunks`` itself."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n_chunks
    most = torch.tensor([n_chunks], dtype=torch.int64, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most.item())


def target_token_losses(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    softcap: float | None,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed next-token cross-entropy over labels != -100, and their counts.

    ``hidden`` is the final hidden state ``(B, T, D)``; position t predicts ``labels[:, t+1]``.
    The head runs on ``chunk`` target positions at a time, as often on every rank of a
    multi-process run (at least once, even on a micro-batch without targets), and under
    activation checkpointing when that is more than once.
    """
    shift_labels = labels[:, 1:]
    where = (shift_labels != IGNORE).nonzero(as_tuple=True)
    rows = where[0]
    h = hidden[:, :-1][where]
    targets = shift_labels[where]
    calls = _agreed_chunks(max(1, -(-h.shape[0] // chunk)), hidden.device)
    per_token = []
    for start in range(0, calls * chunk, chunk):
        part = (h[start : start + chunk], targets[start : start + chunk])
        if h.requires_grad and calls > 1:
            per_token.append(checkpoint(_head_loss, *part, lm_head, softcap, use_reentrant=False))
        else:
            per_token.append(_head_loss(*part, lm_head, softcap))
    batch = labels.shape[0]
    losses = torch.cat(per_token)
    sums = torch.zeros(batch, dtype=torch.float32, device=hidden.device).index_add(0, rows, losses)
    counts = torch.bincount(rows, minlength=batch)
    return sums, counts


def mask_loss_sums(mask_logits: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Σ over masks of (pixel-mean BCE + Dice loss): ``mask_loss``'s ``bce + dice`` times the
    number of masks, so it can be normalised by the masks of a whole window."""
    from radgrounder.modeling import mask_loss

    bce, dice = mask_loss(mask_logits, gt)
    return (bce + dice) * mask_logits.shape[0]


class TrainingObjective(nn.Module):
    """Wraps the model; ``forward(**batch)`` returns the loss terms of one micro-batch."""

    def __init__(
        self, model: nn.Module, *, segmentation: bool, chunk: int = 1024, zero_pass: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.segmentation = segmentation
        self.chunk = chunk
        self.zero_pass = zero_pass  # False only to measure the alternative (an engine option)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        labels: torch.Tensor,
        seg_token_pos: torch.Tensor | None = None,
        segment_gt: torch.Tensor | None = None,
        **_: Any,
    ) -> dict[str, torch.Tensor]:
        base = _base_model(self.model)
        out = base.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        cap = getattr(base.config.get_text_config(), "final_logit_softcapping", None)
        sums, counts = target_token_losses(hidden, labels, base.lm_head, cap, self.chunk)
        result = {"lm_sums": sums, "counts": counts}
        if self.segmentation:
            image = out.image_outputs.last_hidden_state
            if seg_token_pos is not None and segment_gt is not None and len(seg_token_pos):
                masks = base.decode_masks(hidden, image, seg_token_pos)
                result["seg_sum"] = mask_loss_sums(masks.squeeze(1), segment_gt)
            elif self.zero_pass:
                # Weight zero: the head's parameters get (zero) gradients on this rank too.
                dummy = base.segmentation_head(image[:1], hidden[:1, 0])
                result["seg_sum"] = dummy.float().sum() * 0.0
        return result

"""RT-DETR's transformer decoder with IoU-aware query selection and iterative box refinement.

1. The encoder maps are flattened into one token sequence (flatten order, fine to coarse).
2. Query selection: every token proposes a class score and a box (an offset on its anchor); the top-k
   tokens by best class score become the initial queries (content = the token, reference = its box).
   The varifocal loss on these proposals (the "encoder" auxiliary loss) makes the score IoU-aware.
3. Each decoder layer: self-attention between queries, deformable cross-attention to the multi-scale
   maps around each query's reference box, FFN; then a box head refines the box (offset in logit space)
   and the refined, detached box becomes the next layer's reference.
4. "Look forward twice" (DINO; what the reference RT-DETR trains with): in training, the box that layer
   i > 0 is *scored* on applies its offset to the previous layer's box *before* the detach, so each
   layer's box loss also trains the layer before it. The value is the same box (the reference input
   and the undetached box are equal); only the gradient differs. The next layer's reference stays
   detached either way.
Boxes are cxcywh normalised by the *padded* input size; the model converts back to pixels.

Initialisation follows the reference (rtdetr_pytorch's RTDETRTransformer._reset_parameters): class
logits start at a 1% foreground prior, box heads start as "no change", and (``reference_init``) the first
layer of ``enc_output`` and both layers of ``query_pos_head`` are xavier-uniform (their biases keep
PyTorch's default). The small CPU preset keeps PyTorch's default for those: on the synthetic data it
trained faster so in its 10-epoch budget (see the preset). The input projections keep PyTorch's
default, as in the reference. The label embedding of the denoising queries has a padding row (index
num_classes) that is zero and receives no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from neoray.models.box_ops import inverse_sigmoid
from neoray.models.deformable_attention import MSDeformableAttention
from neoray.models.denoising import DenoisingQueries
from neoray.models.position import make_anchors

FP16_MAX = 65504.0


class MLP(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, layers: int):
        super().__init__()
        dims = [cin] + [hidden] * (layers - 1) + [cout]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, levels: int, points: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = MSDeformableAttention(dim, heads, levels, points)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, query_pos, reference_boxes, memory, shapes, attn_mask=None):
        q = k = x + query_pos
        x = self.norm1(x + self.dropout(self.self_attn(q, k, x, attn_mask=attn_mask, need_weights=False)[0]))
        x = self.norm2(x + self.dropout(self.cross_attn(x + query_pos, reference_boxes, memory, shapes)))
        # Clamp to the float16 range before the last norm (as the reference does): under fp16 autocast an
        # overflow to inf here would turn the whole query into NaN.
        return self.norm3((x + self.dropout(self.ffn(x))).clamp(min=-FP16_MAX, max=FP16_MAX))


class RTDETRDecoder(nn.Module):
    def __init__(
        self,
        num_classes: int,
        dim: int = 256,
        levels: int = 3,
        num_queries: int = 300,
        num_layers: int = 6,
        heads: int = 8,
        ffn_dim: int = 1024,
        points: int = 4,
        dropout: float = 0.0,
        in_dim: int | None = None,
        look_forward_twice: bool = True,
        reference_init: bool = True,
    ):
        super().__init__()
        self.num_queries, self.levels = num_queries, levels
        self.look_forward_twice = look_forward_twice
        in_dim = dim if in_dim is None else in_dim  # the encoder's width (384 for the reference's r101vd)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_dim, dim, 1, bias=False), nn.BatchNorm2d(dim)) for _ in range(levels)
        )
        # Query selection heads on the encoder tokens.
        self.enc_output = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.enc_score_head = nn.Linear(dim, num_classes)
        self.enc_bbox_head = MLP(dim, dim, 4, 3)
        # Label embeddings of the denoising queries; the extra row (zero, never trained) pads images with
        # fewer objects than the most in the batch.
        self.denoising_class_embed = nn.Embedding(num_classes + 1, dim, padding_idx=num_classes)
        self.query_pos_head = MLP(4, 2 * dim, dim, 2)
        self.layers = nn.ModuleList(
            DecoderLayer(dim, heads, ffn_dim, levels, points, dropout) for _ in range(num_layers)
        )
        self.score_heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_layers))
        self.bbox_heads = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(num_layers))
        self._reset_parameters(reference_init)

    def _reset_parameters(self, reference_init: bool) -> None:
        # Class logits start at the prior of 1% foreground, as in focal-loss detectors: stable early VFL.
        prior_bias = -torch.log(torch.tensor((1 - 0.01) / 0.01)).item()
        for head in [self.enc_score_head, *self.score_heads]:
            nn.init.constant_(head.bias, prior_bias)
        # Box heads start as "no change" to the reference box.
        for head in [self.enc_bbox_head, *self.bbox_heads]:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if not reference_init:
            return
        # PyTorch's default for these (kaiming-uniform with a=sqrt(5)) is several times wider: std 4.6x on
        # query_pos_head.layers.0, whose input is only 4 box coordinates.
        nn.init.xavier_uniform_(self.enc_output[0].weight)
        for layer in self.query_pos_head.layers:
            nn.init.xavier_uniform_(layer.weight)

    def forward(
        self, features: list[torch.Tensor], valid_fraction: tuple[float, float], denoising: DenoisingQueries | None
    ) -> dict:
        """features: encoder maps fine to coarse. valid_fraction: (real W / padded W, real H / padded H).

        Returns "logits" (layers, B, Q, K) and "boxes" (layers, B, Q, 4) for the matching queries,
        "enc_logits"/"enc_boxes" (B, Q, K|4) of the selected proposals, and when denoising is given
        "dn_logits"/"dn_boxes" (layers, B, N, K|4).
        """
        maps = [proj(f) for proj, f in zip(self.input_proj, features)]
        shapes = [(m.shape[2], m.shape[3]) for m in maps]
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (B, S, C)
        # Anchors, proposals and reference boxes stay float32 under AMP, as in the reference: a bf16 box has
        # 8 bits of mantissa, up to about 4 px at 1920 wide. bf16/fp16 head outputs + float32 anchors promote
        # to float32, and so do the boxes refined from them, layer after layer.
        anchors, valid = make_anchors(shapes, valid_fraction, device=memory.device)

        # --- query selection ---
        tokens = self.enc_output(memory * valid.to(memory.dtype))
        token_logits = self.enc_score_head(tokens)
        token_boxes = self.enc_bbox_head(tokens) + anchors
        # Tokens in the padding (or at the very border) are never selected.
        selection_score = token_logits.max(-1).values.masked_fill(~valid[..., 0], float("-inf"))
        k = min(self.num_queries, memory.shape[1])
        top = selection_score.topk(k, dim=1).indices  # (B, k)
        enc_logits = token_logits.gather(1, top[..., None].expand(-1, -1, token_logits.shape[-1]))
        enc_box_logits = token_boxes.gather(1, top[..., None].expand(-1, -1, 4))
        # Queries start from the selected tokens; their gradient goes through the proposal losses only.
        content = tokens.gather(1, top[..., None].expand(-1, -1, tokens.shape[-1])).detach()
        reference_logits = enc_box_logits.detach()
        attn_mask = None
        if denoising is not None:
            content = torch.cat([denoising.content.to(content.dtype), content], dim=1)
            reference_logits = torch.cat([denoising.reference_logits.to(reference_logits.dtype), reference_logits],
                                         dim=1)
            attn_mask = denoising.attn_mask
            # The top-k may be smaller than num_queries on tiny inputs; trim the mask to the real count.
            size = denoising.count + k
            attn_mask = attn_mask[:size, :size]

        # --- decoder with iterative refinement ---
        x = content
        reference = reference_logits.sigmoid()
        previous = None  # the previous layer's box, not detached (look forward twice)
        all_logits, all_boxes = [], []
        for layer, score_head, bbox_head in zip(self.layers, self.score_heads, self.bbox_heads):
            x = layer(x, self.query_pos_head(reference), reference, memory, shapes, attn_mask)
            offset = bbox_head(x)
            boxes = (offset + inverse_sigmoid(reference)).sigmoid()
            if self.training and self.look_forward_twice and previous is not None:
                # Same value as `boxes`; the loss on it also reaches the previous layer.
                all_boxes.append((offset + inverse_sigmoid(previous)).sigmoid())
            else:
                all_boxes.append(boxes)
            all_logits.append(score_head(x))
            previous = boxes
            reference = boxes.detach()  # the next layer's input never carries gradient back

        logits, boxes = torch.stack(all_logits), torch.stack(all_boxes)
        n = denoising.count if denoising is not None else 0
        out = {
            "logits": logits[:, :, n:],
            "boxes": boxes[:, :, n:],
            "enc_logits": enc_logits,
            "enc_boxes": enc_box_logits.sigmoid(),
        }
        if self.training:
            # Every token's proposal, for one-to-many supervision of the query-selection head (criterion.py).
            out.update(token_logits=token_logits, token_boxes=token_boxes.sigmoid(), token_valid=valid[0, :, 0],
                       token_centres=anchors[0, :, :2].float().sigmoid(), token_levels=_levels(shapes, memory.device))
        if denoising is not None:
            out.update(dn_logits=logits[:, :, :n], dn_boxes=boxes[:, :, :n])
        return out


def _levels(shapes: list[tuple[int, int]], device) -> torch.Tensor:
    """The feature level of every token in flatten order (fine to coarse)."""
    return torch.cat([torch.full((h * w,), level, dtype=torch.int64, device=device)
                      for level, (h, w) in enumerate(shapes)])

"""The 4M encoder-decoder over fixed-length token modalities.

Modalities sit side by side in one concatenated layout of ``S = sum(length)`` positions (modality ``k`` at
``[offset_k, offset_k + length_k)``); a batch carries every modality's tokens as LOCAL ids (0..vocab_k-1) in
that layout, ``tokens [B, S]``, and a :class:`~mmsuite.lightning_modules.fourm.masking.MaskPlan` says which
positions are encoder inputs and which are decoder targets.

* per-modality token embeddings and output heads: a modality can only ever emit its own ids; a modality may
  share its table with another of the same range (``share_with``: the next frame reads and writes the same
  image codes as the current one), and heads are tied to the embeddings by default (4M's ``share_embedding``),
  so copying a token is as easy as matching its embedding; ``pose_ordinal_init`` starts the pose bins' rows as
  sin-cos of the bin value, so neighbouring bins start with similar embeddings (and, tied, similar logits);
* a learned modality embedding; positions: fixed 2-D sin-cos over the token grid for images (the current and
  next frame share it), learned joint + axis (x, y, visibility) embeddings for poses, 1-D sin-cos for sequences;
* the encoder sees only the visible tokens (padded to the batch maximum), the decoder's queries are
  ``query token + modality + position`` of the targets, with self-attention among the targets and
  cross-attention to the encoder output (projected, plus the inputs' modality and position embeddings, as 4M);
* logits are computed only at real target positions, with the target's own head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmsuite.nn.transformer import DecoderBlock, EncoderBlock, sincos_1d, sincos_2d

KINDS = ("image", "pose", "seq")
POSE_COMPONENTS = 3  # x, y, visibility per joint
POSE_FLAGS = 3  # a pose vocabulary is its bins followed by <invisible> <visible> <na> (tokenizers/pose.py)


class FourM(nn.Module):
    def __init__(
        self,
        modalities: Sequence[dict],
        dim: int = 256,
        encoder_depth: int = 4,
        decoder_depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        tie_heads: bool = True,
        pose_ordinal_init: float = 0.0,
    ):
        super().__init__()
        self.specs = [dict(m) for m in modalities]
        if not self.specs:
            raise ValueError("FourM needs at least one modality")
        names = [m["name"] for m in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        for m in self.specs:
            if m.get("kind") not in KINDS:
                raise ValueError(f"modality {m['name']!r}: kind must be one of {KINDS}, got {m.get('kind')!r}")
            if m["kind"] == "image" and int(m["grid"][0]) * int(m["grid"][1]) != int(m["length"]):
                raise ValueError(f"modality {m['name']!r}: grid {list(m['grid'])} does not hold length {m['length']}")
            if m["kind"] == "pose" and int(m["length"]) % POSE_COMPONENTS:
                raise ValueError(f"modality {m['name']!r}: a pose has 3 tokens per joint, length {m['length']}")
        self.names = names
        self.lengths = [int(m["length"]) for m in self.specs]
        self.vocabs = [int(m["vocab"]) for m in self.specs]
        self.dim = dim

        tables: dict[str, nn.Embedding] = {}
        for m, v in zip(self.specs, self.vocabs):
            other = m.get("share_with")
            if other is None:
                tables[m["name"]] = nn.Embedding(v, dim)
                continue
            if other not in tables:
                raise ValueError(f"modality {m['name']!r}: share_with {other!r} must name an earlier modality")
            if tables[other].num_embeddings != v:
                raise ValueError(f"modality {m['name']!r} shares {other!r}'s table but their vocab sizes differ")
            tables[m["name"]] = tables[other]
        self.tok_emb = nn.ModuleList(tables[n] for n in names)
        self.tie_heads = bool(tie_heads)
        self.heads = nn.ModuleList(
            nn.Identity() if self.tie_heads else nn.Linear(dim, v, bias=False) for v in self.vocabs
        )
        self.mod_emb = nn.Embedding(len(self.specs), dim)
        self.query = nn.Parameter(torch.zeros(dim))
        n_joints = max([L // POSE_COMPONENTS for m, L in zip(self.specs, self.lengths) if m["kind"] == "pose"] or [1])
        self.joint_emb = nn.Embedding(n_joints, dim)
        self.component_emb = nn.Embedding(POSE_COMPONENTS, dim)

        # per concatenated position: modality id, fixed sin-cos position, pose joint / component ids
        seg, fixed, joint, comp, is_pose = [], [], [], [], []
        for k, (m, L) in enumerate(zip(self.specs, self.lengths)):
            seg.append(torch.full((L,), k))
            if m["kind"] == "image":
                fixed.append(sincos_2d(int(m["grid"][0]), int(m["grid"][1]), dim))
            elif m["kind"] == "seq":
                fixed.append(sincos_1d(L, dim))
            else:
                fixed.append(torch.zeros(L, dim))
            idx = torch.arange(L)
            pose = m["kind"] == "pose"
            joint.append(idx // POSE_COMPONENTS if pose else torch.zeros(L, dtype=torch.long))
            comp.append(idx % POSE_COMPONENTS if pose else torch.zeros(L, dtype=torch.long))
            is_pose.append(torch.full((L,), pose))
        self.register_buffer("segment", torch.cat(seg), persistent=False)
        self.register_buffer("fixed_pos", torch.cat(fixed), persistent=False)
        self.register_buffer("joint_id", torch.cat(joint), persistent=False)
        self.register_buffer("component_id", torch.cat(comp), persistent=False)
        self.register_buffer("is_pose", torch.cat(is_pose), persistent=False)
        self.offsets = [sum(self.lengths[:k]) for k in range(len(self.lengths))]

        self.encoder = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio, qk_norm) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(dim)
        self.context_proj = nn.Linear(dim, dim)
        self.decoder = nn.ModuleList(DecoderBlock(dim, heads, mlp_ratio, qk_norm) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim)
        self.apply(self._init)
        nn.init.normal_(self.query, std=1.0)
        if pose_ordinal_init > 0:  # bins start as sin-cos of their value: neighbouring bins start alike
            with torch.no_grad():
                for k, m in enumerate(self.specs):
                    if m["kind"] == "pose":
                        n_bins = self.vocabs[k] - POSE_FLAGS
                        self.tok_emb[k].weight[:n_bins] = sincos_1d(n_bins, dim) * pose_ordinal_init

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            # unit scale, like the sin-cos positions (RMS 1/sqrt(2)): at 0.02 the positions drowned the token
            # content (two image codes at one cell gave inputs with cosine 0.999) and tied logits were capped
            nn.init.normal_(m.weight, std=1.0)

    @property
    def seq_len(self) -> int:
        return sum(self.lengths)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown modality {name!r}; the model has {self.names}") from None

    # -- embeddings -------------------------------------------------------------------------------------
    def positions(self, index: torch.Tensor) -> torch.Tensor:
        """Position embedding ``[..., D]`` of concatenated positions ``index``."""
        pose = self.joint_emb(self.joint_id[index]) + self.component_emb(self.component_id[index])
        return self.fixed_pos[index] + pose * self.is_pose[index, None]

    def embed_tokens(self, tokens: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Token embeddings ``[B, N, D]`` of ``tokens`` (local ids, ``[B, S]``) at positions ``index`` ``[B, N]``,
        each with its modality's table; invalid (padding) entries are zero."""
        ids = tokens.gather(1, index)
        seg = self.segment[index]
        out = torch.zeros(*index.shape, self.dim, device=tokens.device, dtype=self.tok_emb[0].weight.dtype)
        for k, table in enumerate(self.tok_emb):
            sel = (seg == k) & valid
            out = out + table(torch.where(sel, ids, 0).clamp_max(self.vocabs[k] - 1)) * sel[..., None]
        return out

    # -- forward ----------------------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, enc_index: torch.Tensor, enc_valid: torch.Tensor) -> torch.Tensor:
        seg = self.segment[enc_index]
        x = self.embed_tokens(tokens, enc_index, enc_valid) + self.mod_emb(seg) + self.positions(enc_index)
        for blk in self.encoder:
            x = blk(x, key_valid=enc_valid)
        x = self.encoder_norm(x)
        return self.context_proj(x) + self.mod_emb(seg) + self.positions(enc_index)

    def decode(
        self, context: torch.Tensor, enc_valid: torch.Tensor, dec_index: torch.Tensor, dec_valid: torch.Tensor
    ) -> torch.Tensor:
        y = self.query + self.mod_emb(self.segment[dec_index]) + self.positions(dec_index)
        for blk in self.decoder:
            y = blk(y, context, query_valid=dec_valid, context_valid=enc_valid)
        return self.decoder_norm(y)

    def forward(self, tokens: torch.Tensor, plan) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """-> ``{modality: (logits [n, vocab], target ids [n], batch row of each [n])}`` over the real targets
        of each modality that has any in this batch (modalities without targets are absent)."""
        ctx = self.encode(tokens, plan.enc_index, plan.enc_valid)
        y = self.decode(ctx, plan.enc_valid, plan.dec_index, plan.dec_valid)
        seg = self.segment[plan.dec_index]
        targets = tokens.gather(1, plan.dec_index)
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(plan.dec_index)
        out = {}
        for k in range(len(self.specs)):
            sel = (seg == k) & plan.dec_valid
            if not bool(sel.any()):
                continue
            out[self.names[k]] = (self.logits(k, y[sel]), targets[sel], rows[sel])
        return out

    def logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Modality ``k``'s logits over its own vocabulary for decoder states ``h [..., D]``."""
        if self.tie_heads:  # unit-scale embeddings: 1/sqrt(D) keeps the logits of a LayerNormed state O(sqrt(D))
            return F.linear(h, self.tok_emb[k].weight) * self.dim**-0.5
        return self.heads[k](h)

    @torch.no_grad()
    def predict_logits(self, tokens: torch.Tensor, plan) -> torch.Tensor:
        """Logits of every decoder slot ``[B, M, max vocab]`` (each slot scored by its modality's head; columns
        past that modality's vocabulary are -inf). For generation and evaluation."""
        ctx = self.encode(tokens, plan.enc_index, plan.enc_valid)
        y = self.decode(ctx, plan.enc_valid, plan.dec_index, plan.dec_valid)
        seg = self.segment[plan.dec_index]
        out = torch.full((*plan.dec_index.shape, max(self.vocabs)), float("-inf"), device=y.device)
        for k in range(len(self.specs)):
            sel = seg == k
            if bool(sel.any()):
                out[..., : self.vocabs[k]][sel] = self.logits(k, y[sel]).float()
        return out

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
* linear layers start at ``normal(0, 0.02)`` (4M, timm) or, with ``linear_init_gain`` > 0, at
  ``normal(0, gain / sqrt(fan_in))``: the embeddings are unit scale, and at 0.02 the blocks add little to the
  residual stream, so at init the decoder's queries hardly hear the encoder (m4_pose: swapping the frames moved the
  pose logits by 0.3 % of their spread, and frame -> pose sat on the mean pose);
* a learned modality embedding; positions: fixed 2-D sin-cos over the token grid for images (the current and
  next frame share it), learned joint + axis (x, y, visibility) embeddings for poses, 1-D sin-cos for sequences;
* the encoder sees only the visible tokens (padded to the batch maximum), the decoder's queries are
  ``query token + modality + position`` of the targets, with self-attention among the targets and
  cross-attention to the encoder output (projected, plus the inputs' modality and position embeddings, as 4M);
* logits are computed only at real target positions, with the target's own head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmsuite.nn.transformer import DecoderBlock, EncoderBlock, Packing, sincos_1d, sincos_2d, sincos_at
from mmsuite.settings import as_dict, setting

KINDS = ("image", "pose", "seq")
POSE_COMPONENTS = 3  # x, y, visibility per joint
POSE_FLAGS = 3  # a pose vocabulary is its bins followed by <invisible> <visible> <na> (tokenizers/pose.py)


class FactorisedEmbedding(nn.Module):
    """Embedding of FSQ codes: the sum of one small table per FSQ channel, indexed by that channel's digit of
    the code, plus a per-code residual table that starts at zero.

    An FSQ code is a mixed-radix number (``code = sum_i digit_i * prod(levels[:i])``, as the image tokenizer's
    ``FSQ.codes_to_indices``), and codes with equal digits describe similar patches. A plain table of 4096 rows
    learns each code on its own, from ~1/4096 of the data; here each of the 8-row digit tables learns from all
    of it, so similar codes start alike. Tied logits then score a code as the sum of its digits' scores (and
    the residual). Duck-types :class:`torch.nn.Embedding`: ``weight`` is the full ``[codes, dim]`` table."""

    def __init__(self, levels: Sequence[int], dim: int):
        super().__init__()
        self.levels = [int(v) for v in levels]
        if not self.levels or any(v < 2 for v in self.levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {list(levels)}")
        self.num_embeddings = int(torch.tensor(self.levels).prod())
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1]), 0)
        codes = torch.arange(self.num_embeddings)
        digits = (codes[:, None] // basis[None]) % torch.tensor(self.levels)[None]
        self.register_buffer("digits", digits, persistent=False)  # [codes, channels]
        self.register_buffer("starts", torch.cumsum(torch.tensor([0] + self.levels[:-1]), 0), persistent=False)
        self.digit_emb = nn.Embedding(sum(self.levels), dim)
        self.residual = nn.Embedding(self.num_embeddings, dim)

    def reset_parameters(self) -> None:
        # the sum over channels has unit scale, like every other embedding of the model
        nn.init.normal_(self.digit_emb.weight, std=len(self.levels) ** -0.5)
        nn.init.zeros_(self.residual.weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.forward(torch.arange(self.num_embeddings, device=self.digits.device))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.digit_emb(self.digits[ids] + self.starts).sum(-2) + self.residual(ids)


@dataclass
class FourMNetSettings:
    """:class:`FourM`'s settings (``model.net`` of ``model=fourm``)."""

    dim: int = setting(256, ge=1)
    encoder_depth: int = setting(4, ge=0)
    decoder_depth: int = setting(4, ge=1)
    heads: int = setting(4, ge=1)
    mlp_ratio: float = setting(4.0, gt=0.0)
    qk_norm: bool = False
    tie_heads: bool = True  # output heads tied to the token embeddings (4M's share_embedding)
    packed: bool = True  # per-token work (projections, MLPs) on real tokens only (nn.transformer.Packing)
    attention_groups: int = setting(4, ge=1)  # packed: attention runs on this many length buckets
    # FSQ image codes embedded as the sum of per-channel digit tables (+ a residual) | table
    image_embedding: str = setting("factorised", choices=["factorised", "table"])
    pose_ordinal_init: float = setting(0.0, ge=0.0)  # > 0: pose bin embeddings start as sin-cos of the bin x this
    pose_bin_frame: str = setting("value", choices=["value", "image"])  # ordinal init in the bin's value | image cells
    linear_init_gain: float = setting(0.0, ge=0.0)  # > 0: linear weights normal(0, gain/sqrt(fan_in)); 0: std 0.02

    def build(self, modalities: Sequence[dict]) -> FourM:
        return FourM(modalities, **as_dict(self))


class FourM(nn.Module):
    """The 4M encoder-decoder over ``modalities``; the keyword arguments are the fields of
    :class:`FourMNetSettings` (``FourMNetSettings(...).build(modalities)`` fills in the defaults)."""

    def __init__(
        self,
        modalities: Sequence[dict],
        *,
        dim: int,
        encoder_depth: int,
        decoder_depth: int,
        heads: int,
        mlp_ratio: float,
        qk_norm: bool,
        tie_heads: bool,
        pose_ordinal_init: float,
        linear_init_gain: float,
        pose_bin_frame: str,
        image_embedding: str,
        packed: bool,
        attention_groups: int,
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
        self.packed = bool(packed)  # per-token work on real tokens only (nn.transformer.Packing)
        self.attention_groups = int(attention_groups)  # packed: attention on this many length buckets

        if image_embedding not in ("factorised", "table"):
            raise ValueError(f"image_embedding must be 'factorised' (FSQ digits) or 'table', got {image_embedding!r}")
        tables: dict[str, nn.Module] = {}
        for m, v in zip(self.specs, self.vocabs):
            other = m.get("share_with")
            if other is None:
                levels = m.get("levels")
                if m["kind"] == "image" and image_embedding == "factorised" and levels:
                    tables[m["name"]] = FactorisedEmbedding(levels, dim)
                    if tables[m["name"]].num_embeddings != v:
                        raise ValueError(
                            f"modality {m['name']!r}: FSQ levels {list(levels)} make "
                            f"{tables[m['name']].num_embeddings} codes, but its vocab is {v}"
                        )
                else:
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
        self.segment_host = torch.cat(seg)  # a CPU copy that .to(device) leaves alone
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
        if linear_init_gain < 0:
            raise ValueError(f"linear_init_gain must be >= 0 (0: std 0.02), got {linear_init_gain}")
        self.linear_init_gain = float(linear_init_gain)
        self.apply(self._init)
        for mod in self.modules():
            if isinstance(mod, FactorisedEmbedding):
                mod.reset_parameters()
        nn.init.normal_(self.query, std=1.0)
        if pose_bin_frame not in ("value", "image"):
            raise ValueError(f"pose_bin_frame must be 'value' or 'image', got {pose_bin_frame!r}")
        if pose_ordinal_init > 0:  # bins start as sin-cos of their value: neighbouring bins start alike
            grid = next((int(m["grid"][1]) for m in self.specs if m["kind"] == "image"), None)
            with torch.no_grad():
                for k, m in enumerate(self.specs):
                    if m["kind"] != "pose" or m.get("share_with"):
                        continue
                    n_bins = self.vocabs[k] - POSE_FLAGS
                    if pose_bin_frame == "image" and grid is not None and dim % 4 == 0:
                        # the bin's canvas coordinate in image-grid cells, as the frame's 2-D sin-cos encodes a
                        # cell (rows in the first half of the channels, columns in the second): a bin serves
                        # x and y slots, so it takes the same features in both halves
                        u = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins * grid - 0.5
                        half = sincos_at(u, dim // 2)
                        table = torch.cat([half, half], dim=1)
                    else:
                        table = sincos_1d(n_bins, dim)
                    self.tok_emb[k].weight[:n_bins] = table * pose_ordinal_init

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            if self.linear_init_gain > 0:
                nn.init.normal_(m.weight, std=self.linear_init_gain / m.in_features**0.5)
            else:
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
        out = torch.zeros(*index.shape, self.dim, device=tokens.device, dtype=self.mod_emb.weight.dtype)
        for k, table in enumerate(self.tok_emb):
            sel = (seg == k) & valid
            out = out + table(torch.where(sel, ids, 0).clamp_max(self.vocabs[k] - 1)) * sel[..., None]
        return out

    # -- forward ----------------------------------------------------------------------------------------
    def encode(self, tokens: torch.Tensor, enc_index: torch.Tensor, enc_valid: torch.Tensor, host_valid=None):
        """-> (context, its packing): ``[T, D]`` over the real inputs when packed (``packing`` None otherwise:
        ``[B, N, D]``)."""
        pack = Packing(enc_valid, self.attention_groups, host_valid) if self.packed else None
        seg = self.segment[enc_index]
        tags = self.mod_emb(seg) + self.positions(enc_index)
        x = self.embed_tokens(tokens, enc_index, enc_valid) + tags
        if pack is not None:
            x, tags = pack.pack(x), pack.pack(tags)
        for blk in self.encoder:
            x = blk(x, key_valid=enc_valid, pack=pack)
        return self.context_proj(self.encoder_norm(x)) + tags, pack

    def decode(
        self, context, context_pack, enc_valid, dec_index: torch.Tensor, dec_valid: torch.Tensor, host_valid=None
    ):
        """-> (decoder states, their packing), laid out like :meth:`encode`'s output."""
        pack = Packing(dec_valid, self.attention_groups, host_valid) if self.packed else None
        y = self.query + self.mod_emb(self.segment[dec_index]) + self.positions(dec_index)
        if pack is not None:
            y = pack.pack(y)
        for blk in self.decoder:
            y = blk(y, context, query_valid=dec_valid, context_valid=enc_valid, pack=pack, context_pack=context_pack)
        return self.decoder_norm(y), pack

    def _states(self, tokens: torch.Tensor, plan):
        """Decoder states of the real targets ``[T, D]`` with their concatenated positions ``[T]`` and batch
        rows ``[T]`` (row-major order)."""
        host = {k: getattr(plan, f"host_{k}", None) for k in ("enc_valid", "dec_valid")}
        ctx, ctx_pack = self.encode(tokens, plan.enc_index, plan.enc_valid, host["enc_valid"])
        y, pack = self.decode(ctx, ctx_pack, plan.enc_valid, plan.dec_index, plan.dec_valid, host["dec_valid"])
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(plan.dec_index)
        valid = plan.dec_valid.reshape(-1)
        if pack is None:
            y = y.reshape(-1, y.shape[-1])[valid]
            return y, plan.dec_index.reshape(-1)[valid], rows.reshape(-1)[valid], valid
        return y, plan.dec_index.reshape(-1)[pack.flat], rows.reshape(-1)[pack.flat], pack.flat

    def forward(self, tokens: torch.Tensor, plan) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """-> ``{modality: (logits [n, vocab], target ids [n], batch row of each [n])}`` over the real targets
        of each modality that has any in this batch (modalities without targets are absent)."""
        y, index, rows, _ = self._states(tokens, plan)
        seg = self.segment[index]
        targets = tokens[rows, index]
        out = {}
        for k in self._target_modalities(plan, seg):
            sel = seg == k
            out[self.names[k]] = (self.logits(k, y[sel]), targets[sel], rows[sel])
        return out

    def _target_modalities(self, plan, seg: torch.Tensor) -> list[int]:
        """The modalities with real targets, in order: from the plan's host copies when it has them (no device
        sync), else from ``seg`` (the targets' modality ids)."""
        index, valid = getattr(plan, "host_dec_index", None), getattr(plan, "host_dec_valid", None)
        if index is None or valid is None:
            return [k for k in range(len(self.specs)) if bool((seg == k).any())]
        return sorted(set(self.segment_host[index[valid]].tolist()))

    def logits(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Modality ``k``'s logits over its own vocabulary for decoder states ``h [..., D]``."""
        if self.tie_heads:  # unit-scale embeddings: 1/sqrt(D) keeps the logits of a LayerNormed state O(sqrt(D))
            return F.linear(h, self.tok_emb[k].weight) * self.dim**-0.5
        return self.heads[k](h)

    @torch.no_grad()
    def predict_logits(self, tokens: torch.Tensor, plan) -> torch.Tensor:
        """Logits of every decoder slot ``[B, M, max vocab]`` (each slot scored by its modality's head; columns
        past that modality's vocabulary are -inf; padding slots are all -inf). For generation and evaluation."""
        y, index, _, where = self._states(tokens, plan)
        seg = self.segment[index]
        flat = torch.full((plan.dec_index.numel(), max(self.vocabs)), float("-inf"), device=y.device)
        states = torch.full((y.shape[0], max(self.vocabs)), float("-inf"), device=y.device)
        for k in range(len(self.specs)):
            sel = seg == k
            if bool(sel.any()):
                states[sel, : self.vocabs[k]] = self.logits(k, y[sel]).float()
        flat[where] = states
        return flat.view(*plan.dec_index.shape, -1)

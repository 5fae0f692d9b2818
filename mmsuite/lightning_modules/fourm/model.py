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
  what each kind of modality needs (tables, positions, initialisation) comes from its entry in the registry
  (:mod:`~mmsuite.lightning_modules.fourm.modalities`), never from branches on the kind here;
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

from mmsuite.lightning_modules.fourm import modalities as registry
from mmsuite.lightning_modules.fourm.modalities import FactorisedEmbedding
from mmsuite.nn.transformer import Block, DecoderBlock, Packing
from mmsuite.settings import as_dict, setting


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
        self.modalities = registry.build(self.specs)  # one per entry, in order (modalities.py)
        self.names = [m.name for m in self.modalities]
        self.lengths = [m.length for m in self.modalities]
        self.vocabs = [m.vocab for m in self.modalities]
        self.dim = dim
        self.packed = bool(packed)  # per-token work on real tokens only (nn.transformer.Packing)
        self.attention_groups = int(attention_groups)  # packed: attention on this many length buckets

        if image_embedding not in ("factorised", "table"):
            raise ValueError(f"image_embedding must be 'factorised' (FSQ digits) or 'table', got {image_embedding!r}")
        tables: dict[str, nn.Module] = {}
        for m in self.modalities:
            other = m.share_with
            if other is None:
                tables[m.name] = m.embedding(dim, image_embedding)
                continue
            if other not in tables:
                raise ValueError(f"modality {m.name!r}: share_with {other!r} must name an earlier modality")
            if tables[other].num_embeddings != m.vocab:
                raise ValueError(f"modality {m.name!r} shares {other!r}'s table but their vocab sizes differ")
            tables[m.name] = tables[other]
        self.tok_emb = nn.ModuleList(tables[n] for n in self.names)
        # modalities grouped by the table they read (shared tables: one embedding lookup for all of them)
        owner = {id(t): k for k, t in reversed(list(enumerate(self.tok_emb)))}
        self.table_of = [owner[id(t)] for t in self.tok_emb]  # per modality: the first modality of its table
        self.tie_heads = bool(tie_heads)
        self.heads = nn.ModuleList(
            nn.Identity() if self.tie_heads else nn.Linear(dim, v, bias=False) for v in self.vocabs
        )
        self.mod_emb = nn.Embedding(len(self.specs), dim)
        self.query = nn.Parameter(torch.zeros(dim))
        slots = [m.pose_slots() for m in self.modalities]
        n_joints = max([int(s[0].max()) + 1 for s in slots if s is not None] or [1])
        self.joint_emb = nn.Embedding(n_joints, dim)
        self.component_emb = nn.Embedding(registry.POSE_COMPONENTS, dim)

        # per concatenated position: modality id, fixed position embedding, pose joint / component ids
        seg, fixed, joint, comp, is_pose = [], [], [], [], []
        for k, (m, s) in enumerate(zip(self.modalities, slots)):
            seg.append(torch.full((m.length,), k))
            fixed.append(m.fixed_positions(dim))
            zeros = torch.zeros(m.length, dtype=torch.long)
            joint.append(zeros if s is None else s[0])
            comp.append(zeros if s is None else s[1])
            is_pose.append(torch.full((m.length,), s is not None))
        self.register_buffer("segment", torch.cat(seg), persistent=False)
        self.segment_host = torch.cat(seg)  # a CPU copy that .to(device) leaves alone
        self.register_buffer("fixed_pos", torch.cat(fixed), persistent=False)
        self.register_buffer("joint_id", torch.cat(joint), persistent=False)
        self.register_buffer("component_id", torch.cat(comp), persistent=False)
        self.register_buffer("is_pose", torch.cat(is_pose), persistent=False)
        table_seg = torch.tensor(self.table_of)[torch.cat(seg)]
        self.register_buffer("table_segment", table_seg, persistent=False)  # per position: its table's owner
        self.offsets = [sum(self.lengths[:k]) for k in range(len(self.lengths))]

        self.encoder = nn.ModuleList(Block(dim, heads, mlp_ratio, qk_norm) for _ in range(encoder_depth))
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
        # structured starts of the modalities' own tables (pose bins: sin-cos of their value, pose_ordinal_init)
        grid = next((m.grid[1] for m in self.modalities if m.grid is not None), None)
        for m, table in zip(self.modalities, self.tok_emb):
            if not m.share_with:
                m.init_embedding(table, dim, float(pose_ordinal_init), pose_bin_frame, grid)

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

    def tables(self) -> list[torch.Tensor]:
        """Each modality's token table ``[vocab, D]`` for one forward pass, built once per table: modalities that
        share a table get the same tensor, and a factorised table is assembled once and then read by the input
        embedding and by every tied head (its gradients meet there and flow back through the assembly once)."""
        built = {k: self.tok_emb[k].weight for k in sorted(set(self.table_of))}
        return [built[k] for k in self.table_of]

    def embed_tokens(
        self, tokens: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, tables: list | None = None
    ) -> torch.Tensor:
        """Token embeddings ``[B, N, D]`` of ``tokens`` (local ids, ``[B, S]``) at positions ``index`` ``[B, N]``,
        each from its modality's table (``tables``: :meth:`tables`, built here if not given); invalid (padding)
        entries are zero. One lookup per table, shared tables included."""
        tables = self.tables() if tables is None else tables
        ids = tokens.gather(1, index)
        owner = self.table_segment[index]
        out = None
        for k in sorted(set(self.table_of)):
            sel = (owner == k) & valid
            emb = F.embedding(torch.where(sel, ids, 0).clamp_max(self.vocabs[k] - 1), tables[k]) * sel[..., None]
            out = emb if out is None else out + emb
        return out

    # -- forward ----------------------------------------------------------------------------------------
    def encode(
        self, tokens: torch.Tensor, enc_index: torch.Tensor, enc_valid: torch.Tensor, host_valid=None, tables=None
    ):
        """-> (context, its packing): ``[T, D]`` over the real inputs when packed (``packing`` None otherwise:
        ``[B, N, D]``)."""
        pack = Packing(enc_valid, self.attention_groups, host_valid) if self.packed else None
        seg = self.segment[enc_index]
        tags = self.mod_emb(seg) + self.positions(enc_index)
        x = self.embed_tokens(tokens, enc_index, enc_valid, tables) + tags
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

    def _states(self, tokens: torch.Tensor, plan, tables: list):
        """Decoder states of the real targets ``[T, D]`` with their concatenated positions ``[T]`` and batch
        rows ``[T]`` (row-major order)."""
        host = {k: getattr(plan, f"host_{k}", None) for k in ("enc_valid", "dec_valid")}
        ctx, ctx_pack = self.encode(tokens, plan.enc_index, plan.enc_valid, host["enc_valid"], tables)
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
        tables = self.tables()
        y, index, rows, _ = self._states(tokens, plan, tables)
        seg = self.segment[index]
        targets = tokens[rows, index]
        ks = self._target_modalities(plan, seg)
        sel = {k: seg == k for k in ks}
        heads: dict = {}  # tied heads reading one table score all their targets in one matmul
        for k in ks:
            heads.setdefault(self.table_of[k] if self.tie_heads else -1 - k, []).append(k)
        logits = {}
        for members in heads.values():
            h = [y[sel[k]] for k in members]
            parts = self.logits(members[0], torch.cat(h) if len(h) > 1 else h[0], tables).split([len(x) for x in h])
            logits.update(zip(members, parts))
        return {self.names[k]: (logits[k], targets[sel[k]], rows[sel[k]]) for k in ks}

    def _target_modalities(self, plan, seg: torch.Tensor) -> list[int]:
        """The modalities with real targets, in order: from the plan's host copies when it has them (no device
        sync), else from ``seg`` (the targets' modality ids)."""
        index, valid = getattr(plan, "host_dec_index", None), getattr(plan, "host_dec_valid", None)
        if index is None or valid is None:
            return [k for k in range(len(self.specs)) if bool((seg == k).any())]
        return sorted(set(self.segment_host[index[valid]].tolist()))

    def logits(self, k: int, h: torch.Tensor, tables: list | None = None) -> torch.Tensor:
        """Modality ``k``'s logits over its own vocabulary for decoder states ``h [..., D]`` (``tables``: this
        pass's :meth:`tables`, so that a factorised table is not rebuilt per head)."""
        if self.tie_heads:  # unit-scale embeddings: 1/sqrt(D) keeps the logits of a LayerNormed state O(sqrt(D))
            table = self.tok_emb[k].weight if tables is None else tables[k]
            return F.linear(h * self.dim**-0.5, table)  # scaled on the states: [n, D], not the logits [n, vocab]
        return self.heads[k](h)

    @torch.no_grad()
    def predict_logits(self, tokens: torch.Tensor, plan) -> torch.Tensor:
        """Logits of every decoder slot ``[B, M, max vocab]`` (each slot scored by its modality's head; columns
        past that modality's vocabulary are -inf; padding slots are all -inf). For generation and evaluation."""
        tables = self.tables()
        y, index, _, where = self._states(tokens, plan, tables)
        seg = self.segment[index]
        flat = torch.full((plan.dec_index.numel(), max(self.vocabs)), float("-inf"), device=y.device)
        states = torch.full((y.shape[0], max(self.vocabs)), float("-inf"), device=y.device)
        for k in range(len(self.specs)):
            sel = seg == k
            if bool(sel.any()):
                states[sel, : self.vocabs[k]] = self.logits(k, y[sel], tables).float()
        flat[where] = states
        return flat.view(*plan.dec_index.shape, -1)

"""Foveated VLM: one glimpse token per frame over frozen patch features, a coarse then fine passes through a
causal LM, trained on a caption and next-frame latents.

A glimpse is one query attending over one frame's patch features ``P_t [N, D]``; its output ``z_t`` becomes one
LM input vector ``e_t``. One pass feeds the LM (an HF causal LM, through ``inputs_embeds``)::

    position   0           1 .. T        T+1     T+2 .. T+L
    input      mode token  e_1 .. e_T    <sep>   caption_1 .. caption_{L-1}
    label      -           -             cap_1   cap_2 .. cap_L          (cap_L = EOS; -100 elsewhere)

* Pass 0 (coarse): every frame's query is one learned static query. Fine pass ``k`` (``fine_iterations`` of them):
  the query for frame ``t`` is ``llm_to_query`` of pass ``k - 1``'s hidden state at frame ``t - 1``'s position;
  frame 1 gets the learned initial query. All passes run in parallel over the frames (training); the KV-cached
  loops below run them frame by frame (inference).
* The caption follows a learned separator, so its first token is predicted (from ``<sep>``) and carries loss,
  and so does its EOS. Caption logits are computed only at labelled positions (hidden states gathered first,
  then the LM head), and only in passes whose caption is scored; other passes run the LM on the frames alone
  (causal attention: their frame states do not depend on the caption).
* Visual tokens: ``e_t = visual_scale * W z_t / rms(W z_t)``, per frame of each sample (never over the batch
  and never over frames, so the frame-by-frame loop computes the same tokens), with ``visual_scale`` learned
  and started at the RMS of the LM's token embeddings.
* Reconstruction: a FiLM head predicts frame ``t``'s latent from the hidden state *before* frame ``t``'s token
  (the position of ``e_{t-1}``, which has seen frames ``1 .. t-1`` only) and the previous latent, for
  ``t = 2 .. T`` (frame 1 has no previous frame).

Loss (:func:`fvlm_loss`): ``cap + lambda_recon * rec`` of the last pass, plus ``lambda_coarse`` times the same for
the coarse pass, whose caption is then trained too: the coarse path is a handicapped but not a neglected path, so
``cap_ratio`` inside the model is less inflated (the fair baseline is still a coarse-only model,
``coarse_only``). Gradients flow through every pass (no detach).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmsuite.settings import fail, setting

IGNORE = -100
QUERY_SOURCES = ("same_pass", "previous_pass")
GLIMPSE_KINDS = ("shallow", "attention")


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GlimpseSettings:
    """``shallow``: the reference's glimpse, ``softmax(W q . P / sqrt(D))`` over the raw features, which gave
    near-uniform attention on final DINO features; ``attention``: keys from per-frame normalised features (the
    frame's mean patch removed, then LayerNorm: the common component no longer dominates), learned Q/K/V,
    ``heads`` heads, a learned temperature per head."""

    kind: str = setting("attention", choices=list(GLIMPSE_KINDS))
    heads: int = setting(4, ge=1)
    dim: int = setting(0, ge=0)  # K/V and output width of the attention glimpse (0: the feature width)
    temperature: float = setting(1.0, gt=0.0)  # initial softmax temperature of the attention glimpse


@dataclass
class LMSettings:
    """The causal LM: a local HF folder (``path``, loaded through ``AutoModelForCausalLM``; its embeddings grow to
    ``vocab_size`` when that is larger, e.g. for the token space's specials) or, with no path, one of ``model_type``
    built from the fields below and trained from scratch."""

    path: str = ""
    model_type: str = "llama"  # any AutoConfig model type with the Llama-style fields (llama, qwen3, ...)
    vocab_size: int = setting(512, ge=1)  # ids the LM reads and predicts (= the run's token space)
    hidden_size: int = setting(128, ge=1)
    num_layers: int = setting(4, ge=1)
    num_heads: int = setting(4, ge=1)
    num_kv_heads: int = setting(2, ge=1)
    intermediate_size: int = setting(384, ge=1)
    max_positions: int = setting(512, ge=1)
    attn_implementation: str = setting("sdpa", choices=["sdpa", "eager"])

    def check(self, key: str) -> None:
        if not self.path and (self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads):
            fail(
                f"{key}.hidden_size",
                f"({self.hidden_size}) must divide into num_heads ({self.num_heads}), which must divide into "
                f"num_kv_heads ({self.num_kv_heads})",
            )


@dataclass
class FiLMSettings:
    """Next-frame head: conv encoder of the previous latent, FiLM by ``(gamma, beta)`` from an MLP of the LM state
    (per channel, broadcast over positions), conv decoder."""

    channels: list[int] = setting([32, 64, 128], ge=1)
    mlp_dim: int = setting(256, ge=1)

    def check(self, key: str) -> None:
        if not self.channels:
            fail(f"{key}.channels", "needs at least one width")


@dataclass
class FVLMSettings:
    """The glimpse model's shape (``model.net``)."""

    feature_dim: int = setting(64, ge=1)  # D of the patch features
    latent_channels: int = setting(4, ge=0)  # C of the frame latents [T, C, h, w]; 0: no reconstruction head
    query_dim: int = setting(0, ge=0)  # width of the glimpse queries (0: feature_dim)
    fine_iterations: int = setting(2, ge=0)
    glimpse: GlimpseSettings = setting(GlimpseSettings())
    lm: LMSettings = setting(LMSettings())
    film: FiLMSettings = setting(FiLMSettings())

    def check(self, key: str) -> None:
        g = self.glimpse
        if g.kind == "attention" and (g.dim or self.feature_dim) % g.heads:
            fail(f"{key}.glimpse.dim", f"({g.dim or self.feature_dim}) is not divisible by glimpse.heads ({g.heads})")


@dataclass
class FVLMLossSettings:
    lambda_recon: float = setting(0.1, ge=0.0)
    lambda_coarse: float = setting(1.0, ge=0.0)  # weight of the coarse pass's own caption + reconstruction loss
    coarse_only: bool = False  # control: train the coarse pass alone (no fine pass runs in training)


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------


class ShallowGlimpse(nn.Module):
    """``a = softmax((W q) . P / sqrt(D))`` over the frame's tokens, ``z = a P``; keys = values = raw features.
    ``W`` has no bias: a bias adds the same key score to every query, and every query then attends alike."""

    def __init__(self, query_dim: int, feature_dim: int):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, feature_dim, bias=False)
        self.out_dim = feature_dim

    def memory(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What every query of a frame reads (``[..., N, D]`` leading dims kept): the raw features."""
        return (patches,)

    def attend(self, query: torch.Tensor, memory: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``query [..., Dq]`` over ``memory`` -> ``(z [..., D], attention [..., 1, N])``."""
        (patches,) = memory
        q = self.query_proj(query)
        logits = torch.einsum("...d,...nd->...n", q, patches) / math.sqrt(patches.shape[-1])
        attn = logits.float().softmax(dim=-1).to(patches.dtype)
        return torch.einsum("...n,...nd->...d", attn, patches), attn.unsqueeze(-2)

    def forward(self, query: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.attend(query, self.memory(patches))


class AttentionGlimpse(nn.Module):
    """Multi-head attention of one query over the frame: keys from ``LayerNorm(P - mean_frame(P))``, values from
    the raw ``P`` (the common component is what the frame looks like overall: a value must keep it), learned
    Q/K/V and output projections, logits divided by a learned temperature per head. Keys and values do not depend
    on the query, so :meth:`memory` computes them once per batch for every pass."""

    def __init__(self, query_dim: int, feature_dim: int, dim: int, heads: int, temperature: float):
        super().__init__()
        self.heads, self.head_dim, self.out_dim = heads, dim // heads, dim
        self.key_norm = nn.LayerNorm(feature_dim)
        self.q = nn.Linear(query_dim, dim)
        self.k = nn.Linear(feature_dim, dim)
        self.v = nn.Linear(feature_dim, dim)
        self.out = nn.Linear(dim, dim)
        self.log_temperature = nn.Parameter(torch.full((heads,), math.log(temperature)))

    def memory(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``patches [..., N, D]`` -> keys and values ``[..., N, heads, head_dim]``."""
        lead, n = patches.shape[:-2], patches.shape[-2]
        keys = self.key_norm(patches - patches.mean(dim=-2, keepdim=True))
        k = self.k(keys).view(*lead, n, self.heads, self.head_dim)
        v = self.v(patches).view(*lead, n, self.heads, self.head_dim)
        return k, v

    def attend(self, query: torch.Tensor, memory: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """``query [..., Dq]`` over ``memory`` -> ``(z [..., dim], attention [..., heads, N])``."""
        k, v = memory
        q = self.q(query).view(*query.shape[:-1], self.heads, self.head_dim)
        scale = self.log_temperature.exp()[:, None] * math.sqrt(self.head_dim)
        logits = torch.einsum("...hd,...nhd->...hn", q, k) / scale
        attn = logits.float().softmax(dim=-1).to(v.dtype)
        z = torch.einsum("...hn,...nhd->...hd", attn, v).reshape(*query.shape[:-1], self.out_dim)
        return self.out(z), attn

    def forward(self, query: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``query [..., Dq]``, ``patches [..., N, D]`` -> ``(z [..., dim], attention [..., heads, N])``."""
        return self.attend(query, self.memory(patches))


class FiLMHead(nn.Module):
    """``decoder((1 + gamma) * encoder(previous latent) + beta)`` with ``(gamma, beta) = MLP(hidden state)``; the
    MLP's last layer starts at zero, so the untrained head is an autoencoder of the previous latent."""

    def __init__(self, hidden_size: int, latent_channels: int, settings: FiLMSettings):
        super().__init__()
        c = [latent_channels, *settings.channels]
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, settings.mlp_dim),
            nn.GELU(),
            nn.Linear(settings.mlp_dim, settings.mlp_dim),
            nn.GELU(),
            nn.Linear(settings.mlp_dim, 2 * c[-1]),
        )
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        enc, dec = [], []
        for a, b in zip(c[:-1], c[1:]):
            enc += [nn.Conv2d(a, b, 3, padding=1), nn.GELU()]
        for a, b in zip(c[::-1][:-1], c[::-1][1:]):
            dec += [nn.Conv2d(a, b, 3, padding=1), nn.GELU()]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec[:-1])

    def forward(self, hidden: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """``hidden [M, H]``, ``previous [M, C, h, w]`` -> predicted latent ``[M, C, h, w]``."""
        gamma, beta = self.mlp(hidden).chunk(2, dim=-1)
        feat = self.encoder(previous)
        return self.decoder(feat * (1 + gamma[..., None, None]) + beta[..., None, None])


def build_lm(settings: LMSettings) -> nn.Module:
    """An HF causal LM in float32: ``AutoModelForCausalLM`` from the local folder ``settings.path`` (nothing is
    downloaded; bf16 checkpoints such as SmolLM2's are upcast; the embeddings grow to ``vocab_size`` when the LM has
    fewer ids, the new rows at the mean embedding), or built from the settings' shape, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    s = settings
    if s.path:
        path = Path(os.path.expanduser(s.path))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.lm.path={s.path!r}: no config.json there; a local causal-LM folder (save_pretrained "
                "format) is needed; nothing is downloaded"
            )
        lm = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, attn_implementation=s.attn_implementation
        )
        if lm.get_input_embeddings().num_embeddings < s.vocab_size:
            lm.resize_token_embeddings(s.vocab_size, mean_resizing=True)
        return lm.float()  # fp32 master weights, like every other parameter; mixed precision is the trainer's
    config = AutoConfig.for_model(
        s.model_type,
        vocab_size=s.vocab_size,
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_kv_heads,
        head_dim=s.hidden_size // s.num_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation=s.attn_implementation)


# ---------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PassOutput:
    """One pass. Per-sample sums so that held-out figures are token means over the whole set."""

    name: str  # "coarse", "fine_1", ...
    glimpses: torch.Tensor  # [B, T, Dz] glimpse outputs z
    attention: torch.Tensor  # [B, T, heads, N] glimpse weights
    frame_hidden: torch.Tensor  # [B, T, H] LM hidden states at the frame positions
    caption_nll: torch.Tensor | None = None  # [B] summed caption cross-entropy (None: caption not scored)
    caption_tokens: torch.Tensor | None = None  # [B] supervised caption tokens (EOS included)
    rec: torch.Tensor | None = None  # [B] next-frame latent MSE (mean over frames 2..T and elements)

    @property
    def cap(self) -> torch.Tensor:
        """Token-mean caption cross-entropy over the batch."""
        return self.caption_nll.sum() / self.caption_tokens.sum().clamp_min(1)


@dataclass
class StreamOutput:
    """The frame-by-frame loop: one row per running pass (``S`` = 1 for ``same_pass``)."""

    names: list[str]
    glimpses: torch.Tensor  # [S, B, T, Dz]
    attention: torch.Tensor  # [S, B, T, heads, N]
    caption_nll: torch.Tensor | None = None  # [S, B] (teacher-forced captions)
    caption_tokens: torch.Tensor | None = None  # [S, B]
    tokens: torch.Tensor | None = None  # [S, B, n] greedy captions, EOS-padded after the first EOS


def pass_names(fine_iterations: int) -> list[str]:
    return ["coarse"] + [f"fine_{k}" for k in range(1, fine_iterations + 1)]


def caption_labels(text_ids: torch.Tensor, text_mask: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Labels ``[B, T + 1 + L]`` of one pass's sequence for captions ``text_ids [B, L]`` (EOS included, right-padded,
    ``text_mask`` True on real tokens): caption token ``j`` is the label of position ``T + 1 + j`` (``<sep>`` for
    ``j = 0``), every other position is -100."""
    b, length = text_ids.shape
    labels = text_ids.new_full((b, n_frames + 1 + length), IGNORE)
    labels[:, n_frames + 1 :] = torch.where(text_mask, text_ids, IGNORE)
    return labels


def next_frame_pairs(hidden: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(state, previous, target)`` of next-frame prediction from one pass's hidden states ``[B, S, H]`` (position 0
    the mode token, frame ``t`` at position ``t``) and latents ``[B, T, C, h, w]``: for frames ``t = 2 .. T`` the
    state at position ``t - 1`` (before frame ``t``'s token), latent ``t - 1`` and latent ``t``; each ``[B, T-1, ...]``.
    """
    n_frames = latents.shape[1]
    return hidden[:, 1:n_frames], latents[:, :-1], latents[:, 1:]


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


class FoveatedVLM(nn.Module):
    """Glimpses, visual tokens, the LM and the FiLM head; parallel passes for training, KV-cached loops for
    inference. Inputs: ``features [B, T, N, D]`` (any float dtype), ``text_ids [B, L]`` LM token ids (EOS
    included, right-padded with any valid id), ``text_mask [B, L]``, ``latents [B, T, C, h, w]``."""

    def __init__(self, settings: FVLMSettings | None = None, lm: nn.Module | None = None):
        super().__init__()
        s = self.settings = settings or FVLMSettings()
        self.lm = lm if lm is not None else build_lm(s.lm)
        embed = self.lm.get_input_embeddings()
        hidden = embed.embedding_dim
        query_dim = s.query_dim or s.feature_dim
        g = s.glimpse
        if g.kind == "shallow":
            self.glimpse = ShallowGlimpse(query_dim, s.feature_dim)
        else:
            self.glimpse = AttentionGlimpse(query_dim, s.feature_dim, g.dim or s.feature_dim, g.heads, g.temperature)
        token_rms = float(embed.weight.detach().float().pow(2).mean().sqrt())
        self.visual_proj = nn.Linear(self.glimpse.out_dim, hidden)
        self.visual_scale = nn.Parameter(torch.tensor(token_rms))
        # std 1: with small queries the static and the first fine query start alike and the paths stay identical
        self.q_static = nn.Parameter(torch.randn(query_dim))
        self.q_init = nn.Parameter(torch.randn(query_dim))
        self.llm_to_query = nn.Linear(hidden, query_dim)
        self.mode_tokens = nn.Parameter(torch.randn(2, hidden) * token_rms)  # coarse, fine
        self.sep_token = nn.Parameter(torch.randn(hidden) * token_rms)
        self.film = FiLMHead(hidden, s.latent_channels, s.film) if s.latent_channels else None
        body = self.lm.base_model
        self._cache_kw = "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"

    # -- pieces ---------------------------------------------------------------------------------------
    def memory(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the glimpses of ``features [..., N, D]`` read (the attention glimpse's keys and values), computed once
        and shared by every pass."""
        return self.glimpse.memory(features.to(self.q_static.dtype))

    def glimpses(
        self, queries: torch.Tensor, features: torch.Tensor | None = None, memory: tuple | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [..., Dq]`` over ``features [..., N, D]`` (or their :meth:`memory`) -> ``(z [..., Dz],
        attention [..., heads, N])``."""
        return self.glimpse.attend(queries, self.memory(features) if memory is None else memory)

    def visual_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """Glimpse outputs ``[..., Dz]`` -> LM inputs ``[..., H]``, each scaled to RMS ``visual_scale`` on its own."""
        e = self.visual_proj(z)
        return e * torch.rsqrt(e.float().pow(2).mean(dim=-1, keepdim=True) + 1e-6).to(e.dtype) * self.visual_scale

    def fine_queries(self, frame_hidden: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, T, Dq]`` of a fine pass from the previous pass's frame states ``[B, T, H]``: frame ``t`` gets
        ``llm_to_query`` of frame ``t - 1``'s state, frame 1 the learned initial query."""
        q = self.llm_to_query(frame_hidden[:, :-1])
        first = self.q_init.expand(len(frame_hidden), 1, -1).to(q.dtype)
        return torch.cat([first, q], dim=1)

    def text_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _lm(self, embeds: torch.Tensor, cache=None, use_cache: bool = False):
        """The LM body on ``inputs_embeds``: ``(last hidden states [B, n, H], cache)`` (final norm applied)."""
        out = self.lm.base_model(inputs_embeds=embeds, use_cache=use_cache, **{self._cache_kw: cache})
        return out.last_hidden_state, getattr(out, self._cache_kw, None)  # transformers 5 renamed it to cache

    def caption_nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(summed CE [B], token count [B])``, the LM head applied only where ``labels [B, n]`` are not -100."""
        selected = labels != IGNORE
        rows = selected.nonzero()[:, 0]
        logits = self.lm.get_output_embeddings()(hidden[selected])
        ce = F.cross_entropy(logits.float(), labels[selected], reduction="none")
        b = len(labels)
        return ce.new_zeros(b).index_add(0, rows, ce), selected.sum(dim=1)

    def reconstruction(self, hidden: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE ``[B]`` of the next-frame latents predicted from ``hidden [B, S, H]`` (frames 2..T)."""
        state, previous, target = next_frame_pairs(hidden, latents.to(hidden.dtype))
        if target.shape[1] == 0:
            return hidden.new_zeros(len(hidden))
        pred = self.film(state.flatten(0, 1), previous.flatten(0, 1)).view_as(target)
        return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    # -- one pass, all passes -------------------------------------------------------------------------
    def run_pass(
        self,
        index: int,
        queries: torch.Tensor,
        features: torch.Tensor,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        name: str | None = None,
        memory: tuple | None = None,
    ) -> PassOutput:
        """Pass ``index`` (0: coarse mode token, else fine) with ``queries [B, T, Dq]``; the caption is scored when
        ``text_ids`` is given, the reconstruction when ``latents`` is given too (and the model has a head).
        ``memory``: :meth:`memory` of ``features`` when the caller has it already."""
        b, n_frames = features.shape[:2]
        z, attn = self.glimpses(queries, features, memory)
        mode = self.mode_tokens[min(index, 1)].expand(b, 1, -1)
        seq = [mode, self.visual_tokens(z)]
        if text_ids is not None:
            seq += [self.sep_token.expand(b, 1, -1), self.text_embeddings(text_ids[:, :-1])]
        hidden, _ = self._lm(torch.cat(seq, dim=1))
        out = PassOutput(name or pass_names(index)[-1], z, attn, hidden[:, 1 : n_frames + 1])
        if text_ids is not None:
            labels = caption_labels(text_ids, text_mask, n_frames)
            out.caption_nll, out.caption_tokens = self.caption_nll(hidden, labels)
            if latents is not None and self.film is not None:
                out.rec = self.reconstruction(hidden, latents)
        return out

    def forward(
        self,
        features: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        latents: torch.Tensor | None = None,
        *,
        fine_iterations: int | None = None,
        scored: Collection[int] | None = None,
        shuffle_queries: bool = False,
    ) -> list[PassOutput]:
        """The coarse pass and ``fine_iterations`` fine passes, in parallel over the frames. ``scored``: the passes
        whose caption (and reconstruction) are computed (None: all); the others run on the frames alone.
        ``shuffle_queries`` (a control): every fine pass takes its queries from another sample of the batch
        (rolled by one, so none keeps its own)."""
        k_max = self.settings.fine_iterations if fine_iterations is None else fine_iterations
        if shuffle_queries and len(features) < 2:
            raise ValueError("shuffle_queries needs a batch of at least 2 samples")
        scored = set(range(k_max + 1)) if scored is None else set(scored)
        b, n_frames = features.shape[:2]
        queries = self.q_static.expand(b, n_frames, -1)
        memory = self.memory(features)
        passes = []
        for k in range(k_max + 1):
            use_text = k in scored
            p = self.run_pass(
                k,
                queries,
                features,
                text_ids if use_text else None,
                text_mask if use_text else None,
                latents if use_text else None,
                memory=memory,
            )
            passes.append(p)
            if k < k_max:
                queries = self.fine_queries(p.frame_hidden)
                if shuffle_queries:
                    queries = queries.roll(1, dims=0)
        return passes

    # -- frame by frame (KV cache) --------------------------------------------------------------------
    def _stream_frames(self, features: torch.Tensor, fine_iterations: int, query_source: str):
        """Feed the frames one at a time through running passes, each with its KV cache (batched as ``[S * B]``
        rows, pass-major). ``previous_pass``: the coarse pass and ``fine_iterations`` fine passes in lockstep, fine
        pass ``k`` taking frame ``t``'s query from pass ``k - 1``'s state at frame ``t - 1``: exactly what the
        parallel passes compute. ``same_pass``: one fine pass whose frame ``t`` query comes from its own state at
        frame ``t - 1`` (the true autoregressive loop; equal to the parallel passes with ``T`` fine passes)."""
        if query_source not in QUERY_SOURCES:
            raise ValueError(f"query_source={query_source!r}: choose one of {QUERY_SOURCES}")
        b, n_frames = features.shape[:2]
        if query_source == "previous_pass":
            names, modes = pass_names(fine_iterations), [0] + [1] * fine_iterations
        else:
            names, modes = ["autoregressive"], [1]
        s = len(modes)
        mode = self.mode_tokens[modes][:, None].expand(s, b, -1).reshape(s * b, 1, -1)
        hidden, cache = self._lm(mode, use_cache=True)
        last = hidden[:, -1].view(s, b, -1)
        memory = self.memory(features)  # [B, T, N, ...] once; frame t is read by every running pass
        zs, attns = [], []
        for t in range(n_frames):
            first = self.q_init.expand(b, -1)
            if query_source == "previous_pass":
                fine = [first if t == 0 else self.llm_to_query(last[i - 1]) for i in range(1, s)]
                queries = torch.stack([self.q_static.expand(b, -1), *fine])
            else:
                queries = (first if t == 0 else self.llm_to_query(last[0]))[None]
            frame = tuple(m[None, :, t].expand(s, *m[:, t].shape) for m in memory)
            z, attn = self.glimpses(queries, memory=frame)
            hidden, cache = self._lm(self.visual_tokens(z).reshape(s * b, 1, -1), cache, use_cache=True)
            last = hidden[:, -1].view(s, b, -1)
            zs.append(z)
            attns.append(attn)
        out = StreamOutput(names, torch.stack(zs, dim=2), torch.stack(attns, dim=2))
        return out, cache, s

    @torch.no_grad()
    def stream_caption_nll(
        self,
        features: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        fine_iterations: int | None = None,
        query_source: str = "same_pass",
    ) -> StreamOutput:
        """Teacher-forced caption loss after the frame-by-frame loop, per running pass (``caption_nll [S, B]``)."""
        k_max = self.settings.fine_iterations if fine_iterations is None else fine_iterations
        out, cache, s = self._stream_frames(features, k_max, query_source)
        b = len(features)
        seq = torch.cat([self.sep_token.expand(b, 1, -1), self.text_embeddings(text_ids[:, :-1])], dim=1)
        hidden, _ = self._lm(seq.repeat(s, 1, 1), cache, use_cache=True)
        labels = torch.where(text_mask, text_ids, IGNORE).repeat(s, 1)
        nll, tokens = self.caption_nll(hidden, labels)
        out.caption_nll, out.caption_tokens = nll.view(s, b), tokens.view(s, b)
        return out

    @torch.no_grad()
    def generate(
        self,
        features: torch.Tensor,
        *,
        eos_id: int,
        max_new_tokens: int = 64,
        fine_iterations: int | None = None,
        query_source: str = "same_pass",
        allowed: torch.Tensor | None = None,
    ) -> StreamOutput:
        """Greedy captions after the frame-by-frame loop, one per running pass (``tokens [S, B, n]``, ``n <=
        max_new_tokens``, EOS included and repeated after it), with every frame's glimpse weights. ``allowed``: bool
        ``[V]``, the ids the argmax may pick (e.g. those the text tokenizer can write, and EOS; None: all)."""
        k_max = self.settings.fine_iterations if fine_iterations is None else fine_iterations
        out, cache, s = self._stream_frames(features, k_max, query_source)
        b = len(features)
        hidden, cache = self._lm(self.sep_token.expand(s * b, 1, -1), cache, use_cache=True)
        head = self.lm.get_output_embeddings()
        done = torch.zeros(s * b, dtype=torch.bool, device=features.device)
        tokens = []
        for _ in range(max_new_tokens):
            logits = head(hidden[:, -1])
            if allowed is not None:
                logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
            nxt = logits.argmax(dim=-1)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            tokens.append(nxt)
            done = done | (nxt == eos_id)
            if bool(done.all()):
                break
            hidden, cache = self._lm(self.text_embeddings(nxt[:, None]), cache, use_cache=True)
        ids = torch.stack(tokens, dim=1) if tokens else torch.zeros(s * b, 0, dtype=torch.long)
        out.tokens = ids.view(s, b, -1)
        return out


# ---------------------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------------------


def training_passes(loss: FVLMLossSettings, fine_iterations: int) -> tuple[int, set[int]]:
    """``(fine passes to run, passes to score)`` in training: the last pass, and the coarse pass when it is weighted;
    ``coarse_only`` runs and scores the coarse pass alone."""
    if loss.coarse_only:
        return 0, {0}
    return fine_iterations, ({0} if loss.lambda_coarse > 0 else set()) | {fine_iterations}


def fvlm_loss(passes: list[PassOutput], loss: FVLMLossSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``cap + lambda_recon * rec`` of the last pass (the coarse pass under ``coarse_only``) plus ``lambda_coarse``
    times the coarse pass's own; returns the total and its parts (``cap_<pass>``, ``rec_<pass>``)."""

    def term(p: PassOutput) -> torch.Tensor:
        parts[f"cap_{p.name}"] = p.cap
        total = p.cap
        if p.rec is not None and loss.lambda_recon > 0:
            parts[f"rec_{p.name}"] = p.rec.mean()
            total = total + loss.lambda_recon * parts[f"rec_{p.name}"]
        return total

    parts: dict[str, torch.Tensor] = {}
    coarse, last = passes[0], passes[-1]
    if loss.coarse_only or len(passes) == 1:
        return term(coarse), parts
    total = term(last)
    if loss.lambda_coarse > 0:
        total = total + loss.lambda_coarse * term(coarse)
    return total, parts

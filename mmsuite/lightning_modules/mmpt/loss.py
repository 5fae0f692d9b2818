"""MMPT losses: cross-entropy at target positions only, per task and in total.

The backbone's hidden states are gathered at the positions whose *next* label is a target (labels are not
pre-shifted: the state at ``i`` predicts ``labels[i + 1]``), and only those rows go through the LM head, so no
``[B, L, V]`` logits exist. The never-emitted ids (the base's padding rows, the reserved tail) are masked out of
the softmax: no sequence holds them and no decoder emits them. Losses are fp32.

Per task ``t``: ``L_t = sum CE / N_t`` over its target tokens (a token-weighted mean within the task); the total
is ``sum_t w_t L_t / sum_t w_t`` over the tasks present in the batch, so one long audio target does not outweigh
the captions (a plain token mean would be mostly audio).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmsuite.tokenizers.mmpt_decoding import TaskGrammar, illegal_mass
from mmsuite.tokenizers.mmpt_sequences import IGNORE
from mmsuite.tokenizers.mmpt_space import TASK_NAMES, MMPTLayout


def _parts(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder() if hasattr(base, "get_decoder") else base.model, base.get_output_embeddings()


class TargetLoss:
    """Target-position logits, per-task losses and per-row NLLs of a causal LM over an MMPT layout."""

    def __init__(self, layout: MMPTLayout):
        self.layout = layout
        self._never = torch.tensor(layout.never_emitted_ids(), dtype=torch.long)

    def target_logits(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits [N, V] fp32, targets [N], rows [N])`` at the labelled positions, row-major."""
        backbone, head = _parts(model)
        labels = batch["labels"]
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        nxt = labels[:, 1:] != IGNORE
        rows, cols = nxt.nonzero(as_tuple=True)
        logits = head(hidden[rows, cols]).float()
        if self._never.numel():
            never = self._never.to(logits.device)
            logits = logits.index_fill(-1, never, float("-inf"))
        return logits, labels[rows, cols + 1], rows

    def task_losses(
        self, model, batch: dict[str, torch.Tensor], weights: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``loss`` (the weighted total), ``task_loss [T]`` (0 for a task absent from the batch) and
        ``task_tokens [T]`` (target tokens per task), T = ``len(TASK_NAMES)``; no host sync."""
        logits, targets, rows = self.target_logits(model, batch)
        ce = F.cross_entropy(logits, targets, reduction="none")
        task = batch["task"].to(ce.device)[rows]
        n_tasks = len(TASK_NAMES)
        sums = torch.zeros(n_tasks, device=ce.device).index_add_(0, task, ce)
        counts = torch.zeros(n_tasks, device=ce.device).index_add_(0, task, torch.ones_like(ce))
        per_task = sums / counts.clamp(min=1)
        w = torch.ones(n_tasks, device=ce.device) if weights is None else weights.to(ce.device, torch.float32)
        w = w * (counts > 0)
        total = (w * per_task).sum() / w.sum().clamp(min=torch.finfo(torch.float32).tiny)
        return {"loss": total, "task_loss": per_task, "task_tokens": counts}

    def sequence_nll(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean target NLL per row, nats/token ``[B]`` (the prompt ablation's measure)."""
        logits, targets, rows = self.target_logits(model, batch)
        ce = F.cross_entropy(logits, targets, reduction="none")
        b = batch["labels"].shape[0]
        sums = torch.zeros(b, device=ce.device).index_add_(0, rows, ce)
        counts = torch.zeros(b, device=ce.device).index_add_(0, rows, torch.ones_like(ce))
        return sums / counts.clamp(min=1)

    def illegal_mass(self, model, batch: dict[str, torch.Tensor], grammar: TaskGrammar):
        """``(mass [N], states [N], task [N])``: teacher-forced probability outside the grammar's allowed set at
        every target position (see :func:`mmsuite.tokenizers.mmpt_decoding.illegal_mass`)."""
        logits, _, rows = self.target_logits(model, batch)
        states = grammar.target_states(batch["labels"], batch["task"]).to(logits.device)
        return illegal_mass(logits, states, grammar), states, batch["task"].to(logits.device)[rows]

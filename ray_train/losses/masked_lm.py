"""Masked-language-model loss for a ``BertForMaskedLM``, projecting masked positions only."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class MaskedLMLoss(torch.nn.Module):
    """Wrap a ``BertForMaskedLM``: ``forward(input_ids, attention_mask, labels) -> summed NLL`` over
    masked positions (labels != -100). The vocabulary projection runs on masked positions only (~15%
    of tokens) instead of every token, which BertForMaskedLM.forward would do."""

    def __init__(self, mlm: Any) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # input_ids, attention_mask, labels: (B, T)
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        selected = labels != -100  # (B, T)
        logits = self.mlm.cls(hidden[selected])  # (M, V), M = masked tokens in the batch
        return F.cross_entropy(logits.float(), labels[selected], reduction="sum")  # ()

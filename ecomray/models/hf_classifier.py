"""Fine-tune a Hugging Face pretrained encoder from a LOCAL directory (any `AutoModel`-compatible checkpoint).

Nothing is downloaded: `from_pretrained(pretrained_dir, local_files_only=True)`. For serving, the version's
`meta.json` holds the encoder's config (`hf_config`) and the fast tokenizer's JSON, so `from_config` rebuilds the
architecture and the registry's state dict fills in the fine-tuned weights: the local directory is not needed then.

Shapes (B = batch, L = tokens incl. [CLS]/[SEP], H = hidden size, C = num_classes):
    ids           (B, L) int64, 0 = padding (attention mask = ids != pad_id)
    forward(ids)  (B, C) logits: dropout + linear over the first token's last hidden state
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class HFClassifier(nn.Module):
    def __init__(self, pretrained_dir: str | None = None, num_classes: int = 2, hf_config: dict | None = None,
                 pad_id: int = 0, dropout: float = 0.1, **_: Any) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if hf_config is not None:        # serving / reload: architecture from the stored config, weights from the registry
            config = AutoConfig.for_model(**hf_config)
            self.encoder = AutoModel.from_config(config)
        else:
            if not pretrained_dir:
                raise ValueError("HFClassifier needs model.pretrained_dir (a local directory)")
            self.encoder = AutoModel.from_pretrained(pretrained_dir, local_files_only=True)
        self.pad_id = pad_id
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.encoder.config.hidden_size, num_classes))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, C)."""
        out = self.encoder(input_ids=ids, attention_mask=ids.ne(self.pad_id).long())
        return self.head(out.last_hidden_state[:, 0])                            # (B, C)

"""Sentence embeddings of the rendered attribute texts (transformers + torch, run offline on local weights).

Follows the sentence-transformers recipe stored in the model directory: mean (or CLS) pooling from
`1_Pooling/config.json`, L2 normalization when `modules.json` lists a Normalize module. For the default
all-MiniLM-L6-v2 that is mean pooling + normalization, d = 384.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np


class SentenceEmbedder:
    """Embeds texts into fixed float32 vectors with a local sentence-transformers model directory."""

    def __init__(self, path: Path, max_length: int = 256, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path)
        self.max_length, self.batch_size = max_length, batch_size
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.model = AutoModel.from_pretrained(str(self.path), dtype=torch.float32).eval()
        pooling = {}
        if (self.path / "1_Pooling" / "config.json").is_file():
            pooling = json.loads((self.path / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
        self.cls_pooling = bool(pooling.get("pooling_mode_cls_token", False))
        modules = []
        if (self.path / "modules.json").is_file():
            modules = json.loads((self.path / "modules.json").read_text(encoding="utf-8"))
        self.normalize = any(m.get("type", "").endswith("Normalize") for m in modules) or not modules
        self.dim = int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [len(texts), dim]."""
        torch = self._torch
        out = np.zeros((len(texts), self.dim), np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                chunk = list(texts[start:start + self.batch_size])
                enc = self.tokenizer(chunk, padding=True, truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                hidden = self.model(**enc).last_hidden_state
                if self.cls_pooling:
                    pooled = hidden[:, 0]
                else:
                    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                if self.normalize:
                    pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[start:start + len(chunk)] = pooled.float().numpy()
        return out

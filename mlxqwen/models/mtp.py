"""Qwen3.5's multi-token-prediction head (`mtp.*`), for drafting in speculative decoding.

From the model's hidden state at position t (after its final norm) and the embedding of token
t+1, one decoder layer (full attention, the model's own MLP or MoE kind) gives a hidden state
whose logits, through the model's head, guess token t+2. Chained, the head's own output stands
in for the model's hidden state to guess t+3 and on. Its attention keeps a K/V cache of its own:
entry t holds the pair (hidden t, token t+1)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import ModelConfig
from .model import DecoderLayer


class MTP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_fc_norm_embedding = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.fc = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        # built as the model's first full-attention layer: gated attention, its MLP or MoE
        self.layers = [DecoderLayer(cfg, cfg.layer_types.index("full_attention"))]
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def __call__(self, hidden: mx.array, embedded: mx.array, cache=None) -> mx.array:
        """hidden [B, T, H] (normed), embedded [B, T, H] (the next tokens') -> the head's normed output."""
        x = mx.concatenate([self.pre_fc_norm_embedding(embedded), self.pre_fc_norm_hidden(hidden)], axis=-1)
        return self.norm(self.layers[0](self.fc(x), cache))

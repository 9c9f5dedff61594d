"""Small heads shared by objectives and (later) downstream tasks."""
import torch.nn as nn

from models.init import init_bert_style


class ProjectionHead(nn.Sequential):
    """Linear -> LayerNorm -> GELU -> Linear, the ITC projection of SCL/METER."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, in_dim), nn.LayerNorm(in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))


class MLMHead(nn.Module):
    """BERT prediction head: dense -> GELU -> LayerNorm -> vocabulary logits (not tied to the text embeddings)."""

    def __init__(self, dim: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim, eps=eps))
        self.decoder = nn.Linear(dim, vocab_size)
        init_bert_style(self)   # as SCL's mlm_score (BERT init, N(0, 0.02))

    def forward(self, x):
        return self.decoder(self.transform(x))

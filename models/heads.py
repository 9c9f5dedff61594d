"""Small heads shared by objectives and (later) downstream tasks."""
import torch.nn as nn


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

    def forward(self, x):
        return self.decoder(self.transform(x))

"""BERT-style init N(0, 0.02) for the layers SCL initialises so: the fusion encoder, the ITM and MLM heads (the ITC
projections keep PyTorch's default init, as in the released code)."""
import torch.nn as nn


def init_bert_style(module: nn.Module, std: float = 0.02) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

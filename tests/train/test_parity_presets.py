"""The paper presets reproduce the released SCL/GLSCL run: the optimiser's groups under the released weight-decay and
LR rules (named parameters checked one by one against what the released set_schedule does to their counterparts),
and every parity option set to the released value."""
import os

import pytest

from conftest import REPO_ROOT

PRESETS = ("scl_4m", "glscl_4m", "glscl_14m", "glscl_4m_video")


def _tiny_model():
    from models.backbone import ContrastiveHeadConfig, ModelConfig
    from models.fusion import FusionConfig
    from models.objectives.glscl import MgscConfig, MltcConfig
    from models.objectives.itc import ItcConfig
    from models.objectives.itm import ItmConfig
    from models.objectives.mlm import MlmConfig
    from models.text import TextConfig, load_tokenizer
    from models.vision import VisionConfig
    from models.vlp import build_model

    tok = load_tokenizer(TextConfig(tokenizer="minilm"))
    cfg = ModelConfig(VisionConfig("vit_base_patch16_clip_quickgelu_224", img_size=32, patch_size=16, embed_dim=32,
                                   depth=2, num_heads=2),
                      TextConfig(tokenizer="minilm", hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
                      FusionConfig(hidden_size=32, num_layers=1, num_heads=2),
                      ContrastiveHeadConfig(embed_dim=16, parameterization="raw"))
    objectives = {"itc": ItcConfig(), "itm": ItmConfig(), "mlm": MlmConfig(), "mgsc": MgscConfig(),
                  "mltc": MltcConfig()}
    return build_model(cfg, objectives, tok)


def _groups(model, **train):
    from train.config import TrainConfig
    from train.optim import param_groups

    cfg = TrainConfig(lr=1.0, weight_decay=0.01, **train)
    by_param = {}
    for g in param_groups(model, cfg):
        for p in g["params"]:
            by_param[id(p)] = (g["weight_decay"] > 0, g["lr"])
    return {n: by_param[id(p)] for n, p in model.named_parameters()}


def test_official_weight_decay_and_lr_rules():
    """The released set_schedule decays a parameter unless its name contains bias / LayerNorm / norm(1|2). Our
    parameters below, with their released counterparts: CLIP's ln_* and the ITC heads' LayerNorms (vision_proj.1)
    are decayed there, as are class/position embeddings, cl_temp, token types and the MLTC mask token."""
    model = _tiny_model()
    groups = _groups(model, weight_decay_exclusions="official",
                     lr_multipliers={"fusion.": 5.0, "fusion.token_type.": 1.0, "itm_head.": 5.0,
                                     "objectives.mlm.": 5.0})
    decayed = {  # ours: released name
        "vision.norm_pre.weight": "vision_transformer.visual.ln_pre.weight",
        "vision.blocks.0.norm1.weight": "vision_transformer.visual.transformer.resblocks.0.ln_1.weight",
        "vision.norm.weight": "vision_transformer.visual.ln_post.weight",
        "vision.cls_token": "vision_transformer.visual.class_embedding",
        "vision.pos_embed": "vision_transformer.visual.positional_embedding",
        "itc.image_proj.1.weight": "vision_proj.1.weight",
        "itc.temperature": "cl_temp",
        "fusion.token_type.weight": "token_type_embeddings.weight",
        "objectives.mltc.mask_token": "vision_transformer.visual.visual_mask_token",
        "text.embeddings.word_embeddings.weight": "text_transformer.embeddings.word_embeddings.weight",
        "fusion.layers.0.text.self_attn.q.weight": "cross_modal_text_layers.0.attention.self.query.weight",
    }
    not_decayed = {
        "text.embeddings.LayerNorm.weight": "text_transformer.embeddings.LayerNorm.weight",
        "fusion.layers.0.image.self_norm.weight": "cross_modal_image_layers.0.attention.output.LayerNorm.weight",
        "objectives.mlm.head.transform.2.weight": "mlm_score.transform.LayerNorm.weight",
        "vision.blocks.0.norm1.bias": "vision_transformer.visual.transformer.resblocks.0.ln_1.bias",
        "itc.image_proj.0.bias": "vision_proj.0.bias",
    }
    no_decay_words = ("bias", "LayerNorm.bias", "LayerNorm.weight", "norm.bias", "norm.weight", "norm1.bias",
                      "norm1.weight", "norm2.bias", "norm2.weight")
    for ours, theirs in {**decayed, **not_decayed}.items():
        released_decays = not any(w in theirs for w in no_decay_words)
        assert groups[ours][0] == released_decays, (ours, theirs)
    # every bias skips decay; every other parameter outside text/fusion/MLM-head LayerNorms is decayed
    assert all(not groups[n][0] for n in groups if n.endswith("bias"))
    # LR: the cross-modal layers and the ITM/MLM heads x5, the token types, ITC heads and temperature at base
    lr = {n: g[1] for n, g in groups.items()}
    assert lr["fusion.layers.0.text.ffn.0.weight"] == lr["fusion.text_in.weight"] == lr["itm_head.weight"] == 5.0
    assert lr["objectives.mlm.head.decoder.weight"] == 5.0
    assert lr["fusion.token_type.weight"] == lr["itc.temperature"] == lr["itc.image_proj.0.weight"] == 1.0
    # ours: the same parameters' decay follows no_weight_decay (position/class embeddings, temperature, norms)
    ours = _groups(model)
    assert not ours["vision.cls_token"][0] and not ours["itc.temperature"][0] and not ours["vision.norm_pre.weight"][0]


@pytest.mark.parametrize("name", PRESETS)
def test_paper_presets_set_the_released_values(name):
    from train.config import load_config

    cfg = load_config(os.path.join(REPO_ROOT, "train", "configs", f"{name}.yaml"))
    t, o, m = cfg.train, cfg.objectives, cfg.model
    assert t.micro_batch_size == 16 and t.global_batch_size == 4096
    assert t.gathered_grad == "official" and t.weight_decay_exclusions == "official"
    assert t.lr_multipliers["fusion.token_type."] == 1.0
    assert m.itc.parameterization == "raw"
    assert (o["itm"].pairs, o["itm"].hard_negatives, o["itm"].negative_side) == ("b", False, "image")
    assert o["mlm"].masking == "official" and cfg.data.mlm_probability == o["mlm"].mask_prob
    assert o["mgsc"].text_mask_sampling == "with_replacement"
    assert o["mgsc"].text_negatives == ("global" if name == "scl_4m" else "local")
    assert ("mltc" in o) == name.startswith("glscl")
    if "mltc" in o:
        assert o["mltc"].mask_token_init == "randn"
    video = name.endswith("video")
    assert m.vision.temporal_embed_images == video and (m.vision.temporal_init_std is None) == video

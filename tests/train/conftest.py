import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = str(REPO_ROOT / "train" / "configs" / "tiny_test.yaml")


def write_ds_config(directory, stage: int, precision: str, **extra) -> str:
    cfg = {"gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, **extra}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    path = os.path.join(directory, f"ds_z{stage}_{precision}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def data_overrides(demo) -> list[str]:
    return [f'data.train=[{{shards: "{demo["paths"]["train_images"]}", modality: image}}]',
            f'data.eval=[{{shards: "{demo["paths"]["val_images"]}", modality: image}}]']


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def spawn_ranks(worker, world: int, *args) -> None:
    """worker(rank, port, *args) in `world` processes; they rendezvous on a free 127.0.0.1 port (gloo)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, *args), nprocs=world, join=True)


def tiny_model_config(width: int = 64, vision_depth: int = 2, text_layers: int = 2, fusion_layers: int = 2,
                      fusion_heads: int = 4, **itc):
    """A toy ModelConfig for tests that build a VLP model directly: 32 px images in 8 px patches, a random-init text
    tower on the MiniLM tokenizer (`tokenizer="minilm"`), `itc` = ContrastiveHeadConfig fields (embed_dim 16)."""
    from models.backbone import ContrastiveHeadConfig, ModelConfig
    from models.fusion import FusionConfig
    from models.text import TextConfig
    from models.vision import VisionConfig

    return ModelConfig(VisionConfig("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48,
                                    depth=vision_depth, num_heads=3),
                       TextConfig(tokenizer="minilm", hidden_size=width, num_layers=text_layers, num_heads=2,
                                  intermediate_size=2 * width),
                       FusionConfig(hidden_size=width, num_layers=fusion_layers, num_heads=fusion_heads),
                       ContrastiveHeadConfig(**{"embed_dim": 16, **itc}))


def write_tiny_init(path) -> str:
    """What `convert_checkpoint.py to-finetune` writes for a tiny ITC+ITM model (32 px, 8 px patches, 4 frames)."""
    import dataclasses

    import torch

    from models.objectives.itc import ItcConfig
    from models.objectives.itm import ItmConfig
    from models.text import load_tokenizer
    from models.vlp import build_model
    from models.weights import save_weights

    cfg = tiny_model_config()
    cfg.vision.max_frames = 4
    torch.manual_seed(0)
    model = build_model(cfg, {"itc": ItcConfig(), "itm": ItmConfig()}, load_tokenizer(cfg.text))
    config = {"model": dataclasses.asdict(cfg), "objectives": {"itc": {}, "itm": {}}, "data": {"num_frames": 1}}
    save_weights(model.state_dict(), str(path), {"kind": "vlp", "config": config})
    return str(path)


def run_task(entry, out, config, init, *overrides, hook=None, ds=None):
    """A fine-tuning entry (train/finetune_<task>.py module) through the real launcher in this process."""
    from train import launch

    argv = ["--deepspeed_config", ds or write_ds_config(os.path.dirname(str(out)), 0, "fp32"), "--config", config,
            "--output_dir", str(out), *(["--init", init] if init else []), *overrides]
    cfg, ds_config = launch.prepare(entry.ENTRY, argv)
    return launch.run(entry.ENTRY, cfg, ds_config, engine_hook=hook)


def stop_after(step):
    """An engine hook: stop (save, exit 75's path) after optimizer step `step`."""
    def hook(engine):
        engine.add_after_step(lambda e, applied: e.request_stop() if e.step == step else None)
    return hook


def read_eval(out) -> dict:
    with open(os.path.join(out, "eval.json")) as f:
        return json.load(f)


def full_model_state(engine) -> dict:
    """Every parameter (gathered under ZeRO-3) and buffer of the model, and the momentum shadows, on CPU."""
    import deepspeed

    module = engine.module
    named = list(module.named_parameters())
    out = {}
    with deepspeed.zero.GatheredParameters([p for _, p in named], enabled=engine.zero_stage == 3):
        for n, p in named:
            out[n] = p.detach().clone()
    for n, b in module.named_buffers():
        out[f"buffer:{n}"] = b.detach().clone()
    for i, s in enumerate(engine._parts["momentum"].state_dict()["shadows"]):
        out[f"shadow:{i}"] = s
    return out


def keep_engine(seen: dict, stop_at=None):
    """An engine hook: seen["engine"] = the engine; with stop_at, stop (save) after that optimizer step."""
    def hook(engine):
        seen["engine"] = engine
        if stop_at is not None:
            engine.add_after_step(lambda e, applied: e.request_stop() if e.step == stop_at else None)
    return hook

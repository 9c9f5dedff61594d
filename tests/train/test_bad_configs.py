"""Bad configs and command lines (issue 9): each is ONE line on stderr naming the config file and the dotted key,
exit status 2, no traceback, and it comes before the model is built.

Three layers: the real entry point in a subprocess for the cases a hostile tester found; every case (those and the
other holes) through pretrain.main() in-process with run() replaced by a failure, which proves the error comes from
prepare(), before anything heavy; and unit tests of the helpers."""
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from train.config import ALLOW_NONFINITE, ConfigError, build_dataclass, load_config

from conftest import REPO_ROOT, TINY, data_overrides

ENV = dict(DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", DS_SKIP_SHM_OP="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")
CPU_DS = "ds_configs/cpu_demo.json"


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def case_args(name: str, tmp_path, demo) -> tuple[list[str], str]:
    """-> (arguments after `--deepspeed_config cpu_demo --config TINY --output_dir <tmp>/run`, expected stderr line,
    written out in full where the message is ours; `...` marks where the rest of a longer message is not pinned)."""
    f = TINY
    missing = str(tmp_path / "nowhere" / "shard-{0..3}.tar")
    train_ok = data_overrides(demo)[0] if demo else None
    cases = {
        # a. output dir that is a regular file, or cannot be created (under a regular file)
        "output_dir_is_file": (["--output_dir", write(tmp_path / "afile", "x")],
                               f"error: {f}: train.output_dir: '{tmp_path}/afile' exists and is not a directory ..."),
        "output_dir_under_file": (["--output_dir", os.path.join(write(tmp_path / "afile2", "x"), "run")],
                                  f"error: {f}: train.output_dir: cannot create '{tmp_path}/afile2/run': "
                                  f"'{tmp_path}/afile2' is not a directory"),
        # b. fp16 where the accelerator has none
        "fp16_on_cpu": (["--deepspeed_config", str(tmp_path / "fp16.json")],
                        f"error: {tmp_path}/fp16.json: fp16.enabled: fp16 is not supported by this machine's "
                        "accelerator (cpu); use a bf16 or fp32 ds_config (e.g. ds_configs/cpu_demo.json on CPU)"),
        # c. nothing to train on
        "train_empty": (["data.train=[]"], f"error: {f}: data.train: is empty; a run needs at least one train source "
                        "({shards: <pattern>, modality: image|video})"),
        # d. unknown timm model, with close names
        "timm_name": (["model.vision.timm_name=vit_tiny_patch16_22"],
                      f"error: {f}: model.vision.timm_name: unknown timm model 'vit_tiny_patch16_22'; did you mean "
                      "'vit_tiny_patch16_224', ..."),
        # e. data and vision tower disagree on the image size
        "image_size": (["data.image_size=32"],
                       f"error: {f}: data.image_size: 32 differs from model.vision.img_size=64; ..."),
        # f. non-finite floats
        "lr_inf": (["train.lr=.inf"], f"error: {f}: train.lr: must be a finite number, got inf"),
        "lr_nan": (["train.lr=.nan"], f"error: {f}: train.lr: must be a finite number, got nan"),
        # g. negative objective weight
        "itc_weight": (["objectives.itc.weight=-1"],
                       f"error: {f}: objectives.itc.weight must be a finite number >= 0, got -1.0"),
        # h. image size not a multiple of the patch size
        "img_size_patch": (["model.vision.img_size=70", "data.image_size=70"],
                           f"error: {f}: model.vision.img_size=70 is not a multiple of model.vision.patch_size "
                           "(16x16); the border pixels would be cut off"),
        # i. overrides and options intermixed: an unknown option or a bad override is still one line
        "intermixed_unknown_option": (["train.lr=0.5", "--bogus", "3", "train.seed=1"],
                                      "error: train/pretrain.py: unrecognized option --bogus (options: ..."),
        "intermixed_bad_override": (["train.lr=0.5", "--max_steps", "3", "zz.y=2"],
                                    f"error: {f}: zz: unknown top-level key (allowed: model, objectives, data, "
                                    "train)"),
        # j. shards (datasets.loader.check_sources)
        "train_shards_missing": ([f'data.train=[{{shards: "{missing}"}}]'],
                                 f"error: {f}: data.train[0].shards: ..."),
        "eval_shards_missing": ([train_ok, f'data.eval=[{{shards: "{missing}"}}]'] if demo else [],
                                f"error: {f}: data.eval[0].shards: ..."),
        "workers_exceed_shards": ([train_ok, "data.num_workers=5"] if demo else [],
                                  f"error: {f}: data.train[0].shards: ... data.num_workers ..."),
    }
    if name == "fp16_on_cpu":
        write(tmp_path / "fp16.json", json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    return cases[name]


CLI_CASES = ["output_dir_is_file", "output_dir_under_file", "fp16_on_cpu", "train_empty", "timm_name", "image_size",
             "lr_inf", "lr_nan", "itc_weight", "img_size_patch", "intermixed_unknown_option",
             "intermixed_bad_override", "train_shards_missing", "eval_shards_missing", "workers_exceed_shards"]
NEEDS_DEMO = {"eval_shards_missing", "workers_exceed_shards"}
NEEDS_CHECK_SOURCES = {"train_shards_missing", "eval_shards_missing", "workers_exceed_shards"}


def has_check_sources() -> bool:
    import datasets.loader
    return hasattr(datasets.loader, "check_sources")


def skip_if_unsupported(name: str) -> None:
    if name in NEEDS_CHECK_SOURCES and not has_check_sources():
        pytest.skip("needs datasets.loader.check_sources")
    if name == "fp16_on_cpu" and fp16_supported():
        pytest.skip("this machine's accelerator supports fp16 (the in-process test forces 'unsupported')")


def matches(line: str, expected: str) -> bool:
    """`expected` with ` ...`/`...` as wildcards for the parts of a message not pinned down here."""
    parts = [p.strip() for p in expected.split("...")]
    pos = 0
    for i, part in enumerate(parts):
        if not part:
            continue
        at = line.find(part, pos)
        if at < 0 or (i == 0 and at != 0):
            return False
        pos = at + len(part)
    return expected.endswith("...") or line.endswith(parts[-1])


def assert_one_error_line(rc: int, stderr: str, expected: str) -> None:
    assert rc == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), stderr
    assert matches(lines[0], expected), f"\n got: {lines[0]}\nwant: {expected}"


@pytest.fixture
def demo_or_none(request):
    """The session's demo shards, only for the cases that need real train shards (saves ~2 s for the others)."""
    return request.getfixturevalue("demo_shards") if request.node.callspec.params["name"] in NEEDS_DEMO else None


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_bad_config_is_one_line_exit_2(name, tmp_path, demo_or_none):
    skip_if_unsupported(name)
    args, expected = case_args(name, tmp_path, demo_or_none)
    out = tmp_path / "run"
    cmd = [sys.executable, "train/pretrain.py", "--deepspeed_config", CPU_DS, "--config", TINY,
           "--output_dir", str(out), *args]
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    assert_one_error_line(r.returncode, r.stderr, expected)
    assert not out.exists()


# Holes of the same kind beyond the tester's list: (overrides, expected line after "error: <file>: ").
MORE_CASES = {
    "fusion_heads_zero": (["model.fusion.num_heads=0"], "model.fusion.num_heads must be >= 1, got 0"),
    "fusion_heads_divide": (["model.fusion.num_heads=3"],
                            "model.fusion.hidden_size=64 is not divisible by num_heads=3"),
    "fusion_dropout": (["model.fusion.dropout=1.5"], "model.fusion.dropout must be in [0, 1), got 1.5"),
    "fusion_mlp_ratio": (["model.fusion.mlp_ratio=0"], "model.fusion.mlp_ratio must be > 0 ..."),
    "text_heads_divide": (["model.text.num_heads=3"], "model.text.hidden_size=64 is not divisible by num_heads=3"),
    "text_layers_zero": (["model.text.num_layers=0"], "model.text.num_layers must be >= 1, got 0"),
    "text_dropout": (["model.text.dropout=-0.1"], "model.text.dropout must be in [0, 1), got -0.1"),
    "text_vocab_small": (["model.text.vocab_size=1000"],
                         "model.text.vocab_size: the tokenizer has 30522 tokens but model.text.vocab_size is 1000"),
    "text_len_positions": (["data.max_text_len=100"],
                           "data.max_text_len: 100 is longer than model.text.max_position_embeddings (64)"),
    "tokenizer_missing": (["model.text.tokenizer=nowhere/tok"],
                          "model.text.tokenizer: no such directory 'nowhere/tok' ..."),
    "vision_heads_divide": (["model.vision.num_heads=3"],
                            "model.vision.embed_dim=64 is not divisible by model.vision.num_heads=3"),
    "vision_heads_default": (["model.vision={timm_name: vit_tiny_patch16_224, img_size: 64, num_heads: 5}"],
                             "model.vision.embed_dim=192 (the default of vit_tiny_patch16_224) is not divisible by "
                             "model.vision.num_heads=5"),
    "vision_not_vit": (["model.vision.timm_name=resnet18"], "model.vision.timm_name: 'resnet18' is not a timm ..."),
    "vision_drop_all_blocks": (["model.vision.drop_last_blocks=2"],
                               "model.vision.drop_last_blocks=2 leaves no block (2 in vit_tiny_patch16_224)"),
    "vision_drop_path": (["model.vision.drop_path_rate=1.0"], "model.vision.drop_path_rate must be in [0, 1), got 1.0"),
    "vision_patch_zero": (["model.vision.patch_size=0"], "model.vision.patch_size must be null ... >= 1, got 0"),
    "frames_exceed_table": (['data.train=[{shards: "x-{0..3}.tar", modality: video}]', "data.num_frames=16",
                             "model.vision.max_frames=8"],
                            "data.num_frames: 16 is more than model.vision.max_frames=8 ..."),
    "itm_micro_batch_1": (["train.micro_batch_size=1", "train.global_batch_size=1"],
                          "train.micro_batch_size: objectives.itm draws its negatives within a micro batch, so it "
                          "needs at least 2 samples, got 1"),
    "mgsc_ratio_negative": (["objectives.mgsc={image_mask_ratio: -0.1}"],
                            "objectives.mgsc.image_mask_ratio must be in (0, 1), got -0.1"),
    "mlm_weight_negative": (["objectives.mlm.weight=-0.5"],
                            "objectives.mlm.weight must be a finite number >= 0, got -0.5"),
    "itm_weight_negative": (["objectives.itm.weight=-1"],
                            "objectives.itm.weight must be a finite number >= 0, got -1.0"),
    "mgsc_weight_negative": (["objectives.mgsc={weight: -1}"],
                             "objectives.mgsc.weight must be a finite number >= 0, got -1.0"),
    "mltc_weight_negative": (["objectives.mltc={weight: -1}"],
                             "objectives.mltc.weight must be a finite number >= 0, got -1.0"),
    "mltc_text_weight": (["objectives.mltc={text_weight: -1}"], "objectives.mltc.text_weight must be a finite ..."),
    "itc_embed_dim": (["model.itc.embed_dim=0"], "model.itc.embed_dim must be >= 1, got 0"),
    "itc_temperature_inf": (["model.itc.max_temperature=.inf"],
                            "model.itc.max_temperature: must be a finite number, got inf"),
    "itc_old_place": (["objectives.itc.embed_dim=32"], "objectives.itc.embed_dim: unknown key (allowed: weight)"),
    "heads_missing": (["model.heads=[itc]"], "model.heads: the enabled objectives need ['itm'] too"),
    "momentum_disagree": (["objectives.mgsc={image_masking: text_guided}",
                           "objectives.mltc={image_masking: text_guided, momentum: 0.9}"],
                          "objectives.mltc.momentum: 0.9 differs from objectives.mgsc.momentum=0.995; the objectives "
                          "share one set of momentum encoders, so they must use one EMA coefficient"),
    "ita_queue": (["objectives={ita: {queue_size: 12}}"],
                  "objectives.ita.queue_size: 12 is not a multiple of train.global_batch_size 8 ..."),
    "lr_overflow": (["train.lr=1e999"], "train.lr: must be a finite number, got inf"),
    "lr_multiplier_inf": (["train.lr_multipliers={text.: .inf}"], "train.lr_multipliers.text.: must be a finite ..."),
    "lr_multiplier_negative": (["train.lr_multipliers={text.: -1}"], "train.lr_multipliers.text.: must be >= 0, ..."),
    "betas": (["train.betas=[0.9, 1.5]"], "train.betas: each must be in [0, 1), got [0.9, 1.5]"),
    "betas_nan": (["train.betas=[.nan, 0.9]"], "train.betas[0]: must be a finite number, got nan"),
    "eps_zero": (["train.eps=0"], "train.eps: must be > 0, got 0.0"),
    "weight_decay": (["train.weight_decay=-1"], "train.weight_decay: must be >= 0, got -1.0"),
    "seed": (["train.seed=-1"], "train.seed: must be in [0, 2**32), got -1"),
    "warmup_nan": (["train.warmup_ratio=.nan"], "train.warmup_ratio: must be a finite number, got nan"),
    "output_dir_empty": (["--output_dir", ""], "train.output_dir: must be a non-empty path"),
    "data_weight_inf": (['data.train=[{shards: "x-{0..3}.tar", weight: .inf}]'],
                        "data.train[0].weight: must be a finite number, got inf"),
    "crop_scale_nan": (["data.crop_scale=[.nan, 1.0]"], "data.crop_scale[0]: must be a finite number, got nan"),
}


@pytest.mark.parametrize("name", sorted(MORE_CASES))
def test_more_bad_configs_fail_in_prepare(name, tmp_path, monkeypatch, capsys):
    overrides, expected = MORE_CASES[name]
    assert_main_fails_before_run(["--output_dir", str(tmp_path / "run"), *overrides], f"error: {TINY}: {expected}",
                                 monkeypatch, capsys)
    assert not (tmp_path / "run").exists()


def assert_main_fails_before_run(args, expected, monkeypatch, capsys, ds_config=CPU_DS):
    from train import pretrain

    def no_run(*a, **k):
        raise AssertionError("run() was reached: the error must come before the model is built")
    monkeypatch.setattr(pretrain, "run", no_run)
    capsys.readouterr()
    rc = pretrain.main(["--deepspeed_config", ds_config, "--config", TINY, *args])
    assert_one_error_line(rc, capsys.readouterr().err, expected)


@pytest.mark.parametrize("name", CLI_CASES)
def test_cli_cases_fail_in_prepare(name, tmp_path, demo_or_none, monkeypatch, capsys):
    """The subprocess cases again, in-process: the error comes from prepare(), never from run()."""
    if name in NEEDS_CHECK_SOURCES and not has_check_sources():
        pytest.skip("needs datasets.loader.check_sources")
    if name == "fp16_on_cpu":   # force "unsupported" so the check is exercised on any machine
        import deepspeed.accelerator
        accel = deepspeed.accelerator.get_accelerator()
        monkeypatch.setattr(type(accel), "is_fp16_supported", lambda self: False)
        monkeypatch.setattr(type(accel), "device_name", lambda self, *a: "cpu")
    args, expected = case_args(name, tmp_path, demo_or_none)
    assert_main_fails_before_run(["--output_dir", str(tmp_path / "run"), *args], expected, monkeypatch, capsys)


def test_overrides_and_options_intermix(demo_shards, tmp_path):
    """i. `a.b=1 --max_steps 3 c.d=2`: overrides on both sides of an option all take effect."""
    from train.pretrain import prepare
    cfg, ds = prepare(["--deepspeed_config", CPU_DS, *data_overrides(demo_shards), "train.lr=0.5",
                       "--max_steps", "3", "train.seed=7", "--config", TINY, "objectives.itc.weight=2",
                       "--output_dir", str(tmp_path / "run"), "model.fusion.dropout=0.0"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.seed) == (0.5, 3, 7)
    assert cfg.objectives["itc"].weight == 2.0 and cfg.model.fusion.dropout == 0.0
    assert cfg.train.output_dir == str(tmp_path / "run") and ds["train_batch_size"] == 8
    assert not (tmp_path / "run").exists()   # checking creates nothing


# ------------------------------------------------------------------------------------------------ unit tests
@dataclass
class _Floats:
    x: float = 1.0
    xs: list[float] = field(default_factory=list)
    bound: float = field(default=math.inf, metadata={ALLOW_NONFINITE: True})


@pytest.mark.parametrize("raw, message", [
    ({"x": math.inf}, "x: must be a finite number, got inf"),
    ({"x": -math.inf}, "x: must be a finite number, got -inf"),
    ({"x": math.nan}, "x: must be a finite number, got nan"),
    ({"x": "1e999"}, "x: must be a finite number, got inf"),
    ({"x": 10 ** 400}, "x: 1" + "0" * 400 + " is too large for a float"),
    ({"xs": [1.0, math.nan]}, "xs[1]: must be a finite number, got nan"),
])
def test_floats_must_be_finite(raw, message):
    with pytest.raises(ConfigError) as e:
        build_dataclass(_Floats, raw)
    assert str(e.value) == message


def test_a_field_may_allow_non_finite():
    assert build_dataclass(_Floats, {"bound": math.inf}).bound == math.inf
    assert math.isnan(build_dataclass(_Floats, {"bound": math.nan}).bound)


def test_config_error_is_one_line():
    assert str(ConfigError("a\nb\n")) == "a b"


@pytest.mark.parametrize("ds, message", [
    ({"fp16": True}, 'ds.json: fp16: expected an object such as {"enabled": true}, got True'),
    ({"zero_optimization": {"stage": 4}}, "ds.json: zero_optimization.stage: expected 0, 1, 2 or 3, got 4"),
    ({"zero_optimization": {"stage": True}}, "ds.json: zero_optimization.stage: expected 0, 1, 2 or 3, got True"),
    ({"zero_optimization": "all"}, 'ds.json: zero_optimization: expected an object such as {"stage": 1}, got \'all\''),
])
def test_ds_config_shape(ds, message):
    from train.checks import check_ds_config
    with pytest.raises(ConfigError) as e:
        check_ds_config(ds, "ds.json")
    assert str(e.value) == message


def test_ds_precision_follows_the_accelerator(monkeypatch):
    import deepspeed.accelerator
    from train.checks import check_ds_config
    cls = type(deepspeed.accelerator.get_accelerator())
    monkeypatch.setattr(cls, "is_fp16_supported", lambda self: True)
    monkeypatch.setattr(cls, "is_bf16_supported", lambda self: False)
    check_ds_config({"fp16": {"enabled": True}}, "ds.json")           # supported: accepted
    check_ds_config({"bf16": {"enabled": False}}, "ds.json")          # disabled: never asked
    with pytest.raises(ConfigError, match=r"^ds\.json: bf16\.enabled: bf16 is not supported by this machine's"):
        check_ds_config({"bf16": {"enabled": True}}, "ds.json")


def test_every_objective_config_rejects_a_negative_weight():
    from models.objectives import OBJECTIVES
    for name in OBJECTIVES:
        with pytest.raises(ConfigError, match=rf"objectives\.{name}\.weight"):
            load_config(TINY, [f"objectives.{name}={{weight: -1}}"])


def test_shipped_presets_pass_the_cross_section_checks():
    from train.checks import check_config
    for name in sorted(n for n in os.listdir(REPO_ROOT / "train" / "configs") if n.endswith(".yaml")):
        path = str(REPO_ROOT / "train" / "configs" / name)
        check_config(load_config(path), path)


def test_shipped_finetune_configs_pass_the_checks_on_top_of_their_pretraining_model():
    """Each fine-tune config merged over the model it is meant for (--init's): the demo ones over demo.yaml's, the
    official recipes over glscl_4m's (msrvtt / lsmdc over the video preset's)."""
    import yaml

    from train.checks import check_config
    from train.config import load_tree, merge_tree
    from train.finetune_grounding import GroundingTask
    from train.finetune_nlvr2 import Nlvr2Task
    from train.finetune_retrieval import RetrievalTask
    from train.finetune_snli_ve import SnliVeTask
    from train.finetune_video_retrieval import VideoRetrievalTask
    from train.finetune_vqa import VqaTask

    folder = REPO_ROOT / "train" / "configs" / "finetune"
    names = sorted(os.listdir(folder))
    assert {"coco_retrieval.yaml", "flickr_retrieval.yaml", "msrvtt_retrieval.yaml", "vqav2.yaml", "nlvr2.yaml",
            "snli_ve.yaml", "refcoco_grounding.yaml"} <= set(names)
    for name in names:
        video = "msrvtt" in name or "lsmdc" in name
        base = "demo" if name.startswith("demo_") else "glscl_4m_video" if video else "glscl_4m"
        with open(REPO_ROOT / "train" / "configs" / f"{base}.yaml") as f:
            model = yaml.safe_load(f)["model"]
        path = str(folder / name)
        tree = load_tree(path)
        tree["model"] = merge_tree(model, tree.get("model") or {})
        task = next((cls for key, cls in (("vqa", VqaTask), ("nlvr2", Nlvr2Task), ("snli_ve", SnliVeTask),
                                           ("grounding", GroundingTask)) if key in name),
                    VideoRetrievalTask if video else RetrievalTask)
        check_config(load_config(path, task_cls=task, tree=tree), path)


def test_text_model_sizes_of_a_pretrained_directory(tmp_path):
    """data.max_text_len is checked against what a pretrained text model can take: RoBERTa loses 2 position rows."""
    from models.text import TextConfig, model_sizes
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta", "vocab_size": 50265,
                                                      "max_position_embeddings": 514, "pad_token_id": 1}))
    assert model_sizes(TextConfig(pretrained=str(tmp_path))) == {"vocab_size": 50265, "max_text_len": 512}
    assert model_sizes(TextConfig(tokenizer="minilm", max_position_embeddings=64)) == {"vocab_size": 30522,
                                                                                      "max_text_len": 64}


def test_momentum_agreement_counts_only_objectives_that_use_momentum():
    """MLTC masking at random has no momentum encoders, so its `momentum` key does not have to match MGSC's."""
    from train.checks import check_config

    ok = ["objectives.mgsc={image_masking: text_guided}", "objectives.mltc={momentum: 0.9}"]
    check_config(load_config(TINY, ok), TINY)
    with pytest.raises(ConfigError, match=r"objectives\.mltc\.momentum: 0\.9 differs"):
        check_config(load_config(TINY, ok[:1] + ["objectives.mltc={momentum: 0.9, image_masking: text_guided}"]),
                     TINY)

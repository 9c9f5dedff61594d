"""NLVR2 and SNLI-VE fine-tuning end to end on the demo sets in their real layouts (datasets/demo_pairs.py), from a
tiny pretrained-model file through the real launcher, engine and DeepSpeed: the token table grown for NLVR2's second
image, dev and test accuracy, a stop after step 2 (mid-epoch) resumed to the uninterrupted run's steps 3-4 bit for
bit, --eval_only on the fine-tuned run, and bad input as one line with exit 2."""
import argparse
import json

import pytest
import yaml

from conftest import read_eval, read_metrics, stop_after, write_ds_config, write_tiny_init
from conftest import run_task as run

pytestmark = pytest.mark.filterwarnings("ignore")
COUNTS = dict(nlvr2_train=12, nlvr2_dev=4, nlvr2_test=4, snli_ve_train=8, snli_ve_dev=4, snli_ve_test=4)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from datasets.demo_pairs import write_pairs

    root = tmp_path_factory.mktemp("demo_pairs")
    man = write_pairs(root, argparse.Namespace(image_size=32, jpeg_quality=90), 0, **COUNTS)
    return root, man


@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    return write_tiny_init(tmp_path_factory.mktemp("init") / "init.safetensors")


def overrides(demo, task):
    root, man = demo
    exp = man[task]["expected"]
    src = lambda s: f"{{annotations: {root / exp[s]['annotations']}, image_root: {root / exp[s]['image_root']}}}"  # noqa: E731
    test = "test1" if task == "nlvr2" else "test"
    return [f"task.train=[{src('train')}]", f"task.eval={src('dev')}", f"task.test={src(test)}",
            "data.image_size=32", "model.vision.img_size=32", "data.num_workers=0", "train.micro_batch_size=8",
            "train.global_batch_size=8", "train.epochs=null", "train.log_every=1", "train.eval_every=0",
            "train.lr=1e-3", "train.eval_batch_size=3"]








@pytest.mark.parametrize("task", ["nlvr2", "snli_ve"])
def test_trains_evaluates_dev_and_test_and_resumes_exactly(demo, init_file, tmp_path, capsys, task):
    from train import finetune_nlvr2, finetune_snli_ve

    entry = {"nlvr2": finetune_nlvr2, "snli_ve": finetune_snli_ve}[task]
    cfg = f"train/configs/finetune/demo_{task}.yaml"
    ov = overrides(demo, task)
    per = 2 if task == "nlvr2" else 3   # examples per pair / per image
    run(entry, tmp_path / "a", cfg, init_file, *ov, "--max_steps", "4")
    out = capsys.readouterr().out
    ev = read_eval(tmp_path / "a")
    assert ev["step"] == 4 and ev["num"] == ev["test_num"] == per * 4 and ev["missing"] == ev["test_missing"] == 0
    assert 0 <= ev["acc"] <= 1 and 0 <= ev["test_acc"] <= 1 and ev["eval_skipped"] == ev["test_skipped"] == 0
    assert json.loads((tmp_path / "a" / "checkpoints" / "best").read_text())["metric"] == "acc"
    records = read_metrics(tmp_path / "a")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and f"{task}_acc" in str(records[0])
    if task == "nlvr2":   # the third modality type: grown from the image row at load, kept in the run config
        assert "fusion.token_type 2 -> 3 rows (new rows from the image row)" in out
        saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
        assert saved["model"]["fusion"]["num_token_types"] == 3
    # the reader's junk counted: 12 / 8 train sets hold two bad lines each
    assert "task.train[0]: " in out and "skipped {" in out
    # stopped after step 2 (mid-epoch: 3 micro batches of 8 per epoch) and resumed: steps 3 and 4 bit for bit
    assert run(entry, tmp_path / "b", cfg, init_file, *ov, "--max_steps", "4", hook=stop_after(2))["stopped"]
    run(entry, tmp_path / "b", cfg, init_file, *ov, "--max_steps", "4")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert read_eval(tmp_path / "b")["acc"] == ev["acc"]
    if task == "nlvr2":   # --eval_only on the fine-tuned run (3 token rows in file and model) reproduces it
        run(entry, tmp_path / "c", cfg, str(tmp_path / "a"), *ov, "--eval_only")
        again = read_eval(tmp_path / "c")
        assert again["step"] == 0 and (again["acc"], again["test_acc"]) == (ev["acc"], ev["test_acc"])


@pytest.mark.parametrize("task, extra, message", [
    ("nlvr2", "task.eval={annotations: SNLI_DEV, image_root: NLVR2_DEV}",
     "task.eval: SNLI_DEV: not the NLVR2 (lil-lab/nlvr nlvr2/data/*.json) layout (no line has identifier, "
     "sentence, label; got keys ['Flickr30K_ID'"),
    ("snli_ve", "task.test.image_root=/nonexistent/flickr30k-images",
     "task.test.image_root: no such directory '/nonexistent/flickr30k-images'"),
])
def test_bad_input_is_one_line_and_exit_2(demo, init_file, tmp_path, capsys, task, extra, message):
    from train import finetune_nlvr2, finetune_snli_ve

    root, man = demo
    paths = {"SNLI_DEV": str(root / man["snli_ve"]["expected"]["dev"]["annotations"]),
             "NLVR2_DEV": str(root / man["nlvr2"]["expected"]["dev"]["image_root"])}
    for k, v in paths.items():
        extra, message = extra.replace(k, v), message.replace(k, v)
    entry = {"nlvr2": finetune_nlvr2, "snli_ve": finetune_snli_ve}[task]
    argv = ["--deepspeed_config", write_ds_config(str(tmp_path), 0, "fp32"), "--config",
            f"train/configs/finetune/demo_{task}.yaml", "--output_dir", str(tmp_path / "x"), "--init", init_file,
            *overrides(demo, task), extra]
    assert entry.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err

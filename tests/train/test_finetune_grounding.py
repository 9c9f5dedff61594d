"""train/finetune_grounding.py end to end on the demo grounding set (datasets/demo_grounding.py, ALBEF's RefCOCO+
layout) from a tiny pretrained-model file through the real launcher, engine and DeepSpeed: training, per-split
accuracy, exact mid-epoch resume, task.visualize PNGs, bad input as one line."""
import json
import os

import pytest

from conftest import read_eval, read_metrics, run_task, stop_after, write_ds_config, write_tiny_init

pytestmark = pytest.mark.filterwarnings("ignore")
CONFIG = "train/configs/finetune/demo_grounding.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from datasets.demo_grounding import write_grounding

    root = tmp_path_factory.mktemp("demo_tasks")
    return root, write_grounding(root, seed=0, image_size=32)


@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    return write_tiny_init(tmp_path_factory.mktemp("init") / "init.safetensors")


def overrides(demo):
    root, man = demo
    a = {k: f"{root}/{v}" for k, v in man["annotations"].items()}
    images = f"{root}/{man['image_root']}"
    return [f"task.train={{annotations: [{a['train']}], image_root: {images}}}",
            f"task.eval={{annotations: [{a['val']}, {a['test']}], image_root: {images}}}",
            f"task.refs={a['refs']}", f"task.dets={a['dets']}", "task.visualize=0",
            "data.image_size=32", "model.vision.img_size=32", "data.num_workers=0", "train.micro_batch_size=8",
            "train.global_batch_size=8", "train.epochs=null", "train.log_every=1", "train.eval_every=0",
            "train.lr=1e-3", "train.eval_batch_size=48"]


def run(out, init, *extra, hook=None):
    from train import finetune_grounding as entry

    return run_task(entry, out, CONFIG, init, *extra, hook=hook)






def test_trains_evaluates_per_split_visualizes_and_resumes_exactly(demo, init_file, tmp_path):
    ov = overrides(demo)
    # 300 expressions / 8 = 37 batches an epoch: step 3 is mid-epoch
    run(tmp_path / "a", init_file, *ov, "--max_steps", "5", "--visualize", "2")   # = task.visualize=2
    ev = read_eval(tmp_path / "a")
    assert ev["step"] == 5
    assert {k: ev[k] for k in ("val_items", "testA_items", "testB_items", "grounding_items", "grounding_missing",
                               "eval_skipped")} == {"val_items": 48, "testA_items": 48, "testB_items": 48,
                                                    "grounding_items": 144, "grounding_missing": 0, "eval_skipped": 2}
    accs = [ev["val_acc"], ev["testA_acc"], ev["testB_acc"]]
    assert all(0 <= a <= 1 for a in accs) and ev["grounding_acc"] == pytest.approx(sum(accs) / 3)
    pngs = sorted(os.listdir(tmp_path / "a" / "grounding_vis"))
    assert len(pngs) == 2 and all(p.endswith(".png") and "_val_" in p for p in pngs)
    best = json.loads((tmp_path / "a" / "checkpoints" / "best").read_text())
    assert best["metric"] == "val_acc" and best["value"] == ev["val_acc"]
    # stopped after step 3 (mid-epoch) and resumed: steps 4 and 5 are the uninterrupted run's, bit for bit
    assert run(tmp_path / "b", init_file, *ov, "--max_steps", "5", "task.visualize=2", hook=stop_after(3))["stopped"]
    run(tmp_path / "b", init_file, *ov, "--max_steps", "5", "task.visualize=2")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert {k: v for k, v in read_eval(tmp_path / "b").items()} == ev


@pytest.mark.parametrize("extra, message", [
    (["task.gradcam_layer=2"], "task.gradcam_layer: Grad-CAM layer 2 is not a fusion layer (the fusion has 2"),
    (["task.best_metric=testC_acc"], "task.best_metric 'testC_acc' is not an output of these splits"),
    ("dets_list", "task.dets: {path}: not a detections file (expected a JSON object"),
])
def test_bad_input_is_one_line_and_exit_2(demo, init_file, tmp_path, capsys, extra, message):
    from train import finetune_grounding as entry

    if extra == "dets_list":
        path = tmp_path / "dets.json"
        path.write_text("[[1, 2, 3, 4]]")
        extra, message = [f"task.dets={path}"], message.format(path=path)
    argv = ["--deepspeed_config", write_ds_config(str(tmp_path), 0, "fp32"), "--config", CONFIG,
            "--output_dir", str(tmp_path / "x"), "--init", init_file, *overrides(demo), *extra]
    assert entry.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err

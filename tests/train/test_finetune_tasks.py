"""The fine-tuning entry points end to end on the demo task sets (datasets/task_demo.py, real annotation layouts),
from a tiny pretrained-model file through the real launcher, engine and DeepSpeed: training, the best checkpoint,
exact resume, --eval_only, and bad input as one line."""
import json
import os

import pytest

from conftest import read_eval, read_metrics, stop_after, write_ds_config, write_tiny_init
from conftest import run_task as run

pytestmark = pytest.mark.filterwarnings("ignore")
# a smaller demo than `make finetune-demo`'s, for speed
SMALL = dict(coco_train=24, coco_restval=8, coco_val=4, coco_test=12, msrvtt_train=16, msrvtt_test=8, vqa_train=48,
             vqa_val=23, vqa_testdev=8, testdev_images=4)


@pytest.fixture(scope="module")
def demo_tasks(tmp_path_factory):
    from datasets.task_demo import generate

    root = tmp_path_factory.mktemp("demo_tasks")
    generate(str(root), **SMALL)
    return root


@pytest.fixture(scope="module")
def init_file(tmp_path_factory):
    return write_tiny_init(tmp_path_factory.mktemp("init") / "init.safetensors")


def vqa_overrides(root):
    v, img = f"{root}/vqa", f"{root}/coco/images"
    return [f"task.train=[{{questions: {v}/v2_OpenEnded_mscoco_train2014_questions.json, annotations: "
            f"{v}/v2_mscoco_train2014_annotations.json, image_root: {img}/train2014}}]",
            f"task.eval={{questions: {v}/v2_OpenEnded_mscoco_val2014_questions.json, annotations: "
            f"{v}/v2_mscoco_val2014_annotations.json, image_root: {img}/val2014}}",
            f"task.test={{questions: {v}/v2_OpenEnded_mscoco_test-dev2015_questions.json, image_root: {img}/test2015, "
            "image_pattern: 'COCO_test2015_{image_id:012d}.jpg'}",
            "task.vocab_min_count=1", "data.image_size=48", "model.vision.img_size=48", "data.num_workers=0",
            "train.micro_batch_size=8", "train.global_batch_size=8", "train.epochs=null", "train.log_every=1",
            "train.eval_every=0", "train.lr=1e-3"]


def coco_overrides(root, video=False):
    if video:
        m = f"{root}/msrvtt"
        return [f"task.train={{format: msrvtt, annotations: [{m}/MSRVTT_data.json, {m}/MSRVTT_train.9k.csv], "
                f"media_root: {m}/videos}}",
                f"task.eval={{format: msrvtt, annotations: [{m}/MSRVTT_JSFUSION_test.csv], media_root: {m}/videos}}",
                "data.image_size=32", "model.vision.img_size=32", "data.num_frames=2", "data.num_workers=0",
                "train.micro_batch_size=4", "train.global_batch_size=4", "train.epochs=null", "train.log_every=1"]
    c = f"{root}/coco"
    src = f"format: karpathy, annotations: [{c}/dataset_coco.json], media_root: {c}/images"
    return [f"task.train={{{src}, split: [train, restval]}}", f"task.eval={{{src}, split: [test]}}",
            "data.image_size=48", "model.vision.img_size=48", "data.num_workers=0", "train.micro_batch_size=8",
            "train.global_batch_size=8", "train.epochs=null", "train.log_every=1", "train.lr=1e-3"]








def test_vqa_trains_evaluates_writes_evalai_and_resumes_exactly(demo_tasks, init_file, tmp_path):
    from train import finetune_vqa as entry

    cfg = "train/configs/finetune/demo_vqa.yaml"
    ov = vqa_overrides(demo_tasks)
    run(entry, tmp_path / "a", cfg, init_file, *ov, "--max_steps", "4")
    ev = read_eval(tmp_path / "a")
    assert ev["step"] == 4 and ev["vqa_num_scored"] == SMALL["vqa_val"] and 0 <= ev["vqa_acc"] <= 1 and ev["test_questions"] == SMALL["vqa_testdev"]
    vocab = json.loads((tmp_path / "a" / "answer_vocab.json").read_text())
    sub = json.loads((tmp_path / "a" / "vqa_test_predictions.json").read_text())
    questions = json.loads((demo_tasks / "vqa" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())
    assert sorted(p["question_id"] for p in sub) == sorted(q["question_id"] for q in questions["questions"])
    assert all(p["answer"] in vocab for p in sub)
    # stopped after step 2 and resumed: steps 3 and 4 are the uninterrupted run's, bit for bit
    assert run(entry, tmp_path / "b", cfg, init_file, *ov, "--max_steps", "4", hook=stop_after(2))["stopped"]
    run(entry, tmp_path / "b", cfg, init_file, *ov, "--max_steps", "4")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert read_eval(tmp_path / "b")["vqa_acc"] == ev["vqa_acc"]
    # --eval_only on the fine-tuned run directory reproduces its final evaluation
    run(entry, tmp_path / "c", cfg, str(tmp_path / "a"), *ov, "--eval_only",
        f"task.answer_vocab={tmp_path / 'a' / 'answer_vocab.json'}")
    again = read_eval(tmp_path / "c")
    assert again["step"] == 0 and again["vqa_acc"] == ev["vqa_acc"]


def test_image_retrieval_trains_and_keeps_the_best_checkpoint(demo_tasks, init_file, tmp_path, capsys):
    from train import finetune_retrieval as entry

    run(entry, tmp_path / "a", "train/configs/finetune/demo_coco_retrieval.yaml", init_file,
        *coco_overrides(demo_tasks), "--max_steps", "3", "train.eval_every=1", "task.k_i2t=4", "task.k_t2i=4")
    out = capsys.readouterr().out
    assert "task.init" in out and "4x4 -> 6x6" in out   # the strict load's one line, with the resampled grid
    records = [json.loads(line) for line in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["num_media"] == SMALL["coco_test"] and r["num_texts"] == 2 * SMALL["coco_test"] and 0 <= r["tr_r1"] <= r["tr_r5"] <= r["tr_r10"] <= 1
    best = json.loads((tmp_path / "a" / "checkpoints" / "best").read_text())
    top = max(records, key=lambda r: r["r_mean"])
    assert best["step"] == top["step"] and best["value"] == top["r_mean"]
    assert (tmp_path / "a" / "checkpoints" / best["tag"]).is_dir()


def test_video_retrieval_smoke(demo_tasks, init_file, tmp_path):
    """Smoke test: 2 steps of MSRVTT-layout clips with 2 frames; the video metrics come out."""
    from train import finetune_video_retrieval as entry

    run(entry, tmp_path / "v", "train/configs/finetune/demo_msrvtt_retrieval.yaml", init_file,
        *coco_overrides(demo_tasks, video=True), "--max_steps", "2")
    ev = read_eval(tmp_path / "v")
    assert ev["num_media"] == SMALL["msrvtt_test"] and 1 <= ev["t2v_medr"] <= SMALL["msrvtt_test"] and 0 <= ev["v2t_r1"] <= 1


@pytest.mark.parametrize("extra, message", [
    (["task.eval.annotations=[/nonexistent/dataset_coco.json]"],
     "task.eval.annotations[0]: no such file '/nonexistent/dataset_coco.json'"),
    (["--init", "/nonexistent/init.safetensors"], "task.init: no such file or directory '/nonexistent/init.safetensors'"),
    (["task.k_i2t=0"], "task.k_i2t / task.k_t2i must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(demo_tasks, init_file, tmp_path, capsys, extra, message):
    from train import finetune_retrieval as entry

    argv = ["--deepspeed_config", write_ds_config(str(tmp_path), 0, "fp32"), "--config",
            "train/configs/finetune/demo_coco_retrieval.yaml", "--output_dir", str(tmp_path / "x"), "--init", init_file,
            *coco_overrides(demo_tasks), *extra]
    assert entry.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("task", ["retrieval", "vqa"])
def test_two_ranks_under_zero3_stay_in_sync_and_evaluate_as_one_rank_does(demo_tasks, init_file, tmp_path, task):
    """2 ranks, ZeRO-3 (every forward needs both ranks): the sharded / split evaluations pad so both ranks run the
    same forwards; the ranks end bit-identical, and the checkpoint evaluated on 1 rank gives the same numbers."""
    import socket
    import subprocess
    import sys

    from conftest import REPO_ROOT
    from train import finetune_retrieval, finetune_vqa

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script, config, ov = {
        "retrieval": ("train/finetune_retrieval.py", "train/configs/finetune/demo_coco_retrieval.yaml",
                      coco_overrides(demo_tasks) + ["task.k_i2t=5", "task.k_t2i=3", "train.micro_batch_size=4"]),
        "vqa": ("train/finetune_vqa.py", "train/configs/finetune/demo_vqa.yaml",
                # 12 + 11 val questions over the ranks: 2 batches against 1 without the padding
                vqa_overrides(demo_tasks) + ["train.micro_batch_size=4", "train.eval_batch_size=11"])}[task]
    ds = write_ds_config(str(tmp_path), 3, "fp32")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT",
                                                             "MASTER_ADDR")}
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(port), script, "--deepspeed_config", ds, "--config",
           config, "--output_dir", str(tmp_path / "two"), "--init", init_file, *ov, "--max_steps", "2",
           "train.check_ranks_in_sync=true"]
    r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "ranks in sync: True" in r.stdout, r.stdout[-3000:]
    two = read_eval(tmp_path / "two")
    extra = [f"task.answer_vocab={tmp_path / 'two' / 'answer_vocab.json'}"] if task == "vqa" else []
    entry = finetune_retrieval if task == "retrieval" else finetune_vqa
    run(entry, tmp_path / "one", config, str(tmp_path / "two"), *ov, "--eval_only", *extra)
    one = read_eval(tmp_path / "one")
    keys = ["tr_r1", "ir_r1", "tr_r5", "ir_r5", "r_mean"] if task == "retrieval" else ["vqa_acc", "vqa_num_scored"]
    assert {k: one[k] for k in keys} == {k: two[k] for k in keys}
    if task == "vqa":   # both ranks' shares of the test split are in the one EvalAI file
        assert len(json.loads((tmp_path / "two" / "vqa_test_predictions.json").read_text())) == SMALL["vqa_testdev"]


def test_retrieval_stopped_mid_epoch_resumes_exactly(demo_tasks, init_file, tmp_path):
    """ITC + ITM with image ids (hard negatives drawn from the seeded RNG): a stop after step 2 of a 4-step run and
    the resume give the uninterrupted run's losses bit for bit (the loader's data position and every RNG restored)."""
    from train import finetune_retrieval as entry

    cfg = "train/configs/finetune/demo_coco_retrieval.yaml"
    ov = [*coco_overrides(demo_tasks), "--max_steps", "4", "train.eval_every=0", "task.k_i2t=2", "task.k_t2i=2"]
    run(entry, tmp_path / "a", cfg, init_file, *ov)
    assert run(entry, tmp_path / "b", cfg, init_file, *ov, hook=stop_after(2))["stopped"]
    run(entry, tmp_path / "b", cfg, init_file, *ov)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss_itc"], r["loss_itm"]) for r in a] == [(r["loss_itc"], r["loss_itm"]) for r in b]
    assert read_eval(tmp_path / "b")["r_mean"] == read_eval(tmp_path / "a")["r_mean"]

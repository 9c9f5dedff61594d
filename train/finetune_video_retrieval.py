r"""Video-text retrieval fine-tuning (MSRVTT 1k-A, LSMDC): train/finetune_retrieval.py with the video tower.

  deepspeed train/finetune_video_retrieval.py --deepspeed_config ds_configs/zero2_bf16.json \
      --config train/configs/finetune/msrvtt_retrieval.yaml --init OUT.safetensors [--output_dir D] [key=value ...]

Clips are data.num_frames frames (official setting: 4 at 224 px; training samples one frame per segment at random,
evaluation the segment middles). Metrics: text->video and video->text R@1/5/10 and median rank (t2v_*, v2t_*), their
mean r_mean picks the best checkpoint. Everything else as train/finetune_retrieval.py.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from train import finetune, launch  # noqa: E402
from train.finetune_retrieval import RetrievalTask, build  # noqa: E402


@dataclass
class VideoRetrievalTask(RetrievalTask):
    modality: Literal["image", "video"] = "video"

    def validate(self) -> None:
        super().validate()
        if self.modality != "video":
            raise ValueError("task.modality: train/finetune_video_retrieval.py fine-tunes on video; use "
                             "train/finetune_retrieval.py for images")


ENTRY = finetune.entry("train/finetune_video_retrieval.py", __doc__, VideoRetrievalTask, build)


def main(argv=None) -> int:
    return launch.main(ENTRY, argv)


if __name__ == "__main__":
    sys.exit(main())

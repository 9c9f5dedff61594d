"""Shared test setup: repo root importable, single-process distributed env, DeepSpeed on CPU without op builds,
Hugging Face offline, and one small demo shard set per session."""
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# Without these DeepSpeed tries MPI discovery (needs mpi4py). setdefault keeps a launcher's values.
for _k, _v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
    os.environ.setdefault(_k, _v)
if "MASTER_PORT" not in os.environ:
    import socket
    with socket.socket() as _s:   # a free port, so parallel test sessions do not collide
        _s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(_s.getsockname()[1])
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_SKIP_SHM_OP", "1")     # train.distributed skips the ~40 s shm op JIT build
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Small but real demo set: enough shards for 2 ranks x 1 worker, enough val samples for retrieval.
SMALL_DEMO = dict(image_size=64, train_images=480, val_images=64, train_videos=16, val_videos=8,
                  train_image_shards=4, train_video_shards=2)


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory):
    """Manifest of a small demo set made once per session by the datasets helper's generator."""
    from datasets.demo_data import generate
    return generate(tmp_path_factory.mktemp("demo_shards"), **SMALL_DEMO)

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from train.config import load_config  # noqa: E402
from train.flops import count_flops, main  # noqa: E402

TINY = str(Path(__file__).resolve().parents[2] / "train" / "configs" / "tiny_test.yaml")
GLSCL = ["objectives.mgsc={}", "objectives.mltc={}", "objectives.itm.pairs=b"]


@pytest.fixture(scope="module")
def flops():
    return count_flops(load_config(TINY, GLSCL), batch_size=2, log=lambda *_: None)


def test_official_costs_more_than_shared_passes(flops):
    assert flops["official"]["total"] > flops["ours"]["total"] > 0
    # the group that shares passes A/B re-encodes nothing unmasked in ours
    assert flops["ours"]["parts"]["mgsc+mltc"] < flops["official"]["parts"]["mgsc+mltc"]


def test_total_is_sum_of_parts(flops):
    for side in ("ours", "official"):
        assert sum(flops[side]["parts"].values()) == pytest.approx(flops[side]["total"], rel=1e-9)
    assert set(flops["ours"]["parts"]) == {"pass:image", "pass:text", "itc", "itm", "mlm", "mgsc+mltc"}
    assert set(flops["official"]["parts"]) == {"itc", "itm", "mlm", "mgsc+mltc"}


def test_script_last_line_is_ratio(capsys):
    assert main(["--config", TINY, "--batch", "2", *GLSCL]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"ratio: ([0-9.]+)", last)
    assert m and 0 < float(m.group(1)) < 1

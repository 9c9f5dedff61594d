"""`convert_checkpoint.py import --format dalle-dvae --trust-pickle`: OpenAI's encoder.pkl is a whole pickled dall_e
module. Here a tiny stand-in with the official class paths and attribute layout is pickled (zip and legacy torch.save
formats), its classes are removed again, and the CLI must turn it into weights DVAEEncoder loads with identical tensors
and codes, without importing dall_e; without --trust-pickle, or for a pickle that calls anything else, exit 2."""
import contextlib
import math
import os
import pickle
import subprocess
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import REPO_ROOT

from models.dvae import load_dvae


@contextlib.contextmanager
def fake_dall_e():
    """dall_e.utils.Conv2d, dall_e.encoder.EncoderBlock / Encoder, importable (for pickling) only inside the block."""
    utils, encoder = types.ModuleType("dall_e.utils"), types.ModuleType("dall_e.encoder")

    class Conv2d(nn.Module):
        def __init__(self, n_in, n_out, kw, use_float16=True, device=torch.device("cpu"), requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.kw, self.use_float16 = n_in, n_out, kw, use_float16
            self.device, self.requires_grad = device, requires_grad
            self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw), requires_grad=False)
            self.b = nn.Parameter(0.1 * torch.randn(n_out), requires_grad=False)

        def forward(self, x):
            return F.conv2d(x.float(), self.w, self.b, padding=(self.kw - 1) // 2)

    class EncoderBlock(nn.Module):
        def __init__(self, n_in, n_out, n_layers, device=None, requires_grad=False):
            super().__init__()
            self.n_in, self.n_out, self.n_layers, self.device, self.requires_grad = (n_in, n_out, n_layers, device,
                                                                                      requires_grad)
            self.n_hid, self.post_gain = n_out // 4, 1 / n_layers ** 2
            self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
            h = self.n_hid
            self.res_path = nn.Sequential(OrderedDict([
                ("relu_1", nn.ReLU()), ("conv_1", Conv2d(n_in, h, 3)),
                ("relu_2", nn.ReLU()), ("conv_2", Conv2d(h, h, 3)),
                ("relu_3", nn.ReLU()), ("conv_3", Conv2d(h, h, 3)),
                ("relu_4", nn.ReLU()), ("conv_4", Conv2d(h, n_out, 1))]))

        def forward(self, x):
            return self.id_path(x) + self.post_gain * self.res_path(x)

    class Encoder(nn.Module):
        group_count = 4

        def __init__(self, n_hid, n_blk_per_group, input_channels=3, vocab_size=8192):
            super().__init__()
            self.n_hid, self.n_blk_per_group, self.input_channels, self.vocab_size = (n_hid, n_blk_per_group,
                                                                                      input_channels, vocab_size)
            self.device, self.requires_grad, self.use_mixed_precision = torch.device("cpu"), False, True
            n_layers, widths, groups = 4 * n_blk_per_group, [n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid], []
            for g, w in enumerate(widths):
                blocks = [(f"block_{i + 1}", EncoderBlock(widths[max(g - 1, 0)] if i == 0 else w, w, n_layers))
                          for i in range(n_blk_per_group)]
                groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(
                    blocks + ([("pool", nn.MaxPool2d(kernel_size=2))] if g < 3 else [])))))
            output = nn.Sequential(OrderedDict([("relu", nn.ReLU()),
                                                ("conv", Conv2d(8 * n_hid, vocab_size, 1, use_float16=False))]))
            self.blocks = nn.Sequential(OrderedDict([("input", Conv2d(input_channels, n_hid, 7)), *groups,
                                                     ("output", output)]))

        def forward(self, x):
            return self.blocks(x)

    for cls, mod in ((Conv2d, utils), (EncoderBlock, encoder), (Encoder, encoder)):
        cls.__module__, cls.__qualname__ = mod.__name__, cls.__name__
        setattr(mod, cls.__name__, cls)
    package = types.ModuleType("dall_e")
    package.utils, package.encoder = utils, encoder
    added = {"dall_e": package, "dall_e.utils": utils, "dall_e.encoder": encoder}
    assert not set(added) & set(sys.modules)
    sys.modules.update(added)
    try:
        yield encoder
    finally:
        for name in added:
            del sys.modules[name]


class Evil:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def save(obj, path, zip_format):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return str(path)


def convert(tmp_path, src, *extra):
    """The CLI in a fresh process, with a booby-trapped `dall_e` package on its path: importing it leaves a marker."""
    trap = tmp_path / "trap"
    (trap / "dall_e").mkdir(parents=True, exist_ok=True)
    (trap / "dall_e" / "__init__.py").write_text(f"open({str(tmp_path / 'imported_dall_e')!r}, 'w').close()\n")
    out = str(tmp_path / "dvae.safetensors")
    env = {**os.environ, "PYTHONPATH": str(trap)}
    r = subprocess.run([sys.executable, "train/convert_checkpoint.py", "import", "--format", "dalle-dvae", *extra,
                        src, out], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert not (tmp_path / "imported_dall_e").exists(), "the converter imported dall_e"
    return r, out


def refused(r, out, *phrases):
    err = r.stderr.strip()
    assert r.returncode == 2 and err.startswith("error: ") and "\n" not in err, (r.returncode, r.stderr)
    assert all(p in err for p in phrases), err
    assert not os.path.exists(out)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_released_encoder_pickle_imports(tmp_path, zip_format):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with fake_dall_e() as enc:
        torch.manual_seed(0)
        official = enc.Encoder(8, 2, vocab_size=64).eval()
        src = save(official, tmp_path / "encoder.pkl", zip_format)
        with torch.no_grad():
            official_codes = official((1 - 2 * 0.1) * x + 0.1).argmax(1).flatten(1)
        official_sd = {k: v.clone() for k, v in official.state_dict().items()}
    assert "dall_e.encoder" not in sys.modules

    r, out = convert(tmp_path, src, "--trust-pickle")
    assert r.returncode == 0, r.stderr
    assert '"hidden": 8, "blocks_per_group": 2, "vocab_size": 64' in r.stdout
    ours = load_dvae(out)
    assert ours.sizes() == {"hidden": 8, "blocks_per_group": 2, "vocab_size": 64, "in_channels": 3}
    assert set(ours.state_dict()) == set(official_sd)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in official_sd.items())
    assert torch.equal(ours.codes(x), official_codes)


def test_needs_trust_pickle(tmp_path):
    with fake_dall_e() as enc:
        src = save(enc.Encoder(8, 1, vocab_size=64), tmp_path / "encoder.pkl", True)
    r, out = convert(tmp_path, src)
    refused(r, out, "--trust-pickle", "weights_only=True")


@pytest.mark.parametrize("where,zip_format", [("top", True), ("top", False), ("inside_encoder", True),
                                              ("inside_encoder", False), ("raw", None)])
def test_a_pickle_that_runs_code_is_refused_unrun(tmp_path, where, zip_format):
    marker = tmp_path / "pwned"
    if where == "raw":   # a bare pickle: torch reads it as the legacy format, its first record runs the payload
        src = str(tmp_path / "evil.pkl")
        with open(src, "wb") as f:
            pickle.dump(Evil(marker), f, protocol=2)
    elif where == "top":
        src = save(Evil(marker), tmp_path / "evil.pkl", zip_format)
        torch.load(src, weights_only=False)   # the payload is live: a plain torch.load runs it
        assert marker.exists()
        marker.unlink()
    else:
        with fake_dall_e() as enc:
            encoder = enc.Encoder(8, 1, vocab_size=64)
            encoder.blocks.group_2.block_1.note = Evil(marker)
            src = save(encoder, tmp_path / "evil.pkl", zip_format)
    r, out = convert(tmp_path, src, "--trust-pickle")
    refused(r, out, "refusing to unpickle", "system")
    assert not marker.exists()


def test_keys_are_checked_strictly(tmp_path):
    with fake_dall_e() as enc:
        encoder = enc.Encoder(8, 1, vocab_size=64)
        encoder.blocks.group_3.block_1.extra = nn.Parameter(torch.zeros(2))
        src = save(encoder, tmp_path / "encoder.pkl", True)
    r, out = convert(tmp_path, src, "--trust-pickle")
    refused(r, out, "unexpected", "blocks.group_3.block_1.extra")

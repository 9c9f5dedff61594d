"""MomentumCopies and FeatureQueue as plain modules: frozen copies that leave the RNG alone, a ring buffer that
wraps in order and stays fp32 when the model is cast to bf16."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.momentum import FeatureQueue, MomentumCopies


class Owner(nn.Module):
    def __init__(self, momentum: bool = True):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8))
        self.fusion = nn.ModuleDict({"image_in": nn.Linear(8, 8), "text_in": nn.Linear(8, 8)})
        self.itc = nn.Linear(8, 3)
        if momentum:
            self.momentum = MomentumCopies(self, ["vision", "fusion.image_in", "itc"], 0.995)


def test_copies_are_frozen_equal_and_keyed_by_name():
    torch.manual_seed(0)
    owner = Owner()
    mc = owner.momentum
    assert list(mc.copies.keys()) == ["vision", "fusion__image_in", "itc"]
    assert mc.coefficient == 0.995 and type(mc.coefficient) is float
    assert mc.copy_of("fusion.image_in") is mc.copies["fusion__image_in"]
    assert all(not p.requires_grad for p in mc.parameters())
    trainable = {n for n, p in owner.named_parameters() if p.requires_grad}
    assert trainable and not any(n.startswith("momentum.") for n in trainable)
    # the copies are saved with the model
    assert "momentum.copies.fusion__image_in.weight" in owner.state_dict()
    pairs = mc.pairs(owner)
    assert [n for n, _, _ in pairs] == ["vision.0.weight", "vision.0.bias", "vision.1.weight", "vision.1.bias",
                                        "fusion.image_in.weight", "fusion.image_in.bias", "itc.weight", "itc.bias"]
    for name, p, q in pairs:
        assert p is owner.get_parameter(name) and p is not q
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()
    with pytest.raises(KeyError):
        mc.copy_of("text")


def test_copying_does_not_touch_the_rng():
    torch.manual_seed(0)
    owner = Owner(momentum=False)
    before = torch.get_rng_state()
    MomentumCopies(owner, ["vision", "itc"], 0.9)
    assert torch.equal(torch.get_rng_state(), before)
    # so adding momentum copies leaves the model's own initialisation and everything after it unchanged
    torch.manual_seed(1)
    plain = Owner(momentum=False)
    after_plain = torch.randn(3)
    torch.manual_seed(1)
    with_m = Owner(momentum=True)
    assert torch.equal(torch.randn(3), after_plain)
    for (n, a), (_, b) in zip(plain.named_parameters(), with_m.named_parameters()):
        assert torch.equal(a, b), n


def test_shared_parameters_stay_shared_and_pair_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.out = nn.Linear(4, 5, bias=False)
            self.out.weight = self.emb.weight
            self.momentum = MomentumCopies(self, ["emb", "out"], 0.5)

    t = Tied()
    assert t.momentum.copy_of("out").weight is t.momentum.copy_of("emb").weight
    assert [n for n, _, _ in t.momentum.pairs(t)] == ["emb.weight"]


def test_bad_arguments_and_mismatched_structures_are_value_errors():
    owner = Owner(momentum=False)
    for m in (1.0, -0.1, float("nan"), True, "0.9"):
        with pytest.raises(ValueError, match="coefficient"):
            MomentumCopies(owner, ["itc"], m)
    for names in (["nope"], "itc", [], ["vision", "vision.0"], ["itc", "itc"]):
        with pytest.raises(ValueError):
            MomentumCopies(owner, names, 0.9)
    MomentumCopies(owner, ["itc"], 0.0)   # m = 0 (copy every step) is allowed
    mc = MomentumCopies(owner, ["vision", "itc"], 0.9)
    other = Owner(momentum=False)
    other.itc = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="itc.weight"):
        mc.pairs(other)
    other.itc = nn.Sequential(nn.Linear(8, 3))
    with pytest.raises(ValueError, match="differs"):
        mc.pairs(other)
    del other.itc
    with pytest.raises(ValueError, match="no submodule 'itc'"):
        mc.pairs(other)


def test_queue_starts_normalised_and_wraps_in_order():
    torch.manual_seed(0)
    q = FeatureQueue(size=6, dim=3)
    assert q.features.shape == (6, 3) and q.features.dtype == torch.float32 and q.ptr.dtype == torch.long
    assert q.ptr.shape == (1,) and int(q.ptr) == 0
    torch.testing.assert_close(q.features.norm(dim=1), torch.ones(6))
    expected = q.features.clone()
    batches = [torch.arange(i * 6, i * 6 + 6, dtype=torch.float32).reshape(2, 3) for i in range(5)]
    rows = [0, 2, 4, 0, 2]   # 5 batches of 2 rows in a 6-row ring
    for b, start in zip(batches, rows):
        q.enqueue(b)
        expected[start:start + 2] = b
        assert torch.equal(q.features, expected)
        assert int(q.ptr) == (start + 2) % 6
    # a batch that straddles the end (n divides size, but ptr is not a multiple of n) wraps around
    q2 = FeatureQueue(size=4, dim=1)
    q2.enqueue(torch.tensor([[1.0]]))
    q2.enqueue(torch.tensor([[2.0], [3.0]]))
    q2.enqueue(torch.tensor([[4.0], [5.0]]))
    assert q2.features.flatten().tolist() == [5.0, 2.0, 3.0, 4.0] and int(q2.ptr) == 1


def test_enqueue_casts_detaches_and_checks_sizes():
    q = FeatureQueue(size=8, dim=2)
    x = torch.ones(4, 2, dtype=torch.bfloat16, requires_grad=True) * 0.5
    q.enqueue(x)
    assert q.features.dtype == torch.float32 and not q.features.requires_grad
    assert torch.equal(q.features[:4], torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=r"8 .*3|3 .*8"):
        q.enqueue(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="8"):
        q.enqueue(torch.zeros(16, 2))
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        q.enqueue(torch.zeros(4, 3))
    assert int(q.ptr) == 4   # a refused enqueue writes nothing


def test_queue_stays_fp32_when_the_model_is_cast():
    class WithQueue(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)
            self.queue = FeatureQueue(size=4, dim=3)

    torch.manual_seed(0)
    m = WithQueue()
    m.queue.enqueue(torch.full((4, 3), 1.0 + 2 ** -12))   # not representable in bf16 or fp16
    kept = m.queue.features.clone()
    for cast in (lambda mod: mod.bfloat16(), lambda mod: mod.half(), lambda mod: mod.to(torch.bfloat16),
                 lambda mod: mod.to("cpu", torch.float16), lambda mod: mod.float(), lambda mod: mod.double()):
        cast(m)
        assert m.queue.features.dtype == torch.float32 and torch.equal(m.queue.features, kept)
        assert m.queue.ptr.dtype == torch.long
    assert m.proj.weight.dtype == torch.float64   # the rest of the model did follow the casts
    # loading a state dict (e.g. a bf16 one) keeps the dtype too
    sd = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    assert m.queue.features.dtype == torch.float32


def test_normalised_init_matches_albef():
    torch.manual_seed(3)
    q = FeatureQueue(size=5, dim=4)
    torch.manual_seed(3)
    assert torch.equal(q.features, F.normalize(torch.randn(5, 4), dim=1))

"""datasets/batch.py: the loaders hand out exactly the contract's keys with its dtypes, and to_device moves a batch
as the engine needs it (checked against a hand computation of the normalisation)."""
import pytest
import torch

from datasets import batch as K
from datasets.config import DataConfig, SourceConfig
from datasets.loader import build_eval_loader, build_train_loader

# written out here, not read from datasets.transforms: the test states the normalisation independently
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _by_hand(pixels: torch.Tensor, mean_std) -> torch.Tensor:
    out = torch.empty(pixels.shape, dtype=torch.float64)
    for c in range(3):
        out[..., c, :, :] = (pixels[..., c, :, :].double() / 255 - mean_std[0][c]) / mean_std[1][c]
    return out


def test_to_device_normalises_casts_and_passes_through():
    pixels = torch.arange(2 * 1 * 3 * 2 * 2, dtype=torch.uint8).reshape(2, 1, 3, 2, 2) * 10
    ids = torch.tensor([[101, 7, 102]])
    extra = torch.tensor([0.5, 1.5], dtype=torch.float64)
    keys, caption = ["a", "b"], ["x", "y"]
    batch = {K.PIXEL_VALUES: pixels, K.NORMALIZE: "imagenet", K.INPUT_IDS: ids, "extra": extra,
             K.SAMPLE_KEYS: keys, K.CAPTION: caption, K.MODALITY: "image", K.SOURCE: 1}
    out = K.to_device(batch, torch.device("cpu"), torch.float32)
    assert out.keys() == batch.keys()
    assert out[K.PIXEL_VALUES].dtype == torch.float32
    torch.testing.assert_close(out[K.PIXEL_VALUES].double(), _by_hand(pixels, IMAGENET), rtol=0, atol=1e-5)
    assert out[K.INPUT_IDS].dtype == torch.long and torch.equal(out[K.INPUT_IDS], ids)  # integers keep their dtype
    assert out["extra"].dtype == torch.float32 and out["extra"].tolist() == [0.5, 1.5]  # other floats: the dtype
    assert out[K.SAMPLE_KEYS] is keys and out[K.CAPTION] is caption  # not tensors: passed through as they are
    assert (out[K.MODALITY], out[K.SOURCE], out[K.NORMALIZE]) == ("image", 1, "imagenet")
    assert batch[K.PIXEL_VALUES] is pixels and batch["extra"].dtype == torch.float64  # the input is left alone

    half = K.to_device({K.PIXEL_VALUES: pixels}, torch.device("cpu"), torch.bfloat16)  # no "normalize": clip
    assert half[K.PIXEL_VALUES].dtype == torch.bfloat16
    torch.testing.assert_close(half[K.PIXEL_VALUES].double(), _by_hand(pixels, CLIP), rtol=1e-2, atol=1e-2)
    already = torch.randn(1, 1, 3, 2, 2, dtype=torch.float64)  # float pixels are not normalised twice, only cast
    assert torch.equal(K.to_device({K.PIXEL_VALUES: already}, "cpu", torch.float32)[K.PIXEL_VALUES], already.float())


def test_contract_lists_every_key_once_with_its_producers():
    assert K.keys_of(K.TRAIN) == {"pixel_values", "normalize", "input_ids", "attention_mask", "modality", "__key__"}
    assert K.keys_of(K.TEXT_MASKER) == {"mlm_input_ids", "mlm_labels"}
    assert K.keys_of(K.EVAL) == K.keys_of(K.TRAIN) | {"source", "caption"}
    assert K.keys_of(K.ENGINE) == {"step"}
    assert K.keys_of(K.TASK) == {"image_ids", "index"} and K.keys_of(K.TASK_EVAL) == {"index", "valid"}
    assert K.keys_of(K.TOKENIZER_VIEW) == {"tokenizer_pixels"}
    assert set(K.CONTRACT) == K.keys_of(K.TRAIN, K.EVAL, K.TEXT_MASKER, K.TOKENIZER_VIEW, K.ENGINE, K.TASK,
                                        K.TASK_EVAL)


def _fake_masker(input_ids, attention_mask, *, generator):
    return input_ids.clone(), torch.full_like(input_ids, -100)


def _check_dtypes(b, n):
    assert b[K.PIXEL_VALUES].dtype == torch.uint8 and b[K.PIXEL_VALUES].dim() == 5 and len(b[K.PIXEL_VALUES]) == n
    for k in (K.INPUT_IDS, K.ATTENTION_MASK, K.MLM_INPUT_IDS, K.MLM_LABELS):
        if k in b:
            assert b[k].dtype == torch.int64 and b[k].shape[0] == n, k
    assert isinstance(b[K.NORMALIZE], str) and b[K.MODALITY] in ("image", "video")
    assert len(b[K.SAMPLE_KEYS]) == n and all(isinstance(s, str) for s in b[K.SAMPLE_KEYS])


@pytest.mark.parametrize("masked", [False, True])
def test_loaders_hand_out_exactly_the_contract_keys(demo, tok, masked):
    cfg = DataConfig(train=[SourceConfig(demo["paths"]["train_images"]), SourceConfig(demo["paths"]["train_videos"],
                                                                                      "video")],
                     eval=[SourceConfig(demo["paths"]["val_images"])], image_size=32, num_frames=2, num_workers=0,
                     shuffle_buffer=10, max_text_len=16, mlm_probability=0.15 if masked else None)
    loader = build_train_loader(cfg, tok, micro_batch_size=4, rank=0, world_size=1, seed=0,
                                text_masker=_fake_masker if masked else None)
    it = iter(loader)
    want = K.keys_of(K.TRAIN, K.TEXT_MASKER) if masked else K.keys_of(K.TRAIN)
    for _ in range(6):
        b = next(it)
        assert set(b) == want
        _check_dtypes(b, 4)
    ev = next(iter(build_eval_loader(cfg, tok, batch_size=4)))
    assert set(ev) == K.keys_of(K.EVAL)
    _check_dtypes(ev, 4)
    assert isinstance(ev[K.SOURCE], int) and len(ev[K.CAPTION]) == 4

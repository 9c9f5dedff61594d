"""Random masks: BERT's MLM masking (the one rule for the data workers and the device) and the GLSCL objectives'
masks (MGSC, MLTC): image patch dropping, image token masking, text masking.

All helpers draw independently per sample and take an optional torch.Generator (tests pass one for reproducibility).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def bert_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor, mask_token_id: int,
              vocab_size: int, probability: float, generator: Optional[torch.Generator] = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking -> (masked ids, labels). The one MLM rule: the data workers (data.mlm_probability, given this
    function by train/) and the MLM objective on the device both call it.

    Each real (attention_mask 1), non-special token is selected with `probability`; labels = the id where selected,
    -100 elsewhere. Of the selected: 80% become `mask_token_id`, 10% a random non-special id in [0, vocab_size), 10%
    stay. Nothing is forced: a batch may select nothing (the MLM objective then returns a zero loss).
    Draws, in this order and always full-shape (so no host sync on a GPU and the same stream for a given generator
    on every call): rand (selection), rand (80/10/10 split), randint (replacement, over the non-special pool).
    `special_ids`: 1-D, unique ids in [0, vocab_size) (checked for CPU tensors; a device tensor is trusted rather
    than synced), on input_ids' device.
    """
    shape, device = input_ids.shape, input_ids.device
    special = special_ids.to(device=device, dtype=torch.long).reshape(-1).sort().values
    pool = vocab_size - special.numel()
    if pool < 1:
        raise ValueError(f"vocab_size {vocab_size} leaves no non-special token to draw")
    if special.device.type == "cpu" and special.numel() and (
            special[0] < 0 or special[-1] >= vocab_size or (special[1:] == special[:-1]).any()):
        raise ValueError(f"special_ids must be unique ids in [0, {vocab_size}), got {special.tolist()}")
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    selected = candidates & (torch.rand(shape, device=device, generator=generator) < probability)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    split = torch.rand(shape, device=device, generator=generator)
    r = torch.randint(pool, shape, device=device, generator=generator)
    # The r-th (0-based) non-special id is r + #{j : special[j] - j <= r} (special sorted, unique): no pool tensor,
    # no nonzero(), nothing that waits for the device.
    replacement = (r + torch.searchsorted(special - torch.arange(special.numel(), device=device), r, right=True))
    masked = torch.where(selected & (split < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(selected & (split >= 0.8) & (split < 0.9), replacement.to(input_ids.dtype), masked)
    return masked, labels


def _ranks(noise: torch.Tensor) -> torch.Tensor:
    """Per-row rank of every entry of `noise` (0 = smallest): a uniform random permutation when noise is uniform."""
    return noise.argsort(dim=1).argsort(dim=1)


def num_kept(num_patches: int, keep_ratio: float) -> int:
    # int() as MAE/SCL's random_masking (int(324 * 0.2) = 64); the epsilon guards 1 - 0.8 = 0.19999999999999996.
    return max(1, min(num_patches, int(num_patches * keep_ratio + 1e-6)))


def random_keep_indices(batch: int, num_patches: int, keep_ratio: float, device=None,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, K) long: per sample, K = int(P * keep_ratio) (at least 1) distinct patch indices, sorted ascending.

    MAE-style dropping for MGSC (keep_ratio = 1 - image_mask_ratio). For videos the caller uses the same indices in
    every frame (tube masking, as SCL's random_masking repeats ids_keep over frames).
    """
    k = num_kept(num_patches, keep_ratio)
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return noise.argsort(dim=1)[:, :k].sort(dim=1).values


def random_token_mask(batch: int, num_patches: int, ratio: float, device=None,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, P) bool: exactly n = int(ratio * P) (at least 1) True per sample, positions uniformly at random (int()
    as the released code's mvm_masking: int(324 * 0.3) = 97; the epsilon guards float error)."""
    n = max(1, min(num_patches, int(ratio * num_patches + 1e-6)))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    return _ranks(noise) < n


def mask_text_for_completion(ids: torch.Tensor, attention_mask: torch.Tensor, special_ids: torch.Tensor,
                             mask_token_id: int, ratio: float, generator: Optional[torch.Generator] = None,
                             with_replacement: bool = False):
    """-> (masked ids, (B, L) bool mask). Text masking for MGSC/MLTC.

    Per sample, exactly max(1, round(ratio * n)) of its n real, non-special tokens are drawn WITHOUT replacement and
    all are replaced by the mask token (no 80/10/10). A sample with no such token (n = 0) is left unmasked.
    Deviation from the released SCL code: it draws int((len - 2) * 0.4) + 1 positions WITH replacement
    (np.random.randint), so duplicates make the effective rate lower than 40%; we follow the paper's "40% of tokens".
    `with_replacement=True` reproduces the released code's rule instead (int(ratio * n) + 1 draws, duplicates merge).
    """
    special_ids = torch.as_tensor(special_ids, device=ids.device)
    candidates = attention_mask.bool() & ~torch.isin(ids, special_ids)
    count = candidates.sum(dim=1)
    n = torch.where(count > 0, (ratio * count.double()).round().long().clamp(min=1), torch.zeros_like(count))
    n = torch.minimum(n, count)
    if with_replacement:
        mask = _draw_with_replacement(candidates, count, ratio, generator)
        return ids.masked_fill(mask, mask_token_id), mask
    noise = torch.rand(ids.shape, device=ids.device, generator=generator)
    noise = noise.masked_fill(~candidates, 2.0)  # non-candidates rank last
    mask = (_ranks(noise) < n[:, None]) & candidates
    masked = ids.masked_fill(mask, mask_token_id)
    return masked, mask


def _draw_with_replacement(candidates: torch.Tensor, count: torch.Tensor, ratio: float,
                           generator: Optional[torch.Generator]) -> torch.Tensor:
    """The released SCL rule: int(ratio * n) + 1 uniform draws among a sample's n candidates, with replacement."""
    b, length = candidates.shape
    k = torch.where(count > 0, (ratio * count.double()).long() + 1, torch.zeros_like(count))
    kmax = int(k.max()) if b else 0
    mask = torch.zeros_like(candidates)
    if kmax == 0:
        return mask
    draws = (torch.rand(b, kmax, device=candidates.device, generator=generator) * count[:, None]).long()
    valid = torch.arange(kmax, device=candidates.device)[None] < k[:, None]
    hit = torch.zeros(b, length + 1, dtype=torch.bool, device=candidates.device)
    hit.scatter_(1, torch.where(valid, draws, length), True)  # invalid draws land in the spare column
    rank = (candidates.long().cumsum(1) - 1).clamp(min=0)  # index of each candidate among its sample's candidates
    return candidates & hit.gather(1, rank)


def official_mlm_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, continuation: torch.Tensor,
                      skipped: torch.Tensor, special_ids: torch.Tensor, mask_token_id: int, vocab_size: int,
                      probability: float, generator: Optional[torch.Generator] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The released SCL/METER/ViLT MLM rule -> (masked ids, labels): transformers 4.6's
    DataCollatorForWholeWordMask applied to captions padded to max_text_len.

    Per row: words are groups of a token and the following `continuation` tokens ("##" WordPiece pieces; a RoBERTa
    BPE vocabulary has none, so every token is its own word); `skipped` tokens ("[CLS]"/"[SEP]" strings) are not
    candidates, but padding and RoBERTa's <s>/</s> are. Words are taken in random order, skipping any that would
    overshoot, until n = max(1, round(L * probability)) positions are chosen, L being the padded length (Python's
    round, half to even: L = 50 at 15% gives 8). Positions holding special tokens (padding included) are then
    dropped, so about 16% of the real tokens of a 50-token row are selected. Of those, 80% become the mask token and
    half of the rest a random id of the whole vocabulary, special tokens included.
    continuation / skipped: (vocab,) bool tables indexed by token id. Runs on the CPU (a host sync on a device).
    """
    del attention_mask   # the collator finds padding by its id, as the released code does
    device = input_ids.device
    ids = input_ids.cpu()
    b, length = ids.shape
    n = min(512, max(1, round(length * probability)))
    selected = torch.zeros(b, length, dtype=torch.bool)
    cont, skip = continuation.cpu().tolist(), skipped.cpu().tolist()
    for r, row in enumerate(ids.tolist()):
        words: list[list[int]] = []
        for i, t in enumerate(row):
            if skip[t]:
                continue
            if words and cont[t]:
                words[-1].append(i)
            else:
                words.append([i])
        taken = 0
        for w in torch.randperm(len(words), generator=generator).tolist():
            if taken >= n:
                break
            if taken + len(words[w]) > n:
                continue
            selected[r, words[w]] = True
            taken += len(words[w])
    selected &= ~torch.isin(ids, special_ids.cpu())
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    replaced = (torch.rand(ids.shape, generator=generator) < 0.8) & selected
    random = (torch.rand(ids.shape, generator=generator) < 0.5) & selected & ~replaced
    words_drawn = torch.randint(vocab_size, ids.shape, generator=generator)
    masked = torch.where(replaced, torch.full_like(ids, mask_token_id), ids)
    masked = torch.where(random, words_drawn, masked)
    return masked.to(device), labels.to(device)


def blockwise_mask(height: int, width: int, num_masked: int, min_block: int, rng,
                   max_block: Optional[int] = None, min_aspect: float = 0.3,
                   max_aspect: Optional[float] = None) -> torch.Tensor:
    """(height * width,) bool: BEiT's blockwise masking of a patch grid (SIMLA: 75 of 16 x 16, min block 16, aspect
    0.3 - 3.33). Rectangles of area U(min_block, room) and log-uniform aspect are added while they add at least one
    new patch without exceeding `num_masked` (at most 10 tries each); it stops when `num_masked` patches are masked or
    a round of tries adds nothing, so a small grid may end a little short, as BEiT's generator does. A rectangle
    never spans the whole grid height or width (BEiT's strict bound). rng: a random.Random (one per sample)."""
    max_block = num_masked if max_block is None else max_block
    lo, hi = math.log(min_aspect), math.log(max_aspect if max_aspect is not None else 1 / min_aspect)
    mask = torch.zeros(height, width, dtype=torch.bool)
    count = 0
    while count < num_masked:
        room = min(num_masked - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(min_block, room)
            aspect = math.exp(rng.uniform(lo, hi))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                block = mask[top:top + h, left:left + w]
                new = h * w - int(block.sum())
                if 0 < new <= room:
                    block.fill_(True)
                    added = new
            if added:
                break
        if not added:
            break
        count += added
    return mask.flatten()


def text_guided_mask(relevance: torch.Tensor, num_masked: int, guided_ratio: float,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, N) bool: SemMIM's text-guided patch mask, exactly `num_masked` True per row.

    g = round(guided_ratio * num_masked) patches are drawn without replacement with probability proportional to
    `relevance` (B, N) (>= 0; negative and NaN count as 0), the other num_masked - g uniformly from the rest.
    The guided draw is Gumbel-top-k (the g largest log r + Gumbel noise are a sequential draw without replacement,
    Kool et al. 2019), so there is no loop and no host sync. Patches of zero relevance rank after every positive
    one, in random order, so the count holds whatever the relevance (all zero: uniform). Always two full-shape
    float64 draws (guided keys, then the uniform part), so a generator's stream does not depend on the values.
    """
    b, n = relevance.shape
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked must be in [0, {n}], got {num_masked}")
    if not 0 <= guided_ratio <= 1:
        raise ValueError(f"guided_ratio must be in [0, 1], got {guided_ratio}")
    guided = round(guided_ratio * num_masked)
    r = torch.nan_to_num(relevance.detach().double(), nan=0.0).clamp(min=0)
    u = torch.rand(b, n, dtype=torch.float64, device=r.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float64).tiny)))
    # log r >= log(smallest double) > -745 and Gumbel > -7, so every positive key exceeds u - 1e4
    key = torch.where(r > 0, r.clamp(min=torch.finfo(torch.float64).tiny).log() + gumbel, u - 1e4)
    chosen = _ranks(-key) < guided
    noise = torch.rand(b, n, dtype=torch.float64, device=r.device, generator=generator).masked_fill(chosen, 2.0)
    return chosen | (_ranks(noise) < num_masked - guided)

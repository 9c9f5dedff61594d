"""Training-step throughput, MFU and peak memory of the pretraining model (synthetic batches, no data loading).

    python train/benchmark.py --config train/configs/glscl_4m.yaml [--batch 64] [--dtype bf16] [--steps 20]
        [--warmup 5] [--engine torch|deepspeed] [--deepspeed_config ds_configs/zero1_bf16.json]
        [--peak-tflops 989] [--find-max-batch 1024 [--batch-granularity 8] [--memory-budget-gib G]] [key=value ...]

What one step is: VLPModel forward over the config's objectives (shared encoder passes), backward, optimizer step -
exactly the training step minus the data loader (`datasets/benchmark.py` measures that side). Weights are random init
(a text tower naming a missing local dir, a missing vision file or image-tokenizer file are built at their size, as
train/flops.py does: SIMLA's dVAE stand-in has the DALL-E encoder's size). Synthetic batches carry what the data
pipeline would: `tokenizer_pixels` at `data.tokenizer_view.size` when the config sets a tokenizer view.
A single-stream (SIMLA) config at toy size on CPU, e.g.:
    python train/benchmark.py --config train/configs/simla_4m.yaml --batch 2 --steps 2 --warmup 1 data.image_size=64 \
        model.vision.img_size=64 model.vision.embed_dim=64 model.vision.depth=1 model.vision.num_heads=2 \
        "model.text={tokenizer: minilm, hidden_size: 64, num_layers: 1, num_heads: 2, intermediate_size: 128}" \
        objectives.xmm_image.num_masked=5 objectives.xmm_image.min_block=2 data.tokenizer_view.size=32

  --engine torch      AdamW (fused on CUDA) + torch.autocast(dtype); fp16 adds a GradScaler. Needs no DeepSpeed.
  --engine deepspeed  deepspeed.initialize with the given ds_config (its batch sizes set to --batch x 1 GPU).

FLOPs per sample are counted on the same device with torch's FlopCounterMode (matmuls/convs/attention, forward +
backward, one step of batch 2 as train/flops.py counts "ours", attention on CPU included); MFU = FLOPs/sample x
samples/s / peak. The peak is
the dense bf16/fp16 tensor-core number of the GPU (H100/H200 SXM 989 TFLOP/s, A100 312) unless --peak-tflops says
otherwise; on CPU there is no default and MFU is not printed.
Peak memory: CUDA's max allocated; on CPU the process's peak resident set (whole process, build included).
Last line: `samples_per_sec: X mfu: Y` (Y = n/a without a peak).

--find-max-batch LIMIT (CUDA only: a CUDA out-of-memory error is the signal): before the measurement, the largest
micro-batch <= LIMIT whose two training steps run without running out of memory (and, with --memory-budget-gib, whose
peak allocation stays within it) is searched by doubling from --batch, then bisecting to --batch-granularity. Each
trial prints one line; the measurement then runs at the batch found (`largest micro-batch that fits` in the report).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_peak(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def count_flops_per_sample(model, batch: dict) -> float:
    """Forward + backward FLOPs per sample of one training step as VLPModel runs it (batch >= 2)."""
    from train.flops import flop_counter

    with flop_counter() as fc:
        model(batch)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / batch["pixel_values"].shape[0]


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def build(cfg, device, log=print):
    from models.vlp import build_model
    from train.engine import apply_activation_checkpointing
    from train.flops import prepare_model_config, prepare_objectives, swap_tokenizers

    model_cfg, tokenizer = prepare_model_config(cfg, log)
    objectives, stand_ins = prepare_objectives(dict(cfg.objectives), log)
    torch.manual_seed(cfg.train.seed)
    model = build_model(model_cfg, objectives, tokenizer).to(device).train()
    swap_tokenizers(model, stand_ins)   # (a frozen dVAE outside the module tree: it follows the batch's device)
    applied = apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    return model, tokenizer, applied


def torch_step_fn(model, cfg, device, dtype: str):
    from train.optim import param_groups

    fused = device.type == "cuda"
    opt = torch.optim.AdamW(param_groups(model, cfg.train), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            eps=cfg.train.eps, fused=fused)
    amp = dtype != "fp32"
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "fp16")

    def step(batch):
        with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=amp):
            loss = model(batch)["loss"]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    step.reset = lambda: (opt.zero_grad(set_to_none=True), model.zero_grad(set_to_none=True))
    return step


def deepspeed_step_fn(model, cfg, ds_config_path: str, batch_size: int):
    import json

    import deepspeed

    from train.distributed import init_distributed
    from train.optim import build_optimizer

    init_distributed()
    with open(ds_config_path) as f:
        ds_config = json.load(f)
    ds_config.update(train_batch_size=batch_size, train_micro_batch_size_per_gpu=batch_size,
                     gradient_accumulation_steps=1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train), config=ds_config)
    half = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None

    def step(batch):
        if half is not None:   # as the engine's to_device: the tokenizer view stays float32 (its codes are an argmax)
            batch = {k: v.to(half) if v.is_floating_point() and k != "tokenizer_pixels" else v
                     for k, v in batch.items()}
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
        return loss

    step.close = engine.destroy   # DeepSpeed keeps engines reachable: free its buckets when done
    step.reset = lambda: engine.optimizer.zero_grad(set_to_none=True)   # after an out-of-memory trial
    return step


def largest_fitting(fits, start: int, limit: int, granularity: int = 1) -> int:
    """The largest b in [start, limit] with fits(b), for a fits that is true up to some size and false above it: double
    from start until a size fails (or limit is reached), then bisect between the last fit and the first failure until
    they are within `granularity`. 0 when start itself does not fit. Calls fits O(log(limit / start)) times."""
    if not fits(start):
        return 0
    lo, hi = start, None
    while hi is None:
        b = min(2 * lo, limit)
        if b == lo:
            return lo
        if fits(b):
            lo = b
        else:
            hi = b
    while hi - lo > granularity:
        mid = lo + max(granularity, (hi - lo) // 2 // granularity * granularity)
        if mid >= hi:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def memory_trial(step, make, device, budget_gib: float | None, log=print):
    """fits(b) for largest_fitting: two steps of micro-batch b; False on a CUDA out-of-memory error (the step's
    gradients are dropped and the cache emptied, so the next, smaller trial starts clean) or a peak over budget."""
    def fits(b: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            batches = [make(b, s) for s in range(2)]
            for i in range(2):
                step(batches[i])
            sync(device)
        except torch.OutOfMemoryError:
            batches = None
            getattr(step, "reset", lambda: None)()
            torch.cuda.empty_cache()
            log(f"  micro-batch {b:5d}: out of memory")
            return False
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
        ok = budget_gib is None or peak <= budget_gib
        log(f"  micro-batch {b:5d}: peak {peak:.2f} GiB" + ("" if ok else f" > budget {budget_gib} GiB"))
        return ok

    return fits


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    from train.config import ConfigError, load_config
    from train.flops import synthetic_batch, tokenizer_view_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=None, help="micro batch (default: the config's micro_batch_size)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                    help="default bf16 on CUDA, fp32 on CPU (bf16 matmuls are very slow on most CPUs)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--engine", choices=("torch", "deepspeed"), default="torch")
    ap.add_argument("--deepspeed_config", default="ds_configs/zero1_bf16.json")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--find-max-batch", type=int, default=None, metavar="LIMIT",
                    help="CUDA: search the largest micro-batch <= LIMIT that fits, then measure at it")
    ap.add_argument("--batch-granularity", type=int, default=8, help="the search's resolution (default 8)")
    ap.add_argument("--memory-budget-gib", type=float, default=None,
                    help="with --find-max-batch: a batch fits only if its peak allocation stays within this")
    ap.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    batch_size = args.batch or cfg.train.micro_batch_size
    if batch_size < 2:
        ap.error("--batch must be >= 2 (ITM and ITC need in-batch negatives)")
    if args.find_max_batch is not None:
        if device.type != "cuda":
            ap.error("--find-max-batch needs a CUDA device (a CUDA out-of-memory error is the search's signal)")
        if args.find_max_batch < batch_size or args.batch_granularity < 1:
            ap.error(f"--find-max-batch must be >= the start batch {batch_size} and --batch-granularity >= 1")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model, tokenizer, applied = build(cfg, device)
    frames = max(1, cfg.data.num_frames)
    view = tokenizer_view_size(cfg.data)
    make = lambda b, seed: to_device(synthetic_batch(tokenizer, b, frames, cfg.data.image_size,  # noqa: E731
                                                     cfg.data.max_text_len, seed=seed, tokenizer_view=view), device)
    with torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32"):
        flops = count_flops_per_sample(model, make(2, 0))
    step = (torch_step_fn(model, cfg, device, dtype) if args.engine == "torch"
            else deepspeed_step_fn(model, cfg, args.deepspeed_config, batch_size))
    largest = None
    if args.find_max_batch is not None:
        print(f"searching the largest micro-batch in [{batch_size}, {args.find_max_batch}] "
              f"(granularity {args.batch_granularity})")
        largest = largest_fitting(memory_trial(step, make, device, args.memory_budget_gib), batch_size,
                                  args.find_max_batch, args.batch_granularity)
        if largest == 0:
            print(f"error: micro-batch {batch_size} does not fit", file=sys.stderr)
            getattr(step, "close", lambda: None)()
            return 1
        batch_size = largest
    batches = [make(batch_size, s) for s in range(2)]  # two alternating batches: no caching of one input

    for i in range(args.warmup):
        step(batches[i % 2])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(batches[i % 2])
    loss = float(loss.detach())  # waits for the last step
    sync(device)
    elapsed = time.perf_counter() - t0

    sps = batch_size * args.steps / elapsed
    peak = args.peak_tflops or default_peak(device, dtype)
    achieved = flops * sps / 1e12
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"config {args.config}; device {name}; engine {args.engine}; dtype {dtype}; micro batch {batch_size}; "
          f"frames {frames}; image {cfg.data.image_size}px; text {cfg.data.max_text_len} tokens"
          + (f"; tokenizer view {view}px" if view else ""))
    print(f"objectives {','.join(model.objectives)}; params {n_params / 1e6:.1f}M; activation checkpointing {applied}")
    print(f"{'step time':<28}{elapsed / args.steps * 1e3:10.1f} ms  (mean of {args.steps} after {args.warmup} warmup)")
    print(f"{'samples/s (this device)':<28}{sps:10.1f}")
    if largest is not None:
        print(f"{'largest micro-batch that fits':<28}{largest:10d}  (<= {args.find_max_batch}, granularity "
              f"{args.batch_granularity}" + (f", budget {args.memory_budget_gib} GiB" if args.memory_budget_gib
                                            else "") + ")")
    print(f"{'GFLOPs/sample fwd+bwd':<28}{flops / 1e9:10.1f}  (FlopCounterMode, batch 2, same device/dtype)")
    print(f"{'achieved TFLOP/s':<28}{achieved:10.1f}")
    if device.type == "cuda":
        print(f"{'peak memory allocated':<28}{torch.cuda.max_memory_allocated(device) / 2 ** 30:10.2f} GiB")
    else:
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux
        print(f"{'peak memory (process RSS)':<28}{rss:10.2f} GiB")
    print(f"{'final loss':<28}{loss:10.3f}")
    mfu = f"{achieved / peak:.4g}" if peak else "n/a"
    if peak:
        print(f"{'MFU':<28}{achieved / peak:10.1%}  (peak {peak:.1f} TFLOP/s)")
    print(f"samples_per_sec: {sps:.1f} mfu: {mfu}")
    getattr(step, "close", lambda: None)()
    return 0


if __name__ == "__main__":
    sys.exit(main())

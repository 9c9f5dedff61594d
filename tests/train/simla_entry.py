"""The per-rank entry point of tests/train/test_simla_train.py's 2-rank EMA/queue test (not collected by pytest):

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/train/simla_entry.py STAGE OUT_DIR SHARDS_TRAIN [dotted.key=value ...]

Runs the SIMLA tiny config (train/configs/simla_tiny_test.yaml, dropout 0 so that the momentum forward is a
function of the weights alone) through the real launcher and engine (train/pretrain.py) under ZeRO-STAGE with a
hook that records, on this rank:
  - every momentum parameter before the first step (q0) and every online parameter after each optimizer step, in
    float64 (gathered under ZeRO-3), in the order of the model's MomentumCopies pairs;
  - the batch of every micro step (what the model's forward received) and the queue pointers after every step.
After the run it computes here, independently of train/momentum.py and models/objectives/ita.py:
  - the EMA recurrence m^k q0 + sum_i (1-m) m^(k-i) p_i for every momentum parameter, compared with the run's
    (gathered) momentum parameters;
  - the momentum features of each micro batch of this rank, recomputed with a plain (non-DeepSpeed) model whose
    momentum copies hold the recurrence's value at that step.
It saves OUT_DIR/rank{r}.pt with the comparisons, this rank's recomputed features and its final queues, and prints
`simla entry ok rank=r`; the test lines the ranks up (queues = the all-gathered features, rank order).
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

CONFIG = os.path.join(REPO_ROOT, "train", "configs", "simla_tiny_test.yaml")


def gathered(params, enabled: bool) -> list:
    import deepspeed
    with deepspeed.zero.GatheredParameters(list(params), enabled=enabled):
        return [p.detach().double().clone() for p in params]


def recurrence(q0: list, online: list, m: float, k: int) -> list:
    """Momentum weights after k optimizer steps: m^k q0 + sum_{i=1..k} (1-m) m^(k-i) p_i, float64."""
    out = []
    for j, q in enumerate(q0):
        acc = q * m ** k
        for i in range(1, k + 1):
            acc = acc + (1 - m) * m ** (k - i) * online[i - 1][j]
        out.append(acc)
    return out


def main(stage: int, out_dir: str, train_shards: str, extra: list) -> None:
    import json

    import torch.distributed as dist

    from train import pretrain

    rank = int(os.environ["RANK"])
    ds_path = os.path.join(out_dir, f"ds_z{stage}_rank{rank}.json")   # one file per rank: no rank waits for another
    with open(ds_path, "w") as f:
        json.dump({"gradient_clipping": 1.0, "zero_optimization": {"stage": stage}}, f)
    cfg, ds_cfg = pretrain.prepare([
        "--deepspeed_config", ds_path, "--config", CONFIG, "--output_dir", os.path.join(out_dir, "run"),
        f'data.train=[{{shards: "{train_shards}", modality: image}}]', "data.eval=[]", "model.text.dropout=0.0",
        "train.save_every=0", *extra])
    z3 = stage == 3
    rec = {"batches": [], "online": [], "ptr": []}

    def hook(engine):
        module = engine.module
        rec["engine"] = engine
        rec["pairs"] = pairs = module.momentum.pairs(module)
        rec["m"] = module.momentum.coefficient
        rec["q0"] = gathered([q for _, _, q in pairs], z3)
        from models.momentum import FeatureQueue
        queues = {n: q for n, q in module.named_modules() if isinstance(q, FeatureQueue)}
        rec["queues"] = queues

        def capture(_mod, args):
            b = args[0]
            rec["batches"].append({k: b[k].detach().clone() for k in ("pixel_values", "input_ids", "attention_mask")})
        module.register_forward_pre_hook(capture)

        def after(e, applied):
            assert applied, "a step was skipped"
            rec["online"].append(gathered([p for _, p, _ in pairs], z3))
            rec["ptr"].append({n: int(q.ptr) for n, q in queues.items()})
        engine.add_after_step(after)

    result = pretrain.run(cfg, ds_cfg, engine_hook=hook)
    engine, pairs, m = rec["engine"], rec["pairs"], rec["m"]
    module = engine.module
    steps = result["step"]
    assert steps == cfg.train.max_steps and len(rec["online"]) == steps, (result, len(rec["online"]))

    # 1. the EMA recurrence, per momentum parameter
    have = gathered([q for _, _, q in pairs], z3)
    want = recurrence(rec["q0"], rec["online"], m, steps)
    names = [n for n, _, _ in pairs]
    # relative to 1 + |w|: the momentum weights are fp32 (an fp32 shadow), the recurrence float64
    err = {n: float(((h - w).abs() / (1 + w.abs())).max()) for n, h, w in zip(names, have, want)}
    moved_from_q0 = {n: float((h - q).abs().max()) for n, h, q in zip(names, have, rec["q0"])}
    off_online = {n: float((h - p).abs().max()) for n, h, p in zip(names, have, rec["online"][-1])}

    # 2. the tied MLM decoder: the same tensor as the word embeddings, online and in the momentum copies
    mc = module.momentum
    tied = {
        "online": module.objectives["xmm_text"].head.decoder.weight is module.text.embeddings.word_embeddings.weight,
        "momentum": mc.copy_of("objectives.xmm_text.head").decoder.weight
        is mc.copy_of("text").embeddings.word_embeddings.weight,
        "online_values": None, "momentum_values": None}
    dec, emb = module.objectives["xmm_text"].head.decoder.weight, module.text.embeddings.word_embeddings.weight
    mdec = mc.copy_of("objectives.xmm_text.head").decoder.weight
    memb = mc.copy_of("text").embeddings.word_embeddings.weight
    g = gathered([dec, emb, mdec, memb], z3)
    tied["online_values"], tied["momentum_values"] = bool(torch.equal(g[0], g[1])), bool(torch.equal(g[2], g[3]))
    start = rec["q0"][names.index("text.embeddings.word_embeddings.weight")]
    tied["decoder_moved"] = bool(not torch.equal(g[0], start))

    # 3. every rank holds the same momentum weights and queues
    flat = torch.cat([h.flatten() for h in have] + [q.features.double().flatten() for q in rec["queues"].values()])
    peers = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(peers, flat)
    ranks_equal = all(torch.equal(peers[0], p) for p in peers)

    # 4. this rank's momentum features of every micro batch, recomputed by a plain model whose momentum copies hold
    # the recurrence's value of the step the micro batch belongs to
    from models.backbone import image_embedding, text_embedding
    from models.text import load_tokenizer
    from models.vlp import build_model

    plain = build_model(cfg.model, cfg.objectives, load_tokenizer(cfg.model.text)).train()
    plain_pairs = plain.momentum.pairs(plain)
    assert [n for n, _, _ in plain_pairs] == names
    gas = len(rec["batches"]) // steps
    assert gas * steps == len(rec["batches"])
    get = lambda n: plain.momentum.copy_of(n) if n in plain.retrieval_modules else None  # noqa: E731
    feats = {"image": [], "text": []}
    with torch.no_grad():
        for i in range(steps):
            weights = recurrence(rec["q0"], rec["online"], m, i)   # before optimizer step i + 1
            for (_, _, q), w in zip(plain_pairs, weights):
                q.copy_(w.to(q.dtype))
            for b in rec["batches"][i * gas:(i + 1) * gas]:
                feats["image"].append(image_embedding(get, b["pixel_values"].float()))
                feats["text"].append(text_embedding(get, b["input_ids"], b["attention_mask"]))

    out = {"err": err, "moved_from_q0": moved_from_q0, "off_online": off_online, "tied": tied,
           "ranks_equal": ranks_equal, "ptr": rec["ptr"], "gas": gas, "micro": cfg.train.micro_batch_size,
           "queues": {n: {"features": q.features.detach().clone(), "ptr": int(q.ptr)}
                      for n, q in rec["queues"].items()},
           "feats": feats, "m": m, "names": names}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    print(f"simla entry ok rank={rank} steps={steps} gas={gas} params={len(names)}", flush=True)
    from train.launch import shutdown_distributed
    shutdown_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])

"""The per-rank entry point of tests/train/test_semmim_train.py's 2-rank test (not collected by pytest):

    RANK=r WORLD_SIZE=2 LOCAL_RANK=r MASTER_ADDR=127.0.0.1 MASTER_PORT=p \
        python tests/train/semmim_entry.py STAGE OUT_DIR SHARDS_TRAIN [dotted.key=value ...]

Runs train/configs/semmim_tiny_test.yaml through the real launcher and engine (train/pretrain.py) under ZeRO-STAGE
with a hook that records, on this rank:
  - every momentum parameter before the first step (q0) and every online parameter after each optimizer step, in
    float64 (gathered under ZeRO-3), in the order of the model's MomentumCopies pairs;
  - the teacher logits of every training forward (what SemMIM's momentum model returned: global (B, K) and the
    patch logits (B, F, N, K) averaged over frames and patches (B, K)), wrapped around the objective's `targets`
    only to read them.
After the run it computes here, independently of train/momentum.py and the objective's center update:
  - the EMA recurrence m^k q0 + sum_i (1-m) m^(k-i) p_i for every momentum parameter vs the run's;
  - the centers as c <- cm c + (1-cm) mean(all ranks' teacher logits of that micro step), from zero, vs the run's.
It saves OUT_DIR/rank{r}.pt (comparisons, centers, this rank's online/momentum fingerprints) and prints
`semmim entry ok rank=r`; the test compares the ranks.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

CONFIG = os.path.join(REPO_ROOT, "train", "configs", "semmim_tiny_test.yaml")


from simla_entry import gathered, recurrence  # noqa: E402  (same directory: the EMA helpers)


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
        f'data.train=[{{shards: "{train_shards}", modality: image}}]', "data.eval=[]", "train.save_every=0", *extra])
    z3 = stage == 3
    rec = {"online": [], "teacher": []}

    def hook(engine):
        module = engine.module
        rec["engine"] = engine
        rec["pairs"] = pairs = module.momentum.pairs(module)
        rec["m"] = module.momentum.coefficient
        rec["q0"] = gathered([q for _, _, q in pairs], z3)
        obj = module.objectives["semmim"]
        real = obj.targets

        def targets(ctx):   # read what the teacher returned; the objective uses it unchanged
            t = real(ctx)
            if obj.training:
                rec["teacher"].append((t.global_logits.detach().double().clone(),
                                       t.patch_logits.detach().double().flatten(1, 2).mean(1)))
            return t
        obj.targets = targets

        def after(e, applied):
            assert applied, "a step was skipped"
            rec["online"].append(gathered([p for _, p, _ in pairs], z3))
        engine.add_after_step(after)

    result = pretrain.run(cfg, ds_cfg, engine_hook=hook)
    engine, pairs, m = rec["engine"], rec["pairs"], rec["m"]
    module = engine.module
    steps = result["step"]
    assert steps == cfg.train.max_steps and len(rec["online"]) == steps, (result, len(rec["online"]))
    names = [n for n, _, _ in pairs]

    # 1. the EMA recurrence, per momentum parameter
    have = gathered([q for _, _, q in pairs], z3)
    want = recurrence(rec["q0"], rec["online"], m, steps)
    # relative to 1 + |w|: the momentum weights are fp32 (an fp32 shadow), the recurrence float64
    err = {n: float(((h - w).abs() / (1 + w.abs())).max()) for n, h, w in zip(names, have, want)}
    moved_from_q0 = {n: float((h - q).abs().max()) for n, h, q in zip(names, have, rec["q0"])}
    off_online = {n: float((h - p).abs().max()) for n, h, p in zip(names, have, rec["online"][-1])}

    # 2. the centers: every rank's teacher logits of each micro step (all_gather, rank order), then the EMA from 0
    cm = cfg.objectives["semmim"].center_momentum
    k = cfg.objectives["semmim"].num_prototypes
    ref = {"global_": torch.zeros(k, dtype=torch.float64), "patch": torch.zeros(k, dtype=torch.float64)}
    for glob, patch in rec["teacher"]:
        for name, mine in (("global_", glob), ("patch", patch)):
            peers = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(peers, mine)
            ref[name] = cm * ref[name] + (1 - cm) * torch.cat(peers).mean(0)
    centers = module.objectives["semmim"].centers
    got = {"global_": centers.global_.detach().clone(), "patch": centers.patch.detach().clone()}

    out = {"err": err, "moved_from_q0": moved_from_q0, "off_online": off_online, "names": names, "m": m,
           "centers": got, "centers_ref": ref, "forwards": len(rec["teacher"]), "teacher0": rec["teacher"][0][0],
           "online": torch.cat([p.flatten() for p in rec["online"][-1]]), "momentum": torch.cat([h.flatten()
                                                                                               for h in have])}
    # every online parameter (not only those with a momentum copy), for the cross-rank comparison
    with torch.no_grad():
        allp = gathered([p for _, p in module.named_parameters() if p.requires_grad], z3)
    out["all_online"] = torch.cat([p.flatten() for p in allp])
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    print(f"semmim entry ok rank={rank} steps={steps} forwards={len(rec['teacher'])} params={len(names)}", flush=True)
    from train.launch import shutdown_distributed
    shutdown_distributed()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])

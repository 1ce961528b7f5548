"""lb_dist.finetune under torch.distributed (2 processes, gloo): tests/test_finetune.py::test_ddp.

    RANK=r WORLD_SIZE=2 MASTER_ADDR=... MASTER_PORT=... python tests/_worker_finetune.py OUT_DIR DATA_DIR

One process group, two checks (each rank asserts; rank 0 writes OUT_DIR/result.json):

1. sample-wise GradientMix through DistributedDataParallel with an UNEVEN split (3 + 5 sentences):
   the gradient DDP produces from the trainer's compute_loss equals, on every rank, the gradient of
   ``sum_b w_b (token-sum of sentence b) / N`` over the 8 sentences of both ranks, computed here in
   one process (w_b the GradientMix sample weights of global indices 0..7, rank 0 holding 0..2);
2. a few training steps of CLARS + device-wise GradientMix: the trainer registers lb_dist.ddp's hook
   (mixing and S_k statistics in the all-reduce); the weights stay identical across ranks, the
   estimator is fed once per step and the mixing step follows the optimizer.
"""
from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path

import torch
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

torch.set_num_threads(1)


def main() -> None:
    out_dir, data_dir = Path(sys.argv[1]), sys.argv[2]
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    from transformers import Seq2SeqTrainingArguments

    from lb_dist import GradientMix
    from lb_dist.data import TranslationDataset, collate_translation, read_multi30k
    from lb_dist.finetune import LbDistSeq2SeqTrainer, make_optimizer
    from lb_dist.models import build_model
    from lb_dist.text import train_tokenizer

    def args(**kw):
        base = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", disable_tqdm=True,
                    save_strategy="no", logging_steps=1, per_device_train_batch_size=4, max_steps=3,
                    learning_rate=0.5, seed=0, dataloader_num_workers=0, ddp_backend="gloo")
        base.update(kw)
        return Seq2SeqTrainingArguments(**base)

    a = args()
    _ = a.device  # sets up the process group (gloo)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2 and a.world_size == 2
    pairs = read_multi30k(data_dir, "train")[:32]
    tok = train_tokenizer([s for p in pairs for s in p], vocab_size=200)  # deterministic: same on both ranks
    ds = TranslationDataset(pairs, tok, max_length=40)
    collate = functools.partial(collate_translation, pad_id=0)

    def model_():
        torch.manual_seed(0)
        return build_model("transformer_small", vocab_size=tok.get_vocab_size(), max_positions=48, dropout=0.0,
                           d_model=32, encoder_layers=1, decoder_layers=1, attention_heads=2, ffn_dim=64)

    result = {}
    # ---------------------------------------------------------------- 1. sample-wise mixing
    model = model_()
    opt, _ = make_optimizer(model, "lamb", lr=1e-3)
    mix = GradientMix(noise="gaussian", std=0.5, granularity="sample", seed=11)
    trainer = LbDistSeq2SeqTrainer(model=model, args=a, train_dataset=ds, data_collator=collate,
                                   optimizers=(opt, None), mix=mix)
    split = [list(range(0, 3)), list(range(3, 8))]  # uneven: rank 0 has 3 sentences, rank 1 has 5
    batch = collate([ds[i] for i in split[rank]])
    batches, _ = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    ddp = DDP(model)
    model.train()
    trainer.compute_loss(ddp, batches[0]).backward()
    got = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    # reference in this process: all 8 sentences, global indices 0..7 in rank order
    ref_model = model_()
    ref_model.train()
    full = collate([ds[i] for i in range(8)])
    out = ref_model(**full)
    b, t, v = out.logits.shape
    ce = F.cross_entropy(out.logits.reshape(b * t, v), full["labels"].reshape(-1), ignore_index=-100,
                         reduction="none").view(b, t).sum(1)
    w = mix.sample_weights(torch.arange(8), 8).float()
    n_tokens = int(full["labels"].ne(-100).sum())
    ((w * ce).sum() / n_tokens).backward()
    ref = [p.grad for p in ref_model.parameters() if p.requires_grad]
    assert len(ref) == len(got)
    # relative to the largest gradient entry (some entries are exactly 0 in theory: the key biases)
    scale = max(float(r.abs().max()) for r in ref)
    worst = max(float((g - r).abs().max()) for g, r in zip(got, ref)) / scale
    assert worst < 1e-4, f"rank {rank}: DDP gradient differs from the one-process eq. 4 gradient by {worst}"
    result["sample_mix_rel_error"] = worst
    del ddp

    # ---------------------------------------------------- 2. CLARS + device-wise mixing, trained
    model = model_()
    opt, moments = make_optimizer(model, "clars", lr=0.5, weight_decay=1e-4)
    mix = GradientMix(noise="gaussian", std=0.25, granularity="device", seed=2)
    trainer = LbDistSeq2SeqTrainer(model=model, args=args(max_steps=3), train_dataset=ds, data_collator=collate,
                                   optimizers=(opt, None), mix=mix)
    trainer.train()
    assert trainer._ddp_state is not None, "the lb_dist.ddp hook was not registered"
    assert trainer.state.global_step == 3 and moments.num_updates == 3 and mix.step == 3, \
        (trainer.state.global_step, moments.num_updates, mix.step)
    assert opt.skipped_steps == 0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.isfinite(flat).all()
    both = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(both, flat)
    assert torch.equal(both[0], both[1]), "weights differ between ranks"
    start = torch.cat([p.detach().reshape(-1) for p in model_().parameters()])
    assert not torch.equal(flat, start)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(v == v and abs(v) < 1e4 for v in losses), losses
    s = moments.second_moments_tensor()
    assert torch.isfinite(s).all() and (s > 0).all()
    result.update(losses=losses, last_update_micro_batches=trainer._ddp_state.last_update["num_micro_batches"])
    if rank == 0:
        (out_dir / "result.json").write_text(json.dumps(result))
    print(f"rank {rank}: ok {result}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    leave()

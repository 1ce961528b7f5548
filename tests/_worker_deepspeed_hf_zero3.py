"""Hugging Face flows at ZeRO-3 in Hugging Face's construction order (tests/test_deepspeed_hf_zero3.py).

    deepspeed --num_gpus N tests/_worker_deepspeed_hf_zero3.py OUT_DIR

As a user's run_translation.py-style script: ``import lb_dist.deepspeed`` at the top, arguments
parsed (``Seq2SeqTrainingArguments`` with a stage-3 DeepSpeed config, which sets up DeepSpeed's
communication), ``deepspeed.init_distributed(dist_backend="gloo")`` and ``lb_dist.deepspeed.register()``
after that, then the model built with ``from_config`` (inside ``deepspeed.zero.Init``, as
transformers does when a stage-3 config exists), then ``Seq2SeqTrainer(...).train()``. A tiny
randomly initialised BART with tied embeddings, random tokens, dropout off, constant rate, no
clipping, offline.

Runs (each one fresh TrainingArguments + model + trainer in the same process group):

* ``LARS``, ``CLARS``, ``LAMB``: (a) the optimizer named in the config (``"lr": "auto"`` ...);
* with 2 processes also ``client``: (b) an lb_dist LAMB returned by an overridden
  ``Trainer.create_optimizer`` (the supported route for a client optimizer); ``discarded``:
  ``Trainer(optimizers=(lamb, None))``, which transformers replaces by AdamW under DeepSpeed,
  must be refused by lb_dist; ``resume``: (c) LAMB saved at step STEPS/2 by the Trainer and
  resumed with ``trainer.train(resume_from_checkpoint=...)`` in a fresh trainer.

Every rank records the batch of each of its micro-steps; rank 0 writes the initial and final
parameters (gathered) to OUT_DIR/hf3_<world>.pt, and the test recomputes every run in one
process without DeepSpeed.
"""
from __future__ import annotations

import argparse
import os
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import lb_dist.deepspeed as lbds  # noqa: E402  (the import alone keeps DeepSpeed's CPU comm op unbuilt)
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

STEPS, MICRO, SEQ = 20, 4, 8
BART = dict(vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=16,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, scale_embedding=False)
OPT = {
    "LARS": ({"lr": "auto", "weight_decay": "auto", "eta": 0.02, "momentum": 0.9}, {"learning_rate": 0.1}),
    "CLARS": ({"lr": "auto", "weight_decay": "auto", "eta": 0.02, "momentum": 0.9}, {"learning_rate": 0.1}),
    "LAMB": ({"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto"},
             {"learning_rate": 0.01, "adam_epsilon": 1e-6}),
}
WEIGHT_DECAY = 1e-3


class RandomPairs(torch.utils.data.Dataset):
    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.src = torch.randint(3, BART["vocab_size"], (n, SEQ), generator=g)
        self.tgt = torch.randint(3, BART["vocab_size"], (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.src[i], "attention_mask": torch.ones_like(self.src[i]), "labels": self.tgt[i]}


def freeze(model) -> None:
    """Attention key biases get a zero gradient (softmax is shift-invariant), i.e. only round-off,
    which Adam's normalisation blows up to full-size steps that differ between fp32 and float64:
    frozen here (and in the reference), which also puts frozen parameters next to trainable ones."""
    for name, p in model.named_parameters():
        if name.endswith("k_proj.bias"):
            p.requires_grad_(False)


def ds_config(opt: str | None) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
           "train_batch_size": "auto", "gradient_clipping": "auto", "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": 3}}        # DeepSpeed's defaults: persistence threshold 1e5
    if opt is not None:
        cfg["optimizer"] = {"type": opt, "params": dict(OPT[opt][0])}
    return cfg


def gathered(model) -> dict:
    import deepspeed
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().double().clone() for n, p in model.named_parameters()}


def run(kind: str, out_dir: str, world: int, resume: str | None = None, stop: int = STEPS) -> dict:
    from transformers import AutoModelForSeq2SeqLM, BartConfig, Seq2SeqTrainer, Seq2SeqTrainingArguments
    from lb_dist.optim import LAMB, param_groups

    opt = kind if kind in OPT else None
    hp = dict(OPT[opt or "LAMB"][1])
    save = kind == "resume" and resume is None
    args = Seq2SeqTrainingArguments(
        output_dir=os.path.join(out_dir, f"hf_{kind}"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=1, max_steps=STEPS, weight_decay=WEIGHT_DECAY, max_grad_norm=0.0,
        lr_scheduler_type="constant", deepspeed=ds_config(opt if kind != "resume" else "LAMB"),
        report_to=[], save_strategy="steps" if save else "no", save_steps=STEPS // 2, logging_steps=10 ** 6,
        seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True, use_cpu=True, save_only_model=False,
        **hp)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(BartConfig(**BART))       # inside zero.Init (stage 3)
    model.accepts_loss_kwargs = False   # transformers 5.23 would scale BART's loss by the world size
    freeze(model)
    partitioned = all(p.numel() == 0 for p in model.parameters())
    initial = gathered(model)
    batches: list = []

    def record(module, a, kw):
        if module.training and torch.is_grad_enabled():
            batches.append({k: kw[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")})

    model.register_forward_pre_hook(record, with_kwargs=True)

    class ClientTrainer(Seq2SeqTrainer):
        def create_optimizer(self, model=None):             # (b) the route that reaches DeepSpeed
            if self.optimizer is None:
                self.optimizer = LAMB(param_groups(self.model, self.args.weight_decay), lr=self.args.learning_rate,
                                      eps=self.args.adam_epsilon)
            return self.optimizer

    cls, kwargs = Seq2SeqTrainer, {}
    if kind == "client":
        cls = ClientTrainer
    if kind == "discarded":
        kwargs["optimizers"] = (LAMB(param_groups(model, WEIGHT_DECAY), lr=hp["learning_rate"]), None)
    trainer = cls(model=model, args=args, train_dataset=RandomPairs(), **kwargs)
    out = {"kind": kind, "partitioned": partitioned, "initial": initial}
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
        return out
    engine = trainer.model_wrapped
    out.update(final=gathered(engine.module), batches=batches, optimizer=type(engine.basic_optimizer).__name__,
               global_step=trainer.state.global_step)
    if save:
        out["checkpoint"] = os.path.join(args.output_dir, f"checkpoint-{STEPS // 2}")
    engine.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--local_rank", type=int, default=-1)
    cli = parser.parse_args()
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    import deepspeed
    from accelerate.state import AcceleratorState

    runs = ["LARS", "CLARS", "LAMB"]
    world = int(os.environ["WORLD_SIZE"])
    if world == 2:
        runs += ["client", "discarded", "resume"]
    results: dict = {}
    for i, kind in enumerate(runs):
        if i:
            AcceleratorState._reset_state()      # a fresh Trainer per run, as a fresh script would have
        if i == 0:
            # the user's script: arguments parsed first (TrainingArguments sets up DeepSpeed's comm),
            # then the documented calls: init_distributed for zero.Init on CPU, and register()
            from transformers import Seq2SeqTrainingArguments
            Seq2SeqTrainingArguments(output_dir=os.path.join(cli.out_dir, "probe"), deepspeed=ds_config("LAMB"),
                                     use_cpu=True, report_to=[])
            deepspeed.init_distributed(dist_backend="gloo")
            lbds.register()
        try:
            results[kind] = run(kind, cli.out_dir, world)
            if kind == "resume" and "checkpoint" in results[kind]:
                AcceleratorState._reset_state()
                results["resumed"] = run(kind, cli.out_dir, world, resume=results[kind]["checkpoint"])
        except Exception:
            results[kind] = {"kind": kind, "error": traceback.format_exc()}
            print(results[kind]["error"], flush=True)
    rank = torch.distributed.get_rank()
    batches = [None] * world
    torch.distributed.all_gather_object(batches, {k: v.get("batches") for k, v in results.items()})
    if rank == 0:
        for kind, r in results.items():
            r["batches"] = [b[kind] for b in batches]
        torch.save({"world": world, "results": results,
                    "shm_comm_op_loaded": deepspeed.comm.comm.cdb.shm_comm_op is not None},
                   os.path.join(cli.out_dir, f"hf3_{world}.pt"))
    summary = ", ".join(f"{k}: {v.get('error', 'ok')[:300]}" for k, v in results.items())
    print(f"rank {rank}: {summary}", flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    leave()


if __name__ == "__main__":
    main()

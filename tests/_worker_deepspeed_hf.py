"""Hugging Face Trainer with a DeepSpeed config naming CLARS and gradient_mix (tests/test_deepspeed_hf.py).

    deepspeed --num_gpus 2 tests/_worker_deepspeed_hf.py OUT_DIR

lb_dist.deepspeed.register() is the only lb_dist call: transformers' Trainer builds the engine
through Accelerate, which calls deepspeed.initialize itself. A tiny randomly initialized BERT
classifier, random token data, no network. Rank 0 writes OUT_DIR/hf.json with what the engine
looks like afterwards.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import lb_dist.deepspeed as lbds  # noqa: E402
from _teardown import leave  # noqa: E402  (tests/ is the script's directory)

STEPS, MICRO, ACC, LR = 4, 4, 2, 0.5
# dropout off: the test recomputes every micro-batch gradient from the recorded inputs and weights
BERT = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64, length: int = 12, vocab: int = 50, labels: int = 3) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (n, length), generator=g)
        self.labels = torch.randint(0, labels, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    lbds.register()
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    from transformers import TrainerCallback

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**BERT))
    # what every micro-step computed on: its inputs and the weights it saw (the test recomputes the
    # micro-batch gradients from them in float64, independently of lb_dist and DeepSpeed)
    micro_steps: list = []

    def record(module, args, kwargs):
        if module.training and torch.is_grad_enabled():
            micro_steps.append({"weights": {n: p.detach().clone() for n, p in module.named_parameters()},
                                "batch": {k: kwargs[k].detach().clone() for k in ("input_ids", "attention_mask", "labels")}})

    def record_loss(module, args, kwargs, output):
        if module.training and torch.is_grad_enabled():
            micro_steps[-1]["model_loss"] = float(output.loss)

    model.register_forward_pre_hook(record, with_kwargs=True)
    model.register_forward_hook(record_loss, with_kwargs=True)
    updates: list = []

    class RecordMoments(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            est_state = lbds.get_runtime(trainer.model_wrapped).step_moments
            last = dict(est_state.last_update)
            updates.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in last.items()})

    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds_config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "steps_per_print": 10 ** 9,
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "CLARS", "params": {"lr": "auto", "weight_decay": "auto", "eta": 0.01},
                      "second_moments": {"source": "micro_batch"}},
        "gradient_mix": {"noise": "gaussian", "std": 0.25, "seed": 0},
    }
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out_dir, "hf"), per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACC, max_steps=STEPS, learning_rate=LR, weight_decay=1e-4,
        deepspeed=ds_config, report_to=[], save_strategy="no", logging_steps=1, seed=0,
        dataloader_num_workers=0, disable_tqdm=True, use_cpu=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens(), callbacks=[RecordMoments()])
    # the loss the Trainer hands to DeepSpeed may differ from the model's by a factor (transformers
    # 5.23 multiplies by the number of processes for models taking loss kwargs, and divides by the
    # accumulation steps only for the others): record it, as the test needs what was backpropagated
    hf_backward = trainer.accelerator.backward

    def backward(loss, **kwargs):
        micro_steps[-1]["backward_loss"] = float(loss)
        micro_steps[-1]["scale_wrt_gas"] = kwargs.get("scale_wrt_gas", True)
        return hf_backward(loss, **kwargs)

    trainer.accelerator.backward = backward
    result = trainer.train()

    engine = trainer.model_wrapped
    runtime = lbds.get_runtime(engine)
    optimizer = engine.basic_optimizer
    trust = optimizer.trust_ratios()
    names = {p: n for n, p in engine.module.named_parameters()}
    estimators = list(runtime.step_moments.estimators.values())
    out = {
        "engine": type(engine).__name__,
        "optimizer": type(optimizer).__name__,
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": runtime.world_size,
        "accumulation": runtime.accumulation_steps,
        "lr": optimizer.param_groups[0]["lr"],
        "clip": engine.gradient_clipping(),
        "mix_step": runtime.mix.step,
        "global_step": trainer.state.global_step,
        "estimator_updates": [est.num_updates for est in estimators],
        "trust_layers": sorted(names[p] for p in trust),
        "train_loss": result.training_loss,
        "changed": sum(not torch.equal(initial[n].float(), p.detach().float())
                       for n, p in engine.module.named_parameters()),
        "num_params": len(initial),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "learning_rates": [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h],
    }
    rank = torch.distributed.get_rank()
    torch.save({"micro_steps": micro_steps, "updates": updates,
                "estimator_layers": [names[p] for p in estimators[0].params]},
               os.path.join(args.out_dir, f"hf_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(args.out_dir, "hf.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(f"rank {torch.distributed.get_rank()}: {out['engine']} {out['optimizer']} steps {out['global_step']}",
          flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    leave()


if __name__ == "__main__":
    main()

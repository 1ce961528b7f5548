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
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

import lb_dist.deepspeed as lbds  # noqa: E402

STEPS, MICRO, ACC, LR = 4, 4, 2, 0.5


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

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=3))
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
    trainer = Trainer(model=model, args=training_args, train_dataset=RandomTokens())
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
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(args.out_dir, "hf.json"), "w") as f:
            json.dump(out, f, indent=1)
    print(f"rank {torch.distributed.get_rank()}: {out['engine']} {out['optimizer']} steps {out['global_step']}",
          flush=True)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

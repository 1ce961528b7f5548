"""The command line of ``python -m lb_dist.finetune`` (``--help`` lists lb_dist's arguments and the
Trainer's): :func:`parse_args` into ``(FinetuneArguments, Seq2SeqTrainingArguments)``, :func:`main`."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from lb_dist.distributed import get_rank
from lb_dist.finetune.runner import FinetuneArguments, run

__all__ = ["parse_args", "main", "exit_after_distributed_job"]


def parse_args(argv=None):
    from transformers import HfArgumentParser, Seq2SeqTrainingArguments

    parser = HfArgumentParser((FinetuneArguments, Seq2SeqTrainingArguments))
    if argv is None:
        argv = sys.argv[1:]
    if any(a == "--deepspeed" or a.startswith("--deepspeed=") for a in argv) or (
            len(argv) == 1 and argv[0].endswith(".json") and '"deepspeed"' in Path(argv[0]).read_text()):
        # before Seq2SeqTrainingArguments sets up DeepSpeed's communication: the import keeps DeepSpeed
        # from JIT-building its CPU comm op (lb_dist.deepspeed.cpu_comm); register() comes later
        import lb_dist.deepspeed  # noqa: F401
    if len(argv) == 1 and argv[0].endswith(".json"):
        fa, ta = parser.parse_json_file(json_file=argv[0])
        given = set(json.loads(Path(argv[0]).read_text()))
    else:
        fa, ta = parser.parse_args_into_dataclasses(args=list(argv))
        given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if isinstance(a, str) and a.startswith("--")}
    fa.given_flags = given      # the flags given at all (a flag the DeepSpeed config decides is refused if given)
    return fa, ta


def main(argv=None) -> dict[str, Any]:
    fa, ta = parse_args(argv)
    results = run(fa, ta)
    if get_rank() == 0:
        keys = [k for k in ("train_loss", "eval_loss", "eval_bleu", "eval_token_accuracy", "test_bleu",
                            "test_token_accuracy") if k in results]
        print("[lb_dist.finetune] " + ", ".join(
            f"{k} {results[k]:.4f}" if isinstance(results[k], float) and math.isfinite(results[k])
            else f"{k} {results[k]}" for k in keys), flush=True)
    return results


def exit_after_distributed_job() -> None:
    """The process entry point's end (``python -m lb_dist.finetune``, launched by ``deepspeed`` or
    ``torchrun``): leave the process group together and exit without interpreter teardown, where
    torch 2.13 + gloo occasionally aborts ("terminate called without an active exception", seen in
    this module's 2-rank DeepSpeed test after training and saving had finished), as ``lb-dist train``
    does. Nothing to do after a single-process run."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

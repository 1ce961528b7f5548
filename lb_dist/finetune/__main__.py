"""``python -m lb_dist.finetune`` (also ``deepspeed --module lb_dist.finetune``, ``torchrun -m lb_dist.finetune``)."""
from lb_dist.finetune.cli import exit_after_distributed_job, main

if __name__ == "__main__":
    main()
    exit_after_distributed_job()

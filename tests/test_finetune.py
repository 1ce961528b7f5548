"""lb_dist.finetune: Seq2SeqTrainer with lb_dist optimizers and GradientMix on real Multi30k.

* the loss the trainer backpropagates against the token-mean cross-entropy (no mixing) and against
  eq. 4 of the GradientMix paper with sentences as samples (sample-wise mixing), computed here from
  the logits;
* CLARS' micro-batch statistics against per-micro-batch gradients computed here;
* the command line end to end: a config-built model (CLARS or LAMB + sample-wise GradientMix) and a
  "pretrained" model loaded from a directory, with BLEU; bad arguments and a tokenizer mismatch.
"""
from __future__ import annotations

import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="lb_dist.finetune needs the 'workloads' extra (transformers)")

from _data import MULTI30K, needs_multi30k  # noqa: E402
from lb_dist import GradientMix  # noqa: E402
from lb_dist.data import TranslationDataset, collate_translation, read_multi30k  # noqa: E402
from lb_dist.finetune import LbDistSeq2SeqTrainer, main, make_optimizer  # noqa: E402
from lb_dist.models import build_model  # noqa: E402
from lb_dist.text import TokenizerMismatchError, train_tokenizer  # noqa: E402

torch.set_num_threads(1)

pytestmark = needs_multi30k

TINY = {"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "attention_heads": 2, "ffn_dim": 64}


@pytest.fixture(scope="module")
def pairs():
    return read_multi30k(MULTI30K, "train")[:64]


@pytest.fixture(scope="module")
def tok(pairs):
    return train_tokenizer([s for p in pairs for s in p], vocab_size=200)


def tiny_model(tok):
    torch.manual_seed(0)
    return build_model("transformer_small", vocab_size=tok.get_vocab_size(), max_positions=48, dropout=0.0,
                       **TINY)


def training_args(tmp_path, **kw):
    from transformers import Seq2SeqTrainingArguments

    base = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", disable_tqdm=True,
                save_strategy="no", logging_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=1, learning_rate=0.1, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return Seq2SeqTrainingArguments(**base)


def token_ce(model, batch):
    """Per-sentence token sums of the cross-entropy and the token count, from the model's logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    b, t, v = out.logits.shape
    ce = F.cross_entropy(out.logits.reshape(b * t, v), batch["labels"].reshape(-1), ignore_index=-100,
                         reduction="none").view(b, t)
    return ce.sum(1), int(batch["labels"].ne(-100).sum()), out.loss


@pytest.mark.parametrize("mixing", [False, True])
def test_loss_is_token_mean_or_eq4_over_sentences(tmp_path, tok, pairs, mixing):
    ds = TranslationDataset(pairs[:8], tok, max_length=48)
    collate = functools.partial(collate_translation, pad_id=0)
    model = tiny_model(tok)
    opt, _ = make_optimizer(model, "lamb", lr=1e-3)
    mix = GradientMix(noise="gaussian", std=0.5, granularity="sample", seed=3) if mixing else None
    trainer = LbDistSeq2SeqTrainer(model=model, args=training_args(tmp_path), train_dataset=ds,
                                   data_collator=collate, optimizers=(opt, None), mix=mix)
    micro = [collate([ds[i] for i in range(4)]), collate([ds[i] for i in range(4, 8)])]
    batches, _ = trainer.get_batch_samples(iter(micro), 2, torch.device("cpu"))
    model.train()
    ours = sum(trainer.compute_loss(model, b) for b in batches)
    # reference, from the logits
    sums, counts, model_losses = zip(*(token_ce(model, b) for b in micro))
    per_sentence = torch.cat(sums)
    n_tokens = sum(counts)
    if mixing:
        pi = mix.sample_weights(torch.arange(8), 8).float() / 8  # pi_b, mean 1/B (eq. 4)
        # g = sum_b pi_b grad l_b with l_b = (B / N) * (token-sum of sentence b)
        ref = (pi * per_sentence * (8 / n_tokens)).sum()
    else:
        ref = per_sentence.sum() / n_tokens
        # = the model's own token-mean loss over the two micro-batches together
        torch.testing.assert_close(ref, sum(l * c for l, c in zip(model_losses, counts)) / n_tokens)
    torch.testing.assert_close(ours, ref)
    if mixing:
        assert not torch.allclose(ours, per_sentence.sum() / n_tokens)


def test_clars_statistics_from_the_accumulation_micro_batches(tmp_path, tok, pairs):
    """One step of 2 micro-batches: what CLARS' estimator receives equals sum_j ||g_j||^2 (g_j the
    micro-batch token-mean gradient) and ||G||^2 (G the step's token-mean gradient), computed here."""
    ds = TranslationDataset(pairs[:8], tok, max_length=48)
    collate = functools.partial(collate_translation, pad_id=0)
    model = tiny_model(tok)
    start = copy.deepcopy(model)
    opt, moments = make_optimizer(model, "clars", lr=0.5, weight_decay=1e-4)
    trainer = LbDistSeq2SeqTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=ds,
                                   data_collator=collate, optimizers=(opt, None))
    seen, updates = [], []
    original_get, original_update = trainer.get_batch_samples, moments.update

    def record_batches(*args):
        out = original_get(*args)
        seen.append([{k: v.clone() for k, v in b.items()} for b in out[0]])
        return out

    def record_update(micro_sq_sum, n, mean_sq, b=None):
        updates.append((micro_sq_sum.clone(), n, mean_sq.clone(), b))
        return original_update(micro_sq_sum, n, mean_sq, b)

    trainer.get_batch_samples, moments.update = record_batches, record_update
    trainer.train()
    assert trainer.state.global_step == 2 and moments.num_updates == 2 and opt.skipped_steps == 0
    micro_sq_sum, n, mean_sq, b = updates[0]
    assert n == 2 and b == 4
    # reference at the initial weights, on the batches of the first step
    params = dict(start.named_parameters())
    tracked = [params[name] for name, p in model.named_parameters() if any(p is q for q in moments.params)]
    assert len(tracked) == len(moments.params)
    start.train()
    grads, sums, counts = [], [], []
    for batch in seen[0]:
        s, c, _ = token_ce(start, batch)
        grads.append(torch.autograd.grad(s.sum() / c, tracked, retain_graph=True))
        sums.append(s.sum())
        counts.append(c)
    total = torch.autograd.grad(sum(sums) / sum(counts), tracked)
    ref_small = torch.stack([sum(g[k].double().square().sum() for g in grads) for k in range(len(tracked))])
    ref_big = torch.stack([t.double().square().sum() for t in total])
    torch.testing.assert_close(micro_sq_sum, ref_small, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(mean_sq, ref_big, rtol=1e-4, atol=1e-12)
    # and CLARS used them: S_k of the estimator, finite trust ratios, weights moved
    assert all(torch.isfinite(v) for v in opt.trust_ratios().values())
    moved = any(not torch.equal(p, params[name]) for name, p in model.named_parameters())
    assert moved


def test_make_optimizer_groups(tok):
    from lb_dist.moments import MicroBatchMoments
    from lb_dist.optim import CLARS, LAMB, LARS

    model = tiny_model(tok)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for name, cls in [("adamw", torch.optim.AdamW), ("lamb", LAMB), ("lars", LARS), ("clars", CLARS)]:
        opt, moments = make_optimizer(model, name, lr=0.1, weight_decay=0.01)
        assert type(opt) is cls
        adapted, excluded = opt.param_groups
        assert adapted["weight_decay"] == 0.01 and excluded["weight_decay"] == 0.0
        assert all(p.ndim == 2 for p in adapted["params"]) and all(p.ndim == 1 for p in excluded["params"])
        assert len(adapted["params"]) + len(excluded["params"]) == len(trainable)  # tied embedding once
        if name != "adamw":
            assert excluded["layer_adaptation"] is False
        if name == "clars":
            assert isinstance(moments, MicroBatchMoments) and moments.params == adapted["params"]
            assert opt.moments is moments
        else:
            assert moments is None
    with pytest.raises(ValueError, match="optimizer must be one of"):
        make_optimizer(model, "sgd", lr=0.1)


def run_cli(tmp_path, *extra, out="run"):
    argv = ["--data_dir", str(MULTI30K), "--output_dir", str(tmp_path / out), "--max_train_samples", "96",
            "--max_eval_samples", "12", "--vocab_size", "200", "--model_options", json.dumps(TINY),
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "12", "--logging_steps", "1",
            "--predict_with_generate", "--generation_max_length", "20", "--save_strategy", "no", "--use_cpu",
            "--max_length", "48", "--disable_tqdm", "true", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0", *extra]
    return main(argv)


def test_cli_config_model_lamb_with_sample_mix(tmp_path):
    res = run_cli(tmp_path, "--optimizer", "lamb", "--learning_rate", "0.05", "--mix", "sample",
                  "--gradient_accumulation_steps", "2", "--max_steps", "10", "--lr_scheduler_type", "constant",
                  "--eval_on_start", "true")
    assert res["global_step"] == 10
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    evals = [h["eval_loss"] for h in res["log_history"] if "eval_loss" in h]
    assert math.isfinite(evals[0]) and res["eval_loss"] < evals[0]  # before vs after training
    assert 0.0 <= res["eval_bleu"] <= 100.0 and 0.0 <= res["test_bleu"] <= 100.0
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    assert saved["eval_bleu"] == res["eval_bleu"] and saved["args"]["lb_dist"]["mix"] == "sample"
    check_translation_metrics(out, res, n_eval=12, n_test=12)
    assert (out / "lb_dist_tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    # a second run in the same directory must use the same tokenizer
    other = tmp_path / "other.json"
    train_tokenizer(["ein zwei drei", "one two three"] * 20, vocab_size=50, min_frequency=1, save_path=other)
    with pytest.raises(TokenizerMismatchError, match="other.json does not match"):
        run_cli(tmp_path, "--tokenizer_path", str(other), "--max_steps", "1")


def teacher_forced_accuracy(out_dir, split, n, max_length):
    """Token accuracy of the saved model on the first n pairs of `split`, computed here: the share of
    target tokens whose argmax, given the reference prefix (HF's own label shift), is the reference."""
    from transformers import MarianMTModel

    from lb_dist.text import load_tokenizer

    model = MarianMTModel.from_pretrained(out_dir).eval()
    tk = load_tokenizer(Path(out_dir) / "lb_dist_tokenizer.json")
    ds = TranslationDataset(read_multi30k(MULTI30K, split)[:n], tk, max_length)
    correct = total = 0
    with torch.no_grad():
        for i in range(n):
            batch = collate_translation([ds[i]], pad_id=tk.token_to_id("<pad>"))
            logits = model(**batch).logits
            mask = batch["labels"].ne(-100)
            correct += int((logits.argmax(-1).eq(batch["labels"]) & mask).sum())
            total += int(mask.sum())
    return correct / total


def check_translation_metrics(out_dir, res, n_eval, n_test=None, max_length=48):
    """BLEU of results.json = sacrebleu on the written predictions and exactly the first n references
    (no padding rows); token accuracy = the one computed here from the saved model."""
    import sacrebleu

    for prefix, split, n in (("eval", "val", n_eval), ("test", "test", n_test)):
        if n is None:
            continue
        hyps = (Path(out_dir) / f"{prefix}_predictions.txt").read_text(encoding="utf-8").split("\n")[:-1]
        refs = [t for _, t in read_multi30k(MULTI30K, split)[:n]]
        assert len(hyps) == n
        assert res[f"{prefix}_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
        assert 0.0 <= res[f"{prefix}_token_accuracy"] <= 1.0
        want = teacher_forced_accuracy(out_dir, split, n, max_length)
        assert res[f"{prefix}_token_accuracy"] == pytest.approx(want, abs=1e-6)


def test_cli_pretrained_directory_with_clars(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                     unk_token="<unk>")
    pretrained = tmp_path / "pretrained"
    tiny_model(tok).save_pretrained(pretrained)
    hf_tok.save_pretrained(pretrained)
    res = run_cli(tmp_path, "--model_name_or_path", str(pretrained), "--optimizer", "clars", "--learning_rate",
                  "1.0", "--gradient_accumulation_steps", "2", "--max_steps", "3", "--mix", "sample",
                  "--mix_noise", "rademacher", "--test_bleu", "false")
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert math.isfinite(res["eval_bleu"]) and "test_bleu" not in res


@pytest.mark.parametrize("extra,error,match", [
    (["--optimizer", "adam"], ValueError, "--optimizer must be one of"),
    (["--mix", "layer"], ValueError, "--mix must be one of"),
    (["--mix", "device"], ValueError, "device-wise GradientMix .* >= 2"),
    (["--optimizer", "clars", "--gradient_accumulation_steps", "1"], ValueError, "gradient_accumulation_steps >= 2"),
])
def test_cli_refuses_bad_arguments(tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        run_cli(tmp_path, "--max_steps", "1", *extra)


def test_cli_messages_name_the_flag_and_failed_start_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model_name_or_path .*nowhere: no such directory"):
        run_cli(tmp_path, "--model_name_or_path", str(tmp_path / "nowhere"), "--max_steps", "1")
    with pytest.raises(ValueError, match="--model_options is not valid JSON"):
        run_cli(tmp_path, "--model_options", "{d_model: 64}", "--max_steps", "1")
    with pytest.raises(ValueError, match="--optim adamw_torch: lb_dist.finetune builds the optimizer from --optimizer"):
        run_cli(tmp_path, "--optim", "adamw_torch", "--max_steps", "1")
    # fails after the tokenizer was trained and saved: nothing may stay behind
    with pytest.raises(ValueError, match="no_such_option"):
        run_cli(tmp_path, "--model_options", json.dumps({**TINY, "no_such_option": 1}), "--max_steps", "1",
                out="failed")
    assert not (tmp_path / "failed").exists()


def test_cli_resume_refuses_changed_optimizer_lr_and_vocabulary(tmp_path):
    res = run_cli(tmp_path, "--optimizer", "lamb", "--learning_rate", "0.05", "--max_steps", "1",
                  "--save_strategy", "steps", "--save_steps", "1", "--test_bleu", "false", out="r")
    assert res["global_step"] == 1 and (tmp_path / "r" / "checkpoint-1").is_dir()
    for extra, flag in ((["--optimizer", "clars", "--learning_rate", "0.05", "--gradient_accumulation_steps", "2"],
                         "--optimizer"),
                        (["--learning_rate", "1.0"], "--learning_rate"),
                        (["--learning_rate", "0.05", "--vocab_size", "300"], "--vocab_size")):
        with pytest.raises(ValueError, match=f"{flag} .* differs from the run being resumed"):
            run_cli(tmp_path, *extra, "--max_steps", "2", "--save_strategy", "no", out="r")


def test_cli_resume_equals_uninterrupted_without_missing_key_warnings(tmp_path, capfd):
    """2 steps in one go versus 1 step, checkpoint, resume to 2 (LAMB + sample-wise mix), in one process
    (the model's initial weights must follow --seed, not the RNG left by the previous run): the same
    weights, and the resume does not report the tied and sinusoidal weights as missing."""
    from safetensors.torch import load_file

    common = ["--optimizer", "lamb", "--learning_rate", "0.05", "--mix", "sample", "--test_bleu", "false",
              "--lr_scheduler_type", "constant",
              "--model_options", json.dumps({**TINY, "dropout": 0.0})]
    run_cli(tmp_path, *common, "--max_steps", "2", out="whole")
    run_cli(tmp_path, *common, "--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1", out="parts")
    capfd.readouterr()
    res = run_cli(tmp_path, *common, "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", out="parts")
    assert res["global_step"] == 2
    assert "missing keys" not in capfd.readouterr().err
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    parts = load_file(tmp_path / "parts" / "model.safetensors")
    assert whole.keys() == parts.keys()
    for key in whole:
        torch.testing.assert_close(parts[key], whole[key], rtol=0, atol=0)


def test_cli_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        main(["--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o"), "--use_cpu"])


def test_ddp_sample_mix_gradient_and_clars_device_mix(tmp_path):
    """2 real processes (gloo): see tests/_worker_finetune.py."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from _worker_launch import launch

    launch("_worker_finetune.py", [str(tmp_path), str(MULTI30K)], nproc=2, timeout=240)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["sample_mix_rel_error"] < 1e-4
    assert result["last_update_micro_batches"] == 2  # one micro-batch per rank and step


# Evaluation sets of 13 pairs with 2 processes x eval batch 4: the Trainer pads them to 16.
N_EVAL = 13


def test_torchrun_module_evaluates_exactly_the_eval_set(tmp_path):
    """``torchrun --nproc_per_node 2 -m lb_dist.finetune --predict_with_generate`` on val/test sets of 13
    pairs (not a multiple of processes x batch = 8): BLEU and token accuracy over exactly those 13,
    BLEU equal to sacrebleu on the written predictions, token accuracy to the saved model's computed here."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _worker_launch import REPO, child_env, free_port

    out = tmp_path / "out"
    argv = ["--data_dir", str(MULTI30K), "--output_dir", str(out), "--max_train_samples", "64",
            "--max_eval_samples", str(N_EVAL), "--vocab_size", "200", "--model_options", json.dumps(TINY),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_steps", "2",
            "--optimizer", "lamb", "--learning_rate", "0.05", "--predict_with_generate", "--generation_max_length",
            "12", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu", "--max_length", "40",
            "--disable_tqdm", "true", "--report_to", "none", "--seed", "0", "--dataloader_num_workers", "0"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), "-m", "lb_dist.finetune", *argv], cwd=str(REPO), env=child_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:]
    res = json.loads((out / "results.json").read_text())
    assert res["global_step"] == 2
    check_translation_metrics(out, res, n_eval=N_EVAL, n_test=N_EVAL, max_length=40)


@pytest.mark.parametrize("flags,config,match", [
    ({"optimizer": "clars"}, {}, "--optimizer 'clars': with --deepspeed the DeepSpeed config decides"),
    ({"_given": {"optimizer"}}, {}, "--optimizer 'lamb': with --deepspeed"),        # the default, but given
    ({"_given": {"mix"}}, {}, "--mix 'none': with --deepspeed"),
    ({"_given": {"optim"}}, {"optimizer": {"type": "LAMB"}}, "--optim .*optimizer section"),
    ({"_given": {"max_grad_norm"}}, {"gradient_clipping": 0.0}, "--max_grad_norm 1.0 disagrees with gradient_clipping"),
    ({"mix": "device"}, {}, "--mix 'device': with --deepspeed"),
    ({}, {"gradient_mix": {"granularity": "sample"}}, "gradient_mix.granularity \"sample\""),
    ({}, {"optimizer": {"type": "CLARS", "second_moments": {"source": "per_sample"}}}, "per_sample"),
])
def test_deepspeed_refuses_what_the_config_decides_or_cannot_feed(tmp_path, flags, config, match):
    """Checked before any process group or engine exists (the arguments' dataclass and a config file)."""
    from types import SimpleNamespace

    from lb_dist.finetune import FinetuneArguments, prepare_deepspeed

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    given = flags.pop("_given", None)
    fa = FinetuneArguments(data_dir=str(MULTI30K), **flags)
    if given is not None:
        fa.given_flags = given
    with pytest.raises(ValueError, match=match):
        prepare_deepspeed(fa, SimpleNamespace(deepspeed=str(path), gradient_accumulation_steps=2, max_grad_norm=1.0,
                                               optim="adamw_torch"))


def test_deepspeed_gradient_clipping_number_sets_max_grad_norm(tmp_path):
    """The README's config ("gradient_clipping": 0.0) under HF: max_grad_norm takes the config's value and
    transformers' recorded mismatch is dropped (the launcher test below runs it for real)."""
    from types import SimpleNamespace

    from lb_dist.finetune import FinetuneArguments, prepare_deepspeed

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"gradient_clipping": 0.0}))
    fa = FinetuneArguments(data_dir=str(MULTI30K))
    fa.given_flags = {"data_dir", "deepspeed"}
    hf = SimpleNamespace(mismatches=["- ds gradient_clipping=0.0 vs hf max_grad_norm=1.0"])
    ta = SimpleNamespace(deepspeed=str(path), gradient_accumulation_steps=1, max_grad_norm=1.0, hf_deepspeed_config=hf)
    prepare_deepspeed(fa, ta)
    assert ta.max_grad_norm == 0.0 and hf.mismatches == []


def test_deepspeed_launcher_clars_gradient_mix(tmp_path):
    """``deepspeed --num_gpus 2 --module lb_dist.finetune --deepspeed ds.json``: the Trainer builds
    lb_dist's engine through register(): ZeRO-aware CLARS from the config (ZeRO-2, micro-batch S_k from
    the 2 processes' micro-batches), device-wise gradient_mix, "auto" values from the Trainer; the
    config's "gradient_clipping": 0.0 as the README writes it; --predict_with_generate on 13 pairs."""
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _worker_launch import REPO, child_env, free_port

    pytest.importorskip("deepspeed")
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("the deepspeed launcher is not installed")
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "train_batch_size": "auto", "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 2},
              "optimizer": {"type": "CLARS", "params": {"lr": "auto", "weight_decay": "auto", "eta": 0.01}},
              "gradient_mix": {"noise": "gaussian", "std": 0.25, "seed": 0}}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = ["--deepspeed", str(tmp_path / "ds.json"), "--data_dir", str(MULTI30K), "--output_dir", str(out),
            "--max_train_samples", "64", "--vocab_size", "200", "--model_options", json.dumps(TINY),
            "--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "0.5",
            "--weight_decay", "1e-4", "--logging_steps", "1", "--save_strategy", "no", "--use_cpu",
            "--max_length", "40", "--disable_tqdm", "true", "--report_to", "none", "--seed", "0",
            "--dataloader_num_workers", "0", "--test_bleu", "false", "--predict_with_generate",
            "--max_eval_samples", str(N_EVAL), "--per_device_eval_batch_size", "4", "--generation_max_length", "12"]
    env = {**child_env(), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                           "lb_dist.finetune", *argv], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-6000:]
    res = json.loads((out / "results.json").read_text())
    ds = res["deepspeed"]
    assert ds["engine"].startswith("LbDist") and ds["optimizer"] == "ZeROCLARS" and ds["zero_stage"] == 2
    assert ds["world_size"] == 2 and ds["mix_step"] == res["global_step"] == 3
    assert ds["estimator_updates"] == [3]   # one micro-batch estimate per optimizer step
    assert math.isfinite(res["train_loss"]) and res["train_loss"] > 0
    # the README's "gradient_clipping": 0.0 as written (no --max_grad_norm), and evaluation of exactly 13 pairs
    check_translation_metrics(out, res, n_eval=N_EVAL, max_length=40)

"""lb-dist plot: figures from metrics.jsonl files written by hand in the documented schema."""
import json

import pytest

from lb_dist.cli import main as cli_main
from lb_dist.plot import load_run, plot_runs

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(d, *, layers=True, bleu=False, epochs=3, spe=4):
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"steps_per_epoch": spe}))
    lines = []
    for step in range(1, epochs * spe + 1):
        rec = {"kind": "step", "step": step, "epoch": (step - 1) // spe, "time": step * 0.1, "lr": 0.1,
               "loss": 2.0 / step, "skipped": False}
        if layers:
            rec["trust_ratio"] = {"conv.weight": 0.01 * step, "fc.weight": 0.02}
            rec["variance_factor"] = {"conv.weight": 100.0 / step, "fc.weight": None}
        lines.append(rec)
        if step % spe == 0:
            e = {"kind": "epoch", "step": step, "epoch": step // spe - 1, "time": step * 0.1,
                 "train_loss": 2.0 / step, "test_loss": 2.5 / step}
            e.update({"test_token_accuracy": 0.1 * step / spe, "test_bleu": 3.0 * step / spe} if bleu
                     else {"test_top1": 0.2 * step / spe, "test_top5": 0.5})
            lines.append(e)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "st')  # torn tail
    return d


def test_figures_for_image_runs(tmp_path):
    a = write_run(tmp_path / "a")
    b = write_run(tmp_path / "b", layers=False)
    written = plot_runs([a, b], tmp_path / "out", labels=["clars", "lars"])
    assert sorted(p.name for p in written) == ["curves.png", "trust_ratio.png", "variance_factor.png"]
    for p in written:
        assert p.read_bytes()[:8] == PNG
    run = load_run(a)
    assert len(run.steps) == 12 and len(run.epochs) == 3 and run.steps_per_epoch == 4


def test_no_layer_figures_without_layer_stats_and_translation_panels(tmp_path, capsys):
    a = write_run(tmp_path / "a", layers=False, bleu=True)
    assert cli_main(["plot", str(a), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[1] for p in printed] == ["curves.png"]


def test_errors_name_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["plot", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert f"{tmp_path / 'missing' / 'metrics.jsonl'}: no metrics file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no metrics record"):
        load_run(tmp_path / "empty")
    a = write_run(tmp_path / "a")
    with pytest.raises(ValueError, match="--labels gives 2 labels for 1 run"):
        plot_runs([a], tmp_path / "o", labels=["x", "y"])
    assert cli_main(["frobnicate"]) == 2

"""RunLogger: metrics.jsonl on fresh and resumed runs, nothing off the main process, plot.png and
TensorBoard events."""

import json
import sys

import pytest

from ramda_ds.training.run_logger import RunLogger


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def fresh_run(out, steps=5, **kw):
    lg = RunLogger(out, total_steps=steps, is_main=True, **kw)
    lg.setup({"event": "setup", "world_size": 1})
    for s in range(1, steps + 1):
        lg.advance()
        lg.log({"step": s, "loss": 5.0 / s, "valid_ppl": 200.0 / s, "wgs": s / 10})
    return lg


def test_fresh_run_truncates_and_writes_one_json_per_line(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    lg = fresh_run(out)
    assert [r.get("step") for r in rows(out)] == [None, 1, 2, 3, 4, 5]  # flushed before close
    lg.close()
    got = rows(out)
    assert got[0] == {"event": "setup", "world_size": 1}
    assert got[3] == {"step": 3, "loss": 5.0 / 3, "valid_ppl": 200.0 / 3, "wgs": 0.3}


def test_resume_drops_later_rows_and_appends(tmp_path):
    out = tmp_path / "o"
    lg = fresh_run(out, plot=False)
    lg.close()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # cut off by a crash
    lg = RunLogger(out, total_steps=5, is_main=True, start_step=3, plot=False)
    lg.resume(3)
    assert [r.get("step") for r in rows(out)] == [None, 1, 2, 3]
    lg.setup({"event": "setup", "world_size": 2})  # resuming: appended, old rows kept
    lg.log({"step": 4, "loss": 0.5})
    lg.close()
    got = rows(out)
    assert [r.get("step") for r in got] == [None, 1, 2, 3, None, 4]
    assert got[0]["world_size"] == 1 and got[4]["world_size"] == 2 and got[5]["loss"] == 0.5
    assert not list(out.glob("*.tmp"))


def test_non_main_process_writes_and_prints_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    lg = RunLogger(out, total_steps=5, is_main=False)
    lg.setup({"event": "setup"})
    lg.resume(2)
    lg.log({"step": 3, "loss": 1.0, "valid_ppl": 10.0, "wgs": 0.5})
    lg.advance()
    lg.message("hello")
    lg.close()
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr() == ("", "")


def test_message_goes_to_stdout_and_bar_to_stderr(tmp_path, capsys):
    lg = RunLogger(tmp_path, total_steps=5, is_main=True, tensorboard=False, plot=False)
    lg.advance(2)
    lg.message('{"summary": 1}')
    lg.close()
    outerr = capsys.readouterr()
    assert outerr.out == '{"summary": 1}\n'
    assert "2/5" in outerr.err


def test_close_writes_png_once(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "o"
    lg = fresh_run(out)
    lg.log({"step": 6, "loss": 0.7})  # rows may miss keys
    lg.close()
    png = (out / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    (out / "plot.png").unlink()
    lg.close()  # idempotent: no second plot, no error
    lg.log({"step": 7, "loss": 0.1})
    assert not (out / "plot.png").exists() and rows(out)[-1]["step"] == 6


def test_plots_label_both_models_restarts_and_units(tmp_path):
    """plot.png: both models, restart markers, title from the setup row; plot_units.png: the heat
    map of units kept per tensor (of Ŵ when present)."""
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = tmp_path / "o"
    lg = RunLogger(out, total_steps=4, is_main=True, tensorboard=False)
    lg.setup({"event": "setup", "optimizer": "ramda", "lam": 1e-4, "model": "/m/tiny-llama",
              "milestones": [2], "backend": "single", "world_size": 1})
    for s in range(1, 5):
        lg.log({"step": s, "loss": 5.0 / s, "valid_ppl_structured": 300.0 / s,
                "valid_ppl_W": 200.0 / s, "wgs_structured": 0.5, "wgs_W": 0.1 * s,
                "layer_sparsity_structured": {"layers.0.w": 0.5, "layers.10.w": 0.25 * (s % 2)},
                "W_is_structured": s == 4})
    lg.close()
    units = matplotlib.image.imread(out / "plot_units.png")
    assert units.shape[0] > 100 and units.shape[1] > 100
    plot = matplotlib.image.imread(out / "plot.png")
    assert plot.shape[1] > 3 * plot.shape[0]  # three panels side by side


def test_bar_shows_labelled_models(tmp_path, capsys):
    lg = RunLogger(tmp_path, total_steps=2, is_main=True, tensorboard=False, plot=False)
    lg.log({"step": 1, "valid_ppl_structured": 12.5, "valid_ppl_W": 10.25, "wgs_structured": 0.5,
            "wgs_W": 0.0, "W_is_structured": False})
    lg.advance()
    lg.close()
    err = capsys.readouterr().err
    assert "ppl(Ŵ)=12.5" in err and "ppl(W)=10.2" in err and "wgs(Ŵ)=0.5" in err
    assert "W_is_structured" not in err


def test_close_without_matplotlib_skips_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    out = tmp_path / "o"
    fresh_run(out, tensorboard=False).close()
    assert not (out / "plot.png").exists() and len(rows(out)) == 6
    assert "matplotlib not installed" in capsys.readouterr().err


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    fresh_run(out, plot=False).close()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"loss", "valid_ppl", "wgs"}
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("wgs")] == \
        [(s, s / 10) for s in range(1, 6)]


def test_tensorboard_disabled_writes_no_events(tmp_path):
    out = tmp_path / "o"
    fresh_run(out, tensorboard=False, plot=False).close()
    assert not (out / "tb").exists()


def test_tensorboard_hides_old_events_after_resume_step(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "o"
    fresh_run(out, plot=False).close()
    lg = RunLogger(out, total_steps=5, is_main=True, start_step=3, plot=False)
    lg.resume(3)
    lg.log({"step": 4, "wgs": 0.9})
    lg.close()
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("wgs")] == \
        [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.9)]

"""Randomized-ablation training (--drop ablate) and the certify command."""
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import another_model, tiny_config
from dropjax import certification, certify, cli, evaluation, files, intervals, plots
from dropjax.config import from_preset
from dropjax.data.datasets import DATASETS
from dropjax.evaluation import protocol
from dropjax.evaluation import store as store_lib
from dropjax.evaluation.store import TIMING_FILE, SettingStore
from dropjax.training import checkpoint as ckpt_lib
from dropjax.training import loop, state as state_lib, step as step_lib

KEY = jax.random.PRNGKey(0)


def small(**kw):
  """A fast certification: few samples, small passes."""
  base = dict(n0=20, n=200, samples_per_pass=20, num_examples=12, batch_size=4, alpha=0.05)
  base.update(kw)
  return certification.CertifyRunConfig(**base).validate()


@pytest.fixture(scope="module")
def ablation_workdir(tiny_data_dir, tmp_path_factory):
  """A tiny ResNet trained by ablation (k = 300 of 1024 pixels, doubled encoding)."""
  wd = str(tmp_path_factory.mktemp("ablate"))
  cfg = tiny_config(tiny_data_dir, drop="ablate", keep=300, input_encoding="doubled",
                    epochs=3, eval_every_epochs=0)
  result = loop.train(cfg, wd, progress=False)
  assert result["finished"]
  return wd


def test_ablation_training_sees_exactly_k_pixels_fresh_each_step():
  cfg = from_preset(None, drop="ablate", keep=20, crop_pad=0, input_encoding="doubled")
  rng = np.random.RandomState(0)
  batch = {"image": rng.randint(1, 256, (64, 8, 8, 3)).astype(np.uint8),
           "label": np.zeros(64, np.int32), "index": np.arange(64, dtype=np.int32)}
  x, xd, m, _ = step_lib.prepare_inputs(cfg, KEY, jnp.int32(3), batch)
  m = np.asarray(m)
  np.testing.assert_array_equal(m[..., 0].sum((1, 2)), 20)  # exactly k pixels per image
  np.testing.assert_array_equal(m, np.broadcast_to(m[..., :1], m.shape))  # whole pixels
  np.testing.assert_array_equal(np.asarray(xd), np.asarray(x) * m)
  assert len({m[i].tobytes() for i in range(64)}) == 64  # a subset per image
  _, _, m4, _ = step_lib.prepare_inputs(cfg, KEY, jnp.int32(4), batch)
  assert not np.array_equal(m, np.asarray(m4))  # and per step


def test_doubled_model_trains_on_the_mask(ablation_workdir):
  cfg = ckpt_lib.load_config(ablation_workdir)
  assert cfg.drop == "ablate" and cfg.input_encoding == "doubled" and cfg.model_takes_mask
  model = state_lib.make_model(cfg, 43)  # the GTSRB head, whatever the tiny labels
  template = state_lib.create_state(KEY, model, state_lib.make_optimizer(cfg, 1), (32, 32, 3))
  ck = ckpt_lib.Checkpointer(ablation_workdir)
  state = ck.restore(template)
  ck.close()
  assert state.params["stem"]["kernel"].shape[2] == 6
  # The gradient of the train step reaches the stem's second half (the [1 - v]
  # channels), which only the doubled encoding feeds.
  tx = state_lib.make_optimizer(cfg, 10)
  train_step = jax.jit(step_lib.make_train_step(cfg, model, tx))
  rng = np.random.RandomState(1)
  batch = {"image": rng.randint(0, 256, (8, 32, 32, 3)).astype(np.uint8),
           "label": rng.randint(0, 4, 8).astype(np.int32), "index": np.arange(8, dtype=np.int32)}
  new, _ = train_step(state, batch, KEY)
  moved = np.abs(np.asarray(new.params["stem"]["kernel"] - state.params["stem"]["kernel"]))
  assert moved[:, :, 3:].max() > 0


def test_mean_encoding_trains_and_certifies(tiny_data_dir, tmp_path):
  """--input_encoding mean: the run's model fills ablated pixels with the
  dataset's mean (in X units), trains on the mask and is certified like any
  ablation model; its workdir is refused by the pixel-dropping evaluation."""
  cfg = tiny_config(tiny_data_dir, drop="ablate", keep=300, input_encoding="mean",
                    epochs=1, eval_every_epochs=0)
  assert cfg.model_takes_mask
  mean = np.array(DATASETS[cfg.dataset].channel_mean)
  np.testing.assert_allclose(cfg.input_fill, 2 * mean - 1)
  model = state_lib.make_model(cfg, 43)
  assert model.fill == cfg.input_fill
  wd = str(tmp_path / "mean")
  assert loop.train(cfg, wd, progress=False)["finished"]
  summary = certification.run(wd, small(num_examples=4), str(tmp_path / "cert"), progress=False)
  assert summary["input_encoding"] == "mean" and summary["keep"] == 300
  with pytest.raises(ValueError, match="mean input encoding"):
    protocol.evaluate(wd, evaluation.EvalConfig(norm="linf", num_examples=4), str(tmp_path / "ev"))


def test_encoding_is_part_of_the_architecture(ablation_workdir, tiny_data_dir):
  cfg = tiny_config(tiny_data_dir, drop="ablate", keep=300, input_encoding="values")
  with pytest.raises(ckpt_lib.CheckpointError, match="input_encoding"):
    loop.train(cfg, ablation_workdir, progress=False)


@pytest.mark.parametrize("kw,msg", [(dict(input_encoding="doubled"), "needs --drop ablate"),
                                    (dict(drop="ablate", keep=0), "keep must be"),
                                    (dict(input_encoding="mean"), "needs --drop ablate"),
                                    (dict(input_encoding="median"), "input_encoding must be"),
                                    (dict(drop="ablate", objective="uniform_original"),
                                     "not ablation")])
def test_bad_ablation_configs(kw, msg):
  with pytest.raises(ValueError, match=msg):
    from_preset(None, **kw)


def test_rows_complete_and_summary_is_their_aggregate(ablation_workdir, tmp_path):
  summary = certification.run(ablation_workdir, small(), str(tmp_path), progress=False)
  rows = files.read_jsonl(str(tmp_path / summary["setting"] / "rows.jsonl"))
  assert [r["index"] for r in rows] == list(range(12))
  assert summary["keep"] == 300  # the run's k
  for r in rows:
    assert r["votes_n"] == 200 and 0 <= r["votes_top"] <= 200
    assert r["abstained"] == (r["radius"] < 0) == (r["prediction"] < 0)
    assert r["correct"] == (r["prediction"] == r["label"])
    if not r["abstained"]:  # the radius is the bound's, recomputed independently
      p = certify.clopper_pearson_lower(r["votes_top"], 200, 0.05)
      assert r["p_lower"] == pytest.approx(p) and r["radius"] == certify.certified_radius(
          p, 1024, 300)
  want = certify.summarize(rows, (0, 1, 2, 5, 10))
  assert {k: summary[k] for k in want} == want


def test_rows_record_a_workdir_below_the_working_directory_relative(tmp_path, monkeypatch):
  (tmp_path / "pretrained" / "m").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  assert files.recorded_path("pretrained/m") == os.path.join("pretrained", "m")
  assert files.recorded_path(str(tmp_path / "pretrained" / "m")) == os.path.join("pretrained", "m")
  assert files.recorded_path("/elsewhere/run") == "/elsewhere/run"
  assert files.recorded_path(str(tmp_path) + "-other/run") == str(tmp_path) + "-other/run"


def test_resume_by_chunk_and_chunk_size_give_identical_rows(ablation_workdir, tmp_path, capsys):
  full = certification.run(ablation_workdir, small(), str(tmp_path / "a"), progress=False)
  assert certification.run(ablation_workdir, small(), str(tmp_path / "b"), progress=False,
                           stop_after_chunks=1) is None
  def chunks():
    return sorted(f for f in os.listdir(tmp_path / "b" / full["setting"])
                  if f.startswith("chunk_"))
  assert chunks() == ["chunk_00000.jsonl"]  # one chunk, no rows yet
  assert not os.path.exists(tmp_path / "b" / full["setting"] / "rows.jsonl")
  # --stop_at: a deadline already passed starts nothing; one sooner than the longest
  # chunk timed here starts nothing either (and says so); one far enough finishes.
  now = datetime.datetime.now()
  past = (now - datetime.timedelta(minutes=1)).isoformat(timespec="seconds")
  assert certification.run(ablation_workdir, small(stop_at=past), str(tmp_path / "b"),
                           progress=False) is None
  store = SettingStore(str(tmp_path / "b"), full["setting"])
  [first] = store.chunk_seconds()
  assert first > 0
  files.write_jsonl(os.path.join(store.directory, TIMING_FILE), [{"chunk": 0, "seconds": 7200.0}])
  soon = (now + datetime.timedelta(hours=1)).isoformat(timespec="seconds")
  assert certification.run(ablation_workdir, small(stop_at=soon), str(tmp_path / "b"),
                           progress=False) is None
  assert "chunk 1 of " + full["setting"] + " not started" in capsys.readouterr().err
  assert chunks() == ["chunk_00000.jsonl"]
  later = (now + datetime.timedelta(hours=3)).isoformat(timespec="seconds")
  resumed = certification.run(ablation_workdir, small(stop_at=later), str(tmp_path / "b"),
                              progress=False)
  assert len(store.chunk_seconds()) == 3  # the edited one, and chunks 1 and 2
  with pytest.raises(ValueError, match="ISO 8601"):
    small(stop_at="noon")
  other = certification.run(ablation_workdir, small(batch_size=5), str(tmp_path / "c"),
                            progress=False)
  rows = [files.read_jsonl(str(tmp_path / d / full["setting"] / "rows.jsonl"))
          for d in ("a", "b", "c")]
  assert rows[0] == rows[1] == rows[2]
  assert resumed["median_radius"] == full["median_radius"] == other["median_radius"]
  assert certification.setting_id(small(keep=300, seed=1), 1) != full["setting"]


def test_rows_from_takes_kept_rows_up_and_extends_them(ablation_workdir, tmp_path,
                                                         monkeypatch):
  """Rows kept as save_rows keeps them (rows, setting.json, timing) are taken up by
  --rows_from: nothing recomputed for the examples they hold, a larger
  --num_examples computes only the rest, with the rows of a run from scratch;
  rows of another samples_per_pass or another model are refused, a missing
  directory is an error."""
  full = certification.run(ablation_workdir, small(num_examples=16), str(tmp_path / "full"),
                           progress=False)
  sid = full["setting"]
  certification.run(ablation_workdir, small(), str(tmp_path / "a"), progress=False)
  kept = str(tmp_path / "kept")
  assert store_lib.keep_rows(str(tmp_path / "a"), kept) == [sid]
  store_lib.keep_records(str(tmp_path / "a"), kept)
  # all 12 kept: nothing to compute (stop_after_chunks=0 would stop at the first chunk run)
  same = certification.run(ablation_workdir, small(rows_from=kept), str(tmp_path / "b"),
                           progress=False, stop_after_chunks=0)
  assert same is not None and "seconds_this_run" not in same
  more = certification.run(ablation_workdir, small(num_examples=16, rows_from=kept),
                           str(tmp_path / "c"), progress=False)
  assert more["seconds_this_run"] > 0 and more["images_per_s"] * more["seconds_this_run"] == \
      pytest.approx(4)  # only the 13th to 16th image were certified here
  rows = lambda d: files.read_jsonl(str(tmp_path / d / sid / "rows.jsonl"))
  assert rows("c") == rows("full") and rows("b") == rows("full")[:12]
  with pytest.raises(ValueError, match="another configuration"):
    certification.run(ablation_workdir, small(samples_per_pass=10, rows_from=kept),
                      str(tmp_path / "d"), progress=False)
  with pytest.raises(FileNotFoundError, match="rows_from"):
    certification.run(ablation_workdir, small(rows_from=str(tmp_path / "none")),
                      str(tmp_path / "e"), progress=False)
  # Rows of the same setting on another model's variables are neither resumed nor taken up.
  monkeypatch.setattr(certification, "load_model", another_model(certification.load_model))
  with pytest.raises(ValueError, match="another model"):
    certification.run(ablation_workdir, small(), str(tmp_path / "a"), progress=False)
  with pytest.raises(ValueError, match="another model"):
    certification.run(ablation_workdir, small(rows_from=kept), str(tmp_path / "f"),
                      progress=False)


def test_paper_model_certified_with_zero_fill(tiny_workdir, tmp_path):
  """A pixel-dropping model (values encoding) is certified with the k it is given."""
  summary = certification.run(tiny_workdir, small(keep=500, num_examples=4), str(tmp_path),
                              progress=False)
  assert summary["keep"] == 500 and summary["train_drop"] == "fixed"
  assert summary["input_encoding"] == "values"


def test_certified_curve_and_plot(tmp_path):
  rows = [dict(radius=3, correct=True), dict(radius=0, correct=True),
          dict(radius=5, correct=False), dict(radius=-1, correct=False)]
  radii, acc = certification.certified_curve(rows)
  np.testing.assert_array_equal(radii, [0, 1, 2, 3])
  np.testing.assert_allclose(acc, [0.5, 0.25, 0.25, 0.25])
  from matplotlib.axes import Axes
  drawn, bands = {}, []
  orig_step, orig_fill = Axes.step, Axes.fill_between

  def spy(self, x, y, *a, **kw):
    drawn[kw.get("label")] = (np.asarray(x), np.asarray(y))
    return orig_step(self, x, y, *a, **kw)

  def spy_fill(self, x, lo, hi, *a, **kw):
    bands.append((np.asarray(lo), np.asarray(hi)))
    return orig_fill(self, x, lo, hi, *a, **kw)

  Axes.step, Axes.fill_between = spy, spy_fill
  try:
    paths = plots.plot_certified_accuracy({"m": rows}, str(tmp_path))
  finally:
    Axes.step, Axes.fill_between = orig_step, orig_fill
  assert sorted(os.path.basename(p) for p in paths) == ["certified_accuracy.png",
                                                        "certified_accuracy.svg"]
  np.testing.assert_allclose(drawn["m, 4 images"][1], acc)
  [(lo, hi)] = bands  # the 95% interval of each point over the 4 examples
  np.testing.assert_allclose(np.stack([lo, hi], 1), [intervals.wilson(a, 4) for a in acc])


def test_certify_cli_end_to_end_and_errors(ablation_workdir, tmp_path, capsys):
  out = str(tmp_path / "cli")
  args = ["--workdir", ablation_workdir, "--out", out, "--n0", "10", "--n", "40",
          "--samples_per_pass", "10", "--num_examples", "3", "--batch_size", "3",
          "--no_progress"]
  assert cli.certify_main(args) == 0
  printed = capsys.readouterr().out
  assert "certified_accuracy_r0=" in printed and "median_radius=" in printed
  assert os.path.isfile(os.path.join(out, "certified_accuracy.png"))
  assert os.path.isfile(os.path.join(out, "summary.jsonl"))
  # Rendering again from the rows with the plots command finds the setting.
  assert plots.certification_curves([out])
  assert cli.certify_main(args[:-1] + ["--keep", "2000", "--no_progress"]) == 2
  assert "exceeds the 1024 pixels" in capsys.readouterr().err
  assert cli.certify_main(["--workdir", str(tmp_path / "none"), "--no_progress"]) == 2
  # A doubled-encoding model is not a pixel-dropping defense: evaluate.py says so.
  assert cli.evaluate_main(["--workdir", ablation_workdir, "--norm", "none",
                            "--out", str(tmp_path / "ev"), "--no_progress"]) == 2
  assert "certify.py" in capsys.readouterr().err

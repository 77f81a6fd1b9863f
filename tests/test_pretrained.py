"""Packaged models (dropjax.pretrained): export, verified loading, and the committed ones."""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from dropjax import cli, pretrained
from dropjax.data import load_dataset
from dropjax.evaluation import load_model
from dropjax.training import checkpoint as ckpt_lib

COMMITTED = sorted(os.listdir(pretrained.REPO_DIR)) if os.path.isdir(pretrained.REPO_DIR) else []


@pytest.fixture(scope="module")
def packaged(tiny_workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pre") / "tiny")
  manifest = pretrained.export(pretrained.ExportConfig(workdir=tiny_workdir, out=out,
                                                       command="tiny", check_examples=20))
  return out, manifest


def test_export_writes_a_verified_loadable_model(packaged, tiny_workdir):
  out, manifest = packaged
  assert sorted(os.listdir(out)) == sorted([pretrained.VARIABLES_FILE, pretrained.MANIFEST_FILE,
                                            ckpt_lib.CONFIG_FILE, *pretrained.COPIED_FILES])
  assert manifest["sha256"] == pretrained.sha256(os.path.join(out, pretrained.VARIABLES_FILE))
  with open(os.path.join(tiny_workdir, "final_eval.json")) as f:
    final = json.load(f)
  assert manifest["test_accuracy_clean"] == final["test_accuracy_clean"]
  pre = pretrained.load(out)
  _, variables, logits_fn, data = load_model(tiny_workdir)
  x = jax.random.uniform(jax.random.PRNGKey(0), (4, 32, 32, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(pre.logits_fn(pre.variables, x), logits_fn(variables, x))
  n = manifest["check_examples"]
  assert pretrained.clean_accuracy(pre, data.test.x[:n], data.test.y[:n]) == \
      manifest["check_accuracy_clean"]


def test_evaluate_reads_a_packaged_model(packaged, tmp_path, capsys):
  out, _ = packaged
  assert cli.evaluate_main(["--workdir", out, "--norm", "none", "--num_examples", "8",
                            "--batch_size", "8", "--out", str(tmp_path / "ev"),
                            "--no_progress"]) == 0
  assert "clean_accuracy_avg=" in capsys.readouterr().out


def test_damaged_or_replaced_variables_are_an_error(packaged, tmp_path, capsys):
  import shutil
  src, _ = packaged
  out = str(tmp_path / "copy")
  shutil.copytree(src, out)
  path = os.path.join(out, pretrained.VARIABLES_FILE)
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[len(data) // 2] ^= 1
  with open(path, "wb") as f:
    f.write(bytes(data))
  with pytest.raises(ckpt_lib.CheckpointError, match="SHA-256"):
    pretrained.load(out)
  assert cli.evaluate_main(["--workdir", out, "--norm", "none", "--no_progress"]) == 2
  assert "damaged or was replaced" in capsys.readouterr().err
  with pytest.raises(FileNotFoundError, match="no packaged model"):
    pretrained.resolve("no-such-model")


def test_large_variables_are_written_in_parts_and_load_the_same(packaged, tiny_workdir,
                                                                 tmp_path, capsys):
  import shutil
  one, manifest = packaged
  out = str(tmp_path / "parts")
  size = os.path.getsize(os.path.join(one, pretrained.VARIABLES_FILE))
  kib = max(1, size // 1024 // 3)  # a tiny model's variables in at least three parts
  split = pretrained.export(pretrained.ExportConfig(workdir=tiny_workdir, out=out,
                                                    command="tiny", check_examples=20,
                                                    part_kib=kib))
  assert split["parts"] == -(-size // (kib * 1024)) >= 3
  paths = pretrained.variables_files(out, split)
  assert sorted(os.listdir(out)) == sorted([os.path.basename(p) for p in paths]
                                           + [pretrained.MANIFEST_FILE, ckpt_lib.CONFIG_FILE,
                                              *pretrained.COPIED_FILES])
  assert all(os.path.getsize(p) <= kib * 1024 for p in paths)
  assert (split["sha256"], split["bytes"]) == (manifest["sha256"], manifest["bytes"])
  assert split["check_accuracy_clean"] == manifest["check_accuracy_clean"]
  assert pretrained.is_packaged(out)
  a, b = pretrained.load(one), pretrained.load(out)
  jax.tree.map(np.testing.assert_array_equal, a.variables, b.variables)
  # Re-exported as one file, the parts are gone; a missing part is an error naming it.
  again = pretrained.export(pretrained.ExportConfig(workdir=tiny_workdir, out=out,
                                                    command="tiny", check_examples=20))
  assert "parts" not in again and pretrained.variables_files(out, again) == [
      os.path.join(out, pretrained.VARIABLES_FILE)]
  assert not [f for f in os.listdir(out) if ".part" in f]
  shutil.rmtree(out)
  pretrained.export(pretrained.ExportConfig(workdir=tiny_workdir, out=out, command="tiny",
                                            check_examples=20, part_kib=kib))
  os.remove(paths[1])
  with pytest.raises(ckpt_lib.CheckpointError, match="part001 not found"):
    pretrained.load(out)
  assert cli.evaluate_main(["--workdir", out, "--norm", "none", "--no_progress"]) == 2
  assert "part001 not found" in capsys.readouterr().err


def _fake_packaged(root, name: str, cfg) -> str:
  """A directory that passes for a packaged model of ``cfg`` as far as its recipe goes."""
  out = root / name
  out.mkdir(parents=True)
  ckpt_lib.save_config(str(out), cfg)
  (out / pretrained.MANIFEST_FILE).write_text(json.dumps({"name": name}))
  return str(out)


def test_packaged_models_are_found_by_their_recipe(tmp_path):
  from dropjax import config
  preset = config.from_preset("cifar10-resnet56-fixed")
  same = _fake_packaged(tmp_path, "b-same", preset.replace(
      data_dir="/elsewhere", source="local", eval_batch_size=250, keep_checkpoints=1,
      parallel="pmap", checkpoint_every=100, log_every=7))
  _fake_packaged(tmp_path, "c-other-wd", preset.replace(weight_decay=5e-4))
  _fake_packaged(tmp_path, "d-other-epochs", preset.replace(epochs=30))
  _fake_packaged(tmp_path, "e-random", config.from_preset("cifar10-resnet56-random"))
  broken = tmp_path / "a-broken"
  broken.mkdir()
  (broken / ckpt_lib.CONFIG_FILE).write_text("{not json")
  (broken / pretrained.MANIFEST_FILE).write_text("{}")
  (tmp_path / "f-no-manifest").mkdir()  # not a packaged model: no MANIFEST.json
  (tmp_path / "f-no-manifest" / ckpt_lib.CONFIG_FILE).write_text(preset.to_json())
  assert pretrained.trained_with(preset, str(tmp_path)) == [same]
  assert pretrained.trained_with(preset.replace(seed=1), str(tmp_path)) == []
  assert set(preset.to_dict()) - set(preset.recipe()) == set(config.EXECUTION_FIELDS)


def test_train_skips_a_recipe_that_is_packaged_already(tmp_path, monkeypatch, capsys):
  from dropjax import config
  monkeypatch.setattr(pretrained, "REPO_DIR", str(tmp_path / "pretrained"))
  found = _fake_packaged(tmp_path / "pretrained", "gtsrb-resnet20-fixed-copy",
                         config.from_preset("gtsrb-resnet20-fixed"))
  workdir = tmp_path / "run"
  assert cli.train_main(["--preset", "gtsrb-resnet20-fixed", "--workdir", str(workdir),
                         "--data_dir", str(tmp_path / "no-data"), "--skip_if_packaged"]) == 0
  assert f"packaged already as {found}" in capsys.readouterr().out
  assert not workdir.exists()  # nothing trained, nothing written
  # Another recipe is trained as asked (here: fails at once on the missing data).
  assert cli.train_main(["--preset", "gtsrb-resnet20-fixed", "--workdir", str(workdir),
                         "--data_dir", str(tmp_path / "no-data"), "--skip_if_packaged",
                         "--epochs", "29"]) == 2
  assert "packaged already" not in capsys.readouterr().out


def test_committed_models_exist():
  assert COMMITTED, f"no packaged models under {pretrained.REPO_DIR}"


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_model_loads_and_reproduces_its_accuracy(name, real_data_dir):
  pre = pretrained.load(name)
  m = pre.manifest
  paths = pretrained.variables_files(os.path.join(pretrained.REPO_DIR, name), m)
  assert m["sha256"] == hashlib.sha256(b"".join(open(p, "rb").read() for p in paths)).hexdigest()
  # The repository takes no file over 2 MB: larger variables come in parts.
  assert all(os.path.getsize(p) <= 2_000_000 for p in paths)
  data = load_dataset(pre.config.dataset, source="local", data_dir=real_data_dir,
                      val_size=pre.config.val_size, seed=pre.config.seed)
  n = m["check_examples"]
  acc = pretrained.clean_accuracy(pre, data.test.x[:n], data.test.y[:n])
  # Same weights, same images: equal up to a prediction at a float-rounding margin
  # (another CPU's kernels sum in another order).
  assert abs(acc - m["check_accuracy_clean"]) <= 2 / n, (acc, m["check_accuracy_clean"])

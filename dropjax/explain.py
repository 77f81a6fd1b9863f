"""Interpretability: input-gradient maps and first-layer filters (Figs. 3, 4).

Explanation map ``E(X) = |∂F_y / ∂X|``: the absolute gradient of the true
class's **logit** ``F_y`` (the logit rather than the probability, so maps are
not flattened by softmax saturation on confident inputs) with respect to the
input, for images ``(B, H, W, C)`` in [-1, 1].  The paper's four maps for a
mask ``M`` and ``X' = X∘M``: ``E(X)``, ``E(X')``, ``E(X')∘M`` and
``E(X')∘(1 - M)``.  :func:`gradient_mass` quantifies the figure: the share of
``E(X')``'s total mass that falls on kept pixels.

    python -m dropjax.explain --workdirs runs/normal runs/fixed runs/random --out figures/

writes ``gradients.{png,svg}``, ``filters.{png,svg}`` and ``gradient_mass.jsonl``
(one row per model).
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dropjax import files, masks
from dropjax.plots import new_figure, save_figure

Array = jax.Array


def input_gradient(logits_fn: Callable, variables, x: Array, y: Array) -> Array:
  """``|∂ logit_y / ∂x|`` per example: (B, H, W, C) float32, >= 0."""
  def true_logit_sum(xx):
    z = logits_fn(variables, xx)
    return jnp.sum(jnp.take_along_axis(z, y[:, None].astype(jnp.int32), -1))

  return jnp.abs(jax.grad(true_logit_sum)(x.astype(jnp.float32)))


def four_maps(key: Array, logits_fn: Callable, variables, x: Array, y: Array, rate,
              per_pixel: bool = False) -> dict[str, Array]:
  """``{"mask", "x_dropped", "E(X)", "E(X')", "E(X')*M", "E(X')*(1-M)"}``."""
  m = masks.spec_mask(key, masks.DropSpec.fixed(rate, per_pixel), x.shape)
  xd = x * m
  e_x = input_gradient(logits_fn, variables, x, y)
  e_xd = input_gradient(logits_fn, variables, xd, y)
  return {"mask": m, "x_dropped": xd, "E(X)": e_x, "E(X')": e_xd,
          "E(X')*M": e_xd * m, "E(X')*(1-M)": e_xd * (1 - m)}


def gradient_mass(maps: dict[str, Array]) -> dict[str, Array]:
  """Per-example share of ``E(X')`` on kept pixels, and the kept share of pixels."""
  total = jnp.sum(maps["E(X')"], axis=(1, 2, 3)) + 1e-30
  return {"kept_mass_fraction": jnp.sum(maps["E(X')*M"], axis=(1, 2, 3)) / total,
          "kept_pixel_fraction": jnp.mean(maps["mask"], axis=(1, 2, 3))}


def first_layer_filters(variables) -> np.ndarray:
  """The stem's (3, 3, 3, 16) kernel as 16 RGB tiles, each scaled to [0, 1]."""
  k = np.asarray(variables["params"]["stem"]["kernel"], np.float64)  # (3, 3, in, out)
  tiles = np.moveaxis(k, -1, 0)  # (16, 3, 3, 3)
  lo = tiles.min(axis=(1, 2, 3), keepdims=True)
  hi = tiles.max(axis=(1, 2, 3), keepdims=True)
  return (tiles - lo) / np.maximum(hi - lo, 1e-12)


def _to_image(x: np.ndarray) -> np.ndarray:
  return np.clip((np.asarray(x) + 1) / 2, 0, 1)


def _heat(e: np.ndarray) -> np.ndarray:
  e = np.asarray(e).sum(-1)
  return e / max(float(e.max()), 1e-12)


def plot_gradients(models: list[tuple[str, dict]], out_dir: str, name: str = "gradients"):
  """One block of rows per model; columns X, X', E(X), E(X'), E(X')∘M, E(X')∘(1-M)."""
  cols = ["X", "X'", "E(X)", "E(X')", "E(X')*M", "E(X')*(1-M)"]
  n_img = models[0][1]["x"].shape[0]
  fig, axes = new_figure(len(models) * n_img, len(cols),
                         figsize=(1.6 * len(cols), 1.6 * len(models) * n_img), squeeze=False)
  for mi, (label, m) in enumerate(models):
    for i in range(n_img):
      row = axes[mi * n_img + i]
      row[0].imshow(_to_image(m["x"][i]))
      row[1].imshow(_to_image(m["x_dropped"][i]))
      vmax = float(np.asarray(m["E(X')"][i]).sum(-1).max()) or 1.0
      row[2].imshow(_heat(m["E(X)"][i]), cmap="inferno")
      for j, key in enumerate(cols[3:], start=3):
        row[j].imshow(np.asarray(m[key][i]).sum(-1) / vmax, cmap="inferno", vmin=0, vmax=1)
      row[0].set_ylabel(label if i == 0 else "", fontsize=6)
      for ax in row:
        ax.set_xticks([])
        ax.set_yticks([])
  for j, c in enumerate(cols):
    axes[0][j].set_title(c, fontsize=8)
  return save_figure(fig, out_dir, name)


def plot_filters(models: list[tuple[str, np.ndarray]], out_dir: str, name: str = "filters"):
  """Per model a grid (8 per row) of the first-layer 3x3 RGB filters (16 in ResNets)."""
  n = max(t.shape[0] for _, t in models)
  cols, rows = min(8, n), -(-n // 8)
  fig, axes = new_figure(rows, cols * len(models),
                         figsize=(1.0 * cols * len(models), 1.2 * rows + 0.4), squeeze=False)
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.axis("off")
  for mi, (label, tiles) in enumerate(models):
    for f in range(tiles.shape[0]):
      ax = axes[f // cols][mi * cols + f % cols]
      ax.axis("on")
      ax.imshow(tiles[f], interpolation="nearest")
    axes[0][mi * cols].set_title(label, fontsize=8, loc="left")
  return save_figure(fig, out_dir, name)


def explain_workdirs(workdirs: list[str], out_dir: str, *, drop_rate: float = 0.9,
                     num_images: int = 4, num_examples: int = 500, batch_size: int = 100,
                     seed: int = 0, data_dir: str | None = None) -> list[str]:
  """Figures 3 and 4 and the gradient-mass rows for several trained runs."""
  from dropjax import evaluation, inference  # pylint: disable=g-import-not-at-top
  from dropjax.data import augment  # pylint: disable=g-import-not-at-top
  key = jax.random.PRNGKey(seed)
  grad_models, filter_models, rows = [], [], []
  for wd in workdirs:
    cfg, variables, logits_fn, data = evaluation.load_model(wd, data_dir)
    label = f"{os.path.basename(os.path.normpath(wd))} ({cfg.drop})"
    maps_fn = jax.jit(lambda k, x, y: four_maps(k, logits_fn, variables, x, y, drop_rate,
                                                cfg.per_pixel))
    test = data.test.take(num_examples)

    def batch_mass(b):
      maps = maps_fn(jax.random.fold_in(key, int(b["index"][0])),
                     augment.to_float(jnp.asarray(b["image"])), jnp.asarray(b["label"]))
      return gradient_mass(maps)

    mass = inference.map_batches(batch_mass, {"image": test.x, "label": test.y}, batch_size)
    rows.append({"workdir": files.recorded_path(wd), "train_drop": cfg.drop,
                 "drop_rate": drop_rate, "num_examples": len(test),
                 "kept_mass_fraction": float(mass["kept_mass_fraction"].mean()),
                 "kept_pixel_fraction": float(mass["kept_pixel_fraction"].mean())})
    x = augment.to_float(jnp.asarray(test.x[:num_images]))
    maps = maps_fn(key, x, jnp.asarray(test.y[:num_images]))
    grad_models.append((label, {"x": x, **maps}))
    filter_models.append((label, first_layer_filters(variables)))
  os.makedirs(out_dir, exist_ok=True)
  paths = plot_gradients(grad_models, out_dir) + plot_filters(filter_models, out_dir)
  rows_path = os.path.join(out_dir, "gradient_mass.jsonl")
  files.write_jsonl(rows_path, rows)
  return paths + [rows_path]


def _f(default, help_text: str, **kw):
  return dataclasses.field(default=default, metadata={"help": help_text, **kw})


@dataclasses.dataclass
class ExplainConfig:
  """``python -m dropjax.explain`` (every field a flag)."""
  workdirs: tuple = _f((), "training runs to compare (e.g. normal, fixed r=0.9, random r)",
                       required=True)
  out: str = _f("figures", "output directory")
  drop_rate: float = _f(0.9, "drop rate r of the mask M in X' = X∘M")
  num_images: int = _f(4, "images shown per model")
  num_examples: int = _f(500, "test examples averaged for gradient_mass.jsonl")
  batch_size: int = _f(100, "batch size (examples)")
  seed: int = _f(0, "seed of the masks")
  data_dir: str | None = _f(None, "override the runs' data dir")

  def validate(self) -> "ExplainConfig":
    if not 0 <= self.drop_rate <= 1:
      raise ValueError(f"drop_rate must be in [0, 1], got {self.drop_rate}")
    if min(self.num_images, self.num_examples, self.batch_size) < 1:
      raise ValueError("num_images, num_examples and batch_size must be >= 1")
    return self


def run(cfg: ExplainConfig) -> int:
  for path in explain_workdirs(list(cfg.workdirs), cfg.out, drop_rate=cfg.drop_rate,
                               num_images=cfg.num_images, num_examples=cfg.num_examples,
                               batch_size=cfg.batch_size, seed=cfg.seed,
                               data_dir=cfg.data_dir):
    print(path)
  return 0


def main(argv=None) -> int:
  from dropjax import backend, cli  # pylint: disable=g-import-not-at-top
  backend.configure_process()
  return cli.run_command("python -m dropjax.explain", __doc__, ExplainConfig, run, argv)


if __name__ == "__main__":
  sys.exit(main())

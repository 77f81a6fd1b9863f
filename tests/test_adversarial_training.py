"""PGD adversarial training (Madry et al. 2018), the baseline of pixel dropping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from dropjax import plots, units
from dropjax.attacks import norms
from dropjax.config import TrainConfig, from_preset
from dropjax.evaluation import EvalConfig, evaluate
from dropjax.objectives import cross_entropy
from dropjax.training import loop, parallel, state as state_lib, step as step_lib
from test_training import fixed_batch, make_step, tree_equal

ADV = dict(drop="none", adv_training="pgd", adv_eps=16 / 255, adv_steps=3)


def reference_adversary(model, variables, x, y, keys, cfg):
  """An independent PGD loop: per-example random starts from ``keys``, sign
  steps of the train-mode model's summed CE, projection and box clip."""
  eps = units.to_x_units(cfg.adv_eps, cfg.budget_reading)
  step = units.to_x_units(cfg.adv_step, cfg.budget_reading)
  starts = [norms.random_start(k, x[i:i + 1], "linf", eps)[0] for i, k in enumerate(keys)]
  xa = jnp.stack(starts)

  def loss(v):
    logits, _ = model.apply(variables, v, train=True, mutable=["batch_stats"])
    return jnp.sum(cross_entropy(logits, y))

  grad = jax.jit(jax.grad(loss))
  for _ in range(cfg.adv_steps):
    xa = xa + step * jnp.sign(grad(xa))
    xa = jnp.clip(jnp.clip(xa, x - eps, x + eps), -1.0, 1.0)
  return xa, loss


def test_adversary_is_madry_pgd_on_the_training_mode_model():
  cfg = TrainConfig(depth=8, width=4, crop_pad=0, **ADV).validate()
  assert cfg.adv_step == pytest.approx(2.5 * cfg.adv_eps / cfg.adv_steps)
  model = state_lib.make_model(cfg, 4)
  tx = state_lib.make_optimizer(cfg, 10)
  state = state_lib.create_state(jax.random.PRNGKey(0), model, tx, (8, 8, 3))
  batch = fixed_batch(n=12)
  x, _, _, keys = step_lib.prepare_inputs(cfg, jax.random.PRNGKey(1), jnp.int32(0), batch)
  y = jnp.asarray(batch["label"])
  adversary = jax.jit(step_lib.make_adversary(cfg, model))
  x_adv = adversary(state.variables, x, y, keys)
  ref, loss = reference_adversary(model, state.variables, x, y, keys, cfg)
  np.testing.assert_allclose(x_adv, ref, atol=1e-5)
  eps = cfg.adv_eps  # literal reading: X units
  assert float(jnp.max(jnp.abs(x_adv - x))) <= eps + 1e-6
  assert float(jnp.min(x_adv)) >= -1 and float(jnp.max(x_adv)) <= 1
  assert float(loss(x_adv)) > float(loss(x))  # the attack raises the training loss
  # Deterministic under the keys; other keys give other starts.
  np.testing.assert_array_equal(adversary(state.variables, x, y, keys), x_adv)
  other = adversary(state.variables, x, y, jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))
  assert not np.array_equal(other, x_adv)


def test_adversarial_step_trains_on_the_attack_and_jit_equals_pmap():
  cfg = TrainConfig(depth=8, width=4, lr=0.05, **{**ADV, "adv_steps": 2}).validate()
  state, step = make_step(cfg)
  _, clean_step = make_step(cfg.replace(adv_training="none"))
  _, pstep = make_step(cfg, axis_name=parallel.PMAP_AXIS)
  key = jax.random.PRNGKey(3)
  s_clean, m_clean = jax.jit(clean_step)(state, fixed_batch(seed=0), key)
  jr, pr = parallel.JitRunner(step, 16), parallel.PmapRunner(pstep, 16)
  sj, sp = jr.put_state(state), pr.put_state(state)
  for i in range(2):
    b = fixed_batch(seed=i)
    sj, mj = jr.step(sj, jr.put_batch(b), key)
    sp, mp = pr.step(sp, pr.put_batch(b), key)
    np.testing.assert_allclose(mj["loss"], mp["loss"], rtol=1e-4)
    if i == 0:  # the same state and batch as the clean step: trained on the attack
      assert float(mj["loss"]) > float(m_clean["loss"])  # adversarial batch: higher loss
      assert not tree_equal(jr.host_state(sj).params, s_clean.params)
  for a, b in zip(jax.tree.leaves(jr.host_state(sj)), jax.tree.leaves(pr.host_state(sp))):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4)


def test_adversarial_training_resumes_exactly(tiny_data_dir, tmp_path):
  cfg = tiny_config(tiny_data_dir, checkpoint_every=3, eval_every_epochs=0, adv_steps=2,
                    **{k: v for k, v in ADV.items() if k != "adv_steps"})
  straight = loop.train(cfg, str(tmp_path / "a"), progress=False)
  loop.train(cfg, str(tmp_path / "b"), stop_after_steps=5, progress=False)
  resumed = loop.train(cfg, str(tmp_path / "b"), progress=False)
  assert straight["finished"] and resumed["finished"]
  assert tree_equal(straight["state"], resumed["state"])
  # Its evaluation rows name the training, so tables and figures do not call it "normal".
  [summary] = evaluate(str(tmp_path / "a"), EvalConfig(norm="none", num_examples=8,
                                                        batch_size=8), str(tmp_path / "ev"),
                       progress=False)
  assert (summary["train_adv_training"], summary["train_adv_norm"]) == ("pgd", "linf")
  assert plots.model_name(summary).endswith("(PGD-AT linf)")
  assert plots.model_name({**summary, "train_adv_training": "none"}).endswith("(normal)")


@pytest.mark.parametrize("kw,msg", [
    (dict(adv_training="pgd", drop="fixed"), "needs --drop none"),
    (dict(adv_training="fgsm"), "adv_training must be"),
    (dict(adv_training="pgd", adv_norm="l0"), "adv_norm must be"),
    (dict(adv_training="pgd", adv_steps=0), "adv_steps"),
    (dict(adv_training="pgd", adv_step_size=-1.0), "adv_step_size")])
def test_bad_adversarial_config_raises(kw, msg):
  with pytest.raises(ValueError, match=msg):
    TrainConfig(**{"drop": "none", **kw}).validate()


def test_adversarial_training_preset():
  c = from_preset("gtsrb-resnet20-pgd-at")
  assert (c.dataset, c.depth, c.drop, c.adv_training, c.adv_norm) == (
      "gtsrb", 20, "none", "pgd", "linf")
  assert c.adv_eps == pytest.approx(32 / 255) and c.budget_reading == "literal"

"""APGD (dropjax.attacks.apgd): the published schedule, budgets, EOT, determinism."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dropjax.attacks import AttackConfig, make_pgd
from dropjax.attacks import apgd
from dropjax.masks import DropSpec
from test_attacks import KEY, NUM_CLASSES, SHAPE, data, linear_logits, linear_model


def test_checkpoints_are_the_published_schedule():
  # N = 100: first interval 22, then 19, 16, 13, 10, 7, and 6 (the minimum) after that.
  assert apgd.checkpoints(100) == [21, 40, 56, 69, 79, 86, 92, 98]
  # N = 20: int(4.4) = 4, decrease max(int(0.6), 1) = 1, minimum max(int(1.2), 1) = 1.
  assert apgd.checkpoints(20) == [3, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
  # N = 1000: 220, 190, 160, 130, 100, 70, 60, 60, ...
  c = apgd.checkpoints(1000)
  assert np.diff([-1] + c).tolist() == [220, 190, 160, 130, 100, 70, 60, 60]  # 990 <= 1000


def constant_logits(variables, x):
  return jnp.zeros((x.shape[0], NUM_CLASSES)) + 0.0 * jnp.sum(x)


def test_step_size_halves_at_every_checkpoint_when_the_loss_never_rises():
  """A model whose loss is constant: the loss rises in none of an interval's
  steps (condition 1), so the step size is halved at every checkpoint."""
  x, y = data(3)
  cfg = apgd.APGDConfig(norm="linf", eps=0.1, num_steps=100, eot_samples=0)
  _, hist = jax.jit(apgd.make_apgd(constant_logits, cfg, trace=True))(KEY, None, x, y)
  eta = np.asarray(hist["eta"])[:, 0]
  want = np.full(100, 0.2)  # 2 eps, in units of X (literal reading)
  for c in apgd.checkpoints(100):
    want[c:] /= 2
  np.testing.assert_allclose(eta, want, rtol=1e-6)


def test_step_size_kept_while_the_loss_keeps_rising():
  """A linear model under a growing CE: the loss rises at almost every step of
  the first interval, so condition (1) does not fire there; condition (2) fires
  only once the best loss stalls."""
  x, y = data(4)
  cfg = apgd.APGDConfig(norm="l2", eps=5.0, num_steps=50, eot_samples=0, initial_step=0.05)
  _, hist = jax.jit(apgd.make_apgd(linear_logits, cfg, trace=True))(KEY, linear_model(), x, y)
  eta = np.asarray(hist["eta"])
  first = apgd.checkpoints(50)[0]
  np.testing.assert_allclose(eta[first], 0.05 * 5.0, rtol=1e-6)  # not halved
  best = np.asarray(hist["loss_best"])
  assert np.all(np.diff(best, axis=0) >= 0)  # the best loss never decreases


@pytest.mark.parametrize("norm,loss,targeted", [("linf", "ce", False), ("linf", "dlr", False),
                                                ("l2", "dlr", True), ("l2", "ce", True)])
def test_budget_box_and_success(norm, loss, targeted):
  x, y = data(16)
  eps = 0.3 if norm == "linf" else 3.0
  cfg = apgd.APGDConfig(norm=norm, eps=eps, num_steps=20, loss=loss, targeted=targeted,
                        eot_samples=3, drop=DropSpec.fixed(0.3))
  target = (y + 1) % NUM_CLASSES
  x_adv = jax.jit(apgd.make_apgd(linear_logits, cfg))(KEY, linear_model(), x, y,
                                                        target if targeted else None)
  d = np.asarray(x_adv - x).reshape(16, -1)
  size = np.abs(d).max(1) if norm == "linf" else np.sqrt((d ** 2).sum(1))
  assert size.max() <= eps * (1 + 1e-5) + 1e-6
  assert np.asarray(x_adv).min() >= -1 and np.asarray(x_adv).max() <= 1
  pred = np.asarray(jnp.argmax(linear_logits(linear_model(), x_adv), -1))
  if targeted:
    assert np.mean(pred == np.asarray(target)) > 0.5
  else:
    assert np.mean(pred != np.asarray(y)) > 0.5


def test_deterministic_under_a_key_and_not_weaker_than_pgd():
  x, y = data(32)
  v = linear_model()
  cfg = apgd.APGDConfig(norm="linf", eps=0.03, num_steps=20, loss="ce", eot_samples=0)
  attack = jax.jit(apgd.make_apgd(linear_logits, cfg))
  a, b = attack(KEY, v, x, y), attack(KEY, v, x, y)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, attack(jax.random.PRNGKey(9), v, x, y))
  pgd = jax.jit(make_pgd(linear_logits, AttackConfig(norm="linf", eps=0.03, step_size=0.0075,
                                                      num_steps=20, eot_samples=0)))
  ce = lambda z: -jax.nn.log_softmax(z)[jnp.arange(32), y]
  assert float(ce(linear_logits(v, a)).mean()) >= float(
      ce(linear_logits(v, pgd(KEY, v, x, y))).mean()) - 1e-4


def test_dlr_values():
  z = jnp.array([[3.0, 1.0, 0.0, -1.0]])
  # untargeted, y = 0: -(3 - 1) / (3 - 0)
  assert float(apgd.dlr(z, jnp.array([0]))[0]) == pytest.approx(-2 / 3)
  # targeted, y = 0, t = 1: -(3 - 1) / (3 - (0 + -1) / 2)
  assert float(apgd.dlr(z, jnp.array([0]), jnp.array([1]))[0]) == pytest.approx(-2 / 3.5)


def test_bad_configs():
  for kw, msg in [(dict(norm="l0"), "APGD supports"), (dict(loss="cw"), "unknown APGD loss"),
                  (dict(num_steps=0), "num_steps"), (dict(budget_reading="x"), "budget")]:
    with pytest.raises(ValueError, match=msg):
      apgd.APGDConfig(**kw).validate()
  with pytest.raises(ValueError, match="must lie in"):
    apgd.make_apgd(linear_logits, apgd.APGDConfig(num_steps=2))(
        KEY, linear_model(), jnp.full((2, *SHAPE), 3.0), jnp.zeros(2, jnp.int32))

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dropjax import masks
from dropjax.masks import DropSpec
from dropjax.attacks import AttackConfig, best_of, eot_gradient, make_pgd, paper_attack
from dropjax.attacks import losses, norms

KEY = jax.random.PRNGKey(0)
SHAPE = (8, 8, 3)
NUM_CLASSES = 4


def linear_logits(variables, x):
  """A linear model: the optimum of every attack is known in closed form."""
  return x.reshape(x.shape[0], -1) @ variables["w"] + variables["b"]


def linear_model(seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w": jax.random.normal(k1, (np.prod(SHAPE), NUM_CLASSES)) * 0.1,
          "b": jnp.zeros(NUM_CLASSES)}


def data(n, seed=1):
  x = jax.random.uniform(jax.random.PRNGKey(seed), (n, *SHAPE), minval=-1, maxval=1)
  y = jnp.argmax(linear_logits(linear_model(), x), -1)  # all correctly classified
  return x, y


def run(cfg, x, y, key=KEY, variables=None, **kw):
  attack = jax.jit(make_pgd(linear_logits, cfg))
  return attack(key, linear_model() if variables is None else variables, x, y, **kw)


def accuracy(x, y):
  return float(jnp.mean(jnp.argmax(linear_logits(linear_model(), x), -1) == y))


@settings(max_examples=8, deadline=None)
@given(norm=st.sampled_from(["linf", "l2", "l0"]), batch=st.sampled_from([1, 3, 5]),
       eps=st.floats(0.0, 0.5), seed=st.integers(0, 1000), eot=st.sampled_from([0, 3]),
       loss=st.sampled_from(["ce", "cw"]), unit=st.sampled_from(["pixel", "value"]))
def test_outputs_satisfy_constraints(norm, batch, eps, seed, eot, loss, unit):
  x, y = data(batch, seed)
  l0_eps = float(int(eps * 40))
  cfg = AttackConfig(norm=norm, eps=l0_eps if norm == "l0" else eps, step_size=0.1,
                     num_steps=3, loss=loss, eot_samples=eot, drop=DropSpec.fixed(0.5),
                     l0_unit=unit)
  x_adv = run(cfg, x, y, key=jax.random.PRNGKey(seed))
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert float(x_adv.min()) >= -1 and float(x_adv.max()) <= 1
  delta = np.asarray(x_adv - x, np.float64)
  if norm == "linf":
    assert np.abs(delta).max() <= eps + 1e-6
  elif norm == "l2":
    assert np.sqrt((delta ** 2).reshape(batch, -1).sum(1)).max() <= eps * (1 + 1e-6) + 1e-7
  else:
    assert int(norms.l0_count(jnp.asarray(delta), unit).max()) <= int(l0_eps)


def test_eps_zero_is_a_no_op_and_large_eps_fools_model():
  x, y = data(16)
  for norm in ("linf", "l2"):
    same = run(AttackConfig(norm=norm, eps=0.0, step_size=0.1, num_steps=5), x, y)
    np.testing.assert_array_equal(same, x)
  assert accuracy(x, y) == 1.0
  for cfg in (AttackConfig(norm="linf", eps=0.5, step_size=0.1, num_steps=10),
              AttackConfig(norm="l2", eps=8.0, step_size=2.0, num_steps=10),
              AttackConfig(norm="l0", eps=40, step_size=1.0, num_steps=10),
              AttackConfig(norm="linf", eps=0.5, step_size=0.1, num_steps=10, loss="cw")):
    assert accuracy(run(cfg, x, y), y) <= 0.05, cfg


def test_linf_attack_on_linear_model_reaches_the_known_optimum():
  # For a linear model the CW-optimal L-inf perturbation against the runner-up
  # class j is eps * sign(w_j - w_y); PGD from x (no random start) finds it.
  x, y = data(4)
  v = linear_model()
  eps = 0.02
  cfg = AttackConfig(norm="linf", eps=eps, step_size=eps, num_steps=3, loss="cw",
                     random_start=False)
  x_adv = run(cfg, x, y)
  z = linear_logits(v, x)
  j = jnp.argsort(z, -1)[:, -2]
  direction = jnp.sign(v["w"][:, j] - v["w"][:, y]).T.reshape(x.shape)
  want = jnp.clip(x + eps * direction, -1, 1)
  np.testing.assert_allclose(x_adv, want, atol=1e-6)


def test_targeted_hits_target():
  x, y = data(16)
  target = (y + 1) % NUM_CLASSES
  for loss in ("ce", "cw"):
    cfg = AttackConfig(norm="linf", eps=0.5, step_size=0.1, num_steps=10, targeted=True,
                       loss=loss)
    x_adv = run(cfg, x, y, target=target)
    pred = jnp.argmax(linear_logits(linear_model(), x_adv), -1)
    assert float(jnp.mean(pred == target)) >= 0.95
  # Random wrong targets drawn from the key.
  cfg = AttackConfig(norm="linf", eps=0.5, step_size=0.1, num_steps=10, targeted=True)
  pred = jnp.argmax(linear_logits(linear_model(), run(cfg, x, y)), -1)
  assert float(jnp.mean(pred == y)) <= 0.05


def test_same_key_same_examples_different_key_differs():
  x, y = data(6)
  cfg = AttackConfig(norm="l2", eps=0.3, step_size=0.1, num_steps=4, eot_samples=3,
                     drop=DropSpec.fixed(0.5))
  a, b = run(cfg, x, y, key=KEY), run(cfg, x, y, key=KEY)
  np.testing.assert_array_equal(a, b)
  c = run(cfg, x, y, key=jax.random.PRNGKey(9))
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("impl", ["vmap", "batch", "scan"])
def test_eot_gradient_equals_python_loop_reference(impl):
  x, y = data(5)
  v = linear_model()
  # A nonlinear objective so the masks matter beyond linearity.
  objective = lambda xx, yy: losses.cross_entropy(jnp.tanh(linear_logits(v, xx)) * 3, yy)
  key, k = jax.random.PRNGKey(3), 10
  got = jax.jit(lambda x: eot_gradient(key, objective, x, y, DropSpec.fixed(0.7), k,
                                        impl=impl))(x)
  ref = np.zeros(x.shape)
  for kk in jax.random.split(key, k):
    m = masks.sample_mask(kk, x.shape, 0.7)
    # ∇ℓ(x∘M)∘M, written out with the chain rule by hand.
    g_at = jax.grad(lambda u: jnp.sum(objective(u, y)))(x * m)
    ref += np.asarray(g_at * m) / k
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)


def test_eot_off_equals_plain_pgd():
  x, y = data(4)
  plain = AttackConfig(norm="linf", eps=0.1, step_size=0.02, num_steps=3, eot_samples=0,
                       drop=DropSpec.fixed(0.9))
  no_rate = plain.replace(eot_samples=10, drop=DropSpec.fixed(0.0))
  np.testing.assert_array_equal(run(plain, x, y), run(no_rate, x, y))


def test_l0_projection_is_exact_against_brute_force():
  rng = np.random.RandomState(0)
  x0 = jnp.asarray(rng.uniform(-1, 1, (1, 2, 2, 2)), jnp.float32)
  z = jnp.asarray(rng.uniform(-2, 2, (1, 2, 2, 2)), jnp.float32)
  for k in range(5):
    got = norms.l0_project(x0 + z, x0, k, "pixel")
    best = np.inf
    import itertools
    for keep in itertools.combinations(range(4), k):
      cand = np.asarray(x0).copy().reshape(4, 2)
      prop = np.clip(np.asarray(x0 + z).reshape(4, 2), -1, 1)
      for p in keep:
        cand[p] = prop[p]
      best = min(best, float(((cand - np.asarray(x0 + z).reshape(4, 2)) ** 2).sum()))
    dist = float(jnp.sum((got - (x0 + z)) ** 2))
    assert dist <= best + 1e-5
    assert int(norms.l0_count(got - x0)[0]) <= k


def test_paper_presets_and_l0_budget():
  c = paper_attack("cifar10", "linf")
  assert (c.eps, c.step_size) == (16 / 255, 2 / 255)
  g = paper_attack("gtsrb", "l2")
  assert (g.eps, g.step_size) == (512 / 255, 32 / 255)
  l0 = paper_attack("gtsrb", "l0")
  assert l0.l0_budget((32, 32, 3)) == 30  # 0.03 * 1024 pixels
  assert l0.replace(l0_unit="value").l0_budget((32, 32, 3)) == 92
  with pytest.raises(ValueError, match="no attack preset"):
    paper_attack("mnist", "linf")


def test_best_of_keeps_first_success():
  x, y = data(8)
  v = linear_model()
  weak = jax.jit(make_pgd(linear_logits, AttackConfig(norm="linf", eps=0.0, num_steps=1)))
  strong = jax.jit(make_pgd(linear_logits, AttackConfig(norm="linf", eps=0.5, step_size=0.1,
                                                        num_steps=10)))
  fooled = lambda xa, yy: jnp.argmax(linear_logits(v, xa), -1) != yy
  x_adv, winner = best_of(KEY, [weak, strong], fooled, v, x, y)
  assert (np.asarray(winner) == 1).all()
  assert not bool(jnp.any(jnp.argmax(linear_logits(v, x_adv), -1) == y))
  x_adv, winner = best_of(KEY, [weak, weak], fooled, v, x, y)
  assert (np.asarray(winner) == -1).all()
  np.testing.assert_array_equal(x_adv, x)


@pytest.mark.parametrize("kw,msg", [(dict(norm="l1"), "unknown norm"),
                                    (dict(eps=-0.1), "eps must be"),
                                    (dict(num_steps=0), "num_steps"),
                                    (dict(loss="hinge"), "unknown attack loss"),
                                    (dict(drop=0.9), "DropSpec"),
                                    (dict(eot_impl="loop"), "eot_impl")])
def test_bad_arguments_raise(kw, msg):
  with pytest.raises(ValueError, match=msg):
    make_pgd(linear_logits, AttackConfig(**kw))


def test_label_shape_mismatch_raises():
  x, y = data(4)
  attack = make_pgd(linear_logits, AttackConfig(num_steps=1))
  with pytest.raises(ValueError, match="does not match"):
    attack(KEY, linear_model(), x, y[:3])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_budget_readings_literal_and_doubled(norm):
  """Literal: the stated eps in units of X; doubled: twice that. Same attack
  otherwise (the doubled run with eps/2 and step/2 is the literal one)."""
  x, y = data(6)
  lit = AttackConfig(norm=norm, eps=0.1, step_size=0.05, num_steps=4, random_start=False)
  dbl = lit.replace(budget_reading="doubled")
  size = (lambda d: np.abs(d).reshape(6, -1).max(1)) if norm == "linf" else (
      lambda d: np.sqrt((d ** 2).reshape(6, -1).sum(1)))
  d_lit = np.asarray(run(lit, x, y) - x)
  d_dbl = np.asarray(run(dbl, x, y) - x)
  assert size(d_lit).max() <= 0.1 + 1e-6
  assert size(d_dbl).max() <= 0.2 + 1e-6 and size(d_dbl).max() > 0.1 + 1e-3
  half = dbl.replace(eps=0.05, step_size=0.025)
  np.testing.assert_allclose(run(half, x, y), run(lit, x, y), atol=1e-6)
  assert lit.x_units(lit.eps) == 0.1 and dbl.x_units(dbl.eps) == 0.2
  with pytest.raises(ValueError, match="budget reading"):
    lit.replace(budget_reading="half").validate()


def test_rejection_aware_gradient_goes_through_the_mask_average():
  """The attack's gradient is the gradient of the loss of the *averaged*
  probabilities, computed here independently with a Python loop over masks."""
  x, y = data(5)
  v = linear_model()
  drop = DropSpec.fixed(0.5)
  cfg = AttackConfig(norm="l2", eps=100.0, step_size=1.0, num_steps=1, loss="rejection",
                     eot_samples=4, drop=drop, random_start=False, entropy_weight=0.7)
  x_adv = run(cfg, x, y)
  k_steps = jax.random.split(KEY, 3)[2]
  keys = jax.random.split(jax.random.fold_in(k_steps, 0), 4)

  def loss(xx):
    probs = sum(jax.nn.softmax(linear_logits(v, xx * masks.spec_mask(k, drop, xx.shape)), -1)
                for k in keys) / 4
    logp = jnp.log(probs)
    top_other = jnp.max(jnp.where(jax.nn.one_hot(y, NUM_CLASSES, dtype=bool), -jnp.inf, logp), -1)
    h = -jnp.sum(probs * logp, -1)
    return jnp.sum(top_other - logp[jnp.arange(5), y] - 0.7 * h)

  g = jax.grad(loss)(x)
  want = norms.l2_project(norms.l2_step(x, g, 1.0), x, 100.0)  # step 1 in units of X
  np.testing.assert_allclose(x_adv, want, atol=1e-5)


def test_rejection_aware_attack_lowers_the_entropy_it_leaves():
  x, y = data(32)
  base = AttackConfig(norm="linf", eps=0.3, step_size=0.03, num_steps=20, eot_samples=0)
  v = linear_model()

  def entropy(xx):
    p = jax.nn.softmax(linear_logits(v, xx), -1)
    return float(jnp.mean(-jnp.sum(p * jnp.log(p), -1)))

  ce = run(base, x, y)
  rej = run(base.replace(loss="rejection", entropy_weight=2.0), x, y)
  assert accuracy(rej, y) < 0.5  # still fooled
  assert entropy(rej) < entropy(ce)


@pytest.mark.parametrize("norm,eot", [("linf", 3), ("l2", 0), ("l0", 3)])
def test_the_loops_unroll_changes_nothing(norm, eot):
  """The backend picks the step loop's unroll for speed (dropjax.backend.loop_unroll):
  rolled, fully unrolled or by 2, the attack is the same under a key (APGD too)."""
  from dropjax.attacks import apgd
  x, y = data(6)
  v = linear_model()
  cfg = AttackConfig(norm=norm, eps=3.0 if norm == "l0" else 0.2, step_size=0.05,
                     num_steps=5, eot_samples=eot, drop=DropSpec.fixed(0.5))
  outs = [jax.jit(make_pgd(linear_logits, cfg, unroll=u))(KEY, v, x, y) for u in (1, True, 2)]
  for o in outs[1:]:
    np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), rtol=0, atol=1e-6)
  if norm != "l0":
    acfg = apgd.APGDConfig(norm=norm, eps=0.2, num_steps=5, loss="ce", eot_samples=eot,
                           drop=DropSpec.fixed(0.5))
    outs = [jax.jit(apgd.make_apgd(linear_logits, acfg, unroll=u))(KEY, v, x, y)
            for u in (1, True, 2)]
    for o in outs[1:]:
      np.testing.assert_allclose(np.asarray(o), np.asarray(outs[0]), rtol=0, atol=1e-6)

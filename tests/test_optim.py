"""Schedules and optimizers against PyTorch's, parameter groups, freezing, SAM, accumulation."""

import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cxflax.config import base_config
from cxflax.errors import ConfigError
from cxflax.train import optim
from tests.conftest import run_python


def _config(**kw):
  """base_config() with kw set; a dict sets fields of a group (optim=dict(name="sgd"))."""
  c = base_config()
  for k, v in kw.items():
    if isinstance(v, dict):
      c[k].update(v)
    else:
      c[k] = v
  return c


@pytest.mark.parametrize("kw,torch_sched", [
    (dict(name="cosine", period_epochs=4, min_learning_rate=1e-3, unit="epoch"),
     lambda o: __import__("torch").optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=1e-3)),
    (dict(name="cosine_restarts", period_epochs=3, restart_mult=1, min_learning_rate=0.0, unit="epoch"),
     lambda o: __import__("torch").optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=1)),
    (dict(name="cosine_restarts", period_epochs=2, restart_mult=2, min_learning_rate=1e-4, unit="epoch"),
     lambda o: __import__("torch").optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2, eta_min=1e-4)),
    (dict(name="step", step_decay_epochs=3, step_decay_factor=0.5, unit="epoch"),
     lambda o: __import__("torch").optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
])
def test_schedules_match_torch_schedulers_stepped_per_epoch(kw, torch_sched):
  import torch
  steps_per_epoch = 5
  ours = optim.make_schedule(_config(schedule=kw).schedule, 0.1, 14, steps_per_epoch)
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
  sched = torch_sched(opt)
  for epoch in range(14):
    expected = opt.param_groups[0]["lr"]
    for s in range(steps_per_epoch):  # constant within the epoch
      assert float(ours(epoch * steps_per_epoch + s)) == pytest.approx(expected, rel=1e-5, abs=1e-9)
    opt.step()
    sched.step()


def test_warmup_cosine_and_errors():
  s = optim.make_schedule(_config(schedule=dict(name="warmup_cosine", warmup_epochs=2)).schedule, 1.0, 10, 10)
  assert float(s(0)) == 0.0 and float(s(20)) == pytest.approx(1.0) and float(s(100)) == pytest.approx(0.0, abs=1e-6)
  assert float(s(10)) == pytest.approx(0.5)
  with pytest.raises(ConfigError, match="warmup_epochs"):
    optim.make_schedule(_config(schedule=dict(warmup_epochs=1)).schedule, 0.1, 1, 10)
  with pytest.raises(ConfigError, match="unknown schedule"):
    optim.make_schedule(_config(schedule=dict(name="linear")).schedule, 0.1, 1, 10)


def _tiny_params():
  return {"backbone": {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)},
                       "layer4": {"kernel": jnp.ones((4, 4))}},
          "head": {"fc": {"kernel": jnp.ones((4, 1)), "bias": jnp.zeros(1)}}}


class _FastaiScheduler:
  """fastai v1's callbacks.general_sched.Scheduler, as OneCycleScheduler drives it: `step()` is
  called after each batch and gives the next batch's value."""

  def __init__(self, start, end, n_iter):
    self.start, self.end, self.n_iter, self.n = start, end, max(1, n_iter), 0

  def step(self):
    self.n += 1
    return self.end + (self.start - self.end) / 2 * (1 + np.cos(np.pi * self.n / self.n_iter))

  @property
  def is_done(self):
    return self.n >= self.n_iter


def _fastai_one_cycle(lr_max, n, div_factor=25.0, pct_start=0.3, final_div=None):
  """The rate of each of n batches under fastai v1's OneCycleScheduler.on_train_begin /
  on_batch_end (final_div=None means div_factor · 1e4)."""
  final_div = final_div or div_factor * 1e4
  a1 = int(n * pct_start)
  scheds = [_FastaiScheduler(lr_max / div_factor, lr_max, a1),
            _FastaiScheduler(lr_max, lr_max / final_div, n - a1)]
  rates, lr, idx = [], scheds[0].start, 0
  for _ in range(n):
    rates.append(lr)
    lr = scheds[idx].step()
    if scheds[idx].is_done:
      idx += 1
  return np.array(rates)


@pytest.mark.parametrize("epochs,steps_per_epoch", [(3, 17), (25, 4), (1, 7)])
def test_one_cycle_is_fastais_fit_one_cycle(epochs, steps_per_epoch):
  s = _config(schedule=dict(name="one_cycle")).schedule
  ours = optim.make_schedule(s, 2e-3, epochs, steps_per_epoch)
  n = epochs * steps_per_epoch
  got = np.array([float(ours(t)) for t in range(n)])
  # float32 arithmetic: to 1e-5 of each value or 1e-6 of the peak near the floor
  np.testing.assert_allclose(got, _fastai_one_cycle(2e-3, n), rtol=1e-5, atol=2e-9)
  assert got[0] == pytest.approx(2e-3 / 25, rel=1e-5) and got.max() <= 2e-3 * (1 + 1e-6)


def test_one_cycle_follows_torch_onecyclelr_and_checks_its_fields():
  """torch's OneCycleLR(anneal_strategy='cos', div_factor=25, final_div_factor=1e4,
  pct_start=0.3) places its phase ends one step earlier than fastai; over 1000 steps the two
  agree to 0.5 % of the peak (one step of the rise)."""
  import torch
  n, lr = 1000, 0.01
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=n, pct_start=0.3,
                                              anneal_strategy="cos", div_factor=25, final_div_factor=1e4,
                                              cycle_momentum=False)
  ref = []
  for _ in range(n):
    ref.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  ours = optim.make_schedule(_config(schedule=dict(name="one_cycle")).schedule, lr, n, 1)
  np.testing.assert_allclose([float(ours(t)) for t in range(n)], ref, atol=5e-3 * lr)
  for field, value in (("pct_start", 1.0), ("div_factor", 0.0), ("final_div_factor", -1.0)):
    with pytest.raises(ConfigError, match=f"config.schedule.{field}"):
      optim.make_schedule(_config(schedule=dict(name="one_cycle", **{field: value})).schedule, lr, 4, 5)


def test_discriminative_rates_are_geometric_and_groups_are_regexes():
  c = _config(optim=dict(learning_rate=1e-3, param_groups=("^backbone/(conv|bn)", "^backbone/layer4", "^head/"),
                         group_lr_range=(1e-6, 1e-4)))
  np.testing.assert_allclose(optim.group_learning_rates(c.optim), [1e-6, 1e-5, 1e-4], rtol=1e-9)
  labels = optim.param_labels(c.optim, _tiny_params())
  assert labels["backbone"]["conv"]["kernel"] == "group0" and labels["backbone"]["layer4"]["kernel"] == "group1"
  assert labels["head"]["fc"]["bias"] == "group2"
  with pytest.raises(ConfigError, match="matches none"):
    optim.param_labels(_config(optim=dict(param_groups=("^head/",))).optim, _tiny_params())


def test_group_rates_and_frozen_parameters_in_updates():
  params = _tiny_params()
  grads = jax.tree.map(jnp.ones_like, params)
  c = _config(optim=dict(name="sgd", momentum=0.0, learning_rate=1e-3, param_groups=("^backbone/", "^head/"),
                         group_lr_range=(1e-5, 1e-3)), schedule=dict(name="constant"))
  tx, _ = optim.make_optimizer(c.optim, params, optax.constant_schedule)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["backbone"]["conv"]["kernel"][0, 0, 0, 0]) == pytest.approx(-1e-5)
  assert float(updates["head"]["fc"]["kernel"][0, 0]) == pytest.approx(-1e-3)
  frozen = _config(optim=dict(name="sgd", momentum=0.0, learning_rate=1e-2, freeze=("^backbone/",)),
                   schedule=dict(name="constant"))
  tx, _ = optim.make_optimizer(frozen.optim, params, optax.constant_schedule)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["backbone"]["conv"]["kernel"]).max()) == 0.0
  assert float(updates["backbone"]["bn"]["scale"][0]) == pytest.approx(-1e-2)  # fastai: BN stays trainable
  assert float(updates["head"]["fc"]["kernel"][0, 0]) == pytest.approx(-1e-2)
  strict = frozen.copy_and_resolve_references()
  strict.optim.train_frozen_bn = False
  tx, _ = optim.make_optimizer(strict.optim, params, optax.constant_schedule)
  assert float(jnp.abs(tx.update(grads, tx.init(params), params)[0]["backbone"]["bn"]["scale"]).max()) == 0.0
  with pytest.raises(ConfigError, match="freezes every parameter"):
    optim.make_optimizer(_config(optim=dict(freeze=(".",), train_frozen_bn=False)).optim, params,
                         optax.constant_schedule)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_match_torch(name):
  """Five steps on a linear least-squares problem: same parameters as torch.optim."""
  import torch
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(16, 5)).astype(np.float32), rng.normal(size=(16,)).astype(np.float32)
  w0 = rng.normal(size=(5,)).astype(np.float32)
  c = _config(optim=dict(name=name, learning_rate=0.05, momentum=0.9, weight_decay=0.01),
              schedule=dict(name="constant"))
  tx, _ = optim.make_optimizer(c.optim, {"w": jnp.asarray(w0)}, optax.constant_schedule)
  params, state = {"w": jnp.asarray(w0)}, None
  state = tx.init(params)
  loss = lambda p: jnp.mean((jnp.asarray(x) @ p["w"] - jnp.asarray(y)) ** 2)
  for _ in range(5):
    g = jax.grad(loss)(params)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
  wt = torch.tensor(w0, requires_grad=True)
  opt = {"sgd": lambda: torch.optim.SGD([wt], lr=0.05, momentum=0.9, weight_decay=0.01),
         "adam": lambda: torch.optim.Adam([wt], lr=0.05, weight_decay=0.01),
         "adamw": lambda: torch.optim.AdamW([wt], lr=0.05, weight_decay=0.01)}[name]()
  for _ in range(5):
    opt.zero_grad()
    ((torch.tensor(x) @ wt - torch.tensor(y)) ** 2).mean().backward()
    opt.step()
  np.testing.assert_allclose(np.asarray(params["w"]), wt.detach().numpy(), rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_the_full_batch():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)
  loss = lambda p, xs, ys: jnp.mean((xs @ p["w"] - ys) ** 2)
  p0 = {"w": jnp.ones(3)}
  c = _config(optim=dict(name="sgd", momentum=0.9, learning_rate=0.1), schedule=dict(name="constant"))
  full, _ = optim.make_optimizer(c.optim, p0, optax.constant_schedule)
  u, _ = full.update(jax.grad(loss)(p0, x, y), full.init(p0), p0)
  c.optim.grad_accum_steps = 2
  acc, _ = optim.make_optimizer(c.optim, p0, optax.constant_schedule)
  s, p = acc.init(p0), p0
  for half in (slice(0, 4), slice(4, 8)):
    ua, s = acc.update(jax.grad(loss)(p, x[half], y[half]), s, p)
    p = optax.apply_updates(p, ua)
  np.testing.assert_allclose(np.asarray(p["w"]), np.asarray(optax.apply_updates(p0, u)["w"]), rtol=1e-6)


_SAM_CHECK = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np, optax
    import flax.linen as nn
    from cxflax import parallel
    from cxflax.config import base_config, finalize
    from cxflax.train import optim
    from cxflax.train.steps import create_train_state, make_train_step

    class Net(nn.Module):  # conv, BatchNorm, linear: small enough to check SAM by hand
      @nn.compact
      def __call__(self, x, train=False):
        from cxflax.models.layers import batch_norm
        x = nn.Conv(4, (3, 3))(x)
        x = nn.relu(batch_norm(train, jnp.float32, name="bn")(x))
        return nn.Dense(1)(jnp.mean(x, axis=(1, 2)))

    model = Net()
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(8, 6, 6, 1)).astype(np.float32), "label": rng.uniform(0, 5, 8).astype(np.float32)}
    variables = model.init(jax.random.key(0), batch["image"][:1])
    out = {}
    for mode in ("global", "per_device"):
      c = base_config()
      c.optim.name, c.optim.momentum, c.optim.learning_rate, c.optim.sam_rho = "sgd", 0.0, 0.1, 0.05
      c.schedule.name = "constant"
      c.batch_size = 8
      c.optim.sam_per_device = mode == "per_device"
      c = finalize(c)
      out[mode] = {}
      for n in (1, 2, 8):
        mesh = parallel.make_mesh(jax.devices()[:n])
        tx, _ = optim.make_optimizer(c.optim, variables["params"], optax.constant_schedule)
        state = create_train_state(model, tx, variables, mesh)
        state, m = make_train_step(model, c, mesh)(state, parallel.shard_batch(batch, mesh))
        out[mode][n] = {"params": [np.asarray(v).ravel().tolist() for v in jax.tree.leaves(state.params)],
                        "stats": [np.asarray(v).ravel().tolist() for v in jax.tree.leaves(state.batch_stats)]}

    # By hand: gradient at params + rho * g / |g|, over the batch (or over each device's half).
    def loss(p, imgs, ys):
      o, upd = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, imgs, train=True, mutable=["batch_stats"])
      return jnp.mean(jnp.where(jnp.abs(o[:, 0] - ys) < 1, 0.5 * (o[:, 0] - ys) ** 2, jnp.abs(o[:, 0] - ys) - 0.5)), upd
    def sam_grad(imgs, ys):
      g = jax.grad(lambda p: loss(p, imgs, ys)[0])(variables["params"])
      norm = optax.tree.norm(g)
      adv = jax.tree.map(lambda w, gi: w + 0.05 * gi / norm, variables["params"], g)
      return jax.grad(lambda p: loss(p, imgs, ys)[0])(adv)
    full = sam_grad(batch["image"], batch["label"])
    halves = [sam_grad(batch["image"][i * 4:(i + 1) * 4], batch["label"][i * 4:(i + 1) * 4]) for i in range(2)]
    per2 = jax.tree.map(lambda a, b: (a + b) / 2, *halves)
    manual = {k: [np.asarray(v).ravel().tolist() for v in jax.tree.leaves(jax.tree.map(lambda w, g: w - 0.1 * g, variables["params"], gr))]
              for k, gr in (("global", full), ("per_device_2", per2))}
    clean_stats = [np.asarray(v).ravel().tolist() for v in jax.tree.leaves(loss(variables["params"], batch["image"], batch["label"])[1])]
    print("RESULT" + json.dumps({"runs": out, "manual": manual, "clean_stats": clean_stats}))
""")


@pytest.fixture(scope="module")
def sam_steps():
  """One SAM step of each mode on 1, 2 and 8 devices, and the same steps by hand (one process
  with 8 simulated devices serves both modes)."""
  proc = run_python(_SAM_CHECK, devices=8)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("mode", ["global", "per_device"])
def test_sam_step_by_hand_with_batchnorm_and_devices(sam_steps, mode):
  runs, manual = sam_steps["runs"][mode], sam_steps["manual"]
  close = lambda a, b, tol=2e-5: all(np.allclose(x, y, rtol=tol, atol=1e-6) for x, y in zip(a, b))
  assert close(runs["1"]["params"], manual["global"])  # one device: plain SAM
  for n in ("1", "2", "8"):  # BatchNorm running statistics from the clean pass
    assert close(runs[n]["stats"], sam_steps["clean_stats"])
  if mode == "global":
    assert close(runs["8"]["params"], manual["global"]) and close(runs["2"]["params"], manual["global"])
  else:  # each device ascends along its own gradient (m-sharpness)
    assert close(runs["2"]["params"], manual["per_device_2"])
    assert not close(runs["2"]["params"], manual["global"], 1e-6)


@pytest.mark.parametrize("arg", ["resnest50d", "resnest50d,warm"])
def test_sensemble_schedule_counts_updates_with_accumulation(arg):
  """The recipe's optimizer as training builds it (4 batches accumulated per update, 50 epochs of
  6 batches: updates of 4 and 2 batches), with plain SGD substituted so that a unit gradient's
  update is minus the rate actually applied. The rate per epoch must be torch's scheduler stepped
  per epoch (T_max / T_0 = 10 epochs, not 40), every epoch must end with an update, and the rate
  training logs must be the applied one."""
  import torch
  from cxflax.config import finalize
  from tests.conftest import load_config
  c = finalize(load_config(f"sensemble.py:{arg}"))
  assert (c.optim.grad_accum_steps, c.num_epochs, c.schedule.period_epochs) == (4, 50, 10)
  c.optim.name, c.optim.momentum, c.optim.weight_decay = "sgd", 0.0, 0.0
  steps_per_epoch, p0 = 6, {"w": jnp.zeros(())}
  tx, rate_at = optim.training_optimizer(c, p0, steps_per_epoch)
  update = jax.jit(lambda s: tx.update({"w": jnp.ones(())}, s, p0))
  state, applied = tx.init(p0), {}
  for step in range(50 * steps_per_epoch):
    u, state = update(state)
    if float(u["w"]) != 0.0:
      applied[step] = -float(u["w"])
  # An update after batches 4 and 6 of every epoch: none carries over into the next epoch.
  assert sorted(applied) == [e * steps_per_epoch + j for e in range(50) for j in (3, 5)]
  for step, rate in applied.items():
    assert rate_at(step) == pytest.approx(rate, rel=1e-5)  # float32 arithmetic inside and outside jit
  per_epoch = [applied[e * steps_per_epoch + 3] for e in range(50)]
  assert per_epoch == [applied[e * steps_per_epoch + 5] for e in range(50)]
  opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
  sched = (torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, eta_min=1e-6) if "warm" in arg
           else torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-6))
  expected = []
  for _ in range(50):
    expected.append(opt.param_groups[0]["lr"])
    opt.step()
    sched.step()
  np.testing.assert_allclose(per_epoch, expected, rtol=1e-5, atol=1e-9)
  rises = [e for e in range(1, 50) if per_epoch[e] > per_epoch[e - 1] * 1.5]
  if "warm" in arg:
    assert rises == [10, 20, 30, 40]  # warm restarts jump back to the peak
    assert all(per_epoch[e] == pytest.approx(1e-3) for e in (0, 10, 20, 30, 40))
  else:  # cosine: down for 10 epochs, up for 10 (torch's CosineAnnealingLR past T_max)
    assert per_epoch[10] == pytest.approx(1e-6, abs=1e-9) and per_epoch[20] == pytest.approx(1e-3)
    assert per_epoch[30] == pytest.approx(1e-6, abs=1e-9) and per_epoch[40] == pytest.approx(1e-3)


def test_epoch_aligned_accumulation_averages_the_batches_left_over():
  """With 7 batches per epoch and 3 per update, the epoch's updates take batches 1-3, 4-6 and 7
  alone; each update is the rate times the mean of its batches' gradients."""
  c = _config(optim=dict(name="sgd", momentum=0.0, learning_rate=0.1, grad_accum_steps=3),
              schedule=dict(name="constant"), num_epochs=2)
  p0 = {"w": jnp.zeros(())}
  tx, rate_at = optim.training_optimizer(c, p0, 7)
  assert [optim.update_index(i, 7, 3) for i in range(14)] == [0, 0, 0, 1, 1, 1, 2, 3, 3, 3, 4, 4, 4, 5]
  state, got = tx.init(p0), []
  grads = np.arange(1.0, 15.0, dtype=np.float32) ** 2
  for g in grads:
    u, state = tx.update({"w": jnp.asarray(g)}, state, p0)
    got.append(float(u["w"]))
  want = np.zeros(14)
  for end, members in ((2, [0, 1, 2]), (5, [3, 4, 5]), (6, [6]), (9, [7, 8, 9]), (12, [10, 11, 12]),
                       (13, [13])):
    want[end] = -0.1 * grads[members].mean()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert rate_at(6) == pytest.approx(0.1)

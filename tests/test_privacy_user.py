"""The user unit of DP: DP-SGD over users inside each silo (privacy/mechanism.py `clipped_user_sum`,
engine/client.py `private_gradient` and `user_rows_sum`), Poisson user sampling (data/batching.py), its plan and
ledger."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedscope_jax.data.batching import poisson_cap, poisson_masks, user_steps
from fedscope_jax.engine.client import USER_VOCAB, ClientConfig, UserNoise, private_gradient, user_rows_sum
from fedscope_jax.engine.cohort import PAD_ROW
from fedscope_jax.errors import FedscopeError
from fedscope_jax.losses.iidcl import inter_item_loss, inter_loss
from fedscope_jax.model import ModelConfig, init_params, loss_fn
from fedscope_jax.model.config import LossConfig
from fedscope_jax.privacy import accounting, mechanism
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.privacy.ledger import PrivacyLedger, check_ledger, read_ledger
from fedscope_jax.privacy.plan import UserSteps, plan_privacy
from fedscope_jax.train.vocab import add_negatives, localize_users, sparse_tables

MC = ModelConfig(dim=8, blocks=1, heads=1, max_len=5, dropout=0.0, fusion_hidden=8,
                 loss=LossConfig(num_negatives=6, alpha=0.5))
N_ITEMS = (20, 15)


def _batch(rng: np.random.Generator, users: int, pad: int = 0) -> dict[str, jnp.ndarray]:
    """`users` random users with histories in both domains, then `pad` all-zero padding users."""
    seq = rng.integers(1, 15, size=(users, 2, MC.max_len)).astype(np.int32)
    seq[:, :, :2] = 0                                   # left padding
    target = np.roll(seq, -1, axis=2)
    target[:, :, -1] = rng.integers(1, 15, size=(users, 2))
    target = np.where(seq > 0, target, 0).astype(np.int32)
    z = np.zeros((pad, 2, MC.max_len), np.int32)
    return {"seq": jnp.asarray(np.concatenate([seq, z])), "target": jnp.asarray(np.concatenate([target, z])),
            "user_mask": jnp.asarray(np.arange(users + pad) < users)}


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.key(0), MC, N_ITEMS)


USER_LOSS = functools.partial(loss_fn, config=MC, train=True, per_user=True)
_CLIPPED_SUM = jax.jit(mechanism.clipped_user_sum, static_argnums=0)   # one compile per loss and batch shape


def _user_loss():
    return USER_LOSS


def _sum(loss, params, batch, clip=0.05):
    return _CLIPPED_SUM(loss, params, batch, jax.random.key(3), batch["user_mask"], jnp.float32(clip))


def _dist(a, b) -> float:
    return float(optax.tree.norm(jax.tree.map(jnp.subtract, a, b)))


def test_each_user_contributes_at_most_the_clip_norm(params):
    batch = _batch(np.random.default_rng(0), 6)
    clip = 0.05
    full, losses = _sum(_user_loss(), params, batch, clip)
    assert losses.shape == (6,) and np.all(np.isfinite(np.asarray(losses)))
    for u in range(6):
        one = {k: v.at[u + 1:].set(0).at[:u].set(0) for k, v in batch.items() if k != "user_mask"}
        one["user_mask"] = jnp.arange(6) == u
        g, _ = _sum(_user_loss(), params, one, clip)
        assert float(optax.tree.norm(g)) <= clip * (1 + 1e-5)
    raw = jax.grad(lambda p: _user_loss()(p, jax.tree.map(lambda x: x[:1], batch), jax.random.key(0))[0])(params)
    assert float(optax.tree.norm(raw)) > 10 * clip          # so the bound above is the clipping's doing
    assert float(optax.tree.norm(full)) <= 6 * clip * (1 + 1e-5)


def test_padding_users_change_nothing(params):
    rng = np.random.default_rng(1)
    batch = _batch(rng, 4)
    padded = _batch(np.random.default_rng(1), 4, pad=3)
    a, la = _sum(_user_loss(), params, batch)
    b, lb = _sum(_user_loss(), params, padded)
    assert _dist(a, b) < 1e-6
    np.testing.assert_allclose(np.asarray(lb)[:4], np.asarray(la), rtol=1e-6)


def test_microbatches_give_the_same_sum_and_skip_what_follows_the_last_real_user(params):
    """Microbatches of 4 users give the all-at-once sum and losses (dropout on: each user keeps its key), and
    a Poisson batch (real users first) computes only the microbatches up to its last real user: users 8-15 of
    5 real are never evaluated (loss slot 0), users 5-7 share the last real user's microbatch (evaluated,
    masked out of the sum). In jax_privacy's own order (users i, i + 4, ... in microbatch i) every microbatch
    would hold a real user and all 16 would be computed."""
    loss = functools.partial(loss_fn, config=dataclasses.replace(MC, dropout=0.3), train=True, per_user=True)
    batch = dict(_batch(np.random.default_rng(7), 16), user_mask=jnp.arange(16) < 5)
    run = jax.jit(mechanism.clipped_user_sum, static_argnums=(0, 6))
    whole, whole_losses = run(loss, params, batch, jax.random.key(3), batch["user_mask"], jnp.float32(0.05), None)
    micro, micro_losses = run(loss, params, batch, jax.random.key(3), batch["user_mask"], jnp.float32(0.05), 4)
    assert _dist(whole, micro) < 1e-6 and float(optax.tree.norm(whole)) > 0.05
    np.testing.assert_allclose(np.asarray(micro_losses)[:8], np.asarray(whole_losses)[:8], rtol=1e-5)
    assert np.all(np.asarray(micro_losses)[:8] > 0) and np.all(np.asarray(micro_losses)[8:] == 0)


def _public_vectors(rng: np.random.Generator) -> list[dict[str, jnp.ndarray]]:
    """A public vector for every item of each domain (semantic tables; row 0 = padding)."""
    return [{"vectors": jnp.asarray(rng.normal(size=(n + 1, 4)).astype(np.float32)),
             "mask": jnp.ones(n + 1, jnp.float32).at[0].set(0.0)} for n in N_ITEMS]


def _replace_user(batch, u, rng):
    other = _batch(rng, 1)
    return {k: (v.at[u].set(other[k][0]) if k != "user_mask" else v) for k, v in batch.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replacing_one_user_moves_the_sum_by_at_most_the_sensitivity(params, seed):
    """Sensitivity of the pre-noise sum: 2C when one user's data is replaced, C when one is removed."""
    rng = np.random.default_rng(10 + seed)
    batch = _batch(rng, 8)
    clip = 0.05
    base, _ = _sum(_user_loss(), params, batch, clip)
    for u in range(8):
        moved = _dist(_sum(_user_loss(), params, _replace_user(batch, u, rng), clip)[0], base)
        assert moved <= 2 * clip * (1 + 1e-5), (u, moved)
        removed = dict(batch, user_mask=batch["user_mask"].at[u].set(False))
        assert _dist(_sum(_user_loss(), params, removed, clip)[0], base) <= clip * (1 + 1e-5)


@pytest.mark.parametrize("loss_cfg", [LossConfig(rec="gbce", num_negatives=6, alpha=0.5),
                                      LossConfig(rec="in_batch", logq=True, num_negatives=6, alpha=0.5),
                                      LossConfig(num_negatives=6, alpha=0.5, user_norm="length")])
def test_other_next_item_losses_keep_the_bound(params, loss_cfg):
    """The newer next-item losses in the user unit: gBCE (negatives drawn per user: public randomness), the
    logQ-corrected in-batch softmax (q from the user's own targets), and a user's losses summed over its
    targets (`user_norm` "length": the clipped gradient still bounds each user). The bound itself comes from
    `clipped_user_sum` calling the loss one user at a time (a loss closed over the batch breaks it: the test
    below); this checks that these losses run there, give a nonzero finite sum, keep 2C per replaced user and
    are unchanged by padding users."""
    loss = functools.partial(loss_fn, config=dataclasses.replace(MC, loss=loss_cfg), train=True, per_user=True)
    rng = np.random.default_rng(30)
    batch, clip = _batch(rng, 6), 0.05
    base, losses = _sum(loss, params, batch, clip)
    assert np.all(np.isfinite(np.asarray(losses))) and float(optax.tree.norm(base)) > 0
    for u in range(6):
        assert _dist(_sum(loss, params, _replace_user(batch, u, rng), clip)[0], base) <= 2 * clip * (1 + 1e-5)
    padded, _ = _sum(loss, params, _batch(np.random.default_rng(30), 6, pad=2), clip)
    assert _dist(padded, base) < 1e-6


def test_user_norm_length_weighs_a_user_by_its_targets(params):
    """`loss.user_norm` "length": each domain's next-item loss of a user is the sum over its targets there /
    (1 x L), i.e. that domain's mean over its n_d targets times n_d / L (hand-computed from the "mean" losses of
    the same user and key, one domain at a time, with 3 food and 2 kitchen targets); outside the user unit
    (per_user False) the option changes nothing, and a run config outside it is refused."""
    batch = _batch(np.random.default_rng(5), 1)
    batch["target"] = batch["target"].at[0, 1, 2].set(0)     # kitchen: one target fewer than food
    counts = [int(jnp.sum(batch["target"][:, d] > 0)) for d in range(2)]
    assert counts == [3, 2]
    only = [{k: (v.at[:, 1 - d].set(0) if k != "user_mask" else v) for k, v in batch.items()} for d in range(2)]
    key = jax.random.key(4)
    mc = dataclasses.replace(MC, loss=dataclasses.replace(MC.loss, alpha=0.0))
    length = dataclasses.replace(mc, loss=dataclasses.replace(mc.loss, user_norm="length"))
    means = [float(loss_fn(params, b, key, mc, per_user=True)[0]) for b in only]
    assert min(means) > 0
    expected = sum(m * n / MC.max_len for m, n in zip(means, counts))
    np.testing.assert_allclose(float(loss_fn(params, batch, key, length, per_user=True)[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(loss_fn(params, batch, key, length, per_user=True, skip_absent=True)[0]),
                               expected, rtol=1e-6)
    np.testing.assert_allclose(float(loss_fn(params, batch, key, length)[0]), float(loss_fn(params, batch, key, mc)[0]),
                               rtol=1e-6)
    with pytest.raises(FedscopeError, match="user_norm"):
        LossConfig(user_norm="sum")
    from fedscope_jax.train.config import RunConfig, load_config
    from fedscope_jax.train.federated import check_privacy_knobs
    with pytest.raises(FedscopeError, match="user_norm='length' weighs the per-user loss of --privacy-unit user"):
        check_privacy_knobs(RunConfig(model=length))
    check_privacy_knobs(RunConfig(model=length, privacy=PrivacyConfig(unit="user")))
    # --set model.loss.user_norm=length is applied before the --privacy-unit flag: the check waits for both
    cfg = load_config(None, ["model.loss.user_norm=length"])
    check_privacy_knobs(dataclasses.replace(cfg, privacy=PrivacyConfig(unit="user")))


def test_an_unsafe_loss_breaks_the_bound(params):
    """The same check fails on a loss whose user term reads other users (IIDCL's inter term with the other
    users of the batch as negatives, closed over the batch): per-user clipping alone does not bound it."""
    rng = np.random.default_rng(20)
    batch = _batch(rng, 8)
    clip = 0.05

    def unsafe_for(full_batch):
        def loss(p, one, key):
            from fedscope_jax.model import encode
            mine = encode(p, MC, 0, one["seq"][:, 0])[:, -1]
            everyone_b = encode(p, MC, 1, full_batch["seq"][:, 1])[:, -1]   # other users' domain-b histories
            za = jnp.concatenate([mine, everyone_b[1:]])
            va = jnp.ones(za.shape[0], bool)
            return 100.0 * inter_loss(za, everyone_b, va, va, 0.2), {}
        return loss

    base, _ = _sum(unsafe_for(batch), params, batch, clip)
    worst = 0.0
    for u in (1, 2, 3):
        changed = _replace_user(batch, u, rng)
        worst = max(worst, _dist(_sum(unsafe_for(changed), params, changed, clip)[0], base))
    assert worst > 2 * clip * 1.2, worst   # past the bound the safe loss keeps (measured 1.37x at these seeds)


def test_inter_item_loss_on_a_hand_computed_case():
    za = jnp.array([[1.0, 0.0]])
    zb = jnp.array([[0.0, 1.0]])
    items_a = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    items_b = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    tau = 0.5
    # a -> b: positive cos 0, negatives cos(za, items_b) = 0, 1; b -> a: negatives cos(zb, items_a) = 0, 1
    one_side = math.log(math.exp(0) + math.exp(0) + math.exp(1 / tau)) - 0.0
    got = float(inter_item_loss(za, zb, items_a, items_b, jnp.array([True]), jnp.array([True]), tau))
    assert got == pytest.approx(one_side, rel=1e-5)
    assert float(inter_item_loss(za, zb, items_a, items_b, jnp.array([True]), jnp.array([False]), tau)) == 0.0


def test_per_user_objective_keeps_an_inter_domain_term(params):
    """Taken one user at a time, the paper's IIDCL terms would vanish (no other user in the batch); the per-user
    objective has no intra term and an inter term against sampled items, which is active for a single user."""
    one = jax.tree.map(lambda x: x[:1], _batch(np.random.default_rng(5), 3))
    key = jax.random.key(1)
    _, per_user = loss_fn(params, one, key, MC, train=False, per_user=True)
    _, paper = loss_fn(params, one, key, MC, train=False)
    assert float(per_user["intra"]) == 0.0 and float(per_user["inter"]) > 0.1
    assert float(paper["inter"]) == pytest.approx(0.0, abs=1e-6) and float(paper["intra"]) == 0.0
    assert float(per_user["rec"]) == pytest.approx(float(paper["rec"]))


def test_private_gradient_noise_std_per_step(params):
    """With every user padding, the step gradient is pure noise: std z C / expected batch per coordinate."""
    batch = _batch(np.random.default_rng(2), 2, pad=2)
    batch["user_mask"] = jnp.zeros(4, bool)
    cfg = ClientConfig(_user_loss(), optax.sgd(1.0), expected_batch=16)
    noise = UserNoise(jnp.float32(0.5), jnp.float32(1.5), jax.random.key(9))
    step = jax.jit(private_gradient, static_argnums=3)
    loss, grads = step(params, batch, jax.random.key(1), cfg, noise, jnp.int32(3))
    flat = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(grads)])
    assert float(loss) == 0.0 and flat.size > 1000
    assert flat.std() == pytest.approx(1.5 * 0.5 / 16, rel=0.05)
    again = step(params, batch, jax.random.key(1), cfg, noise, jnp.int32(4))[1]
    assert _dist(again, grads) > 0                        # each step its own noise (fold_in of the step)


def test_poisson_user_sampling_rate_seed_and_cap():
    rng = np.random.default_rng([7, 0, 3, 0x05E8])
    masks = poisson_masks(500, 0.1, 400, rng)
    assert masks.mean() == pytest.approx(0.1, rel=0.03)
    again = poisson_masks(500, 0.1, 400, np.random.default_rng([7, 0, 3, 0x05E8]))
    np.testing.assert_array_equal(masks, again)
    users, rates = np.array([500, 200, 0]), np.array([0.1, 0.25, 0.0])
    steps = np.array([user_steps(n, 50, 1) for n in users])
    assert steps.tolist() == [10, 4, 0]
    cap = poisson_cap(users, rates, steps, seed=7, rounds=3)
    assert cap % 8 == 0 and cap >= 50
    for r in range(3):
        for c in range(2):
            m = poisson_masks(users[c], rates[c], steps[c], np.random.default_rng([7, r, c, 0x05E8]))
            assert m.sum(axis=1).max() <= cap


def test_user_plan_and_ledger_recompute(tmp_path):
    users = np.array([400, 200, 100, 64])
    steps = np.array([user_steps(n, 64, 1) for n in users])
    config = PrivacyConfig(mode="personalized", unit="user", epsilon=4.0, clip_norm=0.5)
    sizes = users * 10
    plan = plan_privacy(config, sizes, 1.0, 5, UserSteps(users, steps, 64))
    np.testing.assert_allclose(plan.sampling_rates, 64 / users)
    assert plan.unit == "user" and plan.amplification and plan.steps_per_round.tolist() == steps.tolist()
    assert plan.planned_events.tolist() == (5 * steps).tolist()
    for k in range(4):   # calibrated: the planned steps spend eps_k, not more
        spent = accounting.epsilon_spent("rdp", float(plan.noise_multipliers[k]), int(plan.planned_events[k]),
                                         1e-5, float(plan.sampling_rates[k]), True)
        assert spent <= plan.eps_targets[k] * (1 + 1e-6) and spent == pytest.approx(plan.eps_targets[k], rel=1e-2)
    ledger = PrivacyLedger(plan, np.arange(4), sizes)
    for t in range(1, 6):
        ledger.begin_round(t)
        ledger.end_round(np.array([True, True, t % 2 == 0, True]))
    path = ledger.write(tmp_path)
    rows = read_ledger(path)
    assert [r["unit"] for r in rows] == ["user"] * 4
    assert [r["steps"] for r in rows] == [5 * steps[0], 5 * steps[1], 2 * steps[2], 5 * steps[3]]
    assert [r["rounds_accounted"] for r in rows] == [5, 5, 2, 5]
    assert check_ledger(path) == []
    np.testing.assert_allclose([r["sampling_rate"] for r in rows], 64 / users)


def test_a_silo_smaller_than_its_batch_is_refused():
    with pytest.raises(FedscopeError, match=r"client 2 has 30 users, fewer than the expected batch "
                                            r"train.batch_size=64 .*--set train.batch_size=30"):
        UserSteps(np.array([400, 200, 30]), np.array([7, 4, 1]), 64).rates()


def test_user_unit_refuses_what_it_does_not_support():
    for kw, flag in [({"mode": "central"}, "unit"), ({"clipping": "adaptive"}, "clipping"),
                     ({"amplification": True}, "amplification"), ({"secagg": True}, "secagg")]:
        with pytest.raises(FedscopeError, match=f"privacy.{flag}"):
            PrivacyConfig(unit="user", **kw)


def test_one_users_sequence_contrastive_term_is_zero(params):
    """Why the user unit refuses model.loss.seqcl_weight (train/federated.py): on a batch of one user CL4SRec's
    InfoNCE has no negatives, so the term is 0 and changes neither the loss nor its gradient."""
    cl = dataclasses.replace(MC, loss=dataclasses.replace(MC.loss, seqcl_weight=0.1))
    one = {k: v[:1] for k, v in _batch(np.random.default_rng(5), 1).items() if k != "user_mask"}

    def grad(config):
        f = functools.partial(loss_fn, config=config, train=True, per_user=True)
        return jax.value_and_grad(f, has_aux=True)(params, one, jax.random.key(2))

    (total, aux), g = grad(cl)
    (total0, _), g0 = grad(MC)
    assert float(aux["seqcl"]) == 0.0 and float(total) == pytest.approx(float(total0), abs=1e-6)
    assert _dist(g, g0) < 1e-6
    two = {k: v[:2] for k, v in _batch(np.random.default_rng(5), 2).items() if k != "user_mask"}
    (_, aux2), _ = jax.value_and_grad(functools.partial(loss_fn, config=cl, train=True), has_aux=True)(
        params, two, jax.random.key(2))
    assert float(aux2["seqcl"]) > 0.0   # with another user's views as negatives the term is there


def test_without_item_ids_the_bound_holds_and_nothing_is_per_item():
    """model.item_ids=off (fewer private dimensions): items come from public vectors (data, closed over by the
    loss), every trained parameter is shared, one user's replacement still moves the pre-noise sum by <= 2C,
    and no local vocabulary is used (there are no per-item rows)."""

    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.vocab import uses_local_vocab

    rng = np.random.default_rng(5)
    sem = _public_vectors(rng)
    mc = dataclasses.replace(MC, item_ids="off")
    p = init_params(jax.random.key(0), mc, N_ITEMS, sem)
    assert not any("item_emb" in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(p))
    loss = functools.partial(loss_fn, config=mc, train=True, per_user=True, semantic=sem)
    batch, clip = _batch(rng, 6), 0.05
    base, losses = _sum(loss, p, batch, clip)
    assert np.all(np.isfinite(np.asarray(losses))) and float(optax.tree.norm(base)) > 0
    for u in range(6):
        assert _dist(_sum(loss, p, _replace_user(batch, u, rng), clip)[0], base) <= 2 * clip * (1 + 1e-5)
    assert not uses_local_vocab(load_config(None, ["model.item_ids=off"]))
    assert uses_local_vocab(load_config(None, []))


@pytest.mark.parametrize("item_ids", ["off", "train"])
def test_per_item_biases_are_dense_and_keep_the_bound(item_ids):
    """model.item_bias: the per-item score biases take the DP-SGD gradient like every other parameter (the
    pre-noise sum of a batch reaches them, and one user's replacement moves it by <= 2C), and in the user
    unit they are dense (no local vocabulary: every row gets the step's noise)."""

    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import client_config
    from fedscope_jax.train.vocab import uses_local_vocab

    rng = np.random.default_rng(6)
    sem = _public_vectors(rng)
    mb = dataclasses.replace(MC, item_ids=item_ids, item_bias=True)
    p = init_params(jax.random.key(0), mb, N_ITEMS, sem)
    for d in range(2):   # distinct per-item values (a constant shift would not change any softmax)
        tower = p[f"domain_{d}"]
        tower["item_bias"] = jnp.asarray(rng.normal(size=tower["item_bias"].shape).astype(np.float32))
    loss = functools.partial(loss_fn, config=mb, train=True, per_user=True, semantic=sem)
    batch, clip = _batch(rng, 6), 0.05
    base, _ = _sum(loss, p, batch, clip)
    assert all(float(optax.tree.norm(base[f"domain_{d}"]["item_bias"])) > 0 for d in range(2))
    for u in range(6):
        assert _dist(_sum(loss, p, _replace_user(batch, u, rng), clip)[0], base) <= 2 * clip * (1 + 1e-5)
    user = load_config(None, [f"model.item_ids={item_ids}", "model.item_bias=true", "privacy.unit=user"])
    assert not uses_local_vocab(user) and client_config(user, n_domains=2).sparse_tables == ()


# --- per-user rows: each user's gradient of the item tables on that user's own rows (engine/client.py
# `user_rows_sum`, train/vocab.py `localize_users`) ---

_ROWS_SUM = jax.jit(user_rows_sum, static_argnums=(0, 5, 6))


def _with_negatives(batch, loss_cfg, seed):
    """The batch (numpy, a step axis of 1) with host-drawn negatives, as the user unit's source draws them."""
    host = {k: np.asarray(v)[None] for k, v in batch.items()}
    if loss_cfg.rec in ("gbce", "sampled"):
        host = add_negatives(host, N_ITEMS, loss_cfg.num_negatives, np.random.default_rng(seed),
                             per_user=loss_cfg.rec == "gbce")
    return host


def _rows_batch(host):
    """(the per-user localized step of `host`, its tables): what `user_rows_sum` reads."""
    local, rows = localize_users(host, N_ITEMS)
    local.update({USER_VOCAB + name: ids for name, ids in rows.items()})
    return {k: jnp.asarray(v[0]) for k, v in local.items()}


def _dense_batch(host):
    """The same step with global ids for `mechanism.clipped_user_sum` (every field per user: shared negatives
    copied to each user; the catalogue size then comes from the dense tables)."""
    out = {k: v[0] for k, v in host.items() if k != "neg_pool"}
    if "neg" in out and out["neg"].ndim == 2:
        out["neg"] = np.broadcast_to(out["neg"], (out["seq"].shape[0],) + out["neg"].shape)
    return {k: jnp.asarray(v) for k, v in out.items()}


@pytest.mark.parametrize("loss_cfg,item_bias,semantic,microbatch,dropout", [
    (LossConfig(rec="gbce", num_negatives=6, alpha=0.5), False, False, 0, 0.0),
    (LossConfig(rec="gbce", num_negatives=6, alpha=0.5), True, True, 2, 0.2),
    (LossConfig(rec="sampled", num_negatives=6, alpha=0.5), True, False, 2, 0.0),
    (LossConfig(rec="in_batch", logq=True, num_negatives=6, alpha=0.5), False, True, 2, 0.2)])
def test_per_user_rows_give_the_dense_clipped_sum(loss_cfg, item_bias, semantic, microbatch, dropout):
    """The clipped sum taken on each user's own rows equals jax_privacy's per-user clipping of whole-table
    gradients (same keys, hence the same dropout and in-batch draws; the same host negatives): the same norms
    (unique rows), the same clipped sum, scattered dense; padding users at the end change nothing; and every
    user's raw gradient is above C (so the clipping, hence the norms, decide the sum)."""
    rng = np.random.default_rng(40)
    sem = _public_vectors(rng) if semantic else None
    mc = dataclasses.replace(MC, loss=loss_cfg, item_bias=item_bias, dropout=dropout)
    p = init_params(jax.random.key(0), mc, N_ITEMS, sem)
    if item_bias:
        for d in range(2):
            p[f"domain_{d}"]["item_bias"] = jnp.asarray(rng.normal(size=p[f"domain_{d}"]["item_bias"].shape),
                                                        jnp.float32)
    loss = functools.partial(loss_fn, config=mc, train=True, per_user=True, semantic=sem)
    tables = sparse_tables(2, item_bias=item_bias)
    host = _with_negatives(_batch(rng, 6, pad=2), loss_cfg, 41)
    key, clip = jax.random.key(7), jnp.float32(0.05)
    for c in (clip, jnp.float32(jnp.inf)):
        dense, dense_loss = _CLIPPED_SUM(loss, p, _dense_batch(host), key, jnp.asarray(host["user_mask"][0]), c)
        rows, rows_loss = _ROWS_SUM(loss, p, _rows_batch(host), key, c, tables, microbatch)
        assert _dist(rows, dense) <= 1e-5 * max(float(optax.tree.norm(dense)), 1e-3)
        np.testing.assert_allclose(np.asarray(rows_loss)[:6], np.asarray(dense_loss)[:6], rtol=1e-5)
        assert np.all(np.asarray(rows_loss)[6:] == 0)
    for u in range(6):   # each user alone, unclipped: above C
        alone = {k: v.copy() for k, v in host.items()}
        alone["user_mask"] = (np.arange(8) == u)[None]
        assert float(optax.tree.norm(_ROWS_SUM(loss, p, _rows_batch(alone), key, jnp.float32(jnp.inf), tables,
                                               microbatch)[0])) > 0.05
    unpadded = {k: v[:, :6] if k != "neg_pool" else v for k, v in host.items()}
    alone, _ = _ROWS_SUM(loss, p, _rows_batch(unpadded), key, clip, tables, microbatch)
    padded, _ = _ROWS_SUM(loss, p, _rows_batch(host), key, clip, tables, microbatch)
    assert _dist(alone, padded) < 1e-6


def test_per_user_rows_keep_the_sensitivity(params):
    """Replacing one user moves the rows' clipped sum by <= 2C, removing one by <= C (gBCE, host negatives)."""
    rng = np.random.default_rng(42)
    tables, clip, key = sparse_tables(2, item_bias=False), jnp.float32(0.05), jax.random.key(3)
    batch = _batch(rng, 6)
    base, _ = _ROWS_SUM(USER_LOSS, params, _rows_batch(_with_negatives(batch, MC.loss, 1)), key, clip, tables, 0)
    for u in range(6):
        moved = _with_negatives(_replace_user(batch, u, rng), MC.loss, 1)
        assert _dist(_ROWS_SUM(USER_LOSS, params, _rows_batch(moved), key, clip, tables, 0)[0], base) \
            <= 2 * 0.05 * (1 + 1e-5)
        removed = _with_negatives(dict(batch, user_mask=batch["user_mask"].at[u].set(False)), MC.loss, 1)
        assert _dist(_ROWS_SUM(USER_LOSS, params, _rows_batch(removed), key, clip, tables, 0)[0], base) \
            <= 0.05 * (1 + 1e-5)


def test_per_user_rows_with_padding_between_real_users(params):
    """Padding users need not come last: a real user after a microbatch of padding is still counted (the
    microbatches run through the last one that holds a real user), and removing any user moves the sum by <= C."""
    rng = np.random.default_rng(43)
    tables, clip, key = sparse_tables(2, item_bias=False), jnp.float32(0.05), jax.random.key(3)
    batch = _batch(rng, 8)
    gaps = dict(batch, user_mask=jnp.asarray([True, False, False, False, True, True, False, True]))
    host = _with_negatives(gaps, MC.loss, 2)
    base, losses = _ROWS_SUM(USER_LOSS, params, _rows_batch(host), key, clip, tables, 2)
    assert np.all(np.asarray(losses)[[0, 4, 5, 7]] > 0)   # user 7's microbatch comes after one of padding only
    for u in (0, 4, 5, 7):
        removed = {k: v.copy() for k, v in host.items()}
        removed["user_mask"][0, u] = False
        moved = _dist(_ROWS_SUM(USER_LOSS, params, _rows_batch(removed), key, clip, tables, 2)[0], base)
        assert 0 < moved <= 0.05 * (1 + 1e-5), (u, moved)


def test_localize_users_on_a_hand_made_batch():
    """Each user's rows are its own sorted unique ids (row 0 first, PAD_ROW after); its local ids name them."""
    seq = np.array([[[[0, 3, 5], [0, 0, 2]], [[4, 4, 1], [7, 7, 7]]]], np.int32)        # [S 1, B 2, D 2, L 3]
    target = np.array([[[[3, 5, 9], [0, 2, 6]], [[4, 1, 4], [7, 7, 1]]]], np.int32)
    neg = np.array([[[[9, 1], [6, 6]], [[2, 2], [3, 1]]]], np.int32)                     # per user [1, 2, 2, 2]
    local, rows = localize_users({"seq": seq, "target": target, "neg": neg}, (9, 7))
    pad = PAD_ROW
    np.testing.assert_array_equal(rows["domain_0"][0], [[0, 1, 3, 5, 9, pad, pad, pad, pad],
                                                        [0, 1, 2, 4, pad, pad, pad, pad, pad]])
    np.testing.assert_array_equal(rows["domain_1"][0], [[0, 2, 6, pad, pad, pad, pad, pad],
                                                        [0, 1, 3, 7, pad, pad, pad, pad]])
    for field, glob in (("seq", seq), ("target", target), ("neg", neg)):
        for d in range(2):
            back = np.take_along_axis(rows[f"domain_{d}"], local[field][:, :, d], axis=-1)
            np.testing.assert_array_equal(back, glob[:, :, d])
    shared = localize_users({"seq": seq, "target": target, "neg": neg[:, 0]}, (9, 7))[0]["neg"]
    assert shared.shape == (1, 2, 2, 2)                      # shared negatives: each user's own local ids
    with pytest.raises(FedscopeError, match="domain 1 has item ids outside 0..7"):
        localize_users({"seq": seq, "target": np.where(target == 6, 8, target), "neg": neg}, (9, 7))


def test_local_item_ids_without_their_negatives_are_refused(params):
    """On local rows the tables are not the catalogue: gBCE without the host's negatives and catalogue size
    would draw and calibrate against the wrong item count, so it is refused."""
    batch = dict(_batch(np.random.default_rng(0), 1), vocab={"domain_0": jnp.arange(6), "domain_1": jnp.arange(6)})
    with pytest.raises(ValueError, match="needs the host-drawn batch fields"):
        USER_LOSS(params, batch, jax.random.key(0))
    with pytest.raises(FedscopeError, match="no field user_vocab/domain_0, user_vocab/domain_1"):
        user_rows_sum(USER_LOSS, params, _batch(np.random.default_rng(0), 2), jax.random.key(0), jnp.float32(1.0),
                      sparse_tables(2, item_bias=False))
    full = dataclasses.replace(MC, loss=dataclasses.replace(MC.loss, rec="full"))
    with pytest.raises(ValueError, match="the full softmax needs every item"):
        loss_fn(params, batch, jax.random.key(0), full, train=True, per_user=True)


def test_user_norm_is_refused_where_no_per_user_loss_is_trained(tmp_path, capsys):
    """--mode centralized / local train no per-user loss: `model.loss.user_norm length` is refused there."""
    from fedscope_jax.cli import main

    for mode in ("centralized", "local"):
        out = tmp_path / mode
        assert main(["train", "--mode", mode, "--data", str(tmp_path / "none"), "--out", str(out),
                     "--set", "model.loss.user_norm=length"]) == 2
        assert f"--mode {mode} has no per-user loss" in capsys.readouterr().err
        assert not out.exists()

"""CL4SRec-style sequence contrastive term: augmentations (padding, masks, seeding), InfoNCE value, wiring."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError
from fedscope_jax.losses import seqcl
from fedscope_jax.model import LossConfig, ModelConfig, init_params, loss_fn

crop = jax.jit(seqcl.crop, static_argnums=(2,))
mask = jax.jit(seqcl.mask, static_argnums=(2,))
reorder = jax.jit(seqcl.reorder, static_argnums=(2,))
augment = jax.jit(seqcl.augment, static_argnums=(2, 3, 4))
nt_xent = jax.jit(seqcl.nt_xent, static_argnums=(3,))
# one compiled (loss, aux), grads program per config, shared by the tests (compiles dominate their time)
_value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnames=("config",))

L = 8
# rows: 5 items, 1 item, no history, a full row of 8 items
SEQ = jnp.array([[0, 0, 0, 11, 12, 13, 14, 15],
                 [0, 0, 0, 0, 0, 0, 0, 7],
                 [0] * 8,
                 [21, 22, 23, 24, 25, 26, 27, 28]], jnp.int32)


def _items(row):
    row = np.asarray(row)
    return row[row > 0]


def _left_padded(row):
    row = np.asarray(row)
    nz = np.flatnonzero(row > 0)
    return nz.size == 0 or (nz[-1] == row.size - 1 and np.all(row[nz[0]:] > 0))


def test_crop_keeps_a_contiguous_run_left_padded_and_seeded():
    starts = set()
    for s in range(30):
        out = np.asarray(crop(SEQ, jax.random.key(s), 0.6))
        for r in range(4):
            assert _left_padded(out[r])
            orig = list(_items(SEQ[r]))
            got = list(_items(out[r]))
            assert len(got) == (max(1, math.floor(0.6 * len(orig))) if orig else 0)
            if got:
                i = orig.index(got[0])
                assert orig[i:i + len(got)] == got            # a contiguous run of the original order
                if r == 0:
                    starts.add(i)
    assert starts == {0, 1, 2}                                # every start of a 3-of-5 crop occurs
    a, b = crop(SEQ, jax.random.key(3), 0.6), crop(SEQ, jax.random.key(3), 0.6)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mask_hides_exactly_floor_gamma_n_real_items():
    many = jnp.tile(SEQ, (100, 1))
    keep = np.asarray(mask(many, jax.random.key(0), 0.3))
    real = np.asarray(many) > 0
    assert not keep[~real].any()                              # padding is never "kept"
    hidden = real & ~keep
    np.testing.assert_array_equal(hidden.sum(1), np.tile([1, 0, 0, 2], 100))   # floor(0.3 * n)
    per_position = hidden[0::4].sum(0)                        # the 5-item row, 100 draws
    assert per_position[:3].sum() == 0 and (per_position[3:] >= 8).all()      # uniform over the real positions


def test_reorder_permutes_one_window_only():
    changed = False
    for s in range(20):
        out = np.asarray(reorder(SEQ, jax.random.key(s), 0.6))
        for r in range(4):
            assert _left_padded(out[r])
            orig, got = np.asarray(SEQ[r]), out[r]
            assert sorted(orig) == sorted(got)
            diff = np.flatnonzero(orig != got)
            if diff.size:
                changed = True
                n = int((orig > 0).sum())
                assert diff[-1] - diff[0] + 1 <= math.floor(0.6 * n)    # inside one window of r items
        np.testing.assert_array_equal(out[1], np.asarray(SEQ[1]))       # r = 0 for one item
    assert changed


def test_augment_keeps_padding_and_masks_consistent_and_is_seeded():
    big = jnp.tile(SEQ, (8, 1))
    out, keep = augment(big, jax.random.key(0), 0.6, 0.3, 0.6)
    out, keep = np.asarray(out), np.asarray(keep)
    assert all(_left_padded(r) for r in out)
    assert not keep[out == 0].any()
    assert (out > 0).sum() >= keep.sum()
    assert not out[2::4].any()                                # no history stays no history
    ops = set()
    for r in range(0, out.shape[0], 4):                       # rows of the 5-item user: which op did it get?
        n_out, n_keep = (out[r] > 0).sum(), keep[r].sum()
        ops.add("crop" if n_out == 3 else "mask" if n_keep == 4 else "reorder")
    assert ops == {"crop", "mask", "reorder"}
    out2, keep2 = augment(big, jax.random.key(0), 0.6, 0.3, 0.6)
    np.testing.assert_array_equal(out, np.asarray(out2))
    np.testing.assert_array_equal(keep, np.asarray(keep2))
    out3, _ = augment(big, jax.random.key(1), 0.6, 0.3, 0.6)
    assert not np.array_equal(out, np.asarray(out3))


def test_nt_xent_hand_computed():
    z = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    # every view: positive cosine 1, negatives cosines 0, 0 (the other user's views) and itself excluded
    want = math.log(math.e + 2) - 1
    assert float(nt_xent(z, z, jnp.array([True, True]), 1.0)) == pytest.approx(want, rel=1e-6)
    # a third, invalid user changes nothing; tau scales the similarities
    z3 = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    zb = jnp.array([[1.0, 0.0], [0.0, 1.0], [-3.0, 1.0]])
    assert float(nt_xent(z3, zb, jnp.array([True, True, False]), 1.0)) == pytest.approx(want, rel=1e-6)
    assert float(nt_xent(z, z, jnp.array([True, True]), 0.5)) == pytest.approx(math.log(math.e ** 2 + 2) - 2,
                                                                              rel=1e-6)
    assert float(nt_xent(z3, zb, jnp.zeros(3, bool), 1.0)) == 0.0


def test_nt_xent_matches_numpy_reference():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    valid = np.array([True, True, False, True, True])
    got = float(nt_xent(jnp.array(z1, jnp.float32), jnp.array(z2, jnp.float32), jnp.array(valid), 0.3))
    v = np.concatenate([z1[valid], z2[valid]])
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    s = v @ v.T / 0.3
    n = int(valid.sum())
    terms = []
    for i in range(2 * n):
        p = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        terms.append(np.log(np.sum(np.exp(s[i, others]))) - s[i, p])
    assert got == pytest.approx(float(np.mean(terms)), rel=1e-5)


CFG = ModelConfig(dim=8, blocks=1, heads=2, dropout=0.2, max_len=L, fusion_hidden=8,
                  loss=LossConfig(num_negatives=5))


def _batch():
    seq = jnp.stack([SEQ % 10 + (SEQ > 0), SEQ % 12 + (SEQ > 0)], axis=1)      # [4, 2, L] ids in range
    target = jnp.where(seq > 0, jnp.roll(seq, -1, axis=2), 0).at[:, :, -1].set(3)
    target = jnp.where(seq > 0, target, 0)
    pad = jnp.zeros((2, 2, L), jnp.int32)                                       # two padding users
    return {"seq": jnp.concatenate([seq, pad]), "target": jnp.concatenate([target, pad])}


ON = dataclasses.replace(CFG, loss=dataclasses.replace(CFG.loss, seqcl_weight=0.5))


def test_weight_zero_leaves_the_loss_unchanged_and_the_term_adds_on_top():
    params = init_params(jax.random.key(0), CFG, (10, 12))
    batch, key = _batch(), jax.random.key(5)
    (base, aux0), g_base = _value_and_grad(params, batch, key, config=CFG)
    # weight 0 with other seqcl settings traces exactly the program without the term (no extra op, no compile)
    off = dataclasses.replace(CFG, loss=dataclasses.replace(CFG.loss, seqcl_tau=0.1, seqcl_crop=0.2))
    jaxpr = lambda c: str(jax.make_jaxpr(lambda p, b, k: loss_fn(p, b, k, c, True))(params, batch, key))
    assert jaxpr(off) == jaxpr(CFG) != jaxpr(ON)
    assert float(aux0["seqcl"]) == 0.0
    (total, aux), g_on = _value_and_grad(params, batch, key, config=ON)
    # the seqcl key is its own purpose: every other term is bit-identical, the total adds 0.5 * L_seqcl
    for k in ("rec", "intra", "inter"):
        assert float(aux[k]) == float(aux0[k])
    assert float(aux["seqcl"]) > 0
    assert float(total) == pytest.approx(float(base) + 0.5 * float(aux["seqcl"]), rel=1e-6)
    leaves_on, leaves_base = jax.tree.leaves(g_on), jax.tree.leaves(g_base)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves_on)
    assert any(not np.allclose(np.asarray(a), np.asarray(b)) for a, b in zip(leaves_on, leaves_base))


def test_gradients_finite_when_no_user_has_history():
    params = init_params(jax.random.key(0), CFG, (10, 12))
    empty = {k: jnp.zeros_like(v) for k, v in _batch().items()}        # same shapes: the compiled program
    (total, aux), g = _value_and_grad(params, empty, jax.random.key(1), config=ON)
    assert float(total) == 0.0 and float(aux["seqcl"]) == 0.0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g))


def test_config_checks_the_seqcl_fields():
    with pytest.raises(FedscopeError, match="seqcl_mask"):
        LossConfig(seqcl_mask=1.5)
    with pytest.raises(FedscopeError, match="seqcl_tau"):
        LossConfig(seqcl_tau=0.0)

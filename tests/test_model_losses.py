"""Loss values against plain numpy references on tiny inputs; masks keep everything finite."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscope_jax.losses import iidcl, rec

next_item_loss = jax.jit(rec.next_item_loss)
intra_loss = jax.jit(iidcl.intra_loss, static_argnums=(2, 3, 4))
inter_loss = jax.jit(iidcl.inter_loss, static_argnums=(4,))


def _np_next_item(h, target, table, cand, bias=None):
    bias = np.zeros(table.shape[0]) if bias is None else bias
    tot, n = 0.0, 0
    for b in range(h.shape[0]):
        for l in range(h.shape[1]):
            t = target[b, l]
            if t == 0:
                continue
            logits = [h[b, l] @ table[t] + bias[t]] + [h[b, l] @ table[c] + bias[c] for c in cand
                                                       if c != t and c != 0]
            logits = np.array(logits, np.float64)
            tot += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0]
            n += 1
    return tot / n


def test_next_item_loss_sampled_and_full_match_numpy():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 4, 5)).astype(np.float32)
    table = rng.normal(size=(9, 5)).astype(np.float32)
    target = np.array([[0, 1, 2, 3], [0, 0, 4, 4], [8, 7, 6, 5]], np.int32)
    cand = np.array([2, 5, 0, 7, 7], np.int32)        # includes hits on targets, a padding id and a repeat
    got = next_item_loss(jnp.array(h), jnp.array(target), jnp.array(table[target]), jnp.array(cand),
                         jnp.array(table[cand]))
    assert float(got) == pytest.approx(_np_next_item(h, target, table, cand), rel=1e-5)
    full = np.arange(9, dtype=np.int32)
    got = next_item_loss(jnp.array(h), jnp.array(target), jnp.array(table[target]), jnp.array(full),
                         jnp.array(table))
    assert float(got) == pytest.approx(_np_next_item(h, target, table, full), rel=1e-5)
    empty = next_item_loss(jnp.array(h), jnp.zeros_like(jnp.array(target)), jnp.array(table[target]),
                           jnp.array(cand), jnp.array(table[cand]))
    assert float(empty) == 0.0


def test_full_softmax_matches_numpy_and_the_candidate_form():
    """The full softmax without per-candidate masks: every item (the target once) against the numpy reference
    and against `next_item_loss` given every item as its candidates, with and without per-item biases."""
    rng = np.random.default_rng(4)
    h = rng.normal(size=(3, 4, 5)).astype(np.float32)
    table = rng.normal(size=(9, 5)).astype(np.float32)
    bias = rng.normal(size=9).astype(np.float32)
    target = np.array([[0, 1, 2, 3], [0, 0, 4, 4], [8, 7, 6, 5]], np.int32)
    full = np.arange(9, dtype=np.int32)
    args = (jnp.array(h), jnp.array(target), jnp.array(table[target]))
    got = jax.jit(rec.full_softmax_loss)(*args, jnp.array(table[1:]))
    assert float(got) == pytest.approx(_np_next_item(h, target, table, full), rel=1e-5)
    assert float(got) == pytest.approx(float(next_item_loss(*args, jnp.array(full), jnp.array(table))), rel=1e-6)
    with_bias = jax.jit(rec.full_softmax_loss)(*args, jnp.array(table[1:]), jnp.array(bias[target]),
                                              jnp.array(bias[1:]))
    assert float(with_bias) == pytest.approx(_np_next_item(h, target, table, full, bias), rel=1e-5)
    assert float(jax.jit(rec.full_softmax_loss)(args[0], jnp.zeros_like(args[1]), args[2],
                                                jnp.array(table[1:]))) == 0.0
    with pytest.raises(ValueError, match="both target_bias and item_bias"):
        rec.full_softmax_loss(*args, jnp.array(table[1:]), jnp.array(bias[target]))


def test_next_item_loss_adds_each_items_bias_to_its_scores():
    """model.item_bias: b_i is added to item i's score as target and as candidate (numpy reference); the
    gradient reaches the biases of every target and candidate, never the padding row."""
    rng = np.random.default_rng(1)
    h = rng.normal(size=(3, 4, 5)).astype(np.float32)
    table = rng.normal(size=(9, 5)).astype(np.float32)
    bias = rng.normal(size=9).astype(np.float32)
    target = np.array([[0, 1, 2, 3], [0, 0, 4, 4], [8, 1, 6, 5]], np.int32)
    cand = np.array([2, 5, 0, 7, 7], np.int32)

    def loss(b):
        return rec.next_item_loss(jnp.array(h), jnp.array(target), jnp.array(table[target]), jnp.array(cand),
                                  jnp.array(table[cand]), b[target], b[cand])

    got, grad = jax.jit(jax.value_and_grad(loss))(jnp.array(bias))
    assert float(got) == pytest.approx(_np_next_item(h, target, table, cand, bias), rel=1e-5)
    assert float(got) != pytest.approx(_np_next_item(h, target, table, cand), rel=1e-3)
    touched = set(target.ravel()) | set(cand)
    assert all(abs(float(grad[i])) > 0 for i in touched - {0}) and float(grad[0]) == 0.0
    # item 7 is never a target: its bias only ever raises the loss (it is a negative)
    assert float(grad[7]) > 0


def _np_gbce(h, target, table, cand, beta):
    """gSASRec's loss, one position at a time: -beta log s(pos) - sum log(1 - s(neg)), every score shifted by
    log(beta / M) (M candidates)."""
    sig = lambda x: 1.0 / (1.0 + np.exp(-(x + np.log(beta / len(cand)))))  # noqa: E731
    per = []
    for b in range(h.shape[0]):
        for l in range(h.shape[1]):
            t = target[b, l]
            if t == 0:
                continue
            pos = float(h[b, l] @ table[t])
            negs = [float(h[b, l] @ table[c]) for c in cand if c != t and c != 0]
            per.append(-beta * np.log(sig(pos)) - sum(np.log(1 - sig(x)) for x in negs))
    return float(np.mean(per))


def test_gbce_beta_is_the_papers_calibration():
    """beta = alpha (t (1 - 1/alpha) + 1/alpha) with alpha = M / (N - 1); t = 0 is plain BCE (beta 1), t = 1
    gives beta = alpha; a sample as large as the catalogue caps alpha at 1."""
    for m, n, t in [(5, 11, 0.75), (256, 16258, 0.75), (50, 1001, 0.5), (3, 7, 1.0), (3, 7, 0.0)]:
        alpha = m / (n - 1)
        assert float(rec.gbce_beta(m, n, t)) == pytest.approx(alpha * (t * (1 - 1 / alpha) + 1 / alpha), rel=1e-6)
    assert float(rec.gbce_beta(5, 11, 1.0)) == pytest.approx(0.5)
    assert float(rec.gbce_beta(5, 11, 0.0)) == 1.0
    assert float(rec.gbce_beta(100, 50, 0.75)) == 1.0      # M > N - 1
    assert float(rec.gbce_beta(100, 0, 0.75)) == 1.0       # a padding step's zero pool stays finite


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_gbce_loss_matches_numpy(beta):
    """gBCE against a numpy reference (accidental hits and padding candidates removed); beta < 1 weighs the
    positive less, so the loss falls, and the gradient pushes the positive up and the negatives down."""
    rng = np.random.default_rng(2)
    h = rng.normal(size=(3, 4, 5)).astype(np.float32)
    table = rng.normal(size=(9, 5)).astype(np.float32)
    target = np.array([[0, 1, 2, 3], [0, 0, 4, 4], [8, 7, 6, 5]], np.int32)
    cand = np.array([2, 5, 0, 7, 7], np.int32)
    loss = jax.jit(rec.gbce_loss)
    got = loss(jnp.array(h), jnp.array(target), jnp.array(table[target]), jnp.array(cand), jnp.array(table[cand]),
               beta)
    assert float(got) == pytest.approx(_np_gbce(h, target, table, cand, beta), rel=1e-5)
    # all scores equal (h = 0): each position sits at the constant-score optimum the shift starts from,
    # beta log(1 + M / beta) + M log(1 + beta / M) with M = 5 candidates (hits and padding removed count out)
    flat = loss(jnp.zeros((1, 4, 5)), jnp.array([[0, 1, 3, 4]]), jnp.array(table[[[0, 1, 3, 4]]]),
                jnp.array([2, 5, 6, 7, 8]), jnp.array(table[[2, 5, 6, 7, 8]]), beta)
    assert float(flat) == pytest.approx(beta * np.log(1 + 5 / beta) + 5 * np.log(1 + beta / 5), rel=1e-5)
    bias = jnp.zeros(9)
    grad = jax.grad(lambda b: rec.gbce_loss(jnp.array(h), jnp.array(target), jnp.array(table[target]),
                                            jnp.array(cand), jnp.array(table[cand]), beta, b[target], b[cand]))(bias)
    assert float(grad[1]) < 0 and float(grad[7]) > 0 and float(grad[0]) == 0.0   # 1: only a target; 7: mostly negative
    empty = loss(jnp.array(h), jnp.zeros((3, 4), jnp.int32), jnp.array(table[target]), jnp.array(cand),
                 jnp.array(table[cand]), beta)
    assert float(empty) == 0.0


def test_per_user_candidates_with_biases_match_a_loop():
    """Candidates per user ([B, M], how gbce draws them) with per-item biases, for both losses: each user's
    positions scored against that user's own candidates only (numpy loop over users)."""
    rng = np.random.default_rng(4)
    h = rng.normal(size=(3, 4, 5)).astype(np.float32)
    table = rng.normal(size=(9, 5)).astype(np.float32)
    bias = rng.normal(size=9).astype(np.float32)
    target = np.array([[0, 1, 2, 3], [0, 0, 4, 4], [8, 7, 6, 5]], np.int32)
    cand = np.array([[2, 5, 0, 7], [4, 4, 1, 3], [6, 1, 1, 8]], np.int32)    # hits, padding, repeats
    args = (jnp.array(h), jnp.array(target), jnp.array(table[target]), jnp.array(cand), jnp.array(table[cand]))
    tb, cb = jnp.array(bias[target]), jnp.array(bias[cand])
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    soft, binary = [], []
    for b in range(3):
        for l in range(4):
            t = target[b, l]
            if t == 0:
                continue
            pos = float(h[b, l] @ table[t] + bias[t])
            negs = np.array([h[b, l] @ table[c] + bias[c] for c in cand[b] if c != t and c != 0], np.float64)
            logits = np.concatenate([[pos], negs])
            soft.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max() - pos)
            binary.append(-0.4 * np.log(sig(pos + np.log(0.4 / 4))) - np.sum(np.log(1 - sig(negs + np.log(0.4 / 4)))))
    assert float(rec.next_item_loss(*args, tb, cb)) == pytest.approx(np.mean(soft), rel=1e-5)
    assert float(rec.gbce_loss(*args, 0.4, tb, cb)) == pytest.approx(np.mean(binary), rel=1e-5)


def test_in_batch_log_q_is_each_items_share_of_the_real_targets():
    target = jnp.array([[0, 3, 3, 5], [0, 0, 3, 9]], jnp.int32)          # real targets: 3, 3, 5, 3, 9
    got = np.exp(np.asarray(rec.in_batch_log_q(target, jnp.array([3, 5, 9, 4, 0]))))
    np.testing.assert_allclose(got, [3 / 5, 1 / 5, 1 / 5, 1 / 5, 1 / 5], rtol=1e-6)   # 4 and 0: never drawn


def test_logq_corrected_in_batch_softmax_matches_numpy():
    """model.loss.logq: every score (target and candidates) minus log q of its item, q its share of the batch's
    real targets, then the same softmax; numpy reference."""
    from fedscope_jax.model import init_params, loss_fn
    from fedscope_jax.model.config import LossConfig, ModelConfig
    from fedscope_jax.model.functional import encode, item_repr

    cfg = ModelConfig(dim=8, blocks=1, heads=1, max_len=5, dropout=0.0,
                      loss=LossConfig(rec="in_batch", num_negatives=6, alpha=0.0, logq=True))
    params = init_params(jax.random.key(0), cfg, [9])
    seq = jnp.array([[[0, 1, 2, 3, 3]], [[0, 0, 4, 3, 2]], [[5, 6, 7, 8, 1]]], jnp.int32)
    target = jnp.array([[[0, 2, 3, 3, 4]], [[0, 0, 3, 2, 3]], [[6, 7, 8, 1, 3]]], jnp.int32)
    key = jax.random.key(3)
    got, _ = loss_fn(params, {"seq": seq, "target": target}, key, cfg, train=False)
    # the same negatives as the loss: its key split (domain 0; negatives key), then in_batch_negatives
    from fedscope_jax.model.objective import in_batch_negatives
    _, k_neg = jax.random.split(jax.random.split(key, 1)[0])
    cand = np.asarray(in_batch_negatives(target[:, 0], k_neg, 6))
    h = np.asarray(encode(params, cfg, 0, seq[:, 0]), np.float64)
    table = np.asarray(item_repr(params, cfg, 0, jnp.arange(10)), np.float64)
    t = np.asarray(target[:, 0])
    real = t[t > 0]
    log_q = {i: np.log(np.sum(real == i) / real.size) for i in set(real)}
    tot, n = 0.0, 0
    for b in range(t.shape[0]):
        for l in range(t.shape[1]):
            if t[b, l] == 0:
                continue
            logits = [h[b, l] @ table[t[b, l]] - log_q[t[b, l]]]
            logits += [h[b, l] @ table[c] - log_q[c] for c in cand if c != t[b, l] and c != 0]
            logits = np.array(logits)
            tot += np.log(np.exp(logits - logits.max()).sum()) + logits.max() - logits[0]
            n += 1
    assert float(got) == pytest.approx(tot / n, rel=1e-5)
    plain, _ = loss_fn(params, {"seq": seq, "target": target}, key,
                       ModelConfig(dim=8, blocks=1, heads=1, max_len=5, dropout=0.0,
                                   loss=LossConfig(rec="in_batch", num_negatives=6, alpha=0.0)), train=False)
    assert float(plain) != pytest.approx(float(got), rel=1e-3)


@pytest.mark.parametrize("kw,msg", [({"rec": "bpr"}, "expected one of sampled, in_batch, full, gbce"),
                                    ({"rec": "gbce", "gbce_t": 1.5}, "gbce_t=1.5"),
                                    ({"rec": "sampled", "logq": True}, "logq=true needs model.loss.rec=in_batch")])
def test_loss_config_refuses_bad_settings(kw, msg):
    from fedscope_jax.errors import FedscopeError
    from fedscope_jax.model.config import LossConfig

    with pytest.raises(FedscopeError, match=msg):
        LossConfig(**kw)


def _cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def _np_intra(z, valid, tau, rho, k_max):
    idx = np.flatnonzero(valid)
    n = idx.size
    k = max(1, min(math.ceil(rho * n), k_max, n - 1))
    s = _cos(z, z) / tau
    losses = []
    for i in idx:
        others = [j for j in idx if j != i]
        order = sorted(others, key=lambda j: -s[i, j])[:k]
        lse = np.log(np.sum(np.exp(s[i, others])))
        losses.append(np.mean([lse - s[i, p] for p in order]))
    return float(np.mean(losses))


@pytest.mark.parametrize("rho,k_max", [(0.3, 50), (1.0, 2), (0.01, 5)])
def test_intra_loss_matches_numpy(rho, k_max):
    rng = np.random.default_rng(1)
    z = rng.normal(size=(7, 4)).astype(np.float32)
    valid = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    got = intra_loss(jnp.array(z), jnp.array(valid), 0.5, rho, k_max)
    assert float(got) == pytest.approx(_np_intra(z.astype(np.float64), valid, 0.5, rho, k_max), rel=1e-4)


def test_inter_loss_matches_numpy_and_skips_single_domain_users():
    rng = np.random.default_rng(2)
    za, zb = rng.normal(size=(2, 6, 4))
    va = np.array([1, 1, 1, 0, 1, 1], bool)
    vb = np.array([1, 0, 1, 1, 1, 1], bool)
    s = _cos(za, zb) / 0.3
    terms = []
    for i in range(6):
        if va[i] and vb[i]:
            ab = np.log(np.sum(np.exp(s[i, vb]))) - s[i, i]
            ba = np.log(np.sum(np.exp(s[va, i]))) - s[i, i]
            terms.append(0.5 * (ab + ba))
    got = inter_loss(jnp.array(za, jnp.float32), jnp.array(zb, jnp.float32), jnp.array(va), jnp.array(vb), 0.3)
    assert float(got) == pytest.approx(float(np.mean(terms)), rel=1e-4)


def test_contrastive_losses_finite_with_no_valid_user():
    z = jnp.zeros((4, 3))
    none = jnp.zeros(4, bool)
    for fn in (lambda z: intra_loss(z, none, 0.2, 0.02, 50), lambda z: inter_loss(z, z, none, none, 0.2)):
        val, grad = jax.jit(jax.value_and_grad(fn))(z)
        assert float(val) == 0.0 and np.all(np.isfinite(np.asarray(grad)))
    one = jnp.array([True, False, False, False])
    val, grad = jax.jit(jax.value_and_grad(lambda z: intra_loss(z, one, 0.2, 0.02, 50)))(jnp.ones((4, 3)))
    assert float(val) == 0.0 and np.all(np.isfinite(np.asarray(grad)))

"""The towers: padding invariance, causal masking, semantic fusion masks, IIDCL weight 0, determinism."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedscope_jax.model import LossConfig, ModelConfig, all_item_repr, encode, init_params, item_repr, loss_fn

CFG = ModelConfig(dim=8, blocks=2, heads=2, dropout=0.3, max_len=10, fusion_hidden=8)
N_ITEMS = (12, 15)
# jitted once per test so eager dispatch of every Flax op does not dominate the run time
_loss = jax.jit(loss_fn, static_argnames=("config", "train"))
_encode = jax.jit(encode, static_argnames=("config", "d", "train"))


def _batch(rng, b=5, length=6, n_items=N_ITEMS):
    seq = np.zeros((b, 2, length), np.int32)
    tgt = np.zeros_like(seq)
    for i in range(b):
        for d in range(2):
            n = int(rng.integers(0, length + 1))
            items = rng.integers(1, n_items[d] + 1, n + 1)
            if n:
                seq[i, d, length - n:] = items[:-1]
                tgt[i, d, length - n:] = items[1:]
    return {"seq": jnp.array(seq), "target": jnp.array(tgt)}


def _semantic(rng, dim=6):
    out = []
    for n in N_ITEMS:
        mask = (rng.random(n + 1) < 0.6).astype(np.float32)
        mask[0] = 0
        out.append({"vectors": jnp.array(rng.normal(size=(n + 1, dim)).astype(np.float32) * mask[:, None]),
                    "mask": jnp.array(mask)})
    return out


@pytest.fixture(scope="module")
def params():
    return init_params(jax.random.key(0), CFG, N_ITEMS)


def test_prepending_padding_changes_no_output(params):
    batch = _batch(np.random.default_rng(0))
    seq = batch["seq"][:, 0]
    out = _encode(params, CFG, 0, seq)
    longer = jnp.concatenate([jnp.zeros((seq.shape[0], 3), jnp.int32), seq], axis=1)
    out_long = _encode(params, CFG, 0, longer)
    np.testing.assert_allclose(np.asarray(out_long[:, 3:]), np.asarray(out), atol=1e-5)
    assert not np.asarray(out_long[:, :3]).any()
    assert not np.asarray(out)[np.asarray(seq) == 0].any()


def test_padding_users_and_positions_change_no_loss(params):
    cfg = dataclasses.replace(CFG, loss=LossConfig(num_negatives=7, rho=0.5))
    batch = _batch(np.random.default_rng(1))
    key = jax.random.key(3)
    base, aux = _loss(params, batch, key, cfg, train=False)
    padded = {k: jnp.concatenate([jnp.pad(v, ((0, 0), (0, 0), (2, 0))), jnp.zeros((3, 2, 8), jnp.int32)])
              for k, v in batch.items()}
    more, aux2 = _loss(params, padded, key, cfg, train=False)
    assert float(more) == pytest.approx(float(base), rel=1e-5)
    for k in ("rec", "intra", "inter"):
        assert float(aux2[k]) == pytest.approx(float(aux[k]), rel=1e-5, abs=1e-7)


def test_a_position_never_sees_the_future(params):
    seq = jnp.array([[0, 3, 5, 7, 2, 9]], jnp.int32)
    out = np.asarray(_encode(params, CFG, 1, seq))
    for t in range(1, 6):
        changed = seq.at[0, t].set(11)
        out2 = np.asarray(_encode(params, CFG, 1, changed))
        np.testing.assert_allclose(out2[0, :t], out[0, :t], atol=1e-6)
        assert np.abs(out2[0, t:] - out[0, t:]).max() > 1e-4


def test_semantic_fusion_only_touches_items_with_a_vector():
    rng = np.random.default_rng(2)
    sem = _semantic(rng)
    p = init_params(jax.random.key(1), CFG, N_ITEMS, sem)
    assert "fuse_in" in p["domain_0"] and p["domain_0"]["fuse_in"]["kernel"].shape == (CFG.dim + 6, 8)
    reps = np.asarray(all_item_repr(p, CFG, 0, sem))
    ids_only = np.asarray(p["domain_0"]["item_emb"])
    mask = np.asarray(sem[0]["mask"]) > 0
    np.testing.assert_allclose(reps[~mask], ids_only[~mask], atol=1e-6)
    assert np.abs(reps[mask] - ids_only[mask]).max() > 1e-3
    # changing the vector of an item without a vector (mask 0) changes nothing
    vec = np.asarray(sem[0]["vectors"]).copy()
    vec[~mask] = 5.0
    sem2 = [{"vectors": jnp.array(vec), "mask": sem[0]["mask"]}, sem[1]]
    np.testing.assert_allclose(np.asarray(all_item_repr(p, CFG, 0, sem2)), reps, atol=1e-6)
    loss, _ = _loss(p, _batch(rng), jax.random.key(0), CFG, True, sem)
    assert np.isfinite(float(loss))
    with pytest.raises(ValueError, match="semantic"):
        item_repr(p, CFG, 0, jnp.array([1, 2]))


def test_without_item_ids_an_item_is_its_vector_and_the_rest_share_one():
    """model.item_ids=off: no per-item parameter (no item_emb), an item with a vector is the fusion MLP
    of that vector alone (two items with equal vectors are equal), every item without one is the domain's
    unknown vector, and no gradient has a per-item row."""
    rng = np.random.default_rng(7)
    sem = _semantic(rng)
    vec = np.asarray(sem[0]["vectors"]).copy()
    mask = np.asarray(sem[0]["mask"]) > 0
    a, b = np.flatnonzero(mask)[:2]
    vec[b] = vec[a]
    sem = [{"vectors": jnp.array(vec), "mask": sem[0]["mask"]}, sem[1]]
    cfg = dataclasses.replace(CFG, item_ids="off")
    p = init_params(jax.random.key(1), cfg, N_ITEMS, sem)
    tower = p["domain_0"]
    assert "item_emb" not in tower and tower["unknown_emb"].shape == (CFG.dim,)
    assert tower["fuse_in"]["kernel"].shape == (6, 8)        # the vector alone, no ID half
    reps = np.asarray(all_item_repr(p, cfg, 0, sem))
    np.testing.assert_allclose(reps[b], reps[a], atol=1e-6)
    np.testing.assert_allclose(reps[~mask], np.broadcast_to(tower["unknown_emb"], reps[~mask].shape), atol=1e-6)
    assert np.abs(reps[mask] - np.asarray(tower["unknown_emb"])).min() > 1e-4
    grads = jax.jit(jax.grad(lambda q: loss_fn(q, _batch(rng), jax.random.key(0), cfg, True, sem)[0]))(p)
    sizes = {"/".join(str(getattr(k, "key", k)) for k in path): int(np.size(g))
             for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert not any("item_emb" in k for k in sizes) and sum(sizes.values()) < sum(
        int(np.size(g)) for g in jax.tree.leaves(init_params(jax.random.key(1), CFG, N_ITEMS, sem)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    with pytest.raises(Exception, match="model.item_ids=off .*--attributes"):
        init_params(jax.random.key(1), cfg, N_ITEMS)
    with pytest.raises(Exception, match="model.item_ids"):
        ModelConfig(item_ids="frozen")


def test_iidcl_gradients_finite_and_zero_at_weight_zero(params):
    batch = _batch(np.random.default_rng(4))
    key = jax.random.key(5)
    on = dataclasses.replace(CFG, loss=LossConfig(num_negatives=6, rho=0.5))
    off = dataclasses.replace(CFG, loss=LossConfig(num_negatives=6, rho=0.5, alpha=0.0))

    def terms(p):
        aux = loss_fn(p, batch, key, on, True)[1]
        return jnp.stack([aux["rec"], aux["intra"], aux["inter"]])

    jac = jax.jit(jax.jacrev(terms))(params)            # one program: the gradient of each term
    for i in (1, 2):                                    # intra, inter: finite and not trivially zero
        g = [np.asarray(x[i]) for x in jax.tree.leaves(jac)]
        assert all(np.all(np.isfinite(x)) for x in g) and max(np.abs(x).max() for x in g) > 0
    (total, aux), g_off = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, key, off, True), has_aux=True))(params)
    # with alpha = 0 the IIDCL terms are not even traced: the total is the next-item loss alone
    assert float(aux["intra"]) == 0.0 and float(aux["inter"]) == 0.0 and float(total) == float(aux["rec"])
    for a, b in zip(jax.tree.leaves(g_off), jax.tree.leaves(jac)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b[0]), rtol=1e-5, atol=1e-6)  # two programs: float32 order


def test_determinism_by_seed():
    batch = _batch(np.random.default_rng(6))
    a = init_params(jax.random.key(7), CFG, N_ITEMS)
    b = init_params(jax.random.key(7), CFG, N_ITEMS)
    c = init_params(jax.random.key(8), CFG, N_ITEMS)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
    l1 = _loss(a, batch, jax.random.key(1), CFG, True)[0]
    l2 = _loss(b, batch, jax.random.key(1), CFG, True)[0]
    l3 = _loss(a, batch, jax.random.key(2), CFG, True)[0]
    assert float(l1) == float(l2) and float(l1) != float(l3)


def test_loss_fn_vmaps_over_a_client_axis(params):
    rng = np.random.default_rng(9)
    batches = [_batch(rng) for _ in range(3)]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
    keys = jax.random.split(jax.random.key(0), 3)
    vm = jax.jit(jax.vmap(lambda b, k: _loss(params, b, k, CFG, False)[0]))(stacked, keys)
    for i in range(3):
        assert float(vm[i]) == pytest.approx(float(_loss(params, batches[i], keys[i], CFG, False)[0]), rel=1e-5)


@pytest.mark.parametrize("loss,per_user,model", [
    (LossConfig(rec="full", seqcl_weight=0.5), False, {}), (LossConfig(rec="sampled", num_negatives=7), False, {}),
    (LossConfig(rec="gbce", num_negatives=7), True, {}),
    (LossConfig(rec="in_batch", logq=True, num_negatives=7), False, {}),
    (LossConfig(rec="gbce", num_negatives=7), False, {"item_bias": True, "shared_encoder": True}),
], ids=["full_seqcl", "sampled", "gbce_per_user", "in_batch_logq", "gbce_bias_shared_encoder"])
def test_a_domain_absent_from_the_batch_is_skipped_and_changes_nothing(loss, per_user, model, monkeypatch):
    """A batch without any item of domain 1 (a domain client's batch under `--scheme domain`): with
    skip_absent the loss takes the skip for each domain (`objective.when_present`, spied on; domain 1 is
    absent, domain 0 present), and its value and every gradient equal those of the same program computing
    them all (when_present replaced by a plain call); domain 1's gradient is exactly zero. Under vmap (the
    predicate batched) clients with and without the domain get each its own loss and gradients."""
    from fedscope_jax.model import objective

    cfg = dataclasses.replace(CFG, loss=loss, **model)
    params = init_params(jax.random.key(3), cfg, N_ITEMS)
    batch = _batch(np.random.default_rng(11))
    one = {k: v.at[:, 1].set(0) for k, v in batch.items()}
    assert bool(objective._present(one["seq"][:, 0], one["target"][:, 0]))
    assert not bool(objective._present(one["seq"][:, 1], one["target"][:, 1]))
    key = jax.random.key(5)

    def value_and_grad(b, skip=True):
        fn = lambda p: loss_fn(p, b, key, cfg, True, per_user=per_user, skip_absent=skip)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(params)   # a new jit: traced with the current when_present

    real, calls = objective.when_present, []
    with monkeypatch.context() as m:
        m.setattr(objective, "when_present", lambda present, fn: calls.append(1) or real(present, fn))
        skipped, g_skipped = value_and_grad(one)
    assert len(calls) == (4 if loss.seqcl_weight else 2)   # traced once: each domain's terms (and seqcl's)
    with monkeypatch.context() as m:
        m.setattr(objective, "when_present", lambda present, fn: fn())
        computed, g_computed = value_and_grad(one)
    assert float(skipped) == pytest.approx(float(computed), rel=1e-6) and float(skipped) > 0
    for a, b in zip(jax.tree.leaves(g_skipped), jax.tree.leaves(g_computed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert all(not np.asarray(g).any() for g in jax.tree.leaves(g_skipped["domain_1"]))
    assert any(np.asarray(g).any() for g in jax.tree.leaves(g_skipped["domain_0"]))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), batch, one)
    fn = lambda p, b: loss_fn(p, b, key, cfg, True, per_user=per_user, skip_absent=True)[0]  # noqa: E731
    vm, g_vm = jax.jit(jax.vmap(jax.value_and_grad(fn), in_axes=(None, 0)))(params, stacked)
    full, g_full = value_and_grad(batch, skip=False)
    np.testing.assert_allclose(np.asarray(vm), [float(full), float(skipped)], rtol=1e-5)
    for i, ref in enumerate((g_full, g_skipped)):
        for a, b in zip(jax.tree.leaves(g_vm), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), rtol=1e-4, atol=1e-6)


def test_the_full_softmax_in_the_objective_is_every_item_as_a_candidate():
    """loss_fn with rec=full (and per-item biases) equals the candidate-form softmax over every item, row 0
    included as padding (next_item_loss removes it), summed over domains."""
    from fedscope_jax.losses.rec import next_item_loss
    from fedscope_jax.model.functional import item_bias

    cfg = dataclasses.replace(CFG, loss=LossConfig(rec="full", alpha=0.0), item_bias=True)
    params = init_params(jax.random.key(4), cfg, N_ITEMS)
    for d in range(2):   # non-zero biases, so that their slicing matters
        tower = params[f"domain_{d}"]
        tower["item_bias"] = jax.random.normal(jax.random.key(d), tower["item_bias"].shape)
    batch = _batch(np.random.default_rng(12))
    got = _loss(params, batch, jax.random.key(0), cfg, False)[1]["rec"]
    want = 0.0
    for d, n in enumerate(N_ITEMS):
        h = encode(params, cfg, d, batch["seq"][:, d])
        ids = jnp.arange(n + 1)
        tgt = batch["target"][:, d]
        want += float(next_item_loss(h, tgt, item_repr(params, cfg, d, tgt), ids, all_item_repr(params, cfg, d),
                                     item_bias(params, d, tgt), item_bias(params, d, ids)))
    assert float(got) == pytest.approx(want, rel=1e-5)


def _localized(params, batch, neg, tables=("item_emb", "item_bias")):
    """The batch on per-domain local vocabularies (row 0 plus every id it names, sorted: the engine's layout,
    train/vocab.py), with the parameters' per-item rows taken for them."""
    vocab, local, p = {}, {"seq": np.array(batch["seq"]), "target": np.array(batch["target"]),
                           "neg": np.array(neg)}, dict(params)
    for d in range(2):
        ids = np.concatenate([[0], local["seq"][:, d].ravel(), local["target"][:, d].ravel(), local["neg"][d]])
        v = np.unique(ids).astype(np.int32)
        for k in ("seq", "target"):
            local[k][:, d] = np.searchsorted(v, local[k][:, d])
        local["neg"][d] = np.searchsorted(v, local["neg"][d])
        vocab[f"domain_{d}"] = jnp.array(v)
        p[f"domain_{d}"] = {k: (jnp.take(t, v, axis=0) if k in tables else t) for k, t in p[f"domain_{d}"].items()}
    return p, {**{k: jnp.array(x) for k, x in local.items()}, "vocab": vocab}


@pytest.mark.parametrize("item_ids, rec, case", [("train", "gbce", "dense"), ("off", "full", "dense"),
                                                  ("train", "sampled", "local vocabulary, item bias"),
                                                  ("off", "gbce", "per user")])
def test_fused_items_read_from_their_table_equal_the_per_occurrence_ones(item_ids, rec, case, monkeypatch):
    """The objective fuses each table row once and reads the batch's ids from it where the table is the
    smaller (`functional.item_lookup`): the loss and every gradient equal those of fusing every occurrence,
    on dense tables, on a client's local vocabulary (equal to the dense loss too) and in the user unit's
    per-user loss."""
    from fedscope_jax.model import objective

    rng = np.random.default_rng(21)
    sem = _semantic(rng)
    local = case.startswith("local")
    cfg = dataclasses.replace(CFG, item_ids=item_ids, item_bias=local,
                              loss=LossConfig(rec=rec, num_negatives=7))
    p = init_params(jax.random.key(2), cfg, N_ITEMS, sem)
    if local:   # non-zero biases, so that their rows matter
        for d in range(2):
            p[f"domain_{d}"]["item_bias"] = jax.random.normal(jax.random.key(d), p[f"domain_{d}"]["item_bias"].shape)
    batch, key, real = _batch(rng), jax.random.key(9), objective.item_lookup
    neg = np.stack([rng.integers(1, n + 1, 7) for n in N_ITEMS]).astype(np.int32)
    if local:
        dense = float(_loss(p, {**batch, "neg": jnp.array(neg)}, key, cfg, True, sem)[0])
        p, batch = _localized(p, batch, neg)
    out = {}
    for table in (False, True):
        with monkeypatch.context() as m:
            m.setattr(objective, "item_lookup", lambda *a, t=table: real(*a, table=t))
            fn = lambda q: loss_fn(q, batch, key, cfg, True, sem, per_user=case == "per user")[0]  # noqa: E731
            out[table] = jax.jit(jax.value_and_grad(fn))(p)   # a new jit: traced with this lookup
    assert float(out[True][0]) == pytest.approx(float(out[False][0]), rel=1e-5) and float(out[True][0]) > 0
    for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert any(np.asarray(g).any() for g in jax.tree.leaves(out[True][1]["domain_0"]["fuse_in"]))
    if local:
        assert float(out[True][0]) == pytest.approx(dense, rel=1e-5)


def test_item_lookup_reads_a_table_only_where_that_is_cheaper(monkeypatch):
    """Fused items: per occurrence for fewer ids than the table's rows, from the table (fused once) for
    more; ID-only items are a plain gather either way (no table)."""
    from fedscope_jax.model import functional

    sem = _semantic(np.random.default_rng(3))
    fused, ids_only = init_params(jax.random.key(1), CFG, N_ITEMS, sem), init_params(jax.random.key(1), CFG, N_ITEMS)
    calls, real = [], functional.all_item_repr
    monkeypatch.setattr(functional, "all_item_repr", lambda *a: calls.append(a[2]) or real(*a))
    rng = np.random.default_rng(4)   # 12 and 18 ids; 13 rows in domain 0
    few, many = (jnp.array(rng.integers(0, N_ITEMS[0] + 1, shape), jnp.int32) for shape in ((2, 6), (3, 6)))
    want = functional.item_lookup(fused, CFG, 0, sem, few, many, table=False)
    assert not calls and len(want) == 2
    got = functional.item_lookup(fused, CFG, 0, sem, few, many)                  # 30 ids > 13 rows
    assert calls == [0]
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    functional.item_lookup(fused, CFG, 0, sem, few)                             # 12 ids < 13 rows
    functional.item_lookup(ids_only, CFG, 0, None, few, many)
    assert calls == [0]

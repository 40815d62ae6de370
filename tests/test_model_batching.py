"""Training arrays: per-(user, domain) sequences against a plain Python construction; batches and masks."""

from __future__ import annotations

import numpy as np
import pytest

from fedscope_jax.data.batching import make_batches, pad_steps, train_sequences
from fedscope_jax.data.canonical import TRAIN
from fedscope_jax.errors import FedscopeError
from model_helpers import write_tiny


def _reference(ds, max_len):
    """{(user, domain): (seq, target)} built one user at a time."""
    out = {}
    for u in range(ds.n_users):
        for d in range(len(ds.domains)):
            sel = (ds.user == u) & (ds.domain == d) & (ds.split == TRAIN)
            items = list(ds.item[sel][np.argsort(ds.position[sel])] + 1)[-(max_len + 1):]
            seq = np.zeros(max_len, np.int32)
            tgt = np.zeros(max_len, np.int32)
            inp, nxt = items[:-1], items[1:]
            if inp:
                seq[max_len - len(inp):] = inp
                tgt[max_len - len(nxt):] = nxt
            out[(u, d)] = (seq, tgt)
    return out


@pytest.mark.parametrize("max_len", [3, 20])
def test_train_sequences_match_reference(tmp_path, max_len):
    ds = write_tiny(tmp_path / "d", users=25, single_domain_users=3)
    seqs = train_sequences(ds, max_len)
    ref = _reference(ds, max_len)
    expected_users = sorted({u for (u, d), (s, t) in ref.items() if t.any()})
    assert seqs.user.tolist() == expected_users
    for r, u in enumerate(seqs.user):
        for d in range(2):
            np.testing.assert_array_equal(seqs.seq[r, d], ref[(u, d)][0])
            np.testing.assert_array_equal(seqs.target[r, d], ref[(u, d)][1])
    # single-domain users have an empty domain-1 row
    last = seqs.rows_of(np.array([24]))
    assert last.size == 1 and not seqs.seq[last[0], 1].any()


def test_make_batches_epochs_permutations_and_padding(tmp_path):
    ds = write_tiny(tmp_path / "d", users=10)
    seqs = train_sequences(ds, 8)
    rows = np.arange(len(seqs.user))
    b = make_batches(seqs, rows, batch_size=4, epochs=2, rng=np.random.default_rng(0))
    per_epoch = -(-len(rows) // 4)
    assert b["seq"].shape == (2 * per_epoch, 4, 2, 8) and b["step_mask"].all()
    assert b["user_mask"].sum() == 2 * len(rows)
    assert not b["seq"][~b["user_mask"]].any() and not b["target"][~b["user_mask"]].any()
    # every epoch visits each user exactly once: compare multisets of rows
    for e in range(2):
        got = b["seq"][e * per_epoch:(e + 1) * per_epoch][b["user_mask"][e * per_epoch:(e + 1) * per_epoch]]
        want = seqs.seq[rows]
        assert sorted(map(bytes, got)) == sorted(map(bytes, want))
    again = make_batches(seqs, rows, 4, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(again["seq"], b["seq"])
    padded = pad_steps(b, b["seq"].shape[0] + 3)
    assert padded["seq"].shape[0] == b["seq"].shape[0] + 3
    assert not padded["step_mask"][-3:].any() and not padded["seq"][-3:].any()
    with pytest.raises(FedscopeError):
        make_batches(seqs, rows, 0, 1, np.random.default_rng(0))

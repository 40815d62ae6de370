"""Client partitions: every interaction on exactly one client, sizes as the scheme says, seeded, saved/loaded."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import real_dataset
from fedscope_jax.data.canonical import load_dataset
from fedscope_jax.data.formats import prepare
from fedscope_jax.data.partition import load_partition, partition, powerlaw_sizes, save_partition
from fedscope_jax.data.synth import SynthConfig, synthesize
from fedscope_jax.errors import FedscopeError


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("part") / "syn"
    synthesize(SynthConfig(users=1000, items=(300, 400), topics=4, overlap=0.6, seed=5), out)
    return load_dataset(out)


def test_powerlaw_sizes_exact():
    sizes = powerlaw_sizes(100, 4, alpha=1.0, min_users=1)
    # 96 spare users x shares (1, 1/2, 1/3, 1/4)/2.0833 = 46.08, 23.04, 15.36, 11.52 -> 46, 23, 15, 12
    # (largest remainder takes the one user left), + min_users 1 each
    np.testing.assert_array_equal(sizes, [47, 24, 16, 13])
    assert sizes.sum() == 100
    np.testing.assert_array_equal(powerlaw_sizes(10, 5, alpha=0.0), [2, 2, 2, 2, 2])
    with pytest.raises(FedscopeError, match="exceeds the 10 users"):
        powerlaw_sizes(10, 4, alpha=1.0, min_users=3)


@pytest.mark.parametrize("scheme,clients", [("uniform", 7), ("powerlaw", 20), ("user", None)])
def test_silo_schemes_cover_every_user_once(ds, scheme, clients):
    part = partition(ds, clients, scheme, seed=1)
    assert part.client_of_user.shape == (ds.n_users,)
    assert part.client_of_user.min() == 0 and part.client_of_user.max() == part.n_clients - 1
    sizes = part.sizes(ds)
    assert sizes["users"].sum() == ds.n_users and sizes["interactions"].sum() == ds.n_interactions
    assert (sizes["users"] >= 1).all()
    rows = part.client_of_rows(ds)
    for c in (0, part.n_clients - 1):                     # a client holds all rows of its users, no others
        np.testing.assert_array_equal(np.flatnonzero(rows == c), np.flatnonzero(np.isin(ds.user, part.users_of(c))))
    # client_domains says which domains a client's users touch
    touched = np.zeros_like(part.client_domains)
    touched[rows, ds.domain] = True
    np.testing.assert_array_equal(touched, part.client_domains)


def test_uniform_sizes_differ_by_at_most_one(ds):
    users = partition(ds, 7, "uniform", seed=0).sizes(ds)["users"]
    assert users.max() - users.min() <= 1


def test_powerlaw_is_heterogeneous_and_seeded(ds):
    part = partition(ds, 20, "powerlaw", seed=3, alpha=1.2)
    users = part.sizes(ds)["users"]
    np.testing.assert_array_equal(users, powerlaw_sizes(ds.n_users, 20, 1.2))
    assert users[0] > 10 * users[-1]                      # a few large silos, many small ones
    summary = part.summary(ds)
    assert summary["gini_train_interactions"] > 0.4 and summary["largest_client_share"] > 0.2
    again = partition(ds, 20, "powerlaw", seed=3, alpha=1.2)
    np.testing.assert_array_equal(part.client_of_user, again.client_of_user)
    other = partition(ds, 20, "powerlaw", seed=4, alpha=1.2)
    assert not np.array_equal(part.client_of_user, other.client_of_user)


def test_domain_scheme_is_client_per_domain(ds):
    part = partition(ds, None, "domain")
    assert part.n_clients == 2 and (part.client_of_user == -1).all()
    np.testing.assert_array_equal(part.client_of_rows(ds), ds.domain)
    sizes = part.sizes(ds)
    np.testing.assert_array_equal(sizes["interactions"], np.bincount(ds.domain))
    np.testing.assert_array_equal(sizes["users"], [np.unique(ds.user[ds.domain == d]).size for d in range(2)])
    with pytest.raises(FedscopeError, match="--clients must equal the 2 domains"):
        partition(ds, 5, "domain")


def test_errors(ds):
    with pytest.raises(FedscopeError, match="--scheme 'zipf'"):
        partition(ds, 4, "zipf")
    with pytest.raises(FedscopeError, match=r"--clients 0: expected an integer in 1..1000"):
        partition(ds, 0, "uniform")


def test_save_load_roundtrip(ds, tmp_path):
    for part in (partition(ds, 9, "powerlaw", seed=2), partition(ds, None, "domain")):
        save_partition(part, tmp_path / "p.arrow")
        back = load_partition(tmp_path / "p.arrow")
        assert (back.scheme, back.n_clients, back.seed, back.alpha) == (part.scheme, part.n_clients, part.seed,
                                                                         part.alpha)
        np.testing.assert_array_equal(back.client_of_user, part.client_of_user)
        np.testing.assert_array_equal(back.client_domains, part.client_domains)


def test_real_llmcdsr_single_domain_users_make_single_domain_clients(tmp_path):
    prepare(real_dataset("llmcdsr-food-kitchen"), tmp_path / "fk")
    data = load_dataset(tmp_path / "fk")
    part = partition(data, 2000, "powerlaw", seed=0)
    summary = part.summary(data)
    assert summary["users_per_client"]["max"] > 50 * summary["users_per_client"]["min"]
    # most users are single-domain (43,663 of 53,061), so small silos often hold one domain only
    assert summary["clients_with_both_domains"] < part.n_clients
    assert part.sizes(data)["interactions"].sum() == data.n_interactions

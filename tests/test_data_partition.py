"""Client partitions: every interaction on exactly one client, sizes as the scheme says, seeded, saved/loaded."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import real_dataset
from fedscope_jax.data.canonical import load_dataset
from fedscope_jax.data.formats import prepare
from fedscope_jax.data.partition import (label_skew, load_partition, partition, powerlaw_sizes, save_partition,
                                         user_labels)
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


def test_user_labels_by_hand(tmp_path):
    """Dominant domain and popularity bucket of three users on a hand-made dataset."""
    src = tmp_path / "mine"
    src.mkdir()
    # item popularity (train rows): f1 x4, k1 x1, f2 x1 ... u1 mostly kitchen, u2 and u3 food
    (src / "interactions.csv").write_text(
        "user,item,domain,timestamp\n"
        "u1,k1,kitchen,1\nu1,k2,kitchen,2\nu1,k3,kitchen,3\nu1,f1,food,4\nu1,f2,food,5\nu1,f3,food,6\n"
        "u2,f1,food,1\nu2,f1,food,2\nu2,f1,food,3\nu2,k9,kitchen,4\nu2,f4,food,5\n"
        "u3,f2,food,1\nu3,f5,food,2\nu3,f6,food,3\nu3,f7,food,4\n")
    prepare(src, tmp_path / "out", domains=["food", "kitchen"])
    data = load_dataset(tmp_path / "out")
    # train rows (leave-one-out): u1 k1 k2 k3 f1 (kitchen 3 > food 1), u2 f1 f1 f1, u3 f2 f5
    np.testing.assert_array_equal(user_labels(data, "domain"), [1, 0, 0])
    # mean log1p(popularity): f1 has 4 train rows -> u2 is the most popular-item user, u3 the least
    np.testing.assert_array_equal(user_labels(data, "popularity", buckets=3), [1, 2, 0])
    np.testing.assert_array_equal(user_labels(data, "both", buckets=3), [4, 2, 0])
    with pytest.raises(FedscopeError, match="--attribute 'genre'"):
        user_labels(data, "genre")


@pytest.mark.parametrize("attribute", ["domain", "popularity", "both"])
def test_dirichlet_sizes_sum_seeded_and_min_users(ds, attribute):
    part = partition(ds, 12, "dirichlet", seed=4, alpha=0.3, attribute=attribute, min_users=3)
    users = part.sizes(ds)["users"]
    assert users.sum() == ds.n_users and users.min() >= 3 and part.n_clients == 12
    again = partition(ds, 12, "dirichlet", seed=4, alpha=0.3, attribute=attribute, min_users=3)
    np.testing.assert_array_equal(part.client_of_user, again.client_of_user)
    other = partition(ds, 12, "dirichlet", seed=5, alpha=0.3, attribute=attribute, min_users=3)
    assert not np.array_equal(part.client_of_user, other.client_of_user)
    summary = part.summary(ds)
    assert summary["attribute"] == attribute and summary["buckets"] == 4 and 0 <= summary["label_skew"] <= 1


def test_dirichlet_smaller_alpha_means_more_skew(ds):
    labels = user_labels(ds, "both")
    skew = {a: np.mean([label_skew(partition(ds, 10, "dirichlet", seed=s, alpha=a), labels) for s in range(3)])
            for a in (0.05, 1.0, 100.0)}
    assert skew[0.05] > skew[1.0] > skew[100.0]
    # uniform dealing ignores the labels: its skew is only sampling noise (100 users over 8 classes per client)
    noise = label_skew(partition(ds, 10, "uniform", seed=0), labels)
    assert skew[0.05] > 0.5 and skew[100.0] < 0.15 and noise < 0.15 and skew[0.05] > 4 * noise


def test_dirichlet_errors_and_roundtrip(ds, tmp_path):
    with pytest.raises(FedscopeError, match="concentration must be > 0"):
        partition(ds, 4, "dirichlet", alpha=0.0)
    with pytest.raises(FedscopeError, match="--buckets 0"):
        partition(ds, 4, "dirichlet", buckets=0)
    part = partition(ds, 6, "dirichlet", seed=1)
    assert part.alpha == 0.5 and part.attribute == "both"          # the scheme's default concentration
    save_partition(part, tmp_path / "d.arrow")
    back = load_partition(tmp_path / "d.arrow")
    assert (back.attribute, back.buckets, back.alpha) == ("both", 4, 0.5)
    np.testing.assert_array_equal(back.client_of_user, part.client_of_user)

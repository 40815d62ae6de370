"""Splitting a canonical dataset's users among simulated clients (silos), seeded and reproducible.

Schemes:
- `uniform`: users shuffled and dealt into `clients` silos of equal size (+-1 user);
- `powerlaw`: silo sizes (in users) proportional to (rank+1)^-alpha, each at least `min_users`: a few large
  platforms and many small ones; client 0 is the largest;
- `dirichlet`: label skew. Each user gets a latent class from its data (`attribute`: dominant domain, bucket of
  the mean popularity of its items, or both); the users of each class are dealt to clients in proportions drawn
  from Dirichlet(alpha, ..., alpha), so small alpha gives each client a few classes (and uneven sizes), large
  alpha approaches uniform;
- `domain`: one client per domain holding every user's interactions in that domain (the FedDCSR setting);
- `user`: one client per user (cross-device).
A user belongs to exactly one client under the silo schemes, with all of its domains; under `domain` its
interactions are spread over the clients by domain (`client_of_user` is -1 there: use `client_of_rows`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import pyarrow as pa

from fedscope_jax.data.canonical import TRAIN, CanonicalDataset
from fedscope_jax.errors import FedscopeError
from fedscope_jax.utils.io import read_arrow, write_arrow

SCHEMES: tuple[str, ...] = ("uniform", "dirichlet", "powerlaw", "domain", "user")
ATTRIBUTES: tuple[str, ...] = ("domain", "popularity", "both")
# Scheme defaults of `alpha`: the powerlaw size exponent and the Dirichlet concentration.
DEFAULT_ALPHA = {"powerlaw": 1.0, "dirichlet": 0.5}
PARTITION_FILE = "partition.arrow"


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which client holds which users' (or domains') interactions."""

    scheme: str
    n_clients: int
    seed: int
    client_of_user: np.ndarray        # int32 [n_users]; -1 under `domain` (a user spans several clients)
    client_domains: np.ndarray        # bool [n_clients, n_domains]: domains whose interactions a client holds
    alpha: float | None = None        # powerlaw exponent or dirichlet concentration (None for other schemes)
    attribute: str | None = None      # dirichlet: the skewed user attribute (None for other schemes)
    buckets: int | None = None        # dirichlet: popularity buckets (None for other schemes)

    def client_of_rows(self, dataset: CanonicalDataset) -> np.ndarray:
        """int32 [N]: the client holding each interaction row of `dataset`."""
        if self.scheme == "domain":
            return dataset.domain.astype(np.int32)
        return self.client_of_user[dataset.user]

    def users_of(self, client: int) -> np.ndarray:
        """Sorted user ids with interactions on `client`."""
        if self.scheme == "domain":
            raise FedscopeError("scheme 'domain': every client holds every user of its domain; use client_of_rows")
        return np.flatnonzero(self.client_of_user == client)

    def sizes(self, dataset: CanonicalDataset) -> dict[str, np.ndarray]:
        """Per-client counts: users, interactions, and train interactions (what local training consumes)."""
        rows = self.client_of_rows(dataset)
        users = np.zeros(self.n_clients, np.int64)
        if self.scheme == "domain":
            present = np.zeros((dataset.n_users, self.n_clients), bool)
            present[dataset.user, rows] = True
            users = present.sum(0).astype(np.int64)
        else:
            users = np.bincount(self.client_of_user, minlength=self.n_clients).astype(np.int64)
        return {
            "users": users,
            "interactions": np.bincount(rows, minlength=self.n_clients).astype(np.int64),
            "train_interactions": np.bincount(rows[dataset.split == TRAIN], minlength=self.n_clients).astype(np.int64),
        }

    def summary(self, dataset: CanonicalDataset) -> dict[str, Any]:
        """Heterogeneity facts for logs and summary.json: size quantiles, largest share, Gini of train sizes."""
        sizes = self.sizes(dataset)
        train = np.sort(sizes["train_interactions"]).astype(np.float64)
        total = train.sum()
        gini = float(1 - 2 * np.sum(np.cumsum(train) / total) / train.size + 1 / train.size) if total else 0.0
        q = lambda a: {k: int(v) for k, v in zip(("min", "p50", "max"), np.percentile(a, [0, 50, 100],
                                                                                        method="nearest"))}
        return {
            "scheme": self.scheme, "clients": self.n_clients, "seed": self.seed, "alpha": self.alpha,
            "users_per_client": q(sizes["users"]),
            "train_interactions_per_client": q(sizes["train_interactions"]),
            "largest_client_share": round(float(train[-1] / total), 6) if total else 0.0,
            "gini_train_interactions": round(gini, 6),
            "clients_with_both_domains": int((self.client_domains.sum(1) > 1).sum()),
            "clients_without_train_data": int((sizes["train_interactions"] == 0).sum()),
            **({"attribute": self.attribute, "buckets": self.buckets,
                "label_skew": round(label_skew(self, user_labels(dataset, self.attribute, self.buckets)), 6)}
               if self.scheme == "dirichlet" else {}),
        }


def powerlaw_sizes(n_users: int, clients: int, alpha: float, min_users: int = 1) -> np.ndarray:
    """Users per client, descending, proportional to (k+1)^-alpha, each >= min_users, summing to n_users.

    Rounding uses the largest-remainder rule, so the result is deterministic.
    """
    if min_users < 1 or clients * min_users > n_users:
        raise FedscopeError(f"--clients {clients} x --min-users {min_users} exceeds the {n_users} users")
    if alpha < 0:
        raise FedscopeError(f"--alpha {alpha}: expected >= 0")
    share = (np.arange(1, clients + 1, dtype=np.float64)) ** -alpha
    share /= share.sum()
    spare = n_users - clients * min_users
    exact = spare * share
    sizes = np.floor(exact).astype(np.int64)
    left = spare - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:left]] += 1
    return np.sort(sizes + min_users)[::-1]


def user_labels(dataset: CanonicalDataset, attribute: str = "both", buckets: int = 4) -> np.ndarray:
    """int64 [n_users] latent class of each user, the attribute `dirichlet` skews across clients.

    - `domain`: the domain holding most of the user's train interactions (all interactions when it has no train
      ones; ties go to the earlier domain);
    - `popularity`: the quantile bucket (0 = least popular, `buckets` equal-count buckets) of the mean
      log-popularity of the user's items, popularity = train interactions of the item over all users;
    - `both`: domain * buckets + popularity bucket.
    """
    if attribute not in ATTRIBUTES:
        raise FedscopeError(f"--attribute {attribute!r}: expected one of {list(ATTRIBUTES)}")
    if not isinstance(buckets, (int, np.integer)) or buckets < 1:
        raise FedscopeError(f"--buckets {buckets}: expected an integer >= 1")
    n_users, n_domains = dataset.n_users, len(dataset.domains)
    train = dataset.split == TRAIN
    cell = dataset.user * n_domains + dataset.domain
    counts = np.bincount(cell[train], minlength=n_users * n_domains).reshape(n_users, n_domains)
    no_train = counts.sum(1) == 0
    if no_train.any():
        counts = counts + np.bincount(cell[no_train[dataset.user]], minlength=n_users * n_domains
                                      ).reshape(n_users, n_domains)
    dominant = np.argmax(counts, axis=1).astype(np.int64)
    if attribute == "domain":
        return dominant
    item_offset = np.concatenate([[0], np.cumsum(dataset.n_items)]).astype(np.int64)
    gid = item_offset[dataset.domain] + dataset.item
    popularity = np.bincount(gid[train], minlength=int(item_offset[-1]))
    per_user = np.bincount(dataset.user, weights=np.log1p(popularity[gid]), minlength=n_users)
    mean = per_user / np.maximum(np.bincount(dataset.user, minlength=n_users), 1)
    ranks = np.argsort(np.argsort(mean, kind="stable"), kind="stable")
    bucket = (ranks * buckets // max(n_users, 1)).astype(np.int64)
    return bucket if attribute == "popularity" else dominant * buckets + bucket


def label_skew(part: Partition, labels: np.ndarray) -> float:
    """Users-weighted mean total-variation distance between each client's class mix and the global one.

    0 = every client has the population's mix (uniform dealing, up to sampling noise); towards 1 = each client
    holds classes the population barely has. The number `dirichlet` is meant to move.
    """
    if part.scheme == "domain":
        raise FedscopeError("label skew is defined for schemes that assign each user to one client")
    n_classes = int(labels.max()) + 1 if labels.size else 1
    table = np.bincount(part.client_of_user.astype(np.int64) * n_classes + labels,
                        minlength=part.n_clients * n_classes).reshape(part.n_clients, n_classes).astype(np.float64)
    sizes = table.sum(1)
    overall = table.sum(0) / max(table.sum(), 1.0)
    mix = table / np.maximum(sizes, 1.0)[:, None]
    tv = 0.5 * np.abs(mix - overall).sum(1)
    return float((tv * sizes).sum() / max(sizes.sum(), 1.0))


def dirichlet_assignment(labels: np.ndarray, clients: int, alpha: float, min_users: int,
                         rng: np.random.Generator) -> np.ndarray:
    """int32 [users] client of each user: each class's users (shuffled) are cut in Dirichlet(alpha) proportions.

    Clients left under `min_users` then take random users from the currently largest client, so every client
    has data; sizes always sum to the users.
    """
    n_users = labels.size
    if not alpha > 0:
        raise FedscopeError(f"--alpha {alpha}: the Dirichlet concentration must be > 0")
    if min_users < 1 or clients * min_users > n_users:
        raise FedscopeError(f"--clients {clients} x --min-users {min_users} exceeds the {n_users} users")
    client = np.empty(n_users, np.int32)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        share = rng.dirichlet(np.full(clients, alpha))
        cuts = np.floor(np.cumsum(share)[:-1] * members.size + 0.5).astype(np.int64)
        client[members] = np.repeat(np.arange(clients, dtype=np.int32), np.diff(np.concatenate([[0], cuts,
                                                                                            [members.size]])))
    sizes = np.bincount(client, minlength=clients)
    for k in np.flatnonzero(sizes < min_users):
        while sizes[k] < min_users:
            donor = int(np.argmax(sizes))
            take = int(min(min_users - sizes[k], sizes[donor] - min_users))
            client[rng.choice(np.flatnonzero(client == donor), take, replace=False)] = k
            sizes[donor] -= take
            sizes[k] += take
    return client


def partition(dataset: CanonicalDataset, clients: int | None, scheme: str = "powerlaw", seed: int = 0, *,
              alpha: float | None = None, min_users: int = 1, attribute: str = "both",
              buckets: int = 4) -> Partition:
    """Assigns `dataset`'s users (or domains) to clients; same arguments -> same partition.

    `alpha` is the powerlaw exponent (default 1) or the dirichlet concentration (default 0.5); `attribute` and
    `buckets` choose the class dirichlet skews (see `user_labels`).
    """
    n_users, n_domains = dataset.n_users, len(dataset.domains)
    if scheme not in SCHEMES:
        raise FedscopeError(f"--scheme {scheme!r}: expected one of {list(SCHEMES)}")
    alpha = DEFAULT_ALPHA.get(scheme, 1.0) if alpha is None else float(alpha)
    if scheme == "domain":
        if clients not in (None, n_domains):
            raise FedscopeError(f"--scheme domain: --clients must equal the {n_domains} domains, got {clients}")
        return Partition(scheme, n_domains, seed, np.full(n_users, -1, np.int32), np.eye(n_domains, dtype=bool))
    if scheme == "user":
        if clients not in (None, n_users):
            raise FedscopeError(f"--scheme user: --clients must equal the {n_users} users (or be omitted), "
                                f"got {clients}")
        clients = n_users
    if clients is None or not 1 <= clients <= n_users:
        raise FedscopeError(f"--clients {clients}: expected an integer in 1..{n_users} (the dataset's users)")
    rng = np.random.default_rng(seed)
    if scheme == "user":
        client_of_user = np.arange(n_users, dtype=np.int32)
    elif scheme == "dirichlet":
        labels = user_labels(dataset, attribute, buckets)
        client_of_user = dirichlet_assignment(labels, clients, alpha, min_users, rng)
    else:
        if scheme == "uniform":
            sizes = np.full(clients, n_users // clients, np.int64)
            sizes[: n_users % clients] += 1
        else:
            sizes = powerlaw_sizes(n_users, clients, alpha, min_users)
        client_of_user = np.empty(n_users, np.int32)
        client_of_user[rng.permutation(n_users)] = np.repeat(np.arange(clients, dtype=np.int32), sizes)
    client_domains = np.zeros((clients, n_domains), bool)
    client_domains[client_of_user[dataset.user], dataset.domain] = True
    skewed = scheme == "dirichlet"
    return Partition(scheme, clients, seed, client_of_user, client_domains,
                     alpha=alpha if scheme in DEFAULT_ALPHA else None, attribute=attribute if skewed else None,
                     buckets=int(buckets) if skewed else None)


def save_partition(part: Partition, path: str | os.PathLike) -> None:
    """Writes `partition.arrow` (user_id, client) with the scheme and client domains in the schema metadata."""
    table = pa.table({"user_id": pa.array(np.arange(part.client_of_user.size, dtype=np.int64)),
                      "client": pa.array(part.client_of_user)})
    meta = {"scheme": part.scheme, "n_clients": part.n_clients, "seed": part.seed, "alpha": part.alpha,
            "attribute": part.attribute, "buckets": part.buckets,
            "client_domains": part.client_domains.astype(int).tolist()}
    write_arrow(table.replace_schema_metadata({"fedscope.partition": json.dumps(meta)}), path)


def load_partition(path: str | os.PathLike) -> Partition:
    """Reads a file written by `save_partition`."""
    table = read_arrow(path)
    raw = (table.schema.metadata or {}).get(b"fedscope.partition")
    if raw is None or table.column_names != ["user_id", "client"]:
        raise FedscopeError(f"{path}: not a partition file (expected columns user_id, client and partition metadata)")
    meta = json.loads(raw)
    return Partition(meta["scheme"], int(meta["n_clients"]), int(meta["seed"]),
                     table["client"].to_numpy().astype(np.int32),
                     np.asarray(meta["client_domains"], bool).reshape(int(meta["n_clients"]), -1),
                     alpha=meta["alpha"], attribute=meta.get("attribute"), buckets=meta.get("buckets"))


__all__ = ["ATTRIBUTES", "PARTITION_FILE", "Partition", "SCHEMES", "dirichlet_assignment", "label_skew",
           "load_partition", "partition", "powerlaw_sizes", "save_partition", "user_labels"]

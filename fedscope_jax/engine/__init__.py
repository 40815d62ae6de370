"""The vectorized federated engine (docs/engine.md). Modules (import them directly):
- client: one client's local training (`client_update`, a pure `lax.scan`);
- cohort: host side: client shards, local vocabularies, size buckets, padded `Cohort`s;
- population: host side: a run's clients, buckets and bucket slots, and each round's participants;
- aggregate: the privacy layer's mechanism applied per chunk of clients, and the weighted sum;
- round: ONE jitted round (vmap over chunks of clients, sharded), and the sequential reference;
- sweep: a round of several configurations at once (vmap over a config axis);
- server: the server optimizer; sampling: seeded client sampling; checkpoint: orbax checkpoints;
- tune: chunk-size timing, FLOP counts; reference_model: the engine's small test/benchmark model.
"""

__all__ = ["aggregate", "checkpoint", "client", "cohort", "population", "reference_model", "round", "sampling",
           "server", "sweep", "tune"]

"""Client-level differential privacy for federated runs (docs/privacy.md).

Modules (import them directly; this package imports nothing heavy so `fedscope --help` stays fast):
- config: PrivacyConfig (the `privacy` config section) and the `fedscope train` privacy flags;
- budgets: per-client eps_k, personalized (monotone in data size, bounded, normalised) or uniform;
- accounting: dp-accounting events, epsilon of a run, noise calibration, adaptive-clipping cost;
- plan: PrivacyPlan, the per-client vectors (eps_k, z_k, C_k) a run is calibrated with;
- mechanism: per-client clipping, Gaussian noise, adaptive clipping, Poisson sampling (pure jnp);
- ledger: PrivacyLedger (per-client accountant state, budget enforcement, privacy_ledger.arrow),
  recompute_eps;
- secagg: simulated secure aggregation (quantize, pairwise masks mod 2^32, dropout recovery);
- dryrun / secagg_error: command-line measurements (`python -m fedscope_jax.privacy.dryrun ...`).
"""

"""Client-level differential privacy for federated runs (docs/privacy.md).

Modules (import them directly; this package imports nothing heavy so `fedscope --help` stays fast):
- config: PrivacyConfig (the `privacy` config section; its flags are in cli/flags.py);
- budgets: per-client eps_k, personalized (monotone in data size, bounded, normalised) or uniform;
- accounting: dp-accounting events, epsilon of a run, noise calibration, adaptive-clipping cost;
- plan: PrivacyPlan, the per-client vectors (eps_k, z_k, C_k) a run is calibrated with;
- mechanism: the one Gaussian mechanism: clipping that carries its sensitivity, noise; adaptive clipping;
- ledger: PrivacyLedger (per-client accountant state, budget enforcement, privacy_ledger.arrow),
  recompute_eps;
- secagg: simulated secure aggregation (quantize, pairwise masks mod 2^32, dropout recovery);
- session: PrivacySession, the privacy side of a federated run (plan, ledger, adaptive clipping, resume);
- dryrun / secagg_error: measurements without training (`fedscope privacy dry-run`, `... secagg-error`).
"""

__all__ = ["accounting", "budgets", "config", "dryrun", "ledger", "mechanism", "plan", "secagg", "secagg_error",
           "session"]

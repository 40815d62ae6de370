"""Training: centralized and local-only baselines, the federated round loop and its FedSCOPE wiring, sweeps.
Modules (import them directly):
- config / federated_config: the run config (model, train, eval, federated, privacy sections);
- loop: the federated round loop (phases over one explicit loop state), for one or several configurations;
- federated: `fedscope train --mode federated` on the FedSCOPE model (seed context, run directory, summary);
- sweep: privacy sweeps, one compiled program per seed; programs: the process's compiled programs;
- centralized, local: the non-federated baselines; final_eval: the final valid/test evaluation.
"""

__all__ = ["centralized", "config", "federated", "federated_config", "final_eval", "local", "loop", "programs",
           "sweep"]

"""Study configs (experiments/configs/*.json): parsing, cell expansion, clear errors, and a dry run of every
study on a real shared dataset (fedscope reproduce --profile quick --dry-run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import real_dataset
from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments.cells import expand, run_config
from fedscope_jax.experiments.methods import METHODS
from fedscope_jax.experiments.spec import default_config_dir, load_studies, load_study

STUDIES = ("main", "ablation", "privacy_utility", "cold_start", "clients_sampling", "convergence")


def test_every_study_parses_and_every_cell_config_is_valid():
    studies = load_studies()
    assert [s.name for s in studies] == list(STUDIES)
    for study in studies:
        assert {"quick", "full"} <= set(study.profiles)
        for profile in study.profiles:
            for dry in (False, True):
                for cell in expand(study, profile, dry):
                    cfg = run_config(cell, str(study.path))
                    assert cfg.train.seed == cell.seed
                    if dry:
                        assert cfg.federated.rounds == 1 and cfg.train.epochs == 1 and cfg.model.dim == 8


def test_main_cells_dp_rules_and_methods():
    main = load_study(default_config_dir() / "main.json")
    # 3 datasets x (FedSCOPE, FedSASRec x 2 DP settings + FedCL4SRec without DP + local + centralized)
    assert len(expand(main, "quick", False)) == 3 * (2 * 2 + 3) * 3   # quick: three seeds too
    assert len(expand(main, "quick", True)) == 3 * (2 * 2 + 3)        # a dry run keeps the first seed
    quick = main.profile("quick")
    assert quick.max_items == 1000 and quick.users_for("abxi-food-kitchen") == 3000
    cells = expand(main, "full", False)
    assert len(cells) == 3 * (2 * 2 + 3) * 3
    by = {(c.dataset, c.method, c.dp.label, c.seed): c for c in cells}
    assert by[("abxi-food-kitchen", "fedscope", "personalized-user-eps8", 0)]
    assert by[("abxi-food-kitchen", "fedsasrec", "uniform-user-eps8", 1)]     # baselines: one uniform budget
    assert ("abxi-food-kitchen", "local", "personalized-user-eps8", 0) not in by   # DP does not apply
    # the user unit leaves FedCL4SRec's contrastive term no negatives: its DP cell would be FedSASRec's
    assert ("abxi-food-kitchen", "fedcl4srec", "uniform-user-eps8", 0) not in by
    assert run_config(by[("abxi-food-kitchen", "fedcl4srec", "off", 0)], "main").model.loss.seqcl_weight > 0
    assert by[("abxi-food-kitchen", "centralized", "off", 0)].identity()["dp"] == "n/a"
    sas = run_config(by[("abxi-food-kitchen", "fedsasrec", "off", 0)], "main")
    assert sas.model.loss.alpha == 0 and sas.privacy.mode == "off"
    dp = run_config(by[("abxi-food-kitchen", "fedscope", "personalized-user-eps8", 1)], "main")
    assert dp.privacy.mode == "personalized" and dp.privacy.epsilon == 8 and dp.train.seed == 1
    assert dp.privacy.unit == "user"                                          # the DP cells: user-level
    assert METHODS["fedsasrec"].vectors == "none" and METHODS["fedscope"].vectors == "llm"
    assert METHODS["fedscope_title"].vectors == "title"
    # items from their vectors alone (no item IDs): never run without them
    assert METHODS["fedscope_noid"].needs_vectors and METHODS["fedscope_title_noid"].needs_vectors
    assert METHODS["fedscope_title"].needs_vectors and not METHODS["fedscope"].needs_vectors
    assert ("model.item_ids", "off") in METHODS["fedscope_title_noid"].overrides
    from fedscope_jax.experiments.methods import Method
    with pytest.raises(ValueError, match="without item IDs"):
        Method("x", "x", "federated", (("model.item_ids", "off"),), vectors="none")


def test_ablation_and_clients_variants():
    abl = expand(load_study(default_config_dir() / "ablation.json"), "full", False)
    uni = [c for c in abl if c.method == "fedscope_uniform_dp"]
    assert uni and all(c.dp.mode == "uniform" for c in uni)                      # needs DP: no 'off' cell
    intra = run_config(next(c for c in abl if c.method == "fedscope_wo_intra"), "ablation")
    assert intra.model.loss.lambda_intra == 0 and intra.model.loss.lambda_inter == 1
    # the user unit has no intra term: "w/o intra" has no user-level DP cell (it would be FedSCOPE's)
    assert {c.dp.label for c in abl if c.method == "fedscope_wo_intra"} == {"off"}
    assert "personalized-user-eps8" in {c.dp.label for c in abl if c.method == "fedscope"}
    cs = expand(load_study(default_config_dir() / "clients_sampling.json"), "quick", False)
    got = sorted((run_config(c, "cs").federated.clients, run_config(c, "cs").federated.fraction) for c in cs)
    assert got == sorted([(10, 1.0), (20, 1.0), (50, 0.1), (50, 0.2), (50, 0.5), (50, 1.0), (100, 1.0)] * 3)
    # one size bucket in the quick profile (chunk 1 skips padding steps), up to 4 in the full profile
    buckets = {p: {(run_config(c, "cs").federated.fraction, run_config(c, "cs").federated.max_buckets)
                   for c in expand(load_study(default_config_dir() / "clients_sampling.json"), p, False)
                   if run_config(c, "cs").federated.clients == 50} for p in ("quick", "full")}
    assert buckets["quick"] == {(0.1, 1), (0.2, 1), (0.5, 1), (1.0, 1)}
    assert buckets["full"] == {(0.1, 4), (0.2, 4), (0.5, 4), (1.0, 4)}
    pu = load_study(default_config_dir() / "privacy_utility.json")
    assert pu.epsilons == (1, 2, 4, 8, 16, math.inf)
    assert pu.sweep_units() == (("client", ("personalized", "central")), ("user", ("personalized", "uniform")),
                                ("user", ("distributed",)))


def test_user_unit_dp_settings_and_sweeps(tmp_path):
    raw = json.loads((default_config_dir() / "main.json").read_text())
    raw["dp"] = [{"mode": "off"}, {"mode": "personalized", "epsilon": 8, "unit": "user"},
                 {"mode": "uniform", "epsilon": 8}]
    path = tmp_path / "units.json"
    path.write_text(json.dumps(raw))
    cells = [c for c in expand(load_study(path), "quick", False) if c.method == "fedscope" and c.seed == 0
             and c.dataset == "abxi-food-kitchen"]
    assert sorted(c.dp.label for c in cells) == ["off", "personalized-user-eps8", "uniform-eps8"]
    units = {c.dp.label: run_config(c, "units").privacy.unit for c in cells}
    assert units == {"off": "client", "personalized-user-eps8": "user", "uniform-eps8": "client"}
    assert len({c.relative_dir("d", "none") for c in cells}) == 3
    # a sweep: one program per unit and seed; the client unit's cell keeps its directory name and key
    sweep = json.loads((default_config_dir() / "privacy_utility.json").read_text())
    sweep["privacy_modes"] = ["personalized", "central"]
    (tmp_path / "old.json").write_text(json.dumps(sweep))
    old = expand(load_study(tmp_path / "old.json"), "quick", False)
    sweep["privacy_modes"] = {"client": ["personalized", "central"], "user": ["personalized", "uniform"]}
    (tmp_path / "new.json").write_text(json.dumps(sweep))
    new = expand(load_study(tmp_path / "new.json"), "quick", False)
    assert len(new) == 2 * len(old)
    client = [c for c in new if c.sweep_unit == "client"]
    assert [c.relative_dir("d", "none") for c in client] == [c.relative_dir("d", "none") for c in old]
    user = [c for c in new if c.sweep_unit == "user"]
    assert all("/sweep-user-seed" in c.relative_dir("d", "none") for c in user)
    assert {run_config(c, "pu").privacy.unit for c in user} == {"user"}
    assert {c.sweep_modes for c in user} == {("personalized", "uniform")}
    # the distributed variant: a third program per seed, trained with the profile's distributed_set; the other
    # programs keep their directories
    sweep["privacy_modes"] = {"client": ["personalized", "central"], "user": ["personalized", "uniform",
                                                                             "distributed"]}
    (tmp_path / "dist.json").write_text(json.dumps(sweep))
    dist = expand(load_study(tmp_path / "dist.json"), "quick", False)
    assert [(c.program, c.sweep_modes) for c in dist if c.seed == 0 and c.method == "fedscope"] == [
        ("client", ("personalized", "central")), ("user", ("personalized", "uniform")),
        ("distributed", ("distributed",))]
    assert ([c.relative_dir("d", "none") for c in dist if c.program != "distributed"]
            == [c.relative_dir("d", "none") for c in new])
    for c in (c for c in dist if c.program == "distributed"):
        cfg = run_config(c, "pu")
        assert "/sweep-distributed-seed" in c.relative_dir("d", "none")
        assert (cfg.privacy.unit, cfg.privacy.mode, cfg.federated.client_opt, cfg.federated.client_lr,
                cfg.federated.server_opt, cfg.federated.rounds, cfg.federated.chunk_size) == (
            "user", "distributed", "sgd", 1.0, "fedadam", 200, 0)
        # the quick profile's distributed program also takes the loss and clip of its best measured setting
        # (docs/privacy.md, "The study's distributed program"); the local-noise and client programs keep the defaults
        assert (cfg.model.item_bias, cfg.model.loss.rec, cfg.model.loss.user_norm, cfg.model.loss.alpha,
                cfg.privacy.clip_norm) == (True, "sampled", "length", 0.0, 0.25)
    local = [run_config(c, "pu") for c in dist if c.program != "distributed"]
    assert {(r.federated.client_opt, r.federated.rounds) for r in local} == {("adam", 10)}
    assert {(r.model.item_bias, r.model.loss.rec, r.model.loss.user_norm, r.privacy.clip_norm) for r in local} == {
        (False, "gbce", "mean", 1.0)}
    dry = [c for c in expand(load_study(tmp_path / "dist.json"), "quick", True) if c.program == "distributed"]
    assert {(run_config(c, "pu").federated.rounds, run_config(c, "pu").train.batch_size) for c in dry} == {(1, 4)}
    sweep["profiles"]["quick"]["distributed_set"]["federated.client_opt"] = "adam"
    (tmp_path / "dist.json").write_text(json.dumps(sweep))
    with pytest.raises(FedscopeError, match=r"cell abxi-food-kitchen/fedscope/sweep-distributed/base: --privacy distributed: "
                                            r"a silo's update must be linear.*\(the distributed program's "
                                            r"settings: profiles\.quick\.distributed_set\)"):
        run_config(next(c for c in expand(load_study(tmp_path / "dist.json"), "quick", False)
                        if c.program == "distributed"), "pu")
    del sweep["profiles"]["quick"]["distributed_set"]
    (tmp_path / "dist.json").write_text(json.dumps(sweep))
    with pytest.raises(FedscopeError, match=r"key 'profiles\.quick\.distributed_set': privacy_modes\.user has "
                                            r"\"distributed\": give its training here"):
        load_study(tmp_path / "dist.json")
    cells_study = json.loads((default_config_dir() / "main.json").read_text())
    cells_study["profiles"]["quick"]["distributed_set"] = {"federated.rounds": 200}
    (tmp_path / "cells.json").write_text(json.dumps(cells_study))
    with pytest.raises(FedscopeError, match=r"key 'profiles\.quick\.distributed_set': only a sweep has a "
                                            r"distributed program; this study is 'cells'"):
        load_study(tmp_path / "cells.json")
    # a method without user-level DP cells (FedSCOPE's would be the same runs) has no user-unit program
    sweep["profiles"]["quick"]["distributed_set"] = {"federated.client_opt": "sgd", "federated.chunk_size": 0}
    sweep["methods"] = ["fedscope", "fedscope_wo_intra"]
    (tmp_path / "dist.json").write_text(json.dumps(sweep))
    assert {(c.method, c.program) for c in expand(load_study(tmp_path / "dist.json"), "quick", False)} == {
        ("fedscope", "client"), ("fedscope", "user"), ("fedscope", "distributed"), ("fedscope_wo_intra", "client")}
    sweep["methods"] = ["fedscope"]
    for bad, match in ((["personalized", "personalized"], r"key 'privacy_modes': a mode is repeated"),
                       ({"user": ["central"]}, r"key 'privacy_modes\.user\[0\]': expected one of personalized, "
                                               r"uniform, distributed for the user unit, got 'central'"),
                       ({"silo": ["uniform"]}, r"key 'privacy_modes\.silo': expected an object")):
        sweep["privacy_modes"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(sweep))
        with pytest.raises(FedscopeError, match=match):
            load_study(tmp_path / "bad.json")
    raw["dp"] = [{"mode": "central", "epsilon": 8, "unit": "user"}]
    path.write_text(json.dumps(raw))
    with pytest.raises(FedscopeError, match=r"key 'dp\[0\]\.unit': mode central .* has no user unit"):
        load_study(path)
    raw["dp"] = [{"mode": "uniform", "epsilon": 8, "unit": "record"}]
    path.write_text(json.dumps(raw))
    with pytest.raises(FedscopeError, match=r"key 'dp\[0\]\.unit': expected one of client, user, got 'record'"):
        load_study(path)


def _write(tmp_path: Path, **changes) -> Path:
    raw = json.loads((default_config_dir() / "main.json").read_text())
    raw.update(changes)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    return path


def test_a_variant_adds_overrides_under_one_profile(tmp_path):
    raw = json.loads((default_config_dir() / "clients_sampling.json").read_text())
    raw["variants"] = [{"name": "q", "set": {"federated.fraction": 0.5},
                        "profiles": {"quick": {"set": {"federated.max_buckets": 2}}}}]
    (tmp_path / "v.json").write_text(json.dumps(raw))
    study = load_study(tmp_path / "v.json")
    got = {p: {(run_config(c, "v").federated.fraction, run_config(c, "v").federated.max_buckets)
               for c in expand(study, p, False)} for p in ("quick", "full")}
    assert got == {"quick": {(0.5, 2)}, "full": {(0.5, 4)}}


def test_bad_configs_name_file_and_key(tmp_path):
    with pytest.raises(FedscopeError, match=r"bad\.json: key 'methods\[1\]': unknown method 'fedfoo'"):
        load_study(_write(tmp_path, methods=["fedscope", "fedfoo"]))
    with pytest.raises(FedscopeError, match=r"bad\.json: key 'colour': unknown key"):
        load_study(_write(tmp_path, colour="red"))
    raw = json.loads((default_config_dir() / "main.json").read_text())
    raw["profiles"]["quick"]["set"]["model.dimm"] = 3
    with pytest.raises(FedscopeError, match=r"bad\.json: key 'profiles\.quick\.set': unknown config key 'model\.dimm'"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    raw["profiles"]["quick"]["set"] = {"federated.rounds": "many"}
    with pytest.raises(FedscopeError, match=r"profiles\.quick\.set.*federated\.rounds"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    with pytest.raises(FedscopeError, match=r"bad\.json: key 'datasets\[0\]': unknown dataset"):
        load_study(_write(tmp_path, datasets=["nope"]))
    with pytest.raises(FedscopeError, match=r"key 'dp\[1\]\.epsilon'"):
        load_study(_write(tmp_path, dp=[{"mode": "off"}, {"mode": "uniform", "epsilon": "inf"}]))
    raw = json.loads((default_config_dir() / "main.json").read_text())
    raw["profiles"]["quick"]["max_users"] = {"abxi-food-kitchen": 10, "llmcdsr-food-kitchen": 10}
    with pytest.raises(FedscopeError, match=r"key 'profiles\.quick\.max_users': expected one count per dataset.*"
                                            r"'c2dsr-movie-book' is missing"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    raw["profiles"]["quick"]["max_users"] = {"abxi-food-kitchen": 10, "llmcdsr-food-kitchen": -1,
                                             "c2dsr-movie-book": 0}
    with pytest.raises(FedscopeError, match=r"key 'profiles\.quick\.max_users\.llmcdsr-food-kitchen': expected an "
                                            r"integer >= 0"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    raw["profiles"]["quick"]["max_users"], raw["profiles"]["quick"]["max_items"] = 10, "all"
    with pytest.raises(FedscopeError, match=r"key 'profiles\.quick\.max_items': expected an integer >= 0"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    variant = {"name": "q", "set": {"federated.fraction": 0.5}, "profiles": {"fast": {"set": {}}}}
    with pytest.raises(FedscopeError, match=r"key 'variants\[0\]\.profiles\.fast': unknown profile"):
        load_study(_write(tmp_path, variants=[variant]))
    variant["profiles"] = {"quick": {"set": {"federated.max_bucket": 1}}}
    with pytest.raises(FedscopeError, match=r"key 'variants\[0\]\.profiles\.quick\.set': unknown config key"):
        load_study(_write(tmp_path, variants=[variant]))
    with pytest.raises(FedscopeError, match="--studies: unknown study 'mian'"):
        load_studies(["mian"])
    raw = json.loads((default_config_dir() / "main.json").read_text())
    del raw["profiles"]["full"]
    with pytest.raises(FedscopeError, match=r"key 'profiles': profile 'full' is missing"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    raw["profiles"]["gpu"] = raw["profiles"]["quick"]
    with pytest.raises(FedscopeError, match=r"key 'profiles\.gpu': unknown profile; expected one of quick, full, cpu"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))


def test_cpu_profile_whole_abxi_one_seed_and_only_the_studies_that_have_it(tmp_path):
    """--profile cpu: the whole abxi-food-kitchen, one seed, the paper-size model; the studies without the profile
    are left out, and naming one is an error that lists the studies with it."""
    studies = load_studies(None, None, "cpu")
    assert [s.name for s in studies] == ["main", "ablation", "cold_start", "convergence"]
    main_cells = expand(studies[0], "cpu", False)
    assert {c.dataset for c in main_cells} == {"abxi-food-kitchen"} and {c.seed for c in main_cells} == {0}
    assert len(main_cells) == 2 * 2 + 3                 # FedSCOPE, FedSASRec x 2 DP settings + 3 without DP
    prof = studies[0].profile("cpu")
    assert prof.users_for("abxi-food-kitchen") == 0 and prof.max_items == 0      # every user and item
    cfg = run_config(main_cells[0], "main")
    assert (cfg.model.dim, cfg.model.max_len, cfg.eval.num_negatives, cfg.federated.clients) == (64, 50, 999, 20)
    with pytest.raises(FedscopeError, match=r"--studies: study 'privacy_utility' has no profile 'cpu' .*"
                                            r"the studies with it: main, ablation, cold_start, convergence"):
        load_studies(["main", "privacy_utility"], None, "cpu")
    cs = json.loads((default_config_dir() / "clients_sampling.json").read_text())
    cs["variants"][0]["profiles"] = {"cpu": {"set": {"federated.max_buckets": 1}}}
    (tmp_path / "cs").mkdir()
    (tmp_path / "cs" / "cs.json").write_text(json.dumps(cs))
    with pytest.raises(FedscopeError, match=r"cs\.json: key 'variants\[0\]\.profiles\.cpu': the study has no "
                                            r"profile 'cpu'"):
        load_study(tmp_path / "cs" / "cs.json")
    # a derived study pulls in the cells of the study it reads, under the same profile
    from fedscope_jax.experiments.planning import Options, plan
    every = {s.name: s for s in load_studies()}
    cells = plan(load_studies(["cold_start"], None, "cpu"), every, Options("cpu", tmp_path, tmp_path))
    assert list(cells) == ["main", "cold_start"] and len(cells["main"]) == len(main_cells) and not cells["cold_start"]
    only = tmp_path / "only"
    only.mkdir()
    (only / "pu.json").write_text((default_config_dir() / "privacy_utility.json").read_text())
    with pytest.raises(FedscopeError, match=r"--profile cpu: no study in .*only has that profile"):
        load_studies(None, only, "cpu")
    # a derived study's profile must exist in the study it reads
    for f in default_config_dir().glob("*.json"):
        raw = json.loads(f.read_text())
        if raw["study"] == "main":
            del raw["profiles"]["cpu"]
        (tmp_path / f.name).write_text(json.dumps(raw))
    with pytest.raises(FedscopeError, match=r"cold_start\.json: key 'profiles\.cpu': the study it reads, 'main', "
                                            r"has no profile 'cpu'"):
        load_studies(None, tmp_path)


def test_a_profile_may_run_its_own_dp_settings(tmp_path):
    """`profiles.X.dp` replaces the study's DP list under X only: the cpu ablation runs its arms without DP (the
    whole-data ID models are at the random level at eps 8), so the method that needs DP has no cell there; the
    report says which settings ran. A sweep has no DP list, and a bad entry names its key."""
    from fedscope_jax.experiments.report import _study_section

    ablation = next(s for s in load_studies() if s.name == "ablation")
    quick, cpu = expand(ablation, "quick", False), expand(ablation, "cpu", False)
    assert {c.dp.mode for c in quick} == {"off", "personalized", "uniform"}
    assert {c.dp.label for c in cpu} == {"off"} and "fedscope_uniform_dp" not in {c.method for c in cpu}
    assert {c.method for c in cpu} == set(ablation.methods) - {"fedscope_uniform_dp"}
    assert ablation.dp_for("quick") == ablation.dp and ablation.dp_for("cpu") != ablation.dp
    info = {"title": "Ablation", "description": "each without DP and at eps 8", "profile_dp": ["off"], "cells": []}
    text = "\n".join(_study_section(tmp_path, tmp_path, "ablation", info, {"profile": "cpu", "studies": {}}))
    assert "Under the `cpu` profile this study runs the DP settings off only" in text
    raw = json.loads((default_config_dir() / "main.json").read_text())
    raw["profiles"]["quick"]["dp"] = []
    with pytest.raises(FedscopeError, match=r"bad\.json: key 'profiles\.quick\.dp': expected a non-empty list"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    raw["profiles"]["quick"]["dp"] = [{"mode": "personalized", "epsilon": 0}]
    with pytest.raises(FedscopeError, match=r"bad\.json: key 'profiles\.quick\.dp\[0\]\.epsilon': expected a "
                                            r"positive number"):
        load_study(_write(tmp_path, profiles=raw["profiles"]))
    pu = json.loads((default_config_dir() / "privacy_utility.json").read_text())
    pu["profiles"]["quick"]["dp"] = [{"mode": "off"}]
    (tmp_path / "pu.json").write_text(json.dumps(pu))
    with pytest.raises(FedscopeError, match=r"pu\.json: key 'profiles\.quick\.dp': only a cells study has DP "
                                            r"settings; this one is 'sweep'"):
        load_study(tmp_path / "pu.json")


def test_the_plan_records_the_dp_settings_a_profile_runs(tmp_path, monkeypatch):
    """plan.json states a profile's own DP list (`profiles.X.dp`) for the report, and only where the profile
    has one: the cpu ablation runs off only; the quick one runs the study's list."""
    from fedscope_jax.cli import main
    from fedscope_jax.experiments import report, runner

    def fake_run_cell(cell, cell_dir, *rest):
        cell_dir.mkdir(parents=True)
        (cell_dir / "summary.json").write_text("{}")
        return True

    monkeypatch.setattr(runner, "release_programs", lambda: None)
    monkeypatch.setattr(report, "write_report", lambda root, out, benchmark=None: out / "report.md")
    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    data_root = str(real_dataset("abxi-food-kitchen").parent)
    for profile, expected in (("cpu", ["off"]), ("quick", None)):
        out = tmp_path / profile
        assert main(["reproduce", "--profile", profile, "--dry-run", "--smoke", "--studies", "ablation",
                     "--datasets", "abxi-food-kitchen", "--data-root", data_root, "--no-compile-cache",
                     "--out", str(out)]) == 0
        plan = json.loads((out / "dry-run" / "plan.json").read_text())
        assert plan["profile"] == profile and plan["studies"]["ablation"].get("profile_dp") == expected
        cells = plan["studies"]["ablation"]["cells"]
        assert cells and any("-eps8-" in c for c in cells) == (expected is None)   # a DP cell in quick only


def test_dry_run_every_study(tmp_path):
    """fedscope reproduce --profile quick --dry-run --smoke on abxi-food-kitchen: every study's config, the
    first cell of each of its methods trained with the tiny budget, then the report."""
    from fedscope_jax.cli import main

    data_root = real_dataset("abxi-food-kitchen").parent
    out = tmp_path / "rep"
    assert main(["reproduce", "--profile", "quick", "--dry-run", "--smoke", "--datasets", "abxi-food-kitchen",
                 "--data-root", str(data_root), "--out", str(out)]) == 0
    root = out / "dry-run"
    plan = json.loads((root / "plan.json").read_text())
    assert plan["dry_run"] and plan["status"] == "complete" and set(plan["studies"]) == set(STUDIES)
    assert not (out / "runs").exists()                      # dry-run results never mix with real ones
    main_cells = plan["studies"]["main"]["cells"]
    assert len(main_cells) == 5 + 1                          # + the first user-unit cell (FedSCOPE's DP cell)
    for rel in main_cells:
        cell = json.loads((root / rel / "cell.json").read_text())
        assert cell["dry_run"] and cell["attributes"].startswith("none")
        assert (root / rel / "summary.json").is_file()
    dp_cell = next(rel for rel in main_cells if "/fedscope/personalized-user-eps8-" in rel)
    assert json.loads((root / dp_cell / "config.json").read_text())["privacy"]["unit"] == "user"
    sweeps = plan["studies"]["privacy_utility"]["cells"]     # one program per unit (smoke: the first seed)
    assert [Path(rel).name.split("-seed")[0] for rel in sweeps] == ["sweep", "sweep-user", "sweep-distributed"]
    for rel, unit, modes in zip(sweeps, ("client", "user", "user"), (2, 2, 1)):
        runs = sorted((root / rel).glob("*-seed0"))
        assert len(runs) == modes * 6                        # modes x epsilons (inf copies included)
        assert {json.loads((r / "config.json").read_text())["privacy"]["unit"] for r in runs} == {unit}
    dist = {json.loads((r / "cell.json").read_text())["dp"]: json.loads((r / "config.json").read_text())
            for r in (root / sweeps[2]).glob("*-seed0")}
    assert set(dist) == {"off-distributed"} | {f"distributed-user-eps{e}" for e in (1, 2, 4, 8, 16)}
    assert {(c["privacy"]["mode"], c["federated"]["client_opt"]) for k, c in dist.items() if k != "off-distributed"} \
        == {("distributed", "sgd")}
    report = (root / "report" / "report.md").read_text()
    assert "DRY RUN" in report and "profile: **quick** (dry run)" in report
    assert (root / "report" / "privacy_utility_abxi-food-kitchen.png").is_file()
    assert (root / "report" / "convergence_abxi-food-kitchen.png").is_file()
    # finished cells are skipped: a second reproduction trains nothing and gives the same plan
    before = {p: p.stat().st_mtime for p in root.rglob("summary.json")}
    assert main(["reproduce", "--profile", "quick", "--dry-run", "--smoke", "--datasets", "abxi-food-kitchen",
                 "--data-root", str(data_root), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime for p in root.rglob("summary.json")} == before
    # a finished cell whose settings differ from today's (here: trained before the loss was recorded, i.e. with
    # the sampled softmax of then, where the default is now gbce) is trained again; the others stay skipped
    stale = root / main_cells[0] / "config.json"
    stored = json.loads(stale.read_text())
    del stored["model"]["loss"]["rec"]
    stale.write_text(json.dumps(stored))
    assert main(["reproduce", "--profile", "quick", "--dry-run", "--smoke", "--datasets", "abxi-food-kitchen",
                 "--data-root", str(data_root), "--out", str(out)]) == 0
    after = {p: p.stat().st_mtime for p in root.rglob("summary.json")}
    assert [p for p in after if after[p] != before[p]] == [root / main_cells[0] / "summary.json"]
    assert json.loads(stale.read_text())["model"]["loss"]["rec"] == "gbce"


def test_subset_keeps_whole_users_and_attribute_vectors_follow_the_items(tmp_path):
    import numpy as np
    import pyarrow as pa

    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.data.synth import SynthConfig, synthesize
    from fedscope_jax.experiments.datasets import semantic_for, semantic_tables, subset_users, write_subset
    from fedscope_jax.utils.io import write_arrow

    synthesize(SynthConfig(users=60, items=(40, 50), min_length=6, max_length=12, mean_length=8.0, min_per_domain=3, topics=4),
               tmp_path / "full")
    full = load_dataset(tmp_path / "full")
    users = subset_users(full, 20, seed=0)
    assert len(users) == 20 and np.all(np.diff(users) > 0)
    sub = load_dataset(write_subset(full, users, tmp_path / "sub"))
    assert sub.n_users == 20 and sub.n_interactions == int(np.isin(full.user, users).sum())
    assert all(n <= m for n, m in zip(sub.n_items, full.n_items))
    # enrichment output of the FULL dataset: vector = (domain index, item id, 1, 1), item 3 of domain A failed
    rows = [(d, i) for d, n in enumerate(full.n_items) for i in range(n)]
    table = pa.table({"item_id": pa.array([i for _, i in rows], pa.int32()),
                      "domain": pa.array([full.domains[d] for d, _ in rows]),
                      "vector": pa.FixedSizeListArray.from_arrays(
                          pa.array(np.array([[d, i, 1, 1] for d, i in rows], np.float32).ravel()), 4),
                      "status": pa.array(["failed" if (d, i) == (0, 3) else "ok" for d, i in rows])})
    (tmp_path / "attrs" / "toy").mkdir(parents=True)
    write_arrow(table, tmp_path / "attrs" / "toy" / "item_embeddings.arrow")
    tables, coverage, label = semantic_for(tmp_path / "sub", sub, tmp_path / "attrs", "toy")
    assert label.endswith("item_embeddings.arrow")
    first_user = np.flatnonzero(full.user == users[0])
    for row in first_user:   # the subset's re-indexed item carries the vector of the same source item
        d, item = full.domain[row], full.item[row]
        new = np.flatnonzero(sub.user == 0)[list(first_user).index(row)]
        assert sub.domain[new] == d
        vec = tables[d]["vectors"][sub.item[new] + 1]
        assert tables[d]["mask"][sub.item[new] + 1] == (0.0 if (d, item) == (0, 3) else 1.0)
        if (d, item) != (0, 3):
            assert vec.tolist() == [d, item, 1, 1]
    assert coverage[full.domains[1]]["items"] == sub.n_items[1]
    # what `fedscope train --data SUB --attributes DIR` reads: the same mapped tables, from the directory
    same, same_coverage = semantic_tables(tmp_path / "attrs" / "toy", tmp_path / "sub", sub)
    assert same_coverage == coverage
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(same, tables) for k in ("vectors", "mask"))
    # vectors an enrichment made for the subset itself (its run.json names the subset's items.arrow): by its ids
    import hashlib

    core = load_dataset(write_subset(full, users, tmp_path / "core", max_items=20))   # items re-indexed
    own = tmp_path / "attrs-sub"
    own.mkdir()
    n_sub = core.n_items
    write_arrow(pa.table({"item_id": pa.array([i for n in n_sub for i in range(n)], pa.int32()),
                          "domain": pa.array([core.domains[d] for d, n in enumerate(n_sub) for _ in range(n)]),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.array(
                              [[d, i, 2, 2] for d, n in enumerate(n_sub) for i in range(n)], np.float32).ravel()), 4),
                          "status": pa.array(["ok"] * sum(n_sub))}), own / "item_embeddings.arrow")
    sha = hashlib.sha256((tmp_path / "core" / "items.arrow").read_bytes()).hexdigest()
    (own / "run.json").write_text(json.dumps({"items_sha256": sha}))
    direct, _ = semantic_tables(own, tmp_path / "core", core)
    assert direct[1]["vectors"][1 + 5].tolist() == [1, 5, 2, 2]          # item 5 of the subset, not mapped
    (own / "run.json").write_text(json.dumps({"items_sha256": "0" * 64}))   # made for another items.arrow
    mapped, _ = semantic_tables(own, tmp_path / "core", core)
    assert not np.array_equal(mapped[1]["vectors"], direct[1]["vectors"])
    none, _, why = semantic_for(tmp_path / "sub", sub, tmp_path / "attrs", "other")
    assert none is None and why.startswith("none (") and "item_embeddings.arrow missing" in why


def test_item_core_keeps_the_most_trained_items_and_renumbers_positions(tmp_path):
    import numpy as np

    from fedscope_jax.data.canonical import TRAIN, load_dataset
    from fedscope_jax.data.synth import SynthConfig, synthesize
    from fedscope_jax.experiments.datasets import ITEM_MAP_FILE, core_items, write_subset
    from fedscope_jax.utils.io import read_arrow

    synthesize(SynthConfig(users=80, items=(40, 50), min_length=6, max_length=12, mean_length=8.0, min_per_domain=3,
                           topics=4), tmp_path / "full")
    full = load_dataset(tmp_path / "full")
    core = core_items(full, 10)
    for d, kept in enumerate(core):      # hand-check: no dropped item has more train interactions than a kept one
        counts = np.bincount(full.item[(full.domain == d) & (full.split == TRAIN)], minlength=full.n_items[d])
        dropped = np.setdiff1d(np.arange(full.n_items[d]), kept)
        assert len(kept) == 10 and counts[kept].min() >= counts[dropped].max()
    sub = load_dataset(write_subset(full, np.arange(full.n_users), tmp_path / "core", max_items=10))
    assert sub.n_items == (10, 10)
    in_core = np.zeros(len(full.user), bool)
    for d, kept in enumerate(core):
        in_core |= (full.domain == d) & np.isin(full.item, kept)
    assert sub.n_interactions == int(in_core.sum())
    assert sub.n_users == len(np.unique(full.user[in_core]))          # users left with nothing are dropped
    for u in range(sub.n_users):                                     # positions renumbered 0..n-1, order kept
        assert sub.position[sub.user == u].tolist() == list(range(int((sub.user == u).sum())))
    imap = read_arrow(tmp_path / "core" / ITEM_MAP_FILE)
    src = imap["source_item_id"].to_numpy()
    for d in range(2):                                               # ids map back to the source items
        assert src[imap["domain"].to_numpy() == d].tolist() == core[d].tolist()
    # the kept rows are the full dataset's core rows, in order, with their split labels
    first = np.unique(full.user[in_core])[0]
    rows = np.flatnonzero(in_core & (full.user == first))
    assert [int(core[full.domain[r]][sub.item[i]]) for i, r in zip(np.flatnonzero(sub.user == 0), rows)] == \
        full.item[rows].tolist()
    assert sub.split[sub.user == 0].tolist() == full.split[rows].tolist()


def test_release_programs_drops_every_cached_program():
    """Between cells the reproduction drops compiled programs (a process holding ~45 cells' programs hits
    vm.max_map_count and crashes in LLVM); the process's program cache and JAX's jit caches are emptied."""
    import jax
    import jax.numpy as jnp

    from fedscope_jax.experiments.runner import release_programs
    from fedscope_jax.model.config import ModelConfig
    from fedscope_jax.train.centralized import train_step
    from fedscope_jax.train.programs import PROGRAMS

    double = jax.jit(lambda x: 2 * x)
    double(jnp.ones(3))
    config = ModelConfig(dim=8, blocks=1, heads=1, max_len=4)
    step = train_step(config, 1e-3, 0.0)   # kept, not compiled
    assert train_step(config, 1e-3, 0.0) is step and double._cache_size() == 1 and len(PROGRAMS) >= 1
    release_programs()
    assert double._cache_size() == 0 and len(PROGRAMS) == 0
    assert train_step(config, 1e-3, 0.0) is not step


def test_seeds_with_the_same_semantic_tables_share_one_client_config():
    """The seeds of a cell reuse its compiled programs, which are keyed on the ClientConfig object: the same
    settings and the same semantic tables object give the same object; other tables (even equal) another."""
    import numpy as np

    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import client_config

    cfg = load_config(None, ["model.dim=8", "train.seed=0"])
    other_seed = load_config(None, ["model.dim=8", "train.seed=1"])
    tables = [{"vectors": np.zeros((3, 4), np.float32), "mask": np.ones(3, np.float32)}]
    copy = [dict(t) for t in tables]
    one = {"n_domains": 1}
    assert client_config(cfg, tables, **one) is client_config(other_seed, tables, **one)
    assert client_config(cfg, copy, **one) is not client_config(cfg, tables, **one)
    assert client_config(cfg, **one) is client_config(other_seed, **one) is not client_config(cfg, tables, **one)
    assert client_config(load_config(None, ["model.dim=16"]), tables, **one) is not client_config(cfg, tables, **one)


def test_plan_json_keeps_the_time_of_finished_cells_when_the_process_dies(tmp_path, monkeypatch):
    """plan.json is rewritten after every cell: the seconds of the cells a killed reproduction finished are on
    disk, its status stays 'running', and the next process adds its own time to the totals (never counting
    the first process's time twice, nor a skipped finished cell)."""
    import time

    from fedscope_jax.cli import main
    from fedscope_jax.experiments import report, runner

    out = tmp_path / "rep"
    plan_path = out / "dry-run" / "plan.json"
    args = ["reproduce", "--profile", "quick", "--dry-run", "--smoke", "--studies", "main", "--datasets",
            "abxi-food-kitchen", "--data-root", str(real_dataset("abxi-food-kitchen").parent), "--out", str(out)]
    seen: list[dict] = []

    def fake_run_cell(cell, cell_dir, *rest, die_at=None):   # ~0.1 s wall, ~0.05 s CPU, then a summary.json
        seen.append(json.loads(plan_path.read_text()))
        if (cell_dir / "summary.json").is_file():
            return False
        if len(seen) == die_at:
            raise RuntimeError("killed")
        t0 = time.process_time()
        while time.process_time() - t0 < 0.05:
            pass
        time.sleep(0.05)
        cell_dir.mkdir(parents=True)
        (cell_dir / "summary.json").write_text("{}")
        return True

    monkeypatch.setattr(runner, "release_programs", lambda: None)
    monkeypatch.setattr(report, "write_report", lambda root, out, benchmark=None: out / "report.md")  # no runs
    monkeypatch.setattr(runner, "run_cell", lambda *a: fake_run_cell(*a, die_at=3))
    with pytest.raises(RuntimeError, match="killed"):     # the first process dies during its third cell
        main(args)
    first = json.loads(plan_path.read_text())
    cells = first["studies"]["main"]["cells"]
    assert len(cells) == 6 and first["status"] == "running"
    assert set(first["cells_seconds"]) == set(cells[:2])
    assert all(t["seconds"] >= 0.1 and t["cpu_seconds"] >= 0.05 for t in first["cells_seconds"].values())
    assert seen[1]["cells_seconds"] == {cells[0]: seen[1]["cells_seconds"][cells[0]]}   # saved before cell 2 ran
    study = first["studies"]["main"]
    assert study["seconds_total"] == study["seconds_this_process"] >= 0.2
    assert study["cpu_seconds_total"] == study["cpu_seconds_this_process"] >= 0.1
    assert first["seconds_total"] == first["seconds_this_process"] >= study["seconds_total"]
    cache = first["compile_cache"]    # on by default, under OUT (not under OUT/dry-run), machine-specific
    assert cache["enabled"] and Path(cache["dir"]).parent == out / "cache" / "xla" and Path(cache["dir"]).is_dir()
    assert set(first["xla_compiles_this_process"]) == {"programs", "seconds", "cache_hits", "cache_writes"}

    seen.clear()    # the second process: the two finished cells are skipped, the other four trained
    monkeypatch.setattr(runner, "run_cell", lambda *a: fake_run_cell(*a))
    assert main(args + ["--no-compile-cache"]) == 0
    second = json.loads(plan_path.read_text())
    assert second["status"] == "complete" and not second["compile_cache"]["enabled"]
    assert set(second["cells_seconds"]) == set(cells)
    assert all(second["cells_seconds"][c] == first["cells_seconds"][c] for c in cells[:2])   # not re-timed
    for key in ("seconds", "cpu_seconds"):
        s2 = second["studies"]["main"]
        assert s2[f"{key}_total"] == pytest.approx(study[f"{key}_total"] + s2[f"{key}_this_process"])
        assert second[f"{key}_total"] == pytest.approx(first[f"{key}_total"] + second[f"{key}_this_process"])
    assert second["studies"]["main"]["seconds_this_process"] >= 0.3

    shared = tmp_path / "shared-cache"   # a third process finds everything done: the totals grow by its overhead
    assert main(args + ["--compile-cache", str(shared)]) == 0
    third = json.loads(plan_path.read_text())
    assert Path(third["compile_cache"]["dir"]) == shared / Path(cache["dir"]).name   # same machine folder, in DIR
    assert Path(third["compile_cache"]["dir"]).is_dir()
    assert third["cells_seconds"] == second["cells_seconds"]
    assert third["seconds_total"] == pytest.approx(second["seconds_total"] + third["seconds_this_process"])
    assert third["seconds_this_process"] < second["seconds_this_process"]


def test_compile_cache_reads_back_a_program_dropped_from_memory(tmp_path, monkeypatch):
    """persistent_compile_cache points JAX's persistent cache at the folder while it runs: a program compiled again
    after jax.clear_caches() (what release_programs does between cells) is read from disk, also from a copy of
    the folder elsewhere; settings restored."""
    import shutil

    import jax
    import jax.numpy as jnp

    from fedscope_jax.experiments import runner

    monkeypatch.setattr(runner, "CACHE_MIN_COMPILE_SECONDS", 0.0)    # the toy program compiles in milliseconds
    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_enable_xla_caches

    def f(x):
        return jnp.tanh(x @ x.T).sum(axis=0) * 3.0

    x = jnp.arange(12.0).reshape(3, 4)
    with runner.persistent_compile_cache(tmp_path / "xla") as (cache, compiles):
        assert cache == {"enabled": True, "dir": str(tmp_path / "xla"), "min_compile_seconds": 0.0}
        y = jax.jit(f)(x)
        assert compiles["cache_writes"] >= 1 and any((tmp_path / "xla").iterdir())
        jax.clear_caches()
        hits = compiles["cache_hits"]
        assert jnp.array_equal(jax.jit(f)(x), y)
        assert compiles["cache_hits"] == hits + 1 and compiles["programs"] >= 2
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_enable_xla_caches) == before
    # a copied (or moved) cache still serves: the folder's path is not part of the entries' keys on CPU
    shutil.copytree(tmp_path / "xla", tmp_path / "moved")
    jax.clear_caches()
    with runner.persistent_compile_cache(tmp_path / "moved") as (_, compiles):
        assert jnp.array_equal(jax.jit(f)(x), y) and compiles["cache_hits"] >= 1
    with runner.persistent_compile_cache(None) as (cache, _):
        assert cache["enabled"] == bool(before[0])


def test_the_title_only_arm_reads_the_title_vectors_or_is_not_run(tmp_path, monkeypatch):
    """The ablation's title-only arm (method vectors "title") trains on the vectors of --title-root, mapped
    through the subset's item_map like the LLM vectors, and FedSCOPE keeps its own (none here); without
    --title-root its cells are listed as not run (never trained ID-only under its name) and the report says so."""
    import numpy as np
    import pyarrow as pa

    from fedscope_jax.cli import main
    from fedscope_jax.experiments import report, runner
    from fedscope_jax.utils.io import write_arrow

    title_root = tmp_path / "titles"
    (title_root / "abxi-food-kitchen").mkdir(parents=True)
    n = 3000   # vectors for the first items of each domain of the full prepared dataset (ids 0..n-1)
    rng = np.random.default_rng(0)
    write_arrow(pa.table({"item_id": pa.array(list(range(n)) * 2, pa.int32()),
                          "domain": pa.array(["food"] * n + ["kitchen"] * n),
                          "vector": pa.FixedSizeListArray.from_arrays(
                              pa.array(rng.normal(size=2 * n * 4).astype(np.float32)), 4),
                          "status": pa.array(["ok"] * (2 * n))}),
                title_root / "abxi-food-kitchen" / "item_embeddings.arrow")
    calls: dict[str, tuple] = {}

    def fake_run_cell(cell, cell_dir, ds, semantic, coverage, label, *rest):
        calls[cell.method] = (semantic, coverage, label)
        cell_dir.mkdir(parents=True, exist_ok=True)
        (cell_dir / "summary.json").write_text("{}")
        return True

    monkeypatch.setattr(runner, "release_programs", lambda: None)
    monkeypatch.setattr(report, "write_report", lambda root, out, benchmark=None: out / "report.md")
    monkeypatch.setattr(runner, "run_cell", fake_run_cell)
    args = ["reproduce", "--profile", "quick", "--dry-run", "--smoke", "--studies", "ablation,privacy_utility",
            "--datasets", "abxi-food-kitchen", "--data-root", str(real_dataset("abxi-food-kitchen").parent)]
    assert main([*args, "--out", str(tmp_path / "with"), "--title-root", str(title_root)]) == 0
    semantic, coverage, label = calls["fedscope_title"]
    assert semantic is not None and label == str(title_root / "abxi-food-kitchen" / "item_embeddings.arrow")
    assert 0 < coverage["food"]["with_vector"] <= coverage["food"]["items"]
    assert calls["fedscope"][0] is None and calls["fedscope"][2].startswith("none (no --attributes-root")
    # the privacy study's no-ID arm on title vectors runs on them (a sweep cell), the LLM one has none
    assert calls["fedscope_title_noid"][2] == label and calls["fedscope_title_noid"][0] is not None
    assert "fedscope_noid" not in calls
    plan = json.loads((tmp_path / "with" / "dry-run" / "plan.json").read_text())
    assert plan["title_root"] == str(title_root)
    # without LLM vectors FedSCOPE is ID-only itself: the "w/o LLM" arm would repeat its cells, so is not run
    assert {r["method"] for r in plan["studies"]["ablation"]["not_run"]} == {"fedscope_wo_llm"}
    assert "fedscope_wo_llm" not in calls
    assert {r["method"] for r in plan["studies"]["privacy_utility"]["not_run"]} == {"fedscope_noid"}

    calls.clear()
    assert main([*args, "--out", str(tmp_path / "without")]) == 0
    assert "fedscope_title" not in calls and "fedscope" in calls
    assert "fedscope_title_noid" not in calls and "fedscope_noid" not in calls
    plan = json.loads((tmp_path / "without" / "dry-run" / "plan.json").read_text())
    info = plan["studies"]["ablation"]
    assert [r["method"] for r in info["not_run"]] == ["fedscope_wo_llm", "fedscope_title"]
    assert info["not_run"][0]["why"].startswith("the same runs as fedscope's without LLM vectors (none (no")
    assert info["not_run"][1]["why"].startswith("none (no --title-root")
    assert not any("/fedscope_title/" in rel for rel in info["cells"])
    (tmp_path / "rep").mkdir()
    lines = "\n".join(report._study_section(tmp_path / "without" / "dry-run", tmp_path / "rep", "ablation",
                                            {**info, "cells": []}, plan))
    assert "2 cell(s) not run" in lines and "`fedscope_title` on abxi-food-kitchen: none (no --title-root" in lines


def test_a_federated_cell_killed_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch):
    """A cell whose checkpoints/ folder is still empty (killed before its first checkpoint: they are written
    once a minute) is trained again from the start; one with a checkpoint is resumed from it."""
    import jax.numpy as jnp

    from fedscope_jax.engine.checkpoint import Checkpointer
    from fedscope_jax.engine.server import ServerState
    from fedscope_jax.experiments import runner

    study = load_study(default_config_dir() / "main.json")
    cell = next(c for c in expand(study, "quick", True) if c.mode == "federated")
    calls = []
    monkeypatch.setattr(runner, "trainer", lambda mode: lambda *a, **kw: calls.append((kw["resume"], kw["force"])))
    cell_dir = tmp_path / "cell"
    (cell_dir / "checkpoints").mkdir(parents=True)
    (cell_dir / "config.json").write_text("{}")
    runner.run_cell(cell, cell_dir, None, None, None, "none", tmp_path, study)
    ckpt = Checkpointer(cell_dir / "checkpoints")
    ckpt.save(ServerState({"w": jnp.zeros(2)}, {"m": jnp.zeros(2)}, jnp.asarray(3)))
    ckpt.close()
    runner.run_cell(cell, cell_dir, None, None, None, "none", tmp_path, study)
    assert calls == [(False, True), (True, False)]

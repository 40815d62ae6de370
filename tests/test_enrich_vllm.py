"""The real enrichment job (real vLLM, the embedded SmolLM2-135M-Instruct and all-MiniLM-L6-v2, on CPU) on 16
items of abxi-food-kitchen's catalogue, through `fedscope enrich`; then a run killed after its first shard and
restarted with the same arguments must keep the contract of resume (docs/enrich.md): finished shards are never
regenerated or changed, no item is lost or duplicated, every regenerated row is schema-valid. Regenerated rows
are NOT required to equal the uninterrupted run's: vLLM-CPU's greedy tokens depend on the batch composition of
each decode step, which is timing-dependent (asynchronous grammar compilation) and differs in an engine's first
steps (docs/enrich.md, "Shards and resume"), and vLLM's batch-invariant mode exists on GPUs only.

Needs the enrichment environment (`make enrich-env`); skipped with that reason when it is absent, except under
`make test` (FEDSCOPE_REQUIRE_ENRICH=1), where its absence is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from conftest import real_dataset

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from enrich import prompts, retry  # noqa: E402
from enrich import schema as schema_lib  # noqa: E402
from fedscope_jax.utils.io import read_arrow  # noqa: E402

pytestmark = [pytest.mark.enrich, pytest.mark.slow]

LIMIT = 8            # per domain: 16 items in all
SHARD = 4            # 4 shards, so a kill after the first one leaves work to resume
JOB_TIMEOUT = 400    # seconds per job run (engine start ~35-70 s on 2 cores)


def _venv() -> Path:
    from fedscope_jax.cli.enrich import enrich_venv

    venv = enrich_venv()
    if not (venv / ".installed").is_file():
        msg = f"enrichment environment {venv} not built (run `make enrich-env`)"
        if os.environ.get("FEDSCOPE_REQUIRE_ENRICH") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return venv


@pytest.fixture(scope="module")
def afk(tmp_path_factory) -> Path:
    """abxi-food-kitchen prepared with titles joined from llmcdsr-food-kitchen (the real catalogue)."""
    _venv()
    src, titles = real_dataset("abxi-food-kitchen"), real_dataset("llmcdsr-food-kitchen")
    from fedscope_jax.data.formats import prepare

    out = tmp_path_factory.mktemp("data") / "afk"
    prepare(src, out, fmt="abxi", titles=titles)
    return out


def _cmd(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fedscope_jax", "enrich", "--data", str(data), "--out", str(out),
            "--limit", str(LIMIT), "--shard-size", str(SHARD)]


def _run(data: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FEDSCOPE_NO_PROGRESS="1")
    proc = subprocess.run(_cmd(data, out), env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def full_run(afk, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enrich") / "full"
    _run(afk, out)
    return out


def _check_tables(items: pa.Table, attributes: pa.Table, embeddings: pa.Table) -> list[dict]:
    """What every finished job's tables must satisfy (an uninterrupted or a resumed one); returns the rows."""
    # one row per selected item: the first 8 items of each domain, in both tables, same order
    assert attributes.num_rows == embeddings.num_rows == 2 * LIMIT
    doms = pc.cast(attributes["domain"], pa.string()).to_pylist()
    assert doms == ["food"] * LIMIT + ["kitchen"] * LIMIT
    assert attributes["item_id"].to_pylist() == list(range(LIMIT)) * 2
    assert embeddings["item_id"].equals(attributes["item_id"])
    assert pc.cast(embeddings["domain"], pa.string()).to_pylist() == doms
    assert set(doms) <= set(pc.cast(items["domain"], pa.string()).to_pylist())

    # every generated row parses against the schema, and the typed columns hold exactly that object
    titles = {(d, i): t for d, i, t in zip(pc.cast(items["domain"], pa.string()).to_pylist(),
                                           items["item_id"].to_pylist(), items["title"].to_pylist())}
    rows = attributes.to_pylist()
    for row, dom in zip(rows, doms):
        assert row["status"] in retry.STATUSES
        assert row["model"] == "SmolLM2-135M-Instruct"
        assert row["prompt_version"] == prompts.prompt_version(dom)
        if row["status"] in (retry.OK, retry.RETRIED):
            obj, err = schema_lib.parse(row["raw_json"])
            assert err is None, (row["raw_json"], err)
            assert {f: row[f] for f in schema_lib.FIELDS} == obj
            assert row["attempts"] == 1 if row["status"] == retry.OK else row["attempts"] >= 2
            assert row["generated_tokens"] > 0
        elif row["status"] == retry.MISSING_TITLE:
            assert titles[(dom, row["item_id"])] is None
            assert row["raw_json"] is None and row["attempts"] == 0
            assert all(row[f] is None for f in schema_lib.FIELDS)
        else:  # failed: kept, with the last text and the reason
            assert row["attempts"] >= 2 and row["error"] and all(row[f] is None for f in schema_lib.FIELDS)
        if row["status"] != retry.MISSING_TITLE:
            assert titles[(dom, row["item_id"])] is not None
    # abxi food item 3 (ASIN B000052Y74) has no title in the LLMCDSR join
    assert rows[3]["status"] == retry.MISSING_TITLE

    # embeddings: declared dimension, finite, unit norm (all-MiniLM-L6-v2 normalizes), distinct per item
    vtype = embeddings.schema.field("vector").type
    assert vtype == pa.list_(pa.float32(), 384) and embeddings.schema.field("item_id").type == pa.int32()
    vectors = np.stack(embeddings["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    assert vectors.shape == (16, 384) and np.all(np.isfinite(vectors))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert len({v.tobytes() for v in vectors}) == 16
    expected_status = [retry.OK if s == retry.RETRIED else s for s in attributes["status"].to_pylist()]
    assert embeddings["status"].to_pylist() == expected_status     # "ok": made from title + valid attributes
    return rows


def test_job_writes_schema_valid_attributes_and_embeddings(afk, full_run):
    items = read_arrow(afk / "items.arrow")
    attributes = read_arrow(full_run / "attributes.arrow")
    embeddings = read_arrow(full_run / "item_embeddings.arrow")
    summary = json.loads((full_run / "enrich.json").read_text())
    rows = _check_tables(items, attributes, embeddings)
    assert sum(r["status"] in (retry.OK, retry.RETRIED) for r in rows) >= 12   # measured 15/15 titled ones valid
    assert summary["items"] == 16 and summary["embedding_dim"] == 384
    assert sum(summary["status_counts"].values()) == 16


def _fingerprints(shard_dir: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime (ns) of every finished shard file."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(shard_dir.glob("*.arrow"))}


def test_killed_job_resumes_without_redoing_or_losing_work(afk, full_run, tmp_path):
    out = tmp_path / "resumed"
    env = dict(os.environ, FEDSCOPE_NO_PROGRESS="1")
    proc = subprocess.Popen(_cmd(afk, out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)   # own process group: the kill reaches vLLM's workers too
    shard_dir = out / "shards"
    deadline = time.monotonic() + JOB_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(shard_dir.glob("*.attributes.arrow"))) >= 1:
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    done = sorted(p.name.split(".")[0] for p in shard_dir.glob("*.attributes.arrow"))
    assert 1 <= len(done) < 4, "the job was not killed between shards"
    assert not (out / "attributes.arrow").exists()
    kept = {name: fp for name, fp in _fingerprints(shard_dir).items() if name.split(".")[0] in done}
    assert len(kept) == 2 * len(done)                                 # both files of every finished shard
    killed_rows = {name: read_arrow(shard_dir / name) for name in kept}

    rerun = _run(afk, out)
    assert f"({len(done)} already done)" in rerun.stderr
    # finished shards were neither regenerated nor rewritten: same bytes, same modification time
    after = _fingerprints(shard_dir)
    assert {name: after[name] for name in kept} == kept
    assert len(after) == 8                                            # 4 shards x 2 files, nothing else

    items = read_arrow(afk / "items.arrow")
    full_attr, full_emb = read_arrow(full_run / "attributes.arrow"), read_arrow(full_run / "item_embeddings.arrow")
    attributes, embeddings = read_arrow(out / "attributes.arrow"), read_arrow(out / "item_embeddings.arrow")
    _check_tables(items, attributes, embeddings)                      # every row schema-valid, none lost or twice
    for name in ("item_id", "domain", "model", "prompt_version"):     # the same items in the same order
        assert attributes[name].equals(full_attr[name]), name
    assert embeddings.select(["item_id", "domain"]).equals(full_emb.select(["item_id", "domain"]))
    # the final tables hold the killed run's finished shards unchanged, row for row
    offset = 0
    for shard in sorted(p.name.split(".")[0] for p in shard_dir.glob("*.attributes.arrow")):
        a = read_arrow(shard_dir / f"{shard}.attributes.arrow")
        e = read_arrow(shard_dir / f"{shard}.embeddings.arrow")
        assert attributes.slice(offset, a.num_rows).equals(a) and embeddings.slice(offset, e.num_rows).equals(e)
        if shard in done:
            assert a.equals(killed_rows[f"{shard}.attributes.arrow"])
            assert e.equals(killed_rows[f"{shard}.embeddings.arrow"])
        offset += a.num_rows
    assert offset == 16
    # items without a title get no prompt, so their rows are the same in every run (nothing generated)
    missing = [i for i, s in enumerate(full_attr["status"].to_pylist()) if s == retry.MISSING_TITLE]
    assert missing and all(attributes["status"][i].as_py() == retry.MISSING_TITLE for i in missing)


def test_items_without_titles_get_the_documented_fallback(tmp_path):
    """No title anywhere: no prompt is sent, every item is kept with status missing_title and a finite vector
    made from the domain wording (one per domain, so equal within a domain)."""
    _venv()
    from fedscope_jax.data.canonical import items_table
    from fedscope_jax.utils.io import write_arrow

    data = tmp_path / "data"
    data.mkdir()
    write_arrow(items_table(["beauty", "electronics"], np.array([0, 0, 1]), np.array([0, 1, 0]),
                            ["B1", "B2", "E1"], [None, "  ", None]), data / "items.arrow")
    out = tmp_path / "out"
    _run_args = [sys.executable, "-m", "fedscope_jax", "enrich", "--data", str(data), "--out", str(out)]
    proc = subprocess.run(_run_args, env=dict(os.environ, FEDSCOPE_NO_PROGRESS="1"), capture_output=True,
                          text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    attributes = read_arrow(out / "attributes.arrow")
    embeddings = read_arrow(out / "item_embeddings.arrow")
    assert attributes["status"].to_pylist() == [retry.MISSING_TITLE] * 3
    assert attributes["attempts"].to_pylist() == [0, 0, 0] and attributes["raw_json"].null_count == 3
    assert embeddings["status"].to_pylist() == [retry.MISSING_TITLE] * 3
    vectors = np.stack(embeddings["vector"].to_numpy(zero_copy_only=False))
    assert np.all(np.isfinite(vectors)) and np.allclose(vectors[0], vectors[1])
    assert not np.allclose(vectors[0], vectors[2])


def test_title_only_arm_embeds_the_raw_title_without_an_llm(tmp_path):
    """`--text title` (the ablation's title-only arm): no instruct model runs; a titled item's vector is the
    sentence encoder's vector of "Title: <title>" (status title_only, vector status ok), an untitled one keeps
    the missing_title fallback; the summary says which text was embedded."""
    venv = _venv()
    from fedscope_jax.data.canonical import items_table
    from fedscope_jax.utils.io import write_arrow

    data = tmp_path / "data"
    data.mkdir()
    titles = ["Stainless Steel Garlic Press", None, "Organic Dark Roast Coffee Beans, 2 lb"]
    write_arrow(items_table(["kitchen", "food"], np.array([0, 0, 1]), np.array([0, 1, 0]), ["K1", "K2", "F1"],
                            titles), data / "items.arrow")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fedscope_jax", "enrich", "--data", str(data), "--out", str(out),
                           "--text", "title"], env=dict(os.environ, FEDSCOPE_NO_PROGRESS="1"), capture_output=True,
                          text=True, timeout=JOB_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    attributes = read_arrow(out / "attributes.arrow")
    embeddings = read_arrow(out / "item_embeddings.arrow")
    assert attributes["status"].to_pylist() == [retry.TITLE_ONLY, retry.MISSING_TITLE, retry.TITLE_ONLY]
    assert attributes["attempts"].to_pylist() == [0, 0, 0] and attributes["generated_tokens"].to_pylist() == [0] * 3
    assert all(attributes[f].null_count == 3 for f in schema_lib.FIELDS)
    assert embeddings["status"].to_pylist() == [retry.OK, retry.MISSING_TITLE, retry.OK]
    summary = json.loads((out / "enrich.json").read_text())
    assert summary["text"] == "title" and summary["model"] is None
    assert summary["this_invocation"]["generated_tokens"] == 0

    # the same encoder on the bare title text, computed apart in the enrichment environment
    script = ("import json, sys; from enrich.embed import SentenceEmbedder; from enrich.models import "
              "default_embed_dir; v = SentenceEmbedder(default_embed_dir()).embed(json.loads(sys.argv[1])); "
              "print(json.dumps(v.tolist()))")
    texts = ["Title: " + titles[0], "Title: " + titles[2]]
    ref = subprocess.run([str(venv / "bin" / "python"), "-c", script, json.dumps(texts)], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = np.asarray(json.loads(ref.stdout.strip().splitlines()[-1]), np.float32)
    vectors = np.stack(embeddings["vector"].to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(vectors[[0, 2]], expected, atol=2e-2)
    assert float(vectors[0] @ expected[0]) > 0.999 and float(vectors[0] @ expected[1]) < 0.9

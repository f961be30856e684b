"""A bundle with reference statistics through the whole fleet path, as real processes:
`modelfleet-hub publish --reference`, TUF signing, the agent's streamed download and unpack of a
four-member archive, verification, serving; and a standalone agent that retries a version whose
reference.json arrived after the rest of it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from modelfleet.kernel.bundle import REFERENCE_FILE, load_bundle
from tests.procs import wait_for
from tests.test_fleet import active, fleet, infer_version  # noqa: F401  (fleet: the fixture)


def test_published_reference_reaches_the_agent_signed(fleet, tmp_path: Path) -> None:  # noqa: F811
    hub = fleet.hub()
    agent = fleet.agent(hub, "edge-1", "site=berlin")
    rows = np.random.default_rng(0).standard_normal((800, 4)).astype(np.float32)
    ref = tmp_path / "ref.parquet"
    pq.write_table(pa.table({f"x[{i}]": rows[:, i] for i in range(4)}), ref)
    out = hub.cli(
        "publish", "mlp", str(fleet.model(0)), "--reference", str(ref), "--reference-bins", "8"
    )
    assert "published mlp v1" in out
    hub.cli("deploy", "mlp", "1")
    wait_for(lambda: active(agent) == 1, 60, "v1 with its reference")
    assert infer_version(agent) == "1"
    cached = load_bundle(agent.models / "cache" / "bundles" / "mlp" / "1")
    assert (cached.path / REFERENCE_FILE).is_file()
    reference = cached.reference()
    assert reference is not None and reference.rows == 800 and reference.bins == 8
    assert [t.tensor for t in reference.tensors] == ["x", "y"]


def test_a_version_refused_while_its_reference_was_copied_is_tried_again(
    tmp_path: Path, agent_factory
) -> None:
    from tests.conftest import make_mlp_bundle
    from tests.test_swap import active_version, status

    repo, staging = tmp_path / "repo", tmp_path / "staging"
    make_mlp_bundle(repo, 1)
    agent = agent_factory(repo)
    agent.wait_model("mlp", "1")
    rows = np.random.default_rng(1).standard_normal((600, 4)).astype(np.float32)
    pq.write_table(pa.table({f"x[{i}]": rows[:, i] for i in range(4)}), tmp_path / "r.parquet")
    v2 = make_mlp_bundle(staging, 2, seed=3, reference=tmp_path / "r.parquet")
    # A copy by hand that put reference.json last: the version shows up without it first.
    held = tmp_path / REFERENCE_FILE
    os.rename(v2.path / REFERENCE_FILE, held)
    os.rename(v2.path, repo / "mlp" / "2")
    wait_for(lambda: status(agent)["mlp"].get("failed"), 30, "v2 refused")
    (failed,) = status(agent)["mlp"]["failed"]
    assert failed["kind"] == "bundle" and "reference.json is missing" in failed["reason"]
    shutil.copyfile(held, repo / "mlp" / "2" / REFERENCE_FILE)
    client = agent.client()
    try:
        wait_for(lambda: active_version(client) == "2", 30, "v2 once its reference arrived")
    finally:
        client.close()

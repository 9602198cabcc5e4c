"""ED-ViT split over real daemons: the sub-models are placed on members (shipped once, hash
checked, cached), every image batch goes to all of them through the daemons' mesh links, the
master fuses. Same predictions as the in-process fused model; a lost member's part is named
missing and the fusion still answers; POST /v1/classify turns bad images into 4xx."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import urllib.error
import urllib.request
from dataclasses import replace

import pytest
import torch

from edgemesh.runtime.vit_deploy import VitDeployment
from edgemesh.vit.datasets import load_dataset
from edgemesh.vit.recipes import recipe_for, train_model
from edgemesh.vit.split import SplitConfig, build_split
from edgemesh.vit.store import save_split
from edgemesh.vit.train import TrainConfig, normalize, torch_threads

from .conftest import states, wait_for
from .llm_fixtures import ServerThread

pytestmark = pytest.mark.integration

# Accuracy is not the point here (tests/unit/test_vit.py checks it): a few quick epochs.
QUICK = SplitConfig(finetune=TrainConfig(epochs=2, batch_size=64, lr=5e-3),
                    fusion=TrainConfig(epochs=3, batch_size=64, lr=4e-3), importance_samples=256)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):  # type: ignore[no-untyped-def]
    data = load_dataset("digits")
    recipe = replace(recipe_for("digits"), train=TrainConfig(epochs=3, batch_size=64, lr=4e-3), split=QUICK)
    with torch_threads(1):
        full = train_model(data, recipe)
        split = build_split(full, data, 3, QUICK)
    d = tmp_path_factory.mktemp("vit") / "digits-3"
    save_split(d, split)
    return d, split, data


def _post(url: str, data: bytes, content_type: str) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_split_over_three_daemons_matches_in_process_and_survives_a_lost_member(cluster3, split_dir):
    d, sds, nodes = cluster3
    directory, split, data = split_dir
    assert wait_for(lambda: all(v == "alive" for v in states(sds[0]).values()), 30)
    x = normalize(data.test_x[:32], split.parts[0].model.config)
    want = split.classify(x)

    async def deploy_and_classify():  # type: ignore[no-untyped-def]
        dep = VitDeployment(sds[0], directory)
        slots = await dep.deploy()
        return dep, slots, await dep.classify(x)

    dep, slots, got = asyncio.run(deploy_and_classify())
    assert len({s.node_name for s in slots}) >= 2, slots  # spread over members, not all on the master
    assert got.missing == []
    assert torch.equal(got.probs.argmax(-1), want.predictions)
    assert torch.allclose(got.probs, want.probs, atol=1e-5)
    # The parts are cached where they were placed: a second deployment ships nothing.
    for slot in slots:
        if slot.node:
            held = next(sd for sd in sds if sd.load_identity()[0].node_id == slot.node)
            assert (held.path / "vit" / slot.json_sha / "part.json").is_file()

    # The API: images as base64 PNGs, a bad image, a wrong-size array.
    from io import BytesIO

    from PIL import Image

    def png(t: torch.Tensor) -> bytes:
        buf = BytesIO()
        Image.fromarray((t[0].numpy() * 255).astype("uint8")).save(buf, format="PNG")
        return buf.getvalue()

    server = ServerThread(None, "vit:digits-3", classifier=dep)
    try:
        url = server.base_url + "/classify"
        pngs = [png(t) for t in data.test_x[:4]]
        status, body = _post(url, json.dumps({"images": [base64.b64encode(p).decode() for p in pngs]}).encode(),
                             "application/json")
        assert status == 200 and len(body["data"]) == 4 and body["missing_parts"] == [], body
        from edgemesh.vit.images import decode_batch

        assert [r["class"] for r in body["data"]] == split.classify(
            decode_batch(pngs, split.parts[0].model.config)).predictions.tolist()
        status, body = _post(url, json.dumps({"images": [base64.b64encode(b"not an image").decode()]}).encode(),
                             "application/json")
        assert status == 415, body
        status, body = _post(url, json.dumps({"arrays": [[[0.0] * 5] * 5]}).encode(), "application/json")
        assert 400 <= status < 500 and "error" in body, body
        status, body = _post(url, b"{", "application/json")
        assert status == 400, body
    finally:
        server.stop()

    # A member that holds a part goes away: the fusion answers from the others and names it.
    lost = next(s for s in slots if s.node)
    victim = next(n for n, sd in zip(nodes, sds) if sd.load_identity()[0].node_id == lost.node)
    os.kill(victim.pid, signal.SIGKILL)

    async def again():  # type: ignore[no-untyped-def]
        dep.part_timeout = 3.0
        return await dep.classify(x)

    got = asyncio.run(again())
    assert lost.name in got.missing and got.probs.shape == want.probs.shape
    assert torch.allclose(got.probs.sum(-1), torch.ones(len(x)), atol=1e-4)

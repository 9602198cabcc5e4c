"""Inside a testbed device: deploy a ViT split over the named members and classify a batch.
Prints JSON: where each part ran, the predictions, and the in-process reference's.
Run: python vit_master.py STATE_DIR SPLIT_DIR MEMBER[,MEMBER...]"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edgemesh.identity.statedir import StateDir  # noqa: E402
from edgemesh.runtime.vit_deploy import VitDeployment  # noqa: E402
from edgemesh.vit.datasets import load_dataset  # noqa: E402
from edgemesh.vit.train import normalize  # noqa: E402


async def main() -> None:
    state, split_dir, names = StateDir(Path(sys.argv[1])), Path(sys.argv[2]), tuple(sys.argv[3].split(","))
    dep = VitDeployment(state, split_dir, names=names, part_timeout=60.0)
    slots = await dep.deploy()
    data = load_dataset("digits")
    x = normalize(data.test_x[:64], dep.config)
    got = await dep.classify(x)
    print(json.dumps({"parts": {s.name: s.node_name for s in slots}, "missing": got.missing,
                      "predictions": got.probs.argmax(-1).tolist(),
                      "reference": dep.split.classify(x).predictions.tolist(),
                      "labels": data.test_y[:64].tolist()}))


if __name__ == "__main__":
    asyncio.run(main())

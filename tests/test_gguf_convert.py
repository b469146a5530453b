"""chatft.model.gguf_convert: a .gguf file's config and its converted copy, read without re-reading the file."""

import subprocess
import sys

from chatft.bundled import bundled_gguf_path
from chatft.model.gguf_convert import converted_gguf_dir
from chatft.model.load import model_config
from support import ROOT

FIND_CONVERTED = """
import sys
from chatft.bundled import bundled_model_dir
print(bundled_model_dir())
print(sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


def test_a_converted_file_is_found_without_importing_torch_or_transformers(smollm2_dir):
    """What every launcher without -m runs (`python -m chatft.bundled`): with the conversion cached, a path and a stat
    (it took 13 s of imports before)."""
    result = subprocess.run([sys.executable, "-c", FIND_CONVERTED], cwd=ROOT, capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines() == [str(smollm2_dir), "[]"], result.stdout + result.stderr


def test_the_config_of_a_converted_file_is_its_conversion_s_and_else_read_from_the_file(smollm2_dir, tmp_path,
                                                                                          monkeypatch):
    path = str(bundled_gguf_path())
    assert converted_gguf_dir(bundled_gguf_path()) == smollm2_dir  # the session's cache holds its conversion
    converted = model_config(path)
    assert converted.name_or_path == str(smollm2_dir)  # read from the conversion's config.json
    monkeypatch.setenv("CHATFT_CACHE", str(tmp_path / "empty"))
    from_file = model_config(path)  # no conversion in this cache: the file's metadata, nothing converted
    assert not (tmp_path / "empty").exists()
    assert from_file.name_or_path != converted.name_or_path
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert getattr(from_file, key, None) == getattr(converted, key, None), key

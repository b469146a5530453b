"""chatft.data.mixing and --data_mix: each source of a --data_path gives exactly the samples its entry says, in
its own (auto-detected) format."""

from __future__ import annotations

import json
import random

import pytest

from chatft.args import ArgumentError, parse_args
from chatft.data.datasets import load_samples
from chatft.data.mixing import chosen_positions, mix_sources, parse_mix


def sources(tmp_path, alpaca: int = 5, messages: int = 3):
    """Two sources in two formats, each sample's reply naming its source and index; a directory holds the second."""
    (tmp_path / "a.json").write_text(json.dumps(
        [{"instruction": f"Q{i}", "output": f"alpaca {i}"} for i in range(alpaca)]))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.jsonl").write_text("\n".join(json.dumps(
        {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"messages {i}"}]})
        for i in range(messages)))
    return f"{tmp_path / 'a.json'},{tmp_path / 'dir'}"


def replies(samples):
    return [conversation.turns[-1].content for conversation in samples]


def test_parse_mix():
    assert parse_mix("all,10,0.5x", 3) == ([None, ("count", 10), ("times", 0.5)], [])
    assert "2 entries for 3 source(s)" in parse_mix("all,10", 3)[1][0]
    for bad in ("0", "-3", "x", "0x", "1.5", "nanx", "some"):
        assert parse_mix(bad, 1)[1], bad


def test_each_source_gives_exactly_its_count(tmp_path):
    spec = sources(tmp_path)
    samples = load_samples(spec)
    for mix, expected_alpaca, expected_messages in (("all,all", 5, 3), ("2,7", 2, 7), ("0.4x,2x", 2, 6),
                                                    ("5,1", 5, 1)):
        mixed, lines = mix_sources(samples, spec, mix, seed=0)
        got = replies(mixed)
        assert sum(r.startswith("alpaca") for r in got) == expected_alpaca, mix
        assert sum(r.startswith("messages") for r in got) == expected_messages, mix
        assert lines[0].startswith(f"{tmp_path / 'a.json'}: 5 samples -> {expected_alpaca}")
        assert lines[1].startswith(f"{tmp_path / 'dir'}: 3 samples -> {expected_messages}")
    # upsampling repeats every sample before any twice: 7 of 3 is each twice and one three times
    counts = [replies(mix_sources(samples, spec, "all,7", seed=0)[0]).count(f"messages {i}") for i in range(3)]
    assert sorted(counts) == [2, 2, 3]
    # the same seed, the same mix; another seed, another subset (and another cache key)
    assert replies(mix_sources(samples, spec, "2,all", seed=1)[0]) == replies(mix_sources(samples, spec, "2,all", 1)[0])
    subsets = {tuple(replies(mix_sources(samples, spec, "2,all", seed=s)[0])) for s in range(10)}
    assert len(subsets) > 1
    assert mix_sources(samples, spec, "2,all", 1)[0].fingerprint != mix_sources(samples, spec, "2,all", 2)[0].fingerprint
    positions = chosen_positions(3, 5, random.Random(0))
    assert len(positions) == 5 and positions == sorted(positions) and {0, 1, 2} <= set(positions)


def test_data_mix_flags_are_checked(tiny_qwen2_arch_dir, tmp_path):
    spec = sources(tmp_path)
    base = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", spec, "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ArgumentError, match=r"--data_mix 3: 1 entry for 2 source\(s\)"):
        parse_args(base + ["--data_mix", "3"])
    with pytest.raises(ArgumentError, match="--data_mix: 'half' is not all"):
        parse_args(base + ["--data_mix", "half,all"])
    with pytest.raises(ArgumentError, match="--eval_data_mix mixes the files of --eval_data_path"):
        parse_args(base + ["--eval_data_path", "0.2", "--eval_data_mix", "all"])


def test_a_dry_run_counts_the_mixed_samples(tiny_qwen2_arch_dir, tmp_path, capsys, caplog):
    import logging

    import finetune

    caplog.set_level(logging.INFO, logger="finetune")
    spec = sources(tmp_path)
    finetune.train(["--model_name_or_path", str(tiny_qwen2_arch_dir), "--data_path", spec, "--data_mix", "2,9",
                    "--output_dir", str(tmp_path / "o"), "--dry_run", "True", "--model_max_length", "64"])
    assert "11 samples" in capsys.readouterr().out
    assert "5 samples -> 2 (2 samples)" in caplog.text and "3 samples -> 9 (9 samples)" in caplog.text


def test_raw_text_sources_mix_as_conversations_do(tmp_path):
    """--stage pt: each source of the data path (a .txt file, a directory of {"text"} records) gives its count."""
    from chatft.data.mixing import mix_lists
    from chatft.data.pretrain import read_documents, read_sources

    (tmp_path / "a.txt").write_text("\n".join(f"text a{i}" for i in range(5)))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"text b{i}"}) for i in range(3)))
    spec = f"{tmp_path / 'a.txt'},{tmp_path / 'dir'}"
    per_source = read_sources(spec)
    assert [len(texts) for texts in per_source] == [5, 3]
    assert read_documents(spec) == per_source[0] + per_source[1]
    mixed, lines = mix_lists(per_source, spec, "2,2x", seed=0)
    assert sum(t.startswith("text a") for t in mixed) == 2 and sum(t.startswith("text b") for t in mixed) == 6
    assert lines == [f"{tmp_path / 'a.txt'}: 5 samples -> 2 (2 samples)", f"{tmp_path / 'dir'}: 3 samples -> 6 (2x)"]


def test_a_pretraining_and_a_preference_run_take_the_mix(tiny_qwen2_arch_dir, tmp_path, capsys, caplog):
    """--data_mix under --stage pt and --stage dpo: the dry run counts the mixed documents and pairs, one line per
    source says what each gave."""
    import logging

    import finetune

    caplog.set_level(logging.INFO, logger="finetune")
    (tmp_path / "a.txt").write_text("\n".join(f"document a{i} " * 5 for i in range(4)))
    (tmp_path / "b.txt").write_text("\n".join(f"document b{i} " * 5 for i in range(6)))
    base = ["--model_name_or_path", str(tiny_qwen2_arch_dir), "--output_dir", str(tmp_path / "o"), "--dry_run",
            "True", "--model_max_length", "64"]
    finetune.train(base + ["--stage", "pt", "--data_path", f"{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}",
                           "--data_mix", "all,3"])
    assert "4 samples -> 4 (all)" in caplog.text and "6 samples -> 3 (3 samples)" in caplog.text
    assert "7 documents" in capsys.readouterr().out
    pairs = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    (tmp_path / "p1.json").write_text(json.dumps(pairs))
    (tmp_path / "p2.json").write_text(json.dumps(pairs[:2]))
    finetune.train(base + ["--stage", "dpo", "--use_lora", "--data_path", f"{tmp_path / 'p1.json'},{tmp_path / 'p2.json'}",
                           "--data_mix", "1,3x"])
    assert "4 samples -> 1 (1 samples)" in caplog.text and "2 samples -> 6 (3x)" in caplog.text
    assert "7 pairs" in capsys.readouterr().out

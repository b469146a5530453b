"""Many processes on the CPU (gloo): DDP and DeepSpeed ZeRO-2/3 through torchrun and the launchers.

Each run is a real multi-process fine-tune of a tiny random Qwen2 model with the real Qwen tokenizer.
"""

import json
import math
import os
import socket
import subprocess
import sys

import peft
import pytest
import safetensors.torch
import torch
import transformers

from console_noise import library_noise
from chatft.serve.chat import generate_reply, load_chat_model
from chatft.train.eval_generate import GENERATIONS_FILE, read_generations
from support import BEST_IS_THE_FIRST_FLAGS, CONVERSATIONS, ROOT, assert_close_up_to_rounding, assert_saved_is_the_best_checkpoint
from support import decoder_terms, write_json

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return str(write_json(tmp_path_factory.mktemp("dist-data") / "train.json", CONVERSATIONS * 2))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc, script, *args, env=None):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), script, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def common_flags(model, data, output_dir, *extra):
    # fp32, no dropout and a fixed seed, so runs that differ only in how the batch is split agree
    return ["--model_name_or_path", str(model), "--data_path", data, "--output_dir", str(output_dir),
            "--max_steps", "3", "--learning_rate", "1e-3", "--logging_steps", "1", "--report_to", "none",
            "--save_strategy", "no", "--use_cpu", "True", "--seed", "11", "--model_max_length", "64", *extra]


def losses(output_dir):
    history = json.load(open(os.path.join(output_dir, "trainer_state.json")))["log_history"]
    return [(entry["loss"], entry["learning_rate"]) for entry in history if "loss" in entry]


def weights(output_dir):
    return safetensors.torch.load_file(os.path.join(output_dir, "model.safetensors"))


ENGINES = {
    "ddp": [],
    "zero2": ["--deepspeed", "ds_config_zero2.json"],
    "zero3": ["--deepspeed", "ds_config_zero3.json"],
}
# --fsdp is refused on the CPU (accelerate would run plain DDP under it: chatft.args.fsdp_device_problem); FSDP runs
# need a GPU and are not among these tests (tests/test_moe_modes.py checks the refusal)


# finetune.py as the program under torchrun, with rank 0's last write (the loss plot, after the model) made slow; each
# rank records when it exits and whether its process group was still alive then.
SLOW_FINAL_WRITE = """
import atexit, json, os, runpy, sys, time

rank = int(os.environ["RANK"])
records, delay, finetune = os.environ["END_RECORDS"], float(os.environ["END_SLOW_SECONDS"]), os.environ["FINETUNE"]


def record_exit():
    dist = sys.modules.get("torch.distributed")
    with open(os.path.join(records, f"exit-{rank}.json"), "w") as f:
        json.dump({"time": time.time(), "process_group_alive": bool(dist and dist.is_initialized())}, f)


atexit.register(record_exit)  # registered first: runs after every other exit handler
if rank == 0:
    from matplotlib.figure import Figure

    savefig = Figure.savefig

    def slow_savefig(self, *args, **kwargs):
        time.sleep(delay)
        savefig(self, *args, **kwargs)
        with open(os.path.join(records, "rank0-wrote-loss-png.json"), "w") as f:
            json.dump({"time": time.time()}, f)

    Figure.savefig = slow_savefig
sys.path.insert(0, os.path.dirname(finetune))
sys.argv[0] = finetune
runpy.run_path(finetune, run_name="__main__")
"""
RUN_OUTPUT = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "trainer_state.json", "finetune_args.json", "loss.png")


def torchrun_2_with_a_slow_final_write(tmp_path, *args, delay=2.0):
    """A 2-process finetune.py run whose rank 0 takes `delay` s longer over its last write. An orderly end: torchrun
    exits 0, no rank exits before rank 0 has written everything, each destroyed its process group before exiting,
    and the output is whole (issue 13: rank 1 used to exit while rank 0 was writing, and once aborted doing so)."""
    records, script = tmp_path / "process-ends", tmp_path / "slow_final_write.py"
    records.mkdir()
    script.write_text(SLOW_FINAL_WRITE)
    torchrun(2, str(script), *args,
             env={"END_RECORDS": str(records), "END_SLOW_SECONDS": str(delay), "FINETUNE": str(ROOT / "finetune.py")})
    written = json.load(open(records / "rank0-wrote-loss-png.json"))["time"]
    ends = [json.load(open(records / f"exit-{rank}.json")) for rank in (0, 1)]
    for rank, end in enumerate(ends):
        assert end["time"] >= written, f"rank {rank} exited {written - end['time']:.1f} s before rank 0 finished writing"
    assert not any(end["process_group_alive"] for end in ends), f"a process group was alive at exit: {ends}"
    output_dir = args[args.index("--output_dir") + 1]
    assert [name for name in RUN_OUTPUT if not os.path.isfile(os.path.join(output_dir, name))] == []


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_equal_one_process_with_the_whole_batch(engine, tiny_qwen2_arch_dir, data_file, tmp_path):
    """2 processes x batch 2 and 1 process x batch 4: same loss curve and final weights. The learning rate follows
    --lr_scheduler_type: the DeepSpeed configs carry no scheduler block (Qwen's WarmupLR silently replaced the flag)
    and no optimizer block, so the Trainer's optimizer and scheduler step as in a single-process run, cosine decay
    from the first step, each step logging the rate it trained at (under DeepSpeed's own AdamW the log showed the
    next step's)."""
    curve = assert_two_processes_equal_one(tiny_qwen2_arch_dir, data_file, tmp_path,
                                           [*ENGINES[engine], "--lr_scheduler_type", "cosine"])
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    assert [lr for _, lr in curve] == pytest.approx(expected, abs=1e-9), curve


def test_weighted_turns_two_processes_equal_one_process(tiny_qwen2_arch_dir, tmp_path):
    """Per-turn loss weights under DDP: the weighted token mean's denominator, sum(w), is gathered over the processes
    as the token count is, so 2 processes x batch 2 take the steps of 1 process x batch 4. The weights differ per
    sample (0.25 to 3), so a per-process sum(w) would give each process's half another scale."""
    samples = []
    for i, sample in enumerate(CONVERSATIONS * 2):
        user, assistant = sample["conversations"]
        samples.append({"id": f"w{i}", "conversations": [
            user, {**assistant, "weight": [0.25, 1.0, 3.0, 0.5][i % 4]},
            {"from": "user", "value": "Again?"}, {"from": "assistant", "value": assistant["value"], "weight": 1 + i % 3}]})
    data = str(write_json(tmp_path / "weighted.json", samples))
    # plain SGD: its step is proportional to the gradient, so a wrong scale shows in the weights too (Adam's would not)
    assert_two_processes_equal_one(tiny_qwen2_arch_dir, data, tmp_path, ["--optim", "sgd", "--learning_rate", "0.5"],
                                   step=0.5)


def assert_two_processes_equal_one(model, data, tmp_path, engine_flags, step=1e-3):
    """`step`: the most an optimizer step moves a weight (Adam: about the learning rate)."""
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, "finetune.py", *common_flags(model, data, one, "--per_device_train_batch_size", "4", *engine_flags))
    torchrun_2_with_a_slow_final_write(tmp_path, *common_flags(model, data, two, "--per_device_train_batch_size", "2",
                                                                *engine_flags))
    curve_one, curve_two = losses(one), losses(two)
    assert len(curve_one) == 3
    terms = decoder_terms(transformers.AutoConfig.from_pretrained(model), loss=True)  # the same sums, split
    for (loss_one, lr_one), (loss_two, lr_two) in zip(curve_one, curve_two):
        assert_close_up_to_rounding(loss_two, loss_one, terms=terms)
        assert lr_one == pytest.approx(lr_two)
    base = weights(model)
    final_one, final_two = weights(one), weights(two)
    assert final_one.keys() == final_two.keys()
    for name in final_one:
        # rounding relative to the weight + 3 steps
        assert_close_up_to_rounding(final_two[name], final_one[name], terms=terms,
                                    magnitude=final_one[name].abs().max() + 3 * step)
    assert any(not torch.equal(final_one[name], base[name]) for name in final_one)
    return curve_two


def test_padding_free_equals_padded_with_two_processes_and_accumulation(tiny_qwen2_arch_dir, data_file, tmp_path):
    """2 processes x batch 2 x accumulation 2 under DDP: the default padding-free batches take the padded run's steps
    (same loss curve, same final weights)."""
    padded, padding_free = tmp_path / "padded", tmp_path / "padding-free"
    flags = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2"]
    torchrun(2, "finetune.py", *common_flags(tiny_qwen2_arch_dir, data_file, padded, *flags, "--padding_free", "False"))
    torchrun(2, "finetune.py", *common_flags(tiny_qwen2_arch_dir, data_file, padding_free, *flags))
    assert len(losses(padded)) == len(losses(padding_free)) == 3
    terms = decoder_terms(transformers.AutoConfig.from_pretrained(tiny_qwen2_arch_dir), loss=True)
    for (loss, lr), (padded_loss, padded_lr) in zip(losses(padding_free), losses(padded)):
        assert_close_up_to_rounding(loss, padded_loss, terms=terms)
        assert lr == pytest.approx(padded_lr)
    final, expected = weights(padding_free), weights(padded)
    for name in expected:
        assert_close_up_to_rounding(final[name], expected[name], terms=terms, magnitude=expected[name].abs().max() + 3e-3)
    base = weights(tiny_qwen2_arch_dir)
    assert any(not torch.equal(expected[name], base[name]) for name in expected)


def test_first_rank_tokenizes_and_the_other_reads_its_cache(tiny_qwen2_arch_dir, data_file, tmp_path):
    cache = tmp_path / "cache"
    result = torchrun(2, "finetune.py", *common_flags(tiny_qwen2_arch_dir, data_file, tmp_path / "out", "--max_steps", "1",
                                                      "--per_device_train_batch_size", "1",
                                                      "--preprocessing_cache_dir", str(cache)))
    # one tokenized cache (and the data file's record index beside it), written by rank 0 alone
    assert len(list(cache.glob("*.tokens"))) == 1 and len(list(cache.glob("*.tmp*"))) == 0
    log = result.stdout + result.stderr
    assert log.count("reusing 16 tokenized samples") == 1, log[-3000:]  # rank 1 only


def test_zero3_save_reload_round_trip(tiny_qwen2_arch_dir, data_file, tmp_path):
    gathered = tmp_path / "gathered.safetensors"
    torchrun(2, "tests/helpers/zero3_roundtrip.py", str(gathered),
             *common_flags(tiny_qwen2_arch_dir, data_file, tmp_path / "out", "--per_device_train_batch_size", "2", *ENGINES["zero3"]))
    at_end = safetensors.torch.load_file(gathered)
    reloaded = dict(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").named_parameters())
    assert at_end.keys() == reloaded.keys()
    for name, tensor in at_end.items():
        assert tensor.numel() > 0, f"{name} was saved as an empty ZeRO-3 shard"
        torch.testing.assert_close(reloaded[name].detach(), tensor)


def test_zero3_lora_ends_with_the_best_checkpoint_and_answers_at_each_evaluation(tiny_qwen2_arch_dir, data_file, tmp_path):
    """--load_best_model_at_end under ZeRO-3 (DeepSpeed loads the best checkpoint's partitions); --eval_generate with
    every rank generating (each forward gathers the partitioned weights) and rank 0 writing: one line an evaluation,
    the reply the checkpoint's own, reloaded in one process."""
    output = tmp_path / "out"
    torchrun(2, "finetune.py", *common_flags(tiny_qwen2_arch_dir, data_file, output, "--per_device_train_batch_size", "1",
                                             *BEST_IS_THE_FIRST_FLAGS, "--eval_generate", "1",
                                             "--eval_generate_max_new_tokens", "4", *ENGINES["zero3"]))
    assert_saved_is_the_best_checkpoint(output)
    generations = read_generations(str(output / GENERATIONS_FILE))
    assert [line["step"] for line in generations] == [2, 4, 6]
    for line in generations:
        model, tokenizer, _ = load_chat_model(str(output / f"checkpoint-{line['step']}"), dtype=torch.float32, device="cpu")
        assert line["reply"] == generate_reply(model, tokenizer, line["prompt"], 4, use_cache=True)


def test_zero3_refuses_trainable_embeddings_under_lora(tiny_qwen2_arch_dir, data_file, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(free_port()),
               "finetune.py", *common_flags(tiny_qwen2_arch_dir, data_file, tmp_path / "out", "--use_lora", "--train_embeddings",
                                            "true", *ENGINES["zero3"])]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0 and "use --deepspeed ds_config_zero2.json" in result.stderr
    assert not (tmp_path / "out").exists()


def launcher(name, *args, env=None):
    return subprocess.run(["bash", f"finetune/{name}", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "MASTER_PORT": str(free_port()), **(env or {})})


SHORT_RUN = ["--", "--max_steps", "2", "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1",
             "--save_strategy", "no", "--model_max_length", "64"]


def test_lora_zero2_launcher(tiny_qwen2_arch_dir, data_file, tmp_path):
    result = launcher("finetune_lora_ds.sh", "-m", str(tiny_qwen2_arch_dir), "-d", data_file, "-o", str(tmp_path / "out"),
                      *SHORT_RUN, "--lora_r", "4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ds_config_zero2.json" in result.stderr and "--nproc_per_node 2" in result.stderr
    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    state = peft.get_peft_model_state_dict(model)
    assert state and any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # trained, not the zero init


def test_full_zero3_launcher(tiny_qwen2_arch_dir, data_file, tmp_path):
    result = launcher("finetune_ds.sh", "-m", str(tiny_qwen2_arch_dir), "-d", data_file, "-o", str(tmp_path / "out"), *SHORT_RUN)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ds_config_zero3.json" in result.stderr
    # no library line: DeepSpeed's op build, torchrun's notices, ZeRO-3's deprecation warnings (issue 13)
    assert library_noise(result.stdout) == [] and library_noise(result.stderr) == []
    trained, base = weights(tmp_path / "out"), weights(tiny_qwen2_arch_dir)
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[n].float(), base[n].float()) for n in base)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")


def test_two_nodes_on_one_machine(tiny_qwen2_arch_dir, data_file, tmp_path):
    """Two torchrun agents, --nnodes 2, one process each, rendezvous on 127.0.0.1: one run, one output."""
    port = str(free_port())
    env = {**os.environ, "NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    args = ["bash", "finetune/finetune_lora_ds.sh", "-m", str(tiny_qwen2_arch_dir), "-d", data_file, "-o", str(tmp_path / "out"),
            *SHORT_RUN, "--lora_r", "4"]
    nodes = [subprocess.Popen(args, cwd=ROOT, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stderr[-4000:]
    assert "--nnodes 2 --node_rank 1" in outputs[1][1]
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    state = json.load(open(tmp_path / "out" / "trainer_state.json"))
    assert state["global_step"] == 2


@pytest.mark.parametrize("args,env,message", [
    (["-m"], {}, "-m needs a value"),
    (["-d", "missing.json"], {}, "data file not found: missing.json"),
    ([], {"NNODES": "two"}, "NNODES must be a whole number"),
    (["--deepspeed", "nope.json"], {}, "DeepSpeed config not found"),
])
@pytest.mark.parametrize("name", ["finetune_ds.sh", "finetune_lora_ds.sh", "finetune_qlora_ds.sh"])
def test_bad_launcher_input(name, args, env, message):
    result = launcher(name, *args, env=env)
    assert result.returncode == 2 and message in result.stderr and "Usage: bash finetune/" in result.stderr
    assert "+ torchrun" not in result.stderr  # refused before anything started (set -x would show it)


@pytest.mark.parametrize("engine", ["zero3"])
def test_lora_adapter_is_gathered_not_saved_as_empty_shards(engine, tiny_qwen2_arch_dir, data_file, tmp_path):
    torchrun(2, "finetune.py", *common_flags(tiny_qwen2_arch_dir, data_file, tmp_path / "out", "--per_device_train_batch_size", "2",
                                             "--use_lora", "--lora_r", "4", *ENGINES[engine]))
    saved = safetensors.torch.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert saved and all(tensor.numel() > 0 for tensor in saved.values())
    lora_b = [tensor for name, tensor in saved.items() if "lora_B" in name]
    assert lora_b and all(tensor.shape[1] == 4 for tensor in lora_b) and any(t.abs().sum() > 0 for t in lora_b)
    peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")


def test_nf4_qlora_zero2_launcher(tiny_qwen2_arch_64_dir, tmp_path, data_file):
    """2 processes, each with its own 4-bit copy of the base (device map per rank), ZeRO-2 over the adapters."""
    result = launcher("finetune_qlora_ds.sh", "-m", str(tiny_qwen2_arch_64_dir), "-d", data_file, "-o", str(tmp_path / "out"),
                      *SHORT_RUN, "--lora_r", "4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "--q_lora" in result.stderr and "ds_config_zero2.json" in result.stderr
    assert "4-bit" in result.stderr  # the loading log line
    assert library_noise(result.stdout) == [] and library_noise(result.stderr) == []  # bitsandbytes' notices too
    saved = safetensors.torch.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for name, t in saved.items() if "lora_B" in name)


def test_sigterm_to_one_process_stops_all_at_one_checkpoint_and_resumes(tiny_qwen2_arch_dir, data_file, tmp_path):
    """A pre-emption signal reaching one rank only: the stop flag is combined across ranks each step, so every
    rank stops after the same step and the checkpoint is whole; a 2-process resume from it then finishes."""
    import signal
    import threading

    import psutil

    output = tmp_path / "out"
    flags = common_flags(tiny_qwen2_arch_dir, data_file, output, "--per_device_train_batch_size", "1", "--use_lora", "True",
                         "--lora_r", "4")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "finetune.py", *flags, "--max_steps", "100000"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, signalled = [], []

    def read():
        for line in process.stdout:
            lines.append(line)
            if "'loss'" in line and not signalled:
                workers = psutil.Process(process.pid).children()
                assert len(workers) == 2
                signalled.append(workers[-1].pid)
                workers[-1].send_signal(signal.SIGTERM)

    reader = threading.Thread(target=read)
    reader.start()
    assert process.wait(timeout=600) == 0, "".join(lines)[-4000:]
    reader.join()
    log = "".join(lines)
    assert signalled and log.count("Stopped by SIGTERM at step") == 1, log[-4000:]  # printed by rank 0
    [checkpoint] = [p for p in output.iterdir() if p.name.startswith("checkpoint-")]
    step = int(checkpoint.name.split("-")[1])
    assert step < 100 and json.load(open(checkpoint / "trainer_state.json"))["global_step"] == step
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (output / "adapter_model.safetensors").exists()

    torchrun(2, "finetune.py", *flags, "--max_steps", str(step + 2), "--resume_from_checkpoint", "True")
    history = json.load(open(output / "trainer_state.json"))["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == list(range(1, step + 3))


def test_a_run_says_when_deepspeed_compiles_its_optimizer_op_first(tmp_path, monkeypatch):
    """DeepSpeed compiles fused_adam (cpu_adam when the optimizer is offloaded) for a config that names its AdamW, on its
    first use on a machine, silently and for minutes: the run names the op while none is cached, and says nothing
    once one is. The shipped ZeRO-2/3 configs name no optimizer (the Trainer's, --optim, runs): nothing to compile."""
    from chatft.train.distributed import deepspeed_op_built_on_first_use

    zero2, zero3, offload = (json.load(open(ROOT / f"ds_config_{name}.json")) for name in ("zero2", "zero3", "zero3_offload"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert deepspeed_op_built_on_first_use(zero2) is None and deepspeed_op_built_on_first_use(zero3) is None
    assert deepspeed_op_built_on_first_use(offload) == "cpu_adam"
    with_adamw = {**zero3, "optimizer": offload["optimizer"]}  # a user's config naming DeepSpeed's AdamW
    assert deepspeed_op_built_on_first_use(with_adamw) == "fused_adam"
    assert deepspeed_op_built_on_first_use(None) is None
    built = tmp_path / "py311_cpu" / "fused_adam"
    built.mkdir(parents=True)
    (built / "fused_adam.so").write_bytes(b"")
    assert deepspeed_op_built_on_first_use(with_adamw) is None
    assert deepspeed_op_built_on_first_use(offload) == "cpu_adam"

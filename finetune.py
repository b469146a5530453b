"""Fine-tune a chat model on ChatML conversations: full-parameter or LoRA, Qwen's flags.

    $ python finetune.py --model_name_or_path $(python -m chatft.bundled) \
        --data_path data/identity_demo.json --output_dir output_qwen --use_lora --bf16 True
    $ python finetune.py my_run.yaml           # the same keys in a .json/.yaml file

Every transformers.TrainingArguments flag works. The steps, in order: check the flags and
output_dir, read and validate the data (errors before any model is loaded), load the
tokenizer and plan the run (chatft.plan: mode, precision, quantization, sharding, chat format;
--dry_run: report on the tokenized data and stop), load the model the plan describes, train
with the HF Trainer, save into output_dir.
"""

import logging
import os
import sys

from chatft import console

if __name__ == "__main__":  # before the libraries are imported: they look at what is installed when imported
    console.start(uses=console.uses_in_argv(sys.argv[1:], "--q_lora", ("bitsandbytes", "gptqmodel")))

import transformers  # noqa: E402

from chatft.args import deepspeed_config, parse_args  # noqa: E402
from chatft.model.attention import rows_keep_samples_apart  # noqa: E402
from chatft.data.mixing import mix_lists, mix_sources  # noqa: E402
from chatft.args import PREFERENCE_STAGES  # noqa: E402
from chatft.data.preference import load_preference_sources, preference_dataset, preference_dry_run  # noqa: E402
from chatft.train.preference import disable_dropout, PrecomputedReference, preference_collator_and_loss  # noqa: E402
from chatft.data.pretrain import PretrainDataset, read_sources  # noqa: E402
from chatft.data.datasets import preprocess  # noqa: E402  (re-exported: `from finetune import preprocess`, as Qwen's)
from chatft.data.datasets import load_samples, make_collator, make_datasets, split_off_eval  # noqa: E402
from chatft.model.load import frozen_reference, join_process_group, load_model  # noqa: E402
from chatft.train.distributed import deepspeed_op_built_on_first_use, end_run  # noqa: E402
from chatft.train.eval_generate import EvalGenerations  # noqa: E402
from chatft.memory import longest_batch_tokens, run_estimator  # noqa: E402
from chatft.output_dir import check_output_dir  # noqa: E402
from chatft.plan import plan_run  # noqa: E402
from chatft.train.report import dry_run_report, packing_summary, plot_losses, run_summary  # noqa: E402
from chatft.train.saving import ReferenceAdapterNotSaved, save_run  # noqa: E402
from chatft.train.losses import SupervisedLoss  # noqa: E402
from chatft.train.trainer import ChatTrainer, StopOnSigterm  # noqa: E402
from chatft.train.expert_load import ExpertLoad  # noqa: E402

logger = logging.getLogger("finetune")
__all__ = ["main", "preprocess", "train"]  # preprocess: Qwen's function, for scripts written against its finetune.py


def read_data(data_args, seed: int) -> tuple[list[dict], list[dict] | None]:
    """(training samples, evaluation samples or None): --eval_data_path is a file, or a fraction held out. Under
    --stage pt the samples are raw-text documents (chatft.data.pretrain), under a preference stage pairs (or KTO's
    labelled completions), else conversations; --data_mix / --eval_data_mix take each source's share of them."""
    if data_args.stage in PREFERENCE_STAGES or data_args.stage == "pt":
        def read(spec, mix, flag):  # one list per source, then the mix of them
            sources = (read_sources(spec) if data_args.stage == "pt"
                       else load_preference_sources(spec, data_args.stage))
            return mixed(sources, spec, mix, seed, flag)

        train_samples = read(data_args.data_path, data_args.data_mix, "--data_mix")
        if data_args.eval_fraction is not None:
            return split_off_eval(train_samples, data_args.eval_fraction, seed)
        return train_samples, (read(data_args.eval_data_path, data_args.eval_data_mix, "--eval_data_mix")
                               if data_args.eval_data_path else None)
    # a file read before without problems is not read again (its index is kept with the tokenized cache)
    index_dir = None if data_args.dry_run else data_args.resolved_preprocessing_cache_dir
    train_samples = mixed(load_samples(data_args.data_path, data_args.data_format, index_dir), data_args.data_path,
                          data_args.data_mix, seed, "--data_mix")
    if data_args.eval_fraction is not None:
        return split_off_eval(train_samples, data_args.eval_fraction, seed)
    if data_args.eval_data_path:
        return train_samples, mixed(load_samples(data_args.eval_data_path, data_args.data_format, index_dir),
                                    data_args.eval_data_path, data_args.eval_data_mix, seed, "--eval_data_mix")
    return train_samples, None


def mixed(samples, spec: str, mix: str | None, seed: int, flag: str):
    """The samples as --data_mix / --eval_data_mix take them from each source (chatft.data.mixing), said per source:
    conversations (DataSamples), or one list per source (raw text, pairs), joined when there is no mix."""
    if isinstance(samples, list):
        if not mix:
            return [sample for source in samples for sample in source]
        samples, lines = mix_lists(samples, spec, mix, seed, flag)
    elif not mix:
        return samples
    else:
        samples, lines = mix_sources(samples, spec, mix, seed, flag)
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("%s: %s", flag, "; ".join(lines))
    return samples


def padding_free_for(model, data_args) -> bool:
    """--padding_free, unless the model's own attention code cannot keep the samples of one row apart (then
    batches are padded); --packing with such a model was refused with the flags (chatft.args.packing_problem)."""
    if rows_keep_samples_apart(model):
        return data_args.padding_free
    if data_args.padding_free:
        logger.info("%s has its own attention code (not transformers'), which cannot keep samples of one row "
                    "apart: batches are padded instead.", type(model).__name__)
    return False


def train(argv=None, callbacks=(), wrap_collator=None):
    """Fine-tune with finetune.py's flags (`argv`; None: the command line); return the Trainer (None after --dry_run).

    Tools that measure runs (bench/) hook in here rather than patching this module: `callbacks` are
    transformers.TrainerCallback objects added to the Trainer (bench.profile_table times steps with one);
    `wrap_collator` takes the collator and returns the one the Trainer uses (bench.throughput counts the real
    tokens of every batch with it).
    """
    model_args, data_args, training_args, lora_args = parse_args(argv)
    transformers.set_seed(training_args.seed)
    if not data_args.dry_run:
        check_output_dir(training_args)
    train_samples, eval_samples = read_data(data_args, training_args.seed)
    if not data_args.dry_run:
        join_process_group(training_args)
    # the tokenizer, then everything the flags and the model's config decide (chatft.plan), read by all that follows
    plan, tokenizer = plan_run(model_args, data_args, training_args, lora_args)
    # tokens -> peak memory estimated from the plan alone (chatft.memory), said before any memory is spent
    estimate_memory = run_estimator(plan)
    if data_args.dry_run and data_args.stage in PREFERENCE_STAGES:
        for name, samples in (("training data", train_samples), ("evaluation data", eval_samples)):
            if samples:
                print(preference_dry_run(name, samples, tokenizer, training_args.model_max_length,
                                         data_args.system_message, plan.chat_format))
        return None
    if data_args.dry_run and data_args.stage == "pt":
        for name, texts in (("training data", train_samples), ("evaluation data", eval_samples)):
            if texts:
                print(f"{name}: " + PretrainDataset(texts, tokenizer, training_args.model_max_length,
                                                    data_args.packing).summary())
        return None
    if data_args.dry_run:  # the tokenizer only: no model, nothing written
        for name, samples in (("training data", train_samples), ("evaluation data", eval_samples)):
            if samples:
                print(dry_run_report(name, samples, tokenizer, training_args.model_max_length, data_args.system_message,
                                     data_args.packing, data_args.padding_free,
                                     training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps,
                                     plan.data_parallel_size, training_args.seed, plan.chat_format,
                                     data_args.reasoning_turns, estimate_memory if name == "training data" else None,
                                     ignore_empty_think=data_args.ignore_empty_think,
                                     num_workers=data_args.num_workers))
        return None
    # The first process of each machine tokenizes into the cache; the others wait for its file (not at a barrier,
    # whose timeout a big data set outlasts), then map the same file (chatft.data.datasets.tokenized_arrays).
    if data_args.stage in PREFERENCE_STAGES:
        train_dataset, eval_dataset = (preference_dataset(samples, tokenizer, training_args.model_max_length,
                                                          data_args.system_message, plan.chat_format,
                                                          plan.reference == "precomputed")
                                       if samples else None for samples in (train_samples, eval_samples))
    elif data_args.stage == "pt":  # raw text: every token trained, documents kept apart unless --packing
        train_dataset, eval_dataset = (PretrainDataset(texts, tokenizer, training_args.model_max_length,
                                                       data_args.packing) if texts else None
                                       for texts in (train_samples, eval_samples))
        if training_args.should_log:
            logger.info("pre-training data: %s", train_dataset.summary())
    else:
        train_dataset, eval_dataset = make_datasets(
            train_samples, eval_samples, tokenizer, training_args.model_max_length,
            data_args.lazy_preprocess, data_args.system_message, data_args.packing,
            data_args.num_workers, data_args.resolved_preprocessing_cache_dir, plan.chat_format,
            data_args.reasoning_turns, data_args.ignore_empty_think,
        )
    if data_args.packing and data_args.stage == "sft" and training_args.should_log:  # the batch no longer means what the flags say: say so
        logger.info(packing_summary(train_dataset, training_args.per_device_train_batch_size,
                                    training_args.gradient_accumulation_steps, plan.data_parallel_size))
    if estimate_memory is not None and training_args.should_log:
        logger.info(estimate_memory(longest_batch_tokens(train_dataset, training_args.per_device_train_batch_size,
                                                         training_args.model_max_length)).text())
    model = load_model(plan, lora_args, device=training_args.device)
    collator = make_collator(tokenizer, padding_free_for(model, data_args),
                             training_args.model_max_length if data_args.pad_to_max_length else None)
    loss = SupervisedLoss(labelled_logits=plan.labelled_logits_only)
    if data_args.stage in PREFERENCE_STAGES:  # pairs in padding-free rows, the prompt once where attention allows
        # the reference of DPO/KTO (chatft.plan.reference_kind): a frozen copy, built before the Trainer wraps the model
        if training_args.disable_dropout and disable_dropout(model) and training_args.should_log:
            logger.info("--stage %s: dropout off in the model and its adapters (--disable_dropout False keeps it)",
                        data_args.stage)
        reference_model = (frozen_reference(model, plan, lora_args, training_args) if plan.reference == "copy"
                           else None)
        collator, loss = preference_collator_and_loss(data_args.stage, training_args, model, plan.labelled_logits_only,
                                                      reference_model)
    trainer = ChatTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=wrap_collator(collator) if wrap_collator else collator,
        processing_class=tokenizer,
        callbacks=list(callbacks),
        loss=loss,
        loraplus_lr_ratio=lora_args.loraplus_lr_ratio,
    )
    if plan.reference == "precomputed":  # the starting model's log-probabilities, once, when training begins
        trainer.add_callback(PrecomputedReference(loss, collator, {"train": train_dataset, "eval": eval_dataset},
                                                  training_args.per_device_eval_batch_size))
    if plan.reference == "adapter":  # checkpoints hold the trained adapter alone
        trainer.add_callback(ReferenceAdapterNotSaved())
    expert_load = ExpertLoad.attach(model)  # a mixture-of-experts model: tokens per expert, in the summary
    if expert_load is not None:
        trainer.add_callback(expert_load)
    if training_args.eval_generate:  # what the model says at each evaluation (eval_generations.jsonl)
        trainer.add_callback(EvalGenerations(eval_samples[: training_args.eval_generate],
                                             training_args.eval_generate_max_new_tokens))
    op = deepspeed_op_built_on_first_use(deepspeed_config(training_args))
    if op and trainer.is_world_process_zero():
        logger.info("DeepSpeed compiles its %s op first: once on this machine (a few minutes), later runs reuse it", op)
    sigterm = StopOnSigterm()
    trainer.add_callback(sigterm)
    sigterm.install()
    try:
        trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finally:
        sigterm.uninstall()
    if sigterm.received:  # pre-empted: the checkpoint is the result; the run is not finished
        if trainer.is_world_process_zero():
            print(f"Stopped by SIGTERM at step {trainer.state.global_step}; checkpoint saved in "
                  f"{os.path.join(training_args.output_dir, f'checkpoint-{trainer.state.global_step}')}. Continue with "
                  "the same command plus --resume_from_checkpoint True.", flush=True)
        end_run(trainer, exit_when_done=__name__ == "__main__")
        return trainer
    groups = {"model": model_args, "data": data_args, "training": training_args, "lora": lora_args}
    save_run(trainer, tokenizer, groups, plan.model_path)
    if trainer.is_world_process_zero():
        plot_losses(trainer.state.log_history, os.path.join(training_args.output_dir, "loss.png"))
        print(run_summary(trainer, "model" if plan.mode == "full" else "LoRA adapter"), flush=True)
    # Multi-process runs: every rank waits here until rank 0 has written everything, then the process groups are
    # destroyed; when finetune.py is the program, the process exits here with status 0 (chatft.train.distributed: why).
    end_run(trainer, exit_when_done=__name__ == "__main__")
    return trainer


def main(argv=None) -> int:
    """train(), with a user's mistake (chatft.errors.ChatftError) as an `error:` line and exit status 2."""
    return console.run_entry_point(train, argv)


if __name__ == "__main__":
    sys.exit(main())

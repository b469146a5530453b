"""Preference data -> `PreferencePair`s and `KTOSample`s -> tokens with exact reply masks.

The shapes people publish, detected per record:

    trl            TRL's: {"prompt"?, "chosen", "rejected"}, each a string or a list of OpenAI messages. Without a
                   prompt, `chosen` and `rejected` are whole conversations and the prompt is the messages they share
                   (the implicit prompt); they must then differ in their last message only.
    conversations  LLaMA-Factory's and the seed's: {"conversations" | "messages": [...turns...], "chosen": turn,
                   "rejected": turn, "system"?, "tools"?}, a turn in the record's own turn shape.
    kto            unpaired completions: TRL's {"prompt", "completion", "label": bool} or LLaMA-Factory's
                   {"conversations" | "messages": [..., reply], "kto_tag": bool}.

Each side is read by chatft.data.formats' reader for its turn shape, as the same record with the reply appended: a
preference pair's prompt is therefore exactly the conversation SFT would render (system message, tools, reasoning
traces), and its replies are checked by the same rules. The prompt is everything before the last turn, which must be
an assistant reply (text and/or tool calls, with its reasoning); only that reply is labelled.

`tokenize_pairs` renders prompt + reply through chatft.data.chat_format's one renderer per side and returns, per
pair, the prompt's tokens once and each reply's tokens (the reply's text and its `<|im_end|>`, labelled exactly as
SFT labels them). The two sides' token sequences are checked to share the prompt's tokens: a tokenizer that merged a
token across the prompt/reply boundary would be caught there, not trained wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from chatft.data.chat_format import (DEFAULT_SYSTEM_MESSAGE, IGNORE_INDEX, Conversation, Turn,
                                     tokenize_conversations)
from chatft.data.formats import detect_format, read_record, where

PREFERENCE_KEYS = ("chosen", "rejected")
KTO_LABEL_KEYS = ("label", "kto_tag")
NOT_A_REPLY = ("human", "user", "system", "observation", "tool")  # roles a reply's last turn cannot have


@dataclass(frozen=True)
class PreferencePair:
    prompt: Conversation  # the turns before the reply (the last is the user's or a tool's), tools, id
    chosen: Turn  # the preferred assistant reply
    rejected: Turn  # the dispreferred one


@dataclass(frozen=True)
class KTOSample:
    prompt: Conversation
    completion: Turn
    desirable: bool


@dataclass
class TokenizedPair:
    """A pair's tokens: the prompt once, then each reply; `*_labels` align with `*_ids` (IGNORE_INDEX where a reply
    token is not trained: none today, the field keeps SFT's masks honest should a reply hold untrained parts)."""
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    origin: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


def is_preference_record(record) -> bool:
    return isinstance(record, dict) and any(key in record for key in PREFERENCE_KEYS)


def is_kto_record(record) -> bool:
    return isinstance(record, dict) and any(key in record for key in KTO_LABEL_KEYS)


def _rename(problems: list[str], old: str, new: str) -> list[str]:
    return [problem.replace(old, new) for problem in problems]


def _as_messages(value, role: str = "assistant"):
    """A side given as a string is one message of `role`; a list is kept as given."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _read_side(record: dict, turns_key: str, prompt_turns: list, reply, side: str, index: int, path: str):
    """(the conversation prompt + reply as SFT reads it, problems) for one side of a record whose turns live under
    `turns_key`; problems name the side (`'chosen'`) rather than the index the reply was appended at."""
    at = where(path, index, record)
    if not isinstance(reply, (dict, list)) or (isinstance(reply, list) and not reply):
        return None, [f"{at}: {side!r} must be a turn object or a non-empty list of turns, found "
                      f"{type(reply).__name__ if not isinstance(reply, list) else 'an empty list'}"]
    replies = reply if isinstance(reply, list) else [reply]
    last = replies[-1]
    role = last.get("from", last.get("role")) if isinstance(last, dict) else None
    if role in NOT_A_REPLY:
        return None, [f"{at}: {side!r} must end with an assistant reply, found a {role!r} turn"]
    sft_record = {key: value for key, value in record.items()
                  if key not in PREFERENCE_KEYS + KTO_LABEL_KEYS + ("prompt", "completion")}
    sft_record[turns_key] = list(prompt_turns) + replies
    data_format = detect_format(sft_record) or "conversations"
    conversation, problems = read_record(sft_record, data_format, index, path)
    n = len(prompt_turns)
    for j in range(len(replies)):
        problems = _rename(problems, f"{turns_key}[{n + j}]", f"{side!r}" + (f"[{j}]" if len(replies) > 1 else ""))
    return conversation, problems


def _split_reply(conversation: Conversation, side: str, at: str) -> tuple[Conversation | None, Turn | None, list[str]]:
    """(prompt, reply) of a conversation whose last turn is the reply."""
    turns = conversation.turns
    if len(turns) < 2 or turns[-1].role != "assistant":
        return None, None, [f"{at}: {side!r} must end with an assistant reply"]
    return replace(conversation, turns=turns[:-1], trained=None), turns[-1], []


def _sides_of_trl(record: dict, index: int, path: str):
    """The two conversations (prompt + chosen, prompt + rejected) of a record in TRL's shape, and problems."""
    at = where(path, index, record)
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    kinds = {type(v).__name__ for v in (prompt, chosen, rejected) if v is not None}
    if not kinds <= {"str", "list"}:
        return None, [f"{at}: 'prompt', 'chosen' and 'rejected' must be strings or lists of messages"]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            return None, [f"{at}: no 'prompt': 'chosen' and 'rejected' must then be whole conversations (lists of "
                          "messages) sharing the prompt; add a 'prompt'"]
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == len(chosen) == len(rejected):
            return None, [f"{at}: 'chosen' and 'rejected' are identical"]
        if shared < len(chosen) - 1 or shared < len(rejected) - 1 or shared == 0:
            return None, [f"{at}: the prompts of 'chosen' and 'rejected' differ (they share {shared} message(s) and "
                          "must differ in their last message, the reply, only)"]
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    elif isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    record = {"messages": prompt, **{k: v for k, v in record.items() if k in ("id", "tools")}}
    sides, problems = [], []
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        conversation, side_problems = _read_side(record, "messages", prompt, _as_messages(reply), name, index, path)
        sides.append(conversation)
        problems += side_problems
    return sides, problems


def _turns_key(record: dict) -> str | None:
    for key in ("conversations", "messages"):
        if isinstance(record.get(key), list):
            return key
    return None


def read_preference_record(record, index: int, path: str) -> tuple[PreferencePair | None, list[str]]:
    """(the pair, or None; the problems, each naming file, sample and field) for one preference record."""
    at = where(path, index, record)
    if not isinstance(record, dict):
        return None, [f"{at}: expected an object with 'chosen' and 'rejected', found a {type(record).__name__}"]
    missing = [key for key in PREFERENCE_KEYS if key not in record]
    if missing:
        return None, [f"{at}: missing {' and '.join(repr(k) for k in missing)} (a preference pair needs both)"]
    turns_key = _turns_key(record)
    if turns_key is None:
        sides, problems = _sides_of_trl(record, index, path)
    else:
        sides, problems = [], []
        for name in PREFERENCE_KEYS:
            conversation, side_problems = _read_side(record, turns_key, record[turns_key], record[name], name, index,
                                                     path)
            sides.append(conversation)
            problems += side_problems
    if problems:
        return None, problems
    (prompt, chosen, problems_c), (prompt_r, rejected, problems_r) = (
        _split_reply(side, name, at) for side, name in zip(sides, PREFERENCE_KEYS))
    problems = problems_c + problems_r
    if problems:
        return None, problems
    if prompt.turns != prompt_r.turns:  # a reply of several turns joined into the prompt differently
        return None, [f"{at}: the prompts of 'chosen' and 'rejected' differ"]
    if chosen == rejected:
        return None, [f"{at}: 'chosen' and 'rejected' are identical: nothing to prefer"]
    return PreferencePair(prompt, chosen, rejected), []


def read_kto_record(record, index: int, path: str) -> tuple[KTOSample | None, list[str]]:
    """(the sample, or None; the problems) for one unpaired KTO record."""
    at = where(path, index, record)
    if not isinstance(record, dict):
        return None, [f"{at}: expected an object with a completion and its label, found a {type(record).__name__}"]
    label_key = next((key for key in KTO_LABEL_KEYS if key in record), None)
    if label_key is None:
        return None, [f"{at}: missing 'label' (true: a desirable completion, false: an undesirable one)"]
    label = record[label_key]
    if not isinstance(label, bool):
        return None, [f"{at}: {label_key!r} must be true or false, found {label!r}"]
    turns_key = _turns_key(record)
    if turns_key is not None:  # LLaMA-Factory's: the conversation ends with the completion
        turns = record[turns_key]
        if len(turns) < 2:
            return None, [f"{at}: {turns_key!r} must hold the prompt and then the completion"]
        conversation, problems = _read_side(record, turns_key, turns[:-1], turns[-1], "completion", index, path)
    else:
        prompt, completion = record.get("prompt"), record.get("completion")
        if prompt is None or completion is None:
            return None, [f"{at}: missing {'prompt' if prompt is None else 'completion'!r}"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        base = {"messages": prompt, **{k: v for k, v in record.items() if k in ("id", "tools")}}
        conversation, problems = _read_side(base, "messages", prompt, _as_messages(completion), "completion", index,
                                            path)
    if problems:
        return None, problems
    prompt, completion, problems = _split_reply(conversation, "completion", at)
    if problems:
        return None, problems
    return KTOSample(prompt, completion, label), []


def tokenize_pairs(pairs: list[PreferencePair], tokenizer, max_len: int,
                   system_message: str = DEFAULT_SYSTEM_MESSAGE, chat_format: str = "chatml") -> list[TokenizedPair]:
    """Each pair's prompt tokens (once) and reply tokens, rendered and labelled as SFT renders and labels a
    conversation whose last reply is trained. A side longer than `max_len` keeps its first `max_len` tokens (the
    reply's end is cut); a pair whose prompt leaves no reply token on a side is kept with an empty reply there and
    dropped by `keep_trainable_pairs`."""
    conversations = []
    for pair in pairs:
        for reply in (pair.chosen, pair.rejected):
            turns = pair.prompt.turns + (reply,)
            conversations.append(replace(pair.prompt, turns=turns, trained=(len(turns) - 1,)))
    samples = tokenize_conversations(conversations, tokenizer, max_len, system_message, chat_format)
    tokenized = []
    for k in range(len(pairs)):
        chosen, rejected = samples[2 * k], samples[2 * k + 1]
        prompt_length = min(_first_label(chosen.labels), _first_label(rejected.labels))
        if chosen.input_ids[:prompt_length] != rejected.input_ids[:prompt_length]:
            raise ValueError(f"pair {k}: the tokenizer gives the prompt different tokens before each reply")
        # each reply ends with its last labelled token (its <|im_end|>): the newline the template writes after it
        # is context for a next turn there is none of
        chosen_end, rejected_end = _after_last_label(chosen.labels), _after_last_label(rejected.labels)
        tokenized.append(TokenizedPair(
            chosen.input_ids[:prompt_length], chosen.input_ids[prompt_length:chosen_end],
            chosen.labels[prompt_length:chosen_end], rejected.input_ids[prompt_length:rejected_end],
            rejected.labels[prompt_length:rejected_end], origin=k))
    return tokenized


def _after_last_label(labels: list[int]) -> int:
    return next((len(labels) - i for i, label in enumerate(reversed(labels)) if label != IGNORE_INDEX), 0)


def _first_label(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def keep_trainable_pairs(pairs: list[TokenizedPair]) -> tuple[list[TokenizedPair], list[int]]:
    """(the pairs with a labelled reply token on both sides, the origins of those dropped)."""
    kept, dropped = [], []
    for pair in pairs:
        trainable = (any(label != IGNORE_INDEX for label in pair.chosen_labels)
                     and any(label != IGNORE_INDEX for label in pair.rejected_labels))
        (kept if trainable else dropped).append(pair if trainable else pair.origin)
    return kept, dropped


REPLY_INDEX = "reply_index"  # a preference batch's reply of every token (2k: pair k's chosen, 2k + 1: its rejected)
# --precompute_ref_log_probs: an item's reference log-probability sums [reply 2k, reply 2k + 1] (pair: chosen,
# rejected; KTO: its completion, its mismatched one), computed once before training and carried by the item itself
# (so any shuffling keeps them with their pair); a batch holds them flat, in reply order
REFERENCE_LOG_PROBS = "reference_log_probs"


def with_reference(features: dict, dataset, i: int) -> dict:
    """An item's features, with its precomputed reference log-probabilities once the dataset has them."""
    values = getattr(dataset, "reference_values", None)
    if values is not None:
        features[REFERENCE_LOG_PROBS] = values[i].tolist()
    return features


def reference_column(features: list[dict], batch: dict) -> dict:
    """The batch with its items' reference log-probabilities, flat in reply order, when every item has them."""
    import torch

    if features and all(REFERENCE_LOG_PROBS in f for f in features):
        batch[REFERENCE_LOG_PROBS] = torch.tensor([v for f in features for v in f[REFERENCE_LOG_PROBS]],
                                                  dtype=torch.float32)
    return batch


def pair_features(pair: TokenizedPair) -> dict:
    return {"prompt_ids": pair.prompt_ids, "chosen_ids": pair.chosen_ids, "chosen_labels": pair.chosen_labels,
            "rejected_ids": pair.rejected_ids, "rejected_labels": pair.rejected_labels}


class PreferenceCollator:
    """Pairs -> one padding-free row ([1, total]) with `position_ids`, `labels` and `REPLY_INDEX`.

    With `shared_prompt` (the default) a pair is its prompt once, the chosen reply, then the rejected reply as a
    branch of the prompt (chatft.model.attention): the prompt's last token again, at its own position, followed by
    the rejected reply, so that the branch's first token predicts the rejected reply's first token from the prompt
    alone, as in prompt + rejected. The rejected reply never sees the chosen one; the prompt is computed once (one
    token more per pair). Without it, each pair is two samples, prompt + chosen and prompt + rejected (what peers
    compute, and what flash-attention's variable-length kernel can run)."""

    def __init__(self, shared_prompt: bool = True):
        self.shared_prompt = shared_prompt

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, positions, labels, replies = [], [], [], []
        for k, f in enumerate(features):
            prompt, chosen, rejected = f["prompt_ids"], f["chosen_ids"], f["rejected_ids"]
            ids += prompt + chosen
            positions += range(len(prompt) + len(chosen))
            labels += [IGNORE_INDEX] * len(prompt) + f["chosen_labels"]
            replies += [-1] * len(prompt) + [2 * k] * len(chosen)
            if self.shared_prompt:
                ids += prompt[-1:] + rejected
                positions += range(len(prompt) - 1, len(prompt) + len(rejected))
                labels += [IGNORE_INDEX] + f["rejected_labels"]
                replies += [-1] + [2 * k + 1] * len(rejected)
            else:
                ids += prompt + rejected
                positions += range(len(prompt) + len(rejected))
                labels += [IGNORE_INDEX] * len(prompt) + f["rejected_labels"]
                replies += [-1] * len(prompt) + [2 * k + 1] * len(rejected)
        row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
        return reference_column(features, {"input_ids": row(ids), "position_ids": row(positions),
                                           "labels": row(labels), REPLY_INDEX: row(replies)})


def load_preference_samples(spec: str, stage: str) -> list:
    """The pairs (`PreferencePair`; KTOSample for `stage` kto) of a --data_path (files and directories,
    comma-separated), in order (load_preference_sources, joined)."""
    return [sample for samples in load_preference_sources(spec, stage) for sample in samples]


def load_preference_sources(spec: str, stage: str) -> list[list]:
    """The pairs of a --data_path, one list per comma-separated source (what --data_mix counts); raise DataError
    listing every problem of every file."""
    from chatft.data.datasets import data_files, data_problems
    from chatft.data.mixing import data_sources

    problems, source_files = [], []
    for source in data_sources(spec):
        files, found = data_files(source)
        problems += found
        source_files.append(files)
    sources = []
    for files in [] if problems else source_files:
        samples = []
        for path in files:
            file_samples, file_problems = read_preference_file(path, stage)
            samples += file_samples
            problems += file_problems
        sources.append(samples)
    if problems:
        raise data_problems(spec, problems)
    return sources


def read_preference_file(path: str, stage: str) -> tuple[list, list[str]]:
    """(the samples of one file, its problems). Under kto, a file of pairs gives each pair's chosen reply as
    desirable and its rejected one as undesirable (as TRL unpairs them)."""
    from chatft.data.datasets import read_json_or_jsonl

    records, problems = read_json_or_jsonl(path)
    samples = []
    paired = any(is_preference_record(r) for r in records)
    if stage == "kto" and not paired:
        if records and not any(is_kto_record(r) for r in records):
            problems.append(f"{path}: --stage kto needs completions labelled desirable or not ('label': true/false, "
                            "or 'kto_tag'), or preference pairs; this file has neither (SFT data: train it with "
                            "--stage sft)")
        else:
            for index, record in enumerate(records):
                sample, record_problems = read_kto_record(record, index, path)
                problems += record_problems
                samples.append(sample)
    elif records and not paired:
        problems.append(f"{path}: --stage {stage} needs preference pairs ('chosen' and 'rejected' replies); this "
                        "file has none (SFT data: train it with --stage sft)")
    else:
        for index, record in enumerate(records):
            pair, record_problems = read_preference_record(record, index, path)
            problems += record_problems
            if stage == "kto" and pair is not None:
                samples += [KTOSample(pair.prompt, pair.chosen, True), KTOSample(pair.prompt, pair.rejected, False)]
            else:
                samples.append(pair)
    if not records and not problems:
        problems.append(f"{path}: contains no samples")
    return samples, problems


class PreferenceDataset:
    """Tokenized pairs (`tokenize_pairs`), those left with no reply token on a side dropped and named; items are
    `pair_features` dicts for PreferenceCollator."""

    def __init__(self, pairs: list[PreferencePair], tokenizer, max_len: int,
                 system_message: str = DEFAULT_SYSTEM_MESSAGE, chat_format: str = "chatml"):
        import logging

        from chatft.data.datasets import nothing_to_train, untrainable_reason
        from chatft.data.formats import sample_name

        tokenized = tokenize_pairs(pairs, tokenizer, max_len, system_message, chat_format)
        self.pairs, dropped = keep_trainable_pairs(tokenized)
        if dropped:
            names = ", ".join(sample_name(k, pairs[k].prompt) for k in dropped[:10]) + (" ..." if len(dropped) > 10
                                                                                       else "")
            logging.getLogger(__name__).warning("Dropped %d of %d pairs with %s on a side: %s", len(dropped),
                                                len(tokenized), untrainable_reason(max_len), names)
        if not self.pairs:
            raise nothing_to_train(max_len)

    def __len__(self) -> int:
        return len(self.pairs)

    reference_values = None  # --precompute_ref_log_probs: a [pairs, 2] tensor (chatft.train.preference)

    def __getitem__(self, i: int) -> dict:
        return with_reference(pair_features(self.pairs[i]), self, i)


def describe_pair(pair: TokenizedPair, tokenizer) -> str:
    """A pair's prompt, then each reply with its labelled tokens in [[...]], for eyeballing the masks (--dry_run)."""
    def reply(ids, labels):
        runs: list[tuple[bool, list[int]]] = []
        for token_id, label in zip(ids, labels):
            if not runs or runs[-1][0] != (label != IGNORE_INDEX):
                runs.append((label != IGNORE_INDEX, []))
            runs[-1][1].append(token_id)
        return "".join(f"[[{tokenizer.decode(run)}]]" if trained else tokenizer.decode(run) for trained, run in runs)

    return (f"{tokenizer.decode(pair.prompt_ids)}\n--- chosen:\n{reply(pair.chosen_ids, pair.chosen_labels)}\n"
            f"--- rejected:\n{reply(pair.rejected_ids, pair.rejected_labels)}")


DESIRABLE = "desirable"  # a KTO batch's label per sample


@dataclass
class TokenizedCompletion:
    """A KTO sample's tokens: the prompt, the completion (labelled as SFT labels a reply), its label."""
    prompt_ids: list[int]
    completion_ids: list[int]
    completion_labels: list[int]
    desirable: bool
    origin: int = 0


def tokenize_completions(samples: list[KTOSample], tokenizer, max_len: int,
                         system_message: str = DEFAULT_SYSTEM_MESSAGE, chat_format: str = "chatml"
                         ) -> list[TokenizedCompletion]:
    """`tokenize_pairs` for unpaired completions (each its own prompt)."""
    pairs = tokenize_pairs([PreferencePair(s.prompt, s.completion, s.completion) for s in samples], tokenizer,
                           max_len, system_message, chat_format)
    return [TokenizedCompletion(p.prompt_ids, p.chosen_ids, p.chosen_labels, s.desirable, origin=k)
            for k, (p, s) in enumerate(zip(pairs, samples))]


def completion_features(sample: TokenizedCompletion) -> dict:
    return {"prompt_ids": sample.prompt_ids, "completion_ids": sample.completion_ids,
            "completion_labels": sample.completion_labels, DESIRABLE: sample.desirable}


class KTOCollator:
    """KTO samples -> one padding-free row: each sample's prompt once, its completion (reply 2k), then, as a branch
    of the same prompt, the next sample's completion (reply 2k + 1; the last sample takes the first's): the
    mismatched prompt/completion pairs whose log-probability ratio estimates KL(policy || reference), as TRL builds
    them by cycling the completions of a batch by one, here without a second copy of the prompt."""

    def __init__(self, shared_prompt: bool = True):
        self.shared_prompt = shared_prompt  # False: the mismatched completion is a sample of its own, prompt + it

    def __call__(self, features: list[dict]) -> dict:
        import torch

        ids, positions, labels, replies = [], [], [], []
        for k, f in enumerate(features):
            if "mismatched_ids" in f:  # fixed by the dataset (precomputed references)
                other_ids, other_labels = f["mismatched_ids"], f["mismatched_labels"]
            else:
                neighbour = features[(k + 1) % len(features)]
                other_ids, other_labels = neighbour["completion_ids"], neighbour["completion_labels"]
            prompt = f["prompt_ids"]
            again = prompt[-1:] if self.shared_prompt else prompt  # a branch of the prompt, or the prompt again
            ids += prompt + f["completion_ids"] + again + other_ids
            positions += [*range(len(prompt) + len(f["completion_ids"])),
                          *range(len(prompt) - len(again), len(prompt) + len(other_ids))]
            labels += [IGNORE_INDEX] * len(prompt) + f["completion_labels"] + [IGNORE_INDEX] * len(again) + other_labels
            replies += [-1] * len(prompt) + [2 * k] * len(f["completion_ids"]) + [-1] * len(again) + \
                [2 * k + 1] * len(other_ids)
        row = lambda values: torch.tensor(values, dtype=torch.long)[None]  # noqa: E731
        return reference_column(features, {"input_ids": row(ids), "position_ids": row(positions),
                                           "labels": row(labels), REPLY_INDEX: row(replies),
                                           DESIRABLE: torch.tensor([bool(f[DESIRABLE]) for f in features])})


class KTODataset:
    """Tokenized KTO completions (`tokenize_completions`), those left with no completion token dropped and named;
    items are `completion_features` dicts for KTOCollator. `fixed_mismatch` (precomputed references, which must not
    depend on how batches fall): item i carries the completion of item i + n // 2 as its mismatched one, half the
    data away so that the two sides of a pair given to KTO (neighbours) are never matched with each other."""

    reference_values = None  # --precompute_ref_log_probs: a [completions, 2] tensor (chatft.train.preference)

    def __init__(self, samples: list[KTOSample], tokenizer, max_len: int,
                 system_message: str = DEFAULT_SYSTEM_MESSAGE, chat_format: str = "chatml",
                 fixed_mismatch: bool = False):
        self.fixed_mismatch = fixed_mismatch
        import logging

        from chatft.data.datasets import nothing_to_train, untrainable_reason

        tokenized = tokenize_completions(samples, tokenizer, max_len, system_message, chat_format)
        self.completions = [s for s in tokenized if any(label != IGNORE_INDEX for label in s.completion_labels)]
        if len(self.completions) < len(tokenized):
            logging.getLogger(__name__).warning("Dropped %d of %d completions with %s", len(tokenized) - len(self.completions),
                                                len(tokenized), untrainable_reason(max_len))
        if not self.completions:
            raise nothing_to_train(max_len)

    def __len__(self) -> int:
        return len(self.completions)

    def __getitem__(self, i: int) -> dict:
        features = completion_features(self.completions[i])
        if self.fixed_mismatch:
            other = self.completions[(i + len(self) // 2) % len(self)]
            features["mismatched_ids"], features["mismatched_labels"] = other.completion_ids, other.completion_labels
        return with_reference(features, self, i)


def preference_dataset(samples: list, tokenizer, max_len: int, system_message: str, chat_format: str,
                       precomputed_reference: bool = False):
    """The dataset of a preference stage's samples: KTODataset for KTOSamples, else PreferenceDataset."""
    if samples and isinstance(samples[0], KTOSample):
        return KTODataset(samples, tokenizer, max_len, system_message, chat_format, precomputed_reference)
    return PreferenceDataset(samples, tokenizer, max_len, system_message, chat_format)


def preference_dry_run(name: str, samples: list, tokenizer, max_len: int, system_message: str, chat_format: str
                       ) -> str:
    """--dry_run of a preference stage: counts, lengths, and the first pair decoded with its labelled spans."""
    dataset = preference_dataset(samples, tokenizer, max_len, system_message, chat_format)
    if isinstance(dataset, KTODataset):
        desirable = sum(s.desirable for s in dataset.completions)
        lengths = [len(s.prompt_ids) + len(s.completion_ids) for s in dataset.completions]
        first = dataset.completions[0]
        shown = describe_pair(TokenizedPair(first.prompt_ids, first.completion_ids, first.completion_labels, [], []),
                              tokenizer).split("\n--- rejected:")[0]
        head = f"{len(dataset)} completions ({desirable} desirable, {len(dataset) - desirable} undesirable)"
    else:
        lengths = [p.num_tokens for p in dataset.pairs]
        shown = describe_pair(dataset.pairs[0], tokenizer)
        head = f"{len(dataset)} pairs"
    return (f"{name}: {head} of {len(samples)}, {min(lengths)}-{max(lengths)} tokens each (prompt once, mean "
            f"{sum(lengths) / len(lengths):.0f}); the first, labelled tokens in [[...]]:\n{shown}")

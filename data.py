"""Verifiable tasks for RLVR: synthetic generators and loaders for the formats users already have.

Every row is a dict:
    {"messages": [{"role": "user", "content": ...}, ...],  # the prompt, as chat messages
     "answer": "492",                                      # ground truth (or one valid solution)
     "task": "math" | "countdown",                          # which check verifier.reward() applies
     ...task extras ("numbers", "target" for countdown)}

Vision-language rows also carry "images": a list of PNG / JPEG bytes or file paths, one per image
part ({"type": "image"}) in the messages' content; open_image() turns each into a PIL image.

Synthetic tasks (`mul`, `mulsteps`: the same with a scratchpad in the reference response, `lin`,
`countdown`, and `count`: shapes drawn in an image) are generated
deterministically from (task, difficulty),
and split into train / eval by a hash of the prompt text, so a held-out prompt can never appear in
training, whatever the seed or the number of rows asked for.

Files: JSONL, JSON (a list) or parquet, with either
    question|problem|prompt (text) + answer|solution   (GSM8K's '#### N' answers are understood), or
    prompt (a list of chat messages) + reward_model.ground_truth   (the verl layout),
and optionally images|image: paths relative to the file, or bytes / {"bytes": ...} (parquet, the
verl / EasyR1 layout), placed where the prompt says '<image>' (before the text when it does not).
A malformed row raises DataError naming the file, row and field, before any training starts.

The order in which training reads rows (prompts_for_step, a function of the step), the layout of
a rollout batch (make_batch: responses as [N, R] tensors) and of NPO's pools in a checkpoint (pack_pools:
flat tensors; reshard_pools for another number of ranks) are here too, and the checks of what the model on
disk and the machine allow (model_config, model_positions, gpus_unusable, flash_attention_works).

The embedded model these tasks are learned by (build_tiny: a ~1M-parameter Qwen3 or Qwen3-VL from a
config with a character-level tokenizer) is built here too: with the tasks it is the embedded default.
"""
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys

import torch

TASKS = ("mul", "mulsteps", "lin", "countdown", "count")
DEFAULT_DIFFICULTY = {"mul": "3x1", "mulsteps": "4x1", "lin": "1", "countdown": "3", "count": "4"}
IMAGE = "<image>"  # where an image goes in a text prompt (the verl / EasyR1 convention)


class DataError(ValueError):
    """A data problem the user must fix; the message names the file, row and field."""


def is_eval(prompt_text, eval_frac=0.15):
    """Deterministic train/eval split by a hash of the prompt: stable across runs and machines."""
    h = int(hashlib.sha1(prompt_text.encode()).hexdigest()[:8], 16)
    return h / 2 ** 32 < eval_frac


def prompt_text(row):
    """The text a row's prompt is identified by (for splitting and de-duplication); images count by
    a hash of their bytes (or their path), so image rows with the same question stay distinct."""
    text = "\n".join(m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
                     for m in row["messages"])
    return text + "".join(f"\n<image {_image_key(x)}>" for x in row.get("images", []))


def _image_key(ref):
    return hashlib.sha1(ref).hexdigest() if isinstance(ref, bytes) else str(ref)


def image_messages(text, n_images):
    """A user message whose content puts an image part at each '<image>' in `text` (all images
    first when there is none). ValueError when placeholders and images do not match in number."""
    parts = text.split(IMAGE)
    if len(parts) == 1:
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    elif len(parts) - 1 == n_images:
        content = []
        for k, part in enumerate(parts):
            content += ([{"type": "image"}] if k else []) + ([{"type": "text", "text": part}] if part else [])
    else:
        raise ValueError(f"{len(parts) - 1} '{IMAGE}' placeholders for {n_images} images")
    return [{"role": "user", "content": content}]


def image_size(ref, where="image"):
    """(height, width) of an image from its header, without decoding the pixels."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref) as img:
            return img.height, img.width
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{where}: cannot read image: {e}") from None


def open_image(ref, where="image"):
    """An RGB PIL image from PNG / JPEG bytes or a file path; DataError naming `where` otherwise.
    Decoding is PIL's: image bytes are data to it, never code."""
    from PIL import Image, UnidentifiedImageError
    try:
        img = Image.open(io.BytesIO(ref) if isinstance(ref, bytes) else ref)
        img.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        shown = f"{len(ref)} bytes" if isinstance(ref, bytes) else ref
        raise DataError(f"{where}: cannot read image ({shown}): {e}") from None
    return img.convert("RGB")


def _user(text):
    return [{"role": "user", "content": text}]


# ---------------------------------------------------------------------------------------------
# Synthetic tasks
# ---------------------------------------------------------------------------------------------
def _mul(rng, difficulty):
    """n-digit x m-digit multiplication, difficulty 'NxM' (e.g. '3x1')."""
    n, m = (int(d) for d in difficulty.split("x"))
    a = rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)
    b = rng.randint(10 ** (m - 1) if m > 1 else 2, 10 ** m - 1)
    return {"messages": _user(f"{a}*{b}=?"), "answer": str(a * b), "task": "math"}


def _mulsteps(rng, difficulty):
    """n-digit x 1-digit multiplication whose reference response carries the procedure, a
    scratchpad: one partial product per digit of the first factor, right to left, with the carry,
    then the result, e.g. 5343*6: '3*6=18 4*6+1=25 3*6+2=20 5*6+2=32 =32058'. What a guide can pass on
    to a learner is then a way of working, not a memorised answer. Difficulty 'Nx1' (e.g. '4x1')."""
    n, m = (int(d) for d in difficulty.split("x"))
    if m != 1:
        raise DataError(f"mulsteps: difficulty {difficulty!r}: the scratchpad is written for 'Nx1'")
    row = _mul(rng, difficulty)
    a, b = (int(x) for x in row["messages"][0]["content"][:-2].split("*"))
    steps, carry = [], 0
    for d in reversed(str(a)):
        p = int(d) * b + carry
        steps.append(f"{d}*{b}+{carry}={p}" if carry else f"{d}*{b}={p}")
        carry = p // 10
    return {**row, "solution": " ".join(steps) + f" ={a * b}"}


def _lin(rng, difficulty):
    """Solve a*x+b=c for an integer x; difficulty = digits of a, b and x."""
    d = int(difficulty)
    a = rng.randint(2, max(2, 10 ** d - 1))
    x = rng.randint(-(10 ** d - 1), 10 ** d - 1)
    b = rng.randint(-(10 ** d - 1), 10 ** d - 1)
    c = a * x + b
    lhs = f"{a}x+{b}" if b >= 0 else f"{a}x-{-b}"
    return {"messages": _user(f"{lhs}={c}, x=?"), "answer": str(x), "task": "math"}


def _countdown(rng, difficulty):
    """Reach a target with each of n numbers exactly once (+ - * /); many answers are valid.
    The target is built from a random expression, so a solution always exists; 'answer' keeps
    that one solution (for SFT), the verifier accepts any valid one."""
    n = int(difficulty)
    nums = [rng.randint(1, 9) for _ in range(n)]
    expr, value = str(nums[0]), nums[0]
    for x in nums[1:]:
        op = rng.choice("+-*") if value * x < 200 else rng.choice("+-")
        expr, value = (f"({expr}){op}{x}" if op == "*" and any(o in expr for o in "+-")
                       else f"{expr}{op}{x}"), _apply(value, op, x)
    shown = sorted(nums)
    return {"messages": _user(f"Use {' '.join(map(str, shown))} to make {value}."),
            "answer": expr, "task": "countdown", "numbers": shown, "target": value}


def _apply(a, op, b):
    """Integer arithmetic for the generator (never applied to text)."""
    return a + b if op == "+" else a - b if op == "-" else a * b


def _count(rng, difficulty):
    """Count the shapes in a 64x64 image; difficulty 'N' (1-4) = between 1 and N squares and discs
    of random colours and sizes on black, each in its own quadrant (so they never touch). A
    quadrant is what one image token of the embedded VL model sees (16-pixel patches merged 2x2)."""
    from PIL import Image, ImageDraw
    k = rng.randint(1, min(4, int(difficulty)))
    img = Image.new("RGB", (64, 64), "black")
    draw = ImageDraw.Draw(img)
    for cell in rng.sample(range(4), k):
        size = rng.randint(14, 26)
        x, y = (cell % 2) * 32 + rng.randint(2, 30 - size), (cell // 2) * 32 + rng.randint(2, 30 - size)
        color = tuple(rng.randint(80, 255) for _ in range(3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)([x, y, x + size, y + size], fill=color)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"messages": image_messages(f"{IMAGE}How many shapes?", 1), "images": [buf.getvalue()],
            "answer": str(k), "task": "math"}


_GENERATORS = {"mul": _mul, "mulsteps": _mulsteps, "lin": _lin, "countdown": _countdown, "count": _count}


def make_task(task, difficulty=None, n_train=20_000, n_eval=1_000, eval_frac=0.15):
    """(train_rows, eval_rows) of a synthetic task. Deterministic in (task, difficulty): the same
    pool for every training seed, so runs with different seeds are compared on the same eval set.
    Draws distinct prompts until both splits are full or the task's space is exhausted."""
    if task not in _GENERATORS:
        raise DataError(f"unknown task {task!r}: choose one of {TASKS} or give a data file path")
    difficulty = difficulty or DEFAULT_DIFFICULTY[task]
    rng = random.Random(f"{task}:{difficulty}")
    train, evals, seen, misses = [], [], set(), 0
    while (len(train) < n_train or len(evals) < n_eval) and misses < 20 * (n_train + n_eval):
        row = _GENERATORS[task](rng, difficulty)
        key = prompt_text(row)
        if key in seen:
            misses += 1
            continue
        seen.add(key)
        split = evals if is_eval(key, eval_frac) else train
        if len(split) < (n_eval if split is evals else n_train):
            split.append(row)
    return train, evals


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def _read_records(path):
    """(row_number, record) pairs from a .jsonl / .json / .parquet file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's own message says what is wrong with the file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        return list(enumerate(table.to_pylist(), start=1))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # (a UTF-8 byte-order mark is fine)
    except UnicodeDecodeError as e:
        row, utf16 = raw[:e.start].count(b"\n") + 1, raw[:2] in (b"\xff\xfe", b"\xfe\xff")
        raise DataError(f"{path}:{row}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start})"
                        + ("; the file is UTF-16 (it starts with a byte-order mark)" if utf16 else "")
                        + ": save it as UTF-8") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        return list(enumerate(data, start=1))
    out = []
    for i, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None
    return out


def _gsm8k_answer(text):
    """GSM8K's worked answer '... #### 1,234' -> '1234'."""
    return text.rsplit("####", 1)[1].strip().replace(",", "") if "####" in text else text.strip()


def parse_images(rec, where, base_dir):
    """The record's images (field 'images' or 'image': one or a list of paths relative to the data
    file, bytes, or {"bytes": ..., "path": ...} as parquet stores them), each checked readable."""
    refs = rec.get("images", rec.get("image"))
    if refs is None:
        return []
    if not isinstance(refs, (list, tuple)):
        refs = [refs]
    out = []
    for k, ref in enumerate(refs):
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, str):
            ref = os.path.normpath(os.path.join(base_dir, ref))
            if not os.path.isfile(ref):
                raise DataError(f"{where}: field 'images' [{k}]: file not found: {ref}")
        elif not isinstance(ref, (bytes, bytearray)):
            raise DataError(f"{where}: field 'images' [{k}] must be a path or image bytes, got {type(ref).__name__}")
        open_image(bytes(ref) if isinstance(ref, bytearray) else ref, f"{where}: field 'images' [{k}]")
        out.append(bytes(ref) if isinstance(ref, bytearray) else ref)
    return out


def parse_record(rec, where, base_dir="."):
    """One file record -> a row, or DataError naming `where` (file:row) and the field."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object with fields, got {type(rec).__name__}")
    prompt = next((rec[k] for k in ("prompt", "question", "problem") if rec.get(k) is not None), None)
    if prompt is None:
        raise DataError(f"{where}: missing field 'question' (or 'problem' / 'prompt')")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field 'question' is empty")
        messages = _user(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in prompt):
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise DataError(f"{where}: field 'prompt' must be text or a list of "
                        "{'role': ..., 'content': ...} messages")
    rm = rec.get("reward_model")
    if isinstance(rm, dict) and rm.get("ground_truth") is not None:
        answer = rm["ground_truth"]
    else:
        answer = rec.get("answer", rec.get("solution"))
    if answer is None:
        raise DataError(f"{where}: missing field 'answer' (or 'reward_model.ground_truth')")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{where}: field 'answer' must be a non-empty string, got {answer!r:.60}")
    row = {"messages": messages, "answer": _gsm8k_answer(answer), "task": "math"}
    images = parse_images(rec, where, base_dir)
    if images:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user") if any(
            m["role"] == "user" for m in messages) else 0
        if not isinstance(messages[first]["content"], str):
            raise DataError(f"{where}: field 'prompt': give image rows' message content as text with '{IMAGE}'")
        try:
            messages[first] = {**messages[first], "content": image_messages(messages[first]["content"], len(images))[0]["content"]}
        except ValueError as e:
            raise DataError(f"{where}: field 'prompt': {e}") from None
        row["images"] = images
    return row


def load_file(path):
    """All rows of a data file; DataError on the first malformed row."""
    base = os.path.dirname(os.path.abspath(path))
    rows = [parse_record(rec, f"{path}:{i}", base) for i, rec in _read_records(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def load_data(spec, difficulty=None, eval_spec=None, n_eval=1_000, eval_frac=0.15, n_train=None):
    """(train_rows, eval_rows) for `--data` / `--eval_data`: a task name or a file path.
    A file without a separate eval file is split by prompt hash. n_train: only the first n training
    rows (a small set whose prompts recur every few steps)."""
    if spec in _GENERATORS:
        train, evals = make_task(spec, difficulty, n_eval=n_eval, eval_frac=eval_frac)
    else:
        rows = load_file(spec)
        train = [r for r in rows if not is_eval(prompt_text(r), eval_frac)]
        evals = [r for r in rows if is_eval(prompt_text(r), eval_frac)]
        if eval_spec is not None:
            train = rows
    if eval_spec is not None:
        evals = load_file(eval_spec)
        held = {prompt_text(r) for r in evals}
        train = [r for r in train if prompt_text(r) not in held]  # never train on eval prompts
    if not train:
        raise DataError(f"{spec}: no training rows left after the eval split")
    return train[:n_train], evals[:n_eval]


def prepare_data(args, tokenizer, processor=None, log=print):
    """The run's ((train rows, their prompts), (eval rows, their prompts)) from --data / --eval_data, encoded with the
    chat template; DataError naming the file, row and field of anything wrong. Rows over --max_prompt_tokens stop the
    run, or with --filter_overlong_prompts are dropped with a line that says how many."""
    out = []
    train, held_out = load_data(args.data, args.difficulty, args.eval_data, args.eval_size, n_train=args.train_size)
    for rows, where in ((train, args.data), (held_out, args.eval_data or f"{args.data} (eval split)")):
        out.append(encode_prompts(tokenizer, rows, args.max_prompt_tokens, where, processor,
                                  args.filter_overlong_prompts, args.chat_template_kwargs))
        if len(out[-1][0]) < len(rows):
            log(f"data: dropped {len(rows) - len(out[-1][0])} of {len(rows)} rows of {where} whose prompt is over "
                "--max_prompt_tokens (--filter_overlong_prompts)")
    return out


def sft_response(row):
    """The SFT target (and the external source's reference) of a row: its worked solution where the
    task has one (mulsteps' scratchpad), else the bare answer."""
    return row.get("solution", row["answer"])


def teacher_response(row):
    """A distant teacher's solution of a product 'a*b=?': another valid procedure than mulsteps' scratchpad, which
    the SFT base never saw (place values left to right with a running sum), e.g. 5343*6:
    '5000*6=30000 +1800=31800 +240=32040 +18=32058'. None for any other prompt. Parsed, never evaluated."""
    text = row["messages"][-1]["content"] if row.get("task") == "math" else None
    m = re.fullmatch(r"(\d+)\*(\d+)=\?", text) if isinstance(text, str) else None
    if not m:
        return None
    a, b = m[1].lstrip("0") or "0", int(m[2])
    parts = [int(d + "0" * (len(a) - 1 - k)) for k, d in enumerate(a) if d != "0"] or [0]
    out, total = [f"{parts[0]}*{b}={parts[0] * b}"], parts[0] * b
    for p in parts[1:]:
        total += p * b
        out.append(f"+{p * b}={total}")
    return " ".join(out)


def sft_target(tokenizer, row, teacher=False):
    """A row's reference response as token ids, EOS included (the SFT target, the external source), or with
    `teacher` the distant teacher's (empty when the row has none)."""
    text = teacher_response(row) if teacher else sft_response(row)
    if text is None:
        return []
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


# =============================================================================================
# The data order and the batch layout the trainer reads
# =============================================================================================
def prompts_for_step(step, n_rows, prompts_per_step, seed, rank, world):
    """Row indices this rank trains on at `step`: epochs of seeded permutations cut into global
    batches, each split evenly over ranks.

    >>> a = prompts_for_step(0, 10, 4, seed=0, rank=0, world=2)
    >>> b = prompts_for_step(0, 10, 4, seed=0, rank=1, world=2)
    >>> len(a), len(b), len(set(a + b)), a == prompts_for_step(0, 10, 4, 0, 0, 2)
    (2, 2, 4, True)
    """
    start, idx = step * prompts_per_step, []
    while len(idx) < prompts_per_step:
        epoch, offset = divmod(start + len(idx), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx.extend(perm[offset:offset + prompts_per_step - len(idx)].tolist())
    per_rank = prompts_per_step // world
    return idx[rank * per_rank:(rank + 1) * per_rank]


def pack_trajectories(trajs):
    """[(key, ids, logps)] -> flat tensors, as a checkpoint stores a pool of trajectories: torch.save writes a tensor in
    one piece and torch.load(weights_only=True) reads it at memory speed, where the millions of Python numbers of a
    real run's pools take minutes. ids as int32, log-probs as float32 (what the trainer and the engines compute).

    >>> t = pack_trajectories([(7, [1, 2], [-0.5, -0.25]), (9, [3], [-1.0])])
    >>> t["len"].tolist(), unpack_trajectories(t)
    ([2, 1], [(7, [1, 2], [-0.5, -0.25]), (9, [3], [-1.0])])
    """
    return {"key": torch.tensor([k for k, _, _ in trajs], dtype=torch.int64),
            "len": torch.tensor([len(ids) for _, ids, _ in trajs], dtype=torch.int64),
            "ids": torch.tensor([t for _, ids, _ in trajs for t in ids], dtype=torch.int32),
            "logps": torch.tensor([x for _, _, lps in trajs for x in lps], dtype=torch.float32)}


def unpack_trajectories(t):
    """The inverse of pack_trajectories."""
    n = t["len"].tolist()
    ids, lps = (t["ids"].split(n), t["logps"].split(n)) if n else ((), ())
    return [(k, a.tolist(), b.tolist()) for k, a, b in zip(t["key"].tolist(), ids, lps)]


def pack_pools(state):
    """NPO's state (npo.NPOState's fields) as a checkpoint stores it: the pools of trajectories (past successes, the
    guide pool) and the mistake pool as tensors, which a resume reads in seconds at a real run's sizes."""
    d = dict(state)  # (not a deep copy: that of millions of numbers is what this avoids)
    d["mistake_pool"] = torch.tensor(d["mistake_pool"], dtype=torch.int64).view(-1, 2)
    d["replay"] = {"step": torch.tensor([e[0] for e in d["replay"]], dtype=torch.int64),
                   **pack_trajectories([e[1:] for e in d["replay"]])}
    d["guide_pool"] = pack_trajectories([(r, *x) for r, v in d["guide_pool"].items() for x in v])
    return d


def unpack_pools(d):
    """pack_pools' inverse: the fields NPOState(**d) takes."""
    guide = {}
    for r, ids, lps in unpack_trajectories(d["guide_pool"]):
        guide.setdefault(r, []).append((ids, lps))
    replay = [(s, *x) for s, x in zip(d["replay"]["step"].tolist(), unpack_trajectories(d["replay"]))]
    return {**d, "mistake_pool": [tuple(e) for e in d["mistake_pool"].tolist()], "replay": replay, "guide_pool": guide}


def reshard_pools(pools, step, owned):
    """NPO's pools in a checkpoint written by another number of ranks (one unpack_pools dict per writer, or None): the
    run-wide fields are the first writer's; the per-rank pools (mistake pool, past successes, guide pool) are merged
    and this rank keeps the entries of the prompts it owns now (owned(s): its rows of step s under the data order,
    a function of the step). The per-rank RNG streams (sampling, minibatch shuffles) start anew."""
    if not pools[0]:
        return pools[0]
    out = dict(pools[0])
    for key in ("mistake_pool", "replay"):
        out[key] = sorted((e for x in pools for e in x[key] if e[1] in owned(e[0])), key=lambda e: e[0])
    window = set().union(*(owned(s) for s in range(step, out["guide_until"])))
    out["guide_pool"] = {r: v for x in pools for r, v in x["guide_pool"].items() if r in window}
    return out


def left_pad(seqs, pad_id, width=None):
    """[N, width] ids and attention mask, each sequence right-aligned (it ends where a response starts)."""
    width = width or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def make_batch(prompts, samples, n, pad_id, vision=None):
    """Pack prompt-major samples (n per prompt, each (response ids, sampling log-probs)) into
    padded tensors: prompts left-padded to P, responses right-padded to R, so that every per-token
    quantity of the responses is an [N, R] tensor (the trainer lays each micro-batch out anew).

    >>> b = make_batch([[5, 6], [7]], [([8, 2], [-0.1, -0.2]), ([9], [-0.3])], n=1, pad_id=0)
    >>> b["input_ids"].tolist(), b["attention_mask"][1].tolist(), b["resp_mask"].tolist()
    ([[5, 6, 8, 2], [0, 7, 9, 0]], [0, 1, 1, 0], [[1.0, 1.0], [1.0, 0.0]])
    """
    P, R, N = max(len(p) for p in prompts), max(1, max(len(ids) for ids, _ in samples)), len(samples)
    input_ids, attn = left_pad([prompts[k // n] for k in range(N)], pad_id, P)
    input_ids = torch.cat([input_ids, torch.full((N, R), pad_id, dtype=torch.long)], dim=1)   # [N, P+R]
    attn = torch.cat([attn, torch.zeros((N, R), dtype=torch.long)], dim=1)                   # [N, P+R]
    resp_mask, behav = torch.zeros((N, R)), torch.zeros((N, R))                              # [N, R]
    for k, (ids, lps) in enumerate(samples):
        if ids:
            input_ids[k, P:P + len(ids)] = torch.tensor(ids)
            attn[k, P:P + len(ids)] = 1
            resp_mask[k, :len(ids)] = 1
            behav[k, :len(ids)] = torch.tensor(lps)
    vision = [vision[k // n] for k in range(N)] if vision and any(v is not None for v in vision) else None
    return {"input_ids": input_ids, "attention_mask": attn, "resp_mask": resp_mask, "behav_logp": behav,
            "prompt_len": P, "vision": vision}


def sft_batch(tokenizer, rows, prompts, idx, processor=None):
    targets = [sft_target(tokenizer, rows[i]) for i in idx]
    return make_batch([prompts[i] for i in idx], [(t, [0.0] * len(t)) for t in targets], 1,
                      tokenizer.pad_token_id, vision_inputs(processor, [rows[i] for i in idx]))


# =============================================================================================
# Rows -> model inputs: chat prompts as token ids (image placeholders expanded), images as pixels
# =============================================================================================
def load_processor(path, min_pixels=None, max_pixels=None):
    """A vision-language checkpoint's processor, resizing images to [min_pixels, max_pixels] when given."""
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(path)
    if min_pixels or max_pixels:
        proc = AutoProcessor.from_pretrained(path, size=pixel_bounds(proc, min_pixels, max_pixels))
    return proc


def pixel_bounds(processor, min_pixels=None, max_pixels=None):
    """The processor's resize bounds (in pixels), with min_pixels / max_pixels applied where given."""
    size = processor.image_processor.size
    return {"shortest_edge": min_pixels or size.shortest_edge, "longest_edge": max_pixels or size.longest_edge}


def expand_image_tokens(processor, text, sizes):
    """The chat text with each image placeholder repeated once per token its image becomes (what
    the processor's __call__ does, from image sizes alone: encoding reads headers, not pixels)."""
    ip, tag = processor.image_processor, processor.image_token
    parts = text.split(tag)
    if len(parts) - 1 != len(sizes):
        raise ValueError(f"{len(parts) - 1} image placeholders in the chat text for {len(sizes)} images")
    counts = [ip.get_number_of_image_patches(h, w, {}) // ip.merge_size ** 2 for h, w in sizes]
    return parts[0] + "".join(tag * n + part for n, part in zip(counts, parts[1:]))


def encode_prompts(tokenizer, rows, max_prompt_tokens, where, processor=None, drop_overlong=False, template_kwargs=None):
    """(rows, their chat prompts as token ids): assistant header included (`template_kwargs`: passed to the
    chat template, e.g. {"enable_thinking": false}), a VL model's image placeholders expanded to the image's
    number of tokens. A prompt over the limit is an error
    naming the row, before training (truncating would change the task or cut through image
    tokens); with `drop_overlong` the row is left out, and a dataset with nothing left is refused."""
    kept = []
    for i, row in enumerate(rows):
        text = (processor or tokenizer).apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True,
                                                            **(template_kwargs or {}))
        if row.get("images") and processor is None:
            raise DataError(f"{where} row {i + 1}: has images, but the model is text-only")
        if processor is not None and row.get("images"):
            sizes = [image_size(x, f"{where} row {i + 1}: field 'images'") for x in row["images"]]
            try:
                text = expand_image_tokens(processor, text, sizes)
            except ValueError as e:
                raise DataError(f"{where} row {i + 1}: field 'prompt': {e}") from None
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) > max_prompt_tokens and not drop_overlong:
            what = " with its images" if row.get("images") else ""
            raise DataError(f"{where} row {i + 1}: prompt{what} has {len(ids)} tokens, over "
                            f"--max_prompt_tokens {max_prompt_tokens}")
        if len(ids) <= max_prompt_tokens:
            kept.append((row, ids))
    if rows and not kept:
        raise DataError(f"{where}: every prompt is over --max_prompt_tokens; nothing is left to train on")
    return [r for r, _ in kept], [p for _, p in kept]


def vision_inputs(processor, rows):
    """Per row {'images', 'pixel_values', 'image_grid_thw'}, None for a text row; None for a text
    model. Made when a batch needs them, not kept for the whole dataset."""
    if processor is None:
        return None
    out = []
    for row in rows:
        if not row.get("images"):
            out.append(None)
            continue
        images = [open_image(x) for x in row["images"]]
        v = processor.image_processor(images=images, return_tensors="pt")
        out.append({"images": images, "pixel_values": v["pixel_values"], "image_grid_thw": v["image_grid_thw"]})
    return out


def vision_kwargs(vision, input_ids, image_token_id, device):
    """Model inputs for sequences whose vision_inputs() entries are `vision` (None for text):
    patches in sequence order, their grids and mm_token_type_ids (the model derives M-RoPE
    positions from them). {} when no sequence has an image."""
    vision = [v for v in vision or [] if v is not None]
    if not vision:
        return {}
    return {"pixel_values": torch.cat([v["pixel_values"] for v in vision]).to(device),
            "image_grid_thw": torch.cat([v["image_grid_thw"] for v in vision]).to(device),
            "mm_token_type_ids": (input_ids == image_token_id).long()}


def blank_image_row(config, width):
    """A row of `width` >= 3 token ids holding one blank image (its three vision tokens, then padding) and its
    vision_inputs() entry. A micro-batch with no image carries it so that the vision tower runs on every rank: its
    blocks are FSDP units, and ranks that run different units issue different collectives (and hang)."""
    v, m = config.vision_config, config.vision_config.spatial_merge_size
    row = torch.zeros(1, width, dtype=torch.long)
    row[0, :3] = torch.tensor([config.vision_start_token_id, config.image_token_id, config.vision_end_token_id])
    pixels = torch.zeros(m * m, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)  # m x m patches: one token
    return row, {"images": None, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, m, m]])}


def vision_token_ids(config):
    """A VL model's placeholder tokens. The policy never writes them: both samplers suppress them
    and the trainer's log-probs renormalise without them, so sampler and trainer keep one distribution."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(config, k) for k in names if getattr(config, k, None) is not None] \
        if hasattr(config, "vision_config") else []


# =============================================================================================
# The embedded model: a tiny Qwen3 (or Qwen3-VL) built from a config with a character-level
# tokenizer, saved like any checkpoint, so that the trainer loads it like a real one. Nothing is
# downloaded. (torch and transformers are imported here only when a model is built.)
# =============================================================================================
CHAT_TEMPLATE = (  # Qwen-style ChatML; content is text, or a list of text and image parts (VL)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")  # enable_thinking: as Qwen3's template reads it
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def char_tokenizer(extra_specials=()):
    """A character-level tokenizer: printable ASCII, ChatML specials, one token per role name."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # "." would leave "\n\n" whole
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.add_tokens(["user", "assistant", "system"])
    tok.add_special_tokens(list(extra_specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def local_config(model):
    """A local checkpoint's config.json as a dict, or None."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# What the model on disk and the machine allow, checked before anything heavy starts (npo.resolve_defaults, setup)
@functools.lru_cache(maxsize=None)  # asked by several loaders; for a hub id it is a network call
def model_config(model):
    """--model's config as a dict (the embedded model's before it is built: {}), or a clear stop: a directory without
    config.json, a path that does not exist, a hub id that is neither cached nor reachable."""
    if model in ("tiny", "tiny-vl"):
        return {"vision_config": {}} if model == "tiny-vl" else {}
    if os.path.isdir(model) or model.startswith(("/", ".", "~")) or model.count("/") != 1:  # a path, not org/name
        if local_config(model) is None:
            why = "no config.json there (not a saved checkpoint)" if os.path.isdir(model) else "no such directory"
            sys.exit(f"error: --model {model}: {why}; give a checkpoint directory, a hub id such as Qwen/Qwen3-8B, or tiny")
        return local_config(model)
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model).to_dict()
    except Exception as e:  # noqa: BLE001  (OSError, ValueError, requests' errors: each says why in its first line)
        sys.exit(f"error: --model {model}: not a local directory, and no config from the hub or its cache "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")


def model_positions(model):
    """The positions a model has (max_position_embeddings, of its text model for a VL one), None if it does not say."""
    cfg = model_config(model)
    return cfg.get("max_position_embeddings") or cfg.get("text_config", {}).get("max_position_embeddings")


def flash_attention_works():
    """flash-attn (optional, no wheel; else sdpa) on a GPU when it imports: a broken build passes find_spec."""
    from transformers.utils import is_flash_attn_2_available
    if not (torch.cuda.is_available() and is_flash_attn_2_available()):
        return False
    try:
        import flash_attn  # noqa: F401  (loads the compiled kernels)
    except Exception as e:  # an ABI mismatch raises ImportError, OSError or worse
        print(f"warning: flash-attn is installed but does not import ({e}); using sdpa", file=sys.stderr)
        return False
    return True


def gpus_unusable():
    """Stop when nvidia-smi sees GPUs that torch cannot use (torch 2.13's CUDA 13 wheels need driver >= 580): such
    a machine must not quietly train on its CPU. CUDA_VISIBLE_DEVICES="" runs on the CPU on purpose."""
    if torch.cuda.is_available() or os.environ.get("CUDA_VISIBLE_DEVICES") == "" or not shutil.which("nvidia-smi"):
        return
    gpus = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip().splitlines()
    if gpus:
        raise SystemExit(f"error: nvidia-smi sees {len(gpus)} GPU(s) ({gpus[0].strip()}: name, driver), torch "
                         f"{torch.__version__} (CUDA {torch.version.cuda}) none: torch 2.13 and vllm 0.32.0 from PyPI (CUDA 13) "
                         "need driver >= 580; bash run.sh setup says what works with an older one. CPU on purpose: "
                         "CUDA_VISIBLE_DEVICES=")


def engine_share(params, world, device_bytes, weight_bytes=2):
    """--vllm_memory's default on a GPU: the device share vLLM may take while awake. Beside it the trainer keeps its
    FSDP2 shard of fp32 master weights and AdamW's two moments (12 B a parameter / ranks) and 4 GiB for the CUDA
    context, NCCL and the sync; the engine's share holds its own weights (`weight_bytes` a parameter), the rest is KV
    cache. Stops with a message when the trainer leaves the engine less than its weights."""
    trainer = 12 * params / world + 4 * 2**30
    if device_bytes - trainer < 1.1 * weight_bytes * params:
        raise SystemExit(f"error: {params / 1e9:.2f}B parameters on {world} rank(s): the trainer keeps {trainer / 1e9:.0f} GB a "
                         "GPU (its shard of fp32 weights and AdamW, 12 B a parameter / ranks, and 4 GiB), which leaves vLLM "
                         f"{max(device_bytes - trainer, 0) / 1e9:.0f} of the GPU's {device_bytes / 1e9:.0f} GB, less than its "
                         f"weights ({weight_bytes * params / 1e9:.0f} GB): use more GPUs (torchrun --nproc_per_node) or "
                         "set --vllm_memory yourself")
    return 1 - trainer / device_bytes


def is_embedded(model):
    """The embedded tiny model, freshly built or saved by an earlier run (build_tiny marks its config)."""
    return model in ("tiny", "tiny-vl") or bool((local_config(model) or {}).get("npo_embedded"))


def build_tiny(path, seed=0, vision=False, tokenizer=None, **sizes):
    """The embedded default, saved to `path`. Text: a ~0.8M-parameter Qwen3ForCausalLM (4 layers of
    width 128); `sizes` override its config (hidden_size=256, num_hidden_layers=12: ~10M).
    vision=True: a ~0.8M Qwen3VLForConditionalGeneration (2 vision blocks of width 64, 16-pixel
    patches merged 2x2, so a 64x64 image is 4 tokens; 2 text layers) with a Qwen3VLProcessor.
    Untied embeddings: a tied lm_head goes stale in vLLM-CPU weight reloads. `tokenizer`: another one (a subword
    tokenizer with the same ChatML specials, and the vision ones for vision=True) in place of the character one."""
    import transformers as tf
    tokenizer = tokenizer or char_tokenizer(VISION_TOKENS if vision else ())
    v = tokenizer.get_vocab()
    ids = dict(pad_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"])
    text = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512, **ids)
    if not vision:
        config = tf.Qwen3Config(**{**text, **sizes}, tie_word_embeddings=False, bos_token_id=None, rope_theta=10000.0)
        saver, cls = tokenizer, tf.Qwen3ForCausalLM
    else:
        patch = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
        saver = tf.Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessor(**patch, min_pixels=32 * 32, max_pixels=128 * 128,
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3),
            video_processor=Qwen3VLVideoProcessor(**patch), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        config = tf.Qwen3VLConfig(
            text_config={**text, "num_hidden_layers": 2, "max_position_embeddings": 1024, "rope_parameters": rope, **sizes},
            vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                               num_position_embeddings=64, deepstack_visual_indexes=[1]),
            image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
            vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"], tie_word_embeddings=False)
        cls = tf.Qwen3VLForConditionalGeneration
    config.npo_embedded = True
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = ids["eos_token_id"], ids["pad_token_id"]
    model.save_pretrained(path)
    saver.save_pretrained(path)
    return path


if __name__ == "__main__":  # python data.py mul 3x1  -> a few rows and the split sizes
    import sys
    task = sys.argv[1] if len(sys.argv) > 1 else "mul"
    tr, ev = make_task(task, sys.argv[2] if len(sys.argv) > 2 else None)
    print(f"{task}: {len(tr)} train, {len(ev)} eval")
    for r in random.Random(0).sample(tr, 3):
        print(json.dumps(r))

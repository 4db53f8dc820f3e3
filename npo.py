"""npo.py: GRPO, Near-Future Policy Optimization (NPO) and AutoNPO for RL with verifiable rewards.

NPO in one paragraph. GRPO samples G responses per prompt, rewards each with a verifier and pushes up the ones that
beat their group's mean; a group that is all wrong teaches nothing. NPO borrows from the policy's own near future:
train ahead Delta steps to theta_t, roll back to theta_{t-Delta}, and retrain with theta_t as the *guide*: in a group
whose accuracy is below 0.6, one incorrect sample is replaced by a verified-correct guide sample, and the GRPO
objective is unchanged (old log-probs recomputed by the current policy for every token). A source of such samples is
judged by Q (on the prompts the learner fails, how much more often the source solves them than the learner does
itself) and V (how much its importance weights inflate the gradient's variance, 1 on-policy); AutoNPO intervenes when
online signals fire (sparse reward, entropy collapse, reward stagnation) and picks the rollback distance Delta that
maximises S = Q / V over a ring buffer of checkpoints. Paper: arXiv 2604.20733.

Run it (the default --model tiny is data.build_tiny's ~1M-parameter Qwen3 with a character tokenizer,
built from a config and loaded like any checkpoint; tiny-vl is its Qwen3-VL twin)
    bash run.sh                                               # CPU: an SFT base, then GRPO / NPO / AutoNPO on seed 0
    python npo.py --mode sft --out runs/sft                   # embedded tiny model, synthetic products
    python npo.py --mode grpo --model runs/sft/model --out runs/grpo
    python npo.py --mode npo --bootstrap_delta 30 --model runs/sft/model --out runs/npo
    python npo.py --mode autonpo --model runs/sft/model --out runs/autonpo
    torchrun --nproc_per_node=2 npo.py --mode autonpo --model runs/sft/model   # FSDP2 over gloo (CPU)
    torchrun --nproc_per_node=8 npo.py --mode autonpo --model Qwen/Qwen3-8B --data train.parquet \\
        --eval_data test.parquet --lr 1e-6 --max_new_tokens 4096 --prompts_per_step 256 --grad_ckpt

Reading order, as the data flows: arguments and state -> distributed -> model -> data -> rollout engine and rewards
-> advantages and loss (pure functions) -> training step -> checkpoints and the ring buffer -> NPO (injection, Q / V
/ S, intervention) -> AutoNPO triggers -> the loops. To learn the method read grpo_advantages, policy_loss,
inject_guide, signal_quality, variance_cost, select_delta, intervene and run_rl.
"""
import argparse
import datetime
import functools
import gc
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import dataclass, field
from statistics import NormalDist, fmean, variance

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers.utils import logging as hf_logging

import data as npo_data
import report  # metrics.jsonl and the log lines: written (open_metrics, write_metrics, step_line) and read in one place
import verifier

hf_logging.disable_progress_bar()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
SOURCES = ("future", "past", "external", "teacher", "self")  # where guide samples come from (section 10)


# ======== 1. Arguments =========================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="python npo.py [--mode sft|grpo|npo|autonpo] [flags]   (--help lists every flag)")
    g = p.add_argument_group("run")
    g.add_argument("--mode", default="grpo", choices=["sft", "grpo", "npo", "autonpo"], help="sft: supervised warm-up "
                   "(a base policy); npo: GRPO + manual interventions; autonpo: triggered ones, Delta by max S")
    g.add_argument("--out", default="runs/npo", help="output directory (metrics.jsonl, checkpoints/, model/)")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    g.add_argument("--steps", type=int, default=None, help="training steps; default 300 embedded, 500 otherwise")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", help="'tiny' / 'tiny-vl' (built from a config), a local directory or "
                   "a hub id (causal LMs; Qwen3-VL / Qwen2.5-VL)")
    g.add_argument("--vision_frozen", action="store_true", help="VL: freeze the vision tower and its merger")
    g.add_argument("--min_pixels", type=int, default=None, help="VL: images are resized to at least this many pixels")
    g.add_argument("--max_pixels", type=int, default=None, help="VL: ... and at most this many")
    g.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (large models)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="compute dtype of trainer (fp32 master "
                   "weights), engine and sync; default bf16 on GPU, fp32 on CPU")
    g.add_argument("--attn", default=None, help="attention; default flash_attention_2 on GPU when it imports, else sdpa")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, help=f"synthetic task {npo_data.TASKS} or a .jsonl/.json/.parquet")
    g.add_argument("--difficulty", default=None, help="synthetic task difficulty, e.g. '3x1' for mul")
    g.add_argument("--eval_data", default=None, help="held-out file; default: a hash split of --data")
    g.add_argument("--eval_size", type=int, default=1000, help="held-out prompts used for evaluation")
    g.add_argument("--train_size", type=int, default=None, help="train on the first N rows only (prompts that recur)")
    g.add_argument("--max_prompt_tokens", type=int, default=None, help="a longer prompt stops the run before training; "
                   "default 128 embedded, 4096 otherwise")
    g.add_argument("--filter_overlong_prompts", action="store_true", help="drop rows over --max_prompt_tokens instead")
    g.add_argument("--chat_template_kwargs", type=json.loads, default={}, help="JSON object for the chat template (Qwen3: "
                   "'{\"enable_thinking\": false}'); the verifier reads answers after </think>")
    g = p.add_argument_group("rollout")
    g.add_argument("--prompts_per_step", type=int, default=None, help="prompts per step (all ranks); 32 embedded, 256")
    g.add_argument("--group_size", type=int, default=8, help="G: responses sampled per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--max_new_tokens", type=int, default=None, help="response length cap; default 8 embedded, 4096")
    g.add_argument("--gen_batch_size", type=int, default=512, help="sequences per HF generate() call")
    g.add_argument("--rollout", default="auto", choices=["auto", "vllm", "hf"], help="generation engine; auto: vllm "
                   "when installed, hf for the embedded model with answers of <= 32 tokens")
    g.add_argument("--vllm_memory", type=float, default=None, help="GPU: device share vLLM takes awake (weights, KV "
                   "cache); default: what the trainer leaves, 1 - (12 B x N / ranks + 4 GiB) / device memory")
    g.add_argument("--tis_cap", type=float, default=2.0, help="on-policy tokens weighted by min(pi_old / pi_sampler, "
                   "cap): truncated importance sampling for the train/inference mismatch (0: off)")
    g = p.add_argument_group("loss")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate; default 3e-5 embedded (sft 1e-3), 1e-6")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up (optimizer steps)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--adv_std", default="group", choices=["group", "none"], help="group: (r - mean) / (std + eps) "
                   "(GRPO); none: r - mean (Dr. GRPO)")
    g.add_argument("--clip_low", type=float, default=0.2, help="PPO clip: ratio >= 1 - clip_low")
    g.add_argument("--clip_high", type=float, default=0.28, help="PPO clip: ratio <= 1 + clip_high (DAPO clip-higher)")
    g.add_argument("--loss_agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean"], help="loss average")
    g.add_argument("--kl_coef", type=float, default=0.0, help="k3 KL to the initial policy (0: off, no reference model)")
    g.add_argument("--ppo_epochs", type=int, default=1, help="passes over each rollout batch")
    g.add_argument("--minibatch_size", type=int, default=None, help="sequences per optimizer step; default half a batch")
    g.add_argument("--micro_batch_size", type=int, default=64, help="sequences per forward/backward on one rank, at most")
    g.add_argument("--micro_batch_tokens", type=int, default=None, help="... and tokens, padding included (0: no cap); "
                   "default 0 embedded, 16384")
    g.add_argument("--pack", action="store_true", help="padding-free micro-batches: sequences back to back (flash-attn)")
    g = p.add_argument_group("NPO: the near-future guide")
    g.add_argument("--gate", type=float, default=0.6, help="a group gets a guide sample when its accuracy is below this")
    g.add_argument("--guide_ratio", default="none", choices=["none", "clip", "shape"], help="guide tokens' ratio: none "
                   "= to old log-probs, as every token; clip = pi_theta / pi_guide, clipped; shape = LUFFY's p / (p + 0.1)")
    g.add_argument("--guide_samples", type=int, default=4, help="m: guide samples per prompt (injection and Q)")
    g.add_argument("--variance_cost", default="token", choices=["token", "trajectory"], help="V in S = Q / V: token: "
                   "E[w^2] / E[w]^2 of per-token weights (the loss's own); trajectory: exp(Var log w) of whole ones")
    g.add_argument("--guide_source", default="future", choices=SOURCES, help="future: theta_t (NPO, rollbacks); "
                   "without rollbacks (--mode npo): past: earlier successes (replay); external: the SFT references; "
                   "teacher: another procedure the base never saw (a distant teacher); self: the learner's m extra")
    g.add_argument("--guide_steps", type=int, default=0, help="past / external / teacher / self: inject in the first "
                   "N steps only (0: all); self with NPO's bootstrap Delta as N is its Delta = 0 control")
    g.add_argument("--replay_size", type=int, default=4096, help="past successes kept per rank")
    g.add_argument("--bootstrap_delta", type=int, default=0, help="npo: at step Delta, roll back to 0 (bootstrapping)")
    g.add_argument("--breakthrough_at", type=int, default=0, help="npo: at this step, roll back --breakthrough_delta")
    g.add_argument("--breakthrough_delta", type=int, default=0, help="npo: Delta of the plateau breakthrough")
    g.add_argument("--ring_every", type=int, default=10, help="ring buffer: a snapshot every k steps")
    g.add_argument("--ring_size", type=int, default=6, help="ring buffer: snapshots kept (K)")
    g.add_argument("--ring_dir", default=None, help="where ring snapshots are written; default <out>/ring")
    g.add_argument("--keep_ring", action="store_true", help="keep the ring files when the run ends (12 B/param each)")
    g.add_argument("--pool_size", type=int, default=4096, help="mistake pool entries kept per rank")
    g = p.add_argument_group("AutoNPO")
    g.add_argument("--min_delta", type=int, default=None, help="smallest Delta considered; default --ring_every")
    g.add_argument("--z", type=float, default=2.0, help="roll back only if Q > z SE; stagnation: slope + z SE below it")
    g.add_argument("--trigger_window", type=int, default=20, help="steps sparse reward and entropy collapse look back over")
    g.add_argument("--stagnation_window", type=int, default=60, help="steps reward stagnation fits its slope to")
    g.add_argument("--stagnation_slope", type=float, default=1e-3, help="reward stagnation: slope per step below this")
    g.add_argument("--entropy_frac", type=float, default=0.5, help="entropy collapse: below this fraction of the early one")
    g.add_argument("--sparse_threshold", type=float, default=0.6, help="sparse reward: share of all-wrong groups above this")
    g.add_argument("--cooldown", type=int, default=50, help="min training steps (compute) between interventions")
    g.add_argument("--max_interventions", type=int, default=3, help="AutoNPO interventions per run at most")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval_every", type=int, default=50, help="evaluate every N steps (and at the start and end)")
    g.add_argument("--eval_samples", type=int, default=4, help="k: samples per eval prompt at the training temperature")
    g.add_argument("--save_every", type=int, default=100, help="training-state checkpoint every N steps (0: off)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="complete checkpoints kept on disk")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--no_save_model", action="store_true", help="skip the final save_pretrained")
    g.add_argument("--quiet", action="store_true", help="no per-step lines")
    g.add_argument("--report_to", default="none", choices=["none", "tensorboard", "wandb"], help="records also to "
                   "TensorBoard (<out>/tensorboard) or W&B ($WANDB_PROJECT; WANDB_MODE=offline)")
    g.add_argument("--sft_steps", type=int, default=600, help="SFT optimizer steps")
    g.add_argument("--sft_batch_size", type=int, default=64, help="SFT sequences per step, all ranks")
    return resolve_defaults(p.parse_args(argv), p)

def is_vision_language(model):
    """An image-text checkpoint (its config has a vision_config), or the embedded 'tiny-vl'."""
    return "vision_config" in npo_data.model_config(model)

def resolve_defaults(args, p):
    """Every flag checked, then size-dependent defaults: CPU-sized for the embedded model, real-run values otherwise."""
    for flag, least in dict(group_size=2, prompts_per_step=1, guide_samples=1, max_new_tokens=1, micro_batch_size=1,
                            ppo_epochs=1, eval_every=1, ring_every=1, ring_size=1, keep_checkpoints=1, sft_batch_size=1,
                            trigger_window=2, stagnation_window=3).items():
        if getattr(args, flag) is not None and getattr(args, flag) < least:  # (None: a size-dependent default)
            p.error(f"--{flag} {getattr(args, flag)}: must be at least {least}"
                    + (" (GRPO compares each sample with the others of its group)" * (flag == "group_size")))
    if not (args.temperature > 0 and 0 < args.top_p <= 1):
        p.error("--temperature must be above 0 and --top_p in (0, 1] (evaluation is greedy whatever they are)")
    pick = lambda small, real: small if npo_data.is_embedded(args.model) else real  # noqa: E731
    args.data = args.data or ("count" if is_vision_language(args.model) else "mul")
    args.lr = args.lr or pick(1e-3 if args.mode == "sft" else 3e-5, 1e-6)
    args.steps = args.steps or pick(300, 500)
    args.max_new_tokens = args.max_new_tokens or pick(8, 4096)
    args.max_prompt_tokens = args.max_prompt_tokens or pick(128, 4096)
    args.prompts_per_step = args.prompts_per_step or pick(32, 256)
    args.minibatch_size = args.minibatch_size or args.prompts_per_step * args.group_size // 2
    args.micro_batch_tokens = pick(0, 16384) if args.micro_batch_tokens is None else args.micro_batch_tokens
    if args.rollout == "auto":  # vLLM's fixed cost per engine step outweighs a whole HF generate for tiny answers
        short = npo_data.is_embedded(args.model) and args.max_new_tokens <= 32
        args.rollout = "vllm" if importlib.util.find_spec("vllm") and not short else "hf"
    npo_data.gpus_unusable()
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    args.attn = args.attn or ("flash_attention_2" if npo_data.flash_attention_works() else "sdpa")
    args.ring_dir = args.ring_dir or os.path.join(args.out, "ring")
    args.uses_ring = args.mode in ("npo", "autonpo") and args.guide_source == "future"  # rollbacks need the ring
    args.min_delta = args.ring_every if args.min_delta is None else args.min_delta
    if args.guide_source != "future" and (args.mode != "npo" or args.bootstrap_delta or args.breakthrough_at):
        p.error(f"--guide_source {args.guide_source} injects at every step without rollbacks: use it with "
                "--mode npo and no --bootstrap_delta / --breakthrough_at")
    if args.mode == "npo" and args.guide_source == "future" and not (args.bootstrap_delta or args.breakthrough_at):
        p.error("--mode npo needs --bootstrap_delta and/or --breakthrough_at with --breakthrough_delta")
    if not isinstance(args.chat_template_kwargs, dict):
        p.error(f"--chat_template_kwargs must be a JSON object, e.g. '{{\"enable_thinking\": false}}'")
    if args.pack and is_vision_language(args.model):
        p.error("--pack is for text models (a VL model computes its M-RoPE positions per padded row)")
    if args.breakthrough_at and not 0 < args.breakthrough_delta <= args.breakthrough_at:
        p.error("--breakthrough_delta must be in 1..--breakthrough_at")
    reach = args.ring_every * (args.ring_size - 1)
    if max(args.bootstrap_delta, args.breakthrough_delta) > reach:
        p.error(f"Delta is larger than the ring buffer reaches back (--ring_every x (--ring_size - 1) = {reach})")
    return args


# ======== 2. The run's state ===================================================================
# Trainer: what every loop reads, built by setup(). NPOState: what NPO carries across steps (checkpointed).
@dataclass
class Trainer:
    args: argparse.Namespace = None
    rank: int = 0
    world: int = 1
    device: torch.device = None
    tokenizer: object = None
    processor: object = None         # VL: images -> pixel_values; None for a text model
    model: torch.nn.Module = None    # the policy, FSDP2-sharded, fp32 master weights
    ref_model: torch.nn.Module = None  # frozen initial policy, only with --kl_coef > 0
    params: int = 0                  # N (disk, logs); model FLOPs count flop_params
    flop_params: tuple = (0, 0)      # (N_body, N_head): the matmuls per token of the decoder and of the LM head
    optim: torch.optim.Optimizer = None
    sched: object = None
    engine: dict = None              # rollout engine (make_engine)
    train_rows: list = None          # dataset rows (dicts with 'messages', the answer, optional images)
    train_prompts: list = None       # their chat prompts as token ids
    eval_rows: list = None
    eval_prompts: list = None
    references: dict = field(default_factory=dict)  # {external / teacher: {row: solutions}}, made once per row
    resumed: dict = None             # the checkpoint's extras when the run resumed

@dataclass
class NPOState:
    ring: list = field(default_factory=list)          # ring buffer: [{"step", "name"}] of snapshot files
    mistake_pool: list = field(default_factory=list)  # (step, row): groups with no correct sample
    replay: list = field(default_factory=list)        # (step, row, ids, logps): past successes
    guide_pool: dict = field(default_factory=dict)    # {row: [guide's correct (ids, logps)]}
    guide_until: int = 0                              # the guide pool serves steps before this one
    manual_done: list = field(default_factory=list)   # manual NPO: 'bootstrap', 'breakthrough' done
    interventions: int = 0
    last_intervention: int = None                     # compute step of the last one (cooldown; None: elapsed)
    pending: str = None                               # a trigger that fired before the ring had a candidate
    history: dict = field(default_factory=lambda: {"reward": [], "entropy": [], "all_wrong": []})
    compute_steps: int = 0                            # training steps run, replayed ones included
    generated_tokens: int = 0
    compute_flops: float = 0.0                        # model FLOPs, guide sampling and Q/V scoring included
    eval_flops: float = 0.0                           # held-out evaluation's, apart: "per compute" is training


# ======== 3. Distributed =======================================================================
# Always a process group (a world of one for `python npo.py`): one process runs torchrun's FSDP2 code.
def setup_distributed():
    """Returns (rank, world_size, device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend, timeout = ("nccl" if cuda else "gloo"), datetime.timedelta(minutes=30)
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group(backend, timeout=timeout)
        else:  # a world of one: an in-process store, no port and no environment variables
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device

def all_reduce(values, device, op="sum"):
    """Sum (op="max": max) a list of floats over ranks in one collective; min(x) = -max(-x)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()

def merge_stats(total, new):
    """The one rule for combining step statistics (micro-batches, then ranks): a key ending in _max
    takes the max, _min the min, every other key is a sum. Values may be numbers or 0-d tensors on
    the device: the hot loop never waits for the GPU to hand it a number."""
    for k, v in new.items():
        if k not in total:
            total[k] = v
        elif k.endswith(("_max", "_min")):
            both = [torch.as_tensor(x, dtype=torch.float64) for x in (total[k], v)]
            total[k] = (torch.maximum if k.endswith("_max") else torch.minimum)(*both)
        else:
            total[k] = total[k] + v
    return total

def reduce_stats(stats, device):
    """merge_stats over ranks: two collectives, and the one copy to the host. Every rank must hold the same keys."""
    keys = sorted(stats)
    sign = torch.tensor([-1.0 if k.endswith("_min") else 1.0 for k in keys], dtype=torch.float64, device=device)
    ext = torch.tensor([k.endswith(("_max", "_min")) for k in keys], device=device)      # min(x) = -max(-x)
    x = sign * torch.stack([torch.as_tensor(stats[k], dtype=torch.float64).to(device) for k in keys])
    sums, maxes = torch.where(ext, 0.0, x), torch.where(ext, x, -math.inf)
    dist.all_reduce(sums)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    return dict(zip(keys, (sign * torch.where(ext, maxes, sums)).tolist()))

def peak_memory(trainer):
    """The trainer's own peak GPU memory since the engine last went to sleep, in GB, max over ranks ({} on a CPU).
    torch's counters include the engine (vLLM's weights and KV cache are tensors in a pool that sleep only unmaps;
    the HF engine's copy): what it held when built is taken off."""
    if trainer.device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(trainer.device) - trainer.engine["bytes"]
    return {"gpu_mem_peak_gb": all_reduce([peak / 1e9], trainer.device, "max")[0]}

def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


# ======== 4. Model and tokenizer ===============================================================
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # --dtype: trainer compute (master weights fp32), engine, sync

def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok

def load_processor(path, args):
    """A vision-language checkpoint's processor (data.py: images -> model inputs); None for text."""
    return npo_data.load_processor(path, args.min_pixels, args.max_pixels) if is_vision_language(path) else None

def load_hf_model(path, dtype, attn, device):
    """A causal LM, or an image-text model (Qwen3-VL, Qwen2.5-VL) for a vision-language checkpoint."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    auto = AutoModelForImageTextToText if is_vision_language(path) else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)

def load_policy(path, args, device):
    """The trainable policy: fp32 master weights, FSDP2-sharded per decoder layer and vision block (the
    classes in _no_split_modules), then the root; compute in --dtype, gradients reduced in fp32."""
    model = load_hf_model(path, torch.float32, args.attn, device).train()  # from_pretrained gives eval mode, in
    if args.grad_ckpt:  # which transformers' layers never checkpoint (and real configs have no dropout)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if args.vision_frozen:
        if not hasattr(model.model, "visual"):
            raise SystemExit(f"error: --vision_frozen: {path} has no vision tower")
        model.model.visual.requires_grad_(False)
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[args.dtype], reduce_dtype=torch.float32)
    units = set(model._no_split_modules or [])
    for module in list(model.modules()):
        if type(module).__name__ in units:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model

def save_hf_model(model, tokenizer, path):
    """save_pretrained of the current policy (all ranks gather, rank 0 writes; tmp + rename)."""
    rank0 = dist.get_rank() == 0
    sd = {k: v.cpu() for k, v in policy_weights(model, torch.float32) if rank0}
    if rank0:
        shutil.rmtree(path + ".tmp", ignore_errors=True)
        model.save_pretrained(path + ".tmp", state_dict=sd)
        tokenizer.save_pretrained(path + ".tmp")
        shutil.rmtree(path, ignore_errors=True)
        os.replace(path + ".tmp", path)
    dist.barrier()

def model_path(args):
    """--model as something from_pretrained can load (the embedded model is built once, in --out)."""
    if args.model not in ("tiny", "tiny-vl"):
        return args.model
    path = os.path.join(args.out, "tiny_init")
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        npo_data.build_tiny(path, seed=args.seed, vision=args.model == "tiny-vl")
    dist.barrier()
    return path


# ======== 5. Data ==============================================================================
# rows -> chat prompts -> batches, in data.py: prepare_data, the data order (prompts_for_step), make_batch, VL inputs.
def step_rows(trainer, step, per_step=None):
    """This rank's rows of `step` under the run's settings (per_step: rows per step over all ranks, if not RL's)."""
    a, n = trainer.args, len(trainer.train_rows)
    return npo_data.prompts_for_step(step, n, per_step or a.prompts_per_step, a.seed, trainer.rank, trainer.world)

# ======== 6. Rollout engine and rewards ========================================================
# vllm: a colocated engine per rank (TP=1, the torchrun group reused), weights pushed in after every step; hf: an
# unsharded transformers copy. Both return the sampled tokens' log-probs. Sampling: n per prompt (temperature 0: greedy).
Sampling = namedtuple("Sampling", "n temperature top_p max_new_tokens eos_id pad_id batch_size", defaults=[512])

def sampling(trainer, n, greedy=False):
    """The run's Sampling for n samples per prompt (greedy: the held-out pass@1)."""
    a, tok = trainer.args, trainer.tokenizer
    return Sampling(n, 0.0 if greedy else a.temperature, 1.0 if greedy else a.top_p, a.max_new_tokens,
                    tok.eos_token_id, tok.pad_token_id, a.gen_batch_size)

def make_engine(path, args, device, max_images=0, processor=None):
    """The rollout engine, sampling in the trainer's compute dtype (for vLLM, `max_images`: the most
    images one prompt of the data has; `processor`: the trainer's, whose resize bounds it must use)."""
    dtype = DTYPES[args.dtype]
    if args.rollout == "hf":
        model = load_hf_model(path, dtype, args.attn, device).eval()
        return {"kind": "hf", "model": model, "dtype": dtype, "sleep_mode": False, "runner": "transformers generate"}
    return make_vllm_engine(path, args, device, dtype, max_images, processor)

def make_vllm_engine(path, args, device, dtype, max_images=0, processor=None):
    """One vLLM engine per rank inside the training process (vLLM 0.32). dtype is explicit: with 'auto' vLLM runs an
    fp32 checkpoint in bf16 where the CPU has it, and sampling then disagrees with training before any update."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process (external launcher)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    cpu_env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TORCHDYNAMO_DISABLE": "1"}
    for k, v in cpu_env.items() if device.type == "cpu" else ():  # else each CPU engine takes ~20 GiB, 100x slower
        os.environ.setdefault(k, v)
    from vllm import LLM
    # warnings on every weight reload / generate call that mean nothing here (rotary embeddings have no checkpoint
    # weights; vLLM-CPU pins torch's threads itself). A filter: vLLM's logging set-up resets their levels.
    for name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.worker.cpu_worker"):
        logging.getLogger(name).addFilter(lambda record: record.levelno >= logging.ERROR)
    # the external launcher reads torchrun's variables: lent to a plain `python npo.py` for the construction only
    lent = {k: v for k, v in (("RANK", str(dist.get_rank())), ("LOCAL_RANK", "0"),
                              ("WORLD_SIZE", str(dist.get_world_size()))) if k not in os.environ}
    os.environ.update(lent)
    mm = {"limit_mm_per_prompt": {"image": max_images, "video": 0}} if is_vision_language(path) else {}
    if mm and (args.min_pixels or args.max_pixels):
        mm["mm_processor_kwargs"] = {"size": npo_data.pixel_bounds(processor or load_processor(path, args))}
    try:
        llm = LLM(model=path, dtype=dtype, seed=args.seed * 1000 + dist.get_rank(), **mm,
                  distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                  max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                  logprobs_mode="processed_logprobs",  # after temperature / top-p: the sampler's log-probs
                  enforce_eager=device.type == "cpu", gpu_memory_utilization=args.vllm_memory or 0.5,  # (setup sizes it)
                  enable_sleep_mode=device.type == "cuda", enable_prefix_caching=True,
                  enable_chunked_prefill=device.type == "cuda")  # (CPU generators cannot rewind a split prefill)
    finally:
        for k in lent:
            os.environ.pop(k, None)
    config = llm.llm_engine.model_config.hf_config
    runner = "V2" if llm.llm_engine.vllm_config.use_v2_model_runner and device.type == "cuda" else "V1"  # (CPU: V1)
    kv = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * llm.llm_engine.vllm_config.cache_config.block_size
    # VL: vision tokens never sampled, by a -1e9 bias as the trainer masks them (vLLM's OpenAI server floor, -100, is
    # no ban). Not allowed_token_ids: Model Runner V2 takes <= 1024 (gpu/sample/logit_bias.py), a real vocabulary 151k.
    banned = npo_data.vision_token_ids(config)
    return {"kind": "vllm", "llm": llm, "dtype": dtype, "sleep_mode": device.type == "cuda", "asleep": False,
            "vision": bool(mm), "image_token_id": getattr(config, "image_token_id", None),
            "bias": {i: -1e9 for i in banned} or None, "runner": f"model runner {runner}, KV cache for {kv:,} tokens: "
            f"{kv // (args.max_prompt_tokens + args.max_new_tokens)} sequences of the longest prompt and response"}

def vllm_control(engine, action, weights=None):
    """Every call whose spelling depends on the vLLM version, in one place (pinned: 0.32.0). load: reload (HF name,
    tensor) pairs in place, then drop prefixes (and image features) cached with the old weights; sleep: level 2
    (weights discarded: the next load overwrites them all; KV cache freed); close (also destroys the process group)."""
    llm = engine["llm"]
    if action == "sleep" and not engine["asleep"]:
        llm.sleep(level=2)
        engine["asleep"] = True
    elif action == "close":
        llm.llm_engine.engine_core.shutdown()
    elif action == "load":
        if engine["asleep"]:  # weights first, KV cache after the load: the trainer's memory stays free
            llm.wake_up(tags=["weights"])
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        llm.reset_prefix_cache()
        if engine["vision"]:  # without it: "encoder cache miss"
            llm.llm_engine.reset_encoder_cache()
            llm.reset_mm_cache()
        if engine["asleep"]:
            llm.wake_up(tags=["kv_cache"])
            engine["asleep"] = False

def policy_weights(model, dtype):
    """(HF name, full tensor) pairs of the FSDP2 policy, one parameter at a time, cast before the
    all-gather: peak memory is one full parameter. Every rank must consume it in the same order."""
    for name, t in model.state_dict().items():
        t = t.detach().to(dtype)
        yield name, t.full_tensor() if isinstance(t, DTensor) else t

@torch.no_grad()
def sync_weights(engine, model):
    """Push the trainer's current weights into the engine (every rank calls this)."""
    weights = policy_weights(model, engine["dtype"])
    if engine["kind"] == "hf":
        engine["model"].load_state_dict(dict(weights))
    else:
        vllm_control(engine, "load", weights)

def sleep_engine(engine):
    """Free the engine's GPU memory for training (vLLM on GPU; the next sync_weights wakes it), and start counting the
    trainer's peak memory (peak_memory)."""
    if engine["sleep_mode"]:
        vllm_control(engine, "sleep")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

def close_engine(engine):
    if engine["kind"] == "vllm":
        vllm_control(engine, "close")

@torch.no_grad()
def generate(engine, prompts, spec, vision=None):
    """spec.n responses per prompt (token ids; `vision`: per prompt, from data.vision_inputs()) as a
    prompt-major list (prompt i, sample j at i*n + j) of (response ids, sampling log-probs): those of
    the distribution the sampler drew from (logits / T renormalised over the top-p nucleus; greedy:
    T = 1), which importance ratios are taken against. Draws from torch's RNG (vLLM: a seed drawn
    from it), so a resumed run samples what the uninterrupted one did. No prompts: []."""
    if not prompts:
        return []
    if engine["kind"] == "vllm":
        return _generate_vllm(engine, prompts, spec, vision)
    return _generate_hf(engine, prompts, spec, vision)

def _generate_vllm(engine, prompts, spec, vision=None):
    from vllm import SamplingParams
    if engine["asleep"]:
        raise RuntimeError("the vLLM engine is asleep (its weights discarded): sync_weights() first")
    greedy = spec.temperature == 0
    # a seed per request: vLLM seeds sample j with seed + j, one seed per call correlates every prompt's samples
    sp = [SamplingParams(n=spec.n, temperature=spec.temperature, top_p=1.0 if greedy else spec.top_p,
                         max_tokens=spec.max_new_tokens, stop_token_ids=[spec.eos_id], logprobs=0,
                         seed=None if greedy else seed, logit_bias=engine["bias"])  # VL: no vision tokens
          for seed in torch.randint(2**31 - 1, (len(prompts),)).tolist()]
    requests = [{"prompt_token_ids": p} for p in prompts]
    for req, v in zip(requests, vision or []):
        if v is not None:  # vLLM expands each image's placeholder itself: one token per image
            img, p = engine["image_token_id"], req["prompt_token_ids"]
            req["prompt_token_ids"] = [t for i, t in enumerate(p) if not (t == img and i and p[i - 1] == img)]
            req["multi_modal_data"] = {"image": v["images"]}
    res = []
    for o in engine["llm"].generate(requests, sp, use_tqdm=False):
        for c in sorted(o.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            res.append((ids, [d[t].logprob for d, t in zip(c.logprobs, ids)]))
    return res

def _generate_hf(engine, prompts, spec, vision=None):
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
    model, greedy = engine["model"], spec.temperature == 0
    device = next(model.parameters()).device
    # every knob explicit: a None is filled from generation_config or transformers' defaults (top_k=50). Temperature
    # and top-p are our processors, then the one keeping each sampled token's log-prob (generate's would come last)
    cfg = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else 1.0, top_p=None if greedy else 1.0,
        top_k=None if greedy else 0, repetition_penalty=1.0, max_new_tokens=spec.max_new_tokens,
        num_return_sequences=spec.n, eos_token_id=spec.eos_id, pad_token_id=spec.pad_id,
        suppress_tokens=npo_data.vision_token_ids(model.config) or None)
    warp = [] if greedy else [TemperatureLogitsWarper(spec.temperature), TopPLogitsWarper(spec.top_p)]
    out, per_call = [], max(1, spec.batch_size // spec.n)
    for s in range(0, len(prompts), per_call):
        ids, mask = (x.to(device) for x in npo_data.left_pad(prompts[s:s + per_call], spec.pad_id))  # [b, P]
        vis = npo_data.vision_kwargs(vision[s:s + per_call], ids, model.config.image_token_id, device) if vision else {}
        chosen, last = [], []  # one step's [b*n, V] log-probs at a time, never all R of them

        def keep_logprob(input_ids, scores):  # what the sampler draws from; the token drawn is known a step later
            if last:
                chosen.append(last.pop().gather(-1, input_ids[:, -1:]))
            last.append(torch.log_softmax(scores.float(), dim=-1))
            return scores
        seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, **vis,
                              logits_processor=LogitsProcessorList([*warp, keep_logprob]))
        new = seqs[:, ids.shape[1]:]                                                 # [b*n, R]
        logps = torch.cat(chosen + [last.pop().gather(-1, new[:, -1:])], dim=1).cpu()  # [b*n, R]
        for k, toks in enumerate(new.tolist()):
            length = toks.index(spec.eos_id) + 1 if spec.eos_id in toks else len(toks)
            out.append((toks[:length], logps[k, :length].tolist()))
    return out

def score_responses(tokenizer, rows, samples, n):
    """Verifier reward of each sample (prompt-major, n per row). [] for none (transformers'
    batch_decode([]) returns [''])."""
    if not samples:
        return []
    texts = tokenizer.batch_decode([ids for ids, _ in samples], skip_special_tokens=True)
    return [verifier.reward(t, rows[k // n]) for k, t in enumerate(texts)]

def evaluate(trainer, rows=None, prompts=None):
    """Held-out greedy pass@1 and mean accuracy of k samples at the training temperature, over all
    ranks (each rank takes every world-th prompt)."""
    if rows is None:
        rows, prompts = trainer.eval_rows, trainer.eval_prompts
    mine = list(range(trainer.rank, len(rows), trainer.world))
    my_rows, my_prompts = [rows[i] for i in mine], [prompts[i] for i in mine]
    vision, k = npo_data.vision_inputs(trainer.processor, my_rows), trainer.args.eval_samples
    greedy = generate(trainer.engine, my_prompts, sampling(trainer, 1, greedy=True), vision)
    g, s = sum(score_responses(trainer.tokenizer, my_rows, greedy, 1)), 0.0
    tokens = sum(map(len, my_prompts)) + sum(len(ids) for ids, _ in greedy)
    if k > 0:
        sampled = generate(trainer.engine, my_prompts, sampling(trainer, k), vision)
        s = sum(score_responses(trainer.tokenizer, my_rows, sampled, k))
        tokens += sum(map(len, my_prompts)) + sum(len(ids) for ids, _ in sampled)
    g, s, n, tokens = all_reduce([g, s, len(mine), tokens], trainer.device)
    return {"eval_greedy": g / max(n, 1), f"eval_mean@{k}": s / max(n * k, 1), "eval_k": k, "eval_n": int(n),
            "eval_tokens": int(tokens)}


# ======== 7. Advantages and loss ===============================================================
# Pure functions on tensors, each tested against an independent reference.
def grpo_advantages(rewards, scale="group", eps=1e-6):
    """GRPO advantages, [B, G] -> [B, G]: group: (r - mean) / (std + eps), std unbiased as in the
    GRPO paper's code; none: r - mean (Dr. GRPO). A group of equal rewards carries no signal: 0.

    >>> grpo_advantages(torch.tensor([[1., 0., 0., 0.], [1., 1., 1., 1.]])).round(decimals=2)
    tensor([[ 1.5000, -0.5000, -0.5000, -0.5000],
            [ 0.0000,  0.0000,  0.0000,  0.0000]])
    """
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv

def zero_signal_groups(rewards):
    """[B] bool: groups whose rewards are all equal (all right or all wrong)."""
    return (rewards == rewards[:, :1]).all(dim=1)

def token_logprobs(logits, tokens):
    """log p(token), [N, T, V] and [N, T] -> [N, T]; gather - logsumexp keeps no [N, T, V] log-softmax."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)

def token_entropy(logits):
    """Entropy of softmax(logits) per position, [N, T, V] -> [N, T]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)

def aggregate(per_token, mask, mode="token-mean", denom=None):
    """Average a per-token quantity over the tokens in `mask` ([N, T] each). token-mean: sum over tokens / number of
    tokens; seq-mean-token-mean: mean of per-sequence means. `denom` replaces the count with the whole minibatch's
    (all micro-batches, all ranks / world), so that gradient accumulation and FSDP's averaging give exactly the global
    mean. An empty mask gives 0, and `where` keeps NaN/inf at padded positions out."""
    mask = mask.bool()
    x = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "token-mean":
        return x.sum() / max(float(mask.sum() if denom is None else denom), 1.0)
    if mode == "seq-mean-token-mean":
        n_tok = mask.sum(dim=1)
        seq_mean = x.sum(dim=1) / n_tok.clamp(min=1)
        return seq_mean.sum() / max(float((n_tok > 0).sum() if denom is None else denom), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")

def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1

def tis_weights(old_logp, behav_logp, mask, cap):
    """Truncated importance sampling for the train/inference mismatch: the sampler (other kernels,
    bf16) is not exactly the policy the trainer differentiates, so each on-policy token gets the
    detached weight min(pi_old / pi_sampler, cap), 0 outside `mask`. Returns (weights [N, T], stats)."""
    ratio = torch.exp(old_logp - behav_logp)                                         # [N, T]
    m = mask.bool()
    stats = {"tis_tokens": m.sum(), "tis_ratio_sum": torch.where(m, ratio, 0).sum(),
             "tis_capped_sum": (m & (ratio > cap)).sum(), "tis_ratio_max": torch.where(m, ratio, -math.inf).max(),
             "tis_ratio_min": torch.where(m, ratio, math.inf).min()}
    return torch.where(m, ratio.clamp(max=cap), 0.0), stats  # (an empty mask: max -inf, min inf, as merge_stats starts)

def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, agg="token-mean", denom=None,
                guide_mask=None, guide_logp=None, guide_ratio="none", is_weight=None):
    """The clipped surrogate on a batch that mixes on-policy and guide samples. Returns (loss, stats).

    logp, old_logp: [N, T] log pi_theta (with grad) and log pi_old (recomputed before the update)
    advantages [N] (one per sequence); mask [N, T]: the tokens that count
    guide_mask [N, T]: tokens written by the guide; guide_logp [N, T]: the guide's log-probs of them
    guide_ratio, how guide tokens are weighted:
        none:  pi_theta / pi_old, as for every token (NPO as its first author runs it; RLEP)
        clip:  pi_theta / pi_guide, PPO-clipped (an importance ratio to the guide)
        shape: LUFFY's p / (p + 0.1) in place of the ratio, unclipped
    is_weight [N, T]: detached weights on on-policy tokens (truncated importance sampling)
    Per token -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), averaged by aggregate(). The stats,
    split into on-policy and guide tokens, are sums (and _max / _min) that merge_stats combines."""
    guide = (guide_mask if guide_mask is not None else torch.zeros_like(mask)).bool() & mask.bool()
    on = mask.bool() & ~guide
    adv = advantages.unsqueeze(-1).to(logp.dtype)                                    # [N, 1]
    anchor = torch.where(guide, guide_logp, old_logp) if guide_ratio == "clip" and guide_logp is not None else old_logp
    log_ratio = logp - anchor                                                        # [N, T]
    ratio = torch.exp(log_ratio)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if guide_ratio == "shape":
        p = torch.exp(logp)
        per_token = torch.where(guide, -(p / (p + 0.1)) * adv, per_token)
    if is_weight is not None:
        per_token = torch.where(on, per_token * is_weight, per_token)
    loss = aggregate(per_token, mask, agg, denom)

    with torch.no_grad():  # 0-d tensors, brought to the host once per step (reduce_stats)
        hit = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
        approx_kl = (ratio - 1) - log_ratio          # k3 of KL(pi_old || pi_theta), cleanrl's health check
        stats = {"on_approx_kl_sum": torch.where(on, approx_kl, 0).sum()}
        for name, part in (("on", on), ("guide", guide)):
            stats.update({f"{name}_tokens": part.sum(), f"{name}_clipfrac_sum": (hit & part).sum(),
                          f"{name}_ratio_sum": torch.where(part, ratio, 0).sum(),
                          f"{name}_ratio_max": torch.where(part, ratio, -math.inf).max(),   # -inf: no such token
                          f"{name}_ratio_min": torch.where(part, ratio, math.inf).min()})
    return loss, stats


# ======== 8. Training step =====================================================================
# rollout batch -> micro-batches of similar length -> old log-probs -> minibatch PPO updates
def micro_batches(batch, idx, args, device, pad_limit=1.15):
    """Sequences `idx` of `batch` (None: none) in micro-batches of similar length: sorted by length, each at most
    --micro_batch_size sequences, --micro_batch_tokens processed tokens (0: no cap; a longer sequence goes alone)
    and `pad_limit` x its real tokens (rows pad to the longest). Only the order of accumulation changes, never a
    minibatch's membership. FSDP needs the same forward calls on every rank: the list is filled up with None (a
    zero-weight pass, filler_pass) to the longest over ranks."""
    lens = batch["attention_mask"][idx].sum(1).tolist() if batch is not None else []  # prompt + response lengths
    plan, cur, total = [], [], 0
    for k in sorted(range(len(lens)), key=lambda k: lens[k]):  # k is the longest so far: rows pad to its length
        processed = total + lens[k] if args.pack else (len(cur) + 1) * lens[k]
        if cur and (len(cur) == args.micro_batch_size or 0 < args.micro_batch_tokens < processed
                    or processed > pad_limit * (total + lens[k])):
            plan, cur, total = plan + [cur], [], 0
        cur, total = cur + [k], total + lens[k]
    plan = [idx[torch.tensor(c)] for c in plan + [cur] if c]
    return plan + [None] * (int(all_reduce([len(plan)], device, "max")[0]) - len(plan))

LOGIT_CHUNK = 2**26  # fp32 logits of one head_logprobs chunk (256 MB)

def head_logprobs(head, hidden, tokens, temperature, banned=None, entropy=False, chunk=1024):
    """log p(token) (and the entropy) at each row of hidden [M, H] through the LM head `head` (a function), in
    fp32 at temperature T, `chunk` rows at a time: a chunk's logits are freed once used and recomputed in the
    backward (checkpoint), so no [M, V] tensor is ever held. `banned`: token ids masked as the samplers mask them."""
    def part(h, t):
        logits = head(h).float() / temperature                                      # [m, V]
        if banned:  # exp(-1e9) = 0, and the entropy stays finite
            logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), -1e9)
        return token_logprobs(logits, t), (token_entropy(logits.detach()) if entropy else logits.new_zeros(len(t)))
    parts = [checkpoint(part, h, t, use_reentrant=False) if torch.is_grad_enabled() else part(h, t)
             for h, t in zip(hidden.split(chunk), tokens.split(chunk))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

def forward_logprobs(model, batch, idx, temperature, device, entropy=False, pack=False):
    """Log-probs (and entropies) of the response tokens of sequences `idx`: [n, R] each (0 past a response's
    end), from the logits at temperature T, as the sampler used them. Each sequence is laid out from column 0
    and padded to the longest one here (pack: all back to back in one row, positions restarting, which
    flash-attn's varlen kernel and transformers' masks read as separate sequences), and the LM head runs on
    the positions that predict response tokens only (head_logprobs): no [n, R, V] logits exist."""
    P, am = batch["prompt_len"], batch["attention_mask"][idx]
    p_len, length = am[:, :P].sum(1, keepdim=True), am.sum(1, keepdim=True)          # [n, 1]
    col = torch.arange(int(length.max()))
    real, resp = col < length, (col >= p_len) & (col < length)                        # [n, W]
    ids = torch.zeros(real.shape, dtype=torch.long).masked_scatter(real, batch["input_ids"][idx][am.bool()])
    pos, rows = col.expand(real.shape), resp.roll(-1, dims=1)  # rows: predict a response token (column 0: a prompt's)
    targets = ids[resp].to(device)                                                    # [M], row-major as `rows`
    vision = [batch["vision"][i] for i in idx.tolist()] if batch.get("vision") else []
    blank = hasattr(model.config, "vision_config") and not any(vision)
    if blank:  # no image here: one blank image in an extra row, so that every rank runs the vision tower's units
        ids, real, rows = (torch.nn.functional.pad(x, (0, max(0, 3 - x.shape[1]))) for x in (ids, real, rows))
        row, v = npo_data.blank_image_row(model.config, ids.shape[1])
        ids, real, rows, vision = torch.cat([ids, row]), torch.cat([real, row > 0]), torch.cat([rows, row < 0]), [v]
    vis = npo_data.vision_kwargs(vision, ids, model.config.image_token_id, device) if vision else {}
    if pack:
        ids, pos, rows = ids[real][None], pos[real][None], rows[real][None]
    banned, head = npo_data.vision_token_ids(model.config), model.get_output_embeddings()
    chunk = max(1, LOGIT_CHUNK // head.out_features)

    def logprob_head(h):  # the model calls its head inside its forward, where FSDP has gathered it. Every chunk reads
        # one fp32 copy of the weight: their gradients add up in fp32, rounded to bf16 once, not once per chunk
        w = head.weight.float() if torch.is_grad_enabled() else head.weight
        linear = lambda x: torch.nn.functional.linear(x, w.to(x.dtype), head.bias)  # noqa: E731
        out = torch.stack(head_logprobs(linear, h[rows.to(device)], targets, temperature, banned, entropy, chunk))
        return out + 0 * h[-1].sum() if blank else out  # (the blank row's backward runs the units too)
    head.forward = logprob_head  # log-probs come back as the model's "logits"
    try:
        out = model(input_ids=ids.to(device), attention_mask=None if pack else real.long().to(device),
                    position_ids=None if vis else pos.to(device),  # a VL model computes its M-RoPE positions
                    use_cache=False, **vis)
    finally:
        del head.forward
    full = batch["attention_mask"][idx, P:].bool().to(device)                          # [n, R], row-major as resp
    lp, ent = (torch.zeros(full.shape, device=device).masked_scatter(full, x) for x in out.logits)
    return lp, (ent if entropy else None)

def filler_pass(model, batch, device, backward=True):
    """A zero-weight pass over one sequence, run by a rank with fewer micro-batches than the others in place of
    the missing ones: FSDP's all-gathers (and reduce-scatters, in backward) happen on every rank at once."""
    logp, _ = forward_logprobs(model, batch, torch.arange(1), 1.0, device)
    if backward:
        (logp.sum() * 0).backward()

@torch.no_grad()
def recompute_logprobs(model, batch, args, device, entropy=True, dummy=None):
    """Log-probs (and entropies) of every response in `batch` under the current weights: [N, R] each. `dummy` (one
    sequence) stands in on a rank with none (batch None), which still makes the other ranks' forward calls."""
    N, R = (0, 0) if batch is None else batch["resp_mask"].shape
    logps, ents = torch.zeros(N, R), torch.zeros(N, R)
    for j in micro_batches(batch, torch.arange(N), args, device):
        if j is None:
            filler_pass(model, dummy if batch is None else batch, device, backward=False)
            continue
        lp, en = forward_logprobs(model, batch, j, args.temperature, device, entropy, args.pack)
        logps[j], ents[j] = lp.cpu(), (en.cpu() if entropy else 0.0)
    return (logps if N else None), (ents if entropy and N else None)

def optimizer_step(model, optim, sched, grad_clip):
    """Clip the global gradient norm, step, zero the gradients; returns the norm before clipping (a tensor)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optim.step()
    sched.step()
    optim.zero_grad(set_to_none=True)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm).detach()

def ppo_update(model, optim, sched, batch, args, device, gen):
    """PPO epochs over minibatches of `batch` (old_logp, advantages, loss_mask and, with NPO,
    guide_mask / guide_logp). Returns the summed diagnostics (merge_stats)."""
    world, N = dist.get_world_size(), batch["input_ids"].shape[0]
    mb = max(1, args.minibatch_size // world)
    stats = {"optimizer_steps": 0}
    for _ in range(args.ppo_epochs):
        perm = torch.randperm(N, generator=gen)
        for s in range(0, N, mb):
            idx = perm[s:s + mb]
            m = batch["loss_mask"][idx]  # the minibatch's global token (or sequence) count, / world for FSDP
            count = m.sum() if args.loss_agg == "token-mean" else (m.sum(1) > 0).sum()
            denom = all_reduce([float(count)], device)[0] / world
            for j in micro_batches(batch, idx, args, device):
                if j is None:
                    filler_pass(model, batch, device)
                    continue
                take = lambda key: batch[key][j].to(device) if batch.get(key) is not None else None  # noqa: E731
                logp, _ = forward_logprobs(model, batch, j, args.temperature, device, pack=args.pack)  # [n, R]
                loss, st = policy_loss(logp, take("old_logp"), take("advantages"), take("loss_mask"), args.clip_low,
                                       args.clip_high, args.loss_agg, denom, guide_mask=take("guide_mask"),
                                       guide_logp=take("guide_logp"), guide_ratio=args.guide_ratio,
                                       is_weight=take("is_weight"))
                if args.kl_coef > 0:
                    kl = aggregate(kl_k3(logp, take("ref_logp")), take("loss_mask"), args.loss_agg, denom)
                    loss = loss + args.kl_coef * kl
                    st["kl_sum"] = kl.detach()
                loss.backward()
                merge_stats(stats, {**st, "loss_sum": loss.detach()})
            merge_stats(stats, {"grad_norm_sum": optimizer_step(model, optim, sched, args.grad_clip), "optimizer_steps": 1})
    return stats


# ======== 9. Checkpoints and the ring buffer ===================================================
# A training state on disk (checkpoint or ring snapshot) is a directory every rank sees: model and optimizer through
# torch.distributed.checkpoint (any number of ranks reads them), meta.json, rank<r>.pt (RNG, pools), renamed when
# complete. In host memory (the guide theta_t): a rank's own shards (host_copy, load_weights).
def host_copy(model):
    """Detached CPU copies of this rank's model shards (a DTensor's local one), {name: tensor}."""
    return {k: (v.to_local() if isinstance(v, DTensor) else v).detach().to("cpu", copy=True)
            for k, v in model.state_dict().items()}

@torch.no_grad()
def load_weights(copy, model):
    """Put a host_copy of this rank's model shards back into the live model."""
    params = model.state_dict()
    for name, saved in copy.items():
        ref, saved = params[name], saved.to(params[name].device)
        ref.copy_(DTensor.from_local(saved, ref.device_mesh, ref.placements, run_check=False, shape=ref.shape,
                                     stride=ref.stride()) if isinstance(ref, DTensor) else saved)

_CRASH_COUNT = {}  # crash_point: times each named moment was passed in this process

def crash_point(name):
    """For tests: with NPO_CRASH_AT=name:k[:rank] set, SIGKILL this process the k-th time it passes `name` (on that
    rank), to kill a run at an exact moment. A no-op otherwise."""
    spec = os.environ.get("NPO_CRASH_AT", "").split(":")
    if spec[0] == name and (len(spec) < 3 or int(spec[2]) == dist.get_rank()):
        _CRASH_COUNT[name] = _CRASH_COUNT.get(name, 0) + 1
        if _CRASH_COUNT[name] == int(spec[1]):
            os.kill(os.getpid(), signal.SIGKILL)

def save_state(path, model, optim, sched, step, extra=None, meta=None, crash="checkpoint"):
    """Write the training state to directory `path`, complete or absent (every rank calls this). An optimizer
    that has not stepped is written as none: asking DCP for its state would initialise it with a step."""
    rank, tmp = dist.get_rank(), path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    state = {"model": get_model_state_dict(model)}
    if optim.state:
        state["optim"] = get_optimizer_state_dict(model, optim)
    dcp.save(state, checkpoint_id=tmp)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    torch.save({"rng": rng, "extra": extra or {}}, os.path.join(tmp, f"rank{rank}.pt"))
    crash_point(crash)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "sched": sched.state_dict(), "optim": "optim" in state,
                       "world_size": dist.get_world_size(), **(meta or {})}, f)
        if not os.path.exists(path):  # (one that exists is this same state, written before a kill)
            os.replace(tmp, path)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()

def load_state(path, model, optim=None, sched=None, rng=True):
    """Read a save_state of any number of ranks into the live model (and optimizer, scheduler, this rank's RNG if it
    wrote one; weights_only: never arbitrary pickles). Returns (meta, {rank: extras}): this rank's alone when the number
    of ranks is the same, every writer's otherwise."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    state = {"model": get_model_state_dict(model)}
    if optim is not None and meta["optim"]:
        state["optim"] = get_optimizer_state_dict(model, optim)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if optim is not None:
        set_optimizer_state_dict(model, optim, state["optim"]) if meta["optim"] else optim.state.clear()
        sched.load_state_dict(meta["sched"])
        for group, lr in zip(optim.param_groups, meta["sched"]["_last_lr"]):
            group["lr"] = lr
    mine = [dist.get_rank()] if meta["world_size"] == dist.get_world_size() else range(meta["world_size"])
    ranks = {r: torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=True) for r in mine}
    if rng and dist.get_rank() in ranks:
        saved = ranks[dist.get_rank()]["rng"]
        torch.set_rng_state(saved["torch"])
        random.setstate(saved["python"])
        if torch.cuda.is_available() and "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"])
    return meta, {r: x["extra"] for r, x in ranks.items()}

def save_checkpoint(out, model, optim, sched, step, keep, compute, extra=None, ring=()):
    """checkpoints/c<compute> (save_state), named by the compute counter, which never goes back (the step does,
    at a rollback). `ring` names the ring snapshots this state refers to: one training state, not one per snapshot."""
    save_state(os.path.join(out, "checkpoints", f"c{compute:07d}"), model, optim, sched, step, extra,
               {"compute": compute, "ring": list(ring)})
    if dist.get_rank() == 0:
        for d in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(d, ignore_errors=True)
    dist.barrier()

def complete_checkpoints(out):
    """Complete checkpoint directories (renamed, with meta.json), oldest first."""
    root = os.path.join(out, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in names
            if not d.endswith(".tmp") and os.path.isfile(os.path.join(root, d, "meta.json"))]

def ring_push(ring, model, optim, sched, step, size, ring_dir, compute):
    """Add a snapshot of the training state to the ring buffer: written once, when taken, and kept by name; the
    oldest beyond `size` leave the ring. The name holds the compute counter: after a rollback the same step is
    taken again, on another branch."""
    name = f"step{step:06d}_c{compute:07d}"
    save_state(os.path.join(ring_dir, name), model, optim, sched, step, crash="ring")
    ring[:] = [e for e in ring if e["step"] != step] + [{"step": step, "name": name}]
    del ring[:-size]

def ring_path(ring, step, ring_dir):
    """The directory of the snapshot the ring holds for `step`."""
    return os.path.join(ring_dir, next(e["name"] for e in ring if e["step"] == step))

def ring_gc(ring, ring_dir, out=None):
    """Delete (rank 0) the ring snapshots that neither the ring nor the newest complete checkpoint in `out` refers to
    (a resume starts from that one; an older checkpoint resumes with the snapshots left), and half-written ones
    (ring_gc([], ring_dir): all of them, as a finished run does). At most 2 x --ring_size + 1 are ever on disk."""
    keep = {e["name"] for e in ring}
    for d in complete_checkpoints(out)[-1:] if out else []:
        try:
            with open(os.path.join(d, "meta.json")) as f:
                keep |= set(json.load(f).get("ring", []))
        except FileNotFoundError:  # being deleted
            pass
    for name in os.listdir(ring_dir) if dist.get_rank() == 0 and os.path.isdir(ring_dir) else []:
        if name not in keep:
            shutil.rmtree(os.path.join(ring_dir, name), ignore_errors=True)

def disk_needs(args, params, world):
    """Bytes on disk at the peak, by where. A snapshot (ring slot or checkpoint) is 12 B/parameter (fp32 weights, two
    Adam moments); a checkpoint adds each rank's NPO pools (up to --replay_size past successes, the longest rollback's
    guide pool, the mistake pool; 8 B a token). At once: --keep_checkpoints + 1 checkpoints; K = --ring_size ring
    snapshots + 1 being written + the K the newest checkpoint names (ring_gc); the final model, 4 B/parameter."""
    snap, tokens = 12 * params, args.max_new_tokens + 1
    guide = args.ring_every * (args.ring_size - 1) * args.prompts_per_step * args.guide_samples  # all ranks
    pools = 8 * tokens * (world * args.replay_size + guide) + 16 * world * args.pool_size
    ring = (2 * args.ring_size + 1 if args.save_every else args.ring_size + 1) * snap
    return {"checkpoints": (args.keep_checkpoints + 1) * (snap + pools) * bool(args.save_every),
            "model": 4 * params * (not args.no_save_model), "ring": ring * args.uses_ring}

def check_disk(args, params, device):
    """Stop at the start (every rank) a run whose files will not fit on its disks (disk_needs; a resume's are free)."""
    disks, msg = {}, ""
    for sub, n in disk_needs(args, params, dist.get_world_size()).items():
        at, files = (args.ring_dir, args.ring_dir) if sub == "ring" else (args.out, os.path.join(args.out, sub))
        os.makedirs(at, exist_ok=True)
        held = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(files) for f in fs)
        disk = disks.setdefault(os.stat(at).st_dev, {"at": at, "need": 0, "parts": []})
        disk["need"] += n - held
        disk["parts"].append(f"{sub} {n / 1e9:.2f} GB")
    for d in disks.values():
        if d["need"] > shutil.disk_usage(d["at"]).free:
            msg = (f"error: the run needs {d['need'] / 1e9:.1f} GB more on the disk of {d['at']} ({', '.join(d['parts'])}"
                   f" for {params / 1e9:.2f}B parameters) but {shutil.disk_usage(d['at']).free / 1e9:.1f} GB are free: "
                   "use a larger disk, --ring_dir elsewhere, a smaller --ring_size or --keep_checkpoints, or --save_every 0")
    if all_reduce([float(bool(msg))], device, "max")[0]:
        raise SystemExit(msg or "error: another rank's disk is too small for the run (see its message)")


# ======== 10. NPO: the near-future guide =======================================================
# Pure functions (injection, Q, V, S, the choice of Delta), the three sources, their Q / V / S table, rollback.
def inject_guide(rewards, samples, guide, gate=0.6):
    """Replace one incorrect on-policy sample per failing group with a verified guide sample.

    rewards [B, G]; samples: B*G entries, prompt-major; guide: per prompt a list of the guide's
    correct samples (maybe empty). A group is helped when its on-policy accuracy is below `gate`,
    it has an incorrect sample, and the guide solved the prompt: its first incorrect slot takes
    the guide's next sample (each list is rotated in place, so the prompt's next injection uses the
    next one), with reward 1. Returns (samples, rewards, is_guide [B*G]); the inputs are not modified.

    >>> r = torch.tensor([[0., 1., 0., 0.], [1., 1., 1., 0.]])  # accuracy 0.25 (< 0.6) and 0.75
    >>> s, r2, is_guide = inject_guide(r, list("abcdefgh"), [["G"], ["H"]])
    >>> "".join(s), r2[0].tolist(), is_guide.nonzero().flatten().tolist()
    ('Gbcdefgh', [1.0, 1.0, 0.0, 0.0], [0])
    """
    B, G = rewards.shape
    samples, rewards = list(samples), rewards.clone()
    is_guide = torch.zeros(B * G, dtype=torch.bool)
    for i in range(B):
        wrong = (rewards[i] < 1).nonzero().flatten().tolist()
        if rewards[i].mean().item() < gate and wrong and guide[i]:
            samples[i * G + wrong[0]] = guide[i][0]
            guide[i].append(guide[i].pop(0))
            rewards[i, wrong[0]] = 1.0
            is_guide[i * G + wrong[0]] = True
    return samples, rewards, is_guide

def signal_quality(source_solved, learner_solved):
    """Q, what the source knows that the learner does not: on prompts the learner failed (no
    correct sample in its group), the mean of d = solved by the source - solved by the learner
    itself with the same m samples (one bool per prompt each). Q(guide = learner) is 0 in
    expectation. Returns (Q, its standard error, moments [n, sum d, sum d^2] to combine ranks)."""
    d = [float(a) - float(b) for a, b in zip(source_solved, learner_solved)]
    mom = [float(len(d)), sum(d), sum(x * x for x in d)]
    return (*quality_from_moments(mom), mom)

def quality_from_moments(mom):
    """(Q, SE) from [n, sum d, sum d^2] summed over ranks; SE from the unbiased variance."""
    n, s1, s2 = mom
    if n == 0:
        return 0.0, 0.0
    q = s1 / n
    return q, math.sqrt((max(s2 - n * q * q, 0.0) / (n - 1) if n > 1 else 0.0) / n)

def variance_cost(logp_policy, logp_source, mask):
    """V, the variance a source's importance weights add to this trainer's token-level gradient. Each token of the
    source's trajectories has a weight w = pi_policy / pi_source (d = log w), and V = E[w^2] / E[w]^2 over them (1 +
    the weights' squared coefficient of variation: the factor by which they inflate a token mean's variance). 1
    on-policy exactly (d = 0), growing with the per-token distance (exp(Var d) for normal d), the same at 40 and at
    4096 tokens. Diagnostic: the whole-trajectory value, exp(Var L) with L the sum of d over a trajectory, which grows
    with the length (e^190 at 4096 tokens at the near future's per-token variance). Inputs [N, T]; returns moments
    [tokens, sum w, sum w^2, trajectories, sum L, sum L^2] to add over ranks (variance_from_moments)."""
    m = mask.bool()
    d = torch.where(m, (logp_policy - logp_source).double(), 0.0)                    # [N, T]
    w = torch.where(m, torch.exp(d), 0.0)
    L = d.sum(dim=1)[m.any(dim=1)]                                                   # [N'] log w of a trajectory
    return [float(m.sum()), w.sum().item(), (w * w).sum().item(), float(len(L)), L.sum().item(), (L * L).sum().item()]

def variance_from_moments(mom):
    """(V per token, Var L = ln of the whole-trajectory V) from variance_cost's moments added over ranks (NaN, NaN
    without a token)."""
    n, w1, w2, k, l1, l2 = mom
    if not n:
        return float("nan"), float("nan")
    return n * w2 / (w1 * w1), (max(l2 - l1 * l1 / k, 0.0) / (k - 1) if k > 1 else 0.0)

def effective_signal(q, v):
    """S = Q / V; 0 when V is NaN (no correct trajectory of the source to measure V on) or infinite."""
    return q / v if v == v and v < math.inf else 0.0

def select_delta(table, min_delta=1, z=2.0):
    """AutoNPO's choice among Q / V / S rows (one per Delta >= min_delta): among the Deltas whose Q is above 0 by z
    standard errors, Bonferroni-corrected for the K candidates (the best of K noisy estimates clears a plain z bar
    far more often than 1 - Phi(z)), the largest S (ties: the smaller Delta). A null or negative Q never wins by a
    larger V. (row, None), or (None, why): no evidence that any guide knows more, and a rollback costs steps."""
    rows = [r for r in table if r["delta"] >= min_delta]
    if not rows:
        return None, f"no candidate snapshot with Delta >= {min_delta}"
    z_k = NormalDist().inv_cdf(1 - NormalDist().cdf(-z) / len(rows))                 # z for 1 of K
    strong = [r for r in rows if r["Q"] > z_k * r["Q_se"]]
    if not strong:
        best = max(rows, key=lambda r: r["Q"] / max(r["Q_se"], 1e-12))
        return None, (f"no Delta's Q is above 0 by {z_k:.2f} standard errors (z {z:g}, Bonferroni over {len(rows)}"
                      f" candidates); closest: Delta {best['delta']}, Q {best['Q']:.3f} +- {best['Q_se']:.3f}")
    return max(strong, key=lambda r: (r["S"], -r["delta"])), None


# ---- the sources: near future, past successes, external references, a distant teacher, the learner itself -------
def sample_correct(trainer, rows_idx):
    """m verified samples per prompt from the policy the engine holds (the guide theta_t, or a learner
    theta_s: what it solves itself). Returns ({row: [correct (ids, logps)]}, generated tokens)."""
    m, rows_idx = trainer.args.guide_samples, sorted(set(rows_idx))
    rows = [trainer.train_rows[i] for i in rows_idx]
    samples = generate(trainer.engine, [trainer.train_prompts[i] for i in rows_idx], sampling(trainer, m),
                       npo_data.vision_inputs(trainer.processor, rows))
    rewards = score_responses(trainer.tokenizer, rows, samples, m)
    correct = {i: [samples[k * m + j] for j in range(m) if rewards[k * m + j] >= 1] for k, i in enumerate(rows_idx)}
    return correct, sum(len(ids) for ids, _ in samples)

def past_solutions(replay, mistake_pool, rows_idx, m, group, before=None):
    """The past source (replay, as ExGRPO / RLEP) on the other sources' budget of m samples: a row's newest visit before
    step `before` (any when None) drew `group` samples, c of them correct (c = 0: a mistake-pool entry); it offers at
    most m of them and solves the row with probability 1 - C(group - c, m) / C(group, m), as m of them would. replay:
    (step, row, ids, logps), logps the trainer's then. Returns ({row: [(ids, logps)]}, {row: that probability})."""
    rows, visits = set(rows_idx), {}
    for step, row, *traj in [*replay, *mistake_pool]:
        if row in rows and (before is None or step < before):
            visits.setdefault(row, {}).setdefault(step, []).extend([tuple(traj)] if traj else [])
    newest = {i: v[max(v)] for i, v in visits.items()}
    solved = {i: 1 - math.comb(group - len(newest.get(i, [])), m) / math.comb(group, m) if i in newest else 0.0
              for i in rows}
    return {i: newest.get(i, [])[:m] for i in rows}, solved

def reference_solutions(trainer, rows_idx, source="external"):
    """An external source (LUFFY-like), log pi_source = 0 on every token (a teacher whose probabilities are unknown):
    external, each row's reference as SFT wrote it (the learner's own style); teacher, a solution by a procedure the
    SFT base never saw (data.teacher_response: a distant teacher). None for a row without one or whose solution the
    verifier rejects. Made once per row."""
    tok, cache = trainer.tokenizer, trainer.references.setdefault(source, {})
    new = sorted(set(rows_idx) - cache.keys())
    if new:
        sols = [npo_data.sft_target(tok, trainer.train_rows[i], source == "teacher") for i in new]
        ok = score_responses(tok, [trainer.train_rows[i] for i in new], [(ids, None) for ids in sols], 1)
        cache.update({i: [(ids, [0.0] * len(ids))] if r >= 1 else [] for i, ids, r in zip(new, sols, ok)})
    return {i: list(cache[i]) for i in set(rows_idx)}

def score_solutions(trainer, solutions):
    """Log-probs of every trajectory in `solutions` ({row: [(ids, logps)]}) under the policy in the
    trainer, in the same layout. Returns (solutions rescored, tokens through the forward)."""
    tok, rows = trainer.tokenizer, [r for r in sorted(solutions) for _ in solutions[r]]
    traj = [x for r in sorted(solutions) for x in solutions[r]]
    batch = npo_data.make_batch([trainer.train_prompts[r] for r in rows], traj, 1, tok.pad_token_id,
                       npo_data.vision_inputs(trainer.processor, [trainer.train_rows[r] for r in rows])) if traj else None
    dummy = npo_data.make_batch(trainer.train_prompts[:1], [([tok.eos_token_id], [0.0])], 1, tok.pad_token_id,
                       npo_data.vision_inputs(trainer.processor, trainer.train_rows[:1]))
    a = trainer.args
    lp, _ = recompute_logprobs(trainer.model, batch, a, trainer.device, False, dummy)
    rescored = iter([(ids, lp[k, :len(ids)].tolist()) for k, (ids, _) in enumerate(traj)])  # back to {row: [...]}
    out = {r: [next(rescored) for _ in solutions[r]] for r in sorted(solutions)}
    return out, (int(batch["attention_mask"].sum()) if traj else 0)

def source_qv(trainer, solutions, q_rows, learner_solved, solved=None, learner_is_source=False):
    """Q, V and S of one source for the learner now in the trainer, combined over ranks. solutions: {row: [correct
    (ids, log pi_source)]}; q_rows: the prompts the learner failed; learner_solved: {row: the learner solved it with m
    samples of its own}; solved: {row: the source solves it (a bool or a probability)}, by default whether it has a
    solution. V: one trajectory per solved q_row; learner_is_source: the source is the learner (these log-probs)."""
    solved = solved or {r: bool(solutions.get(r)) for r in q_rows}
    solutions = {r: solutions[r][:1] for r in q_rows if solutions.get(r)}
    learner, scored = score_solutions(trainer, solutions)
    lp_l = [lp for r in sorted(solutions) for _, lp in learner[r]]
    lp_s = lp_l if learner_is_source else [lp for r in sorted(solutions) for _, lp in solutions[r]]
    width = max((len(x) for x in lp_l), default=0)
    pad = lambda xs: torch.tensor([x + [0.0] * (width - len(x)) for x in xs], dtype=torch.float64)  # noqa: E731
    v_mom = variance_cost(pad(lp_l), pad(lp_s), pad([[1.0] * len(x) for x in lp_l])) if lp_l else [0.0] * 6
    q_mom = signal_quality([solved[r] for r in q_rows], [learner_solved[r] for r in q_rows])[2]
    tot = all_reduce([*q_mom, *v_mom, scored, sum(learner_solved[r] for r in q_rows)], trainer.device)
    q, q_se = quality_from_moments(tot[0:3])
    v_token, var_l = variance_from_moments(tot[3:9])
    v = v_token if trainer.args.variance_cost == "token" else (math.exp(var_l) if var_l < 700 else math.inf)
    return {"Q": q, "Q_se": q_se, "V": v, "log_V": math.log(v) if v == v else v, "V_token": v_token,
            "log_V_traj": var_l, "S": effective_signal(q, v), "learner_pass": tot[10] / tot[0] if tot[0] else 0.0,
            "pool_prompts": int(tot[0]), "trajectories": int(tot[6]), "scored_tokens": int(tot[9])}

def qvs_table(trainer, state, t, candidates):
    """Q, V and S of each source for the learner at each ring snapshot s = t - Delta (loaded into trainer and engine);
    its failures are the mistake-pool prompts of steps [s, s + ring_every). Sources: future = the guide theta_t (m
    samples per prompt, log pi_guide scored by the trainer under theta_t); measured once (largest Delta) on the same
    map: past (past_solutions), self = m more samples of the learner (Delta = 0: Q ~ 0, V = 1), external / teacher.
    Only future rows choose Delta. Leaves the last candidate loaded. Returns (table, this rank's generated and scored
    tokens; the table's scored_tokens are all ranks' and counted by the caller)."""
    a = trainer.args
    windows = {s: [r for step, r in state.mistake_pool if s <= step < s + a.ring_every] for s in candidates}
    rows = sorted({r for w in windows.values() for r in w})
    future, generated = sample_correct(trainer, rows)
    future, scored = score_solutions(trainer, {r: v[:1] for r, v in future.items()})  # log pi_guide for V
    table = []
    for s in candidates:
        load_state(ring_path(state.ring, s, a.ring_dir), trainer.model, rng=False)
        sync_weights(trainer.engine, trainer.model)
        learner, n = sample_correct(trainer, windows[s])
        solved = {r: bool(v) for r, v in learner.items()}
        sources = [("future", future, {})]
        if s == min(candidates):  # self: m more samples of the learner, independent of those that define its failures
            again, n2 = sample_correct(trainer, windows[s])
            n += n2
            past, p_solved = past_solutions(state.replay, state.mistake_pool, rows, a.guide_samples, a.group_size, s)
            sources += [("past", past, {"solved": p_solved}), ("self", again, {"learner_is_source": True}),
                        *((x, reference_solutions(trainer, rows, x), {}) for x in ("external", "teacher"))]
        generated += n
        for source, sols, kw in sources:
            table.append({"source": source, "delta": t - s, "snapshot": s,
                          **source_qv(trainer, sols, windows[s], solved, **kw)})
    return table, generated, scored

def intervene(trainer, state, t, deltas, reason):
    """Roll back from step t to t - Delta with theta_t as the guide (paper: NPO's intervention).

    `deltas` are the candidates (manual NPO: the one it is told; AutoNPO: every ring snapshot).
    1. measure the Q / V / S table (qvs_table), then put theta_t back in trainer and engine;
    2. pick Delta (manual: the given one; AutoNPO: select_delta, which may decline);
    3. sample the guide's correct trajectories for the prompts of the steps to be replayed;
    4. restore snapshot t - Delta and drop the abandoned branch's newer ring snapshots, replayed successes and
       mistake-pool entries; the guide pool serves until t.
    Returns (new step, the intervention's metrics record)."""
    a, device = trainer.args, trainer.device
    theta_t = host_copy(trainer.model)  # the guide's weights
    candidates = [t - d for d in deltas if d > 0 and any(e["step"] == t - d for e in state.ring)]
    table, generated, scored = qvs_table(trainer, state, t, candidates) if candidates else ([], 0, 0)
    if candidates:
        load_weights(theta_t, trainer.model)
        sync_weights(trainer.engine, trainer.model)
    future = [r for r in table if r["source"] == "future"]
    best, why = select_delta(future, a.min_delta, a.z) if a.mode == "autonpo" else (  # manual NPO: the Delta told
        (future[0], None) if future else (None, "no ring snapshot at that Delta"))
    rec = {"event": "intervention", "step": t, "reason": reason, "table": table, "delta": best and best["delta"]}
    new_step, state.guide_pool, pool_generated = t, {}, 0
    if best is None:
        rec["skipped"] = why
    else:
        new_step = best["snapshot"]
        replayed = [i for step in range(new_step, t) for i in step_rows(trainer, step)]
        state.guide_pool, pool_generated = sample_correct(trainer, replayed)
        crash_point("intervention")
        load_state(ring_path(state.ring, new_step, a.ring_dir), trainer.model, trainer.optim, trainer.sched, rng=False)
        state.ring[:] = [e for e in state.ring if e["step"] <= new_step]  # the rest is an abandoned branch
        state.replay = [e for e in state.replay if e[0] < new_step]
        state.mistake_pool = [e for e in state.mistake_pool if e[0] < new_step]
        state.guide_until = t
        sync_weights(trainer.engine, trainer.model)
        solved, total = all_reduce([sum(map(bool, state.guide_pool.values())), len(state.guide_pool)], device)
        rec["guide_solved_share"] = solved / max(total, 1)
    generated, scored, pool_generated = all_reduce([generated, scored, pool_generated], device)
    scored += sum(r["scored_tokens"] for r in table)  # (all ranks' already)
    # model FLOPs, forward passes only: measuring Q / V (sampling and scoring), the replay's guide pool
    rec.update(qv_flops=model_flops(trainer, generated + scored, generated + scored),
               guide_flops=model_flops(trainer, pool_generated, pool_generated),
               guide_tokens_generated=int(generated + pool_generated), scored_tokens=int(scored))
    state.generated_tokens += int(generated + pool_generated)
    state.compute_flops += rec["qv_flops"] + rec["guide_flops"]
    state.last_intervention = state.compute_steps  # a skipped one waits out the cooldown too
    state.interventions += "skipped" not in rec
    rec.update(compute_steps=state.compute_steps, generated_tokens=state.generated_tokens, compute_flops=state.compute_flops)
    return new_step, rec


# ======== 11. AutoNPO triggers =================================================================
# When to intervene, from the policy's own per-step history; which Delta is select_delta's choice.
def reward_stagnation(rewards, window, min_slope, z=2.0):
    """An event: the reward rose and has, with confidence, stopped. The last `window` rewards' slope plus z SE is
    below `min_slope` (a bare slope test fires on noise, like a timer) and their mean is above the window before's by z
    SE (an always-flat reward is no plateau to break). At a real batch's noise (sd ~0.05 a step) a 60-step slope has an
    SE of ~0.0004: 60 steps and 1e-3 tell a knee from a steady rise of 0.0015 a step, which 30 steps cannot."""
    if len(rewards) < 2 * window:
        return False
    last, prev = rewards[-window:], rewards[-2 * window:-window]
    b, se = report.slope_with_se([list(enumerate(last))])
    return b + z * se < min_slope and fmean(last) - fmean(prev) > z * math.sqrt((variance(last) + variance(prev)) / window)

def entropy_collapse(entropies, window, frac):
    """An event, not a level: the last `window` steps' mean entropy fell below `frac` times the window before's.
    Steady sharpening (a scratchpad task's norm) and a level that stays low after a drop do not fire."""
    if len(entropies) < 2 * window:
        return False
    return sum(entropies[-window:]) < frac * sum(entropies[-2 * window:-window])

def sparse_reward(all_wrong_shares, window, threshold, z=2.0):
    """Over the last `window` steps more than `threshold` of the groups were all wrong, by z standard errors of the
    window's mean (a share that hovers near the threshold does not fire by chance)."""
    if len(all_wrong_shares) < window:
        return False
    last = all_wrong_shares[-window:]
    return fmean(last) - z * math.sqrt(variance(last) / window) > threshold

def trigger_events(history, args):
    """Each AutoNPO trigger on the policy's own per-step history ('reward', 'entropy', 'all_wrong', in compute order):
    {name: fired}, in the order AutoNPO takes them (report.trigger_steps replays a run's history through it)."""
    return {"sparse_reward": sparse_reward(history["all_wrong"], args.trigger_window, args.sparse_threshold, args.z),
            "entropy_collapse": entropy_collapse(history["entropy"], args.trigger_window, args.entropy_frac),
            "reward_stagnation": reward_stagnation(history["reward"], args.stagnation_window, args.stagnation_slope, args.z)}

def autonpo_trigger(history, since_last, n_done, args):
    """Why AutoNPO intervenes now (the first of trigger_events that fired), or None; since_last: steps since the last
    intervention, against --cooldown; n_done: interventions so far, against --max_interventions."""
    if n_done >= args.max_interventions or since_last < args.cooldown:
        return None
    return next((name for name, yes in trigger_events(history, args).items() if yes), None)

def due_intervention(args, state, step):
    """(candidate Deltas, reason) when an intervention is due after `step` steps, else None. Manual NPO: bootstrapping
    (at step Delta, back to 0) and plateau breakthrough (at a given step, back by Delta), once each. AutoNPO: a
    trigger fired; every older ring snapshot is a candidate."""
    if args.mode == "npo":
        for name, at, delta in (("bootstrap", args.bootstrap_delta, args.bootstrap_delta),
                                ("breakthrough", args.breakthrough_at, args.breakthrough_delta)):
            if at and step == at and name not in state.manual_done:
                state.manual_done.append(name)
                return [delta], name
    if args.mode == "autonpo":
        deltas = [step - e["step"] for e in state.ring if step - e["step"] >= max(args.min_delta, 1)]
        since = math.inf if state.last_intervention is None else state.compute_steps - state.last_intervention
        reason = autonpo_trigger(state.history, since, state.interventions, args) or state.pending
        state.pending = None if deltas else reason  # an event the ring cannot serve yet waits for a snapshot
        return (deltas, reason) if reason and deltas else None
    return None


# ======== 12. The loops ========================================================================
# setup, SFT warm-up, one RL step (rollout -> train -> sync -> log -> intervene), the RL loop, main
def setup(args):
    """Distributed, output directory, tokenizer, data (checked before any model is built), policy,
    optimizer and rollout engine: the Trainer every loop reads."""
    rank, world, device = setup_distributed()
    if args.prompts_per_step % world or args.minibatch_size % world:
        raise SystemExit(f"error: --prompts_per_step ({args.prompts_per_step}) and --minibatch_size "
                         f"({args.minibatch_size}) must be multiples of the number of ranks ({world})")
    torch.manual_seed(args.seed * 1000 + rank)
    random.seed(args.seed * 1000 + rank)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    dist.barrier()
    path = model_path(args)
    positions, need = npo_data.model_positions(path), args.max_prompt_tokens + args.max_new_tokens  # every engine
    if positions and need > positions:
        sys.exit(f"error: --max_prompt_tokens {args.max_prompt_tokens} + --max_new_tokens {args.max_new_tokens} = {need} "
                 f"tokens, over the {positions} positions of {args.model} (max_position_embeddings): lower either")
    tokenizer, processor = load_tokenizer(path), load_processor(path, args)
    try:
        (train_rows, train_prompts), (eval_rows, eval_prompts) = npo_data.prepare_data(args, tokenizer, processor, log0)
    except npo_data.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    t = Trainer(args=args, rank=rank, world=world, device=device, tokenizer=tokenizer, processor=processor,
                train_rows=train_rows, train_prompts=train_prompts, eval_rows=eval_rows, eval_prompts=eval_prompts)
    # the model as a field, never a local: importing vLLM pins this frame (a module of it keeps an ImportError's
    # traceback), and close() must be able to free the model, whose device mesh holds the process group
    t.model = load_policy(path, args, device)
    t.optim = torch.optim.AdamW(t.model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    t.sched = torch.optim.lr_scheduler.LambdaLR(t.optim, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    t.params = sum(p.numel() for p in t.model.parameters())
    t.flop_params = flop_params(t)
    check_disk(args, t.params, device)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    if device.type == "cuda" and args.vllm_memory is None:  # the trainer's sharded weights and AdamW stay resident
        args.vllm_memory = npo_data.engine_share(t.params, world, torch.cuda.get_device_properties(device).total_memory)
    t.engine = make_engine(path, args, device, max(len(r.get("images", [])) for r in train_rows + eval_rows), processor)
    t.engine["bytes"] = torch.cuda.memory_allocated(device) - held if device.type == "cuda" else 0
    t.ref_model = load_policy(path, args, device).eval() if args.kl_coef > 0 and args.mode != "sft" else None
    log0(f"npo | mode {args.mode} | model {args.model} ({t.params / 1e6:.2f}M params) | data {args.data}: {len(train_rows)} "
         f"train, {len(eval_rows)} eval | {world} rank(s) on {device.type} | rollout {args.rollout} ({t.engine['runner']})")
    return t


def resume_if_asked(trainer, gen=None):
    """With --resume, restore the newest complete checkpoint; returns the step to start from."""
    if not trainer.args.resume:
        return 0
    ckpt = (complete_checkpoints(trainer.args.out) or [None])[-1]
    if ckpt is None:
        log0("resume: no complete checkpoint, starting from step 0")
        return 0
    meta, extras = load_state(ckpt, trainer.model, trainer.optim, trainer.sched)
    extras = [{**x, "npo": npo_data.unpack_pools(x["npo"])} if x.get("npo") else x for x in extras.values()]
    if meta["world_size"] == trainer.world:  # the same ranks: each continues exactly where it was
        trainer.resumed = extras[0]
        if gen is not None:
            gen.set_state(trainer.resumed["shuffle_rng"])
    else:  # another number of ranks: each keeps the pool entries of the prompts it owns now (data.reshard_pools)
        owned = functools.lru_cache(maxsize=None)(lambda s: set(step_rows(trainer, s)))
        pools = npo_data.reshard_pools([x.get("npo") for x in extras], meta["step"], owned)
        trainer.resumed = {**extras[0], "npo": pools}
    log0(f"resume: continuing from {ckpt} (step {meta['step']}, written by {meta['world_size']} rank(s), read by {trainer.world})")
    return meta["step"]

def finish(trainer, summary, metrics):
    """Save the final model and summary.json, close the metrics; no rank leaves while another still talks to it."""
    report.close_metrics(metrics)
    if not trainer.args.no_save_model:
        save_hf_model(trainer.model, trainer.processor or trainer.tokenizer, os.path.join(trainer.args.out, "model"))
    if trainer.rank == 0:
        with open(os.path.join(trainer.args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    log0("summary: " + json.dumps(summary))
    dist.barrier()

def run_sft(trainer):
    """SFT warm-up on the data's reference responses: a base policy that sometimes succeeds, as a
    real instruct model does, for RL to start from."""
    args, model, tok = trainer.args, trainer.model, trainer.tokenizer
    start = resume_if_asked(trainer)
    at = start if trainer.resumed is not None else None  # (a resumed run's records after it are dropped)
    metrics = report.open_metrics(args.out, at, args.report_to, vars(args)) if trainer.rank == 0 else None
    sync_weights(trainer.engine, model)
    base = evaluate(trainer)
    sleep_engine(trainer.engine)
    log0(f"sft | start | eval greedy {base['eval_greedy']:.3f}")
    t0 = time.time()
    for step in range(start, args.sft_steps):
        idx = step_rows(trainer, step, args.sft_batch_size)
        batch = npo_data.sft_batch(tok, trainer.train_rows, trainer.train_prompts, idx, trainer.processor)
        denom = all_reduce([float(batch["resp_mask"].sum())], trainer.device)[0] / trainer.world
        loss = sft_loss(model, batch, denom, args, trainer.device)
        optimizer_step(model, trainer.optim, trainer.sched, args.grad_clip)
        rec = {"step": step + 1, "sft_loss": all_reduce([loss], trainer.device)[0] / trainer.world,
               **peak_memory(trainer)}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.sft_steps:
            sync_weights(trainer.engine, model)
            rec.update(evaluate(trainer))
            sleep_engine(trainer.engine)
            log0(f"sft | step {step + 1}/{args.sft_steps} | loss {rec['sft_loss']:.3f} | "
                 f"eval greedy {rec['eval_greedy']:.3f} | {time.time() - t0:.0f}s")
        report.write_metrics(metrics, rec)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.out, model, trainer.optim, trainer.sched, step + 1, args.keep_checkpoints, step + 1)
    sync_weights(trainer.engine, model)
    final = evaluate(trainer)
    finish(trainer, {"mode": "sft", "steps": args.sft_steps, "eval_greedy_start": base["eval_greedy"],
                     "eval_greedy_end": final["eval_greedy"], "seconds": round(time.time() - t0, 1)}, metrics)

def sft_loss(model, batch, denom, args, device):
    """Backward of the token-mean negative log-likelihood of a batch's responses, micro-batch by micro-batch
    (the same loss and gradient as one pass: each part is divided by the whole batch's `denom`); returns it."""
    total = 0.0
    for j in micro_batches(batch, torch.arange(batch["input_ids"].shape[0]), args, device):
        if j is None:
            filler_pass(model, batch, device)
            continue
        logp, _ = forward_logprobs(model, batch, j, 1.0, device, pack=args.pack)                       # [n, R]
        loss = aggregate(-logp, batch["resp_mask"][j].to(device), "token-mean", denom)
        loss.backward()
        total = total + loss.detach()
    return float(total)

def rollout(trainer, step, guide=None):
    """Sample G responses for this rank's prompts of `step`, score them, inject guide samples into failing groups
    (`guide`: {row: correct samples}), and build the training batch."""
    args, tok, G = trainer.args, trainer.tokenizer, trainer.args.group_size
    idx = step_rows(trainer, step)
    rows, prompts = [trainer.train_rows[i] for i in idx], [trainer.train_prompts[i] for i in idx]
    t = time.time()
    vision = npo_data.vision_inputs(trainer.processor, rows)
    samples = generate(trainer.engine, prompts, sampling(trainer, G), vision)         # B*G (ids, logps)
    t_gen, t = time.time() - t, time.time()
    on_policy_rewards = torch.tensor(score_responses(tok, rows, samples, G)).view(len(rows), G)   # [B, G]
    t_score = time.time() - t
    all_wrong = on_policy_rewards.max(dim=1).values <= 0        # [B] the mistake pool; triggers read these
    successes = [(idx[k // G], samples[k][0], k) for k in range(len(samples)) if on_policy_rewards.view(-1)[k] >= 1]
    mixed, rewards, is_guide = samples, on_policy_rewards, torch.zeros(len(samples), dtype=torch.bool)
    if guide:
        mixed, rewards, is_guide = inject_guide(rewards, samples, [guide.get(i, []) for i in idx], args.gate)
    batch = npo_data.make_batch(prompts, mixed, G, tok.pad_token_id, vision)
    batch["rewards"], batch["on_policy_rewards"] = rewards, on_policy_rewards
    batch["advantages"] = grpo_advantages(rewards, args.adv_std).flatten()             # [B*G]
    zero = zero_signal_groups(rewards)                                                  # [B]
    # groups without signal are counted and left out of the loss (their advantage is 0 anyway)
    batch["loss_mask"] = batch["resp_mask"] * (~zero).repeat_interleave(G).float().unsqueeze(1)   # [B*G, R]
    if is_guide.any():
        batch["guide_mask"] = batch["resp_mask"] * is_guide.float().unsqueeze(1)     # [B*G, R]
        batch["guide_logp"] = batch["behav_logp"]                                    # the guide's log-probs there
    info = {"generate_s": t_gen, "score_s": t_score, "zero_signal": zero.sum().item(), "all_wrong": all_wrong.sum().item(),
            "all_wrong_mixed": (rewards.max(dim=1).values <= 0).sum().item(),
            "rescued": (all_wrong & is_guide.view(-1, G).any(dim=1)).sum().item(), "groups": len(rows),
            "injected": int(is_guide.sum()), "prompt_tokens": sum(map(len, prompts)),
            "gen_tokens": sum(len(ids) for ids, _ in samples)}  # generated: replaced ones too
    failed_rows = [i for i, f in zip(idx, all_wrong.tolist()) if f]
    return batch, info, failed_rows, successes

def train_step(trainer, batch, gen):
    """Old log-probs (and entropy), truncated importance weights, then the PPO epochs."""
    args, t = trainer.args, time.time()
    batch["old_logp"], ent = recompute_logprobs(trainer.model, batch, args, trainer.device)          # [N, R] each
    on_policy = batch["resp_mask"] * (1 - batch["guide_mask"]) if "guide_mask" in batch else batch["resp_mask"]
    weight, tis = tis_weights(batch["old_logp"], batch["behav_logp"], on_policy, args.tis_cap or math.inf)
    batch["is_weight"] = weight if args.tis_cap else None  # off: still measured and logged
    if trainer.ref_model is not None:
        batch["ref_logp"], _ = recompute_logprobs(trainer.ref_model, batch, args, trainer.device, entropy=False)
    stats = ppo_update(trainer.model, trainer.optim, trainer.sched, batch, args, trainer.device, gen)
    return {**stats, **tis, "entropy_sum": float((ent * on_policy).sum()),  # of the policy's own samples
            "resp_tokens": float(on_policy.sum()), "train_tokens": float(batch["attention_mask"].sum()),
            "head_tokens": float(batch["resp_mask"].sum()),  # where the LM head runs
            "train_s": time.time() - t}

def flop_params(trainer):
    """(N_body, N_head): the decoder's parameters (not the embedding, a lookup, nor the vision tower, which sees image
    patches only) and the LM head's (counted once when tied to the embedding)."""
    head, embed = trainer.model.get_output_embeddings().weight, trainer.model.get_input_embeddings().weight
    vision = sum(p.numel() for p in getattr(trainer.model.model, "visual", torch.nn.Module()).parameters())
    return trainer.params - embed.numel() - head.numel() * (head is not embed) - vision, head.numel()

def model_flops(trainer, tokens, head_tokens, passes=1):
    """Model FLOPs of `passes` forward passes (a backward counts as 2): 2 N_body per token of `tokens`, 2 N_head per
    token of `head_tokens` (the head scores only response positions and new tokens; the embedding is a lookup).
    Attention's and the vision tower's are left out (~10-30% more at 4-8k tokens): an MFU from these is a floor."""
    body, head = trainer.flop_params
    return 2 * passes * (tokens * body + head_tokens * head)

def step_metrics(trainer, step, batch, info, stats):
    """One step's metrics.jsonl record (report.step_record): its sums reduced over ranks by merge_stats' rule."""
    r, mixed, a = batch["on_policy_rewards"], batch["rewards"], trainer.args
    local = {"reward_sum": r.sum().item(), "correct_sum": (r >= 1).sum().item(), "n_seq": r.numel(),
             "mixed_correct_sum": (mixed >= 1).sum().item(), "kl_sum": 0.0, **info, **stats}
    tot = reduce_stats({k: v for k, v in local.items() if k not in ("generate_s", "score_s", "train_s")}, trainer.device)
    rec = {**report.step_record(tot, step + 1, a.lr, a.kl_coef > 0), "generate_s": info["generate_s"],
           "score_s": info["score_s"], "train_s": stats["train_s"], **peak_memory(trainer)}
    passes = 1 + 3 * a.ppo_epochs + (a.kl_coef > 0)  # old (and reference) log-probs, forward and backward per epoch
    rec["train_flops"] = model_flops(trainer, rec["train_tokens"], tot["head_tokens"], passes)
    return rec

def track_step(trainer, state, step, rec, failed_rows, successes, old_logp):
    """After a step: compute counters, the mistake pool, past successes (row, ids, k: with the trainer's log-probs of
    batch row k, so that every source is scored alike) and the trigger history. Compute is model FLOPs (model_flops),
    guide sampling included: every "per compute" number."""
    a = trainer.args
    state.compute_steps += 1
    state.generated_tokens += rec["step_tokens"]
    state.compute_flops += rec["train_flops"] + model_flops(trainer, rec["step_tokens"] + rec["prompt_tokens"],
                                                            rec["step_tokens"])  # (prefill scores no prompt position)
    state.mistake_pool = (state.mistake_pool + [(step, i) for i in failed_rows])[-a.pool_size:]
    new = [(step, i, ids, old_logp[k, :len(ids)].tolist()) for i, ids, k in successes]
    state.replay = (state.replay + new)[-a.replay_size:]
    for key, val in (("reward", rec["reward"]), ("entropy", rec["entropy"]), ("all_wrong", rec["all_wrong_share"])):
        state.history[key].append(val)

def step_guide(trainer, state, step):
    """The samples on offer to this step's failing groups: the near-future guide pool (until it expires at the step
    the rollback came from), or another source's for its prompts (in the first --guide_steps steps). self samples m
    for every prompt of the step, as the guide pool does for every replayed one, and its compute is counted."""
    a = trainer.args
    if a.mode == "grpo" or (a.guide_source != "future" and a.guide_steps and step >= a.guide_steps):
        return None
    if a.guide_source == "future":
        if step >= state.guide_until:
            state.guide_pool = {}
        return state.guide_pool
    if a.guide_source == "self":
        pool, n = sample_correct(trainer, step_rows(trainer, step))
        n = int(all_reduce([n], trainer.device)[0])
        state.generated_tokens += n
        state.compute_flops += model_flops(trainer, n, n)
        return pool
    if a.guide_source == "past":
        return past_solutions(state.replay, state.mistake_pool, step_rows(trainer, step), a.guide_samples, a.group_size)[0]
    return reference_solutions(trainer, step_rows(trainer, step), a.guide_source)

def run_rl(trainer):
    """GRPO, with NPO's manual interventions or AutoNPO's triggers on top. One step: ring snapshot
    (NPO) -> generate episodes (guide samples injected) -> train -> sync the engine -> log ->
    intervene (roll back) when due -> checkpoint."""
    args = trainer.args
    gen = torch.Generator().manual_seed(args.seed * 7919 + trainer.rank)  # minibatch shuffles
    start = resume_if_asked(trainer, gen)
    resumed = trainer.resumed is not None
    state = NPOState(**trainer.resumed["npo"]) if resumed else NPOState()
    state.ring = [e for e in state.ring if os.path.isdir(os.path.join(args.ring_dir, e["name"]))]  # after --keep_ring off
    at = state.compute_steps if resumed else None
    metrics = report.open_metrics(args.out, at, args.report_to, vars(args)) if trainer.rank == 0 else None
    sync_weights(trainer.engine, trainer.model)
    if resumed:  # evaluating again would draw from the restored RNG and change the next steps
        base = trainer.resumed["base_eval"]
    else:
        base = evaluate(trainer)
        state.eval_flops = model_flops(trainer, base["eval_tokens"], base["eval_tokens"])
        device = torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"  # for MFU
        report.write_metrics(metrics, {"step": 0, "compute_steps": 0, "generated_tokens": 0, "compute_flops": 0.0,
                                "wall_s": 0.0, **base, "params": trainer.params, "flop_params": trainer.flop_params,
                                       "device": device, "world": trainer.world})
    log0(f"{args.mode} | step {start} | base eval greedy {base['eval_greedy']:.3f} | "
         f"mean@{args.eval_samples} {base[f'eval_mean@{args.eval_samples}']:.3f} (n={base['eval_n']})")
    ring_steps = {0, args.breakthrough_at - args.breakthrough_delta} if args.mode == "npo" else {0}
    t0, wall0, last_eval, step = time.time(), (trainer.resumed or {}).get("wall_s", 0.0), base, start
    compute0 = state.compute_steps
    while step < args.steps:
        # ---- Checkpoint ring buffer (NPO / AutoNPO) ---------------------------------------------
        if args.uses_ring and (step % args.ring_every == 0 or step in ring_steps) \
                and step not in [e["step"] for e in state.ring]:
            ring_push(state.ring, trainer.model, trainer.optim, trainer.sched, step, args.ring_size, args.ring_dir,
                      state.compute_steps)
            ring_gc(state.ring, args.ring_dir, args.out)
        # ---- Generate episodes (guide samples injected into failing groups) --------------------
        batch, info, failed_rows, successes = rollout(trainer, step, step_guide(trainer, state, step))
        sleep_engine(trainer.engine)  # vLLM on GPU: its memory goes to the trainer until the sync
        # ---- Training -----------------------------------------------------------------------------
        stats = train_step(trainer, batch, gen)
        # ---- Update the inference engine's weights ------------------------------------------------
        t = time.time()
        sync_weights(trainer.engine, trainer.model)
        sync_s = time.time() - t
        # ---- Log metrics -------------------------------------------------------------------------
        rec = step_metrics(trainer, step, batch, info, stats)
        track_step(trainer, state, step, rec, failed_rows, successes, batch["old_logp"])
        rec.update(sync_s=sync_s, wall_s=wall0 + time.time() - t0, compute_steps=state.compute_steps,
                   generated_tokens=state.generated_tokens, compute_flops=state.compute_flops)
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            t = time.time()
            last_eval = evaluate(trainer)
            state.eval_flops += model_flops(trainer, last_eval["eval_tokens"], last_eval["eval_tokens"])
            rec.update(last_eval, eval_s=time.time() - t, eval_flops=state.eval_flops)
        report.write_metrics(metrics, rec)
        if not args.quiet:
            log0(report.step_line(args.mode, args.steps, step, rec))
        if "eval_greedy" in rec:  # also with --quiet: a person watching a long job sees it live and when it ends
            log0(report.progress_line(args.mode, args.steps, step, rec, time.time() - t0, state.compute_steps - compute0))
        # ---- NPO / AutoNPO: roll back Delta steps and retrain with theta_t as the guide -----------
        due = due_intervention(args, state, step)
        if due:
            new_step, irec = intervene(trainer, state, step, *due)
            irec["wall_s"] = wall0 + time.time() - t0
            report.write_metrics(metrics, irec)
            log0(report.intervention_line(args.mode, irec, new_step))
            step = new_step
        elif args.save_every and step % args.save_every == 0:
            extra = {"shuffle_rng": gen.get_state(), "base_eval": base, "npo": npo_data.pack_pools(vars(state)),
                     "wall_s": wall0 + time.time() - t0}
            save_checkpoint(args.out, trainer.model, trainer.optim, trainer.sched, step, args.keep_checkpoints,
                            state.compute_steps, extra, [e["name"] for e in state.ring])
            ring_gc(state.ring, args.ring_dir, args.out)
    if not args.keep_ring:  # a finished run needs no rollback (a resume of it finds no ring: see run_rl's start)
        ring_gc([], args.ring_dir)
    k = args.eval_samples
    finish(trainer, {"mode": args.mode, "steps": args.steps, "compute_steps": state.compute_steps,
                     "interventions": state.interventions, "generated_tokens": state.generated_tokens,
                     "eval_greedy_start": base["eval_greedy"], "eval_greedy_end": last_eval["eval_greedy"],
                     f"eval_mean@{k}_start": base[f"eval_mean@{k}"], f"eval_mean@{k}_end": last_eval[f"eval_mean@{k}"],
                     "eval_n": base["eval_n"], "seconds": round(time.time() - t0, 1)}, metrics)

def close(trainer=None):
    """The end of a process, every rank: close the engine, free the policy and torch's caches that hold its device mesh
    (and so the process group), then destroy the group, joining its threads: a gloo group still held runs them into the
    interpreter's teardown, which now and then aborts the rank. A caller holding the model elsewhere drops it first."""
    if trainer is not None:
        close_engine(trainer.engine)  # (vLLM's shutdown also destroys the default process group)
        trainer.model = trainer.ref_model = trainer.optim = trainer.sched = trainer.engine = None
    from torch.distributed.tensor import _collective_utils, _redistribute, debug  # DTensor's caches (torch 2.13)
    debug._clear_sharding_prop_cache()
    _redistribute.clear_redistribute_planner_cache()
    _redistribute._gen_transform_infos.cache_clear()
    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()
    gc.collect()  # FSDP2's modules and their states refer to each other
    if dist.is_initialized():
        dist.destroy_process_group()

def main(argv=None):
    args = parse_args(argv)
    trainer = None
    try:
        trainer = setup(args)
        run_sft(trainer) if args.mode == "sft" else run_rl(trainer)
    finally:
        close(trainer)

if __name__ == "__main__":
    main()

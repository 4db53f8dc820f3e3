"""npo.py: GRPO, Near-Future Policy Optimization (NPO) and AutoNPO for RL with verifiable rewards.

One file, read top to bottom in the order data flows:
    args -> distributed setup -> model and tokenizer -> data -> rollout engine -> rewards
    -> advantages and loss -> training step -> evaluation -> checkpoints -> SFT warm-up
    -> NPO (injection, Q / V / S, sources, triggers, ring buffer, intervention) -> training loop
    -> report (the comparison's results.json and plots) -> main

NPO in one paragraph: GRPO learns only from what the policy samples. NPO borrows from the policy's
own near future: train ahead Delta steps, roll back, and use the later checkpoint theta_t as the
*guide*. For prompts whose on-policy group accuracy is below 0.6, one incorrect sample is replaced
by a verified-correct guide sample; the GRPO objective stays, with importance ratios against the
guide's log-probs. A source is judged by Q (on prompts the policy fails, the share it solves) and
V (the variance of the importance weights); AutoNPO triggers interventions from online signals and
picks the rollback distance Delta that maximises S = Q / V over a ring buffer of checkpoints.

Run it
    bash run.sh                     # CPU, embedded default: SFT, then GRPO vs NPO vs AutoNPO, 3 seeds, plots
    python npo.py --mode sft --out runs/sft                 # tiny model, synthetic 3x1 multiplication
    python npo.py --mode grpo --model runs/sft/model --out runs/grpo
    python npo.py --mode npo --bootstrap_delta 50 --model runs/sft/model --out runs/npo
    python npo.py --mode autonpo --model runs/sft/model --out runs/autonpo
    python npo.py --mode npo --guide_source external --model runs/sft/model   # LUFFY-like source instead
    python npo.py --mode sft --model tiny-vl --out runs/vl/sft      # vision-language: count shapes in images
    python npo.py --mode grpo --model runs/vl/sft/model --rollout vllm --vision_frozen
    torchrun --nproc_per_node=2 npo.py --mode autonpo --model runs/sft/model   # FSDP2 over gloo (CPU)
    torchrun --nproc_per_node=8 npo.py --mode autonpo --model Qwen/Qwen3-8B \\
        --data train.parquet --eval_data test.parquet --lr 1e-6 --max_new_tokens 4096 \\
        --prompts_per_step 256 --minibatch_size 1024 --micro_batch_size 4 --grad_ckpt

The embedded default (`--model tiny`, `--data mul`) is the same code as a real run: a ~1M-parameter
Qwen3ForCausalLM built from a config with a character-level tokenizer, saved with save_pretrained,
then loaded back like any hub checkpoint. Nothing is downloaded for it. `--model tiny-vl` is its
vision-language twin (Qwen3VLForConditionalGeneration and Qwen3VLProcessor), trained on images
through the same functions as text.
"""
import argparse
import datetime
import functools
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import string
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import data as npo_data
import verifier
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# =============================================================================================
# Arguments
# =============================================================================================
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("run")
    g.add_argument("--mode", default="grpo", choices=["sft", "grpo", "npo", "autonpo"],
                   help="sft: supervised warm-up that makes a base policy; grpo: RL from verifiable "
                        "rewards; npo: GRPO with the paper's manual interventions (--bootstrap_delta, "
                        "--breakthrough_at); autonpo: interventions from online triggers, Delta by max S")
    g.add_argument("--out", default="runs/npo", help="output directory (metrics.jsonl, checkpoints/, model/)")
    g.add_argument("--seed", type=int, default=0, help="seed for init, data order and sampling")
    g.add_argument("--steps", type=int, default=None,
                   help="training steps (one rollout batch each); default 300 on the embedded default, 500 otherwise")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny",
                   help="'tiny' or 'tiny-vl' (built from a config, no download), a local HF directory or "
                        "a hub id (causal LMs; Qwen3-VL / Qwen2.5-VL image-text models)")
    g.add_argument("--vision_frozen", action="store_true", help="VL: freeze the vision tower (and its merger)")
    g.add_argument("--min_pixels", type=int, default=None, help="VL: images are resized to at least this many pixels")
    g.add_argument("--max_pixels", type=int, default=None, help="VL: ... and at most this many")
    g.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing (large models)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp32"],
                   help="compute dtype of the trainer (fp32 master weights, FSDP2 mixed precision) and of the "
                        "rollout engine and weight sync; default bf16 on GPU, fp32 on CPU")
    g.add_argument("--attn", default=None,
                   help="attention implementation; default flash_attention_2 when installed on GPU, else sdpa")

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help=f"synthetic task {npo_data.TASKS} or a .jsonl/.json/.parquet file; default mul "
                        "(count, shapes in an image, for a vision-language model)")
    g.add_argument("--difficulty", default=None, help="synthetic task difficulty, e.g. '3x1' for mul")
    g.add_argument("--eval_data", default=None, help="held-out file; default: a hash split of --data")
    g.add_argument("--eval_size", type=int, default=1000, help="held-out prompts used for evaluation")
    g.add_argument("--max_prompt_tokens", type=int, default=None,
                   help="longer prompts are an error before training; default 128 tiny, 4096 otherwise")
    g.add_argument("--filter_overlong_prompts", action="store_true",
                   help="drop rows whose prompt is over --max_prompt_tokens (counted per file) instead of "
                        "stopping; the run still refuses to start if no row is left")

    g = p.add_argument_group("rollout")
    g.add_argument("--prompts_per_step", type=int, default=None,
                   help="prompts per step across all ranks; default 32 tiny, 256 otherwise")
    g.add_argument("--group_size", type=int, default=8, help="G: responses sampled per prompt")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--max_new_tokens", type=int, default=None,
                   help="response length cap; default 8 tiny, 4096 otherwise")
    g.add_argument("--gen_batch_size", type=int, default=512, help="sequences per HF generate() call")
    g.add_argument("--rollout", default="auto", choices=["auto", "vllm", "hf"],
                   help="generation engine; auto: vllm when installed, hf for the embedded default with "
                        "answers of <= 32 tokens (vLLM's fixed cost per step dominates there)")
    g.add_argument("--vllm_memory", type=float, default=0.5,
                   help="GPU: share of GPU memory vLLM may take (weights + KV cache) while awake")
    g.add_argument("--tis_cap", type=float, default=2.0,
                   help="truncated importance sampling: on-policy tokens weighted by "
                        "min(pi_old / pi_sampler, cap) for the train/inference mismatch (0: off)")

    g = p.add_argument_group("loss")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate; default 3e-5 tiny (1e-3 sft), 1e-6 otherwise")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up (optimizer steps)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="max global gradient norm")
    g.add_argument("--adv_std", default="group", choices=["group", "none"],
                   help="group: (r - mean) / (std + eps) (GRPO); none: r - mean (Dr. GRPO)")
    g.add_argument("--clip_low", type=float, default=0.2, help="PPO clip: ratio >= 1 - clip_low")
    g.add_argument("--clip_high", type=float, default=0.28, help="PPO clip: ratio <= 1 + clip_high (DAPO clip-higher)")
    g.add_argument("--loss_agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean"],
                   help="how per-token losses are averaged")
    g.add_argument("--kl_coef", type=float, default=0.0, help="k3 KL to the frozen initial policy (0: off, no reference model)")
    g.add_argument("--ppo_epochs", type=int, default=1, help="passes over each rollout batch")
    g.add_argument("--minibatch_size", type=int, default=None,
                   help="sequences per optimizer step across all ranks; default: half a rollout batch")
    g.add_argument("--micro_batch_size", type=int, default=64, help="sequences per forward/backward on one rank")

    g = p.add_argument_group("NPO: near-future guide")
    g.add_argument("--gate", type=float, default=0.6,
                   help="a group gets a guide sample when its on-policy accuracy is below this (the mistake "
                        "pool, which Q is measured on, holds only groups with no correct sample)")
    g.add_argument("--guide_ratio", default="none", choices=["none", "clip", "shape"],
                   help="guide tokens: none = PPO ratio to the old policy recomputed by the current one, as "
                        "for every token (the first author's framework, RLEP); clip = pi_theta / pi_guide, "
                        "clipped; shape = LUFFY's p / (p + 0.1). With clip, the external source (pi = 1) "
                        "weights a guide token by the learner's own probability of it")
    g.add_argument("--guide_samples", type=int, default=4, help="m: guide samples per prompt (for injection and Q)")
    g.add_argument("--guide_source", default="future", choices=["future", "past", "external"],
                   help="where injected samples come from. future: the near-future checkpoint theta_t "
                        "(NPO, with rollbacks); past: the policy's own earlier successes on the prompt "
                        "(replay, ExGRPO/RLEP-like); external: the task's reference solutions as a "
                        "deterministic teacher, pi_source = 1 (LUFFY-like). past and external inject "
                        "into failing groups at every step and never roll back (--mode npo)")
    g.add_argument("--replay_size", type=int, default=4096,
                   help="past successes kept per rank (the 'past' source, and its Q / V at interventions)")
    g.add_argument("--bootstrap_delta", type=int, default=0,
                   help="npo: early bootstrapping: train Delta steps, roll back to 0, retrain with theta_Delta as guide")
    g.add_argument("--breakthrough_at", type=int, default=0,
                   help="npo: plateau breakthrough at this step: roll back --breakthrough_delta steps, guide = theta_t")
    g.add_argument("--breakthrough_delta", type=int, default=0, help="npo: Delta of the plateau breakthrough")
    g.add_argument("--ring_every", type=int, default=10, help="ring buffer: snapshot every k steps")
    g.add_argument("--ring_size", type=int, default=6, help="ring buffer: snapshots kept (K)")
    g.add_argument("--ring_dir", default=None,
                   help="where ring snapshots are written, once each, when taken; default <out>/ring")
    g.add_argument("--pool_size", type=int, default=4096, help="mistake pool entries kept per rank")
    g.add_argument("--min_delta", type=int, default=None,
                   help="autonpo: smallest rollback distance considered; default --ring_every")
    g.add_argument("--z", type=float, default=2.0,
                   help="standard errors a signal must clear: autonpo rolls back only when the best Q is "
                        "more than z SE above 0, and reward stagnation needs slope + z SE below the threshold")

    g = p.add_argument_group("AutoNPO triggers")
    g.add_argument("--trigger_window", type=int, default=20, help="steps each trigger looks back over")
    g.add_argument("--stagnation_slope", type=float, default=2e-3,
                   help="reward stagnation: the least-squares slope (reward per step) of the last window "
                        "plus z standard errors is below this")
    g.add_argument("--entropy_frac", type=float, default=0.5,
                   help="entropy collapse: recent mean entropy below this fraction of the early one")
    g.add_argument("--sparse_threshold", type=float, default=0.6,
                   help="early sparse reward: share of all-wrong groups above this")
    g.add_argument("--cooldown", type=int, default=50, help="min training steps (compute) between interventions")
    g.add_argument("--max_interventions", type=int, default=3, help="cap on AutoNPO interventions per run")

    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval_every", type=int, default=50, help="evaluate every N steps (and at the start and end)")
    g.add_argument("--eval_samples", type=int, default=4, help="k: samples per eval prompt at the training temperature")
    g.add_argument("--save_every", type=int, default=100, help="full training-state checkpoint every N steps (0: off)")
    g.add_argument("--keep_checkpoints", type=int, default=2, help="complete checkpoints kept on disk")
    g.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    g.add_argument("--no_save_model", action="store_true", help="skip the final save_pretrained (tests)")
    g.add_argument("--quiet", action="store_true", help="no per-step lines")

    g = p.add_argument_group("sft warm-up")
    g.add_argument("--sft_steps", type=int, default=None, help="SFT optimizer steps; default 600")
    g.add_argument("--sft_batch_size", type=int, default=64, help="SFT sequences per step across ranks")
    return resolve_defaults(p.parse_args(argv), p)


def is_embedded(model):
    """The embedded tiny model, freshly built or saved by an earlier run (its config is marked)."""
    if model in ("tiny", "tiny-vl"):
        return True
    cfg = os.path.join(model, "config.json")
    if not os.path.isfile(cfg):
        return False
    with open(cfg) as f:
        return bool(json.load(f).get("npo_embedded", False))


@functools.lru_cache(maxsize=None)
def is_vision_language(model):
    """An image-text checkpoint (its config has a vision_config), or the embedded 'tiny-vl'."""
    if model == "tiny-vl":
        return True
    cfg = os.path.join(model, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return "vision_config" in json.load(f)
    if model == "tiny" or os.path.isdir(model):
        return False
    from transformers import AutoConfig  # a hub id
    return hasattr(AutoConfig.from_pretrained(model), "vision_config")


def resolve_defaults(args, p):
    """Fill size-dependent defaults: CPU-sized for the embedded model, real-run values otherwise.
    Everything else has one default for every model."""
    tiny = is_embedded(args.model)
    pick = lambda small, real: small if tiny else real  # noqa: E731
    args.data = args.data or ("count" if is_vision_language(args.model) else "mul")
    if args.lr is None:
        args.lr = (1e-3 if args.mode == "sft" else 3e-5) if tiny else 1e-6
    args.steps = args.steps or pick(300, 500)
    args.max_new_tokens = args.max_new_tokens or pick(8, 4096)
    args.max_prompt_tokens = args.max_prompt_tokens or pick(128, 4096)
    args.prompts_per_step = args.prompts_per_step or pick(32, 256)
    args.minibatch_size = args.minibatch_size or args.prompts_per_step * args.group_size // 2
    args.sft_steps = args.sft_steps or 600
    args.rollout = pick_rollout(args.rollout, tiny, args.max_new_tokens)
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    args.ring_dir = args.ring_dir or os.path.join(args.out, "ring")
    args.min_delta = args.ring_every if args.min_delta is None else args.min_delta
    if args.guide_source != "future" and (args.mode != "npo" or args.bootstrap_delta or args.breakthrough_at):
        p.error(f"--guide_source {args.guide_source} injects at every step without rollbacks: use it with "
                "--mode npo and no --bootstrap_delta / --breakthrough_at")
    if args.mode == "npo" and args.guide_source == "future" and not (args.bootstrap_delta or args.breakthrough_at):
        p.error("--mode npo needs --bootstrap_delta and/or --breakthrough_at with --breakthrough_delta")
    if args.breakthrough_at and not 0 < args.breakthrough_delta <= args.breakthrough_at:
        p.error("--breakthrough_delta must be in 1..--breakthrough_at")
    reach = args.ring_every * (args.ring_size - 1)
    if max(args.bootstrap_delta, args.breakthrough_delta) > reach:
        p.error(f"Delta is larger than the ring buffer reaches back (--ring_every x (--ring_size - 1) = {reach})")
    return args


# =============================================================================================
# Distributed setup: always a process group (world size 1 for a plain `python npo.py`), so a
# single process runs exactly the FSDP2 code that torchrun runs.
# =============================================================================================
def setup_distributed():
    """Returns (rank, world_size, device). nccl on GPU, gloo on CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(minutes=30)
        if "RANK" in os.environ:  # launched by torchrun
            dist.init_process_group(backend, timeout=timeout)
        else:  # plain `python npo.py`: a world of one (no environment variables left behind)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                    world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def collective_device():
    """Where tensors for collectives live: the current GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def all_reduce_sum(values, device):
    """Sum a list of floats over ranks (one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values, device):
    """Elementwise max of a list of floats over ranks (one collective); min(x) = -max(-x)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


# =============================================================================================
# Model and tokenizer
# =============================================================================================
CHAT_TEMPLATE = (  # Qwen-style ChatML; content is text, or a list of text and image parts (VL)
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def char_tokenizer(extra_specials=()):
    """The embedded models' character-level tokenizer (printable ASCII, ChatML specials, and one
    token each for the role names, as in a real BPE vocabulary); `extra_specials` come last."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + chars)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.add_tokens(["user", "assistant", "system"])
    tok.add_special_tokens(list(extra_specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(path, seed=0, **sizes):
    """The embedded default: a ~1M-parameter Qwen3ForCausalLM from a config and a character-level
    tokenizer built in memory, saved with save_pretrained so that from_pretrained (and vLLM) load
    it like any checkpoint. Untied embeddings: a tied lm_head goes stale in vLLM-CPU weight reloads.
    `sizes` override the config (e.g. hidden_size=256, num_hidden_layers=12: ~10M parameters)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = char_tokenizer()
    vocab = tokenizer.get_vocab()
    shape = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
    config = Qwen3Config(
        vocab_size=len(tokenizer), tie_word_embeddings=False, eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"], bos_token_id=None, rope_theta=10000.0, **{**shape, **sizes})
    config.npo_embedded = True
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_vl(path, seed=0, min_pixels=32 * 32, max_pixels=128 * 128):
    """The embedded vision-language default: a ~0.8M-parameter Qwen3VLForConditionalGeneration
    (2 vision blocks of width 64 with 16-pixel patches merged 2x2, 2 text layers of width 128,
    M-RoPE sections summing to head_dim / 2, untied lm_head) and a Qwen3VLProcessor over the same
    character tokenizer with the vision tokens added, saved like any hub checkpoint. A 64x64 image
    is 16 patches, 4 image tokens."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    tokenizer = char_tokenizer(VISION_TOKENS)
    v = tokenizer.get_vocab()
    patch = dict(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**patch, min_pixels=min_pixels, max_pixels=max_pixels,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3),
        video_processor=Qwen3VLVideoProcessor(**patch), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [6, 5, 5], "mrope_interleaved": True},
                         pad_token_id=v["<|endoftext|>"], eos_token_id=v["<|im_end|>"]),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                           num_position_embeddings=64, deepstack_visual_indexes=[1]),
        image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        vision_start_token_id=v["<|vision_start|>"], vision_end_token_id=v["<|vision_end|>"],
        tie_word_embeddings=False)
    config.npo_embedded = True
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = v["<|im_end|>"]
    model.generation_config.pad_token_id = v["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def model_path(args):
    """Resolve --model to something from_pretrained can load (building the tiny model once)."""
    if args.model not in ("tiny", "tiny-vl"):
        return args.model
    path = os.path.join(args.out, "tiny_init")
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        (build_tiny_vl if args.model == "tiny-vl" else build_tiny)(path, seed=args.seed)
    dist.barrier()
    return path


def attn_implementation(args, device):
    if args.attn:
        return args.attn
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401  optional GPU package
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_tokenizer(path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_processor(path, args):
    """A vision-language checkpoint's processor (images -> pixel_values, image tokens expanded to
    the image's size), with --min_pixels / --max_pixels applied; None for a text model."""
    if not is_vision_language(path):
        return None
    from transformers import AutoProcessor
    proc = AutoProcessor.from_pretrained(path)
    if args.min_pixels or args.max_pixels:
        proc = AutoProcessor.from_pretrained(path, size=pixel_bounds(proc, args))
    return proc


def pixel_bounds(processor, args):
    """The processor's resize bounds (in pixels) with --min_pixels / --max_pixels applied."""
    size = processor.image_processor.size
    return {"shortest_edge": args.min_pixels or size.shortest_edge, "longest_edge": args.max_pixels or size.longest_edge}


def compute_dtype(args):
    """--dtype as a torch dtype: what the trainer computes in (its master weights stay fp32), what the
    engine samples in, and what the weight sync sends."""
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]


def load_hf_model(path, dtype, attn, device):
    """A causal LM, or an image-text model (Qwen3-VL, Qwen2.5-VL) for a vision-language checkpoint."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    auto = AutoModelForImageTextToText if is_vision_language(path) else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device)


def load_policy(path, args, device):
    """The trainable policy: fp32 master weights, FSDP2-sharded (one unit per decoder layer, and
    per vision block for a VL model: the classes the model lists in _no_split_modules; then the
    root), compute in --dtype (bf16: FSDP2 mixed precision, fp32 reductions). --vision_frozen stops
    gradients into the vision tower."""
    model = load_hf_model(path, torch.float32, attn_implementation(args, device), device)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if args.vision_frozen:
        if not hasattr(model.model, "visual"):
            raise SystemExit(f"error: --vision_frozen: {path} has no vision tower")
        model.model.visual.requires_grad_(False)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype(args), reduce_dtype=torch.float32)
    units = set(model._no_split_modules or [])
    for module in list(model.modules()):
        if type(module).__name__ in units:
            fully_shard(module, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def save_hf_model(model, tokenizer, path):
    """save_pretrained of the current policy (rank 0 writes; all ranks gather)."""
    rank0 = dist.get_rank() == 0  # every rank gathers; rank 0 keeps each full tensor, on the host
    sd = {k: v.cpu() for k, v in policy_weights(model, torch.float32) if rank0}
    if rank0:
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


# =============================================================================================
# Data: rows -> chat-formatted prompt token ids, and the data order (a pure function of step)
# =============================================================================================
def encode_prompts(tokenizer, rows, max_prompt_tokens, where, processor=None, drop_overlong=False):
    """Token ids of each row's chat prompt (with the assistant header); for a vision-language model
    the processor expands each image placeholder to the image's number of tokens. A prompt over
    the limit is an error naming the row, before training: truncating it would change the task, or
    cut through image tokens (then model and images disagree). With `drop_overlong` such a row's
    entry is None instead (--filter_overlong_prompts; see keep_encoded)."""
    out = []
    for i, row in enumerate(rows):
        text = (processor or tokenizer).apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        if row.get("images") and processor is None:
            raise npo_data.DataError(f"{where} row {i + 1}: has images, but the model is text-only")
        if processor is not None and row.get("images"):
            sizes = [npo_data.image_size(x, f"{where} row {i + 1}: field 'images'") for x in row["images"]]
            try:
                text = expand_image_tokens(processor, text, sizes)
            except ValueError as e:
                raise npo_data.DataError(f"{where} row {i + 1}: field 'prompt': {e}") from None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens and drop_overlong:
            ids = None
        elif len(ids) > max_prompt_tokens:
            what = " with its images" if row.get("images") else ""
            raise npo_data.DataError(f"{where} row {i + 1}: prompt{what} has {len(ids)} tokens, over "
                                     f"--max_prompt_tokens {max_prompt_tokens}")
        out.append(None if ids is None else list(ids))
    return out


def keep_encoded(rows, prompts, where):
    """The rows (and their prompt ids) that encode_prompts kept: --filter_overlong_prompts drops the
    overlong ones, says how many and from where, and refuses an empty result."""
    kept = [(r, p) for r, p in zip(rows, prompts) if p is not None]
    if len(kept) < len(rows):
        log0(f"data: dropped {len(rows) - len(kept)} of {len(rows)} rows of {where} whose prompt is over "
             f"--max_prompt_tokens (--filter_overlong_prompts)")
    if rows and not kept:
        raise npo_data.DataError(f"{where}: every prompt is over --max_prompt_tokens; nothing is left to train on")
    return [r for r, _ in kept], [p for _, p in kept]


def expand_image_tokens(processor, text, sizes):
    """The chat text with each image's placeholder repeated once per token the image becomes
    (patches / merge_size^2 at the processor's resize for that (height, width)): what the
    processor's __call__ does, from image sizes alone, so that encoding a dataset reads image
    headers, not pixels (test: equal to the processor's own input_ids)."""
    ip, tag = processor.image_processor, processor.image_token
    parts = text.split(tag)
    if len(parts) - 1 != len(sizes):
        raise ValueError(f"{len(parts) - 1} image placeholders in the chat text for {len(sizes)} images")
    counts = [ip.get_number_of_image_patches(h, w, {}) // ip.merge_size ** 2 for h, w in sizes]
    return parts[0] + "".join(tag * n + part for n, part in zip(counts, parts[1:]))


def vision_inputs(processor, rows):
    """Per row, what a VL model needs besides token ids: {'images': PIL images, 'pixel_values',
    'image_grid_thw'} from the processor, None for a text row; None in all for a text model. Made
    when a batch needs them, not kept for the whole dataset."""
    if processor is None:
        return None
    out = []
    for row in rows:
        if not row.get("images"):
            out.append(None)
            continue
        images = [npo_data.open_image(x) for x in row["images"]]
        v = processor.image_processor(images=images, return_tensors="pt")
        out.append({"images": images, "pixel_values": v["pixel_values"], "image_grid_thw": v["image_grid_thw"]})
    return out


def vision_token_ids(config):
    """The vision placeholder tokens of a VL model. The policy never writes them: both samplers
    suppress them and the trainer's log-probs renormalise without them, so sampler and trainer keep
    one distribution (an image token in a response would also be taken for an image)."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return [getattr(config, k) for k in names if getattr(config, k, None) is not None] \
        if hasattr(config, "vision_config") else []


def vision_kwargs(vision, input_ids, image_token_id, device):
    """Model inputs for a batch of sequences whose rows' vision inputs are `vision` (one entry per
    sequence, None for text): the patches concatenated in sequence order (the order of the image
    tokens in input_ids), their grids, and mm_token_type_ids (1 on image tokens), from which the
    model computes its M-RoPE positions. {} when no sequence has an image."""
    vision = [v for v in vision or [] if v is not None]
    if not vision:
        return {}
    return {"pixel_values": torch.cat([v["pixel_values"] for v in vision]).to(device),
            "image_grid_thw": torch.cat([v["image_grid_thw"] for v in vision]).to(device),
            "mm_token_type_ids": (input_ids == image_token_id).long()}


def prompts_for_step(step, n_rows, prompts_per_step, seed, rank, world):
    """Row indices this rank trains on at `step`: epochs of seeded permutations, cut into global
    batches, each split evenly over ranks. A pure function of step, so the data position of a
    checkpoint (or a ring-buffer snapshot) is just its step."""
    start = step * prompts_per_step
    idx = []
    while len(idx) < prompts_per_step:
        epoch, offset = divmod(start + len(idx), n_rows)
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        idx.extend(perm[offset:offset + prompts_per_step - len(idx)].tolist())
    per_rank = prompts_per_step // world
    return idx[rank * per_rank:(rank + 1) * per_rank]


# =============================================================================================
# Rollout engine: three functions (make_engine, sync_weights, generate) over two back ends.
#   vllm: a colocated vLLM engine on every rank (TP=1, torchrun's process group reused through
#         vLLM's external launcher); weights pushed in after every training step; on GPU its
#         memory is handed to the trainer between rollouts (sleep level 1 / wake up).
#   hf:   an unsharded transformers copy of the policy and HF generate (no extra packages).
# Both return the tokens and the per-token log-probs of the distribution actually sampled from.
# =============================================================================================
VLLM_CPU_ENV = {  # without these, each CPU engine grabs ~20 GiB of KV cache and runs 100x slower
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TORCHDYNAMO_DISABLE": "1"}


def pick_rollout(rollout, tiny, max_new_tokens):
    """--rollout auto: vLLM when installed (vllm on GPU, vllm-cpu on CPU), except for the embedded
    default with short answers, where vLLM's fixed cost per engine step outweighs a whole HF
    generate call (README, "Rollout engines": the two measured side by side)."""
    if rollout != "auto":
        return rollout
    if tiny and max_new_tokens <= 32:
        return "hf"
    return "vllm" if importlib.util.find_spec("vllm") else "hf"


def make_engine(path, args, device, max_images=0):
    """The rollout engine (`max_images`: the most images one prompt of the data has, for vLLM)."""
    dtype = compute_dtype(args)  # the trainer's compute dtype: the engine samples what it trains
    if args.rollout == "hf":
        model = load_hf_model(path, dtype, attn_implementation(args, device), device).eval()
        return {"kind": "hf", "model": model, "dtype": dtype, "sleep_mode": False}
    return make_vllm_engine(path, args, device, dtype, max_images)


def make_vllm_engine(path, args, device, dtype, max_images=0):
    """One vLLM engine per rank inside the training process. The engine must sample with the
    trainer's dtype: with dtype='auto' vLLM runs an fp32 checkpoint in bf16 on CPUs that have it,
    and sampling then disagrees with training before any update."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process (external launcher)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    if device.type == "cpu":
        for k, v in VLLM_CPU_ENV.items():
            os.environ.setdefault(k, v)
    from vllm import LLM
    # two warnings that fire on every weight reload or thread query and mean nothing here: rotary
    # embeddings have no checkpoint weights, and vLLM-CPU pins torch's thread count itself
    for name in ("vllm.model_executor.model_loader.reload.layerwise", "vllm.v1.worker.cpu_worker"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # vLLM's external launcher reads torchrun's variables; a plain `python npo.py` has none, so
    # they are lent for the construction only (the process group already exists, vLLM reuses it).
    lent = {"RANK": str(dist.get_rank()), "LOCAL_RANK": os.environ.get("LOCAL_RANK", "0"),
            "WORLD_SIZE": str(dist.get_world_size())}
    lent = {k: v for k, v in lent.items() if k not in os.environ}
    os.environ.update(lent)
    mm = {"limit_mm_per_prompt": {"image": max_images, "video": 0}} if is_vision_language(path) else {}
    if mm and (args.min_pixels or args.max_pixels):
        mm["mm_processor_kwargs"] = {"size": pixel_bounds(load_processor(path, args), args)}
    try:
        llm = LLM(model=path, dtype=dtype, seed=args.seed * 1000 + dist.get_rank(), **mm,
                  distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                  max_model_len=args.max_prompt_tokens + args.max_new_tokens,
                  logprobs_mode="processed_logprobs",  # log-probs after temperature / top-p: the sampler's
                  enforce_eager=device.type == "cpu", gpu_memory_utilization=args.vllm_memory,
                  enable_sleep_mode=device.type == "cuda", enable_prefix_caching=True,
                  # a prefill split over engine steps discards a seeded sample and rewinds its
                  # generator, which CPU generators cannot do ("CPU Generator does not use offset")
                  enable_chunked_prefill=device.type == "cuda")
    finally:
        for k in lent:
            os.environ.pop(k, None)
    config = llm.llm_engine.model_config.hf_config
    banned = set(vision_token_ids(config))
    vocab = llm.llm_engine.model_config.get_vocab_size()
    return {"kind": "vllm", "llm": llm, "dtype": dtype, "sleep_mode": device.type == "cuda", "asleep": False,
            "vision": bool(mm), "image_token_id": getattr(config, "image_token_id", None),
            "allowed": [i for i in range(vocab) if i not in banned] if banned else None}


def vllm_control(engine, action, weights=None):
    """Every call whose spelling depends on the vLLM version, in one place (pinned: 0.32.0).
    close: shut the in-process engine down (this also destroys the default process group).
    read: the engine's own weights (tests compare them with the trainer's after a sync).
    load: weights = iterable of (HF name, tensor); reload in place, then drop cached prefixes
    (computed with the old weights). sleep: level 1 offloads weights to host memory and frees the
    KV cache (level 2 would discard the weights). wake: weights first, KV cache after the load,
    so the trainer's memory is free while the new weights arrive."""
    llm = engine["llm"]
    if action == "sleep" and not engine["asleep"]:
        llm.sleep(level=1)
        engine["asleep"] = True
    elif action == "wake" and engine["asleep"]:
        llm.wake_up()
        engine["asleep"] = False
    elif action == "close":
        llm.llm_engine.engine_core.shutdown()
    elif action == "read":  # the weights the engine samples with, by vLLM's names (fused qkv_proj, ...)
        return llm.collective_rpc(lambda w: {k: v.detach().cpu().clone()
                                             for k, v in w.model_runner.get_model().state_dict().items()})[0]
    elif action == "load":
        if engine["asleep"]:
            llm.wake_up(tags=["weights"])
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        llm.reset_prefix_cache()
        if engine["vision"]:  # image features computed with the old weights; without it: "encoder cache miss"
            llm.llm_engine.reset_encoder_cache()
            llm.reset_mm_cache()
        if engine["asleep"]:
            llm.wake_up(tags=["kv_cache"])
            engine["asleep"] = False


def policy_weights(model, dtype):
    """(HF name, full tensor) pairs of the FSDP2 policy, one parameter at a time, cast to the
    engine's dtype before the all-gather: peak memory is one full parameter, not a full model.
    Every rank must consume it in the same order (the gathers are collectives)."""
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


def engine_weights(engine):
    """The engine's weights as it samples with them (checks that a sync is exact)."""
    if engine["kind"] == "hf":
        return {k: v.detach().cpu() for k, v in engine["model"].state_dict().items()}
    return vllm_control(engine, "read")


def engine_sleep(engine):
    """Hand the engine's GPU memory to the trainer until the next sync (vLLM on GPU only)."""
    if engine["sleep_mode"]:
        vllm_control(engine, "sleep")


def close_engine(engine):
    if engine["kind"] == "vllm":
        vllm_control(engine, "close")


@torch.no_grad()
def generate(engine, prompts, n, temperature, top_p, max_new_tokens, eos_id, pad_id, batch_size=512, vision=None):
    """Sample n responses for each prompt (lists of token ids; `vision`: vision_inputs() per
    prompt for a VL model).

    Returns a flat list, prompt-major (prompt i, sample j at i*n + j), of
    (response_ids, sampling_logps): the per-token log-probs of the distribution the sampler drew
    from (logits / T, renormalised over the top-p nucleus when top_p < 1), the behaviour log-probs
    that importance ratios are taken against. Temperature 0 means greedy (log-probs then at T = 1).
    Sampling draws from torch's RNG (vLLM: a per-call seed drawn from it), so a resumed run,
    which restores that RNG, samples what the uninterrupted run did. No prompts, no samples (a rank
    with an empty share of the work calls it like the others)."""
    if not prompts:
        return []
    if engine["kind"] == "vllm":
        return _generate_vllm(engine, prompts, n, temperature, top_p, max_new_tokens, eos_id, vision)
    return _generate_hf(engine, prompts, n, temperature, top_p, max_new_tokens, eos_id, pad_id, batch_size, vision)


def _generate_vllm(engine, prompts, n, temperature, top_p, max_new_tokens, eos_id, vision=None):
    from vllm import SamplingParams
    vllm_control(engine, "wake")
    greedy = temperature == 0
    seed = int(torch.randint(2**31 - 1, (1,)))
    sp = SamplingParams(n=n, temperature=temperature, top_p=1.0 if greedy else top_p, max_tokens=max_new_tokens,
                        stop_token_ids=[eos_id], logprobs=0, seed=None if greedy else seed,
                        allowed_token_ids=engine["allowed"])  # VL: never the vision tokens
    requests = [{"prompt_token_ids": p} for p in prompts]
    for req, v in zip(requests, vision or []):
        if v is not None:  # vLLM expands each image's placeholder itself: give it one token per image
            img = engine["image_token_id"]
            p = req["prompt_token_ids"]
            req["prompt_token_ids"] = [t for i, t in enumerate(p) if not (t == img and i and p[i - 1] == img)]
            req["multi_modal_data"] = {"image": v["images"]}
    outs = engine["llm"].generate(requests, sp, use_tqdm=False)
    res = []
    for o in outs:
        for c in sorted(o.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            res.append((ids, [d[t].logprob for d, t in zip(c.logprobs, ids)]))
    return res


def _generate_hf(engine, prompts, n, temperature, top_p, max_new_tokens, eos_id, pad_id, batch_size, vision=None):
    from transformers import GenerationConfig
    model = engine["model"]
    device = next(model.parameters()).device
    greedy = temperature == 0
    # every sampling knob explicit: a None would be filled from the checkpoint's generation_config
    # or transformers' defaults (top_k=50), and the engine would sample from another distribution
    cfg = GenerationConfig(
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else 0, repetition_penalty=1.0, max_new_tokens=max_new_tokens, num_return_sequences=n, eos_token_id=eos_id,
        pad_token_id=pad_id, output_scores=True, return_dict_in_generate=True,
        suppress_tokens=vision_token_ids(model.config) or None)
    out = []
    per_call = max(1, batch_size // n)
    for s in range(0, len(prompts), per_call):
        chunk = prompts[s:s + per_call]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids = ids.to(device)
        vis = vision_kwargs(vision[s:s + per_call], ids, model.config.image_token_id, device) if vision else {}
        res = model.generate(input_ids=ids, attention_mask=mask.to(device), generation_config=cfg, **vis)
        new = res.sequences[:, width:].cpu()                               # [len(chunk)*n, R]
        scores = torch.stack(res.scores, dim=1).float()                    # [len(chunk)*n, R, V], processed
        logps = token_logprobs(scores, new.to(scores.device)).cpu()
        for k in range(new.shape[0]):
            toks = new[k].tolist()
            length = toks.index(eos_id) + 1 if eos_id in toks else len(toks)
            out.append((toks[:length], logps[k, :length].tolist()))
    return out


# =============================================================================================
# Rewards
# =============================================================================================
def score_responses(tokenizer, rows, samples, n):
    """Verifier reward of each sample; samples are prompt-major, n per row. [] for no samples
    (batch_decode([]) returns [''] in transformers 5.19, a row that does not exist)."""
    if not samples:
        return []
    texts = tokenizer.batch_decode([ids for ids, _ in samples], skip_special_tokens=True)
    return [verifier.reward(t, rows[k // n]) for k, t in enumerate(texts)]


# =============================================================================================
# Advantages and loss: pure functions on tensors, each tested against an independent reference
# =============================================================================================
def grpo_advantages(rewards, scale="group", eps=1e-6):
    """GRPO advantages. rewards: [B, G] (one row per prompt group) -> [B, G].
    group: (r - mean_g) / (std_g + eps), std unbiased as in the GRPO paper's code;
    none:  r - mean_g (Dr. GRPO, no length or difficulty re-weighting).
    A group whose rewards are all equal carries no signal: its advantages are exactly 0."""
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    if scale == "group":
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)
    return adv


def zero_signal_groups(rewards):
    """[B] bool: groups whose rewards are all equal (all right or all wrong)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def token_logprobs(logits, tokens):
    """log p(token) under logits. logits: [N, T, V], tokens: [N, T] -> [N, T].
    gather - logsumexp: no [N, T, V] log-softmax tensor is kept."""
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_entropy(logits):
    """Entropy of softmax(logits) per position. [N, T, V] -> [N, T]."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def aggregate(per_token, mask, mode="token-mean", denom=None):
    """Average a per-token quantity over the tokens in `mask` ([N, T] each).

    token-mean:          sum over all tokens / number of tokens
    seq-mean-token-mean: mean over sequences of each sequence's token mean
    `denom` overrides the number of tokens (or sequences) in the denominator: pass the count over
    the whole minibatch (all micro-batches, all ranks / world size) so that gradient accumulation
    and FSDP's gradient averaging give exactly the global mean. An empty mask gives 0, never NaN,
    and `where` (not multiplication) keeps NaN/inf at padded positions out of the result."""
    mask = mask.bool()
    x = torch.where(mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "token-mean":
        total = mask.sum() if denom is None else denom
        return x.sum() / max(float(total), 1.0)
    if mode == "seq-mean-token-mean":
        n_tok = mask.sum(dim=1)
        seq_mean = x.sum(dim=1) / n_tok.clamp(min=1)
        total = (n_tok > 0).sum() if denom is None else denom
        return seq_mean.sum() / max(float(total), 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def kl_k3(logp, ref_logp):
    """k3 estimator of KL(pi || ref) per token: exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def tis_weights(old_logp, behav_logp, mask, cap):
    """Truncated importance sampling for the train/inference mismatch: the sampler (vLLM kernels,
    bf16, another batch shape) is not exactly the policy the trainer differentiates, so each
    on-policy token gets the detached weight min(pi_old / pi_sampler, cap) (0 outside `mask`).
    Returns (weights [N, T], stats: the untruncated ratio's sum / min / max and the share capped)."""
    ratio = torch.exp(old_logp - behav_logp)
    m = mask.bool()
    n = int(m.sum())
    stats = {"tis_tokens": n, "tis_ratio_sum": ratio[m].sum().item(), "tis_capped_sum": (ratio[m] > cap).sum().item(),
             "tis_ratio_max": ratio[m].max().item() if n else -math.inf,
             "tis_ratio_min": ratio[m].min().item() if n else math.inf}
    return torch.where(m, ratio.clamp(max=cap), 0.0), stats


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.28, agg="token-mean",
                denom=None, guide_mask=None, guide_logp=None, guide_ratio="clip", is_weight=None):
    """Clipped surrogate on a mixed on-policy / guide batch. Returns (loss, stats).

    logp:       [N, T] log pi_theta of the taken tokens (with grad)
    old_logp:   [N, T] log pi_old recomputed by the trainer before the update
    advantages: [N] sequence advantage, broadcast over tokens
    mask:       [N, T] tokens that count (response tokens of sequences that carry signal)
    guide_mask: [N, T] tokens written by the guide (NPO); None = all on-policy
    guide_logp: [N, T] the guide's sampling log-probs of its tokens
    guide_ratio (how guide tokens are weighted):
        clip:  ratio pi_theta / pi_guide, PPO-clipped like on-policy tokens (npo default)
        none:  ratio pi_theta / pi_old recomputed by the current policy (RLEP)
        shape: LUFFY's f(pi_theta) = p / (p + 0.1) in place of the ratio, unclipped
    is_weight:  [N, T] optional detached per-token weight on on-policy tokens (truncated importance
                sampling for a train/inference mismatch)
    Per token: -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A); see aggregate() for the mean."""
    if guide_mask is None:
        guide_mask = torch.zeros_like(mask)
    guide = guide_mask.bool() & mask.bool()
    on = mask.bool() & ~guide
    adv = advantages.unsqueeze(-1).to(logp.dtype)                                    # [N, 1]
    anchor = torch.where(guide, guide_logp, old_logp) if guide_ratio == "clip" and guide_logp is not None \
        else old_logp
    ratio = torch.exp(logp - anchor)                                                 # [N, T]
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if guide_ratio == "shape":
        p = torch.exp(logp)
        per_token = torch.where(guide, -(p / (p + 0.1)) * adv, per_token)
    if is_weight is not None:
        per_token = torch.where(on, per_token * is_weight, per_token)
    loss = aggregate(per_token, mask, agg, denom)

    with torch.no_grad():  # diagnostics, split by token source
        hit = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
        stats = {}
        for name, part in (("on", on), ("guide", guide)):
            n = part.sum().item()
            stats[f"{name}_tokens"] = n
            stats[f"{name}_clipfrac_sum"] = (hit & part).sum().item()
            stats[f"{name}_ratio_sum"] = torch.where(part, ratio, 0).sum().item()
            stats[f"{name}_ratio_max"] = torch.where(part, ratio, -math.inf).max().item() if n else -math.inf
            stats[f"{name}_ratio_min"] = torch.where(part, ratio, math.inf).min().item() if n else math.inf
    return loss, stats


# =============================================================================================
# Training step: rollout batch -> tensors -> old log-probs -> minibatch PPO updates
# =============================================================================================
def make_batch(prompts, samples, n, pad_id, vision=None):
    """Pack prompt-major samples (n per prompt) into padded tensors.

    input_ids      [N, P+R] prompt left-padded to P, response right-padded to R
    attention_mask [N, P+R]
    position_ids   [N, P+R] counted from each sequence's first real token (as generate does)
    resp_mask      [N, R]   1 on response tokens (the EOS included)
    behav_logp     [N, R]   sampling log-probs of the response tokens
    vision         N entries of vision_inputs() (VL; shared with the prompt's other samples), or None
    """
    P = max(len(p) for p in prompts)
    R = max(1, max(len(ids) for ids, _ in samples))
    N = len(samples)
    input_ids = torch.full((N, P + R), pad_id, dtype=torch.long)
    attn = torch.zeros((N, P + R), dtype=torch.long)
    resp_mask = torch.zeros((N, R))
    behav = torch.zeros((N, R))
    for k, (ids, lps) in enumerate(samples):
        p = prompts[k // n]
        input_ids[k, P - len(p):P] = torch.tensor(p)
        attn[k, P - len(p):P + len(ids)] = 1
        if ids:
            input_ids[k, P:P + len(ids)] = torch.tensor(ids)
            resp_mask[k, :len(ids)] = 1
            behav[k, :len(ids)] = torch.tensor(lps)
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    vision = [vision[k // n] for k in range(N)] if vision and any(v is not None for v in vision) else None
    return {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos,
            "resp_mask": resp_mask, "behav_logp": behav, "prompt_len": P, "vision": vision}


def forward_logprobs(model, batch, idx, temperature, device, entropy=False):
    """Log-probs (and optionally entropies) of the response tokens of the sequences `idx`.
    Returns [n, R] tensors; logits at temperature T, as the sampler used them."""
    P = batch["prompt_len"]
    ids = batch["input_ids"][idx].to(device)
    vis = vision_kwargs([batch["vision"][i] for i in idx.tolist()], ids, model.config.image_token_id, device) \
        if batch.get("vision") else {}
    # a VL model computes its own (M-RoPE) positions from the mask and the image tokens
    pos = None if vis else batch["position_ids"][idx].to(device)
    out = model(input_ids=ids, attention_mask=batch["attention_mask"][idx].to(device),
                position_ids=pos, use_cache=False, **vis)
    logits = out.logits[:, P - 1:-1].float() / temperature                         # [n, R, V]
    banned = vision_token_ids(model.config)
    if banned:  # as the samplers do (exp(-1e9) = 0, and the entropy stays finite)
        logits = logits.index_fill(-1, torch.tensor(banned, device=logits.device), -1e9)
    logp = token_logprobs(logits, ids[:, P:])
    ent = token_entropy(logits.detach()) if entropy else None
    return logp, ent


@torch.no_grad()
def recompute_logprobs(model, batch, temperature, micro_batch_size, device, entropy=True):
    """Old log-probs (and entropy) of the whole batch under the current weights, in micro-batches."""
    N = batch["input_ids"].shape[0]
    logps, ents = [], []
    for s in range(0, N, micro_batch_size):
        lp, en = forward_logprobs(model, batch, torch.arange(s, min(N, s + micro_batch_size)),
                                  temperature, device, entropy)
        logps.append(lp.cpu())
        ents.append(en.cpu() if entropy else None)
    return torch.cat(logps), (torch.cat(ents) if entropy else None)


def ppo_update(model, optim, sched, batch, args, device, gen):
    """PPO epochs over minibatches of `batch` (which carries old_logp, advantages, loss_mask and,
    for NPO, guide_mask / guide_logp). Returns summed diagnostics for logging."""
    world = dist.get_world_size()
    N = batch["input_ids"].shape[0]
    mb = max(1, args.minibatch_size // world)
    stats, n_opt = {}, 0
    for _ in range(args.ppo_epochs):
        perm = torch.randperm(N, generator=gen)
        for s in range(0, N, mb):
            idx = perm[s:s + mb]
            # the global token (or sequence) count of this minibatch, / world for FSDP's averaging
            m = batch["loss_mask"][idx]
            count = m.sum() if args.loss_agg == "token-mean" else (m.sum(1) > 0).sum()
            denom = all_reduce_sum([float(count)], device)[0] / world
            for u in range(0, len(idx), args.micro_batch_size):
                j = idx[u:u + args.micro_batch_size]
                logp, _ = forward_logprobs(model, batch, j, args.temperature, device)
                take = lambda key: batch[key][j].to(device) if batch.get(key) is not None else None  # noqa: E731
                loss, st = policy_loss(
                    logp, take("old_logp"), take("advantages"), take("loss_mask"), args.clip_low,
                    args.clip_high, args.loss_agg, denom, take("guide_mask"), take("guide_logp"),
                    args.guide_ratio, take("is_weight"))
                if args.kl_coef > 0:
                    kl = aggregate(kl_k3(logp, take("ref_logp")), take("loss_mask"), args.loss_agg, denom)
                    loss = loss + args.kl_coef * kl
                    st["kl_sum"] = kl.item()
                loss.backward()
                st["loss_sum"] = loss.item()
                for k, v in st.items():
                    if k.endswith("_max"):
                        stats[k] = max(stats.get(k, -math.inf), v)
                    elif k.endswith("_min"):
                        stats[k] = min(stats.get(k, math.inf), v)
                    else:
                        stats[k] = stats.get(k, 0.0) + v
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            if isinstance(grad_norm, DTensor):
                grad_norm = grad_norm.full_tensor()
            stats["grad_norm_sum"] = stats.get("grad_norm_sum", 0.0) + float(grad_norm)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            n_opt += 1
    stats["optimizer_steps"] = n_opt
    return stats


# =============================================================================================
# Evaluation: greedy pass@1 and mean accuracy of k samples at the training temperature
# =============================================================================================
def evaluate(engine, tokenizer, rows, prompts, args, processor=None):
    """Held-out accuracy over all ranks (each rank takes every world-th prompt)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = list(range(rank, len(rows), world))
    my_rows, my_prompts = [rows[i] for i in mine], [prompts[i] for i in mine]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    vision = vision_inputs(processor, my_rows)
    greedy = generate(engine, my_prompts, 1, 0.0, 1.0, args.max_new_tokens, eos, pad, args.gen_batch_size, vision)
    g = sum(score_responses(tokenizer, my_rows, greedy, 1))
    k = args.eval_samples
    s = 0.0
    if k > 0:
        sampled = generate(engine, my_prompts, k, args.temperature, args.top_p, args.max_new_tokens,
                           eos, pad, args.gen_batch_size, vision)
        s = sum(score_responses(tokenizer, my_rows, sampled, k))
    g, s, n = all_reduce_sum([g, s, len(mine)], collective_device())
    return {"eval_greedy": g / max(n, 1), f"eval_mean@{k}": s / max(n * k, 1), "eval_k": k, "eval_n": int(n)}


# =============================================================================================
# Checkpoints. A snapshot is everything needed to continue training from a step: this rank's
# model and optimizer shards, the scheduler, RNG states and the step (the data position is a pure
# function of it). On disk it is written atomically: a temp directory, then one rename.
# =============================================================================================
def _host_copy(x):
    """Detached CPU copy of a tensor (a DTensor's local shard), recursing into containers."""
    if isinstance(x, DTensor):
        return x.to_local().detach().to("cpu", copy=True)
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _host_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_host_copy(v) for v in x)
    return x


def _like(t, ref):
    """A saved local shard back on ref's device (as a DTensor with ref's layout when ref is one)."""
    if isinstance(ref, DTensor):
        return DTensor.from_local(t.to(ref.device), ref.device_mesh, ref.placements,
                                  run_check=False, shape=ref.shape, stride=ref.stride())
    return t.to(ref.device)


def take_snapshot(model, optim, sched, step, extra=None):
    """Host-memory snapshot of this rank's training state (bit-exact copies)."""
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"step": step, "model": _host_copy(model.state_dict()), "optim": _host_copy(optim.state_dict()),
            "sched": sched.state_dict(), "rng": rng, "extra": extra or {}}


@torch.no_grad()
def load_weights(snap, model):
    """Only the model shards of a snapshot (also used to score trajectories at a past checkpoint)."""
    params = model.state_dict()
    for name, saved in snap["model"].items():
        params[name].copy_(_like(saved, params[name]))


@torch.no_grad()
def restore_snapshot(snap, model, optim, sched, rng=True):
    """Load a snapshot back into live objects; returns its step."""
    load_weights(snap, model)
    osd = snap["optim"]
    order = [p for g in optim.param_groups for p in g["params"]]
    state = {}
    for i, st in osd["state"].items():
        p = order[int(i)]
        state[i] = {k: (_like(v, p) if isinstance(v, torch.Tensor) and k != "step" else v)
                    for k, v in st.items()}
    optim.load_state_dict({"state": state, "param_groups": osd["param_groups"]})
    sched.load_state_dict(snap["sched"])
    if rng:
        torch.set_rng_state(snap["rng"]["torch"])
        random.setstate(snap["rng"]["python"])
        if torch.cuda.is_available() and "cuda" in snap["rng"]:
            torch.cuda.set_rng_state(snap["rng"]["cuda"])
    return snap["step"]


_CRASH_COUNT = {}  # crash_point: times each named moment was passed in this process


def crash_point(name):
    """Tests only: with NPO_CRASH_AT=name:k[:rank] in the environment this process SIGKILLs itself the
    k-th time it passes `name` (on that rank), so a test can kill a run at an exact moment (inside a
    checkpoint write, a ring snapshot, an intervention). A no-op otherwise."""
    spec = os.environ.get("NPO_CRASH_AT", "").split(":")
    if spec[0] != name or (len(spec) > 2 and int(spec[2]) != dist.get_rank()):
        return
    _CRASH_COUNT[name] = _CRASH_COUNT.get(name, 0) + 1
    if _CRASH_COUNT[name] == int(spec[1]):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(out, snap, keep, compute, ring=()):
    """checkpoints/c<compute>/rank{r}.pt + meta.json, complete or absent (tmp dir + one rename).
    Named by the compute counter, which never goes back (the optimizer step does, at a rollback).
    `ring` names the ring snapshots this state refers to (files of their own, see ring_push), so a
    checkpoint is one training state, not one per snapshot."""
    rank, world = dist.get_rank(), dist.get_world_size()
    root = os.path.join(out, "checkpoints")
    final = os.path.join(root, f"c{compute:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    torch.save(snap, os.path.join(tmp, f"rank{rank}.pt"))
    crash_point("checkpoint")
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": snap["step"], "compute": compute, "world_size": world, "ring": list(ring)}, f)
        if not os.path.exists(final):  # (one that exists is this same state, written before a kill)
            os.replace(tmp, final)
        for d in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()


def complete_checkpoints(out):
    """Complete checkpoint directories (renamed from .tmp, with meta.json), oldest first."""
    root = os.path.join(out, "checkpoints")
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in names if not d.endswith(".tmp")
            and os.path.isfile(os.path.join(root, d, "meta.json"))]


def latest_checkpoint(out):
    """Newest complete checkpoint directory, or None."""
    done = complete_checkpoints(out)
    return done[-1] if done else None


def load_checkpoint(path):
    """This rank's snapshot from a checkpoint directory (weights_only: tensors and plain types)."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if meta["world_size"] != dist.get_world_size():
        raise SystemExit(f"error: {path} was written by {meta['world_size']} ranks; resume with the "
                         f"same --nproc_per_node (this run has {dist.get_world_size()})")
    return torch.load(os.path.join(path, f"rank{dist.get_rank()}.pt"), weights_only=True)


# =============================================================================================
# Metrics
# =============================================================================================
def open_metrics(out, resume_at):
    """metrics.jsonl, opened for appending; on resume, first cut to the records up to `resume_at`
    compute steps (the optimizer step can go back at an NPO rollback, the compute counter cannot),
    through a temp file and a rename so that a kill cannot lose the kept records. A line cut short
    by a kill is dropped. Rank 0 only."""
    path = os.path.join(out, "metrics.jsonl")
    if dist.get_rank() != 0:
        return None
    keep = []
    if resume_at is not None and os.path.exists(path):
        for line in open(path):
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("compute_steps", r.get("step", 0)) <= resume_at:
                keep.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def _json_safe(x):
    """NaN / inf (no correct trajectory to measure V on, say) become null: metrics.jsonl stays JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_metrics(f, rec):
    if f is not None:
        f.write(json.dumps(_json_safe(rec), allow_nan=False) + "\n")
        f.flush()


# =============================================================================================
# Setup shared by both modes
# =============================================================================================
def setup(args):
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
    tokenizer = load_tokenizer(path)
    processor = load_processor(path, args)
    try:
        train_rows, eval_rows = npo_data.load_data(args.data, args.difficulty, args.eval_data, args.eval_size)
        drop = args.filter_overlong_prompts
        train_prompts = encode_prompts(tokenizer, train_rows, args.max_prompt_tokens, args.data, processor, drop)
        train_rows, train_prompts = keep_encoded(train_rows, train_prompts, args.data)
        where = args.eval_data or f"{args.data} (eval split)"
        eval_prompts = encode_prompts(tokenizer, eval_rows, args.max_prompt_tokens, where, processor, drop)
        eval_rows, eval_prompts = keep_encoded(eval_rows, eval_prompts, where)
    except npo_data.DataError as e:
        raise SystemExit(f"data error: {e}") from None
    model = load_policy(path, args, device)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    engine = make_engine(path, args, device, max(len(r.get("images", [])) for r in train_rows + eval_rows))
    log0(f"npo | mode {args.mode} | model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
         f"params) | data {args.data}: {len(train_rows)} train, {len(eval_rows)} eval | "
         f"{world} rank(s) on {device.type} | rollout {args.rollout}")
    return dict(rank=rank, world=world, device=device, path=path, tokenizer=tokenizer, processor=processor, model=model,
                params=sum(p.numel() for p in model.parameters()),
                optim=optim, sched=sched, engine=engine, train_rows=train_rows, eval_rows=eval_rows,
                train_prompts=train_prompts, eval_prompts=eval_prompts)


# dense bf16 peak FLOP/s per GPU, for MFU
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def device_peak(device):
    """{'device': name, 'peak_flops': dense bf16 peak or None} for this rank's device."""
    if device.type != "cuda":
        return {"device": "cpu", "peak_flops": None}
    name = torch.cuda.get_device_name(device)
    return {"device": name, "peak_flops": next((v for k, v in PEAK_BF16.items() if k in name), None)}


def resume_if_asked(args, S, gen=None):
    """Restore the newest checkpoint when --resume; returns the step to start from."""
    if not args.resume:
        return 0
    ckpt = latest_checkpoint(args.out)
    if ckpt is None:
        log0("resume: no complete checkpoint, starting from step 0")
        return 0
    snap = load_checkpoint(ckpt)
    step = restore_snapshot(snap, S["model"], S["optim"], S["sched"])
    if gen is not None:
        gen.set_state(snap["extra"]["shuffle_rng"])
    S["resumed"] = snap["extra"]
    log0(f"resume: continuing from {ckpt} (step {step})")
    return step


def finish(args, S, summary):
    if not args.no_save_model:
        save_hf_model(S["model"], S["processor"] or S["tokenizer"], os.path.join(args.out, "model"))
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    log0("summary: " + json.dumps(summary))
    dist.barrier()  # no rank tears the process group down while another still talks to it (gloo aborts)


# =============================================================================================
# SFT warm-up: teach the base policy the answer format (and a little of the task) so that RL
# starts from a policy that sometimes succeeds, like a real instruct model.
# =============================================================================================
def sft_batch(tokenizer, rows, prompts, idx, processor=None):
    resp = [tokenizer(npo_data.sft_response(rows[i]), add_special_tokens=False)["input_ids"]
            + [tokenizer.eos_token_id] for i in idx]
    return make_batch([prompts[i] for i in idx], [(r, [0.0] * len(r)) for r in resp], 1,
                      tokenizer.pad_token_id, vision_inputs(processor, [rows[i] for i in idx]))


def run_sft(args, S):
    model, optim, sched, tok = S["model"], S["optim"], S["sched"], S["tokenizer"]
    start = resume_if_asked(args, S)
    metrics = open_metrics(args.out, start if "resumed" in S else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    sync_weights(S["engine"], model)
    base = evaluate(S["engine"], tok, S["eval_rows"], S["eval_prompts"], args, S["processor"])
    log0(f"sft | start | eval greedy {base['eval_greedy']:.3f}")
    t0 = time.time()
    for step in range(start, args.sft_steps):
        idx = prompts_for_step(step, len(S["train_rows"]), args.sft_batch_size, args.seed, rank, world)
        batch = sft_batch(tok, S["train_rows"], S["train_prompts"], idx, S["processor"])
        all_idx = torch.arange(len(idx))
        logp, _ = forward_logprobs(model, batch, all_idx, 1.0, S["device"])
        denom = all_reduce_sum([float(batch["resp_mask"].sum())], S["device"])[0] / world
        loss = aggregate(-logp, batch["resp_mask"].to(S["device"]), "token-mean", denom)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "sft_loss": all_reduce_sum([loss.item()], S["device"])[0] / world}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.sft_steps:
            sync_weights(S["engine"], model)
            rec.update(evaluate(S["engine"], tok, S["eval_rows"], S["eval_prompts"], args, S["processor"]))
            log0(f"sft | step {step + 1}/{args.sft_steps} | loss {rec['sft_loss']:.3f} | "
                 f"eval greedy {rec['eval_greedy']:.3f} | {time.time() - t0:.0f}s")
        write_metrics(metrics, rec)
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(args.out, take_snapshot(model, optim, sched, step + 1), args.keep_checkpoints, step + 1)
    sync_weights(S["engine"], model)
    final = evaluate(S["engine"], tok, S["eval_rows"], S["eval_prompts"], args, S["processor"])
    finish(args, S, {"mode": "sft", "steps": args.sft_steps, "eval_greedy_start": base["eval_greedy"],
                     "eval_greedy_end": final["eval_greedy"], "seconds": round(time.time() - t0, 1)})


# =============================================================================================
# NPO: the near-future guide. Pure functions first (injection, Q, V, S, triggers), then the
# checkpoint ring buffer and the intervention that rolls back and makes theta_t the guide.
# =============================================================================================
def inject_guide(rewards, samples, guide, gate=0.6):
    """Replace one incorrect on-policy sample per failing group with a verified guide sample.

    rewards: [B, G] on-policy rewards; samples: B*G (ids, logps), prompt-major;
    guide: B lists of the guide's correct (ids, logps) for each prompt (possibly empty).
    A group is helped when its on-policy accuracy is strictly below `gate` (measured before any
    replacement), it has an incorrect sample to give up, and the guide solved the prompt. The first
    incorrect slot takes the first guide sample not used yet (cycling). The guide sample is correct
    by construction, so its reward is 1. Each guide list is rotated in place, so the next injection
    for the same prompt (a later epoch) uses the next guide sample.
    Returns (samples, rewards, is_guide [B*G] bool); `samples` and `rewards` are not modified."""
    B, G = rewards.shape
    samples, rewards = list(samples), rewards.clone()
    is_guide = torch.zeros(B * G, dtype=torch.bool)
    for i in range(B):
        wrong = (rewards[i] < 1).nonzero().flatten().tolist()
        if rewards[i].mean().item() < gate and wrong and guide[i]:
            j = wrong[0]
            samples[i * G + j] = guide[i][0]
            guide[i].append(guide[i].pop(0))  # next injection of this prompt uses the next sample
            rewards[i, j] = 1.0
            is_guide[i * G + j] = True
    return samples, rewards, is_guide


def signal_quality(source_solved, learner_solved):
    """Q: on prompts the learner failed (no correct sample in its group), how much more often the
    source solves them than the learner itself does with the same number of samples m: the mean
    of the per-prompt difference d = solved_by_source - solved_by_learner (each 0 or 1), so a
    source that knows nothing the learner does not has Q = 0 in expectation, and its standard
    error. Inputs: one bool per prompt each. Returns (Q, SE, moments [n, sum d, sum d^2])."""
    d = [float(a) - float(b) for a, b in zip(source_solved, learner_solved)]
    mom = [float(len(d)), sum(d), sum(x * x for x in d)]
    return (*quality_from_moments(mom), mom)


def quality_from_moments(mom):
    """(Q, SE) from [n, sum d, sum d^2] (all-reduced over ranks); SE from the unbiased variance."""
    n, s1, s2 = mom
    if n == 0:
        return 0.0, 0.0
    q = s1 / n
    var = max(s2 - n * q * q, 0.0) / (n - 1) if n > 1 else 0.0
    return q, math.sqrt(var / n)


def variance_cost(logp_policy, logp_source, mask):
    """V: how much importance weighting inflates the variance of a gradient estimated from the
    source's correct trajectories, w = pi_policy / pi_source. The variance of a (self-normalised)
    importance-sampled mean is that of an on-policy mean times E[w^2] / E[w]^2 = 1 + CV(w)^2 (the
    design effect, n / effective sample size): 1 for an on-policy source in every sample, growing
    with the distance between the two policies, = 1 + Var(w) when E[w] = 1, and scale-free, so it is
    defined for the external source too, whose pi_source = 1 is no distribution. Sequence level
    (what V means in npo): w = exp(mean over the sequence's tokens of (log pi_policy - log pi_source));
    token level (logged): one w per token. Inputs [N, T]; returns (V_seq, V_tok, moments), the
    moments [n, sum w, sum w^2] twice, so that ranks can combine them (variance_from_moments)."""
    m = mask.bool()
    d = torch.where(m, (logp_policy - logp_source).double(), 0.0)
    n_tok = m.sum(dim=1)
    keep = n_tok > 0
    w_seq = torch.exp(d.sum(dim=1)[keep] / n_tok[keep])
    w_tok = torch.exp(d[m])
    mom = [float(len(w_seq)), w_seq.sum().item(), (w_seq ** 2).sum().item(),
           float(len(w_tok)), w_tok.sum().item(), (w_tok ** 2).sum().item()]
    return (*variance_from_moments(mom)[:2], mom)


def variance_from_moments(mom):
    """(V_seq, V_tok, Var(w_seq)) from [n, sum w, sum w^2] for sequences and for tokens: V = n sum w^2
    / (sum w)^2 (NaN without trajectories); Var(w), the population variance, is a logged diagnostic."""
    (n, s1, s2), (nt, t1, t2) = mom[0:3], mom[3:6]
    v = lambda n, s1, s2: n * s2 / (s1 * s1) if n else float("nan")  # noqa: E731
    return v(n, s1, s2), v(nt, t1, t2), (max(s2 / n - (s1 / n) ** 2, 0.0) if n else float("nan"))


def effective_signal(q, v):
    """S = Q / V. 0 when V is NaN (the source has no correct trajectory to measure V on)."""
    return q / v if v == v else 0.0


def select_delta(table, min_delta=1, z=2.0):
    """AutoNPO's choice among the Q/V/S rows (one per Delta): the largest S with Delta >= min_delta
    (ties: the smaller Delta). Returns (row, None), or (None, why) when no row qualifies or the best
    row's Q is within z standard errors of 0 (no evidence that the guide knows anything the
    learner does not: rolling back would only cost the replayed steps)."""
    rows = [r for r in table if r["delta"] >= min_delta]
    best = max(rows, key=lambda r: (r["S"], -r["delta"]), default=None)
    if best is None:
        return None, f"no candidate snapshot with Delta >= {min_delta}"
    if best["Q"] <= z * best["Q_se"]:
        return None, (f"best Delta {best['delta']}: Q {best['Q']:.3f} is within {z:g} standard errors "
                      f"({best['Q_se']:.3f}) of 0")
    return best, None


def slope_with_se(y):
    """Least-squares slope of y against 0..n-1 and its standard error (residual variance with
    n - 2 degrees of freedom, at least 1)."""
    n = len(y)
    xm, ym = (n - 1) / 2, sum(y) / n
    sxx = sum((i - xm) ** 2 for i in range(n))
    if not sxx:
        return 0.0, 0.0
    b = sum((i - xm) * (v - ym) for i, v in enumerate(y)) / sxx
    rss = sum((v - ym - b * (i - xm)) ** 2 for i, v in enumerate(y))
    return b, math.sqrt(rss / max(n - 2, 1) / sxx)


def reward_stagnation(rewards, window, min_slope, z=2.0):
    """True when the training reward has, with confidence, stopped rising: the least-squares slope
    of the last `window` per-step rewards plus z standard errors is below `min_slope` (reward per
    step). A noisy curve does not pass (its slope is uncertain), a flat low-noise plateau does; a
    bare slope test would fire at the first chance, like a timer. Waits for two windows of history."""
    if len(rewards) < 2 * window:
        return False
    b, se = slope_with_se(rewards[-window:])
    return b + z * se < min_slope


def entropy_collapse(entropies, window, frac):
    """True when the mean token entropy of the last `window` steps is below `frac` times that of the
    first `window` steps of the run."""
    if len(entropies) < 2 * window:
        return False
    early = sum(entropies[:window]) / window
    return sum(entropies[-window:]) / window < frac * early


def sparse_reward(all_wrong_shares, window, threshold):
    """True when, over the last `window` steps, more than `threshold` of the groups were all wrong."""
    if len(all_wrong_shares) < window:
        return False
    return sum(all_wrong_shares[-window:]) / window > threshold


def autonpo_trigger(hist, since_last, n_done, ring_ready, args):
    """Why AutoNPO intervenes now, or None. hist: per-step lists 'reward', 'entropy', 'all_wrong'
    in compute order (replayed steps included); since_last: steps since the last intervention."""
    if n_done >= args.max_interventions or since_last < args.cooldown or not ring_ready:
        return None
    if sparse_reward(hist["all_wrong"], args.trigger_window, args.sparse_threshold):
        return "sparse_reward"
    if entropy_collapse(hist["entropy"], args.trigger_window, args.entropy_frac):
        return "entropy_collapse"
    if reward_stagnation(hist["reward"], args.trigger_window, args.stagnation_slope, args.z):
        return "reward_stagnation"
    return None


def ring_push(ring, snap, size, ring_dir, compute):
    """Add a snapshot to the ring buffer: written once, when taken, as this rank's file under
    `ring_dir` (tmp + rename), and kept in the ring by name; the oldest beyond `size` leave it.
    Checkpoints refer to ring snapshots by name instead of carrying copies, and ring_gc deletes a
    file once neither the ring nor a checkpoint refers to it. The name holds the compute counter:
    after a rollback the same optimizer step is taken again, on another branch."""
    name = f"step{snap['step']:06d}_c{compute:07d}"
    path = ring_file(ring_dir, name)
    os.makedirs(ring_dir, exist_ok=True)
    torch.save(snap, path + ".tmp")
    crash_point("ring")
    os.replace(path + ".tmp", path)
    ring[:] = [e for e in ring if e["step"] != snap["step"]] + [{"step": snap["step"], "name": name}]
    del ring[:-size]


def ring_file(ring_dir, name):
    return os.path.join(ring_dir, f"{name}_rank{dist.get_rank()}.pt")


def ring_get(ring, step, ring_dir):
    """The snapshot the ring holds for `step` (read from its file)."""
    name = next(e["name"] for e in ring if e["step"] == step)
    return torch.load(ring_file(ring_dir, name), weights_only=True)


def ring_truncate(ring, step):
    """After a rollback to `step`, the snapshots after it belong to an abandoned branch."""
    ring[:] = [e for e in ring if e["step"] <= step]


def ring_gc(ring, ring_dir, out):
    """Delete this rank's ring files that neither the ring nor a complete checkpoint refers to (and
    files left half-written by a kill)."""
    keep = {e["name"] for e in ring}
    for d in complete_checkpoints(out):
        try:
            with open(os.path.join(d, "meta.json")) as f:
                keep |= set(json.load(f).get("ring", []))
        except FileNotFoundError:  # being deleted by rank 0: it refers to nothing any more
            pass
    mine = f"_rank{dist.get_rank()}.pt"
    for f in os.listdir(ring_dir) if os.path.isdir(ring_dir) else []:
        if f.endswith(mine + ".tmp") or (f.endswith(mine) and f[:-len(mine)] not in keep):
            os.remove(os.path.join(ring_dir, f))


def sample_correct(S, args, rows_idx):
    """m samples per prompt from the policy the engine holds (the guide theta_t, or a learner theta_s
    synced in to measure what it solves itself), verified. Returns ({row: [correct (ids, sampling
    logps)]}, generated tokens)."""
    tok, m = S["tokenizer"], args.guide_samples
    rows_idx = sorted(set(rows_idx))
    samples = generate(S["engine"], [S["train_prompts"][i] for i in rows_idx], m, args.temperature,
                       args.top_p, args.max_new_tokens, tok.eos_token_id, tok.pad_token_id, args.gen_batch_size,
                       vision_inputs(S["processor"], [S["train_rows"][i] for i in rows_idx]))
    rewards = score_responses(tok, [S["train_rows"][i] for i in rows_idx], samples, m)
    correct = {i: [samples[k * m + j] for j in range(m) if rewards[k * m + j] >= 1]
               for k, i in enumerate(rows_idx)}
    return correct, sum(len(ids) for ids, _ in samples)


def past_solutions(replay, rows_idx, m, before=None):
    """The 'past' source (replay, ExGRPO / RLEP-like): each row's newest (at most m) correct
    on-policy samples recorded before step `before` (all when None), with their sampling log-probs.
    replay: (step, row, ids, logps) in the order they were recorded."""
    out = {i: [] for i in rows_idx}
    for step, row, ids, lps in reversed(replay):
        if row in out and (before is None or step < before) and len(out[row]) < m:
            out[row].append((ids, lps))
    return out


def reference_solutions(S, rows_idx):
    """The 'external' source (LUFFY-like): each row's reference solution from the data, tokenized
    as the SFT warm-up writes it, with log pi_source = 0 on every token: a deterministic teacher
    whose own probabilities are unknown, which is how LUFFY treats its teacher's tokens. Rows whose
    reference the verifier rejects get none."""
    tok, cache = S["tokenizer"], S.setdefault("references", {})  # a pure function of the row: made once
    new = sorted(set(rows_idx) - cache.keys())
    if new:
        sols = [tok(npo_data.sft_response(S["train_rows"][i]), add_special_tokens=False)["input_ids"]
                + [tok.eos_token_id] for i in new]
        ok = score_responses(tok, [S["train_rows"][i] for i in new], [(ids, None) for ids in sols], 1)
        cache.update({i: [(ids, [0.0] * len(ids))] if r >= 1 else [] for i, ids, r in zip(new, sols, ok)})
    return {i: list(cache[i]) for i in set(rows_idx)}


def dummy_batch(S):
    """A one-sequence batch (training row 0, a one-token response) for ranks that must keep in step."""
    tok = S["tokenizer"]
    return make_batch(S["train_prompts"][:1], [([tok.eos_token_id], [0.0])], 1, tok.pad_token_id,
                      vision_inputs(S["processor"], S["train_rows"][:1]))


@torch.no_grad()
def sequence_logprobs_padded(model, batch, args, device, dummy):
    """Response log-probs of every sequence in `batch` (None: no sequences on this rank), with the
    same number of forward calls on every rank: FSDP all-gathers inside forward, so a rank with
    fewer sequences runs `dummy` (a one-sequence batch like the real ones: with an image for a VL
    model, whose vision blocks all-gather too) to keep in step with the others."""
    N = 0 if batch is None else batch["input_ids"].shape[0]
    mb = args.micro_batch_size
    calls = int(all_reduce_max([max(1, math.ceil(N / mb))], device)[0])
    out = []
    for c in range(calls):
        if c * mb < N:
            lp, _ = forward_logprobs(model, batch, torch.arange(c * mb, min(N, (c + 1) * mb)),
                                     args.temperature, device)
            out.append(lp.cpu())
        else:
            forward_logprobs(model, dummy, torch.arange(1), args.temperature, device)
    return torch.cat(out) if out else None


def score_solutions(S, args, solutions):
    """Log-probs of every trajectory of `solutions` ({row: [(ids, logps)]}) under the policy now in
    the trainer, in the same layout; the same number of forward calls on every rank. Returns
    (solutions rescored, tokens through the forward)."""
    rows = [r for r in sorted(solutions) for _ in solutions[r]]
    traj = [x for r in sorted(solutions) for x in solutions[r]]
    batch = make_batch([S["train_prompts"][r] for r in rows], traj, 1, S["tokenizer"].pad_token_id,
                       vision_inputs(S["processor"], [S["train_rows"][r] for r in rows])) if traj else None
    lp = sequence_logprobs_padded(S["model"], batch, args, S["device"], dummy_batch(S))
    out, k = {r: [] for r in solutions}, 0
    for r in sorted(solutions):
        for ids, _ in solutions[r]:
            out[r].append((ids, lp[k, :len(ids)].tolist()))
            k += 1
    return out, (int(batch["attention_mask"].sum()) if traj else 0)


def source_qv(S, args, solutions, q_rows, learner_solved):
    """Q, V and S of one source for the learner now loaded in the trainer (all ranks together).
    solutions: {row: [correct (ids, log pi_source)]} on this rank's pool rows; q_rows: the prompts
    the learner failed around its step; learner_solved: {row: the learner solved it with m samples
    of its own}. Q compares the two on q_rows (signal_quality); V weighs every source trajectory by
    pi_learner / pi_source (variance_cost)."""
    learner, scored = score_solutions(S, args, solutions)
    lp_l = [lp for r in sorted(solutions) for _, lp in learner[r]]
    lp_s = [lp for r in sorted(solutions) for _, lp in solutions[r]]
    width = max((len(x) for x in lp_l), default=0)
    pad = lambda xs: torch.tensor([x + [0.0] * (width - len(x)) for x in xs], dtype=torch.float64)  # noqa: E731
    mask = pad([[1.0] * len(x) for x in lp_l])
    v_mom = variance_cost(pad(lp_l), pad(lp_s), mask)[2] if lp_l else [0.0] * 6
    q_mom = signal_quality([bool(solutions.get(r)) for r in q_rows], [learner_solved[r] for r in q_rows])[2]
    own = sum(learner_solved[r] for r in q_rows)
    tot = all_reduce_sum([*q_mom, *v_mom, scored, own], S["device"])
    q, q_se = quality_from_moments(tot[0:3])
    v_seq, v_tok, var_w = variance_from_moments(tot[3:9])
    return {"Q": q, "Q_se": q_se, "V": v_seq, "V_token": v_tok, "var_w": var_w, "S": effective_signal(q, v_seq),
            "learner_pass": tot[10] / tot[0] if tot[0] else 0.0, "pool_prompts": int(tot[0]),
            "trajectories": int(tot[3]), "scored_tokens": int(tot[9])}


def qvs_table(S, args, ring, t, candidates, pool, replay):
    """Q, V and S of each source for the learner at each ring snapshot s = t - Delta.

    The learner theta_s is the snapshot, loaded into the trainer and synced into the engine. Its
    failures are the mistake-pool prompts (no correct sample in the group) of steps [s, s +
    ring_every); on them Q is how much more often a source solves a prompt than the learner does
    with m samples of its own, and V weighs the source's correct trajectories by pi_learner /
    pi_source. Sources: future = the guide theta_t (m samples per prompt, sampled and scored before
    any snapshot is loaded: pi_guide from the trainer, not from the sampler), past = the learner's
    own successes recorded before s, external = the data's reference solutions. Only the future
    rows choose Delta; the others put NPO's source on the same Q-V map as the baselines'. All ranks
    combine sums, so every rank picks the same Delta. Trainer and engine are left at the last
    candidate. Returns (table, generated tokens, scored tokens)."""
    windows = {s: [r for st, r in pool if s <= st < s + args.ring_every] for s in candidates}
    rows = sorted({r for w in windows.values() for r in w})
    future, generated = sample_correct(S, args, rows)
    future, scored = score_solutions(S, args, future)
    external = reference_solutions(S, rows)
    table = []
    for s in candidates:
        load_weights(ring_get(ring, s, args.ring_dir), S["model"])
        sync_weights(S["engine"], S["model"])
        learner, n = sample_correct(S, args, windows[s])
        generated += n
        learner_solved = {r: bool(v) for r, v in learner.items()}
        for source, sols in (("future", future), ("past", past_solutions(replay, rows, args.guide_samples, s)),
                             ("external", external)):
            table.append({"source": source, "delta": t - s, "snapshot": s,
                          **source_qv(S, args, sols, windows[s], learner_solved)})
            scored += table[-1]["scored_tokens"]
    return table, generated, scored


def intervene(S, args, st, t, deltas, reason):
    """Roll back to t - Delta with theta_t as the guide. `deltas`: the candidates (manual NPO: one;
    AutoNPO: every snapshot in the ring). Measures Q/V/S, picks the Delta (manual NPO: the one it
    is given; AutoNPO: select_delta, which may decline), samples the guide's trajectories for the
    prompts of the steps to be replayed (theta_t back in the engine), restores the snapshot, drops
    what belongs to the abandoned branch (newer ring snapshots, replayed successes, mistake-pool
    entries of the replayed steps), syncs the engine and counts the intervention in `st`. The guide
    pool serves the replayed steps only (it expires at t). Returns (new step, guide pool, record)."""
    ring, device = st["ring"], S["device"]
    theta_t = {"model": _host_copy(S["model"].state_dict())}  # the guide's weights (qvs_table loads others)
    candidates = [t - d for d in deltas if any(e["step"] == t - d for e in ring) and d > 0]
    table, generated, scored = qvs_table(S, args, ring, t, candidates, st["pool"], st["replay"]) \
        if candidates else ([], 0, 0)
    if candidates:  # theta_t back in the trainer and in the engine
        load_weights(theta_t, S["model"])
        sync_weights(S["engine"], S["model"])
    future = [r for r in table if r["source"] == "future"]
    if args.mode == "npo":  # manual NPO: the Delta it is told
        best, why = (future[0], None) if future else (None, "no ring snapshot at that Delta")
    else:
        best, why = select_delta(future, args.min_delta, args.z)
    rec = {"event": "intervention", "step": t, "reason": reason, "table": table, "delta": best and best["delta"]}
    new_step, guide_pool = t, {}
    if best is None:
        rec["skipped"] = why
    else:
        new_step = best["snapshot"]
        replayed = [i for step in range(new_step, t) for i in prompts_for_step(
            step, len(S["train_rows"]), args.prompts_per_step, args.seed, dist.get_rank(), dist.get_world_size())]
        guide_pool, n = sample_correct(S, args, replayed)
        generated += n
        crash_point("intervention")
        restore_snapshot(ring_get(ring, new_step, args.ring_dir), S["model"], S["optim"], S["sched"], rng=False)
        ring_truncate(ring, new_step)
        st["replay"] = [e for e in st["replay"] if e[0] < new_step]
        st["pool"] = [e for e in st["pool"] if e[0] < new_step]
        st["guide_until"] = t
        sync_weights(S["engine"], S["model"])
        solved, total = all_reduce_sum([sum(bool(v) for v in guide_pool.values()), len(guide_pool)], device)
        rec["guide_solved_share"] = solved / max(total, 1)
    generated, scored = all_reduce_sum([generated, scored], device)
    scored += sum(r["scored_tokens"] for r in table)
    rec["guide_tokens_generated"], rec["scored_tokens"] = int(generated), int(scored)
    st["generated_tokens"] += int(generated)
    st["compute_flops"] += 2 * S["params"] * (generated + scored)  # forward passes only
    st["last_intervention"] = st["compute_steps"]  # a skipped one waits out the cooldown too
    st["interventions"] += "skipped" not in rec
    rec.update(compute_steps=st["compute_steps"], generated_tokens=st["generated_tokens"],
               compute_flops=st["compute_flops"])
    return new_step, guide_pool, rec


# =============================================================================================
# Training loop: GRPO, with NPO's manual interventions or AutoNPO's triggers on top
# =============================================================================================
def rollout(S, args, step, guide=None):
    """Sample G responses for this rank's prompts of `step`, score them, inject guide samples into
    failing groups (NPO, when `guide` holds the guide's correct samples), build the training batch."""
    tok, G = S["tokenizer"], args.group_size
    idx = prompts_for_step(step, len(S["train_rows"]), args.prompts_per_step, args.seed,
                           dist.get_rank(), dist.get_world_size())
    rows, prompts = [S["train_rows"][i] for i in idx], [S["train_prompts"][i] for i in idx]
    t = time.time()
    vision = vision_inputs(S["processor"], rows)
    samples = generate(S["engine"], prompts, G, args.temperature, args.top_p, args.max_new_tokens,
                       tok.eos_token_id, tok.pad_token_id, args.gen_batch_size, vision)
    t_gen = time.time() - t
    t = time.time()
    rewards = torch.tensor(score_responses(tok, rows, samples, G)).view(len(rows), G)   # [B, G]
    t_score = time.time() - t
    failed = rewards.max(dim=1).values <= 0                      # [B] the mistake pool: no correct sample
    successes = [(idx[k // G], *samples[k]) for k in range(len(samples)) if rewards.view(-1)[k] >= 1]
    is_guide = torch.zeros(len(samples), dtype=torch.bool)
    on_policy_rewards = rewards                                  # [B, G] what the policy itself did
    if guide:
        samples, rewards, is_guide = inject_guide(rewards, samples, [guide.get(i, []) for i in idx], args.gate)
    all_wrong = on_policy_rewards.max(dim=1).values <= 0         # [B] before injection (triggers read these)
    batch = make_batch(prompts, samples, G, tok.pad_token_id, vision)
    batch["rewards"], batch["on_policy_rewards"] = rewards, on_policy_rewards
    batch["advantages"] = grpo_advantages(rewards, args.adv_std).flatten()             # [B*G]
    zero = zero_signal_groups(rewards)                                                  # [B]
    # groups without signal are counted and left out of the loss (their advantage is 0 anyway)
    batch["loss_mask"] = batch["resp_mask"] * (~zero).repeat_interleave(G).float().unsqueeze(1)
    if is_guide.any():
        batch["guide_mask"] = batch["resp_mask"] * is_guide.float().unsqueeze(1)     # [B*G, R]
        batch["guide_logp"] = batch["behav_logp"]   # the guide's own sampling log-probs there
    on_policy = [ids for (ids, _), g in zip(samples, is_guide.tolist()) if not g]
    return batch, {"generate_s": t_gen, "score_s": t_score, "zero_signal": zero.float().sum().item(),
                   "all_wrong": all_wrong.float().sum().item(),
                   "all_wrong_mixed": (rewards.max(dim=1).values <= 0).float().sum().item(),
                   "rescued": (all_wrong & is_guide.view(-1, G).any(dim=1)).float().sum().item(),
                   "groups": len(rows), "injected": int(is_guide.sum()),
                   "gen_tokens": sum(len(ids) for ids in on_policy), "prompt_tokens": sum(map(len, prompts)),
                   "failed_rows": [i for i, f in zip(idx, failed.tolist()) if f], "successes": successes}


def train_step(S, args, batch, gen):
    """Old log-probs, then PPO epochs; returns the step's diagnostics."""
    t = time.time()
    old, ent = recompute_logprobs(S["model"], batch, args.temperature, args.micro_batch_size, S["device"])
    batch["old_logp"] = old
    on_policy = batch["resp_mask"] * (1 - batch["guide_mask"]) if "guide_mask" in batch else batch["resp_mask"]
    weight, tis = tis_weights(old, batch["behav_logp"], on_policy, args.tis_cap or math.inf)
    batch["is_weight"] = weight if args.tis_cap else None  # off: still measured and logged
    if args.kl_coef > 0:
        batch["ref_logp"], _ = recompute_logprobs(S["ref"], batch, args.temperature,
                                                  args.micro_batch_size, S["device"], entropy=False)
    stats = ppo_update(S["model"], S["optim"], S["sched"], batch, args, S["device"], gen)
    stats.update(tis)
    stats["entropy_sum"] = float((ent * on_policy).sum())  # of the policy's own samples (entropy trigger)
    stats["resp_tokens"] = float(on_policy.sum())
    stats["train_tokens"] = float(batch["attention_mask"].sum())  # per pass over the batch (MFU)
    stats["train_s"] = time.time() - t
    return stats


def step_metrics(step, batch, roll, stats, args):
    """Reduce one step's numbers over ranks into the metrics.jsonl record."""
    r, mixed = batch["on_policy_rewards"], batch["rewards"]
    keys = ["reward_sum", "correct_sum", "mixed_correct_sum", "n_seq", "zero_signal", "all_wrong",
            "all_wrong_mixed", "rescued", "groups", "entropy_sum",
            "resp_tokens", "on_tokens", "on_clipfrac_sum", "on_ratio_sum", "guide_tokens",
            "guide_clipfrac_sum", "guide_ratio_sum", "loss_sum", "grad_norm_sum", "kl_sum", "injected",
            "gen_tokens", "prompt_tokens", "tis_tokens", "tis_ratio_sum", "tis_capped_sum", "train_tokens"]
    local = {"reward_sum": r.sum().item(), "correct_sum": (r >= 1).sum().item(),
             "mixed_correct_sum": (mixed >= 1).sum().item(), "n_seq": r.numel(),
             **{k: v for k, v in roll.items() if k not in ("failed_rows", "successes")}, **stats}
    tot = dict(zip(keys, all_reduce_sum([float(local.get(k, 0.0)) for k in keys], collective_device())))
    extremes = ["on_ratio", "guide_ratio", "tis_ratio"]
    ext = all_reduce_max([stats.get(f"{k}_max", -math.inf) for k in extremes]
                         + [-stats.get(f"{k}_min", math.inf) for k in extremes], collective_device())
    hi = dict(zip(extremes, ext[:len(extremes)]))
    lo = dict(zip(extremes, [-x for x in ext[len(extremes):]]))
    world, n_opt = dist.get_world_size(), max(1, stats["optimizer_steps"])
    rec = {
        "step": step + 1,
        "reward": tot["reward_sum"] / tot["n_seq"],
        "accuracy": tot["correct_sum"] / tot["n_seq"],
        "entropy": tot["entropy_sum"] / max(tot["resp_tokens"], 1),
        "response_len": tot["resp_tokens"] / max(tot["n_seq"] - tot["injected"], 1),  # on-policy samples
        "zero_signal_share": tot["zero_signal"] / tot["groups"],
        "all_wrong_share": tot["all_wrong"] / tot["groups"],
        # after injection (what the loss sees): accuracy, all-wrong groups left, all-wrong groups rescued
        "accuracy_mixed": tot["mixed_correct_sum"] / tot["n_seq"],
        "all_wrong_share_mixed": tot["all_wrong_mixed"] / tot["groups"],
        "rescued": int(tot["rescued"]),
        "injected": int(tot["injected"]),
        "clipfrac_on": tot["on_clipfrac_sum"] / max(tot["on_tokens"], 1),
        "ratio_mean_on": tot["on_ratio_sum"] / max(tot["on_tokens"], 1),
        "ratio_max_on": hi["on_ratio"], "ratio_min_on": lo["on_ratio"],
        # sampler mismatch pi_old / pi_sampler on sampled tokens (TIS weight before the cap)
        "tis_ratio_mean": tot["tis_ratio_sum"] / max(tot["tis_tokens"], 1),
        "tis_ratio_min": lo["tis_ratio"], "tis_ratio_max": hi["tis_ratio"],
        "tis_capped": tot["tis_capped_sum"] / max(tot["tis_tokens"], 1),
        "loss": tot["loss_sum"] / (world * n_opt),
        "grad_norm": tot["grad_norm_sum"] / (world * n_opt),
        "lr": args.lr,
        "generate_s": roll["generate_s"], "score_s": roll["score_s"], "train_s": stats["train_s"],
        "step_tokens": int(tot["gen_tokens"]), "prompt_tokens": int(tot["prompt_tokens"]),
        "train_tokens": int(tot["train_tokens"]),
    }
    if tot["guide_tokens"]:
        rec.update(clipfrac_guide=tot["guide_clipfrac_sum"] / tot["guide_tokens"],
                   ratio_mean_guide=tot["guide_ratio_sum"] / tot["guide_tokens"],
                   ratio_max_guide=hi["guide_ratio"], ratio_min_guide=lo["guide_ratio"])
    if args.kl_coef > 0:
        rec["kl"] = tot["kl_sum"] / (world * n_opt)
    return rec


def new_npo_state():
    """Everything NPO / AutoNPO carries across steps (saved in checkpoints for --resume)."""
    return {"ring": [], "pool": [], "replay": [], "guide": {}, "done": [], "interventions": 0,
            "hist": {"reward": [], "entropy": [], "all_wrong": []},
            "compute_steps": 0, "generated_tokens": 0, "compute_flops": 0.0, "last_intervention": 0,
            "guide_until": 0}


def due_intervention(args, st, step):
    """(candidate Deltas, reason) if an intervention is due after `step` steps, else None.
    Manual NPO: bootstrapping (at step Delta, back to 0) and plateau breakthrough (at a given step,
    back by Delta), once each. AutoNPO: a trigger fired; every older ring snapshot is a candidate."""
    if args.mode == "npo":
        if args.bootstrap_delta and step == args.bootstrap_delta and "bootstrap" not in st["done"]:
            st["done"].append("bootstrap")
            return [args.bootstrap_delta], "bootstrap"
        if args.breakthrough_at and step == args.breakthrough_at and "breakthrough" not in st["done"]:
            st["done"].append("breakthrough")
            return [args.breakthrough_delta], "breakthrough"
    if args.mode == "autonpo":
        deltas = [step - e["step"] for e in st["ring"] if e["step"] < step]
        reason = autonpo_trigger(st["hist"], st["compute_steps"] - st["last_intervention"],
                                 st["interventions"], bool(deltas), args)
        if reason:
            return deltas, reason
    return None


def track_step(st, args, step, rec, roll, params):
    """Compute counters, the mistake pool, the replay of past successes and the trigger history
    after one training step. Compute is counted in model FLOPs (2N per token through a forward
    pass: prompts, generated tokens; plus the training passes), the one measure every "per
    compute" number uses: it includes the guide sampling and Q / V scoring of interventions."""
    st["compute_steps"] += 1
    st["generated_tokens"] += rec["step_tokens"]
    st["compute_flops"] += rec["train_flops"] + 2 * params * (rec["step_tokens"] + rec["prompt_tokens"])
    st["pool"] = (st["pool"] + [(step, i) for i in roll["failed_rows"]])[-args.pool_size:]
    st["replay"] = (st["replay"] + [(step, *x) for x in roll["successes"]])[-args.replay_size:]
    for key, val in (("reward", rec["reward"]), ("entropy", rec["entropy"]),
                     ("all_wrong", rec["all_wrong_share"])):
        st["hist"][key].append(val)


def step_guide(S, args, st, step):
    """The guide samples on offer to this step's failing groups: the near-future guide's (set by
    the last intervention), or those of the past / external source for this step's prompts."""
    if args.guide_source == "future":
        if step >= st["guide_until"]:  # the guide pool serves the replayed steps only
            st["guide"] = {}
        return st["guide"]
    idx = prompts_for_step(step, len(S["train_rows"]), args.prompts_per_step, args.seed,
                           dist.get_rank(), dist.get_world_size())
    if args.guide_source == "past":
        return past_solutions(st["replay"], idx, args.guide_samples)
    return reference_solutions(S, idx)


def step_line(args, step, rec):
    ev = f" | eval greedy {rec['eval_greedy']:.3f}" if "eval_greedy" in rec else ""
    inj = f" | injected {rec['injected']}" if args.mode != "grpo" else ""
    return (f"{args.mode} | step {step}/{args.steps} | reward {rec['reward']:.3f} | "
            f"zero-signal {rec['zero_signal_share']:.2f} | entropy {rec['entropy']:.3f} | "
            f"clip {rec['clipfrac_on']:.3f}{inj} | gen {rec['generate_s']:.2f}s score {rec['score_s']:.2f}s "
            f"train {rec['train_s']:.2f}s sync {rec['sync_s']:.3f}s{ev}")


def intervention_line(args, irec, new_step):
    head = irec.get("skipped") or (f"roll back to step {new_step} (Delta {irec['delta']}), guide solved "
                                   f"{irec['guide_solved_share']:.2f} of the replayed prompts")
    rows = [f"Delta {r['delta']:>3} {r['source']:>8}: Q {r['Q']:+.3f} ± {r['Q_se']:.3f} (learner solves "
            f"{r['learner_pass']:.2f} of {r['pool_prompts']})  V {r['V']:.4g}  S {r['S']:+.3g}" for r in irec["table"]]
    return f"{args.mode} | intervention at step {irec['step']} ({irec['reason']}): {head}" + \
        "".join("\n  " + r for r in rows)


def run_rl(args, S):
    tok = S["tokenizer"]
    if args.kl_coef > 0:
        S["ref"] = load_policy(S["path"], args, S["device"]).eval()
    gen = torch.Generator().manual_seed(args.seed * 7919 + dist.get_rank())  # minibatch shuffles
    start = resume_if_asked(args, S, gen)
    st = S.get("resumed", {}).get("npo") or new_npo_state()
    metrics = open_metrics(args.out, st["compute_steps"] if "resumed" in S else None)
    sync_weights(S["engine"], S["model"])
    if start == 0:
        base = evaluate(S["engine"], tok, S["eval_rows"], S["eval_prompts"], args, S["processor"])
        write_metrics(metrics, {"step": 0, "compute_steps": 0, "generated_tokens": 0, "compute_flops": 0.0,
                                "wall_s": 0.0, **base,
                                "params": S["params"], **device_peak(S["device"])})
    else:  # evaluating again would draw from the restored RNG and change the next steps
        base = S["resumed"]["base_eval"]
    log0(f"{args.mode} | step {start} | base eval greedy {base['eval_greedy']:.3f} | "
         f"mean@{args.eval_samples} {base[f'eval_mean@{args.eval_samples}']:.3f} (n={base['eval_n']})")
    needed = {0, args.breakthrough_at - args.breakthrough_delta} if args.mode == "npo" else {0}
    t0, last_eval, step = time.time(), base, start
    wall0 = S.get("resumed", {}).get("wall_s", 0.0)
    while step < args.steps:
        # ---- Checkpoint ring buffer (NPO / AutoNPO) ------------------------------------------
        if args.mode != "grpo" and args.guide_source == "future" and (step % args.ring_every == 0 or step in needed) \
                and not any(e["step"] == step for e in st["ring"]):
            ring_push(st["ring"], take_snapshot(S["model"], S["optim"], S["sched"], step),
                      args.ring_size, args.ring_dir, st["compute_steps"])
            ring_gc(st["ring"], args.ring_dir, args.out)
        # ---- Generate episodes (with guide samples injected into failing groups) --------------
        batch, roll = rollout(S, args, step, step_guide(S, args, st, step) if args.mode != "grpo" else None)
        engine_sleep(S["engine"])  # GPU: the engine's memory goes to the trainer until the sync
        # ---- Training ----------------------------------------------------------------------
        stats = train_step(S, args, batch, gen)
        # ---- Update the inference engine's weights -----------------------------------------
        t = time.time()
        sync_weights(S["engine"], S["model"])
        sync_s = time.time() - t
        # ---- Log metrics ------------------------------------------------------------------
        rec = step_metrics(step, batch, roll, stats, args)
        # model FLOPs of the training passes: 2N per token for the old log-probs (and the reference), 6N per epoch
        rec["train_flops"] = rec["train_tokens"] * S["params"] * (2 + 6 * args.ppo_epochs + 2 * (args.kl_coef > 0))
        track_step(st, args, step, rec, roll, S["params"])
        rec.update(sync_s=sync_s, wall_s=wall0 + time.time() - t0, compute_steps=st["compute_steps"],
                   generated_tokens=st["generated_tokens"], compute_flops=st["compute_flops"])
        step += 1
        if step % args.eval_every == 0 or step == args.steps:
            t = time.time()
            last_eval = evaluate(S["engine"], tok, S["eval_rows"], S["eval_prompts"], args, S["processor"])
            rec.update(last_eval, eval_s=time.time() - t)
        write_metrics(metrics, rec)
        if not args.quiet:
            log0(step_line(args, step, rec))
        # ---- NPO / AutoNPO: roll back Delta steps and retrain with theta_t as the guide --------
        due = due_intervention(args, st, step) if args.mode != "grpo" else None
        if due:
            new_step, st["guide"], irec = intervene(S, args, st, step, due[0], due[1])
            irec["wall_s"] = wall0 + time.time() - t0
            write_metrics(metrics, irec)
            log0(intervention_line(args, irec, new_step))
            step = new_step
        if args.save_every and step % args.save_every == 0 and not due:
            save_checkpoint(args.out, take_snapshot(S["model"], S["optim"], S["sched"], step, {
                "shuffle_rng": gen.get_state(), "base_eval": base, "npo": st,
                "wall_s": wall0 + time.time() - t0}), args.keep_checkpoints, st["compute_steps"],
                [e["name"] for e in st["ring"]])
            ring_gc(st["ring"], args.ring_dir, args.out)
    k = args.eval_samples
    summary = {"mode": args.mode, "steps": args.steps, "compute_steps": st["compute_steps"],
               "interventions": st["interventions"], "generated_tokens": st["generated_tokens"],
               "eval_greedy_start": base["eval_greedy"], "eval_greedy_end": last_eval["eval_greedy"],
               f"eval_mean@{k}_start": base[f"eval_mean@{k}"], f"eval_mean@{k}_end": last_eval[f"eval_mean@{k}"],
               "eval_n": base["eval_n"], "seconds": round(time.time() - t0, 1)}
    finish(args, S, summary)


# =============================================================================================
# Report: the comparison that run.sh makes (one directory per method and seed, named
# <method>_seed<k>, each with its metrics.jsonl) -> results.json, a printed table, curves.png and
# qvs.png. Reads only metrics files, so it can be rerun on any finished (or partial) comparison.
# =============================================================================================
# two-sided 95% Student t quantiles t_{0.975, df}; beyond df = 30 the normal 1.96 is within 4%
T975 = dict(enumerate([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
                       2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
                       2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042], start=1))
PAPER = {"grpo": 57.88, "npo": 62.84, "autonpo": 63.15, "early_speedup": 2.1,
         "setting": "Qwen3-VL-8B-Instruct, average of 8 multimodal reasoning benchmarks"}


def mean_ci95(xs):
    """(mean, half-width of the 95% t-interval) of a sample; half-width 0 for one value."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    n, m = len(xs), sum(xs) / len(xs)
    if n == 1:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    t = T975.get(n - 1, 1.96)
    return m, t * sd / math.sqrt(n)


def eval_points(records, axis):
    """[(x, held-out greedy accuracy, wall_s)] of one run. axis 'compute_steps': every evaluation in
    the order it happened. axis 'step': the surviving branch only (a rollback retrains steps, and
    the later evaluation of a step replaces the earlier one)."""
    pts = [(r.get(axis, r["step"]), r["eval_greedy"], r.get("wall_s", 0.0))
           for r in records if "eval_greedy" in r and "event" not in r]
    if axis == "step":
        pts = sorted({x: (x, a, w) for x, a, w in pts}.values())
    return pts


def first_reach(records, target):
    """Optimizer step, compute steps and wall-clock seconds of the first evaluation at or above
    `target` on the surviving branch (None when the run never gets there)."""
    by_step = {x: (x, a) for x, a, _ in eval_points(records, "step")}
    for r in records:
        if "eval_greedy" in r and "event" not in r and r["eval_greedy"] >= target - 1e-12 \
                and by_step.get(r["step"], (0, -1))[1] == r["eval_greedy"]:
            return {"step": r["step"], "compute_steps": r.get("compute_steps", r["step"]),
                    "compute_flops": r.get("compute_flops"), "wall_s": r.get("wall_s", 0.0)}
    return None


def load_comparison(root):
    """{method: {seed: metrics records}} from root/<method>_seed<k>/metrics.jsonl."""
    runs = {}
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, "metrics.jsonl")
        if "_seed" in d and os.path.isfile(path):
            method, seed = d.rsplit("_seed", 1)
            runs.setdefault(method, {})[int(seed)] = [json.loads(ln) for ln in open(path) if ln.strip()]
    order = ["grpo", "npo", "autonpo", "past", "external"]
    return dict(sorted(runs.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def summarize_comparison(runs, baseline="grpo"):
    """Per method, mean and 95% CI over seeds of: final held-out greedy accuracy; optimizer steps,
    compute steps and seconds to reach the baseline's mean final accuracy; total compute;
    interventions and injected samples. Plus the Q / V / S claims over every intervention table."""
    final = lambda rec: [r for r in rec if "eval_greedy" in r and "event" not in r][-1]  # noqa: E731
    target = mean_ci95([final(rec)["eval_greedy"] for rec in runs[baseline].values()])[0]
    out = {"baseline": baseline, "target_greedy": target, "methods": {}}
    for method, seeds in runs.items():
        reach = {k: first_reach(rec, target) for k, rec in seeds.items()}
        last = {k: [r for r in rec if "event" not in r][-1] for k, rec in seeds.items()}
        ci = lambda xs: dict(zip(("mean", "ci95"), mean_ci95(xs)))  # noqa: E731
        out["methods"][method] = {
            "seeds": sorted(seeds),
            "final_greedy": {**ci([final(rec)["eval_greedy"] for rec in seeds.values()]),
                             "per_seed": [final(seeds[k])["eval_greedy"] for k in sorted(seeds)]},
            "reached_target": sum(v is not None for v in reach.values()),
            **{f"{key}_to_target": ci([v[key] for v in reach.values() if v]) for key in ("step", "compute_steps", "compute_flops", "wall_s")},
            "steps": ci([r["step"] for r in last.values()]),
            "compute_steps": ci([r.get("compute_steps", r["step"]) for r in last.values()]),
            "compute_flops": ci([r.get("compute_flops") for r in last.values()]),
            "wall_s": ci([r.get("wall_s", 0.0) for r in last.values()]),
            "generated_tokens": ci([r.get("generated_tokens", 0) for r in last.values()]),
            "interventions": ci([sum(1 for r in rec if r.get("event") == "intervention" and "skipped" not in r)
                                 for rec in seeds.values()]),
            "injected": ci([sum(r.get("injected", 0) for r in rec if "event" not in r) for rec in seeds.values()]),
        }
    out["qvs"] = qvs_claims(runs)
    out["claims"] = paper_claims(out)
    return out


def qvs_claims(runs):
    """Over every intervention with at least three candidate Deltas: how often S(Delta) of the
    near-future source peaks at an interior Delta, and how often, for the learner snapshot it
    chose, the near-future source has a higher S than the past and external sources."""
    tables, interior, best_source = [], 0, 0
    for method, seeds in runs.items():
        for seed, rec in seeds.items():
            for r in rec:
                if r.get("event") != "intervention" or not r.get("table"):
                    continue
                fut = sorted((x for x in r["table"] if x["source"] == "future"), key=lambda x: x["delta"])
                tables.append({"run": f"{method}_seed{seed}", "step": r["step"], "delta": r.get("delta"),
                               "reason": r["reason"], "table": r["table"]})
                if len(fut) >= 3:
                    peak = max(range(len(fut)), key=lambda i: (fut[i]["S"], -i))
                    interior += 0 < peak < len(fut) - 1
                chosen = [x for x in r["table"] if x["delta"] == r.get("delta")]
                if chosen:
                    s_by = {x["source"]: x["S"] for x in chosen}
                    best_source += s_by["future"] > max(v for k, v in s_by.items() if k != "future")
    wide = [t for t in tables if sum(x["source"] == "future" for x in t["table"]) >= 3]
    return {"interventions": len(tables), "with_3plus_deltas": len(wide), "interior_peak": interior,
            "future_best_source": best_source, "tables": tables}


def paper_claims(out):
    """The paper's shape, checked on the means: NPO or AutoNPO reaches the baseline's final
    accuracy in at most half its optimizer steps and in less compute, and ends >= 3 points
    higher; S(Delta) peaks inside the ring; the near-future source has the highest S."""
    m, base = out["methods"], out["methods"][out["baseline"]]
    claims = {}
    for method in ("npo", "autonpo"):
        if method not in m:
            continue
        r = m[method]
        all_reached = r["reached_target"] == len(r["seeds"])
        claims[method] = {
            "points_above_grpo": 100 * (r["final_greedy"]["mean"] - base["final_greedy"]["mean"]),
            "step_speedup": all_reached and base["step_to_target"]["mean"] / max(r["step_to_target"]["mean"], 1),
            "compute_speedup": all_reached and base["compute_steps_to_target"]["mean"] / max(r["compute_steps_to_target"]["mean"], 1),
        }
        c = claims[method]
        c["half_the_steps"] = bool(c["step_speedup"] and c["step_speedup"] >= 2)
        c["less_compute"] = bool(c["compute_speedup"] and c["compute_speedup"] > 1)
        c["three_points_higher"] = c["points_above_grpo"] >= 3
    q = out["qvs"]
    claims["s_interior_peak"] = f"{q['interior_peak']} of {q['with_3plus_deltas']} interventions"
    claims["future_highest_s"] = f"{q['future_best_source']} of {q['interventions']} interventions"
    return claims


def comparison_table(summary):
    """The printed table (also the README's)."""
    fmt = lambda d, p=3: "-" if d["mean"] is None else f"{d['mean']:.{p}f} ± {d['ci95']:.{p}f}"  # noqa: E731
    head = ("| method | final greedy acc | steps to GRPO's final | compute steps to it | seconds to it | "
            "compute steps | seconds | interventions | injected |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, r in summary["methods"].items():
        n = f" ({r['reached_target']}/{len(r['seeds'])} seeds)" if r["reached_target"] < len(r["seeds"]) else ""
        lines.append(f"| {method} | {fmt(r['final_greedy'])} | {fmt(r['step_to_target'], 0)}{n} | "
                     f"{fmt(r['compute_steps_to_target'], 0)} | {fmt(r['wall_s_to_target'], 0)} | "
                     f"{fmt(r['compute_steps'], 0)} | {fmt(r['wall_s'], 0)} | {fmt(r['interventions'], 1)} | "
                     f"{fmt(r['injected'], 0)} |")
    return "\n".join(lines)


def throughput(records):
    """Generated tokens/s in the generate phase, trained tokens/s in the train phase (recompute and
    updates), and the train phase's model FLOP utilisation where the device's peak is known."""
    steps = [r for r in records if "train_s" in r and "event" not in r]
    head = next((r for r in records if "params" in r), {})
    gen_s, train_s = sum(r["generate_s"] for r in steps), sum(r["train_s"] for r in steps)
    out = {"gen_tokens_per_s": sum(r["step_tokens"] for r in steps) / gen_s if gen_s else None,
           "train_tokens_per_s": sum(r.get("train_tokens", 0) for r in steps) / train_s if train_s else None,
           "device": head.get("device"), "params": head.get("params"), "mfu": None}
    if head.get("peak_flops") and train_s:
        out["mfu"] = sum(r.get("train_flops", 0) for r in steps) / train_s / head["peak_flops"]
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def plot_curves(runs, path):
    """Held-out accuracy against optimizer steps and against total compute: one line per method
    (mean over seeds, band = 95% CI), dotted marks where interventions happened."""
    import numpy as np
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    compute = "compute_flops" if all("compute_flops" in r for s in runs.values() for rec in s.values()
                                     for r in rec if "eval_greedy" in r) else "compute_steps"
    for ax, axis, label in zip(axes, ("step", compute), ("optimizer step", {
            "compute_flops": "total compute (model FLOPs: repeated steps, guide sampling and Q/V scoring included)",
            "compute_steps": "total compute (training steps, repeated ones included)"}[compute])):
        for i, (method, seeds) in enumerate(runs.items()):
            color = f"C{i}"
            curves = [eval_points(rec, axis) for rec in seeds.values()]
            end = min(c[-1][0] for c in curves)
            grid = sorted({x for c in curves for x, _, _ in c if x <= end})
            ys = [np.interp(grid, [x for x, _, _ in c], [a for _, a, _ in c]) for c in curves]
            stats = [mean_ci95(col) for col in zip(*ys)]
            mean = np.array([m for m, _ in stats])
            half = np.array([h for _, h in stats])
            ax.plot(grid, mean, color=color, label=f"{method} ({len(curves)} seed{'s' * (len(curves) > 1)})")
            ax.fill_between(grid, mean - half, mean + half, color=color, alpha=0.15, linewidth=0)
            for rec in seeds.values():
                for r in rec:
                    if r.get("event") == "intervention" and "skipped" not in r:
                        ax.axvline(r["step"] if axis == "step" else r[axis], color=color,
                                   linestyle=":", alpha=0.5)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out greedy accuracy")
    axes[0].legend(loc="lower right")
    fig.suptitle("held-out accuracy (mean, band = 95% CI over seeds; dotted: interventions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_qvs(qvs, path):
    """Left: Q, V and S against Delta for each source at the intervention with the most ring
    snapshots (learner theta_{t-Delta}; the near-future guide is theta_t). Right: the same points
    on the Q-V plane, dashed lines of equal S = Q / V."""
    import numpy as np
    plt = _pyplot()
    tab = max(qvs["tables"], key=lambda t: (sum(x["source"] == "future" for x in t["table"]), -t["step"]))
    fig = plt.figure(figsize=(12, 6.5))
    gs = fig.add_gridspec(3, 2)
    left = [fig.add_subplot(gs[i, 0]) for i in range(3)]
    right = fig.add_subplot(gs[:, 1])
    for i, source in enumerate(("future", "past", "external")):
        rows = sorted((x for x in tab["table"] if x["source"] == source), key=lambda x: x["delta"])
        d = [x["delta"] for x in rows]
        for ax, key in zip(left, ("Q", "V", "S")):
            pts = [(a, x[key]) for a, x in zip(d, rows) if x[key] is not None and (key == "Q" or x[key] > 0)]
            ax.plot([a for a, _ in pts], [v for _, v in pts], "o-", color=f"C{i}", label=source)
        pts = [(x["V"], x["Q"], x["delta"]) for x in rows if x["V"] and x["V"] > 0]
        right.plot([v for v, _, _ in pts], [q for _, q, _ in pts], "o-", color=f"C{i}", label=source)
        for v, q, delta in pts if source == "future" else []:
            right.annotate(f"Δ{delta}", (v, q), textcoords="offset points", xytext=(4, 4), fontsize=8)
    for ax, key in zip(left, ("Q (share of failed prompts solved)", "V (variance of weights)", "S = Q / V")):
        ax.set_ylabel(key.split(" (")[0] if len(key) > 20 else key, fontsize=9)
        ax.grid(alpha=0.3)
    left[1].set_yscale("log")
    left[2].set_yscale("log")
    left[2].set_xlabel("Delta (learner = ring snapshot t - Delta, near-future guide = theta_t)")
    left[0].legend(fontsize=8)
    right.set_xscale("log")
    right.xaxis.set_minor_formatter(plt.NullFormatter())  # major decades only: minor labels collide
    lo, hi = right.get_xlim()
    v = np.geomspace(lo, hi, 50)
    for level in (10, 100, 1000):
        right.plot(v, level * v, "--", color="gray", alpha=0.4, linewidth=0.8)
        right.annotate(f"S={level}", (v[-1], min(1.0, level * v[-1])), fontsize=7, color="gray")
    right.set_ylim(-0.02, 1.05)
    right.set_xlim(lo, hi)
    right.set_xlabel("V (variance cost)")
    right.set_ylabel("Q (signal quality)")
    right.legend()
    right.grid(alpha=0.3)
    fig.suptitle(f"Q, V, S at the intervention of {tab['run']} at step {tab['step']} "
                 f"({tab['reason']}, chose Delta {tab['delta']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(root, command=""):
    """results.json, the printed table, curves.png and qvs.png for the comparison under `root`."""
    runs = load_comparison(root)
    summary = summarize_comparison(runs)
    summary["throughput"] = {m: throughput(rec) for m, seeds in runs.items() for rec in [seeds[min(seeds)]]}
    summary.update(command=command, paper=PAPER, machine=f"{os.cpu_count()} CPU cores, " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=1, allow_nan=False)
    plot_curves(runs, os.path.join(root, "curves.png"))
    if summary["qvs"]["tables"]:
        plot_qvs(summary["qvs"], os.path.join(root, "qvs.png"))
    print(comparison_table(summary))
    for method, t in summary["throughput"].items():
        mfu = f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] is not None else ""
        print(f"{method}: generated {t['gen_tokens_per_s']:.0f} tokens/s, trained {t['train_tokens_per_s']:.0f} tokens/s{mfu}")
    print("paper's shape: " + json.dumps(summary["claims"]))
    print(f"paper (Qwen3-VL-8B): GRPO {PAPER['grpo']}, NPO {PAPER['npo']}, AutoNPO {PAPER['autonpo']}, "
          f"~{PAPER['early_speedup']}x faster early convergence")
    return summary


# =============================================================================================
# Main
# =============================================================================================
def main(argv=None):
    args = parse_args(argv)
    S = {}
    try:
        S = setup(args)
        run_sft(args, S) if args.mode == "sft" else run_rl(args, S)
        if dist.get_world_size() > 1 and S["engine"]["kind"] == "hf":
            # every rank is past finish()'s barrier and everything is written: leave without gloo's
            # teardown, which now and then aborts a rank at exit ("terminate called without an
            # active exception") after the work is done
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
    finally:
        if "engine" in S:
            close_engine(S["engine"])  # vLLM's shutdown also tears down the default process group
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The main job on the embedded default (2 CPU cores are enough), and the set-up it needs.
#   bash run.sh [--seeds 0,1,2,3,4] [--size full|quick|mul] [--methods grpo,npo,autonpo,past,external] [--out DIR]
#                        set up .venv (first time only), an SFT base (cached), then the fair test of
#                        the README: GRPO, NPO (bootstrapping), AutoNPO and the external source from
#                        one base with the same seeds (default: seed 0, ~15 min) -> runs/compare/
#                        {results.json, curves.png, qvs.png} (report.py) and printed tables.
#                        --size quick (or --quick): a 3-minute smoke test of the pipeline (tests);
#                        --size mul: the earlier bare-answer 3x1 comparison (150 steps, 3 seeds)
#   bash run.sh gpu      the comparison on one GPU with a Qwen3-0.6B-shaped model built from a
#                        config (no download), plus generated / trained tokens/s and MFU
#   bash run.sh vl       the vision-language path: tiny Qwen3-VL, SFT then GRPO on counting shapes
#   bash run.sh gpu-check  one GPU, <= 8 minutes: CUDA torch, bf16 FSDP2 RL steps, --grad_ckpt's memory, SFT's
#                        peak memory, tokens/s and MFU, vLLM's sleep / reload / wake cycles; a line per check
#                        (runs with the machine's own python when there is no .venv; installs nothing)
#   bash run.sh setup    only the set-up (what .ci/run does before the tests)
#   bash run.sh bench [tokens]  the trainer's cost against the real tokens: old and new paths (and TRL's
#                        GRPOTrainer, from requirements-bench.txt) on one long-tailed batch; then (not with
#                        `tokens`) seconds per GRPO step by phase: HF vs vLLM at two sizes, 1 process vs 2 ranks
#   bash run.sh bench resume  what a resume reads of a checkpoint at a real run's pool sizes, lists vs tensors
#   bash run.sh qv RUN...  the paper's Figure 2(b, c) on GRPO runs' checkpoints (one every 10 steps): for a learner
#                        theta_s (s = 20 and 170), Q, V, S of theta_{s+Delta} as guides and of the other sources,
#                        each run's qv_curve.json, then the curves' verdicts and qv_curves.png beside the runs
# Flags after the options go to every training run, e.g.  bash run.sh --seeds 0,1 --lr 5e-5
set -euo pipefail
cd "$(dirname "$0")"
mode=main
case "${1:-}" in main|gpu|gpu-check|vl|setup|bench|qv) mode="$1"; shift ;; esac
PY=.venv/bin/python

setup() {
  # requirements.txt everywhere, then the vLLM build for this machine
  local extra=requirements-cpu.txt
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=requirements-gpu.txt; gpu_preflight; fi
  if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ] \
      || [ $extra -nt .venv/.installed ]; then
    echo "== set-up: python venv in .venv, packages from requirements.txt and $extra (pip's output: .venv/setup.log)"
    python3 -m venv .venv
    { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -r requirements.txt -r $extra; } \
      > .venv/setup.log 2>&1 || { tail -20 .venv/setup.log; echo "set-up: pip failed (above; all of it in .venv/setup.log)"; exit 1; }
    if [ $extra = requirements-cpu.txt ]; then
      .venv/bin/pip uninstall -y -q torchaudio torchcodec || true
      torchvision_hook
    fi
    .venv/bin/python -c "import vllm, torchvision" 2>/dev/null || { echo "set-up: vllm does not import"; exit 1; }
    touch .venv/.installed
  fi
  if [ $extra = requirements-gpu.txt ]; then cuda_check .venv/bin/python; fi
}

gpu_preflight() {
  # Before installing on a GPU machine, what its driver and system lack: torch 2.13's and vllm 0.32.0's PyPI builds
  # are CUDA 13 (vllm's kernels link libcudart.so.13: readelf -d vllm/_C_stable_libtorch.abi3.so), which needs driver
  # >= 580; Triton (vLLM's Model Runner V2, torch.compile) compiles a C helper with gcc and Python's headers at first use.
  local driver missing=""
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
  command -v gcc >/dev/null 2>&1 || missing+=" gcc"
  python3 -c "import os, sysconfig, sys; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
    || missing+=" python3-dev (Python.h)"
  if [ -n "$missing" ]; then
    echo "set-up: this GPU machine lacks$missing, which Triton (vLLM's Model Runner V2, torch.compile) needs to compile a"
    echo "  helper at first use: install them (Debian / Ubuntu: apt-get install gcc python3-dev), then run this again."
    exit 1
  fi
  if [ "${driver%%.*}" -lt 580 ]; then
    echo "set-up: driver $driver is older than 580, which torch 2.13 and vllm 0.32.0 from PyPI (CUDA 13 builds) need."
    echo "  Best: a driver >= 580. Otherwise a CUDA 12 stack, installed by hand into .venv (python3 -m venv .venv):"
    echo "  - with vLLM: a CUDA 12 build of vllm 0.32.0 from its release page (github.com/vllm-project/vllm/releases, files"
    echo "    vllm-0.32.0+cu12X-...whl) and torch 2.13's build for the same CUDA (--index-url https://download.pytorch.org/whl/cu12X),"
    echo "    then .venv/bin/pip install -r requirements.txt (not tried here: no such machine was at hand);"
    echo "  - without vLLM (--rollout hf, HF generate): torch's CUDA 12.8 build, then requirements.txt:"
    echo "      .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && .venv/bin/pip install -r requirements.txt"
    exit 1
  fi
}

cuda_check() {
  # A GPU machine whose torch cannot use the GPU (a CUDA 13 wheel on a driver < 580) must not train on its CPU.
  "$1" -c "import torch, sys; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)" && return
  echo "set-up: nvidia-smi sees $(nvidia-smi -L | wc -l) GPU(s), driver $(nvidia-smi --query-gpu=driver_version \
--format=csv,noheader | head -1), but torch $("$1" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)') \
cannot use them. torch 2.13's PyPI build needs driver >= 580 (for an older driver: bash run.sh setup says what works)."
  exit 1
}

torchvision_hook() {
  # The only torchvision that matches CPU torch 2.13 here is a CUDA build whose compiled ops do
  # not load, so `import torchvision` (which transformers and vLLM do) fails with "operator
  # torchvision::nms does not exist". A .pth hook declares the two op schemas just before
  # torchvision is first imported; npo never calls them. Installed only where the import fails.
  .venv/bin/python -c "import torchvision" 2>/dev/null && return
  local sp; sp=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  cat > "$sp/npo_torchvision_ops.py" <<'HOOK'
"""Written by npo's `run.sh setup` (see torchvision_hook there)."""
import sys


class _DeclareTorchvisionOps:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            import torch
            global _lib
            _lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                _lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        return None


sys.meta_path.insert(0, _DeclareTorchvisionOps())
HOOK
  echo "import npo_torchvision_ops" > "$sp/npo_torchvision_ops.pth"
}

# The screen shows npo's own lines and real warnings; everything a run prints (library chatter included) stays in
# its log. Known library noise, harmless here, kept off the screen: vLLM's notes on settings npo makes on purpose
# (the seed, chunked prefill off and eager mode on a CPU, Inductor off, the V1 runner and Triton-less CPU kernels,
# the SSM cache type), a FutureWarning inside vLLM's Triton shim and vLLM-CPU's NUMA binding note.
NOISE="global random seed is set|disabling chunked prefill|Enforce eager set|Inductor compilation was disabled|\
triton-cpu is expected|Reset SSM cache type|Model Runner V2 requires Triton|reduce_op. is deprecated|NUMA binding"
OWN='^(npo|sft|grpo|autonpo|progress|summary|resume|data|error|warning)[ :|]'
WARN='[Ww]arning|WARN|[Ee]rror|ERROR|Traceback|Killed'
screen() {  # stdin -> the lines matching $1 that are not known noise
  { grep -a --line-buffered -E "$1" || true; } | { grep -a --line-buffered -v -E "$NOISE" || true; }
}

sft_base() {
  # SFT warm-up: the base policy RL starts from (built once in $1, then reused; its output in $1.log)
  local dir="$1" steps="$2"; shift 2
  if [ ! -f "$dir/summary.json" ]; then
    mkdir -p "$(dirname "$dir")"
    $PY npo.py --mode sft --out "$dir" --sft_steps "$steps" --eval_every 200 --eval_samples 0 "$@" 2>&1 \
      | tee "$dir.log" | screen "$OWN|$WARN" || { echo "== SFT failed, see $dir.log"; exit 1; }
  else
    echo "== using the cached SFT base in $dir (delete it to rebuild)"
  fi
}

compare() {
  # GRPO, NPO and AutoNPO (and optionally the past / external sources) from one SFT base, every
  # method with every seed; JOBS runs at a time, each on CPU_THREADS threads (on 2 cores two 1-thread
  # runs finish 1.3x sooner than one 2-thread run after the other). A finished run is skipped and a
  # killed one resumes from its checkpoint, so rerunning the command completes a killed comparison.
  local seeds="" size=full out=runs/compare methods=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --seeds) seeds="$2"; shift 2 ;;
      --quick) size=quick; shift ;;
      --size) size="$2"; shift 2 ;;
      --out) out="$2"; shift 2 ;;
      --methods) methods="$2"; shift 2 ;;
      *) break ;;
    esac
  done
  # sizes: full (the fair test of the README: scratchpad multiplication, the regime chosen on GRPO
  # alone), quick (a smoke test of the whole pipeline), mul (the earlier bare-answer comparison),
  # gpu (run.sh gpu)
  # steps: the early comparison (npo's bootstrapping, self); long: GRPO continued (to the others' compute);
  # plateau: the step the README's protocol measured GRPO's plateau at (0: none), where breakthrough rolls back brk
  # and AutoNPO runs to plateau + after
  local steps ev es boot brk_at=0 brk=0 auto="" ring=10 sft sft_steps long plateau=0 after=30
  case $size in
    full)  steps=60 long=120 plateau=${PLATEAU:-0} brk=20 ev=10 es=2000 boot=20 sft=runs/sft_mulsteps sft_steps=150
           SFT_FLAGS+=(--data mulsteps --difficulty 4x1 --max_new_tokens 48 --lr 1e-3)
           RUN_FLAGS+=(--data mulsteps --difficulty 4x1 --max_new_tokens 48 --lr 1e-4 --train_size 1024
                       --replay_size 16384) ;;  # an epoch of successes: the past source reaches a recurring prompt
    quick) steps=24 long=36 plateau=18 after=6 ev=6 es=100 boot=6 brk=6 ring=3 sft="$out/sft" sft_steps=200
           auto="--trigger_window 4 --cooldown 8 --max_interventions 2"
           SFT_FLAGS+=(--difficulty 2x1 --lr 3e-3) RUN_FLAGS+=(--difficulty 2x1) ;;
    mul)   steps=150 long=150 ev=10 es=1000 boot=30 brk_at=110 brk=30 sft=runs/sft sft_steps=800
           auto="--trigger_window 15 --cooldown 40 --max_interventions 2" ;;
    gpu)   steps=100 long=100 ev=10 es=1000 boot=20 brk_at=70 brk=20 sft=runs/gpu/sft sft_steps=600
           auto="--trigger_window 10 --cooldown 30 --max_interventions 2"
           SFT_FLAGS+=(--model runs/gpu/base --data mulsteps --difficulty 4x1 --max_new_tokens 48 --lr 1e-4
                       --sft_batch_size 256)
           RUN_FLAGS+=(--data mulsteps --difficulty 4x1 --max_new_tokens 48 --rollout vllm --lr 1e-5
                       --prompts_per_step 64 --micro_batch_size 128) ;;
    *) echo "unknown size $size"; exit 2 ;;
  esac
  [ -n "$seeds" ] || seeds=$([ $size = mul ] && echo 0,1,2 || echo 0)
  local late=$((plateau ? plateau + after : steps))  # no plateau: AutoNPO is met in the early comparison only
  [ $plateau = 0 ] || long=$((long > late + brk + 10 ? long : late + brk + 10))  # GRPO continued past the breakthrough's compute
  # longest first (AutoNPO replays steps), so that two at a time finish together
  [ -n "$methods" ] || methods=$([ $size = mul ] && echo autonpo,npo,grpo || echo grpo,autonpo,breakthrough,npo,self)
  if [ $plateau = 0 ]; then methods=${methods//breakthrough/}; methods=${methods//,,/,}; methods=${methods#,}; methods=${methods%,}; fi
  sft_base "$sft" $sft_steps "${SFT_FLAGS[@]}"
  mkdir -p "$out"
  local common=(--model "$sft/model" --eval_every $ev --eval_size $es --eval_samples 0 --ring_every $ring
                --save_every 25 --no_save_model --quiet --resume "${RUN_FLAGS[@]}")
  local npo="--mode npo --bootstrap_delta $boot"
  [ $brk_at = 0 ] || npo+=" --breakthrough_at $brk_at --breakthrough_delta $brk"
  declare -A flags=(  # after the common flags (a method's own win), before the options' ("$@": they win over all)
    [grpo]="--steps $long --mode grpo --save_every $ring --keep_checkpoints 1000"  # every ring step kept: see branch
    [npo]="--steps $steps $npo"
    [self]="--steps $steps --mode npo --guide_source self --guide_steps $boot"
    [autonpo]="--steps $late --mode autonpo $auto"
    [breakthrough]="--steps $late --mode npo --breakthrough_at $plateau --breakthrough_delta $brk"
    [teacher]="--steps $steps --mode npo --guide_source teacher"
    [past]="--steps $steps --mode npo --guide_source past"
    [external]="--steps $steps --mode npo --guide_source external")
  local jobs=() m seed
  for m in ${methods//,/ }; do  # method by method (GRPO's runs first: the plateau is measured on them)
    for seed in ${seeds//,/ }; do
      [ -n "${flags[$m]:-}" ] || { echo "unknown method $m (${!flags[*]})"; exit 2; }
      jobs+=("$m $seed")
    done
  done
  echo "== comparison: ${#jobs[@]} runs (methods $methods, seeds $seeds), ${JOBS:-2} at a time, logs in $out/"
  local job
  rm -f "$out/FAILED"
  declare -A shown=()
  for job in "${jobs[@]}"; do
    read -r m seed <<<"$job"
    local dir="$out/${m}_seed$seed"
    local want done_steps=-1
    want=$(echo "${flags[$m]} $*" | grep -o -- '--steps [0-9]*' | tail -1 | grep -o '[0-9]*$')  # the last one wins
    [ -f "$dir/summary.json" ] && done_steps=$(grep -o '"steps": [0-9]*' "$dir/summary.json" | grep -o '[0-9]*$')
    if [ "$done_steps" -ge "$want" ]; then echo "   $m seed $seed: done before, kept"; continue; fi
    [ "$done_steps" = -1 ] || echo "   $m seed $seed: ran $done_steps steps, continued to $want"
    # the late comparison starts where GRPO plateaued: from GRPO's own checkpoint (branch)
    case $m in breakthrough|autonpo) [ $plateau = 0 ] || branch "$out/grpo_seed$seed" "$dir" $((plateau - brk)) ;; esac
    ( OMP_NUM_THREADS=${CPU_THREADS:-1} $PY npo.py "${common[@]}" ${flags[$m]} --seed "$seed" --out "$dir" "$@" \
        > "$dir.log" 2>&1 && echo "   $m seed $seed: done, $(tail -1 "$dir.log" | cut -c1-150)" \
        || { echo "   $m seed $seed FAILED, see $dir.log:"; tail -5 "$dir.log"; touch "$out/FAILED"; exit 1; } ) &
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do progress "$out"; sleep 5; done
  done
  while [ -n "$(jobs -rp)" ]; do progress "$out"; sleep 5; done
  wait  # (a failed run leaves $out/FAILED: `wait PID` on a run reaped long before is refused by bash)
  [ ! -f "$out/FAILED" ] || { echo "== a run failed (above): no report"; exit 1; }
  $PY report.py --horizon $steps "$out" "bash run.sh $ARGS"
  echo "== wrote $out/results.json, $out/curves.png, $out/qvs.png"
}

branch() {
  # The late comparison's runs (breakthrough, AutoNPO) start at GRPO's plateau: their first T - Delta steps are
  # GRPO's (same seed, same data order and RNG), so each starts from GRPO's own checkpoint at the newest step
  # <= T - Delta, a copy it resumes from (compute counted from step 0, GRPO's records kept); without one (or
  # once it has a checkpoint of its own) it runs from step 0.
  local src="$1" dst="$2" at="$3" ckpt
  [ -d "$dst/checkpoints" ] && return
  ckpt=$($PY -c "import json, os, sys; s, at = sys.argv[1], int(sys.argv[2]); d = os.path.join(s, 'checkpoints')
c = sorted((json.load(open(os.path.join(d, n, 'meta.json')))['step'], n) for n in (os.listdir(d) if os.path.isdir(d) else [])
           if os.path.isfile(os.path.join(d, n, 'meta.json')))
print(max((x for x in c if x[0] <= at), default=(0, ''))[1])" "$src" "$at")
  [ -n "$ckpt" ] || return 0
  mkdir -p "$dst/checkpoints"
  cp -r "$src/checkpoints/$ckpt" "$dst/checkpoints/" && cp "$src/metrics.jsonl" "$dst/"
  echo "   $(basename "$dst"): starts from $src/checkpoints/$ckpt (GRPO's, same seed)"
}

progress() {
  # each run's new "progress |" lines (step, held-out accuracy, time left) and interventions (rollbacks)
  local log lines total
  for log in "$1"/*.log; do
    lines=$(screen "^progress \||\| intervention at step|$WARN" < "$log")
    [ -n "$lines" ] || continue
    total=$(printf '%s\n' "$lines" | wc -l)
    if [ "$total" -gt "${shown[$log]:-0}" ]; then
      printf '%s\n' "$lines" | tail -n +$((${shown[$log]:-0} + 1)) | cut -c1-150 \
        | sed "s/^progress | //; s/^/   $(basename "$log" .log): /"
    fi
    shown[$log]=$total
  done
}

gpu() {
  # One GPU: a Qwen3-0.6B-shaped model (28 layers, width 1024, the character vocabulary: ~0.44B
  # parameters) built from a config, SFT warm-up on the fair test's task (mulsteps 4x1), then the
  # comparison with vLLM rollouts in bf16 on one seed, 100 steps per method.
  [ -f runs/gpu/base/config.json ] || $PY -c "import data; data.build_tiny('runs/gpu/base', \
      hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16, \
      num_key_value_heads=8, head_dim=128)"
  JOBS=1 CPU_THREADS=8 compare --size gpu --out runs/gpu/compare "$@"
}

vl() {
  # The vision-language path on the embedded default: tiny Qwen3-VL, the count task (1-4 shapes in a
  # 64x64 image), SFT warm-up then GRPO; held-out accuracy before and after, seconds per step.
  sft_base runs/vl/sft 100 --model tiny-vl --lr 3e-3  # stopped mid-way (~0.5): room for RL
  $PY npo.py --mode grpo --model runs/vl/sft/model --out runs/vl/grpo --steps 100 --eval_every 25 \
      --eval_samples 0 --lr 1e-4 "$@"
  $PY - <<'PY'
import json
s = json.load(open("runs/vl/grpo/summary.json"))
m = [json.loads(l) for l in open("runs/vl/grpo/metrics.jsonl")]
st = [r for r in m if "train_s" in r][5:]
ph = {k: sum(r[k] for r in st) / len(st) for k in ("generate_s", "score_s", "train_s", "sync_s")}
print(f"\nheld-out greedy accuracy on {s['eval_n']} image prompts: base (SFT) {s['eval_greedy_start']:.3f}"
      f" -> GRPO {s['eval_greedy_end']:.3f}; seconds per step (mean of steps 6-{len(st) + 5}): "
      + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in ph.items()) + f", total {sum(ph.values()):.3f}")
PY
}

bench() {
  # 0. `bench resume`: what a resume reads at a real run's pool sizes, Python lists against tensors (test_npo.resume_bench)
  [ "${1:-}" = resume ] && { $PY test_npo.py resume_bench; return; }
  # 1. The trainer's cost in proportion to the real tokens (test_npo.token_bench): processed / real tokens,
  #    seconds per real token and the log-prob pass's peak memory, old and new paths side by side, and TRL.
  $PY -c "import trl" 2>/dev/null || .venv/bin/pip install -q -r requirements-bench.txt \
    || echo "bench: requirements-bench.txt did not install; the TRL line is skipped"
  $PY test_npo.py token_bench runs/bench/tokens
  [ "${1:-}" = tokens ] && return
  # 2. Seconds per GRPO step split by phase, every configuration run back to back in one call so the
  # ratios compare the same machine state. Two sizes:
  #   default: the main job's setting (0.8M model, 32 prompts x 8 samples, <= 8 new tokens), HF and
  #            vLLM engines on 1 process, and HF on torchrun with 2 ranks (gloo, FSDP2);
  #   heavy:   generation-heavy (a 9.5M model built from a config, 64 prompts x 8, 128 new tokens).
  sft_base runs/sft 800
  [ -f runs/bench/tiny10m/config.json ] || $PY -c "import data; data.build_tiny('runs/bench/tiny10m', \
      hidden_size=256, num_hidden_layers=12, intermediate_size=768, head_dim=64)"
  common="--mode grpo --eval_every 1000 --eval_size 8 --eval_samples 0 --no_save_model --save_every 0 --quiet"
  default="$common --model runs/sft/model --steps 30"
  heavy="$common --model runs/bench/tiny10m --steps ${HEAVY_STEPS:-3} --prompts_per_step 64 --max_new_tokens 128"
  $PY npo.py $default --rollout hf --out runs/bench/default_hf
  $PY npo.py $default --rollout vllm --out runs/bench/default_vllm
  $PY -m torch.distributed.run --standalone --nproc_per_node=2 npo.py $default --rollout hf --out runs/bench/default_hf_2ranks
  $PY npo.py $heavy --rollout hf --out runs/bench/heavy_hf
  $PY npo.py $heavy --rollout vllm --out runs/bench/heavy_vllm
  $PY - <<'PY'
import json
def phases(name, skip):
    m = [json.loads(l) for l in open(f"runs/bench/{name}/metrics.jsonl")]
    m = [r for r in m if "reward" in r][skip:]  # after warm-up steps
    r = {k: sum(x[k] for x in m) / len(m) for k in ("generate_s", "score_s", "train_s", "sync_s")}
    r["step_s"] = sum(r.values())
    r["tokens/s gen"] = sum(x["step_tokens"] for x in m) / len(m) / r["generate_s"]
    r["sync %"] = 100 * r["sync_s"] / r["step_s"]
    return r
rows = {"default hf": phases("default_hf", 5), "default vllm": phases("default_vllm", 5),
        "default hf 2 ranks": phases("default_hf_2ranks", 5), "heavy hf": phases("heavy_hf", 1),
        "heavy vllm": phases("heavy_vllm", 1)}
cols = list(rows["default hf"])
print("\nseconds per GRPO step by phase (default: mean of steps 6-30; heavy: steps after the first)")
print(f"{'':20}" + "".join(f"{k:>14}" for k in cols))
for name, r in rows.items():
    print(f"{name:20}" + "".join(f"{v:14.3f}" for v in r.values()))
for size in ("default", "heavy"):
    h, v = rows[f"{size} hf"], rows[f"{size} vllm"]
    print(f"{size}: generate hf / vllm = {h['generate_s'] / v['generate_s']:.2f}x, "
          f"step hf / vllm = {h['step_s'] / v['step_s']:.2f}x")
d = rows["default hf 2 ranks"]
print(f"default, 2 ranks / 1 process: step {d['step_s'] / rows['default hf']['step_s']:.2f}x")
json.dump(rows, open("runs/bench/bench.json", "w"), indent=1)
PY
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # sourced (the tests read screen and NOISE): functions only
ARGS="$*"
SFT_FLAGS=() RUN_FLAGS=()
if [ "$mode" = gpu-check ]; then  # a lent GPU machine: its own packages, nothing installed
  [ -x $PY ] || PY=python3
  exec $PY test_npo.py gpu_check "$@"
fi
setup
case "$mode" in
  setup) ;;
  main) compare "$@" ;;
  gpu) gpu "$@" ;;
  vl) vl "$@" ;;
  bench) bench "$@" ;;
  qv) for run in "$@"; do $PY test_npo.py qv_curve "$run" 2>&1 | tee "$run/qv_curve.log" | screen "^qv \||$WARN"; done
      $PY report.py --qv "$@" ;;
  *) echo "usage: bash run.sh [main|gpu|gpu-check|vl|setup|bench|qv] [--seeds 0,1,2] [--quick] [--methods ...] [training flags...]"; exit 2 ;;
esac

#!/usr/bin/env bash
# The main job on the embedded default (2 CPU cores are enough), and the set-up it needs.
#   bash run.sh          set up .venv (first time only), SFT warm-up (cached in runs/sft), GRPO,
#                        then print held-out accuracy of the base and of the GRPO policy
#   bash run.sh setup    only the set-up (what .ci/run does before the tests)
#   bash run.sh bench    seconds per GRPO step split by phase: HF vs vLLM engine at two sizes, and
#                        1 process vs torchrun with 2 ranks
# Extra arguments after the mode go to the GRPO run, e.g.  bash run.sh main --steps 100
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-main}"; shift || true
PY=.venv/bin/python

setup() {
  # requirements.txt everywhere, then the vLLM build for this machine
  local extra=requirements-cpu.txt
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=requirements-gpu.txt; fi
  if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ] \
      || [ $extra -nt .venv/.installed ]; then
    echo "== set-up: python venv in .venv, packages from requirements.txt and $extra"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.txt -r $extra
    if [ $extra = requirements-cpu.txt ]; then
      .venv/bin/pip uninstall -y -q torchaudio torchcodec || true
      torchvision_hook
    fi
    .venv/bin/python -c "import vllm, torchvision" 2>/dev/null || { echo "set-up: vllm does not import"; exit 1; }
    touch .venv/.installed
  fi
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

sft_base() {
  # SFT warm-up: the base policy RL starts from (built once, then reused)
  if [ ! -f runs/sft/summary.json ]; then
    $PY npo.py --mode sft --out runs/sft --sft_steps 800 --eval_every 200 --eval_samples 0
  else
    echo "== using the cached SFT base in runs/sft (delete runs/sft to rebuild it)"
  fi
}

main() {
  sft_base
  $PY npo.py --mode grpo --model runs/sft/model --out runs/grpo --steps 300 --eval_every 50 "$@"
  $PY - <<'PY'
import json
s = json.load(open("runs/grpo/summary.json"))
print(f"\nheld-out greedy accuracy on {s['eval_n']} prompts: base (SFT) {s['eval_greedy_start']:.3f}"
      f" -> GRPO {s['eval_greedy_end']:.3f} ({100 * (s['eval_greedy_end'] - s['eval_greedy_start']):+.1f} points)")
PY
}

bench() {
  # Seconds per GRPO step split by phase, every configuration run back to back in one call so the
  # ratios compare the same machine state. Two sizes:
  #   default: the main job's setting (0.8M model, 32 prompts x 8 samples, <= 8 new tokens), HF and
  #            vLLM engines on 1 process, and HF on torchrun with 2 ranks (gloo, FSDP2);
  #   heavy:   generation-heavy (a 9.5M model built from a config, 64 prompts x 8, 128 new tokens).
  sft_base
  [ -f runs/bench/tiny10m/config.json ] || $PY -c "import npo; npo.build_tiny('runs/bench/tiny10m', \
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

setup
case "$mode" in
  setup) ;;
  main) main "$@" ;;
  bench) bench ;;
  *) echo "usage: bash run.sh [main|setup|bench] [grpo flags...]"; exit 2 ;;
esac

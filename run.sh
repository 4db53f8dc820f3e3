#!/usr/bin/env bash
# The main job on the embedded default (2 CPU cores are enough), and the set-up it needs.
#   bash run.sh          set up .venv (first time only), SFT warm-up (cached in runs/sft), GRPO,
#                        then print held-out accuracy of the base and of the GRPO policy
#   bash run.sh setup    only the set-up (what .ci/run does before the tests)
#   bash run.sh bench    seconds per GRPO step split by phase, 1 process vs torchrun with 2
# Extra arguments after the mode go to the GRPO run, e.g.  bash run.sh main --steps 100
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-main}"; shift || true
PY=.venv/bin/python

setup() {
  if [ ! -x .venv/bin/python ] || [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
    echo "== set-up: python venv in .venv, packages from requirements.txt"
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.txt
    touch .venv/.installed
  fi
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
  # The same 30 GRPO steps of the default job, one process and then torchrun with 2 ranks (gloo,
  # FSDP2), run back to back so the two are compared on the same machine state.
  sft_base
  common="--mode grpo --model runs/sft/model --steps 30 --eval_every 1000 --eval_size 64 --eval_samples 0 --no_save_model --quiet"
  $PY npo.py $common --out runs/bench/1proc
  $PY -m torch.distributed.run --standalone --nproc_per_node=2 npo.py $common --out runs/bench/2proc
  $PY - <<'PY'
import json
rows = {}
for name in ("1proc", "2proc"):
    m = [json.loads(l) for l in open(f"runs/bench/{name}/metrics.jsonl")]
    m = [r for r in m if r["step"] > 5 and "reward" in r]  # steps 6..30: after warm-up
    rows[name] = {k: sum(r[k] for r in m) / len(m) for k in ("generate_s", "score_s", "train_s", "sync_s")}
    rows[name]["step_s"] = sum(rows[name].values())
print(f"\nseconds per GRPO step (mean of steps 6-30; 32 prompts x 8 samples, 0.8M-param model, CPU)")
print(f"{'':8}" + "".join(f"{k:>12}" for k in rows["1proc"]))
for name, r in rows.items():
    print(f"{name:8}" + "".join(f"{v:12.3f}" for v in r.values()))
print(f"{'2p / 1p':8}" + "".join(f"{rows['2proc'][k] / rows['1proc'][k]:12.2f}" for k in rows["1proc"]))
PY
}

setup
case "$mode" in
  setup) ;;
  main) main "$@" ;;
  bench) bench ;;
  *) echo "usage: bash run.sh [main|setup|bench] [grpo flags...]"; exit 2 ;;
esac

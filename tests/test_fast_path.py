"""The near-free hard gate (issue 13): the logit cut instead of a sigmoid, the batch-1 host decision, statistics only
on request, channels_last kept through real skipping, and compiled inference as one graph without per-block
recompiles. Behaviour only (equal outputs, identical decisions, counted compilations), never timings."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch
from torch import nn

import gateify
from gateify.gate import keep_cut

from conftest import perturb_batchnorm, split_decisions

# a family per way of building blocks, all at 64x64: CIFAR option-A, bottleneck, pre-activation, Res2Net's
# hierarchical split, squeeze-excitation with grouped convs, torchvision's basic block
FAMILIES = ["resnet20", "resnet50", "resnetv2_50", "res2net50_14w_8s", "seresnext26d_32x4d", "torchvision:resnet18"]


def converted(name: str, x: torch.Tensor) -> nn.Module:
    """``name`` converted, random BN statistics, each gate splitting ``x`` with a margin (conftest.split_decisions)."""
    torch.manual_seed(0)
    model = perturb_batchnorm(gateify.create_model(name)).eval()
    return split_decisions(gateify.convert(model, example_input=x[:2]), x)


def branch_runs(model: nn.Module) -> list[list[int]]:
    """Per gate, the batch size of every branch run from now on (empty: the branch never ran); instance-level
    wrappers of ``_run_branch``, which both paths call, so the fast path needs no record to be observed."""
    runs: list[list[int]] = []
    for gate in gateify.gates(model).values():
        seen: list[int] = []
        runs.append(seen)
        run = type(gate)._run_branch.__get__(gate)
        gate._run_branch = lambda *a, run=run, seen=seen: (seen.append(a[0].shape[0]), run(*a))[1]
    return runs


def recorded(model: nn.Module) -> torch.Tensor:
    """``(gates, B)`` bool: the decisions of the last forward pass, which must have been recorded."""
    return torch.stack([g.last.gate.bool() for g in gateify.gates(model).values()])


# --- the decision rule ---------------------------------------------------------------------------------------------

THRESHOLDS = [0.0, 1e-13, 0.05, 0.3, 0.5, 0.7, 0.999, 1 - 2 ** -24, 1.0, 1.0 + 1e-6, 1.5, math.nan]


def test_logit_cut_decides_as_the_sigmoid_rule():
    """``z >= keep_cut(t)`` iff ``sigmoid(z) >= t`` (sigmoid rounded to float32), for every threshold the gate
    accepts and the edge ones: t <= 0 keeps everything (a logit of -inf too), t > 1 or NaN skips everything (+inf
    too), a NaN logit is never kept; a cut is a float32 value, so a tensor and its .item() compare alike."""
    g = torch.Generator().manual_seed(0)
    z = torch.cat([torch.randn(20000, generator=g) * 8, torch.tensor([-math.inf, math.inf, math.nan, 0.0, -0.0]),
                   torch.linspace(-40, 40, 4001)]).float()
    exact = torch.sigmoid(z.double()).float()  # the float32 keep probability, correctly rounded
    for t in THRESHOLDS:
        cut = keep_cut(t)
        assert math.isnan(cut) or cut == torch.tensor(cut, dtype=torch.float32).item()
        assert torch.equal(z >= cut, exact >= t), t
        moderate = z.abs() < 15  # where torch's float32 sigmoid is within rounding of the exact one
        assert torch.equal((z >= cut)[moderate], (torch.sigmoid(z) >= t)[moderate]), t
        assert [v >= cut for v in z[:50].tolist()] == (z[:50] >= cut).tolist()
    assert keep_cut(0.0) == -math.inf and math.isnan(keep_cut(1.5)) and keep_cut(0.5) <= 0.0 < keep_cut(0.5 + 1e-6)


def test_exported_programs_decode_the_threshold_exactly():
    """torch.export reads the threshold from its int32 bits by arithmetic (ONNX cannot translate the bit view):
    every float32, subnormals, infinities and NaN included, comes back bit for bit."""
    from gateify.gate import _float_from_bits

    special = torch.tensor([0.0, -0.0, 0.5, 1.0, 1.5, 1e-13, 1e-40, 1e-45, 1.17549435e-38, 3.4e38, math.inf,
                            -math.inf, -2.5, 1 - 2 ** -24])
    bits = torch.cat([special.view(torch.int32),
                      torch.randint(-2**31, 2**31 - 1, (500,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.int64).to(torch.int32)])
    decoded = torch.stack([_float_from_bits(b) for b in bits])
    reference = bits.view(torch.float32)
    assert ((decoded.view(torch.int32) == bits) | (decoded.isnan() & reference.isnan())).all()


def one_gate(bias: float) -> gateify.ResidualGate:
    """A gate whose controller gives every sample the keep logit ``bias``, on a one-conv branch."""
    torch.manual_seed(0)
    gate = gateify.ResidualGate(nn.Conv2d(4, 4, 3, padding=1), 4, [True], gateify.GateConfig()).eval()
    with torch.no_grad():
        gate.controller.fc2.weight.zero_()
        gate.controller.fc2.bias.fill_(bias)
    return gate


@pytest.mark.parametrize("batch", [1, 5])
def test_every_way_of_setting_the_threshold_reaches_the_fast_path(batch):
    """The gate caches the cut of its threshold; writes through the float view (also under inference_mode, which
    does not bump version counters), set_mode, calibrate's fill_ and load_state_dict must all take effect."""
    gate = one_gate(bias=0.4)  # keep probability sigmoid(0.4) = 0.599
    x, s = torch.randn(batch, 4, 6, 6), torch.randn(batch, 4, 6, 6)
    with torch.no_grad():
        f = gate.branch(x)

    def kept() -> bool:
        with torch.no_grad():
            out = gate(s.clone(), (x,), ())
        assert torch.equal(out, s + f) or torch.equal(out, s)
        return torch.equal(out, s + f)

    assert kept()  # threshold 0.5
    gate.threshold.fill_(0.6)
    assert not kept()
    with torch.inference_mode():
        gate.threshold.fill_(0.59)
        assert kept()
        gate.threshold.fill_(0.61)
        assert not kept()
    state = copy.deepcopy(gate.state_dict())
    gate.threshold.fill_(0.0)
    assert kept()
    gate.load_state_dict(state)  # back to 0.61
    assert not kept()
    model = nn.Sequential()
    model.gate = gate
    gateify.set_mode(model, "hard", threshold=0.5)
    assert kept()
    gateify.set_mode(model, "hard", threshold=1.5)
    assert not kept()


# --- fast path against general path --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_fast_path_and_general_path_agree(name):
    """Without a record (the fast path: the logit cut on the batch, a host decision at batch 1) and with one (the
    general path: a keep mask, nonzero) a model computes the same outputs from the same decisions, in a mixed batch
    and for each sample alone; a sample alone decides as it did in the batch."""
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = converted(name, x)
    runs = branch_runs(model)
    with torch.no_grad():
        fast = model(x)
        fast_kept = [r[-1] if r else 0 for r in runs]
        for r in runs:
            r.clear()
        assert all(g.last is None for g in gateify.gates(model).values())  # nothing recorded
        with gateify.record_decisions(model):
            general = model(x)
        kept = recorded(model)
        assert torch.equal(fast, general)
        assert fast_kept == kept.sum(1).tolist()
        assert ((kept.sum(1) > 0) & (kept.sum(1) < len(x))).all()  # every block splits the batch
        scale = fast.abs().max().item()
        for i in range(len(x)):
            for r in runs:
                r.clear()
            alone = model(x[i:i + 1])  # batch-1 fast path: one host decision per gate
            ran = torch.tensor([len(r) == 1 for r in runs])
            assert torch.equal(ran, kept[:, i])  # the same blocks as in the batch
            with gateify.record_decisions(model):
                alone_general = model(x[i:i + 1])
            assert torch.equal(recorded(model)[:, 0], kept[:, i])
            assert torch.equal(alone, alone_general)
            # to float32 rounding: batch-size-dependent kernels change the last bits, never the decisions
            assert (alone[0] - fast[i]).abs().max().item() <= 1e-5 * max(scale, 1.0)


# --- statistics on request -----------------------------------------------------------------------------------------

def test_statistics_are_recorded_only_on_request(resnet20, cifar_batch):
    gated = gateify.set_mode(split_decisions(gateify.convert(resnet20), cifar_batch), "auto").eval()
    found = gateify.gates(gated)
    with torch.no_grad():
        with gateify.gate_mode(gated, "gumbel"):  # gumbel mode always records: the regulariser reads it
            gated(cifar_batch)
        assert all(g.last is not None and g.last.mode == "gumbel" for g in found.values())
        gated(cifar_batch)  # hard mode (auto in eval()) without a request: no record, and no stale one either
        assert all(g.last is None for g in found.values())
        with gateify.record_decisions(gated) as handle:
            gated(cifar_batch)
            assert isinstance(handle, gateify.record_decisions)
            first = recorded(gated)
            assert first.shape == (len(found), len(cifar_batch)) and (first.any(1) & ~first.all(1)).all()
            assert all(g.last.mode == "hard" and g.last.keep_prob.shape == (len(cifar_batch),) for g in found.values())
            with gateify.gate_mode(gated, "dense"):
                gated(cifar_batch)
                assert recorded(gated).all()
        assert not any(g.record for g in found.values())  # the context gave every gate its setting back
        gateify.record_decisions(gated)  # a plain call: on until switched off
        gated(cifar_batch)
        assert torch.equal(recorded(gated), first)
        gateify.record_decisions(gated, False)
        gated(cifar_batch)
        assert all(g.last is None for g in found.values())
    # the statistics helpers ask for records themselves, at any batch, and leave the setting as it was
    rates = gateify.keep_rates(gated, cifar_batch)
    assert rates == pytest.approx({name: float(k.float().mean()) for name, k in zip(found, first)})
    report, single = gateify.flops(gated, cifar_batch), gateify.flops(gated, cifar_batch[:1])
    assert [b.keep_rate for b in report.blocks] == pytest.approx(list(rates.values()))
    assert single.gate_flops == report.gate_flops > 0  # the batch-1 controller (addmv) is counted as well
    assert not any(g.record for g in found.values())


# --- channels_last ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_channels_last_survives_real_skipping(name):
    """A channels_last model keeps every block output channels_last whatever its gate decided (gathering with
    index_select and scattering with index_add return NCHW), and computes what the NCHW model computes."""
    x = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    model = converted(name, x)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    layouts: dict[str, list[bool]] = {}
    for block in gateify.gates(last):
        last.get_submodule(block).register_forward_hook(
            lambda m, i, o, block=block: layouts.setdefault(block, []).append(o.is_contiguous(
                memory_format=torch.channels_last)))
    with torch.no_grad(), gateify.record_decisions(last):
        for batch in (x, x[:1], x[3:4]):
            out = last(batch.contiguous(memory_format=torch.channels_last))
            assert (out - model(batch)).abs().max().item() <= 1e-4 * max(out.abs().max().item(), 1.0)
            if len(batch) > 1:
                kept = recorded(last)
                assert ((kept.sum(1) > 0) & (kept.sum(1) < len(batch))).all()  # every block gathered
    assert layouts and all(all(v) for v in layouts.values()), layouts


# --- compiled inference --------------------------------------------------------------------------------------------

def test_compiled_model_is_one_graph_that_equals_eager():
    """gateify.compile: the hard-gated ResNet-20 compiles once for its input shape (no graph break, no recompile per
    block or per decision), matches eager within 1e-5 on mixed decisions, and follows a new threshold. Inductor
    compiles it in about 20-40 s on 2 CPU cores: the one slow test here."""
    from torch._dynamo.utils import counters

    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    other = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    model = split_decisions(gateify.convert(perturb_batchnorm(gateify.create_model("resnet20"))).eval(), x)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = gateify.compile(model)
        decisions = []
        with torch.no_grad():
            for batch in (x, other, x):
                got = compiled(batch)
                with gateify.record_decisions(model):
                    expected = model(batch)
                decisions.append(recorded(model))
                assert ((decisions[-1].sum(1) > 0) & (decisions[-1].sum(1) < len(batch))).any()  # mixed
                assert (got - expected).abs().max().item() <= 1e-5
            assert not torch.equal(decisions[0], decisions[1])  # other decisions, the same compiled graph
            for threshold in (0.0, 1.5):  # a graph input: the compiled model follows it without recompiling
                gateify.set_mode(model, "hard", threshold=threshold)
                got, expected = compiled(x), model(x)
                assert (got - expected).abs().max().item() <= 1e-5
        # every call after the first hit the cache: one frame converted once, one graph, no break anywhere (a
        # recompile, per block or per decision, would convert the frame again)
        assert counters["frames"]["total"] == counters["frames"]["ok"] == 1
        assert counters["stats"]["unique_graphs"] == 1
        assert not counters["graph_break"]
        assert not torch._dynamo.config.capture_dynamic_output_shape_ops  # switched on for the calls only
    finally:
        torch._dynamo.reset()


def test_latency_interleaving_gives_every_variant_every_predecessor_equally_often():
    """A fixed round-robin order (or a rotated one) always runs the same variant right after the largest model, on
    cold caches; benchmarks/latency.py's ratios rely on each round's order varying so that none is favoured."""
    from gateify.timing import measure_latency_spread

    for n in (3, 4, 5):
        keys = "abcde"[:n]
        calls: list[str] = []
        fns = {k: (lambda k=k: calls.append(k)) for k in keys}
        rounds = 2 * n * (2 if n % 2 else 1)  # two full cycles of the orders
        spread = measure_latency_spread(fns, torch.device("cpu"), warmup=1, repeats=rounds)
        assert set(spread) == set(keys) and len(calls) == n * (rounds + 1)
        timed = [calls[n * (r + 1):n * (r + 2)] for r in range(rounds)]
        assert all(sorted(order) == list(keys) for order in timed)
        pairs = [(order[i - 1], order[i]) for order in timed for i in range(1, n)]
        counts = {(p, k): pairs.count((p, k)) for p in keys for k in keys if p != k}
        assert len(set(counts.values())) == 1, counts  # every ordered pair adjacent equally often


def test_latency_samples_can_be_bursts_of_back_to_back_calls():
    """A served model runs call after call: with ``min_sample_ms`` each timed sample is the mean of enough
    back-to-back calls of one variant to fill it (sized from the slowest variant), not one call on cold caches."""
    from gateify.timing import measure_latency_spread

    calls: list[str] = []
    fns = {"fast": lambda: calls.append("fast"), "slow": lambda: (calls.append("slow"), time.sleep(0.002))}
    spread = measure_latency_spread(fns, torch.device("cpu"), warmup=1, repeats=4, min_sample_ms=10)
    burst, rest = divmod(len(calls) - 2, 8)  # 2 variants x 4 rounds of samples after one warm-up call each
    assert rest == 0 and 2 <= burst <= 5  # 10 ms of 2 ms calls per sample
    first = calls[2:2 + 2 * burst]  # round 0: one variant's burst, then the other's
    assert len(set(first[:burst])) == 1 and len(set(first[burst:])) == 1 and first[0] != first[-1]
    assert spread["slow"].median >= 2.0 > spread["fast"].median  # per call, not per burst
    calls.clear()
    measure_latency_spread(fns, torch.device("cpu"), warmup=1, repeats=4)
    assert len(calls) == 2 + 8  # the default: one call per sample

"""torch.export of hard-gated models (data-dependent skipping kept as torch.cond) and of to_static models; ONNX
export run in onnxruntime (onnx, onnxscript and onnxruntime are in the ``dev`` extra that ``make test`` installs;
they are not gateify dependencies)."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from torch import nn

import gateify

from conftest import mix_decisions, perturb_batchnorm

BATCH = torch.export.Dim("batch", min=1, max=512)
TOL = 1e-5


def batch(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gated() -> nn.Module:
    """resnet20 in hard mode whose controllers split a batch about half and half at every block."""
    torch.manual_seed(0)
    model = gateify.convert(perturb_batchnorm(gateify.create_model("resnet20"))).eval()
    mix_decisions(model, batch(16, 1))
    gateify.record_decisions(model)  # kept() reads the eager forward's decisions
    return gateify.set_mode(model, "hard")


@pytest.fixture(scope="module")
def exported(gated) -> torch.export.ExportedProgram:
    return torch.export.export(gated, (batch(16, 1),), dynamic_shapes={"x": {0: BATCH}})


def kept(model: nn.Module) -> torch.Tensor:
    """``(gates, B)`` bool: which samples the last eager forward kept, per block."""
    return torch.stack([g.last.gate for g in gateify.gates(model).values()])


def assert_matches(program: nn.Module, eager: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        expected = eager(x)
        got = program(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= TOL
    return kept(eager)


def test_graph_keeps_data_dependent_skipping(gated, exported):
    conds = [n for n in exported.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == len(gateify.gates(gated))  # one "anyone kept?" branch per gate: nothing baked in
    # the sub-batch is gathered inside the cond's "kept" side only, so the main graph never syncs on nonzero
    assert torch.ops.aten.nonzero.default not in {n.target for n in exported.graph.nodes}


@pytest.mark.parametrize("n,seed", [(16, 1), (40, 2), (1, 3), (1, 4)])
def test_matches_eager_hard_mode(gated, exported, n, seed):
    decisions = assert_matches(exported.module(), gated, batch(n, seed))
    if n > 1:
        assert (decisions.any(1) & ~decisions.all(1)).all()  # every block split the batch: mixed decisions


def test_single_samples_take_different_paths(gated, exported):
    module = exported.module()
    paths = {tuple(assert_matches(module, gated, batch(1, seed))[:, 0].tolist()) for seed in range(3, 9)}
    assert len(paths) > 1  # the same exported program skips different blocks for different inputs


def test_batch_where_every_sample_skips_a_block(gated, exported):
    pool = batch(64, 5)
    with torch.no_grad():
        gated(pool)
    decisions = kept(gated)
    block = int(torch.argmin(decisions.sum(1)))
    x = pool[~decisions[block]][:6]  # per-sample decisions do not depend on the rest of the batch
    assert x.shape[0] == 6
    after = assert_matches(exported.module(), gated, x)
    assert not after[block].any()  # the cond's skip side ran for the whole batch


@pytest.mark.parametrize("threshold,expect", [(0.0, True), (1.5, False)], ids=["all-keep", "all-skip"])
def test_thresholds_stay_buffers_of_the_exported_program(gated, exported, threshold, expect):
    module = copy.deepcopy(exported.module())  # its buffers share memory with the program's state dict
    eager = copy.deepcopy(gated)
    for name, buffer in module.named_buffers():
        if name.endswith("gate.threshold_bits"):
            buffer.view(torch.float32).fill_(threshold)
    gateify.set_mode(eager, "hard", threshold=threshold)
    decisions = assert_matches(module, eager, batch(8, 6))
    assert decisions.all() if expect else not decisions.any()


@pytest.fixture(scope="module")
def static(gated):
    """A static selection: blocks 1, 4 and 7 removed for every sample."""
    model = copy.deepcopy(gated)
    names = list(gateify.gates(model))
    gateify.set_static(model, {names[i]: False for i in (1, 4, 7)})
    return model, gateify.to_static(model).eval()


class ClassTokenBlock(nn.Module):
    """A residual whose shortcut is a view of the branch's input (VOLO's and CrossViT's class attention:
    ``cls = x[:, :1] + attn(norm(x))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x):
        cls = x[:, :1] + self.fc(self.norm(x)).mean(1, keepdim=True)
        return torch.cat([cls, x[:, 1:]], dim=1)


class ClassTokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.b1, self.b2, self.head = nn.Linear(4, 8), ClassTokenBlock(), ClassTokenBlock(), nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.embed(x)))[:, 0])


def test_a_shortcut_that_is_a_view_of_the_branch_input_exports():
    """torch.cond refuses operands that alias one another; the class token's shortcut is handed over as a copy."""
    torch.manual_seed(0)
    tokens = torch.randn(12, 5, 4, generator=torch.Generator().manual_seed(3))
    model = gateify.convert(ClassTokenNet(), example_input=tokens[:2]).eval()
    mix_decisions(model, tokens)
    gateify.set_mode(model, "hard")
    program = torch.export.export(model, (tokens,), dynamic_shapes={"x": {0: BATCH}})
    assert sum(n.target is torch.ops.higher_order.cond for n in program.graph.nodes) == 2
    gateify.record_decisions(model)
    decisions = assert_matches(program.module(), model, tokens)
    assert 0 < int(decisions.sum()) < decisions.numel()  # some samples skip a block, some do not
    for x in (tokens[:3], tokens[5:6]):
        assert_matches(program.module(), model, x)


def test_to_static_exports_without_control_flow(static):
    gated_static, plain = static
    program = torch.export.export(plain, (batch(4, 1),), dynamic_shapes={"x": {0: BATCH}})
    targets = {n.target for n in program.graph.nodes}
    assert torch.ops.higher_order.cond not in targets and torch.ops.aten.nonzero.default not in targets
    convolutions = sum(n.target is torch.ops.aten.conv2d.default for n in program.graph.nodes)
    assert convolutions == 1 + 2 * (9 - 3)  # the stem and 6 kept blocks of two (shortcuts are pad, not conv)
    for n, seed in [(1, 2), (33, 3)]:
        assert_matches(program.module(), gated_static, batch(n, seed))


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[dev]'")
@pytest.mark.parametrize("which", ["static", "hard"])
def test_onnx_dynamo_export_runs_in_onnxruntime(which, gated, exported, static, tmp_path):
    import onnx
    import onnxruntime

    eager = static[0] if which == "static" else gated
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "static":
            program = torch.onnx.export(static[1], (batch(4, 1),), dynamic_shapes={"x": {0: BATCH}}, dynamo=True,
                                        verbose=False)
        else:  # from the exported program: no second trace
            program = torch.onnx.export(exported, dynamo=True, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    ops = {node.op_type for node in onnx.load(str(tmp_path / "model.onnx")).graph.node}
    assert ("If" in ops) == (which == "hard")  # torch.cond became ONNX If: still per-sample skipping
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n, seed in [(1, 3), (1, 4), (24, 5)]:
        x = batch(n, seed)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        with torch.no_grad():
            assert (got - eager(x)).abs().max() <= 1e-4  # another runtime's kernels: float32 rounding differs


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # torch's own deprecation notice, not ours
def test_tracing_hard_gates_is_refused_not_silently_frozen(gated):
    """torch.jit.trace (and the legacy ONNX exporter built on it) would freeze the example's decisions."""
    x = batch(2, 0)
    with pytest.raises(gateify.GateifyError, match="dynamo=True"):
        torch.jit.trace(gated, (x,))


def test_exporting_static_mode_points_to_to_static(static):
    gated_static, _ = static
    with pytest.raises(gateify.GateifyError, match="to_static"):
        torch.export.export(gated_static, (batch(2, 0),))


# --- routed models: one graph, the escalation a torch.cond -----------------------------------------------------------

CHEAP = {"layer1.0": False, "layer1.2": False, "layer2.2": False, "layer3.0": False, "layer3.1": False,
         "layer3.2": False}
DEEP = {"layer1.0": False, "layer1.2": False, "layer3.2": False}


@pytest.fixture(scope="module")
def routed() -> gateify.RoutedModel:
    """resnet20 routed between two paths, its threshold sending about half of a batch deeper."""
    torch.manual_seed(0)
    model = perturb_batchnorm(gateify.create_model("resnet20", num_classes=10)).eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)  # confident on some samples, unsure of others
    routed = gateify.route(gateify.convert(model), [CHEAP, DEEP]).eval()
    gateify.calibrate(routed, batch(32, 1), target=0.5)
    return routed


@pytest.fixture(scope="module")
def routed_program(routed) -> torch.export.ExportedProgram:
    return torch.export.export(routed, (batch(16, 1),), dynamic_shapes={"x": {0: BATCH}})


def escalation_sets():
    """Batches whose escalated samples differ: none, some, all, and single samples either way."""
    return [(24, 2), (7, 3), (1, 4), (1, 5), (1, 6), (3, 8)]


def test_a_routed_model_exports_as_one_graph_with_its_escalation_a_cond(routed, routed_program):
    conds = [n for n in routed_program.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == 1  # one data-dependent step for the one deeper level
    assert torch.ops.aten.nonzero.default not in {n.target for n in routed_program.graph.nodes}
    module = routed_program.module()
    seen = set()
    with torch.no_grad():
        for n, seed in escalation_sets():
            x = batch(n, seed)
            out, levels = routed.forward_routes(x)
            seen.add((n, int(levels.sum())))
            assert (module(x) - out).abs().max() <= TOL
    assert any(s == 0 for _, s in seen) and any(0 < s < n for n, s in seen)  # both sides of the cond ran


def test_a_routed_programs_threshold_stays_a_buffer(routed, routed_program):
    module = copy.deepcopy(routed_program.module())
    eager = copy.deepcopy(routed)
    for threshold in (0.0, 1.5):  # every sample deeper; none
        module.threshold_bits.view(torch.float32).fill_(threshold)
        eager.threshold.fill_(threshold)
        with torch.no_grad():
            assert (module(batch(8, 6)) - eager(batch(8, 6))).abs().max() <= TOL
            levels = eager.forward_routes(batch(8, 6)).levels
        assert bool((levels == 1).all()) == (threshold == 0.0)


def test_gateify_compile_makes_a_routed_model_one_graph(routed):
    x = batch(12, 2)
    config = torch._dynamo.config
    config.capture_dynamic_output_shape_ops = True  # what gateify.compile sets around its calls
    try:
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(routed)(x)
    finally:
        config.capture_dynamic_output_shape_ops = False
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = gateify.compile(routed, backend="eager")  # dynamo's graph run as is: the capture, not inductor
    with torch.no_grad():
        for n, seed in escalation_sets():  # channels_last input (the default): other rounding, the same routes
            torch.testing.assert_close(compiled(batch(n, seed)), routed(batch(n, seed)), rtol=1e-5, atol=TOL)


def test_inductor_compiles_a_routed_model_channels_last():
    """Inductor itself, not only dynamo's capture: the routed model compiles (its input handed over channels_last,
    inductor's own layout optimisation off, so the cond's sides agree with the strides they were traced for) and
    equals eager on a batch where both sides of the escalation run. About 20-30 s of compiling on 2 CPU cores."""
    torch.manual_seed(0)
    model = perturb_batchnorm(gateify.create_model("resnet20", num_classes=10)).eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)
    routed = gateify.route(gateify.convert(model), [CHEAP, DEEP]).eval()
    gateify.calibrate(routed, batch(32, 1), target=0.5)
    torch._dynamo.reset()
    try:
        compiled = gateify.compile(routed, dynamic=False)
        with torch.no_grad():
            x = batch(8, 2)
            levels = routed.forward_routes(x).levels
            assert 0 < int(levels.sum()) < len(x)  # some samples escalated, some not: both sides of the cond run
            torch.testing.assert_close(compiled(x), routed(x), rtol=1e-4, atol=1e-4)
            for everyone in (0.0, 1.0):  # every sample on (the whole batch, no gather), none: the same graph
                routed.threshold.fill_(everyone)
                assert int(routed.forward_routes(x).levels.sum()) == (len(x) if everyone == 0.0 else 0)
                torch.testing.assert_close(compiled(x), routed(x), rtol=1e-4, atol=1e-4)
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[dev]'")
def test_a_routed_model_runs_in_onnxruntime(routed, routed_program, tmp_path):
    import onnx
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(routed_program, dynamo=True, verbose=False)
    program.save(str(tmp_path / "routed.onnx"))
    assert "If" in {node.op_type for node in onnx.load(str(tmp_path / "routed.onnx")).graph.node}
    session = onnxruntime.InferenceSession(str(tmp_path / "routed.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for n, seed in escalation_sets():
            x = batch(n, seed)
            got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
            assert (got - routed(x)).abs().max() <= 1e-4


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[dev]'")
def test_a_routed_model_runs_as_one_onnx_graph_per_level(routed, tmp_path):
    """export_onnx_segments + OnnxRoutedSession: each level its own main graph (onnxruntime optimises an If's
    subgraph less), the step between levels in NumPy: the routed logits and routes on every escalation set."""
    folder = gateify.export_onnx_segments(routed, batch(16, 1), tmp_path / "routed")
    assert sorted(p.name for p in folder.iterdir()) == ["routing.json", "segment_0.onnx", "segment_1.onnx"]
    session = gateify.OnnxRoutedSession(folder, threads=1)
    seen = set()
    with torch.no_grad():
        for n, seed in escalation_sets():
            x = batch(n, seed)
            out, levels = routed.forward_routes(x)
            got, got_levels = session.run_routes(x.numpy())
            seen.add((n, int(levels.sum())))
            assert (torch.from_numpy(got) - out).abs().max() <= 1e-4
            assert (got_levels == levels.numpy()).all()
            assert (torch.from_numpy(session(x.numpy())) - out).abs().max() <= 1e-4
    assert any(e == 0 for _, e in seen) and any(0 < e < n for n, e in seen) and any(e == n for n, e in seen)  # none, some, all
    plan = folder / "routing.json"
    good = plan.read_text()
    plan.write_text("[]")
    with pytest.raises(gateify.WeightsFileError, match="not a gateify ONNX segment plan"):
        gateify.OnnxRoutedSession(folder)
    plan.write_text('{"format": "gateify-onnx-segments", "version": 1}')
    with pytest.raises(gateify.WeightsFileError, match="damaged"):
        gateify.OnnxRoutedSession(folder)
    plan.write_text(good)
    (folder / "segment_1.onnx").unlink()
    with pytest.raises(gateify.WeightsFileError, match="segment_1.onnx is missing"):
        gateify.OnnxRoutedSession(folder)
    with pytest.raises(gateify.WeightsFileError, match="export_onnx_segments"):
        gateify.OnnxRoutedSession(tmp_path)
    with pytest.raises(gateify.GateConfigError, match="eval"):
        gateify.export_onnx_segments(copy.deepcopy(routed).train(), batch(2, 1), tmp_path / "train")


@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
                    reason="ONNX export needs onnx, onnxscript and onnxruntime: pip install -e '.[dev]'")
def test_three_levels_as_onnx_graphs_hand_each_level_what_it_starts_from(tmp_path):
    """Level 2 departs before level 1 does (layer1.2 < layer3.1), so level 0 hands it its activation through level
    1's sub-batch: the NumPy driver follows the plan's sources and carries as RoutedModel does."""
    late = {"layer1.0": False, "layer1.2": False, "layer2.1": False, "layer2.2": False, "layer3.1": False,
            "layer3.2": False}
    torch.manual_seed(0)
    model = perturb_batchnorm(gateify.create_model("resnet20", num_classes=10)).eval()
    with torch.no_grad():
        model.fc.weight.mul_(20)
    routed = gateify.route(gateify.convert(model), [late, {**late, "layer3.1": True},
                                                   {**late, "layer3.1": True, "layer1.2": True}]).eval()
    routed.threshold.copy_(torch.tensor([0.3, 0.01]))
    session = gateify.OnnxRoutedSession(gateify.export_onnx_segments(routed, batch(8, 1), tmp_path), threads=1)
    x = batch(24, 5)
    with torch.no_grad():
        out, levels = routed.forward_routes(x)
    got, got_levels = session.run_routes(x.numpy())
    assert set(levels.tolist()) == {0, 1, 2}  # every level in use
    assert (got_levels == levels.numpy()).all() and (torch.from_numpy(got) - out).abs().max() <= 1e-4


def test_segments_compiled_on_their_own_with_buckets_equal_eager(routed):
    """routed.compile_segments: each level's code compiled alone (CUDA graphs per segment on a GPU with
    mode='reduce-overhead'), deeper sub-batches padded to powers of two and trimmed again."""
    fast = copy.deepcopy(routed).compile_segments(backend="eager", dynamic=False)
    seen = []
    hook = fast.network.layer3[0].conv1.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    with torch.no_grad():
        for n, seed in escalation_sets():
            x = batch(n, seed)
            out, levels = routed.forward_routes(x)
            got, got_levels = fast.forward_routes(x)
            assert torch.equal(got_levels, levels) and (got - out).abs().max() <= TOL
    hook.remove()
    assert seen and all(s & (s - 1) == 0 for s in seen)  # the deeper level only ever saw powers of two

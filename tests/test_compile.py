"""torch.compile and torch.export of models built from these layers.

The fused kernels run as custom ops under tracing (lstm::fused_cpp_* for the C++ LSTM,
lstm::fused_gru_* and lstm::fused_simple_rnn_* for the C++ GRU and SimpleRNN), so `torch.compile(model, fullgraph=True)`
traces a whole Sequential model (masks, Bidirectional, dropout masks, stateful layers...) without a
graph break, forward and backward equal to eager; `torch.export` of an inference model runs the
same ops, with dynamic batch and sequence sizes.

Most checks use the aot_eager backend (the whole Dynamo + AOTAutograd path, seconds per model);
one runs inductor (the default backend, ~15 s to compile on two busy cores)."""

from __future__ import annotations

import io
import re

import pytest
import torch

import lstm
import lstm.kernels
from lstm import layers, models
from marks import needs_cpp


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _tokens(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, 20, (B, T), generator=g)
    x[0, T // 2:] = 0  # padding: Embedding(mask_zero) masks these steps
    if B > 2:
        x[2, :2] = 0
    return x


def _stack():
    return models.Sequential([layers.Embedding(20, 8, mask_zero=True), layers.LSTM(6, return_sequences=True),
                              layers.GRU(5, return_sequences=True, reset_after=False),
                              layers.SimpleRNN(4, go_backwards=True), layers.Dense(3)])


def _bidirectional():
    return models.Sequential([layers.Embedding(20, 8, mask_zero=True),
                              layers.Bidirectional(layers.GRU(6, return_sequences=True)),
                              layers.Bidirectional(layers.LSTM(4), merge_mode="sum"), layers.Dense(3)])


def _step(model, x):
    out = model(x)
    loss = (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    return out.detach(), torch.autograd.grad(loss, params)


def _assert_same(a, b, tol=0.0):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.allclose(out_a, out_b, rtol=tol, atol=tol), float((out_a - out_b).abs().max())
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=tol, atol=tol), float((ga - gb).abs().max())


def _kernels_used(model, x) -> set:
    """The kernels the dispatch picks for the model's recurrent layers (eagerly)."""
    used = set()
    select = lstm.kernels.dispatch.select

    def spy(problem):
        kernel = select(problem)
        used.add(kernel.name)
        return kernel

    lstm.kernels.dispatch.select = spy
    try:
        with torch.no_grad():
            model(x)
    finally:
        lstm.kernels.dispatch.select = select
    return used


@pytest.mark.parametrize("build", [_stack, _bidirectional])
def test_fullgraph_forward_and_backward_equal_eager(build):
    torch.manual_seed(0)
    model = build()
    x = _tokens(3, 7)
    model(x)
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break fails
    # (equal up to the order gradient contributions are summed in)
    _assert_same(_step(compiled, x), _step(model, x), tol=1e-6)
    x2 = _tokens(5, 9, seed=1)  # another batch and length: one recompile (dynamic sizes), no break
    _assert_same(_step(compiled, x2), _step(model, x2), tol=1e-6)
    if native.extension() is not None:  # (the fused kernels were compiled, not only the reference)
        assert _kernels_used(model, x) & {"fused_cpp", "fused_gru_simple_rnn"}


def test_inductor_training_step_equals_eager():
    torch.manual_seed(1)
    model = models.Sequential([layers.Embedding(20, 8, mask_zero=True), layers.LSTM(6, return_sequences=True),
                               layers.GRU(5), layers.Dense(3)])
    x = _tokens(3, 7)
    model(x)
    compiled = torch.compile(model, fullgraph=True)  # inductor
    # (no on-disk caches: their keys miss edits of a custom op's autograd formula)
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        _assert_same(_step(compiled, x), _step(model, x), tol=1e-5)
    # an optimizer step on the compiled model moves the shared weights
    before = model.layers[1].cell.kernel.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled(x).square().sum().backward()
    opt.step()
    assert not torch.equal(before, model.layers[1].cell.kernel)


def test_seeded_dropout_masks_equal_eager():
    torch.manual_seed(2)
    model = models.Sequential([layers.Embedding(20, 8, mask_zero=True),
                               layers.LSTM(6, dropout=0.2, recurrent_dropout=0.3, return_sequences=True, seed=3),
                               layers.GRU(5, dropout=0.1, recurrent_dropout=0.2, seed=4),
                               layers.Dropout(0.25, seed=5), layers.Dense(3)])
    x = _tokens(3, 7)
    model(x)
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def reseed():
        model.layers[1].cell._generator.manual_seed(3)
        model.layers[2].cell._generator.manual_seed(4)
        model.layers[3]._generator.manual_seed(5)

    reseed()
    a = [_step(compiled, x) for _ in range(2)]  # two calls: fresh masks each call, from the layers' generators
    reseed()
    b = [_step(model, x) for _ in range(2)]
    for u, v in zip(a, b):
        _assert_same(u, v)
    assert not torch.equal(a[0][0], a[1][0])


@needs_cpp
def test_layer_options_under_compile():
    torch.manual_seed(3)
    x = torch.randn(3, 7, 4)
    # return_state with an initial state
    layer = layers.LSTM(5, return_sequences=True, return_state=True)
    layer(x)
    h0 = [torch.randn(3, 5), torch.randn(3, 5)]
    got = torch.compile(lambda v: layer(v, initial_state=h0), fullgraph=True, backend="aot_eager")(x)
    for a, b in zip(got, layer(x, initial_state=h0)):
        assert torch.equal(a, b)
    # gate traces (fused kernels: detached, as in eager)
    gru = layers.GRU(5, return_sequences=True)
    gru(x)
    out, gates = torch.compile(lambda v: gru(v, return_gates=True), fullgraph=True, backend="aot_eager")(x)
    out_e, gates_e = gru(x, return_gates=True)
    assert torch.equal(out, out_e) and list(gates) == list(gates_e)
    assert all(torch.equal(gates[k], gates_e[k]) for k in gates)
    # a stateful layer carries its states across compiled calls
    s1, s2 = layers.SimpleRNN(5, stateful=True), layers.SimpleRNN(5, stateful=True)
    s1(x)
    s2.load_state_dict(s1.state_dict())
    s1.reset_state()
    compiled = torch.compile(s2, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        assert torch.equal(compiled(x), s1(x))
    assert torch.equal(s1.states[0], s2.states[0])
    # a cell step, Masking and TimeDistributed
    cell = layers.LSTMCell(5)
    cell(x[:, 0])
    assert torch.equal(torch.compile(lambda v: cell(v)[0], fullgraph=True, backend="aot_eager")(x[:, 0]),
                       cell(x[:, 0])[0])
    model = models.Sequential([layers.Masking(0.0), layers.LSTM(6, return_sequences=True),
                               layers.TimeDistributed(layers.Dense(2))])
    xm = x.clone()
    xm[0, 4:] = 0
    model(xm)
    assert torch.equal(torch.compile(model, fullgraph=True, backend="aot_eager")(xm), model(xm))


def test_embedding_range_check_under_compile():
    emb = layers.Embedding(10, 3)
    compiled = torch.compile(emb, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(torch.tensor([[1, 9]])), emb(torch.tensor([[1, 9]])))
    with pytest.raises(RuntimeError, match="token ids in"):
        compiled(torch.tensor([[1, 10]]))


def _export_models():
    torch.manual_seed(4)
    lstm_model = models.Sequential([layers.Embedding(20, 8, mask_zero=True), layers.LSTM(6), layers.Dense(3)])
    gru_model = models.Sequential([layers.Embedding(20, 8, mask_zero=True),
                                   layers.Bidirectional(layers.GRU(6, return_sequences=True)), layers.Dense(2)])
    return [lstm_model, gru_model]


@needs_cpp
@pytest.mark.parametrize("index", [0, 1])
def test_export_inference_model(index):
    model = _export_models()[index]
    x = _tokens(3, 7)
    model(x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        exported = torch.export.export(model, (x,))  # no grad: the inference ops
        assert torch.equal(exported.module()(x), expected)
    used = _kernels_used(model, x)
    targets = {str(n.target) for n in exported.graph.nodes}
    if "fused_cpp" in used:
        assert "lstm.fused_cpp_forward.default" in targets
    if "fused_gru_simple_rnn" in used:
        assert "lstm.fused_gru_forward.default" in targets
    # dynamic batch and sequence length
    B, T = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("steps", min=1, max=4096)
    with torch.no_grad():
        dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: B, 1: T},))
        for shape in ((1, 1), (4, 1), (5, 11)):
            x2 = _tokens(*shape, seed=shape[0])
            assert torch.equal(dynamic.module()(x2), model(x2))
    # saved and loaded (the ops are registered by importing lstm)
    buffer = io.BytesIO()
    torch.export.save(dynamic, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.export.load(buffer).module()(x), expected)


def test_export_with_grad_enabled_runs_the_training_ops():
    model = _export_models()[0]
    x = _tokens(2, 5)
    model(x)
    model.eval()
    exported = torch.export.export(model, (x,))  # grad enabled, weights require grad
    with torch.no_grad():
        assert torch.equal(exported.module()(x), model(x))


@needs_cpp
def test_dynamic_sizes_compile_once():
    torch.manual_seed(5)
    model = _bidirectional()
    x = _tokens(3, 7)
    model(x)
    model.eval()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in ((3, 7), (6, 4), (2, 12)):
        xs = _tokens(*shape, seed=shape[1])
        _assert_same(_step(compiled, xs), _step(model, xs), tol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@needs_cpp
def test_lazy_layers_under_compile():
    # not built yet: the default torch.compile builds the weights in an eager fallback
    x = torch.randn(2, 5, 4)
    model = models.Sequential([layers.LSTM(6, return_sequences=True), layers.GRU(3), layers.Dense(2)])
    out = torch.compile(model, backend="aot_eager")(x)
    assert torch.equal(out, model(x))


_NOT_BUILT = re.escape(
    "is not built: its weights are created on its first call (here for 4 input features), which "
    "torch.compile(fullgraph=True) and torch.export cannot trace. Build it before compiling: give input_shape= or "
    "input_dim= when constructing it, call it (or the model) once eagerly, or call layer.build(4)")


@pytest.mark.parametrize("make, named", [
    (lambda: models.Sequential([layers.LSTM(6, return_sequences=True), layers.GRU(3), layers.Dense(2)]), "LSTM"),
    (lambda: layers.GRU(3), "GRU"), (lambda: layers.Dense(3), "Dense"),
    (lambda: layers.Bidirectional(layers.SimpleRNN(3)), "SimpleRNN 'forward_")])
def test_fullgraph_and_export_of_a_layer_not_built_say_to_build_it(make, named):
    # fullgraph=True: Dynamo wraps the library's error in its Unsupported, which carries the message
    x = torch.randn(2, 5, 4)
    with pytest.raises(Exception, match=f"{named}.*{_NOT_BUILT}"):
        torch.compile(make(), fullgraph=True, backend="aot_eager")(x)
    with pytest.raises(RuntimeError, match=f"^{named}.*{_NOT_BUILT}$"):  # (non-strict export: the error itself)
        torch.export.export(make(), (x,))
    model = make()  # built (by one eager call), it compiles to one graph
    model(x)
    torch.compile(model, fullgraph=True, backend="aot_eager")(x)


def test_fullgraph_cell_not_built_says_to_build_it():
    cell = layers.LSTMCell(5)
    with pytest.raises(Exception, match=f"LSTMCell 'lstm_cell.*{_NOT_BUILT}"):
        torch.compile(lambda v: cell(v)[0], fullgraph=True, backend="aot_eager")(torch.randn(2, 4))


# ----- the custom ops themselves -------------------------------------------------------------------
from test_fused_kernel import make_problem  # noqa: E402
from lstm.kernels import fused_cpp, fused_gru_simple_rnn, native, packing, reference  # noqa: E402


def _detached(args):
    return tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)


def _sequence_op(kind, reset_after, go_backwards, return_sequences):
    """The GRU's or SimpleRNN's op and its options (activation tanh, recurrent activation sigmoid)."""
    if kind == "gru":
        return fused_gru_simple_rnn.GRU_OP, fused_gru_simple_rnn.GRUOptions(go_backwards, False, return_sequences, 0,
                                                                             1, reset_after)
    return fused_gru_simple_rnn.SIMPLE_RNN_OP, fused_gru_simple_rnn.SimpleRNNOptions(go_backwards, False,
                                                                                      return_sequences, 0)


def _opcheck_sequence_op(op, options, inputs, fixed):
    forward, backward = op.forward_op, op.backward_op
    torch.library.opcheck(forward, (*inputs, *fixed, *options, True))  # schema, fake kernel, autograd, aot dispatch
    torch.library.opcheck(forward, (*_detached(inputs), *fixed, *options, False))  # inference
    outs = forward(*_detached(inputs), *fixed, *options, True)
    grads = [torch.randn_like(t) for t in outs[:2]]
    torch.library.opcheck(backward, (*grads, *_detached(inputs), *fixed, outs[2:], *options, [True] * 5))


@pytest.mark.parametrize("kind, reset_after", [("gru", True), ("gru", False), ("simple_rnn", True)])
def test_fused_gru_simple_rnn_ops_pass_opcheck(kind, reset_after):
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    p = make_problem(kind, 3, 4, 2, 5, dtype=torch.float64, mask="holes", recurrent_dropout=True,
                     input_dropout="per_gate" if kind == "gru" else "shared", go_backwards=True,
                     reset_after=reset_after)
    inputs = [p.inputs, p.kernel, p.recurrent_kernel, p.bias, p.initial_state[0]]
    fixed = [p.input_dropout, p.recurrent_dropout, p.mask, None]
    _opcheck_sequence_op(*_sequence_op(kind, reset_after, True, True), inputs, fixed)


@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("kind, reset_after", [("gru", True), ("gru", False), ("simple_rnn", True)])
def test_fused_gru_simple_rnn_packed_ops_pass_opcheck(kind, reset_after, return_sequences):
    """The packed call (per-row lengths, packing.py): x [N, 1, D], the fake kernel's batch from h0's."""
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    p = make_problem(kind, 3, 4, 2, 5, dtype=torch.float64, recurrent_dropout=True,
                     input_dropout="per_gate" if kind == "gru" else "shared", reset_after=reset_after)
    plan = packing.plan(torch.tensor([2, 4, 1]), 4, go_backwards=False)
    leaf = lambda t: t.detach().requires_grad_()  # noqa: E731
    inputs = [leaf(packing.pack_inputs(p.inputs, plan)), p.kernel, p.recurrent_kernel, p.bias,
              leaf(plan.pack(p.initial_state[0]))]
    fixed = [plan.per_packed_row(plan.pack(p.input_dropout, 1)), plan.pack(p.recurrent_dropout, 1), None,
             plan.batch_sizes]
    _opcheck_sequence_op(*_sequence_op(kind, reset_after, False, return_sequences), inputs, fixed)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_cpp_ops_pass_opcheck(packed):
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    p = make_problem("lstm", 3, 4, 2, 5, dtype=torch.float64, mask="none" if packed else "holes", recurrent_dropout=True,
                     input_dropout="shared", return_sequences=packed)
    inputs = [p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state]
    fixed = [p.input_dropout, p.recurrent_dropout, p.mask, None]
    if packed:  # the rows' valid steps only (packing.py): x [N, 1, D], per-row masks in the packed order
        plan = packing.plan(torch.tensor([4, 1, 3]), 4, go_backwards=False)
        inputs = [packing.pack_inputs(p.inputs, plan), *inputs[1:4], *(plan.pack(s) for s in p.initial_state)]
        fixed = [plan.per_packed_row(plan.pack(p.input_dropout, 1)), plan.pack(p.recurrent_dropout, 1), None,
                 plan.batch_sizes]
    options = fused_cpp.Options(False, False, packed, 0, 1)
    forward, backward = fused_cpp.OP.forward_op, fused_cpp.OP.backward_op
    torch.library.opcheck(forward, (*inputs, *fixed, *options, True))  # schema, fake kernel, autograd, aot dispatch
    torch.library.opcheck(forward, (*_detached(inputs), *fixed, *options, False))  # inference
    outs = forward(*_detached(inputs), *fixed, *options, True)
    grads = [torch.randn_like(t) for t in outs[:3]]
    torch.library.opcheck(backward, (*grads, *_detached(inputs), *fixed, outs[3:], *options, [True] * 6))


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
def test_fused_under_compile_equals_reference(kind):
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    kernel = fused_cpp if kind == "lstm" else fused_gru_simple_rnn
    p = make_problem(kind, 3, 5, 4, 6, dtype=torch.float64, mask="holes_and_empty", go_backwards=True,
                     input_dropout="shared", recurrent_dropout=True, return_sequences=False, reset_after=False)
    p.trace = True

    def f(x, k, r, b, *states):
        p.inputs, p.kernel, p.recurrent_kernel, p.bias, p.initial_state = x, k, r, b, states
        res = kernel.run(p)
        loss = res.outputs.sum() + sum((s * (i + 2)).sum() for i, s in enumerate(res.states))
        return loss, res.trace

    args = (p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state)
    (a, trace_a) = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    ga = torch.autograd.grad(a, args)
    with lstm.kernels.use("reference"):
        b, trace_b = (lambda res: (res.outputs.sum() + sum((s * (i + 2)).sum() for i, s in enumerate(res.states)),
                                   res.trace))(reference.run(p))
    gb = torch.autograd.grad(b, args)
    assert torch.allclose(a, b, rtol=1e-12)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-10, atol=1e-12)
    assert list(trace_a) == list(trace_b)
    for k in trace_a:
        assert not trace_a[k].requires_grad and torch.allclose(trace_a[k], trace_b[k], atol=1e-12)


# ----- the LSTM variants (lstm::fused_variants_* ops; zoneout seeds drawn in the graph) -------------
from test_variants import variant_problem  # noqa: E402
from lstm.kernels import fused_variants  # noqa: E402


@needs_cpp
def test_variant_lstm_fullgraph_equals_eager():
    torch.manual_seed(6)
    model = models.Sequential([layers.Embedding(20, 8, mask_zero=True),
                               layers.LSTM(6, return_sequences=True, layer_norm=True, peephole=True, proj_size=3),
                               layers.Dense(3)])
    x = _tokens(3, 7)
    model(x)
    model.eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _assert_same(_step(compiled, x), _step(model, x), tol=1e-6)
    assert "fused_variants" in _kernels_used(model, x)


def test_zoneout_training_fullgraph_equals_eager():
    torch.manual_seed(7)
    model = models.Sequential([layers.Embedding(20, 8, mask_zero=True),
                               layers.LSTM(6, return_sequences=True, zoneout=(0.2, 0.4), coupled=True, seed=3),
                               layers.Dense(3)])
    x = _tokens(3, 7)
    model(x)
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # the seed draw breaks no graph
    generator = model.layers[1].cell._generator
    generator.manual_seed(3)
    a = [_step(compiled, x) for _ in range(2)]  # a new seed per call, from the layer's generator
    generator.manual_seed(3)
    b = [_step(model, x) for _ in range(2)]
    for u, v in zip(a, b):
        _assert_same(u, v, tol=1e-6)
    assert not torch.equal(a[0][0], a[1][0])


@needs_cpp
def test_chunked_zoneout_training_compiles_to_one_graph():
    # each chunk's zoneout offset is a constant of the one traced graph: no recompile per chunk
    torch.manual_seed(8)
    layer = layers.LSTM(6, return_sequences=True, input_dim=4, zoneout=0.3, seed=5).train()
    x = torch.randn(3, 12, 4)
    layer(x)
    generator = layer.cell._generator
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(lambda x: lstm.chunked(layer, x, 4), fullgraph=True, backend="aot_eager")
    generator.manual_seed(5)
    a = [compiled(x) for _ in range(2)]
    generator.manual_seed(5)
    b = [lstm.chunked(layer, x, 4) for _ in range(2)]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("coupled", [False, True])
def test_fused_variants_ops_pass_opcheck(coupled):
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    p = variant_problem(3, 4, 2, 5, P=3, peephole=True, layer_norm=True, zoneout=(True, True), mask=True,
                        go_backwards=True, input_dropout=3 if coupled else 4, recurrent_dropout=True,
                        forget_bias=0.5, cell_clip=2.0, coupled=coupled)
    gate_gain, gain_c, shift_c = p.layer_norm
    zoneout = p.zoneout
    inputs = [p.inputs, p.kernel, gate_gain, p.bias, p.recurrent_kernel, p.peephole, gain_c, shift_c, p.projection,
              *p.initial_state]
    fixed = [p.input_dropout, p.recurrent_dropout, p.mask, torch.tensor(int(zoneout.seed), dtype=torch.int64), None]

    def options(trace):
        return fused_variants.Options(zoneout.offset, zoneout.threshold(zoneout.rate_h),
                                      zoneout.threshold(zoneout.rate_c), True, False, True, coupled, 0, 1, 2.0, trace)

    forward, backward = fused_variants.OP.forward_op, fused_variants.OP.backward_op
    torch.library.opcheck(forward, (*inputs, *fixed, *options(False), True))  # schema, fake, autograd, aot dispatch
    detached = _detached(inputs)
    torch.library.opcheck(forward, (*detached, *fixed, *options(True), False))  # inference, with the trace's h and C
    outs = forward(*detached, *fixed, *options(False), True)
    grads = [torch.randn_like(t) for t in outs[:3]]
    torch.library.opcheck(backward, (*grads, *detached, *fixed, outs[3:], *options(False), [True] * 11))

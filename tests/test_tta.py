"""AnoCLIP+ test-time adaptation: analytic gradients, AdamW trajectory, state policies, the ONNX
graph, the cupy path and numerical safety (SPEC section 5).

A note on float32. The loss is badly conditioned at p ~ 0.5: the entropy gradient (-d p q) and
the two pseudo-label terms (+0.5 p_clean, -0.5 q_noisy) cancel to first order, and the clean and
noisy rows of the batch cancel again in dL/dw. The true gradient is ~1e-4 of the terms it is
summed from, so a straightforward float32 evaluation (torch's autograd included) is only good to
~1e-4 relative in the gradients and Adam moments. The implementation pairs the clean and noisy
rows before reducing, which brings float32 within ~2e-6 of float64. Hence float32 results are held
to 1e-5 against the FLOAT64 torch trajectory (and to 1e-5 against torch float32 where torch itself
is that accurate: probabilities, losses).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from anoclip.runtime import tta
from anoclip.runtime.tta import AdamWState, TTAAdapter, TTAConfig

SMALL = (10, 16, 12)  # M, C, 2N
REAL = (225, 640, 924)


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    scale = max(float(np.abs(b).max()), 1e-30)
    return float(np.abs(a - b).max()) / scale


def make_data(M, C, N2, *, seed=0, dtype=np.float64, linear=False):
    """CLIP-like inputs: correlated prompts, close t+/t-, tokens with a shared component."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(C)
    P = 0.5 * rng.standard_normal((M, C)) + 0.3 * common
    base = rng.standard_normal(C)
    T = base + 0.6 * rng.standard_normal((N2, C))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    tf = np.stack([base + 0.3 * rng.standard_normal(C), base + 0.3 * rng.standard_normal(C)])
    tf /= np.linalg.norm(tf, axis=1, keepdims=True)
    K = C if linear else N2
    bound = 1 / np.sqrt(C)
    w = rng.uniform(-bound, bound, (K, C))
    b = rng.uniform(-bound, bound, K)
    noise = 0.055 * rng.standard_normal((5, M, C))
    return tuple(np.ascontiguousarray(a, dtype=dtype) for a in (P, T, tf, w, b, noise))


# ---------------------------------------------------------------------------------------------
# torch reference (autograd + torch.optim.AdamW)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch_mod():
    return pytest.importorskip("torch")


def torch_loss(torch, P, w, b, T, tf, delta, adapter="text"):
    F = torch.nn.functional
    M = P.shape[0]
    batch = torch.cat([P, P + delta])
    Pn = F.normalize(batch, dim=-1)
    if adapter == "text":
        phi = 0.5 * batch + 0.5 * torch.tanh(Pn @ w.T + b) @ T
    else:
        phi = 0.5 * batch + 0.5 * (Pn @ w.T + b)
    probs = (F.normalize(phi, dim=-1) @ tf.T).softmax(-1)
    pc, pn = probs[:M], probs[M:]
    entropy = -(pc * pc.log()).sum(-1).mean()
    return entropy + 0.5 * (-pc[:, 0].log().mean() - pn[:, 1].log().mean())


def torch_probs(torch, P, w, b, T, tf, adapter="text"):
    F = torch.nn.functional
    with torch.no_grad():
        Pn = F.normalize(P, dim=-1)
        if adapter == "text":
            phi = 0.5 * P + 0.5 * torch.tanh(Pn @ w.T + b) @ T
        else:
            phi = 0.5 * P + 0.5 * (Pn @ w.T + b)
        return phi.numpy(), (F.normalize(phi, dim=-1) @ tf.T).softmax(-1)[:, 1].numpy()


def torch_trajectory(torch, images, T, tf, dtype, adapter="text", lr=1e-3, wd=0.01):
    """images: list of (P, w0, b0, noise[K,M,C]); one optimiser across all of them (persistent)."""
    def t(a):
        return torch.tensor(np.asarray(a), dtype=dtype)

    tT = t(T) if T is not None else None
    ttf = t(tf)
    w = torch.nn.Parameter(t(images[0][1]))
    b = torch.nn.Parameter(t(images[0][2]))
    opt = torch.optim.AdamW([w, b], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    per_image = []
    for P, w0, b0, noise in images:
        with torch.no_grad():
            w.copy_(t(w0))
            b.copy_(t(b0))
        tP = t(P)
        steps = []
        for k in range(noise.shape[0]):
            opt.zero_grad()
            loss = torch_loss(torch, tP, w, b, tT, ttf, t(noise[k]), adapter)
            loss.backward()
            opt.step()
            sw, sb = opt.state[w], opt.state[b]
            steps.append(
                dict(
                    loss=loss.item(),
                    w=w.detach().numpy().copy(),
                    b=b.detach().numpy().copy(),
                    m_w=sw["exp_avg"].numpy().copy(),
                    v_w=sw["exp_avg_sq"].numpy().copy(),
                    m_b=sb["exp_avg"].numpy().copy(),
                    v_b=sb["exp_avg_sq"].numpy().copy(),
                    step=int(sw["step"]),
                )
            )
        tokens, probs = torch_probs(torch, tP, w.detach(), b.detach(), tT, ttf, adapter)
        per_image.append(dict(steps=steps, tokens=tokens, probs=probs))
    return per_image


def numpy_trajectory(P, T, tf, w0, b0, noise, dtype, adapter="text"):
    """Run the numpy adapter one step at a time to record every intermediate state."""
    cfg = TTAConfig(steps=1, adapter=adapter)
    ad = TTAAdapter(None if T is None else T.astype(dtype), tf.astype(dtype), cfg)
    w, b = w0.astype(dtype), b0.astype(dtype)
    steps = []
    for k in range(noise.shape[0]):
        r = ad.run(P.astype(dtype), init=(w, b), noise=noise[k : k + 1].astype(dtype))
        w, b = r.weight, r.bias
        s = ad.state
        steps.append(
            dict(loss=float(r.losses[0]), w=w.copy(), b=b.copy(), m_w=s.m_weight.copy(),
                 v_w=s.v_weight.copy(), m_b=s.m_bias.copy(), v_b=s.v_bias.copy(), step=s.step)
        )
    # the tokens of the last run are Phi(P) after all steps
    return dict(steps=steps, tokens=r.tokens, probs=r.probs)


# ---------------------------------------------------------------------------------------------
# (a) + (g) analytic gradients vs autograd, float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["text", "linear"])
@pytest.mark.parametrize("shape", [SMALL, (7, 24, 30)])
def test_gradients_match_autograd(torch_mod, adapter, shape):
    torch = torch_mod
    P, T, tf, w, b, noise = make_data(*shape, linear=adapter == "linear")
    P[3] = 0.0  # a zero token takes the eps branch of the normalisation
    Tin = T if adapter == "text" else None
    loss, gw, gb = tta.loss_and_grads(P, w, b, Tin, tf, noise[0], adapter=adapter)
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    tl = torch_loss(torch, torch.tensor(P), tw, tb, torch.tensor(T), torch.tensor(tf),
                    torch.tensor(noise[0]), adapter)
    tl.backward()
    assert gw.dtype == np.float64 and gw.shape == w.shape and gb.shape == b.shape
    assert abs(float(loss) - tl.item()) <= 1e-10
    assert rel(gw, tw.grad.numpy()) <= 1e-5
    assert rel(gb, tb.grad.numpy()) <= 1e-5


def test_gradients_match_autograd_real_shapes(torch_mod):
    torch = torch_mod
    P, T, tf, w, b, noise = make_data(*REAL, seed=3)
    _, gw, gb = tta.loss_and_grads(P, w, b, T, tf, noise[0])
    tw = torch.tensor(w, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    torch_loss(torch, torch.tensor(P), tw, tb, torch.tensor(T),
               torch.tensor(tf), torch.tensor(noise[0])).backward()
    assert rel(gw, tw.grad.numpy()) <= 1e-5
    assert rel(gb, tb.grad.numpy()) <= 1e-5


def test_adapter_forward_matches_definition():
    P, T, _, w, b, _ = make_data(*SMALL)
    Pn = P / np.linalg.norm(P, axis=1, keepdims=True)
    expect = 0.5 * P + 0.5 * np.tanh(Pn @ w.T + b) @ T
    np.testing.assert_allclose(tta.adapter_forward(P, w, b, T), expect, rtol=1e-12, atol=1e-12)
    W = np.random.default_rng(1).uniform(-0.2, 0.2, (SMALL[1], SMALL[1]))
    bl = np.random.default_rng(2).uniform(-0.2, 0.2, SMALL[1])
    expect = 0.5 * P + 0.5 * (Pn @ W.T + bl)
    np.testing.assert_allclose(
        tta.adapter_forward(P, W, bl, adapter="linear"), expect, rtol=1e-12, atol=1e-12
    )


def test_adamw_step_matches_torch(torch_mod):
    torch = torch_mod
    rng = np.random.default_rng(5)
    w = rng.standard_normal((6, 4))
    b = rng.standard_normal(6)
    cfg = TTAConfig()
    state = AdamWState.zeros(w.shape, b.shape, dtype=np.float64)
    tw, tb = torch.nn.Parameter(torch.tensor(w)), torch.nn.Parameter(torch.tensor(b))
    opt = torch.optim.AdamW([tw, tb], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    for k in range(4):
        gw = rng.standard_normal(w.shape) * 10.0 ** (-k - 6)  # down to the eps regime
        gb = rng.standard_normal(b.shape) * 10.0 ** (-k - 6)
        w2, b2, state2 = tta.adamw_step(w, b, gw, gb, state, cfg)
        assert state.step == k and state2.step == k + 1  # inplace=False leaves inputs alone
        w, b, state = w2, b2, state2
        tw.grad, tb.grad = torch.tensor(gw), torch.tensor(gb)
        opt.step()
        assert rel(w, tw.detach().numpy()) <= 1e-12
        assert rel(b, tb.detach().numpy()) <= 1e-12
        assert rel(state.v_weight, opt.state[tw]["exp_avg_sq"].numpy()) <= 1e-12
        assert rel(state.m_bias, opt.state[tb]["exp_avg"].numpy()) <= 1e-12


# ---------------------------------------------------------------------------------------------
# (b) the 5-step trajectory vs torch.optim.AdamW at the real shapes
# ---------------------------------------------------------------------------------------------

_TRAJ_KEYS = ("w", "b", "m_w", "v_w", "m_b", "v_b")


@pytest.fixture(scope="module")
def real_trajectories(torch_mod):
    torch = torch_mod
    data32 = make_data(*REAL, seed=11, dtype=np.float32)  # float32 inputs shared by every run
    P, T, tf, w, b, noise = data32
    images = [(P, w, b, noise)]
    return dict(
        data=data32,
        t64=torch_trajectory(torch, images, T, tf, torch.float64)[0],
        t32=torch_trajectory(torch, images, T, tf, torch.float32)[0],
        n64=numpy_trajectory(P, T, tf, w, b, noise, np.float64),
        n32=numpy_trajectory(P, T, tf, w, b, noise, np.float32),
    )


def test_trajectory_float64_matches_torch_adamw(real_trajectories):
    t64, n64 = real_trajectories["t64"], real_trajectories["n64"]
    for k, (ts, ns) in enumerate(zip(t64["steps"], n64["steps"])):
        assert ns["step"] == ts["step"] == k + 1
        assert abs(ns["loss"] - ts["loss"]) <= 1e-10
        for key in _TRAJ_KEYS:
            assert rel(ns[key], ts[key]) <= 1e-5, (k, key)
    assert rel(n64["probs"], t64["probs"]) <= 1e-5
    assert rel(n64["tokens"], t64["tokens"]) <= 1e-5


def test_trajectory_float32_matches_torch_adamw(real_trajectories):
    t64, t32, n32 = (real_trajectories[k] for k in ("t64", "t32", "n32"))
    assert n32["probs"].dtype == np.float32 and n32["tokens"].dtype == np.float32
    assert rel(n32["probs"], t32["probs"]) <= 1e-5
    assert rel(n32["probs"], t64["probs"]) <= 1e-5
    assert rel(n32["tokens"], t64["tokens"]) <= 1e-5  # torch's own float32 run is ~1e-4 off here
    for k in range(5):
        ns, ts, truth = n32["steps"][k], t32["steps"][k], t64["steps"][k]
        assert ns["step"] == k + 1
        assert abs(ns["loss"] - ts["loss"]) <= 1e-5 * abs(ts["loss"])
        for key in _TRAJ_KEYS:
            ours, theirs = rel(ns[key], truth[key]), rel(ts[key], truth[key])
            assert ours <= 1e-5, (k, key, ours, theirs)
            assert ours <= max(1e-5, theirs), (k, key, ours, theirs)


# ---------------------------------------------------------------------------------------------
# (c) state policies
# ---------------------------------------------------------------------------------------------


def _two_images(shape=SMALL, dtype=np.float64):
    P1, T, tf, w1, b1, n1 = make_data(*shape, seed=21, dtype=dtype)
    P2, _, _, w2, b2, n2 = make_data(*shape, seed=22, dtype=dtype)
    return T, tf, [(P1, w1, b1, n1), (P2, w2, b2, n2)]


def test_persistent_state_carries_moments_and_step(torch_mod):
    T, tf, images = _two_images()
    ad = TTAAdapter(T, tf, TTAConfig(state_policy="persistent"))
    results = [ad.run(P, init=(w, b), noise=n) for P, w, b, n in images]
    assert ad.state.step == 10
    ref = torch_trajectory(torch_mod, images, T, tf, torch_mod.float64)
    for r, t in zip(results, ref):
        assert rel(r.probs, t["probs"]) <= 1e-5
        assert rel(r.weight, t["steps"][-1]["w"]) <= 1e-5
    last = ref[1]["steps"][-1]
    assert last["step"] == 10
    for ours, key in ((ad.state.m_weight, "m_w"), (ad.state.v_weight, "v_w"),
                      (ad.state.m_bias, "m_b"), (ad.state.v_bias, "v_b")):
        assert rel(ours, last[key]) <= 1e-5
    # the second image really used the first image's moments: a fresh start differs
    fresh = TTAAdapter(T, tf, TTAConfig(state_policy="fresh"))
    P2, w2, b2, n2 = images[1]
    alone = fresh.run(P2, init=(w2, b2), noise=n2)
    assert rel(alone.weight, results[1].weight) > 1e-6


def test_fresh_state_resets_every_image():
    T, tf, images = _two_images()
    ad = TTAAdapter(T, tf, TTAConfig(state_policy="fresh"))
    for P, w, b, n in images:
        r = ad.run(P, init=(w, b), noise=n)
        assert ad.state.step == 5
    P2, w2, b2, n2 = images[1]
    alone = TTAAdapter(T, tf, TTAConfig(state_policy="fresh")).run(P2, init=(w2, b2), noise=n2)
    np.testing.assert_array_equal(alone.weight, r.weight)
    np.testing.assert_array_equal(alone.state.v_weight, r.state.v_weight)
    np.testing.assert_array_equal(alone.tokens, r.tokens)


def test_reset_and_parameters_redrawn_per_image():
    P, T, tf, *_ = make_data(*SMALL)
    ad = TTAAdapter(T, tf, TTAConfig(seed=0))
    ad.run(P)
    w_first = ad.weight.copy()
    ad.run(P)
    assert ad.state.step == 10
    assert rel(ad.weight, w_first) > 1e-3  # new random draw for the second image
    ad.reset()
    assert ad.state is None and ad.weight is None
    ad.run(P)
    assert ad.state.step == 5


def test_prompt_init_starts_from_T():
    P, T, tf, *_ = make_data(*SMALL)
    ad = TTAAdapter(T, tf, TTAConfig(init="prompts", steps=0))
    r = ad.run(P, noise=np.zeros((0, *P.shape)))
    np.testing.assert_array_equal(r.weight, T)
    np.testing.assert_array_equal(r.bias, np.zeros(T.shape[0]))
    np.testing.assert_allclose(r.tokens, tta.adapter_forward(P, T, np.zeros(T.shape[0]), T))
    with pytest.raises(ValueError):
        TTAConfig(init="prompts", adapter="linear")


# ---------------------------------------------------------------------------------------------
# (d) the ONNX graph through onnxruntime
# ---------------------------------------------------------------------------------------------

TRT_OPS = {
    "Abs", "Add", "Cast", "Concat", "Div", "Exp", "Gather", "Gemm", "Greater", "Identity", "Log",
    "MatMul", "Max", "Mul", "Neg", "Pow", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Shape",
    "Sigmoid", "Split", "Sqrt", "Sub", "Tanh", "Transpose",
}


@pytest.fixture(scope="module")
def graph_paths(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from anoclip.export.tta_graph import write_tta_graph

    d = tmp_path_factory.mktemp("tta_graph")
    return {
        "text": write_tta_graph(d / "tta.onnx", config=TTAConfig()),
        "linear": write_tta_graph(d / "tta_linear.onnx", config=TTAConfig(adapter="linear")),
    }


def test_graph_uses_tensorrt_friendly_ops(graph_paths):
    import onnx

    for path in graph_paths.values():
        model = onnx.load(str(path))
        assert model.opset_import[0].version == 17
        ops = {n.op_type for n in model.graph.node}
        assert ops <= TRT_OPS, ops - TRT_OPS
        names = [i.name for i in model.graph.input]
        assert set(names) <= set(tta.TTA_GRAPH_INPUTS)
        assert [o.name for o in model.graph.output] == list(tta.TTA_GRAPH_OUTPUTS)


@pytest.mark.parametrize("adapter", ["text", "linear"])
def test_onnx_graph_matches_numpy_loop(graph_paths, adapter):
    linear = adapter == "linear"
    cfg = TTAConfig(adapter=adapter)
    T, tf, images = _two_images()
    if linear:  # linear adapter parameters are [C, C] / [C]
        rng = np.random.default_rng(4)
        images = [(P, rng.uniform(-0.25, 0.25, (P.shape[1],) * 2), rng.uniform(-0.25, 0.25, P.shape[1]),
                   n) for P, _, _, n in images]
    Tin = None if linear else T
    runner = tta.OnnxTTARunner(str(graph_paths[adapter]), T=Tin, text_features=tf, config=cfg)
    np32 = TTAAdapter(None if linear else T.astype(np.float32), tf.astype(np.float32), cfg)
    np64 = TTAAdapter(Tin, tf, cfg)
    for i, (P, w, b, n) in enumerate(images):
        ro = runner.run(P, init=(w, b), noise=n)
        a32 = np32.run(P.astype(np.float32), init=(w, b), noise=n.astype(np.float32))
        a64 = np64.run(P, init=(w, b), noise=n)
        assert runner.state.step == np32.state.step == 5 * (i + 1)
        assert ro.tokens.shape == P.shape and ro.probs.shape == (P.shape[0],)
        for key in ("tokens", "probs", "losses", "weight", "bias"):
            assert rel(getattr(ro, key), getattr(a32, key)) <= 1e-5, key
            assert rel(getattr(ro, key), getattr(a64, key)) <= 1e-5, key
        for key in ("m_weight", "v_weight", "m_bias", "v_bias"):  # the moments ARE gradients:
            assert rel(getattr(ro.state, key), getattr(a64.state, key)) <= 1e-5, key  # see top


def test_onnx_runner_dynamic_m_seeded_and_fresh(graph_paths):
    _, T, tf, *_ = make_data(*SMALL)
    cfg = TTAConfig(seed=7, state_policy="fresh")
    runner = tta.OnnxTTARunner(str(graph_paths["text"]), T=T, text_features=tf, config=cfg)
    ad = TTAAdapter(T.astype(np.float32), tf.astype(np.float32), cfg)
    for M in (4, 13):
        P = np.random.default_rng(M).standard_normal((M, SMALL[1])).astype(np.float32)
        ro, ao = runner.run(P), ad.run(P)  # same seed, same draw order: same parameters/noise
        assert runner.state.step == 5
        assert rel(ro.probs, ao.probs) <= 1e-5
        assert rel(ro.weight, ao.weight) <= 1e-5
    with pytest.raises(ValueError, match="steps"):
        tta.OnnxTTARunner(str(graph_paths["text"]), T=T, text_features=tf, config=TTAConfig(steps=3))


def test_write_tta_graph_is_atomic(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from anoclip.export import tta_graph

    dest = tmp_path / "tta.onnx"
    dest.write_bytes(b"old")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tta_graph.os, "replace", broken)
    with pytest.raises(OSError):
        tta_graph.write_tta_graph(dest, steps=2)
    assert dest.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tta.onnx"]


# ---------------------------------------------------------------------------------------------
# (e) cupy
# ---------------------------------------------------------------------------------------------


def test_cupy_matches_numpy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("cupy is installed but sees no GPU")
    except Exception as exc:  # noqa: BLE001 - any CUDA runtime failure means no usable GPU
        pytest.skip(f"cupy is installed but CUDA is unusable: {exc}")
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
        P, T, tf, w, b, noise = make_data(*REAL, seed=31, dtype=dtype)
        ref = TTAAdapter(T, tf).run(P, init=(w, b), noise=noise)
        ad = TTAAdapter(cp.asarray(T), cp.asarray(tf))
        out = ad.run(cp.asarray(P), init=(cp.asarray(w), cp.asarray(b)), noise=cp.asarray(noise))
        assert isinstance(out.tokens, cp.ndarray) and out.tokens.dtype == dtype
        assert rel(cp.asnumpy(out.probs), ref.probs) <= tol
        assert rel(cp.asnumpy(out.tokens), ref.tokens) <= tol
        if dtype == np.float64:
            assert rel(cp.asnumpy(out.weight), ref.weight) <= 1e-5
        # seeded drawing on the device
        a1 = TTAAdapter(cp.asarray(T), cp.asarray(tf), TTAConfig(seed=3)).run(cp.asarray(P))
        a2 = TTAAdapter(cp.asarray(T), cp.asarray(tf), TTAConfig(seed=3)).run(cp.asarray(P))
        assert bool((a1.tokens == a2.tokens).all())


# ---------------------------------------------------------------------------------------------
# (f) numerical safety
# ---------------------------------------------------------------------------------------------


def _all_finite(result) -> bool:
    arrays = (result.tokens, result.probs, result.weight, result.bias, result.losses,
              result.state.m_weight, result.state.v_weight, result.state.m_bias, result.state.v_bias)
    return all(np.isfinite(np.asarray(a)).all() for a in arrays)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("adapter", ["text", "linear"])
def test_numerical_safety(dtype, adapter):
    P, T, tf, *_ = make_data(*SMALL, dtype=dtype)
    Tin = T if adapter == "text" else None
    cases = {
        "zero_tokens": np.zeros_like(P),
        "some_zero_rows": np.where(np.arange(P.shape[0])[:, None] % 2 == 0, 0, P).astype(dtype),
        "huge_1e6": P * dtype(1e6),
        "huge_1e30": P * dtype(1e30),  # squares overflow float32: the norm must rescale
        "tiny_1e-30": P * dtype(1e-30),
    }
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        for name, X in cases.items():
            ad = TTAAdapter(Tin, tf, TTAConfig(adapter=adapter, seed=0))
            for _ in range(2):
                r = ad.run(X)
            assert _all_finite(r), name
            assert np.all((r.probs >= 0) & (r.probs <= 1)), name
        # saturated probabilities: logits differences of thousands
        ad = TTAAdapter(Tin, tf * dtype(1e4), TTAConfig(adapter=adapter, seed=0))
        r = ad.run(P)
        assert _all_finite(r)
        assert np.all((r.probs == 0) | (r.probs == 1) | (np.abs(r.probs - 0.5) > 0.49))


def test_zero_tokens_gradients_match_autograd(torch_mod):
    torch = torch_mod
    P, T, tf, w, b, noise = make_data(*SMALL)
    P[:] = 0.0
    _, gw, gb = tta.loss_and_grads(P, w, b, T, tf, noise[0])
    tw, tb = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch_loss(torch, torch.tensor(P), tw, tb, torch.tensor(T), torch.tensor(tf),
               torch.tensor(noise[0])).backward()
    assert rel(gw, tw.grad.numpy()) <= 1e-5 and rel(gb, tb.grad.numpy()) <= 1e-5


def test_saturated_loss_is_finite():
    P, T, tf, w, b, noise = make_data(*SMALL)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        loss, gw, gb = tta.loss_and_grads(P, w, b, T, tf * 1e6, noise[0])
    assert np.isfinite(float(loss)) and np.isfinite(gw).all() and np.isfinite(gb).all()


# ---------------------------------------------------------------------------------------------
# (h) randomness
# ---------------------------------------------------------------------------------------------


def test_seeded_generator_is_reproducible_and_explicit_arrays_win():
    P, T, tf, w, b, noise = make_data(*SMALL, dtype=np.float32)
    cfg = TTAConfig()
    r1 = TTAAdapter(T, tf, cfg).run(P, rng=np.random.default_rng(123))
    r2 = TTAAdapter(T, tf, cfg).run(P, rng=np.random.default_rng(123))
    np.testing.assert_array_equal(r1.tokens, r2.tokens)
    # config.seed drives the adapter's own generator the same way
    s1 = TTAAdapter(T, tf, TTAConfig(seed=9)).run(P)
    s2 = TTAAdapter(T, tf, TTAConfig(seed=9)).run(P)
    np.testing.assert_array_equal(s1.weight, s2.weight)
    assert rel(r1.tokens, s1.tokens) > 0
    # the documented draw order: weight, bias, then the noise of all steps
    g = np.random.default_rng(123)
    w0, b0 = tta.draw_initial_params(g, weight_shape=w.shape, dtype=np.float32)
    n0 = tta.draw_noise(g, cfg.steps, *P.shape, cfg.noise_std, dtype=np.float32)
    r3 = TTAAdapter(T, tf, cfg).run(P, init=(w0, b0), noise=n0)
    np.testing.assert_array_equal(r1.tokens, r3.tokens)
    bound = 1 / np.sqrt(P.shape[1])
    assert np.abs(w0).max() <= bound and np.abs(b0).max() <= bound
    # explicit arrays override any generator
    e1 = TTAAdapter(T, tf, cfg).run(P, init=(w, b), noise=noise, rng=np.random.default_rng(1))
    e2 = TTAAdapter(T, tf, cfg).run(P, init=(w, b), noise=noise, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(e1.tokens, e2.tokens)
    np.testing.assert_array_equal(e1.weight, e2.weight)


def test_global_random_state_untouched():
    P, T, tf, *_ = make_data(*SMALL)
    np.random.seed(0)
    before = np.random.get_state()[1].copy()
    TTAAdapter(T, tf, TTAConfig(seed=1)).run(P)
    TTAAdapter(T, tf).run(P)
    assert np.array_equal(np.random.get_state()[1], before)


# ---------------------------------------------------------------------------------------------
# API details
# ---------------------------------------------------------------------------------------------


def test_input_validation():
    P, T, tf, w, b, noise = make_data(*SMALL)
    ad = TTAAdapter(T, tf)
    with pytest.raises(ValueError):
        ad.run(P[:, :5])
    with pytest.raises(ValueError):
        ad.run(P, noise=noise[:2])
    with pytest.raises(ValueError):
        ad.run(P, init=(w.T, b))
    with pytest.raises(ValueError):
        TTAConfig(adapter="mlp")
    with pytest.raises(ValueError):
        TTAConfig(state_policy="sometimes")
    with pytest.raises(ValueError):
        TTAAdapter(None, tf)  # the text adapter needs T


def test_runtime_module_imports_without_torch_or_onnx():
    code = textwrap.dedent(
        """
        import sys
        for name in ("torch", "onnx", "open_clip"):
            sys.modules[name] = None
        import anoclip.runtime.tta as t
        import numpy as np
        a = t.TTAAdapter(np.eye(3, 4, dtype=np.float32), np.eye(2, 4, dtype=np.float32),
                         t.TTAConfig(seed=0))
        assert a.adapt(np.ones((5, 4), np.float32)).shape == (5, 4)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_generic_namespace_path(monkeypatch):
    """Run the loop through a namespace that is not ``numpy`` itself, as cupy would be: every
    branch taken for a non-numpy namespace must give the numpy results."""
    import types

    from anoclip.runtime.tta import loop as tta  # the module whose array_namespace TTAAdapter calls

    class NumpyLike(types.ModuleType):
        def __getattr__(self, name):
            return getattr(np, name)

    proxy = NumpyLike("numpy_like")
    P, T, tf, w, b, noise = make_data(*SMALL, dtype=np.float32)
    P[0] *= 1e30  # the overflow-safe norm of the non-numpy branch
    ref = TTAAdapter(T, tf).run(P, init=(w, b), noise=noise)
    monkeypatch.setattr(tta, "array_namespace", lambda *a: proxy)
    ad = TTAAdapter(T, tf, TTAConfig(seed=0))
    assert ad.xp is proxy
    out = ad.run(P, init=(w, b), noise=noise)
    np.testing.assert_allclose(out.tokens, ref.tokens, rtol=1e-6, atol=0)
    np.testing.assert_allclose(out.probs, ref.probs, rtol=1e-6, atol=0)
    assert ad.run(P).tokens.shape == P.shape  # seeded draws through the namespace's generator


# ---------------------------------------------------------------------------------------------
# one definition of the step, the scores and the default seed
# ---------------------------------------------------------------------------------------------


def test_graph_ops_and_array_ops_share_one_vocabulary():
    """The ONNX graph is the array loop's own code on symbolic tensors: both op sets must offer
    the same operations."""
    pytest.importorskip("onnx")
    from anoclip.export.tta_graph import GraphOps
    from anoclip.runtime.tta.adapter import ArrayOps

    def names(cls):
        return {n for n in vars(cls) if not n.startswith("_")}

    assert names(ArrayOps) == names(GraphOps)


def test_probabilities_are_the_scoring_definition():
    from anoclip.runtime.scoring import abnormal_probability

    P, T, tf, w, b, noise = make_data(*SMALL)
    r = TTAAdapter(T, tf).run(P, init=(w, b), noise=noise)
    np.testing.assert_array_equal(r.probs, abnormal_probability(r.tokens, tf, normalise_text=False))
    # unit text features: the same as the map's probabilities
    np.testing.assert_allclose(r.probs, abnormal_probability(r.tokens, tf), rtol=1e-12)


def test_shared_l2_normalise_is_overflow_safe_and_any_axis():
    from anoclip.runtime.scoring import l2_normalise

    x = np.array([[3e30, 4e30], [3.0, 4.0], [0.0, 0.0]], np.float32)
    with np.errstate(over="raise", invalid="raise"):
        np.testing.assert_allclose(l2_normalise(x), [[0.6, 0.8], [0.6, 0.8], [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(l2_normalise(x.T, axis=0), l2_normalise(x).T)
    np.testing.assert_allclose(l2_normalise(np.array([3.0, 4.0])), [0.6, 0.8])


def test_default_seed_repeats_run_to_run():
    P, T, tf, *_ = make_data(*SMALL, dtype=np.float32)
    assert TTAConfig().seed == tta.DEFAULT_SEED == TTAConfig(seed=None).seed
    a = TTAAdapter(T, tf).run(P)
    b = TTAAdapter(T, tf, TTAConfig(seed=None)).run(P)
    c = TTAAdapter(T, tf, TTAConfig(seed=tta.DEFAULT_SEED)).run(P)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.weight, c.weight)
    code = textwrap.dedent(
        """
        import numpy as np
        from anoclip.runtime.tta import TTAAdapter
        rng = np.random.default_rng(0)
        T, tf, P = (rng.standard_normal(s).astype(np.float32) for s in ((6, 8), (2, 8), (5, 8)))
        print(TTAAdapter(T, tf).run(P).tokens.tobytes().hex())
        """
    )
    runs = [subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
            for _ in range(2)]
    assert runs[0] == runs[1] and runs[0].strip()


def test_in_place_adamw_is_the_formula_to_the_bit():
    """The array loop's in-place AdamW performs the graph's formula operation by operation."""
    from anoclip.runtime.tta.optim import adamw_update, adamw_update_in_place

    rng = np.random.default_rng(3)
    param, grad, m, v = (rng.standard_normal((7, 5)).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    config = TTAConfig()
    for step in (1, 2, 40):
        expected = adamw_update(param, grad, m, v, step, config)
        got = adamw_update_in_place(param.copy(), grad, m.copy(), v.copy(), step, config, np)
        for a, b in zip(expected, got):
            np.testing.assert_array_equal(a, b)

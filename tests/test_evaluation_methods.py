"""Attribution methods of the evaluation harness (``dynamiclrp.evaluation.methods``).

Expected values come from autograd, hand-written occlusion loops and closed forms on tiny
float64 models.  The Zennit parts need ``zennit`` (``/tmp/benchenv``-like environments), the LxT
parts an interpreter with lxt 2.1 (``$DYNAMICLRP_LXT_PYTHON`` or ``/tmp/lxtenv/bin/python``);
both are skipped cleanly where absent.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import dynamiclrp
from dynamiclrp.evaluation.methods import available_methods, make_method
from dynamiclrp.evaluation.task import Problem, Task

D = torch.float64
T, E, CLASSES, N = 4, 3, 5, 6


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(bias: bool = True) -> nn.Module:
    """A ReLU MLP on ``(B, T, E)`` "token embeddings"."""
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Flatten(),
            nn.Linear(T * E, 16, bias=bias),
            nn.ReLU(),
            nn.Linear(16, 12, bias=bias),
            nn.ReLU(),
            nn.Linear(12, CLASSES, bias=bias),
        )
        .to(D)
        .eval()
    )


def token_task(model: nn.Module, scaled: bool = False) -> Task:
    """Inputs are the float x themselves; ``scaled``: sample ``i`` is multiplied by ``1 + i``
    inside the forward pass, so a method that mixes up the samples of a batch is caught."""
    g = torch.Generator().manual_seed(3)
    inputs = torch.randn(N, T, E, dtype=D, generator=g)
    scale = (
        (1.0 + torch.arange(N, dtype=D)).view(N, 1, 1) if scaled else torch.ones(N, 1, 1, dtype=D)
    )

    def forward(x, idx):
        return model(x * scale[idx])

    with torch.no_grad():
        targets = forward(inputs, torch.arange(N)).argmax(1)
    return Task(
        name="toy-tokens",
        kind="tokens",
        model=model,
        inputs=inputs,
        targets=targets,
        labels=targets,
        to_x=lambda i: i.clone(),
        forward=forward,
    )


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, CLASSES),
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.to(D).eval()


def image_task(model: nn.Module, patch: int = 2) -> Task:
    g = torch.Generator().manual_seed(4)
    inputs = torch.rand(N, 3, 8, 8, dtype=D, generator=g)
    with torch.no_grad():
        targets = model(inputs).argmax(1)
    return Task(
        name="toy-images",
        kind="image",
        model=model,
        inputs=inputs,
        targets=targets,
        labels=targets,
        to_x=lambda i: i.clone(),
        forward=lambda x, idx: model(x),
        patch=patch,
    )


def grad_of_target(task: Task, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, d f_target / dx) by plain autograd."""
    x = task.inputs[idx].clone().requires_grad_()
    out = task.forward(x, idx)
    (g,) = torch.autograd.grad(out[torch.arange(len(idx)), task.targets[idx]].sum(), x)
    return x.detach(), g


ALL = torch.arange(N)


# -- registry ---------------------------------------------------------------------------------


def test_registry_names_and_errors():
    names = available_methods()
    for preset in dynamiclrp.PRESETS:
        assert f"dynamiclrp:{preset}" in names
    for name in (
        "saliency",
        "inputxgradient",
        "integrated_gradients",
        "gradientshap",
        "smoothgrad",
        "occlusion",
        "random",
        "zennit:epsilon_plus",
        "zennit:epsilon_gamma_box",
        "lxt:attnlrp",
        "lxt:cp-lrp",
    ):
        assert name in names
    with pytest.raises(ValueError, match="known: .*saliency"):
        make_method("no-such-method")
    with pytest.raises(TypeError, match="n_steps"):
        make_method("saliency", n_steps=3)
    with pytest.raises(TypeError, match="takes no options"):
        make_method("dynamiclrp:epsilon", low=0.0)
    m = make_method("integrated_gradients", n_steps=8, name="IG-8")
    assert (m.name, m.family, m.params["n_steps"]) == ("IG-8", "gradient", 8)
    assert make_method("occlusion").family == "perturbation"
    assert make_method("random").family == "random"
    assert make_method("dynamiclrp:gamma").family == "lrp"
    assert make_method(dynamiclrp.preset("zplus")).name == "dynamiclrp:zplus"


def test_lxt_needs_an_interpreter(monkeypatch):
    monkeypatch.delenv("DYNAMICLRP_LXT_PYTHON", raising=False)
    with pytest.raises(ValueError, match="DYNAMICLRP_LXT_PYTHON"):
        make_method("lxt:attnlrp")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_method("lxt:attnlrp", python="/no/such/python")


# -- LRP and gradients on a ReLU MLP ----------------------------------------------------------


def epsilon_lrp_by_hand(model: nn.Module, x: torch.Tensor, target: torch.Tensor, eps: float):
    """Textbook LRP-epsilon through the bias-free MLP: ``R_j = a_j sum_k w_kj R_k / stab(z_k)``
    with ``stab(z) = z + eps * sign(z)``, the seed being the target logit."""
    acts, a = [], x.flatten(1)
    for layer in model[1:]:
        if isinstance(layer, nn.Linear):
            acts.append((a, layer.weight.detach()))
        a = layer(a)
    rows = torch.arange(x.shape[0])
    rel = torch.zeros_like(a)
    rel[rows, target] = a[rows, target]
    for a_in, w in reversed(acts):
        z = a_in @ w.T
        rel = a_in * ((rel / (z + eps * torch.where(z >= 0, 1.0, -1.0))) @ w)
    return rel.view_as(x).detach()


@pytest.mark.parametrize("preset, eps", [("epsilon", 1e-6), ("captum", 1e-9), ("attnlrp", 1e-12)])
def test_lrp_epsilon_family_by_hand(preset, eps):
    """For a bias-free ReLU network LRP-epsilon is the textbook formula, and as eps -> 0 it
    becomes Gradient x Input (autograd)."""
    task = token_task(mlp(bias=False))
    rel = make_method(f"dynamiclrp:{preset}")(task.problem(ALL))
    with torch.no_grad():
        expect = epsilon_lrp_by_hand(task.model, task.inputs, task.targets, eps)
    torch.testing.assert_close(rel, expect, rtol=1e-9, atol=1e-12)
    if eps <= 1e-9:
        x, g = grad_of_target(task, ALL)
        torch.testing.assert_close(rel, x * g, rtol=1e-4, atol=1e-8)


def test_dynamiclrp_conserves_with_bias_and_batches_alike():
    task = token_task(mlp(), scaled=True)
    m = make_method("dynamiclrp:epsilon")
    whole = m(task.problem(ALL))
    parts = torch.cat([m(task.problem(torch.tensor([i]))) for i in range(N)])
    torch.testing.assert_close(whole, parts)
    assert m.lrp.last_plan_cached  # the later batches reused the plan


def test_inputxgradient_and_saliency():
    task = token_task(mlp(), scaled=True)
    x, g = grad_of_target(task, ALL)
    problem = task.problem(ALL)
    torch.testing.assert_close(make_method("inputxgradient")(problem), x * g)
    torch.testing.assert_close(make_method("saliency")(problem), g.abs())
    torch.testing.assert_close(make_method("saliency", abs=False)(problem), g)


def test_integrated_gradients_completeness():
    """sum_i IG_i(x) = f_t(x) - f_t(0) up to the quadrature error of n_steps nodes."""
    task = token_task(mlp(), scaled=True)
    problem = task.problem(ALL)
    with torch.no_grad():
        rows = torch.arange(N)
        fx = task.forward(problem.x, ALL)[rows, task.targets]
        f0 = task.forward(torch.zeros_like(problem.x), ALL)[rows, task.targets]
    ig = make_method("integrated_gradients", n_steps=64)(problem)
    err = (ig.sum((1, 2)) - (fx - f0)).abs().max().item()
    assert err <= 2e-2 * (fx - f0).abs().max().item()
    coarse = make_method("integrated_gradients", n_steps=1)(problem)  # one node: not complete
    assert (coarse.sum((1, 2)) - (fx - f0)).abs().max().item() > err


@pytest.mark.parametrize(
    "spec, kwargs",
    [
        ("saliency", {}),
        ("integrated_gradients", {"n_steps": 8}),
        ("integrated_gradients", {"n_steps": 8, "internal_batch_size": 2 * N}),
        ("occlusion", {}),
        ("occlusion", {"perturbations_per_eval": 3}),
        ("random", {}),
    ],
)
def test_batching_does_not_change_attributions(spec, kwargs):
    """Per-sample forward passes (scale 1 + i inside the model) and per-sample targets:
    a batch of all samples gives what each sample alone gives."""
    task = token_task(mlp(), scaled=True)
    m = make_method(spec, **kwargs)
    whole = m(task.problem(ALL))
    parts = torch.cat([m(task.problem(torch.tensor([i]))) for i in range(N)])
    torch.testing.assert_close(whole, parts)


def test_expanded_batches_without_a_task():
    """A Problem without task: Captum's expanded batches are split into copies of the batch."""
    task = token_task(mlp(), scaled=True)
    p = task.problem(ALL)
    bare = Problem(forward=p.forward, x=p.x, target=p.target, model=p.model, idx=p.idx)
    for spec in ("integrated_gradients", "gradientshap", "smoothgrad"):
        m = make_method(spec)
        torch.testing.assert_close(m(bare), m(p))


def test_occlusion_tokens_by_hand():
    """Token occlusion: every entry of token t gets f_t(x) - f_t(x with token t zeroed)."""
    task = token_task(mlp(), scaled=True)
    problem = task.problem(ALL)
    occ = make_method("occlusion")(problem)
    rows = torch.arange(N)
    with torch.no_grad():
        fx = task.forward(problem.x, ALL)[rows, task.targets]
        for t in range(T):
            x0 = problem.x.clone()
            x0[:, t] = 0
            drop = fx - task.forward(x0, ALL)[rows, task.targets]
            torch.testing.assert_close(occ[:, t], drop[:, None].expand(N, E))


@pytest.mark.parametrize("patch, expect", [(2, 2), (1, 4), (None, None)])
def test_occlusion_images_by_hand(patch, expect):
    """Image occlusion: p x p patches over all channels, stride p; p = task.patch if > 1, else 4
    (patch=None: the option patch=3 overrides the task)."""
    task = image_task(small_cnn(), patch=patch or 2)
    opts = {} if patch else {"patch": 3}
    p = expect or 3
    problem = task.problem(ALL)
    occ = make_method("occlusion", **opts)(problem)
    rows = torch.arange(N)
    with torch.no_grad():
        fx = task.forward(problem.x, ALL)[rows, task.targets]
        for i in range(0, 8 - p + 1, p):
            for j in range(0, 8 - p + 1, p):
                x0 = problem.x.clone()
                x0[:, :, i : i + p, j : j + p] = 0
                drop = fx - task.forward(x0, ALL)[rows, task.targets]
                block = occ[:, :, i : i + p, j : j + p]
                torch.testing.assert_close(block, drop.view(N, 1, 1, 1).expand_as(block))


def test_smoothgrad_and_gradientshap_on_a_linear_model():
    """f = W x: SmoothGrad = |W_t| whatever the noise; GradientSHAP with the zero baseline
    only = x * W_t (the gradient is constant along every path)."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(T * E, CLASSES)).to(D).eval()
    task = token_task(lin)
    problem = task.problem(ALL)
    w = lin[1].weight.detach()[task.targets].view(N, T, E)
    torch.testing.assert_close(make_method("smoothgrad")(problem), w.abs())
    shap = make_method("gradientshap", n_baselines=1)(problem)
    torch.testing.assert_close(shap, problem.x * w)


def test_noise_methods_are_seeded_and_leave_the_global_generator_alone():
    task = token_task(mlp())
    problem = task.problem(ALL)
    for spec in ("smoothgrad", "gradientshap"):
        state, np_state = torch.get_rng_state(), np.random.get_state()[1].copy()
        a = make_method(spec)(problem)
        assert torch.equal(torch.get_rng_state(), state)
        assert (np.random.get_state()[1] == np_state).all()
        torch.testing.assert_close(make_method(spec)(problem), a)
        assert not torch.allclose(make_method(spec, seed=1)(problem), a)


def test_random_is_uniform_and_seeded():
    task = token_task(mlp())
    a = make_method("random")(task.problem(ALL))
    assert a.shape == (N, T, E) and a.min() >= 0 and a.max() < 1
    again = make_method("random")(task.problem(torch.tensor([3, 1])))
    torch.testing.assert_close(again, a[[3, 1]])
    assert not torch.allclose(make_method("random", seed=1)(task.problem(ALL)), a)
    assert len(a.unique()) == a.numel()


# -- nothing left behind ----------------------------------------------------------------------


def _state(model: nn.Module) -> tuple:
    hooks = tuple(
        (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
        )
        for m in model.modules()
    )
    flags = tuple(p.requires_grad for p in model.parameters())
    values = [t.detach().clone() for t in model.state_dict().values()]
    return hooks, flags, values


def _assert_no_leak(spec: str, task: Task, **kwargs):
    model = task.model
    model[-1].bias.requires_grad_(False)  # a frozen parameter must stay frozen
    before = _state(model)
    problem = task.problem(ALL[:3])
    x = problem.x.clone()
    rel = make_method(spec, **kwargs)(problem)
    after = _state(model)
    assert rel.shape == x.shape and rel.grad_fn is None and not rel.requires_grad
    assert torch.equal(problem.x, x), f"{spec} modified problem.x"
    assert before[0] == after[0], f"{spec} left hooks registered"
    assert before[1] == after[1], f"{spec} changed requires_grad flags"
    for b, a in zip(before[2], after[2], strict=True):
        assert torch.equal(b, a), f"{spec} changed the model's parameters or buffers"
    assert all(p.grad is None for p in model.parameters()), f"{spec} left parameter gradients"


PLAIN = [n for n in available_methods() if not n.startswith(("zennit:", "lxt:"))]


@pytest.mark.parametrize("spec", PLAIN)
def test_no_state_left_behind(spec):
    task = image_task(small_cnn()) if "zennit" in spec else token_task(mlp(), scaled=True)
    _assert_no_leak(spec, task)


# -- Zennit -----------------------------------------------------------------------------------


ZENNIT = [
    ("epsilon_plus", "zennit-epsilon-plus"),
    ("epsilon_plus_flat", "zennit-epsilon-plus-flat"),
    ("epsilon_gamma_box", "zennit-epsilon-gamma-box"),
    ("epsilon_alpha2_beta1", "zennit-epsilon-alpha2-beta1"),
    ("epsilon_alpha2_beta1_flat", "zennit-epsilon-alpha2-beta1-flat"),
]


@pytest.mark.parametrize("zname, preset", ZENNIT)
def test_zennit_matches_the_zennit_presets(zname, preset):
    """Zennit's composites (batch norm merged by SequentialMergeBatchNorm) against the presets
    of the same name, both with the box bounds from the task's data range."""
    pytest.importorskip("zennit")
    task = image_task(small_cnn())
    problem = task.problem(ALL)
    z = make_method(f"zennit:{zname}")
    ours = make_method(f"dynamiclrp:{preset}")(problem)
    theirs = z(problem)
    assert z.params["canonizers"] == ["SequentialMergeBatchNorm"]
    diff = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert diff <= 1e-10, f"{zname}: max relative difference {diff:.2e}"
    _assert_no_leak(f"zennit:{zname}", image_task(small_cnn()))


def test_zennit_gamma_box_bounds_are_used():
    pytest.importorskip("zennit")
    problem = image_task(small_cnn()).problem(ALL)
    a = make_method("zennit:epsilon_gamma_box")(problem)  # data range of rand(): ~[0, 1]
    b = make_method("zennit:epsilon_gamma_box", low=-3.0, high=3.0)(problem)
    c = make_method("dynamiclrp:zennit-epsilon-gamma-box", low=-3.0, high=3.0)(problem)
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c, rtol=1e-10, atol=1e-12)


# -- LxT --------------------------------------------------------------------------------------


def _lxt_python() -> str:
    path = os.environ.get("DYNAMICLRP_LXT_PYTHON") or "/tmp/lxtenv/bin/python"
    if not os.path.exists(path):
        pytest.skip(f"no LxT interpreter ({path}); set DYNAMICLRP_LXT_PYTHON")
    return path


def _hf_task(output: str) -> Task:
    """A tiny random float32 model with random norms and biases, one left-padded sample:
    ``"logits"``: Llama sequence classifier (non-default RoPE base: checks the config
    translation); ``"last"``: Llama causal LM, next token; ``"span"``: BERT extractive QA, the
    score ``start[s] + end[e]`` of a fixed span per sample."""
    tr = pytest.importorskip("transformers")
    small = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=32,
        max_position_embeddings=64,
        num_labels=3,
    )
    torch.manual_seed(0)
    if output == "span":
        model = tr.BertForQuestionAnswering(tr.BertConfig(**{**small, "num_labels": 2}))
    else:
        rope = {"rope_type": "default", "rope_theta": 500.0}
        config = tr.LlamaConfig(
            **small, num_key_value_heads=2, pad_token_id=0, rope_parameters=rope
        )
        # eager: with left padding SDPA sees fully masked query rows, on which dynamiclrp's
        # SDPA rule currently gives NaN (softmax of an all -inf row; reported to the lead)
        config._attn_implementation = "eager"
        cls = tr.LlamaForSequenceClassification if output == "logits" else tr.LlamaForCausalLM
        model = cls(config)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(1, 32, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    spans = torch.tensor([[2, 3], [3, 5], [1, 1]])
    emb = model.get_input_embeddings()

    def forward(x, idx):
        out = model(inputs_embeds=x, attention_mask=mask[idx])
        if output == "logits":
            return out.logits
        if output == "last":
            return out.logits[:, -1]
        rows, s = torch.arange(len(idx)), spans[idx]
        return (out.start_logits[rows, s[:, 0]] + out.end_logits[rows, s[:, 1]])[:, None]

    with torch.no_grad():
        targets = forward(emb(ids), torch.arange(3)).argmax(1)
    hf = {"model": model, "output": output, "attention_mask": mask, "spans": spans}
    return Task(
        name=f"tiny-{output}",
        kind="tokens",
        model=model,
        inputs=ids,
        targets=targets,
        labels=targets,
        to_x=emb,
        forward=forward,
        hf=hf,
    )


@pytest.mark.parametrize(
    "output, variant", [("logits", "attnlrp"), ("last", "cp-lrp"), ("span", "attnlrp")]
)
def test_lxt_matches_the_lxt_presets(output, variant):
    """LxT in its own interpreter against the preset of the same name (float32), two batches
    in one worker process."""
    python = _lxt_python()
    task = _hf_task(output)
    problems = [task.problem(torch.tensor([0, 1])), task.problem(torch.tensor([2]))]
    lxt = make_method(f"lxt:{variant}", python=python)
    lxt.prepare(problems)  # one worker process for both batches
    assert "2 batches" in lxt.last_worker_log
    ours = make_method(f"dynamiclrp:{variant}")
    for p in problems:
        theirs = lxt(p)
        mine = ours(p)
        diff = ((mine - theirs).abs().max() / theirs.abs().max()).item()
        assert diff <= 1e-5, f"{output} {variant}: max relative difference {diff:.2e}"
    assert not lxt._cache  # results are handed out once


def test_lxt_unsupported_family_is_an_error_before_any_process():
    pytest.importorskip("transformers")
    task = _hf_task("span")
    with pytest.raises(ValueError, match="no cp-lrp map for BertForQuestionAnswering"):
        make_method("lxt:cp-lrp", python=os.path.realpath(__file__))(task.problem(ALL[:1]))


def test_lxt_scores_are_checked_against_the_task(monkeypatch):
    """A rebuilt model whose scores differ from problem.forward is an error (the worker is
    replaced by a stub returning wrong scores: no process)."""
    pytest.importorskip("transformers")
    task = _hf_task("logits")
    problem = task.problem(ALL[:2])
    with torch.no_grad():
        right = problem.forward(problem.x)
    lxt = make_method("lxt:attnlrp", python=os.path.realpath(__file__))
    fake = {"relevance": [torch.zeros_like(problem.x)], "scores": [right * 1.01], "dropped": []}
    monkeypatch.setattr(lxt, "_run", lambda job, label: fake)
    with pytest.raises(RuntimeError, match="other scores than problem.forward"):
        lxt(problem)
    fake["scores"] = [right]
    torch.testing.assert_close(lxt(problem), fake["relevance"][0])

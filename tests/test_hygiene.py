"""Hygiene: an explanation leaves no trace.

Repeated calls keep memory and the number of live tensors flat; the graph and its saved tensors
are freed with the output (the explainer and its cached plans hold no tensors and no autograd
nodes); the model's parameters, buffers, modes, hooks, ``requires_grad`` flags and ``.grad`` are
as they were, and so are the global RNG, grad mode and default dtype; two threads explaining two
models at once get the results of sequential calls.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import types
import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import dynamiclrp

transformers = pytest.importorskip("transformers")

SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_labels=5,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
    )
    return transformers.ViTForImageClassification(cfg).eval()


# --- memory over repeated calls -----------------------------------------------------------------

MEMORY_SCRIPT = """
import gc, json, os, sys
import torch, transformers
import dynamiclrp

torch.manual_seed(0)
cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_labels=5, num_hidden_layers=2,
                             hidden_size=32, intermediate_size=64, num_attention_heads=4)
model = transformers.ViTForImageClassification(cfg).eval()
page = os.sysconf("SC_PAGE_SIZE")
cached = dynamiclrp.LRP()


def rss():
    gc.collect()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page


def tensors():
    gc.collect()
    objects = gc.get_objects()
    return sum(1 for o in objects if issubclass(type(o), torch.Tensor)), len(objects)


def call(i):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = model(pixel_values=x).logits
    if i % 2:
        rel = dynamiclrp.explain(out, x, target=i % 5)
    else:
        rel = cached.explain(out, x, target=i % 5)
    assert rel.shape == x.shape


marks = [int(a) for a in sys.argv[1:]]
found = {}
for i in range(marks[-1]):
    call(i)
    if i + 1 in marks:
        found[i + 1] = (rss(), tensors())
print(json.dumps(found))
"""


def run_memory_script(*marks: int) -> dict[int, tuple[int, int]]:
    """``{calls: (RSS in bytes, (live tensors, objects tracked by gc))}`` after each number of
    calls in ``marks``."""
    env = dict(os.environ, PYTHONPATH=str(SRC), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, *map(str, marks)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return {int(k): (v[0], tuple(v[1])) for k, v in found.items()}


def test_repeated_explains_keep_memory_and_live_tensors_flat():
    """Forward passes and explanations of a tiny ViT (half through ``explain``, half through a
    caching ``LRP``) in a fresh process.  The number of live tensors and of all objects tracked by
    the garbage collector is the same after 20, 200 and 600 calls.  Resident memory grows by less
    than 2 % from call 20 to call 200 (the allocator's warm-up, ~3 MiB: plain forward + backward
    calls grow it alike) and by less than 3 MiB from call 200 to 600 (a leak of 8 KiB a call
    would exceed it; measured: 0.1 to 1.3 MiB)."""
    m = run_memory_script(20, 200, 600)
    (rss20, n20), (rss200, n200), (rss600, n600) = m[20], m[200], m[600]
    mib = 2**20
    print(
        f"RSS after 20 calls {rss20 / mib:.2f} MiB, after 200 {rss200 / mib:.2f} MiB, after 600 "
        f"{rss600 / mib:.2f} MiB; (live tensors, gc objects) {n20}, {n200}, {n600}"
    )
    assert n20 == n200 == n600
    assert rss200 - rss20 < 0.02 * rss20, m
    assert rss600 - rss200 < 3 * mib, m


# --- the graph is freed, the explainer holds nothing of it ----------------------------------------


def reachable(root: object) -> list:
    """Every object reachable from ``root`` through ``gc.get_referents``, not entering modules,
    classes or functions (a rule function's globals reach all of torch)."""
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)
    seen, stack, found = {id(root)}, [root], []
    while stack:
        obj = stack.pop()
        found.append(obj)
        for ref in gc.get_referents(obj):
            if id(ref) in seen or isinstance(ref, skip):
                continue
            seen.add(id(ref))
            stack.append(ref)
    return found


def is_autograd_node(obj: object) -> bool:
    return isinstance(obj, torch.autograd.graph.Node)


def test_saved_activation_dies_with_the_output_and_the_explainer_keeps_nothing():
    """Autograd nodes take no weak references (``weakref.ref(out.grad_fn)`` raises TypeError), so
    the graph's life is watched through an activation it saved: the first ViT layer's ``fc1``
    output, which its GELU saved for backward."""
    model = tiny_vit()
    with pytest.raises(TypeError):
        weakref.ref(
            model(pixel_values=torch.randn(1, 3, 16, 16, requires_grad=True)).logits.grad_fn
        )
    captured = []
    hook = model.vit.layers[0].mlp.fc1.register_forward_hook(
        lambda mod, args, out: captured.append(weakref.ref(out))
    )
    lrp = dynamiclrp.LRP()
    try:
        for _ in range(2):  # the second call runs from the cached plan
            x = torch.randn(2, 3, 16, 16, requires_grad=True)
            out = model(pixel_values=x).logits
            lrp.explain(out, x, target=1)
            assert captured[-1]() is not None  # the graph (GELU / the next linear) keeps it
            del out
            gc.collect()
            assert captured[-1]() is None, "the explainer kept the graph or an activation alive"
    finally:
        hook.remove()
    assert lrp.last_plan_cached and len(lrp._plans) == 1
    held = reachable(lrp)
    assert not [o for o in held if torch.is_tensor(o)], "the explainer holds tensors"
    assert not [o for o in held if is_autograd_node(o)], "the explainer holds autograd nodes"
    # the walk does see through the explainer: the plan is in it, and so would a tensor be
    assert any(isinstance(o, dynamiclrp.Plan) for o in held)
    next(iter(lrp._plans.values())).first = frozenset({torch.zeros(1)})
    assert [o for o in reachable(lrp) if torch.is_tensor(o)]


# --- the model and the process are left as they were ---------------------------------------------


class Block(nn.Module):
    """Conv + BatchNorm, LayerNorm, attention with dropout, dropout, linear head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.proj = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        t = self.ln(self.proj(h.flatten(2).transpose(1, 2)))
        a, _ = self.attn(t, t, t, need_weights=False)
        return self.head(self.drop(t + a).mean(1))


def snapshot(model: nn.Module) -> dict:
    hook_dicts = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    module_globals = torch.nn.modules.module
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "versions": {k: v._version for k, v in model.state_dict(keep_vars=True).items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            (n, d): dict(getattr(m, d)) for n, m in model.named_modules() for d in hook_dicts
        },
        "global_hooks": [
            dict(getattr(module_globals, name))
            for name in dir(module_globals)
            if name.startswith("_global_") and name.endswith("hooks")
        ],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grad": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "anomaly": torch.is_anomaly_enabled(),
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        a = after["state"][k]
        assert a.dtype == v.dtype and a.shape == v.shape, k
        # bit-exact, NaN-safe: compare the bytes
        assert torch.equal(
            a.view(torch.uint8) if a.dim() else a, v.view(torch.uint8) if v.dim() else v
        ), k
    assert after["versions"] == before["versions"], "a parameter or buffer was written in place"
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["global_hooks"] == before["global_hooks"]
    assert after["requires_grad"] == before["requires_grad"]
    for n, g in before["grad"].items():
        assert after["grad"][n] is g, f"{n}.grad was replaced"
        if g is not None:
            assert torch.equal(g, before["grad_values"][n]), f"{n}.grad changed"
    assert torch.equal(after["rng"], before["rng"]), "the global RNG moved"
    for key in ("grad_mode", "inference_mode", "default_dtype", "deterministic", "anomaly"):
        assert after[key] == before[key], key


@pytest.mark.parametrize("mode", ["eval", "train", "train-with-grads"])
def test_model_parameters_buffers_modes_hooks_and_grads_are_untouched(mode):
    """Train mode too: the forward pass updates BatchNorm's running statistics once and samples
    dropout masks; the explanation must neither update them again nor draw random numbers.
    User hooks (module forward hooks, tensor hooks on the input, output and parameters) do not
    fire, and the graph can still be backpropagated, giving the gradients of an untouched twin."""
    torch.manual_seed(1)
    model = Block().double().train(mode != "eval")
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    if mode == "train-with-grads":  # .grad already holds a previous step's gradients
        model(x).sum().backward()
        x.grad = None
    fired = []
    handles = [
        model.bn.register_forward_hook(lambda *a: fired.append("forward")),
        model.ln.register_forward_pre_hook(lambda *a: fired.append("forward-pre")),
        model.head.weight.register_hook(lambda g: fired.append("param")),
        x.register_hook(lambda g: fired.append("input")),
        torch.nn.modules.module.register_module_forward_hook(lambda *a: fired.append("global")),
    ]
    torch.manual_seed(2)
    out = model(x)
    torch.manual_seed(2)
    twin = model(x)  # the same masks: an independent graph to compare the gradients with
    out.register_hook(lambda g: fired.append("output"))
    assert fired.count("forward") == 2 and "global" in fired
    fired.clear()
    before = snapshot(model)
    rel, report = dynamiclrp.explain(out, x, target=[1, 3], return_report=True)
    after = snapshot(model)
    assert fired == [], f"hooks fired: {fired}"
    assert rel.shape == x.shape and abs(report.residual) < 1e-6 * abs(report.seeded)
    assert_same(before, after)
    for h in handles:
        h.remove()
    g_out = torch.autograd.grad(out[:, 1].sum(), [x, *model.parameters()])
    g_twin = torch.autograd.grad(twin[:, 1].sum(), [x, *model.parameters()])
    for a, b in zip(g_out, g_twin, strict=True):
        assert torch.equal(a, b)


def test_the_snapshot_sees_each_kind_of_change():
    """The comparison above can fail: each change a careless explainer could make is caught."""
    torch.manual_seed(1)
    model = Block().double().eval()
    changes = [
        lambda: model.bn.running_mean.add_(0.0),  # same values, written in place
        lambda: model.bn.running_var.copy_(model.bn.running_var + 1),
        lambda: model.bn.num_batches_tracked.add_(1),
        lambda: model.attn.train(),
        lambda: model.ln.register_forward_hook(lambda *a: None),
        lambda: model.head.weight.requires_grad_(False),
        lambda: setattr(model.head.weight, "grad", torch.zeros_like(model.head.weight)),
        lambda: torch.rand(1),
        lambda: torch.set_grad_enabled(False),
        lambda: torch.nn.modules.module.register_module_forward_hook(lambda *a: None),
    ]
    for change in changes:
        before = snapshot(model)
        handle = change()
        try:
            with pytest.raises(AssertionError):
                assert_same(before, snapshot(model))
        finally:
            torch.set_grad_enabled(True)
            if hasattr(handle, "remove"):
                handle.remove()
        model = Block().double().eval()  # a fresh model for the next change


# --- threads -------------------------------------------------------------------------------------


def test_two_threads_explaining_two_models_get_the_sequential_results():
    """A ViT and the conv/attention block, each explained 6 times in its own thread (its own
    caching ``LRP`` and the one-shot ``explain`` alternately), started together: every result
    equals the sequential one bit for bit."""
    vit = tiny_vit().double()
    torch.manual_seed(3)
    block = Block().double().eval()
    g = torch.Generator().manual_seed(4)
    data = {
        "vit": [torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=g) for _ in range(6)],
        "block": [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g) for _ in range(6)],
    }

    def explain_all(name: str) -> list[torch.Tensor]:
        lrp = dynamiclrp.LRP()
        results = []
        for i, x in enumerate(data[name]):
            x = x.clone().requires_grad_()
            out = vit(pixel_values=x).logits if name == "vit" else block(x)
            call = lrp.explain if i % 2 else dynamiclrp.explain
            results.append(call(out, x, target=i % 5))
        return results

    sequential = {name: explain_all(name) for name in data}
    threaded: dict[str, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(name: str) -> None:
        try:
            barrier.wait()
            threaded[name] = explain_all(name)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads every 10 us: the two runs really interleave
    try:
        for _ in range(2):
            threads = [threading.Thread(target=worker, args=(name,)) for name in data]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
        assert not errors, errors
        for name in data:
            assert len(threaded[name]) == 6
            for a, b in zip(threaded[name], sequential[name], strict=True):
                assert torch.equal(a, b), name

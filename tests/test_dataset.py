"""attribute_dataset: shards, index, resume, configuration checks, NPZ, torchrun.

The reference for every relevance is an independent loop over the batches calling
``dynamiclrp.explain`` directly; file contents are checked with safetensors/numpy/hashlib
directly, not with the module's own readers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dynamiclrp
from dynamiclrp import dataset as dsmod
from dynamiclrp.dataset import (
    DatasetConfigError,
    DatasetIndexError,
    attribute_dataset,
    load_attributions,
)

HERE = Path(__file__).parent
SCRIPT = HERE / "data" / "dataset_torchrun.py"
_spec = importlib.util.spec_from_file_location("dataset_torchrun", SCRIPT)
_helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helper)
make_model_and_data = _helper.make_model_and_data

BATCH = 4
N = 22  # 6 batches: five of 4 and one of 2


class Interrupted(RuntimeError):
    pass


class Counting(nn.Module):
    """Counts forward calls; raises ``Interrupted`` on call number ``fail_at``."""

    def __init__(self, inner: nn.Module, fail_at: int | None = None):
        super().__init__()
        self.inner = inner
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise Interrupted(f"simulated interruption at batch call {self.calls}")
        return self.inner(x)


@pytest.fixture(scope="module")
def setup():
    model, data = make_model_and_data()
    return model, data, DataLoader(data, batch_size=BATCH)


def reference(model, loader, target="predicted"):
    """Independent loop: per-batch dynamiclrp.explain, concatenated."""
    rels, targets, preds = [], [], []
    for x, y in loader:
        x = x.clone().requires_grad_(True)
        out = model(x)
        t = {"predicted": out.argmax(1), "label": y}.get(target, target)
        rels.append(dynamiclrp.explain(out, x, target=t))
        targets += t.tolist() if isinstance(t, torch.Tensor) else [t] * len(x)
        preds += out.argmax(1).tolist()
    return torch.cat(rels), targets, preds


def test_shards_and_index_content(setup, tmp_path):
    model, data, loader = setup
    result = attribute_dataset(model, loader, tmp_path, shard_size=2, progress=False)
    assert (result.num_samples, result.num_batches, result.num_shards) == (N, 6, 3)
    assert (result.shards_computed, result.shards_skipped, result.world_size) == (3, 0, 1)
    assert result.index_path == tmp_path / "index.json"
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["index.json"] + [
        f"shard-00000{k}.{ext}" for k in range(3) for ext in ("json", "safetensors")
    ]
    index = json.loads((tmp_path / "index.json").read_text())
    cfg = index["config"]
    assert index["complete"] is True and index["world_size"] == 1
    assert index["torch_version"] == torch.__version__
    assert index["dynamiclrp_version"] == dynamiclrp.__version__
    assert cfg["target"] == "predicted" and cfg["format"] == "safetensors"
    assert cfg["rules"].startswith("Rules(name='dynamiclrp'") and cfg["shard_size"] == 2
    first_x, first_y = data.tensors[0][:BATCH], data.tensors[1][:BATCH]
    digest = hashlib.sha256()
    for t in (first_x, first_y):
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.numpy().tobytes())
    assert cfg["fingerprint"] == {
        "length": N,
        "num_batches": 6,
        "first_batch_shape": [BATCH, 3, 8, 8],
        "first_batch_sha256": digest.hexdigest(),
    }
    ref, targets, preds = reference(model, loader)
    from safetensors.torch import load_file

    for k, meta in enumerate(index["shards"]):
        lo, hi = 8 * k, min(8 * k + 8, N)
        path = tmp_path / meta["file"]
        assert meta["file"] == f"shard-{k:06d}.safetensors"
        assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert meta["batches"] == [2 * k, 2 * k + 1]
        assert meta["sample_indices"] == list(range(lo, hi))
        assert meta["targets"] == targets[lo:hi] and meta["predictions"] == preds[lo:hi]
        assert meta["dtype"] == "float32" and meta["rank"] == 0
        stored = load_file(path)
        assert sorted(stored) == [f"relevance.{j}" for j in range(len(meta["batches"]))]
        assert meta["shapes"] == [list(stored[f"relevance.{j}"].shape) for j in range(len(stored))]
        torch.testing.assert_close(
            torch.cat([stored[f"relevance.{j}"] for j in range(len(stored))]),
            ref[lo:hi],
            rtol=0,
            atol=0,
        )


@pytest.mark.parametrize("target", ["predicted", "label", 3, "callable"])
def test_equals_per_batch_explain(setup, tmp_path, target):
    model, _, loader = setup
    if target == "callable":
        t, ref_target = (lambda batch, output: (batch[1] + 1) % 5), None
    else:
        t, ref_target = target, target
    attribute_dataset(model, loader, tmp_path, target=t, shard_size=4, progress=False)
    got = load_attributions(tmp_path)
    if ref_target is None:
        labels = [(y + 1) % 5 for _, y in loader]
        rels = []
        for (x, _), lab in zip(loader, labels, strict=True):
            x = x.clone().requires_grad_(True)
            rels.append(dynamiclrp.explain(model(x), x, target=lab))
        ref, targets = torch.cat(rels), torch.cat(labels).tolist()
        preds = reference(model, loader)[2]
    else:
        ref, targets, preds = reference(model, loader, ref_target)
    torch.testing.assert_close(got.relevance, ref, rtol=0, atol=0)
    assert got.sample_indices.tolist() == list(range(N))
    assert got.targets == targets and got.predictions == preds


def test_streamed_source_equals_dataloader(setup, tmp_path):
    """A plain list of batches (no sampler to plan from) gives the same shards."""
    model, _, loader = setup
    attribute_dataset(model, loader, tmp_path / "a", shard_size=4, progress=False)
    r = attribute_dataset(model, list(loader), tmp_path / "b", shard_size=4, progress=False)
    assert (r.num_samples, r.num_batches, r.num_shards, r.shards_computed) == (N, 6, 2, 2)
    a, b = load_attributions(tmp_path / "a"), load_attributions(tmp_path / "b")
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=0)
    assert a.targets == b.targets
    with pytest.raises(DatasetConfigError, match="one-pass iterator"):
        attribute_dataset(model, iter(loader), tmp_path / "c", progress=False)


@pytest.mark.parametrize("streamed", [False, True])
def test_resume_computes_only_missing_shards(setup, tmp_path, streamed):
    model, _, loader = setup
    source = list(loader) if streamed else loader
    clean = tmp_path / "clean"
    attribute_dataset(model, source, clean, shard_size=2, progress=False)

    out = tmp_path / "out"
    broken = Counting(model, fail_at=4)  # batches 0-2 run: shard 0 written, shard 1 half done
    with pytest.raises(Interrupted):
        attribute_dataset(broken, source, out, shard_size=2, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False
    assert (out / "shard-000000.json").exists() and not (out / "shard-000001.json").exists()
    with pytest.raises(DatasetIndexError, match="incomplete"):
        load_attributions(out)
    # a data file cut short with no metadata (killed mid-write) must be redone
    (out / "shard-000001.safetensors").write_bytes(b"\x00" * 10)
    (out / "shard-000001.safetensors.tmp-12345").write_bytes(b"\x00")

    counting = Counting(model)
    r = attribute_dataset(counting, source, out, shard_size=2, progress=False)
    assert counting.calls == 4  # batches 2..5: shards 1 and 2 only
    assert (r.shards_computed, r.shards_skipped) == (2, 1)
    assert not (out / "shard-000001.safetensors.tmp-12345").exists()
    got, ref = load_attributions(out), load_attributions(clean)
    torch.testing.assert_close(got.relevance, ref.relevance, rtol=0, atol=0)
    assert got.targets == ref.targets and got.predictions == ref.predictions

    # a complete run: nothing to do; a corrupted shard is recomputed, alone
    counting = Counting(model)
    r = attribute_dataset(counting, source, out, shard_size=2, progress=False)
    assert counting.calls == 0 and (r.shards_computed, r.shards_skipped) == (0, 3)
    path = out / "shard-000002.safetensors"
    path.write_bytes(path.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(DatasetIndexError, match="SHA-256"):
        load_attributions(out)
    r = attribute_dataset(counting, source, out, shard_size=2, progress=False)
    assert counting.calls == 2 and (r.shards_computed, r.shards_skipped) == (1, 2)
    torch.testing.assert_close(load_attributions(out).relevance, ref.relevance, rtol=0, atol=0)


def test_configuration_mismatch_is_an_error(setup, tmp_path):
    model, data, loader = setup
    attribute_dataset(model, loader, tmp_path, shard_size=2, progress=False)
    with pytest.raises(DatasetConfigError, match="rules: stored"):
        attribute_dataset(model, loader, tmp_path, shard_size=2, rules="epsilon", progress=False)
    with pytest.raises(DatasetConfigError, match="target: stored 'predicted', now 'label'"):
        attribute_dataset(model, loader, tmp_path, shard_size=2, target="label", progress=False)
    with pytest.raises(DatasetConfigError, match="shard_size"):
        attribute_dataset(model, loader, tmp_path, shard_size=3, progress=False)
    other = TensorDataset(data.tensors[0] + 1, data.tensors[1])
    with pytest.raises(DatasetConfigError, match="fingerprint"):
        attribute_dataset(
            model, DataLoader(other, batch_size=BATCH), tmp_path, shard_size=2, progress=False
        )
    with pytest.raises(DatasetConfigError, match="format"):
        attribute_dataset(model, loader, tmp_path, shard_size=2, format="npz", progress=False)
    # nothing was mixed in: the first run's results are intact
    torch.testing.assert_close(
        load_attributions(tmp_path).relevance, reference(model, loader)[0], rtol=0, atol=0
    )
    # resume=False starts over with the new configuration
    counting = Counting(model)
    r = attribute_dataset(
        counting, loader, tmp_path, shard_size=3, target="label", resume=False, progress=False
    )
    assert counting.calls == 6 and (r.num_shards, r.shards_computed) == (2, 2)
    assert not (tmp_path / "shard-000002.json").exists()  # the old third shard is gone
    torch.testing.assert_close(
        load_attributions(tmp_path).relevance, reference(model, loader, "label")[0], rtol=0, atol=0
    )


def test_foreign_or_bad_inputs_are_errors(setup, tmp_path):
    model, data, loader = setup
    (tmp_path / "shard-000000.npz").write_bytes(b"x")
    with pytest.raises(DatasetConfigError, match="no index.json"):
        attribute_dataset(model, loader, tmp_path, progress=False)
    shuffled = DataLoader(data, batch_size=BATCH, shuffle=True)
    with pytest.raises(DatasetConfigError, match="shuffle=False"):
        attribute_dataset(model, shuffled, tmp_path / "s", progress=False)
    with pytest.raises(DatasetConfigError, match="no labels"):
        attribute_dataset(
            model,
            DataLoader(data.tensors[0], batch_size=BATCH),
            tmp_path / "l",
            target="label",
            progress=False,
        )
    with pytest.raises(DatasetConfigError, match="inputs_fn"):
        attribute_dataset(model, [{"x": data.tensors[0][:2]}], tmp_path / "d", progress=False)
    with pytest.raises(DatasetConfigError, match="shard_size"):
        attribute_dataset(model, loader, tmp_path / "z", shard_size=0, progress=False)
    with pytest.raises(DatasetIndexError, match="No index.json"):
        load_attributions(tmp_path / "nothing")


def test_inputs_fn_dict_batches(setup, tmp_path):
    model, data, loader = setup
    batches = [{"pixels": x, "label": y} for x, y in loader]
    attribute_dataset(
        model,
        batches,
        tmp_path,
        inputs_fn=lambda b: (b["pixels"], b["label"]),
        target="label",
        progress=False,
    )
    torch.testing.assert_close(
        load_attributions(tmp_path).relevance, reference(model, loader, "label")[0], rtol=0, atol=0
    )


def test_npz_format_and_storage_dtype(setup, tmp_path):
    model, _, loader = setup
    r = attribute_dataset(model, loader, tmp_path / "f", format="npz", shard_size=4, progress=False)
    assert r.num_shards == 2
    ref = reference(model, loader)[0]
    files = sorted(p.name for p in (tmp_path / "f").iterdir() if p.suffix == ".npz")
    assert files == ["shard-000000.npz", "shard-000001.npz"]
    with np.load(tmp_path / "f" / files[0], allow_pickle=False) as npz:
        first = np.concatenate([npz[f"relevance.{j}"] for j in range(4)])
    np.testing.assert_array_equal(first, ref[:16].numpy())
    torch.testing.assert_close(load_attributions(tmp_path / "f").relevance, ref, rtol=0, atol=0)
    for fmt in ("npz", "safetensors"):
        attribute_dataset(
            model, loader, tmp_path / fmt, format=fmt, dtype=torch.bfloat16, progress=False
        )
        got = load_attributions(tmp_path / fmt)
        assert got.relevance.dtype == torch.bfloat16
        assert got.index["shards"][0]["dtype"] == "bfloat16"
        torch.testing.assert_close(got.relevance, ref.to(torch.bfloat16), rtol=0, atol=0)


def test_auto_format_without_safetensors(setup, tmp_path, monkeypatch):
    model, _, loader = setup
    monkeypatch.setattr(dsmod, "_has_safetensors", lambda: False)
    attribute_dataset(model, loader, tmp_path / "a", progress=False)
    assert json.loads((tmp_path / "a" / "index.json").read_text())["config"]["format"] == "npz"
    with pytest.raises(DatasetConfigError, match="pip install safetensors"):
        attribute_dataset(model, loader, tmp_path / "b", format="safetensors", progress=False)


def test_progress_without_tqdm_and_model_state(setup, tmp_path, monkeypatch, capsys):
    model, _, loader = setup
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    model[0].eval()
    try:
        attribute_dataset(model, loader, tmp_path, progress=True)
        assert model.training and not model[0].training and model[2].training
    finally:
        model.eval()
    assert "attribute_dataset" not in capsys.readouterr().err
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None, n
    torch.testing.assert_close(
        load_attributions(tmp_path).relevance, reference(model, loader)[0], rtol=0, atol=0
    )


def test_torchrun_env_without_init_is_an_error(setup, tmp_path, monkeypatch):
    model, _, loader = setup
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DatasetConfigError, match="init_process_group"):
        attribute_dataset(model, loader, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_torchrun_two_ranks_equal_single_process(setup, tmp_path):
    model, _, loader = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += [str(SCRIPT), *(str(tmp_path / d) for d in ("planned", "streamed", "failing"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    attribute_dataset(
        model, loader, tmp_path / "single", target="label", shard_size=1, progress=False
    )
    single = load_attributions(tmp_path / "single")
    for name in ("planned", "streamed"):
        got = load_attributions(tmp_path / name)
        assert got.index["world_size"] == 2 and got.index["complete"]
        ranks = [s["rank"] for s in got.index["shards"]]
        assert ranks == [0, 1, 0, 1, 0, 1], name  # shard k on rank k % 2
        torch.testing.assert_close(got.relevance, single.relevance, rtol=0, atol=0)
        assert got.targets == single.targets and got.predictions == single.predictions
        cfg, ref_cfg = dict(got.index["config"]), dict(single.index["config"])
        fp, ref_fp = cfg.pop("fingerprint"), ref_cfg.pop("fingerprint")
        assert cfg == ref_cfg and fp["first_batch_sha256"] == ref_fp["first_batch_sha256"]
        # a list of batches has no dataset length or planned batch count
        assert fp == (
            ref_fp if name == "planned" else {**ref_fp, "length": None, "num_batches": None}
        )


class WithLogits(nn.Module):
    """Returns an object with ``.logits`` like a transformers model."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return type("Output", (), {"logits": self.inner(x)})()


def test_output_with_logits_attribute(setup, tmp_path):
    model, _, loader = setup
    attribute_dataset(WithLogits(model), loader, tmp_path, progress=False)
    torch.testing.assert_close(
        load_attributions(tmp_path).relevance, reference(model, loader)[0], rtol=0, atol=0
    )

"""Run LxT 2.1 on a job of :class:`dynamiclrp.evaluation.methods.LxTMethod` (a script, not a module).

Usage: ``PYTHON lxt_worker.py DIR`` in an interpreter with torch, transformers 4.52.4 and lxt 2.1
(it imports neither dynamiclrp nor anything else of this project).  ``DIR/job.pt`` holds
``variant`` ("attnlrp" | "cp-lrp"), ``family``, ``config_class``, ``model_class``, ``config``
(``to_dict()`` of the newer transformers), ``state_dict`` (float32), ``output`` ("logits" |
"last" | "span") and ``batches`` (dicts of ``x`` (B, T, D), ``target`` (B,), ``attention_mask``
(B, T) or None, ``spans`` (B, 2) or None) and ``device``.  It writes ``DIR/result.pt``: ``relevance`` (one
``x * grad`` per batch), ``scores`` (the ``(B, classes)`` output per batch) and ``dropped`` (the
config keys the old config class does not know).

The recipe is ``tests/lxt_oracle.py``'s: ``lxt.efficient.monkey_patch`` of
``transformers.models.<family>.modeling_<family>`` with the family's ``attnLRP`` or ``cp_LRP``
map, then the model (eager attention, float32, eval mode) is built and loaded, and for each batch
the relevance is ``x * d(sum_b score[b, target_b]) / dx``.  LxT patches transformers for good,
hence its own process and one variant per process.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types

import torch


def _stub_torchvision() -> None:
    """``lxt.efficient.models`` imports torchvision for its ViT map, unused here; without a
    working torchvision a stub stands in (as in ``tests/lxt_oracle.py``)."""
    try:
        import torchvision  # noqa: F401

        return
    except Exception:
        pass
    for mod in ("torchvision", "torchvision.models", "torchvision.models.vision_transformer"):
        m = types.ModuleType(mod)
        m.__spec__ = importlib.machinery.ModuleSpec(mod, None)
        sys.modules[mod] = m
    sys.modules["torchvision.models.vision_transformer"].nn = torch.nn
    sys.modules["torchvision.models"].vision_transformer = sys.modules[
        "torchvision.models.vision_transformer"
    ]


def old_config(transformers, cls_name: str, new: dict):
    """The config for the installed (older) transformers from a newer ``to_dict()``: keep the
    keys the old class has by default, translate ``rope_parameters`` (transformers 5) to
    ``rope_theta`` / ``rope_scaling`` (and Gemma 3's per-layer-type ones to
    ``rope_local_base_freq``).  Returns ``(config, dropped keys)``."""
    cls = getattr(transformers, cls_name)
    known = set(cls().to_dict()) | {"id2label", "label2id", "pad_token_id"}
    cfg = {k: v for k, v in new.items() if k in known}
    rope = new.get("rope_parameters")
    if isinstance(rope, dict) and "rope_parameters" not in known:
        if "full_attention" in rope:  # per layer type (Gemma 3)
            local = rope.get("sliding_attention", {})
            if "rope_local_base_freq" in known and "rope_theta" in local:
                cfg["rope_local_base_freq"] = local["rope_theta"]
            rope = rope["full_attention"]
        if "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", "default")
        if kind != "default":
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    dropped = sorted(set(new) - set(cfg) - {"rope_parameters"})
    return cls.from_dict(cfg), dropped


def scores(model, output: str, x, mask, spans):
    """The ``(B, classes)`` scores of ``output`` kind (module docstring)."""
    out = model(inputs_embeds=x, attention_mask=mask)
    if output == "logits":
        return out.logits
    if output == "last":
        return out.logits[:, -1]
    if output == "span":
        rows = torch.arange(x.shape[0], device=x.device)
        s, e = spans[:, 0], spans[:, 1]
        return (out.start_logits[rows, s] + out.end_logits[rows, e])[:, None]
    raise ValueError(f"lxt_worker: unknown output {output!r}")


def main(job_dir: str) -> None:
    torch.set_num_threads(int(os.environ.get("DYNAMICLRP_LXT_THREADS", "1")))
    job = torch.load(os.path.join(job_dir, "job.pt"), weights_only=True)
    import transformers  # before the stub: it must see no torchvision

    _stub_torchvision()
    from lxt.efficient import monkey_patch

    family, variant = job["family"], job["variant"]
    lxt_mod = importlib.import_module(f"lxt.efficient.models.{family}")
    patch_map = getattr(lxt_mod, "attnLRP" if variant == "attnlrp" else "cp_LRP", None)
    if patch_map is None:
        raise SystemExit(f"lxt_worker: LxT {lxt_mod.__name__} has no {variant} map")
    hf_mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    monkey_patch(hf_mod, patch_map=patch_map)

    config, dropped = old_config(transformers, job["config_class"], job["config"])
    config._attn_implementation = "eager"
    device = torch.device(job.get("device", "cpu"))
    model = getattr(transformers, job["model_class"])(config).float().eval()
    model.load_state_dict(job["state_dict"], strict=True)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)

    relevance, outputs = [], []
    for b in job["batches"]:
        x = b["x"].to(device).requires_grad_(True)
        mask = None if b["attention_mask"] is None else b["attention_mask"].to(device)
        spans = None if b["spans"] is None else b["spans"].to(device)
        out = scores(model, job["output"], x, mask, spans)
        rows = torch.arange(out.shape[0], device=device)
        out[rows, b["target"].to(device)].sum().backward()
        relevance.append((x * x.grad).detach().cpu())
        outputs.append(out.detach().cpu())
    result = {"relevance": relevance, "scores": outputs, "dropped": dropped}
    torch.save(result, os.path.join(job_dir, "result.pt"))
    print(f"lxt_worker: transformers {transformers.__version__}, {len(relevance)} batches")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: lxt_worker.py JOB_DIR")
    main(sys.argv[1])

"""Time LxT's AttnLRP on one transformer, in its own process (run by ``speed.py --lxt-python``).

LxT 2.1 patches the transformers modules globally and needs transformers 4.52, so it runs in a
separate environment and process. Given a JSON spec (model kind, config, tokens, dtype, device,
repeats), it builds the model with random weights (seed 0, eager attention, as LxT's own examples
use), and measures, medians over ``repeats`` after 2 warm-up runs:

* ``fg``:  forward + ``torch.autograd.grad`` of the target logit w.r.t. ``inputs_embeds``,
  before LxT patches anything (this environment's own floor);
* ``lxt``: after ``lxt.efficient.monkey_patch(..., attnLRP)``: forward + backward of the target
  logit + ``inputs_embeds * grad`` (LxT's relevance);

and the peak memory of each (:func:`_measure.peak_memory`, in this process). It prints one line
``LXT_RESULT {json}``.

    /tmp/lxtenv/bin/python benchmarks/lxt_speed_worker.py '{"kind": "llama", ...}'
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.metadata
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _measure import peak_memory, timed  # noqa: E402

# the LxT worker of dynamiclrp.evaluation imports nothing from the project: load it as a module
sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "src", "dynamiclrp", "evaluation"
    ),
)
from lxt_worker import _stub_torchvision  # noqa: E402

WARMUP = 2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import transformers

    _stub_torchvision()
    from lxt.efficient import monkey_patch

    kind, device, dtype = spec["kind"], spec["device"], DTYPES[spec["dtype"]]
    if kind not in ("bert", "llama"):
        raise SystemExit(f"lxt_speed_worker: unknown kind {kind!r} (bert or llama)")
    cfg_cls, model_cls = {
        "bert": ("BertConfig", "BertForSequenceClassification"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
    }[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**spec["config"])
    cfg._attn_implementation = "eager"
    with torch.device(device):
        model = getattr(transformers, model_cls)(cfg).to(device=device, dtype=dtype).eval()
        ids = torch.randint(3, cfg.vocab_size, (spec["batch"], spec["seq"]))
    with torch.no_grad():
        x = model.get_input_embeddings()(ids).detach()
    x.requires_grad_(True)

    def logits():
        if kind == "llama":
            return model(inputs_embeds=x, logits_to_keep=1).logits[:, -1]
        return model(inputs_embeds=x).logits

    with torch.no_grad():
        index = logits().float().argmax(1, keepdim=True)

    def grad():
        (g,) = torch.autograd.grad(logits().gather(1, index).sum(), x)
        return g

    def lxt():
        out = logits().gather(1, index).sum()
        (g,) = torch.autograd.grad(out, x)
        return (x * g).detach()

    def measure(fn):
        times = []
        for rep in range(WARMUP + spec["repeats"]):
            result, t = timed(fn, device)
            del result
            if rep >= WARMUP:
                times.append(t)
        result, peak = peak_memory(fn, device)
        return statistics.median(times), peak, result

    t_fg, m_fg, _ = measure(grad)
    lxt_mod = importlib.import_module(f"lxt.efficient.models.{kind}")
    hf_mod = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    monkey_patch(hf_mod, patch_map=lxt_mod.attnLRP)
    t_lxt, m_lxt, rel = measure(lxt)
    result = dict(
        fg=t_fg,
        lxt=t_lxt,
        peak_fg=m_fg,
        peak_lxt=m_lxt,
        sum_rel=rel.float().flatten(1).sum(1).tolist(),
        finite=bool(torch.isfinite(rel).all()),
        versions=f"transformers {transformers.__version__}, torch {torch.__version__}, "
        f"lxt {importlib.metadata.version('lxt')}",
    )
    print("LXT_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: lxt_speed_worker.py SPEC_JSON (run by speed.py --lxt-python)")
    sys.exit(main(sys.argv[1]))

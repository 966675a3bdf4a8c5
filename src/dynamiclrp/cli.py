"""The ``dynamiclrp`` command line.

    dynamiclrp demo [--out DIR]                  explain the shipped digits CNN and sentiment model
    dynamiclrp explain-image MODEL IMAGE...      heatmaps of an image classifier
    dynamiclrp explain-text MODEL TEXT...        token relevance of a Hugging Face / shipped text model
    dynamiclrp evaluate --task digits            MoRF / LeRF perturbation scores of methods
    dynamiclrp coverage MODULE:CALLABLE          op coverage and promise statistics of one graph
    dynamiclrp coverage-table [--out FILE]       coverage of every zoo entry, as Markdown

Models come from local files only: ``shipped:digits`` / ``shipped:sentiment`` (the small models
in the package), ``module:callable`` (a function returning an ``nn.Module``), a state-dict file
or folder (``.safetensors``, or ``.pt``/``.pth``/``.bin`` read with ``torch.load(...,
weights_only=True)``) with ``--arch module:callable``, ``tv:NAME`` (torchvision) with ``--weights
FILE``, or a Hugging Face folder / cache name for ``explain-text``.  Nothing is downloaded unless
``--allow-download`` is given.  Errors print one message and exit with status 2 (``--debug``
shows the traceback).

For ``coverage`` the callable takes no arguments and returns ``(output, inputs)``: the output
tensor of a forward pass (2-D ``(batch, classes)``, or anything with ``--target none``) and the
tensor(s) to explain.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import DynamicLRPError
from .loading import (  # noqa: F401  (re-exported: the commands' loaders)
    WEIGHT_SUFFIXES,
    CLIError,
    _as_module,
    _cwd_on_path,
    _display,
    _floats,
    _import_callable,
    _load,
    _size,
    _weights_file,
    load_image_model,
    load_state_dict,
    preprocess,
    read_image,
)

DEMO_SENTENCES = (
    "the cast was excellent",
    "the film was not good",
    "this movie was not terrible",
    "a dull story with terrible dialogue",
)
DEMO_DIGITS = (0, 3, 7, 9)

# -- summaries --------------------------------------------------------------------------------------


def books_line(report: Any) -> str:
    """One line of a :class:`~dynamiclrp.RelevanceReport`: where the seeded relevance went."""
    inputs = sum(v for v, b in zip(report.inputs, report.in_books, strict=True) if b)
    return (
        f"books: seeded {report.seeded:.4g} = inputs {inputs:.4g} + absorbed {report.absorbed:.3g}"
        f" + unrequested {report.unrequested:.3g} + stabiliser {report.stabiliser:.3g}"
        f" + rule {report.rule:.3g}; residual {report.residual:.2g}"
    )


def top_share(relevance: Tensor, fraction: float) -> float:
    """Share of the positive relevance held by the top ``fraction`` of features (NaN if none)."""
    pos = relevance.detach().double().flatten().clamp_min(0)
    total = float(pos.sum())
    if total <= 0:
        return math.nan
    k = max(1, round(fraction * pos.numel()))
    return float(pos.topk(k).values.sum()) / total


def top_tokens(tokens: list[str], relevance: Tensor, k: int = 3) -> str:
    """``'word' 61%, ...``: the ``k`` tokens with the most positive relevance and their share."""
    pos = relevance.detach().double().clamp_min(0)
    total = float(pos.sum())
    if total <= 0:
        return "no token has positive relevance"
    order = pos.argsort(descending=True)[:k].tolist()
    return ", ".join(f"{tokens[i]!r} {100 * float(pos[i]) / total:.0f}%" for i in order)


def _terminal(tokens: list[str], scores: Tensor, color: str) -> str:
    from . import viz

    use = color == "always" or (
        color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ
    )
    return viz.token_terminal(tokens, scores, color=use, word_pieces="none")


def _out_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"cannot create the output folder {path!r}: {err}") from err
    return out


def _target(text: str, output: Tensor) -> Tensor:
    if text == "argmax":
        return output.detach().argmax(-1)
    try:
        return torch.full((output.shape[0],), int(text), dtype=torch.long)
    except ValueError as err:
        raise CLIError(f"--target must be 'argmax' or a class index, got {text!r}") from err


# -- commands ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Explain the shipped digits CNN and sentiment transformer; write a PNG and an HTML file."""
    import dynamiclrp

    from . import viz
    from .demo_models import digits_images, load_digits_model, load_sentiment_model

    out = _out_dir(args.out)
    lrp = dynamiclrp.LRP(args.rules)

    model, meta = load_digits_model()
    examples = [meta["examples"][d] for d in DEMO_DIGITS]
    x = digits_images([e["pixels"] for e in examples]).requires_grad_(True)
    logits = model(x)
    pred = logits.detach().argmax(-1)
    rel = lrp.explain(logits, x, target=pred)
    prob = logits.detach().softmax(-1).max(-1).values
    print(
        f"digits CNN (shipped, test accuracy {100 * meta['test_accuracy']:.1f}% on "
        f"{meta['n_test']} held-out digits), rules {lrp.rules.name!r}:"
    )
    print(f"  {books_line(lrp.report)}")
    tiles = []
    for i, e in enumerate(examples):
        r = rel[i].detach()
        negative = float(r.clamp_max(0).abs().sum() / r.abs().sum().clamp_min(1e-30))
        print(
            f"  digit {e['label']}: predicted {int(pred[i])} (p={float(prob[i]):.2f}); the top 10% "
            f"of pixels hold {100 * top_share(r, 0.1):.0f}% of the positive relevance; "
            f"{100 * negative:.0f}% of |relevance| is negative (evidence against)"
        )
        tiles += [_display(x[i].detach()), viz.heatmap(rel[i])]
    png = viz.save_png(viz.image_grid(tiles, ncols=4, pad=1), out / "digits.png", upscale=16)

    model_t, tok, meta_t = load_sentiment_model()
    print(
        f"\nsentiment transformer (shipped, test accuracy {100 * meta_t['test_accuracy']:.1f}% "
        "on generated sentences); token relevance at the embeddings, red = for the prediction:"
    )
    rows_tokens, rows_scores, titles = [], [], []
    for text in DEMO_SENTENCES:
        tokens, ids = tok.encode(text)
        emb = model_t.embed(ids).detach().requires_grad_(True)
        logits_t = model_t.classify(emb)
        c = int(logits_t.argmax(-1))
        r = lrp.explain(logits_t, emb, target=c).sum(-1)[0]
        label = meta_t["labels"][c]
        p = float(logits_t.detach().softmax(-1)[0, c])
        print(f"  {text!r}: {label} (p={p:.2f}); top tokens {top_tokens(tokens, r)}")
        print("    " + _terminal(tokens, r, args.color).replace("\n", "\n    "))
        print(f"    {books_line(lrp.report)}")
        rows_tokens.append(tokens)
        rows_scores.append(r.detach())
        titles.append(f"{label} (p={p:.2f})")
    html = viz.token_html(
        rows_tokens,
        [s.numpy() for s in rows_scores],
        title="dynamiclrp demo: sentiment transformer; " + ", ".join(titles),
        word_pieces="none",
    )
    page = viz.save_html(html, out / "sentiment.html")
    print(
        "\nbooks: what the output seeded = what reached the input + what biases and constants "
        "absorbed + stabiliser loss + what non-conserving rules (softmax, attention) changed; "
        "the residual is ~0 when every share is accounted for"
    )
    print(f"wrote {png} (input | relevance of each digit, red = for the prediction) and {page}")
    return 0


def cmd_explain_image(args: argparse.Namespace) -> int:
    """Explain an image classifier on image files; write input | heatmap PNGs and .npy relevance."""
    import dynamiclrp

    from . import viz

    shipped = args.model == "shipped:digits"
    channels = args.channels if args.channels is not None else (1 if shipped else 3)
    size = _size(args.size) or ((8, 8) if shipped else None)
    mean, std = _floats(args.mean, "--mean"), _floats(args.std, "--std")
    model = load_image_model(
        args.model, arch=args.arch, weights=args.weights, allow_download=args.allow_download
    )
    lrp = dynamiclrp.LRP(args.rules)
    for path in args.images:
        shown, x = preprocess(read_image(path, channels, args.scale), size, mean, std)
        x.requires_grad_(True)
        with dynamiclrp.record(model) as rec:
            try:
                logits = model(x)
            except RuntimeError as err:
                raise CLIError(
                    f"the model's forward pass failed on {path!r} (input shape "
                    f"{tuple(x.shape)}; see --size, --channels): {str(err).splitlines()[0]}"
                ) from err
        if not isinstance(logits, Tensor) or logits.dim() != 2:
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise CLIError(f"the model returned {got}; explain-image needs (1, classes) logits")
        target = _target(args.target, logits)
        rel = lrp.explain(logits, x, target=target, recording=rec)[0]
        pred, t = int(logits.detach().argmax(-1)), int(target[0])
        prob = float(logits.detach().softmax(-1)[0, t])
        stem = Path(path).stem
        out = _out_dir(args.out)  # created once there is something to write
        png = viz.save_png(
            viz.image_grid([_display(shown), viz.heatmap(rel)], ncols=2, pad=1),
            out / f"{stem}_relevance.png",
            upscale=max(1, 256 // max(shown.shape[-2:])),
        )
        npy = out / f"{stem}_relevance.npy"
        np.save(npy, rel.detach().numpy())
        print(
            f"{path}: predicted {pred}, explained class {t} (p={prob:.3f}); top 10% of pixels "
            f"hold {100 * top_share(rel.sum(0), 0.1):.0f}% of the positive relevance"
        )
        print(f"  {books_line(lrp.report)}")
        print(f"  wrote {png} (input | relevance) and {npy}")
    return 0


def cmd_explain_text(args: argparse.Namespace) -> int:
    """Explain a text classifier / language model; print coloured tokens and write HTML."""
    from . import viz

    if args.model == "shipped:sentiment":
        rows = _explain_shipped_text(args)
    else:
        rows = _explain_hf_text(args)
    out = _out_dir(args.out)
    pages = []
    for i, (text, tokens, scores, label, report) in enumerate(rows):
        print(f"{text!r}: explained {label}; top tokens {top_tokens(tokens, scores)}")
        print("  " + _terminal(tokens, scores, args.color).replace("\n", "\n  "))
        print(f"  {books_line(report)}")
        html = viz.token_html(tokens, scores.numpy(), title=f"{text} -> {label}")
        pages.append(viz.save_html(html, out / f"text_{i}.html"))
    print("wrote " + ", ".join(str(p) for p in pages))
    return 0


def _explain_shipped_text(args: argparse.Namespace) -> list[tuple]:
    import dynamiclrp

    from .demo_models import load_sentiment_model

    model, tok, meta = load_sentiment_model()
    lrp = dynamiclrp.LRP(args.rules)
    rows = []
    for text in args.texts:
        unknown = tok.unknown(text)
        if unknown:
            print(f"note: not in the shipped model's vocabulary, read as [UNK]: {unknown}")
        tokens, ids = tok.encode(text)
        if ids.shape[1] > model.max_len:
            raise CLIError(
                f"{text!r} has {ids.shape[1]} tokens; the shipped sentiment model reads at most "
                f"{model.max_len} ([CLS] and [SEP] included)"
            )
        emb = model.embed(ids).detach().requires_grad_(True)
        logits = model.classify(emb)
        target = _target(args.target, logits)
        rel = lrp.explain(logits, emb, target=target).sum(-1)[0].detach()
        c = int(target[0])
        if not 0 <= c < len(meta["labels"]):
            raise CLIError(
                f"--target {c} is not a class of the model (0..{len(meta['labels']) - 1})"
            )
        p = float(logits.detach().softmax(-1)[0, c])
        rows.append((text, tokens, rel, f"{meta['labels'][c]} (p={p:.2f})", lrp.report))
    return rows


def _explain_hf_text(args: argparse.Namespace) -> list[tuple]:
    from . import hf

    try:
        import transformers  # noqa: F401
    except ImportError as err:
        raise CLIError("explain-text on a Hugging Face model needs transformers") from err
    looks_like_path = args.model.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(
        args.model
    )
    if looks_like_path and not Path(args.model).expanduser().exists():
        raise CLIError(f"model folder {args.model!r} does not exist")
    try:
        model, tokenizer = hf.load(
            str(Path(args.model).expanduser()) if looks_like_path else args.model,
            args.task,
            allow_download=args.allow_download,
        )
    except (OSError, ValueError) as err:
        hint = "" if args.allow_download else " (local files only: --allow-download to fetch)"
        raise CLIError(
            f"cannot load a Hugging Face model from {args.model!r}{hint}: "
            f"{str(err).strip().splitlines()[0]}"
        ) from err
    target: Any = None
    if args.target != "argmax":
        target = int(args.target) if args.target.lstrip("-").isdigit() else args.target
    rows = []
    for text in args.texts:
        inp: Any = text if args.context is None else (text, args.context)
        ex = hf.explain_text(model, tokenizer, inp, task=args.task, target=target, rules=args.rules)
        keep = ex.attention_mask[0].bool()
        tokens = [t for t, k in zip(ex.tokens[0], keep.tolist(), strict=True) if k]
        scores = ex.token_relevance[0][keep].detach()
        label = ex.target_label[0] if ex.target_label else str(ex.target)
        if ex.answer is not None:
            label = f"answer {ex.answer[0]!r}"
        rows.append((text, tokens, scores, label, ex.report))
    return rows


def cmd_evaluate(args: argparse.Namespace) -> int:
    """MoRF / LeRF perturbation curves of a few methods on a shipped model (``docs/evaluation.md``)."""
    import dynamiclrp

    from .evaluation import make_method
    from .evaluation.perturbation import image_perturbation, token_perturbation
    from .evaluation.task import feature_relevance

    if args.n < 2:
        raise CLIError(f"--n must be at least 2 (standard errors need two samples), got {args.n}")
    task = _digits_task(args.n) if args.task == "digits" else _sentiment_task(args.n)
    idx = torch.arange(len(task))
    problem = task.problem(idx)

    def score(inputs: Tensor, rows: Tensor) -> Tensor:
        x = task.to_x(inputs)
        return task.forward(x, rows).softmax(-1)[torch.arange(len(rows)), task.targets[rows]]

    print(
        f"task {task.name}: {len(task)} samples; model accuracy {100 * task.info['accuracy']:.1f}% "
        f"on {task.info['n_accuracy']} test samples; "
        + (
            f"pixels replaced by the image mean, {args.steps} steps"
            if task.kind == "image"
            else "tokens replaced by [MASK] one at a time"
        )
    )
    print(f"{'method':<26} {'ABPC':>16} {'AUC MoRF':>9} {'AUC LeRF':>9}")
    for name in args.methods.split(","):
        name = name.strip()
        spec = f"dynamiclrp:{'dynamiclrp' if name == 'dynamiclrp' else name}"
        spec = spec if name in dynamiclrp.PRESETS or name == "dynamiclrp" else name
        try:
            method = make_method(spec)
        except ValueError as err:
            raise CLIError(str(err)) from err
        rel = feature_relevance(method(problem), task.kind)
        if task.kind == "image":
            res = image_perturbation(
                score, task.inputs, rel, steps=args.steps, replacement="mean", batch_size=256
            )
        else:
            res = token_perturbation(
                score,
                task.inputs,
                rel,
                replacement_id=task.replacement_id,
                rankable=task.rankable,
                per_step=1,
                batch_size=256,
            )
        s = res.summary()
        print(
            f"{name:<26} {s['abpc']:>+8.3f} ± {s['abpc_se']:.3f} "
            f"{s['auc_morf']:>9.3f} {s['auc_lerf']:>9.3f}"
        )
    print("ABPC = AUC(LeRF) - AUC(MoRF) of the target probability; higher is better")
    return 0


def _digits_task(n: int) -> Any:
    from .demo_models import digits_images, digits_split, load_digits_model
    from .evaluation.task import Task

    model, meta = load_digits_model()
    pixels, labels, _, test = digits_split(meta["split"]["seed"], meta["split"]["test_fraction"])
    if n > len(test):
        raise CLIError(f"--n {n} is more than the {len(test)} test digits")
    x = digits_images(pixels[test])
    with torch.no_grad():
        pred = model(x).argmax(-1)
    acc = float((pred == labels[test]).double().mean())
    return Task(
        name="digits (shipped CNN, 8x8)",
        kind="image",
        model=model,
        inputs=x[:n],
        targets=pred[:n],
        labels=labels[test][:n],
        to_x=lambda t: t,
        forward=lambda x_, idx: model(x_),
        replacement="mean",
        info={"accuracy": acc, "n_accuracy": len(test)},
    )


def _sentiment_task(n: int) -> Any:
    from .demo_models import load_sentiment_model
    from .evaluation import synthetic_text as st
    from .evaluation.task import Task

    model, _, meta = load_sentiment_model()
    d = meta["data"]
    data = st.sentiment_data(
        max(n, 500), seed=d["test_seed"], min_words=d["min_words"], max_words=d["max_words"]
    )
    with torch.no_grad():
        pred = model(data.ids, data.mask).argmax(-1)
    acc = float((pred == data.labels).double().mean())
    mask = data.mask[:n]
    return Task(
        name="sentiment (shipped transformer)",
        kind="tokens",
        model=model,
        inputs=data.ids[:n],
        targets=pred[:n],
        labels=data.labels[:n],
        to_x=model.embed,
        forward=lambda x_, idx: model.classify(x_, mask[idx]),
        rankable=data.rankable[:n],
        replacement_id=data.vocab.mask_id,
        evidence=data.evidence[:n],
        info={"accuracy": acc, "n_accuracy": len(data)},
    )


def cmd_coverage(args: argparse.Namespace) -> int:
    from . import coverage

    output, inputs = _load(args.spec)()
    if args.target == "none":
        target = None
    elif args.target == "argmax":
        target = output.detach().argmax(-1) if output.dim() == 2 else None
    else:
        target = int(args.target)
    print(coverage(output, inputs, target, rules=args.rules))
    return 0


def cmd_coverage_table(args: argparse.Namespace) -> int:
    from .zoo import coverage_table

    text = coverage_table()
    if args.out:
        from pathlib import Path

        from .zoo import ZOO_TABLE_END

        old = Path(args.out).read_text() if Path(args.out).exists() else ""
        if ZOO_TABLE_END in old:  # keep the census and record() sections other scripts write
            text = text + old.split(ZOO_TABLE_END, 1)[1].lstrip("\n")
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


# -- the parser -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``dynamiclrp`` argument parser (one sub-command per ``cmd_*`` function)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser = argparse.ArgumentParser(
        prog="dynamiclrp",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help: str) -> Any:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=fn)
        return p

    def rules(p: argparse.ArgumentParser) -> None:
        p.add_argument("--rules", default="dynamiclrp", help="rule preset (docs/presets.md)")

    def color(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--color", choices=("auto", "always", "never"), default="auto",
            help="colour tokens in the terminal (auto: if stdout is a terminal and NO_COLOR unset)",
        )  # fmt: skip

    demo = add("demo", cmd_demo, "explain the shipped digits CNN and sentiment model (offline)")
    demo.add_argument("--out", default="dynamiclrp-demo", help="output folder")
    rules(demo)
    color(demo)

    img = add("explain-image", cmd_explain_image, "explain an image classifier on image files")
    img.add_argument(
        "model",
        help="shipped:digits, MODULE:CALLABLE, a weights file/folder (with --arch), or tv:NAME",
    )
    img.add_argument("images", nargs="+", help="image files (PNG/JPEG with Pillow) or .npy arrays")
    img.add_argument("--arch", help="MODULE:CALLABLE building the architecture for a weights file")
    img.add_argument("--weights", help="state dict (.safetensors, .pt) to load into the model")
    img.add_argument("--allow-download", action="store_true", help="tv:NAME default weights")
    img.add_argument("--target", default="argmax", help="'argmax' or a class index")
    img.add_argument("--size", help="resize to N or HxW before the model")
    img.add_argument("--mean", help="per-channel mean to subtract, e.g. 0.485,0.456,0.406")
    img.add_argument("--std", help="per-channel std to divide by, e.g. 0.229,0.224,0.225")
    img.add_argument("--scale", type=float, help="multiply pixel values (default 1/255 for ints)")
    img.add_argument("--channels", type=int, help="channels the model takes (default 3; digits 1)")
    img.add_argument("--out", default="dynamiclrp-out", help="output folder")
    rules(img)

    txt = add("explain-text", cmd_explain_text, "explain a text model (Hugging Face or shipped)")
    txt.add_argument("model", help="shipped:sentiment, or a Hugging Face folder / cached name")
    txt.add_argument("texts", nargs="+", help="texts to explain, one explanation each")
    txt.add_argument(
        "--task", choices=("sequence-classification", "causal-lm", "question-answering", "seq2seq"),
        help="what the model does (default: from its config)",
    )  # fmt: skip
    txt.add_argument("--target", default="argmax", help="'argmax', a class index, label or token")
    txt.add_argument("--context", help="question answering: the context (TEXT is the question)")
    txt.add_argument("--allow-download", action="store_true", help="let transformers download")
    txt.add_argument("--out", default="dynamiclrp-out", help="output folder")
    rules(txt)
    color(txt)

    ev = add("evaluate", cmd_evaluate, "perturbation (MoRF/LeRF) scores on a shipped model")
    ev.add_argument("--task", choices=("digits", "sentiment"), default="digits")
    ev.add_argument(
        "--methods", default="dynamiclrp,epsilon,random",
        help="comma-separated presets or evaluation methods (dynamiclrp.evaluation.available_methods)",
    )  # fmt: skip
    ev.add_argument("--n", type=int, default=32, help="samples (first test samples)")
    ev.add_argument("--steps", type=int, default=16, help="image perturbation steps")

    cov = add("coverage", cmd_coverage, "op coverage and promise statistics of one graph")
    cov.add_argument("spec", help="MODULE:CALLABLE returning (output, inputs), or zoo:NAME")
    cov.add_argument("--target", default="argmax", help="'argmax' (per row), 'none', or an int")
    rules(cov)
    table = add("coverage-table", cmd_coverage_table, "coverage of every zoo entry, as Markdown")
    table.add_argument("--out", help="write the table to this file (default: print it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns 0, or exits with status 2 and one message on an error."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DynamicLRPError, OSError, ImportError, ValueError) as err:
        if args.debug:
            raise
        kind = "" if isinstance(err, CLIError) else f"{type(err).__name__}: "
        print(f"dynamiclrp {args.command}: error: {kind}{err}", file=sys.stderr)
        if not isinstance(err, CLIError):
            print("(run with --debug for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())

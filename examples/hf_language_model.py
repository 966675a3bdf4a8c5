"""Explain a Hugging Face language model's next token: which prompt tokens made it likely.

By default the model is a tiny ``LlamaForCausalLM`` (2 layers, width 32) with a byte-level BPE
tokenizer, both built locally (``examples/tiny_hf.py``; nothing is downloaded), and trained for
about a second on the 18 sentences of ``tiny_hf.CORPUS`` (``--train-steps``; 0 keeps the random
weights).  It memorises them, so "The capital of France is" -> " Paris" and the relevance is
worth reading; the graph is a real Llama's: rotary embeddings, RMSNorm, grouped-query attention,
SwiGLU.  ``--model PATH`` explains a checkpoint you have on disk instead (any causal LM folder
written by ``save_pretrained``, or a name already in the local Hugging Face cache), opened with
``dynamiclrp.hf.load``, which never downloads.

``dynamiclrp.hf.explain_text`` runs the model on the prompt and explains the logit of the next
token (the argmax, or ``--target``) at the last prompt position.  The script prints

- the predicted and the explained token with its logit;
- the prompt with each token coloured by relevance (red positive, blue negative; ``--no-color``
  prints ``token[+0.12]`` instead) and the words with their relevance;
- the books: the seed equals the explained logit of a plain forward pass (checked), and seeded =
  tokens + absorbed + stabiliser + rule, with a residual ~0 (checked);

and writes ``next_token.html`` (tokens coloured, hover for scores) into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dynamiclrp import hf, viz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local causal-LM folder or cached name (default: tiny)")
    parser.add_argument("--text", default="The capital of France is", help="the prompt")
    parser.add_argument("--target", help="token to explain (default: the predicted one)")
    parser.add_argument("--rules", default="attnlrp", help="preset name (docs/presets.md)")
    parser.add_argument("--train-steps", type=int, default=100, help="tiny model: training steps")
    parser.add_argument("--out", default="out_hf_language_model", help="folder for the HTML")
    parser.add_argument("--no-color", action="store_true", help="print scores, not colours")
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.model is None:
        from tiny_hf import bpe_tokenizer, tiny_llama, train_causal_lm  # examples/tiny_hf.py

        tokenizer = bpe_tokenizer()
        model = tiny_llama(tokenizer)
        loss = train_causal_lm(model, tokenizer, args.train_steps)
        print(
            f"model: tiny Llama, {sum(p.numel() for p in model.parameters())} parameters, "
            f"trained {args.train_steps} steps (loss {loss:.3f})"
        )
    else:
        model, tokenizer = hf.load(args.model, task="causal-lm")
        print(f"model: {type(model).__name__} from {args.model}")

    ex = hf.explain_text(
        model, tokenizer, args.text, task="causal-lm", target=args.target, rules=args.rules
    )
    predicted = tokenizer.decode([int(ex.prediction[0])])
    explained = tokenizer.decode([int(ex.target[0])])
    logit = float(ex.explained_logit[0])
    print(f"predicted next token: {predicted!r}; explained: {explained!r}, logit {logit:.6f}")

    keep = ex.attention_mask[0].bool()
    tokens = [t for t, k in zip(ex.tokens[0], keep.tolist(), strict=True) if k]
    scores = ex.token_relevance[0][keep]
    print(viz.token_terminal(tokens, scores, color=not args.no_color))
    print(
        "words: "
        + "  ".join(
            f"{w}={s:+.4f}" for w, s in zip(ex.words[0], ex.word_relevance[0].tolist(), strict=True)
        )
    )
    print(ex.report)

    # Independent of the explanation: the logit of a plain forward pass.
    enc = tokenizer(args.text, return_tensors="pt")
    with torch.no_grad():
        plain = model(**enc.to(next(model.parameters()).device)).logits[0, -1, int(ex.target[0])]
    seed_ok = abs(ex.report.seeded - float(plain)) <= 1e-4 * max(1.0, abs(float(plain)))
    books_ok = abs(ex.report.residual) <= 1e-5 * max(1.0, abs(ex.report.seeded))
    print(f"seed = logit of a plain forward pass ({float(plain):.6f}): {seed_ok}")
    print(
        f"books close (residual {ex.report.residual:.2g}): {books_ok}; token relevance sums to "
        f"{float(scores.sum()):.6f}"
    )

    path = viz.save_html(
        ex.html(words=False, title=f"{args.text} -> {explained}"), out_dir / "next_token.html"
    )
    print(f"wrote {path}")
    if not (seed_ok and books_ok):
        raise SystemExit("a check failed (see above)")


if __name__ == "__main__":
    main()

"""Tiny Hugging Face models and tokenizers built locally, for the examples and the README.

Nothing is downloaded: the tokenizers are trained in a fraction of a second on the small corpus
below with the ``tokenizers`` library, and the models are ``transformers`` models (2 layers,
width 32) trained for a second or two on a few sentences each: the classifier on the sentiment of
:data:`REVIEWS`, the Llama on :data:`CORPUS` (it memorises it: "The capital of France is" ->
" Paris"), the question-answering BERT on :data:`QUESTIONS`.  They are toys that fit their few
examples; their graphs are those of the real architectures.

Run it to write three model folders (``save_pretrained`` format, safetensors weights) that
``dynamiclrp.hf.load`` opens like any local checkpoint::

    python examples/tiny_hf.py --out tiny_models
    # tiny_models/classifier  BertForSequenceClassification + WordPiece tokenizer
    # tiny_models/llama       LlamaForCausalLM + byte-level BPE tokenizer
    # tiny_models/qa          BertForQuestionAnswering + WordPiece tokenizer
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CORPUS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Paris is a city on the Seine; Rome is a city on the Tiber.",
    "The film was not good, but the actors were great.",
    "I loved the plot and hated the ending of the movie.",
    "Who wrote the book? The book was written by a famous author.",
    "Where is the Eiffel Tower? The Eiffel Tower is in Paris.",
    "A small model can be explained layer by layer, relevance flows back to the tokens.",
    "The cat sat on the mat, the dog slept under the table.",
]
REVIEWS = [  # (text, label): 1 positive, 0 negative
    ("the film was great", 1),
    ("i loved the plot", 1),
    ("the actors were great", 1),
    ("a great movie, i loved it", 1),
    ("the ending was good", 1),
    ("the film was not good", 0),
    ("i hated the ending", 0),
    ("the plot was bad", 0),
    ("a bad movie, i hated it", 0),
    ("the actors were not great", 0),
]
QUESTIONS = [  # (question, context, answer); the answer occurs once in the context
    ("Where is the Eiffel Tower?", "The Eiffel Tower is in Paris.", "Paris"),
    ("What is the capital of Italy?", "The capital of Italy is Rome.", "Rome"),
    ("What is the capital of France?", "The capital of France is Paris.", "Paris"),
    ("Where did the cat sit?", "The cat sat on the mat.", "the mat"),
    ("Where did the dog sleep?", "The dog slept under the table.", "under the table"),
    ("Who wrote the book?", "The book was written by a famous author.", "a famous author"),
]
CORPUS += [text for text, _ in REVIEWS]
SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2 / Llama style ``Ġ`` word markers) with a ``<s>`` BOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def wordpiece_tokenizer():
    """A lower-casing WordPiece tokenizer (BERT style: ``[CLS] A [SEP] B [SEP]``, ``##`` pieces)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300,
        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def tiny_llama(tokenizer, seed: int = 0):
    """A 2-layer ``LlamaForCausalLM`` with random weights for ``tokenizer``'s vocabulary."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **SMALL,
    )
    return transformers.LlamaForCausalLM(config).eval()


def _fit(model, batch: dict, steps: int, lr: float = 1e-2) -> float:
    """Full-batch Adam on ``model(**batch).loss`` for ``steps`` steps; the model ends in eval
    mode; returns the last loss (``nan`` for 0 steps)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss = torch.tensor(float("nan"))
    model.train()
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def train_causal_lm(model, tokenizer, steps: int) -> float:
    """Train a causal LM on :data:`CORPUS` (about a second for 100 steps on a CPU)."""
    enc = tokenizer(CORPUS, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return _fit(model, {**enc, "labels": labels}, steps)


def train_classifier(model, tokenizer, steps: int) -> float:
    """Train a sequence classifier on :data:`REVIEWS`."""
    enc = tokenizer([t for t, _ in REVIEWS], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in REVIEWS])
    return _fit(model, {**enc, "labels": labels}, steps)


def train_qa(model, tokenizer, steps: int) -> float:
    """Train an extractive QA model on :data:`QUESTIONS` (answer span from character offsets)."""
    questions, contexts, answers = zip(*QUESTIONS, strict=True)
    enc = tokenizer(list(questions), list(contexts), padding=True, return_tensors="pt")
    starts, ends = [], []
    for row, (context, answer) in enumerate(zip(contexts, answers, strict=True)):
        first = context.index(answer)
        starts.append(enc.char_to_token(row, first, sequence_index=1))
        ends.append(enc.char_to_token(row, first + len(answer) - 1, sequence_index=1))
    batch = {**enc, "start_positions": torch.tensor(starts), "end_positions": torch.tensor(ends)}
    return _fit(model, batch, steps)


def tiny_bert(tokenizer, head: str, seed: int = 0):
    """A 2-layer BERT with random weights: ``head`` is ``"classifier"`` (2 labels) or ``"qa"``."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        **SMALL,
    )
    cls = {
        "classifier": transformers.BertForSequenceClassification,
        "qa": transformers.BertForQuestionAnswering,
    }[head]
    return cls(config).eval()


def save_tiny_models(out: str | Path, steps: int = 100) -> dict[str, tuple[Path, float]]:
    """Write ``classifier``, ``llama`` and ``qa`` model folders (with tokenizers) under ``out``,
    each trained for ``steps`` steps (0: random weights); returns ``name -> (path, last loss)``."""
    out = Path(out)
    wordpiece, bpe = wordpiece_tokenizer(), bpe_tokenizer()
    made = {
        "classifier": (tiny_bert(wordpiece, "classifier"), wordpiece, train_classifier),
        "llama": (tiny_llama(bpe), bpe, train_causal_lm),
        "qa": (tiny_bert(wordpiece, "qa"), wordpiece, train_qa),
    }
    paths = {}
    for name, (model, tokenizer, train) in made.items():
        loss = train(model, tokenizer, steps)
        path = out / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = (path, loss)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="tiny_models", help="folder to write the models into")
    parser.add_argument("--steps", type=int, default=100, help="training steps (0: random)")
    args = parser.parse_args()
    for name, (path, loss) in save_tiny_models(args.out, args.steps).items():
        print(f"{name:<10} {path}  (trained {args.steps} steps, loss {loss:.3f})")


if __name__ == "__main__":
    main()

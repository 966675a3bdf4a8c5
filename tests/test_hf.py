"""dynamiclrp.hf: explain Hugging Face text models from text (tiny random-weight models, a
WordPiece tokenizer built here with ``tokenizers``; nothing is downloaded).

Oracles: the relevance equals ``dynamiclrp.explain`` on embeddings built by hand and passed as
``inputs_embeds=`` (a route that does not use the hook); left and right padding give the same
relevance for the real tokens; a padded batch equals each row alone; word scores equal sums by
hand; a bias-free model under ``cp-lrp`` conserves the logit at the tokens, and the books close
with the logit of a plain forward pass as the seed; QA spans are found by brute force.
"""

from __future__ import annotations

import pytest
import torch

import dynamiclrp
from dynamiclrp import hf

T = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<s>"]
WORDS = (
    "the a film was not good bad great movie plot actor who where is paris capital of france "
    "city play ##s ##ing ##ed un ##like ##ly love hate"
).split()
VOCAB = len(SPECIAL) + len(WORDS)  # 33: the models' vocabulary is the tokenizer's
SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
TEXTS = ["the film was unlikely good", "bad plot"]


def make_tokenizer(template: str = "bert", side: str = "right"):
    """A fast WordPiece tokenizer. template: "bert" ([CLS] A [SEP], pairs), "bos" (<s> A),
    "eos" (A [SEP]) or "none"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    kw = {}
    if template == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
        )
        kw = dict(
            cls_token="[CLS]",
            sep_token="[SEP]",
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
        )
    elif template == "bos":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 4)]
        )
        kw = dict(bos_token="<s>")
    elif template == "eos":
        tok.post_processor = processors.TemplateProcessing(
            single="$A [SEP]", special_tokens=[("[SEP]", 3)]
        )
        kw = dict(eos_token="[SEP]")
    return T.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", padding_side=side, **kw
    )


def tiny(model_cls: str, config_cls: str, **config):
    torch.manual_seed(0)
    cfg = getattr(T, config_cls)(**config)
    return getattr(T, model_cls)(cfg).double().eval()


@pytest.fixture(scope="module")
def bert():
    return tiny("BertForSequenceClassification", "BertConfig", vocab_size=VOCAB, **SMALL)


@pytest.fixture(scope="module")
def llama():
    return tiny("LlamaForCausalLM", "LlamaConfig", vocab_size=VOCAB, num_key_value_heads=2, **SMALL)


@pytest.fixture(scope="module")
def gpt2():
    return tiny(
        "GPT2LMHeadModel",
        "GPT2Config",
        vocab_size=VOCAB,
        n_layer=2,
        n_embd=32,
        n_head=4,
        n_positions=32,
        bos_token_id=4,
        eos_token_id=3,
    )


def hand(model, ids, mask, select, target, **extra):
    """dynamiclrp.explain on embeddings looked up by hand and fed as inputs_embeds=."""
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    with dynamiclrp.record(model) as rec:
        out = model(inputs_embeds=x, attention_mask=mask, **extra)
    return dynamiclrp.explain(select(out), x, target=target, recording=rec), select(out).detach()


# -- sequence classification --------------------------------------------------------------------


def test_classification_equals_explain_on_hand_built_embeddings(bert):
    tok = make_tokenizer()
    ex = hf.explain_text(bert, tok, TEXTS)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = bert(**enc).logits
    pred = logits.argmax(-1)
    rel, _ = hand(
        bert,
        enc.input_ids,
        enc.attention_mask,
        lambda o: o.logits,
        pred,
        token_type_ids=enc.token_type_ids,
    )
    assert ex.task == "sequence-classification"
    assert torch.equal(ex.target, pred) and torch.equal(ex.prediction, pred)
    torch.testing.assert_close(ex.relevance, rel, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ex.token_relevance, rel.sum(-1), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ex.explained_logit, logits[torch.arange(2), pred])
    # the books: seeded = the logit of a plain forward pass; they close
    assert ex.report.seeded == pytest.approx(float(logits[torch.arange(2), pred].sum()), rel=1e-12)
    assert abs(ex.report.residual) < 1e-12
    # other class by index and by label name
    ex0 = hf.explain_text(bert, tok, TEXTS, target="LABEL_0")
    rel0, _ = hand(
        bert,
        enc.input_ids,
        enc.attention_mask,
        lambda o: o.logits,
        0,
        token_type_ids=enc.token_type_ids,
    )
    torch.testing.assert_close(ex0.relevance, rel0, rtol=1e-10, atol=1e-13)
    assert ex0.target.tolist() == [0, 0] and ex0.target_label == ["LABEL_0", "LABEL_0"]


def test_tokens_words_and_flags(bert):
    ex = hf.explain_text(bert, make_tokenizer(), TEXTS)
    assert ex.tokens[0] == ["[CLS]", "the", "film", "was", "un", "##like", "##ly", "good", "[SEP]"]
    assert (
        ex.tokens[1][:4] == ["[CLS]", "bad", "plot", "[SEP]"] and ex.tokens[1][4:] == ["[PAD]"] * 5
    )
    assert ex.words == [["the", "film", "was", "unlikely", "good"], ["bad", "plot"]]
    flags = [[1, 0, 0, 0, 0, 0, 0, 0, 1], [1, 0, 0, 1, 1, 1, 1, 1, 1]]
    assert ex.special_tokens_mask.tolist() == [[bool(f) for f in r] for r in flags]
    s = ex.token_relevance
    expected0 = torch.stack([s[0, 1], s[0, 2], s[0, 3], s[0, 4] + s[0, 5] + s[0, 6], s[0, 7]])
    torch.testing.assert_close(ex.word_relevance[0], expected0, rtol=0, atol=0)
    torch.testing.assert_close(ex.word_relevance[1], s[1, 1:3], rtol=0, atol=0)


def test_padded_batch_equals_rows_alone_roberta():
    # RoBERTa derives positions from the ids (padding-aware): the ids path must be kept
    model = tiny(
        "RobertaForSequenceClassification",
        "RobertaConfig",
        vocab_size=VOCAB,
        pad_token_id=0,
        max_position_embeddings=40,
        **SMALL,
    )
    tok = make_tokenizer()
    batch = hf.explain_text(model, tok, TEXTS, target=1)
    for b, text in enumerate(TEXTS):
        row = hf.explain_text(model, tok, text, target=1)
        n = row.token_ids.shape[1]
        torch.testing.assert_close(batch.relevance[b, :n], row.relevance[0], rtol=1e-9, atol=1e-12)
        assert batch.words[b] == row.words[0]
        torch.testing.assert_close(
            batch.word_relevance[b], row.word_relevance[0], rtol=1e-9, atol=1e-12
        )
        assert torch.all(batch.token_relevance[b, n:] == 0)


# -- causal LM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["bos", "none"])
def test_causal_lm_left_equals_right_padding_gpt2(gpt2, template):
    left = hf.explain_text(gpt2, make_tokenizer(template, "left"), TEXTS)
    right = hf.explain_text(gpt2, make_tokenizer(template, "right"), TEXTS)
    assert torch.equal(left.target, right.target)
    for b in range(2):
        real_l = left.attention_mask[b].bool()
        real_r = right.attention_mask[b].bool()
        torch.testing.assert_close(
            left.relevance[b][real_l], right.relevance[b][real_r], rtol=1e-9, atol=1e-12
        )
        assert left.words[b] == right.words[b]
    n1 = int(right.attention_mask[1].sum())
    assert left.position.tolist() == [left.token_ids.shape[1] - 1] * 2
    assert right.position.tolist() == [right.token_ids.shape[1] - 1, n1 - 1]


def test_causal_lm_equals_explain_on_the_row_alone(llama):
    tok = make_tokenizer("bos", "left")
    ex = hf.explain_text(llama, tok, TEXTS)
    for b, text in enumerate(TEXTS):
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            pred = llama(ids).logits[:, -1].argmax(-1)
        rel, logits = hand(llama, ids, torch.ones_like(ids), lambda o: o.logits[:, -1], pred)
        n = ids.shape[1]
        assert ex.target[b] == pred[0]
        torch.testing.assert_close(ex.relevance[b, -n:], rel[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(ex.explained_logit[b], logits[0, pred[0]])
        assert ex.target_label[b] == tok.convert_ids_to_tokens(int(pred))


def test_causal_lm_target_as_token_string_and_conservation(llama):
    tok = make_tokenizer("bos")
    ex = hf.explain_text(llama, tok, "the film was good", target="paris", rules="cp-lrp")
    pid = tok.convert_tokens_to_ids("paris")
    assert ex.target.tolist() == [pid]
    ids = tok("the film was good", return_tensors="pt").input_ids
    with torch.no_grad():
        logit = llama(ids).logits[0, -1, pid]
    # bias-free Llama, attention and gates held constant: the tokens get the whole logit
    assert float(ex.token_relevance.sum()) == pytest.approx(float(logit), rel=1e-6)
    with pytest.raises(dynamiclrp.TargetError, match="not one token"):
        hf.explain_text(llama, tok, "the film", target="paris france")
    with pytest.raises(dynamiclrp.TargetError, match="token id"):
        hf.explain_text(llama, tok, "the film", target=VOCAB)


# -- question answering -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qa():
    return tiny("BertForQuestionAnswering", "BertConfig", vocab_size=VOCAB, **SMALL)


QUESTION, CONTEXT = "where is paris", "paris is the capital city of france"


def test_qa_given_span_equals_hand_explanations(qa):
    tok = make_tokenizer()
    enc = tok(QUESTION, CONTEXT, return_tensors="pt")
    s, e = 8, 9
    assert tok.convert_ids_to_tokens(enc.input_ids[0, s : e + 1].tolist()) == ["capital", "city"]
    assert enc.token_type_ids[0].tolist() == [0] * 5 + [1] * 8
    ex = hf.explain_text(qa, tok, (QUESTION, CONTEXT), target=(s, e))
    extra = dict(token_type_ids=enc.token_type_ids)
    r_s, start_logits = hand(
        qa, enc.input_ids, enc.attention_mask, lambda o: o.start_logits, s, **extra
    )
    r_e, end_logits = hand(
        qa, enc.input_ids, enc.attention_mask, lambda o: o.end_logits, e, **extra
    )
    torch.testing.assert_close(ex.start.relevance, r_s, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ex.end.relevance, r_e, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ex.relevance, r_s + r_e, rtol=1e-10, atol=1e-13)
    assert ex.start.target.tolist() == [s] and ex.end.target.tolist() == [e]
    torch.testing.assert_close(ex.start.explained_logit, start_logits[:, s])
    torch.testing.assert_close(ex.end.explained_logit, end_logits[:, e])
    assert ex.answer == ["capital city"]
    pre = hf.explain_text(qa, tok, enc, target=(s, e))  # pre-tokenized: the answer is decoded
    assert pre.answer == ["capital city"]
    torch.testing.assert_close(pre.relevance, ex.relevance, rtol=0, atol=0)
    assert ex.words[0] == QUESTION.split() + CONTEXT.split()


def test_qa_default_span_is_best_context_span(qa):
    tok = make_tokenizer()
    pairs = [(QUESTION, CONTEXT), ("who is the actor", "the actor was not good")]
    ex = hf.explain_text(qa, tok, pairs)
    enc = tok([q for q, _ in pairs], [c for _, c in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = qa(**enc)
    for b, (_, context) in enumerate(pairs):
        ctx = [i for i, sid in enumerate(enc.sequence_ids(b)) if sid == 1]
        best = max(
            ((i, j) for i in ctx for j in ctx if i <= j),
            key=lambda p: float(out.start_logits[b, p[0]] + out.end_logits[b, p[1]]),
        )
        assert ex.target[b].tolist() == list(best)
        offs = enc.encodings[b].offsets
        assert ex.answer[b] == context[offs[best[0]][0] : offs[best[1]][1]]


# -- seq2seq ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t5():
    return tiny(
        "T5ForConditionalGeneration",
        "T5Config",
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=3,
    )


@pytest.fixture(scope="module")
def bart():
    return tiny(
        "BartForConditionalGeneration",
        "BartConfig",
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=4,
        eos_token_id=3,
        decoder_start_token_id=3,
    )


def _seq2seq_hand(model, ids, mask, dec, p, target):
    x = model.get_encoder().get_input_embeddings()(ids).detach().requires_grad_()
    y = model.get_decoder().get_input_embeddings()(dec).detach().requires_grad_()
    with dynamiclrp.record(model) as rec:
        out = model(
            inputs_embeds=x, attention_mask=mask, decoder_inputs_embeds=y, use_cache=False
        ).logits[:, p]
    rx, ry = dynamiclrp.explain(out, (x, y), target=target, recording=rec)
    return rx, ry, out.detach()


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_seq2seq_teacher_forced_equals_hand(name, request):
    model = request.getfixturevalue(name)
    tok = make_tokenizer("eos")
    src, tgt_text, p = "the film was good", "a great movie", 2
    ex = hf.explain_text(model, tok, src, target_text=tgt_text, position=p)
    labels = tok(text_target=tgt_text).input_ids  # a great movie [SEP]
    start = model.config.decoder_start_token_id
    dec = torch.tensor([[start] + labels[:p]])
    enc = tok(src, return_tensors="pt")
    rx, ry, logits = _seq2seq_hand(model, enc.input_ids, enc.attention_mask, dec, p, labels[p])
    assert ex.task == "seq2seq"
    assert ex.target.tolist() == [labels[p]] and ex.target_label == ["movie"]
    assert torch.equal(ex.decoder_token_ids, dec)
    torch.testing.assert_close(ex.relevance, rx, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ex.decoder_token_relevance, ry.sum(-1), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(ex.explained_logit, logits[:, labels[p]])
    assert abs(ex.report.residual) < 1e-12
    assert ex.words == [src.split()]


def test_seq2seq_greedy_token(t5):
    tok = make_tokenizer("eos")
    src, p = ["the film was good", "bad plot"], 2
    ex = hf.explain_text(t5, tok, src, position=p)
    enc = tok(src, padding=True, return_tensors="pt")
    dec = torch.zeros(2, 1, dtype=torch.long)  # decoder_start_token_id
    with torch.no_grad():
        for _ in range(p + 1):
            nxt = t5(**enc, decoder_input_ids=dec).logits[:, -1].argmax(-1, keepdim=True)
            dec = torch.cat([dec, nxt], 1)
    assert torch.equal(ex.decoder_token_ids, dec[:, : p + 1])
    assert torch.equal(ex.target, dec[:, p + 1]) and torch.equal(ex.prediction, ex.target)
    rx, _, _ = _seq2seq_hand(
        t5, enc.input_ids, enc.attention_mask, dec[:, : p + 1], p, dec[:, p + 1]
    )
    torch.testing.assert_close(ex.relevance, rx, rtol=1e-10, atol=1e-13)


# -- words --------------------------------------------------------------------------------------


def test_merge_word_pieces_by_hand():
    tokens = ["[CLS]", "un", "##like", "##ly", "good", "[SEP]", "pa", "##ris", "[SEP]", "[PAD]"]
    scores = torch.tensor([9.0, 1.0, 2.0, 4.0, 8.0, 9.0, 16.0, 32.0, 9.0, 9.0])
    word_ids = [None, 0, 0, 0, 1, None, 0, 0, None, None]
    seq = [None, 0, 0, 0, 0, None, 1, 1, None, None]
    words, s = hf.merge_word_pieces(tokens, scores, word_ids, sequence_ids=seq)
    assert words == ["unlikely", "good", "paris"]
    assert s.tolist() == [7.0, 8.0, 48.0]
    offsets = [(0, 0), (0, 2), (2, 6), (6, 8), (9, 13), (0, 0), (0, 2), (2, 5), (0, 0), (0, 0)]
    words, s = hf.merge_word_pieces(
        tokens, scores, word_ids, sequence_ids=seq, offsets=offsets, text=("Unlikely GOOD", "Paris")
    )
    assert words == ["Unlikely", "GOOD", "Paris"] and s.tolist() == [7.0, 8.0, 48.0]
    with pytest.raises(ValueError, match="one per token"):
        hf.merge_word_pieces(tokens, scores[:3], word_ids)


def test_pre_tokenized_batch_encoding(bert):
    tok = make_tokenizer()
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    a = hf.explain_text(bert, tok, enc, target=0)
    b = hf.explain_text(bert, tok, TEXTS, target=0)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=0)
    assert a.words == b.words


# -- state, modes, detection, loading -----------------------------------------------------------


def test_model_state_untouched_and_training_mode_refused(bert):
    tok = make_tokenizer()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    flags = [p.requires_grad for p in bert.parameters()]
    hf.explain_text(bert, tok, "the film")
    assert not bert.training
    assert all(v.equal(before[k]) for k, v in bert.state_dict().items())
    assert [p.requires_grad for p in bert.parameters()] == flags
    assert all(p.grad is None for p in bert.parameters())
    assert not bert.get_input_embeddings()._forward_hooks
    bert.train()
    try:
        with pytest.raises(hf.TrainingModeError, match="eval"):
            hf.explain_text(bert, tok, "the film")
        ex = hf.explain_text(bert, tok, "the film", allow_train_mode=True)
        assert bert.training and ex.token_relevance.shape == (1, 4)
    finally:
        bert.eval()


def test_task_detection(bert, llama, gpt2, qa, t5):
    assert hf.detect_task(bert) == "sequence-classification"
    assert hf.detect_task(llama) == "causal-lm" and hf.detect_task(gpt2) == "causal-lm"
    assert hf.detect_task(qa) == "question-answering" and hf.detect_task(t5) == "seq2seq"
    with pytest.raises(hf.TaskError, match="task="):
        hf.detect_task(T.BertModel(T.BertConfig(vocab_size=VOCAB, **SMALL)))
    with pytest.raises(hf.TaskError, match="pair"):
        hf.explain_text(qa, make_tokenizer(), "not a pair")
    with pytest.raises(hf.TaskError, match="no pad token"):
        tok = make_tokenizer("bos")
        tok.pad_token = None
        hf.explain_text(llama, tok, TEXTS)


def test_load_offline(tmp_path, bert):
    tok = make_tokenizer()
    bert.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model, tok2 = hf.load(str(tmp_path), dtype=torch.float64)
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    a = hf.explain_text(model, tok2, TEXTS)
    b = hf.explain_text(bert, tok, TEXTS)
    torch.testing.assert_close(a.relevance, b.relevance, rtol=0, atol=0)
    with pytest.raises(OSError):
        hf.load("dynamiclrp-test/no-such-model-anywhere", task="causal-lm")


# -- other architectures of the zoo -------------------------------------------------------------

ZOO_CAUSAL = [
    "gemma3",
    "qwen3",
    "mistral",
    "mixtral",
    "phi3",
    "gpt_neox",
    "falcon",
    "falcon_mqa",
    "opt",
    "mamba",
]
ZOO_CLASSIFIERS = ["deberta_v2", "distilbert", "electra"]


@pytest.mark.parametrize("name", ZOO_CAUSAL)
def test_zoo_causal_lm_left_equals_right_padding(name):
    from dynamiclrp import zoo, zoo_hf  # noqa: F401  (registers the entries)

    model = zoo.build(name)
    assert hf.detect_task(model) == "causal-lm"
    left = hf.explain_text(model, make_tokenizer("bos", "left"), TEXTS)
    right = hf.explain_text(model, make_tokenizer("bos", "right"), TEXTS)
    assert torch.equal(left.target, right.target)
    for b in range(2):
        torch.testing.assert_close(
            left.relevance[b][left.attention_mask[b].bool()],
            right.relevance[b][right.attention_mask[b].bool()],
            rtol=1e-9,
            atol=1e-12,
        )
    assert abs(left.report.residual) < 1e-9 * abs(left.report.seeded) + 1e-12


@pytest.mark.parametrize("name", ZOO_CLASSIFIERS)
def test_zoo_classifier_batch_equals_rows(name):
    from dynamiclrp import zoo, zoo_hf  # noqa: F401

    model = zoo.build(name)
    assert hf.detect_task(model) == "sequence-classification"
    tok = make_tokenizer()
    batch = hf.explain_text(model, tok, TEXTS, target=1)
    for b, text in enumerate(TEXTS):
        row = hf.explain_text(model, tok, text, target=1)
        n = row.token_ids.shape[1]
        torch.testing.assert_close(batch.relevance[b, :n], row.relevance[0], rtol=1e-9, atol=1e-12)


def test_html_page_of_words_and_tokens(bert):
    tok = make_tokenizer()
    ex = hf.explain_text(bert, tok, ["the film was unlikely good", "bad plot"])
    page = ex.html(title="<b>")
    assert "unlikely" in page and "##like" not in page and "&lt;b&gt;" in page
    page = ex.html(words=False)
    assert "##like" in page and "[CLS]" in page and "[PAD]" not in page

"""The synthetic token data of the faithfulness benchmark (no model, no training).

Every property is re-derived from the decoded words by small functions written here, not by the
generators' own helpers: the sentiment label by the negation rule, the recall answer by looking
the query up in the context, the QA answer by finding the asked fact in the text.
"""

import pytest
import torch

from dynamiclrp.evaluation import synthetic_text as st

N = 200


def _rule_label(words):
    """+1/-1 per sentiment word, flipped by a negation right before it; label = sign of the sum."""
    total = 0
    for i, w in enumerate(words):
        p = 1 if w in st.POSITIVE else -1 if w in st.NEGATIVE else 0
        if p and i > 0 and words[i - 1] in ("not", "never"):
            p = -p
        total += p
    assert total != 0, words
    return int(total > 0)


def _check_masks(d):
    assert torch.equal(d.mask, d.ids != d.vocab.pad_id)
    assert not (d.rankable & ~d.mask).any()
    special = torch.zeros_like(d.mask)
    for s in range(6):
        special |= d.ids == s
    assert not (d.rankable & special).any()
    assert not (d.evidence & ~d.rankable).any()


# --- vocabulary ------------------------------------------------------------------------------------


def test_vocabulary_round_trip_and_special_ids():
    v = st.Vocabulary(["red", "box", "the"])
    assert v.tokens[:6] == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]")
    assert (v.pad_id, v.unk_id, v.cls_id, v.sep_id, v.mask_id, v.bos_id) == (0, 1, 2, 3, 4, 5)
    words = ["[CLS]", "the", "red", "box", "[SEP]", "[PAD]"]
    ids = v.encode(words)
    assert ids == [2, 8, 6, 7, 3, 0]
    assert v.decode(ids) == words
    assert v.decode(torch.tensor(ids), skip_pad=True) == words[:-1]
    assert v.encode(["blue"]) == [v.unk_id]
    with pytest.raises(KeyError, match="blue"):
        v.encode(["blue"], strict=True)
    with pytest.raises(IndexError, match="outside"):
        v.decode([9])
    with pytest.raises(ValueError, match="more than once"):
        st.Vocabulary(["a", "a"])
    with pytest.raises(ValueError, match="special"):
        st.Vocabulary(["[PAD]"])


@pytest.mark.parametrize("vocab", [st.SENTIMENT_VOCAB, st.RECALL_VOCAB, st.QA_VOCAB])
def test_task_vocabularies_round_trip(vocab):
    ids = list(range(len(vocab)))
    assert vocab.encode(vocab.decode(ids), strict=True) == ids


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [st.sentiment_data, st.recall_data, st.qa_data], ids=["sentiment", "recall", "qa"]
)
def test_generators_are_deterministic_per_seed(make):
    a, b, c = make(50, 3), make(50, 3), make(50, 4)
    for field in ("ids", "mask", "labels", "evidence", "rankable"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert not torch.equal(a.ids[:, :5], c.ids[:, :5]) or not torch.equal(a.labels, c.labels)
    torch.manual_seed(0)  # the global generator plays no part
    assert torch.equal(make(50, 3).ids, a.ids)


# --- sentiment -----------------------------------------------------------------------------------


def test_sentiment_label_rule_by_hand():
    assert st.sentiment_label(["it", "was", "good"]) == 1
    assert st.sentiment_label(["not", "good"]) == 0
    assert st.sentiment_label(["never", "bad", "and", "fun"]) == 1
    with pytest.raises(ValueError, match="polarities"):
        st.sentiment_label(["good", "and", "bad"])
    with pytest.raises(ValueError, match="polarities"):
        st.sentiment_label(["the", "film"])


def test_sentiment_labels_follow_the_negation_rule():
    d = st.sentiment_data(N, 0)
    n_negated = 0
    for i in range(N):
        words = d.words(i)
        assert words[0] == "[CLS]" and words[-1] == "[SEP]"
        assert d.labels[i].item() == _rule_label(words)
        n_negated += any(w in ("not", "never") for w in words)
    assert 0.3 * N < int(d.labels.sum()) < 0.7 * N  # both classes
    assert n_negated > 0.2 * N  # negations are common, so the rule matters


def test_sentiment_evidence_is_the_sentiment_words_and_their_negations():
    d = st.sentiment_data(N, 1)
    lexicon = set(st.POSITIVE) | set(st.NEGATIVE)
    for i in range(N):
        words = d.vocab.decode(d.ids[i])
        expected = [
            w in lexicon
            or (w in ("not", "never") and j + 1 < len(words) and words[j + 1] in lexicon)
            for j, w in enumerate(words)
        ]
        assert d.evidence[i].tolist() == expected
    _check_masks(d)


def test_sentiment_left_padding_holds_the_same_sentences():
    r = st.sentiment_data(40, 2, padding="right")
    left = st.sentiment_data(40, 2, padding="left")
    assert (left.ids[:, -1] != 0).all() and (r.ids[:, 0] != 0).all()
    for i in range(40):
        assert r.words(i) == left.words(i)
        assert r.evidence[i][r.mask[i]].tolist() == left.evidence[i][left.mask[i]].tolist()
    assert torch.equal(r.labels, left.labels)
    _check_masks(left)
    lengths = r.mask.sum(1)
    assert lengths.min() < lengths.max()  # variable length, so padding is exercised


def test_sentiment_prefix_suffix_and_length():
    d = st.sentiment_data(N, 3, min_words=5, max_words=9, prefix=("[BOS]",), suffix=())
    lengths = d.mask.sum(1) - 1
    assert lengths.min() >= 5 and lengths.max() <= 9
    assert (d.ids[:, 0] == d.vocab.bos_id).all()
    assert not d.rankable[:, 0].any()


# --- recall --------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_queries", [1, 3])
def test_recall_answer_is_the_value_of_the_queried_key(n_queries):
    d = st.recall_data(N, 5, n_pairs=5, n_queries=n_queries)
    assert d.ids.shape == (N, 2 * 5 + 2 * n_queries + 1) and d.mask.all()
    for i in range(N):
        words = d.vocab.decode(d.ids[i])
        assert words[0] == "[BOS]" and words[11] == "[SEP]"
        context = dict(zip(words[1:11:2], words[2:11:2], strict=True))
        assert len(context) == 5  # distinct keys
        query = words[-1]
        assert d.vocab.tokens[d.labels[i]] == context[query]
        # earlier queries are followed by their own answers and never ask the last key
        for k, v in zip(words[12:-1:2], words[13:-1:2], strict=True):
            assert context[k] == v and k != query
        pos = d.evidence[i].nonzero().flatten().tolist()
        assert len(pos) == 2 and pos[1] == pos[0] + 1 and pos[0] % 2 == 1
        assert words[pos[0]] == query and d.ids[i, pos[1]] == d.labels[i]
    _check_masks(d)
    assert not d.rankable[:, 0].any() and not d.rankable[:, 11].any()
    assert d.rankable[:, -1].all()  # the query itself may be perturbed


# --- QA ------------------------------------------------------------------------------------------


def _qa_answer(words):
    """Parse ``[CLS] where is the c o ? [SEP] facts [SEP]`` and return (colour, object, place)."""
    assert words[:4] == ["[CLS]", "where", "is", "the"] and words[6:8] == ["?", "[SEP]"]
    colour, obj = words[4], words[5]
    assert words[-1] == "[SEP]"
    facts = " ".join(words[8:-1]).split(" .")
    found = []
    for f in facts:
        f = f.split()
        if f and f[:3] == ["the", colour, obj]:
            found.append(f[f.index("the", 1) + 1 :])
    assert len(found) == 1, words
    return colour, obj, found[0]


def test_qa_gold_span_decodes_to_the_answer_inside_the_context():
    d = st.qa_data(N, 7)
    for i in range(N):
        words = d.vocab.decode(d.ids[i])
        colour, obj, place = _qa_answer(d.words(i))
        s, e = d.spans[i].tolist()
        assert words[s : e + 1] == place
        assert d.context[i, s : e + 1].all()
        # the question mask is exactly "where is the c o ?"
        assert d.question[i].nonzero().flatten().tolist() == list(range(1, 7))
        assert not (d.question[i] & d.context[i]).any()
        # evidence: the span plus the answering fact's colour and object
        ev = d.evidence[i].nonzero().flatten().tolist()
        assert [words[j] for j in ev] == [colour, obj, *place]
        assert ev[2:] == list(range(s, e + 1))
    _check_masks(d)
    assert not (d.rankable & d.question).any()
    assert torch.equal(d.rankable, d.mask & ~d.question & (d.ids > 5))


def test_qa_distractors_share_the_colour_and_the_object():
    d = st.qa_data(N, 8, min_facts=3, max_facts=4)
    for i in range(N):
        words = d.words(i)
        colour, obj = words[4], words[5]
        subjects = [tuple(f.split()[1:3]) for f in " ".join(words[8:-1]).split(" .") if f.strip()]
        assert 3 <= len(subjects) <= 4 and len(set(subjects)) == len(subjects)
        assert any(o == obj and c != colour for c, o in subjects)
        assert any(c == colour and o != obj for c, o in subjects)


def test_predict_spans_and_f1_by_hand():
    start = torch.tensor([[9.0, 1.0, 5.0, 2.0, 0.0], [9.0, 0.0, 1.0, 2.0, 3.0]])
    end = torch.tensor([[9.0, 0.0, 1.0, 4.0, 3.0], [9.0, 5.0, 1.0, 0.0, 0.0]])
    context = torch.tensor([[False, True, True, True, True]] * 2)
    pred = st.predict_spans(start, end, context)
    assert pred.tolist() == [[2, 3], [4, 1]]  # position 0 is outside the context
    gold = torch.tensor([[3, 4], [1, 1]])
    # row 0: overlap {3}, P = 1/2, R = 1/2, F1 = 1/2; row 1 gives an empty overlap
    f1 = st.span_f1(torch.tensor([[2, 3], [2, 2]]), gold)
    assert f1.tolist() == pytest.approx([0.5, 0.0])
    assert st.span_f1(gold, gold).tolist() == [1.0, 1.0]


def test_qa_without_distractors_every_word_identifies_the_fact():
    d = st.qa_data(N, 9, min_facts=2, max_facts=5, distractors=False, relations=[("is", "in")])
    for i in range(N):
        words = d.words(i)
        facts = [f.split() for f in " ".join(words[8:-1]).split(" .") if f.strip()]
        assert all(f[3:6] == ["is", "in", "the"] for f in facts)
        colours, objects = [f[1] for f in facts], [f[2] for f in facts]
        assert len(set(colours)) == len(facts) == len(set(objects))
        assert 2 <= len(facts) <= 5
        _, _, place = _qa_answer(words)
        s, e = d.spans[i].tolist()
        assert d.vocab.decode(d.ids[i, s : e + 1]) == place


def test_recall_value_first_writes_each_pair_value_then_key():
    d = st.recall_data(N, 6, n_pairs=4, value_first=True)
    plain = st.recall_data(N, 6, n_pairs=4)
    for i in range(N):
        words, ref = d.vocab.decode(d.ids[i]), plain.vocab.decode(plain.ids[i])
        assert words[1:9:2] == ref[2:9:2] and words[2:9:2] == ref[1:9:2]  # swapped pairs
        context = dict(zip(words[2:9:2], words[1:9:2], strict=True))
        assert d.vocab.tokens[d.labels[i]] == context[words[-1]]
        pos = d.evidence[i].nonzero().flatten().tolist()
        assert sorted(words[j] for j in pos) == sorted([words[-1], context[words[-1]]])

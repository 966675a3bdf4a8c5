"""The paper's setups built from local files (``benchmarks/tasks/real.py``), on fake files.

Every builder runs end to end on tiny data and models of the real formats written here: an
ImageFolder of PNGs, a CIFAR-10 python ``test_batch``, ``aclImdb/test/{pos,neg}``, a directory of
``.txt`` articles, a SQuAD v2 json, random Hugging Face models saved with ``save_pretrained`` and
a word-level fast tokenizer.  Expected values are computed here from the raw files (pixel
values, the vocabulary, character offsets) or by the models' own ``input_ids`` path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dynamiclrp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tasks import real  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
Image = pytest.importorskip("PIL.Image")

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[MASK]"]
WORDS = (
    "the a film was great bad boring fun who wrote it paris is in france what capital of city "
    "eiffel tower built by gustave river seine flows through and many people visit each year "
    "when did start end long story plot actor music"
).split()
VOCAB = {w: i for i, w in enumerate(SPECIAL + WORDS)}
PAD, UNK, CLS, SEP, BOS = 0, 1, 2, 3, 4


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)],
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        bos_token="[BOS]",
        mask_token="[MASK]",
    )


def _save(model: nn.Module, path: Path) -> str:
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return str(path)


def _ids(text: str) -> list[int]:
    """Word ids of a text by the vocabulary (independent of the tokenizer)."""
    return [VOCAB.get(w, UNK) for w in text.lower().split()]


def _explain_one(task) -> None:
    """``dynamiclrp.explain`` on the task's first two samples: finite, right shape, not zero."""
    problem = task.problem(torch.arange(min(2, len(task))))
    x = problem.x.clone().requires_grad_(True)
    with dynamiclrp.record(problem.model) as rec:
        out = problem.forward(x)
    rel = dynamiclrp.explain(out, x, target=problem.target, recording=rec)
    assert rel.shape == x.shape
    assert torch.isfinite(rel).all()
    assert rel.abs().sum() > 0


def _llama_config(**kw):
    return transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=SEP,
        **kw,
    )


# --- images -------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """Stands in for torchvision's vgg16 (same interface: images -> 1000 logits)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * 16 * 16, 1000))

    def forward(self, x):
        return self.classifier(self.features(x))


def _image_folder(root: Path) -> dict[str, tuple[np.ndarray, int]]:
    """Six random 48x32 (w x h) PNGs in two ImageNette class folders: name -> (pixels, index)."""
    rng = np.random.default_rng(0)
    files = {}
    for wnid, index in (("n01440764", 0), ("n03888605", 701)):
        (root / wnid).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"img{k}.png")
            files[f"{wnid}/{k}"] = (pixels, index)
    return files


def test_vgg16_imagenette_preprocessing_labels_targets(tmp_path, monkeypatch):
    files = _image_folder(tmp_path / "val")
    torch.manual_seed(0)
    net = TinyCNN()
    torch.save(net.state_dict(), tmp_path / "vgg.pth")
    monkeypatch.setattr(real.real_common, "torchvision_model", lambda arch, **kw: TinyCNN())
    spec = f"vgg16-imagenette:model={tmp_path / 'vgg.pth'},data={tmp_path / 'val'},resize=32"
    task = real.parse_spec(spec + ",crop=32", n_eval=5)
    assert task.kind == "image" and task.patch == 1 and len(task) == 5
    # resize 32 keeps the 48x32 image, the 32x32 centre crop starts at column 8
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    expected = {
        k: ((torch.from_numpy(p[:, 8:40]).permute(2, 0, 1).float() / 255 - mean) / std, label)
        for k, (p, label) in files.items()
    }
    seen = set()
    for i in range(len(task)):
        match = [
            k for k, (x, _) in expected.items() if torch.allclose(task.inputs[i], x, atol=1e-5)
        ]
        assert len(match) == 1
        seen.add(match[0])
        assert int(task.labels[i]) == expected[match[0]][1]
    assert len(seen) == 5  # distinct images, both classes among them
    assert {int(v) for v in task.labels} == {0, 701}
    with torch.no_grad():
        torch.testing.assert_close(task.targets, net(task.inputs).argmax(-1), rtol=0, atol=0)
    assert task.info["images_found"] == 6
    _explain_one(task)


def test_vgg16_imagenette_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(real.real_common, "torchvision_model", lambda arch, **kw: TinyCNN())
    with pytest.raises(FileNotFoundError, match="nowhere"):
        real.build_vgg16_imagenette(model="m.pth", data=str(tmp_path / "nowhere"))
    (tmp_path / "val" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match="cats"):
        real.build_vgg16_imagenette(model="m.pth", data=str(tmp_path / "val"))
    with pytest.raises(KeyError, match="unknown option 'colour'"):
        real.parse_spec(f"vgg16-imagenette:model=m,data={tmp_path},colour=red")
    with pytest.raises(ValueError, match="lacks"):
        real.parse_spec(f"vgg16-imagenette:data={tmp_path}")
    with pytest.raises(KeyError, match="known"):
        real.parse_spec("vgg19-imagenet:model=a,data=b")


def test_torchvision_architectures_and_imagenette_table():
    pytest.importorskip("torchvision")
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    names = {
        "n01440764": "tench",
        "n02102040": "English springer",
        "n02979186": "cassette player",
        "n03000684": "chain saw",
        "n03028079": "church",
        "n03394916": "French horn",
        "n03417042": "garbage truck",
        "n03425413": "gas pump",
        "n03445777": "golf ball",
        "n03888605": "parachute",
    }
    assert {w: _IMAGENET_CATEGORIES[i] for w, i in real.IMAGENETTE_CLASSES.items()} == names
    with torch.device("meta"):
        vgg = real.torchvision_model("vgg16")
        vit = real.torchvision_model("vit_b_16", num_classes=10)
    assert vgg.classifier[-1].out_features == 1000
    assert vit.patch_size == 16 and vit.heads[-1].out_features == 10


@pytest.mark.parametrize("size", [(400, 300), (300, 451)])
def test_resize_crop_matches_torchvision(size):
    tv = pytest.importorskip("torchvision")
    T = tv.transforms
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    expected = T.Compose([T.Resize(320), T.CenterCrop(224), T.ToTensor()])(img)
    torch.testing.assert_close(real._resize_crop(img, 320, 224), expected, rtol=0, atol=1e-6)


def _cifar(path: Path, n: int = 4) -> list[int]:
    """A CIFAR-10 binary test_batch.bin: image i has red = 255 in its top half, 0 below, green =
    10 i, blue = 200."""
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0, :16] = 255
    data[:, 1] = (10 * np.arange(n))[:, None, None]
    data[:, 2] = 200
    labels = [3, 1, 4, 1][:n]
    path.mkdir()
    records = np.concatenate([np.array(labels, dtype=np.uint8)[:, None], data.reshape(n, 3072)], 1)
    records.tofile(path / "test_batch.bin")
    return labels


def _check_cifar_inputs(task, mean, std) -> None:
    def norm(v, c):
        return (v / 255 - mean[c]) / std[c]

    x = task.inputs
    torch.testing.assert_close(x[:, 0, 0], torch.full_like(x[:, 0, 0], norm(255, 0)))
    torch.testing.assert_close(x[:, 0, -1], torch.full_like(x[:, 0, -1], norm(0, 0)))
    for i in range(len(task)):
        torch.testing.assert_close(x[i, 1], torch.full_like(x[i, 1], norm(10.0 * i, 1)))
        torch.testing.assert_close(x[i, 2], torch.full_like(x[i, 2], norm(200.0, 2)))


def test_vit_cifar10_hf_directory(tmp_path):
    labels = _cifar(tmp_path / "cifar-10-batches-bin")
    cfg = transformers.ViTConfig(
        image_size=48,
        patch_size=16,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=10,
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    model.save_pretrained(tmp_path / "vit")
    pre = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (tmp_path / "vit" / "preprocessor_config.json").write_text(json.dumps(pre))
    task = real.build_vit_cifar10(
        model=str(tmp_path / "vit"), data=str(tmp_path / "cifar-10-batches-bin"), n_eval=3, size=48
    )
    assert task.patch == 16 and task.inputs.shape == (3, 3, 48, 48)
    _check_cifar_inputs(task, [0.5] * 3, [0.5] * 3)
    assert task.labels.tolist() == labels[:3]
    with torch.no_grad():
        expected = model.eval()(pixel_values=task.inputs).logits.argmax(-1)
    assert task.targets.tolist() == expected.tolist()
    with pytest.raises(ValueError, match="224"):
        real.build_vit_cifar10(
            model=str(tmp_path / "vit"), data=str(tmp_path / "cifar-10-batches-bin"), n_eval=2
        )
    _explain_one(task)


def test_vit_cifar10_torchvision_state_dict(tmp_path, monkeypatch):
    pytest.importorskip("torchvision")
    from torchvision.models.vision_transformer import VisionTransformer

    def tiny(arch, **kw):
        assert arch == "vit_b_16" and kw == {"num_classes": 10}
        vit = VisionTransformer(48, 16, 1, 2, 16, 32, num_classes=10)
        nn.init.normal_(vit.heads.head.weight)  # torchvision initialises the head to zero
        return vit

    _cifar(tmp_path / "cifar")
    torch.manual_seed(0)
    torch.save(tiny("vit_b_16", num_classes=10).state_dict(), tmp_path / "vit.pth")
    monkeypatch.setattr(real.real_common, "torchvision_model", tiny)
    task = real.parse_spec(f"vit-cifar10:model={tmp_path / 'vit.pth'},data={tmp_path / 'cifar'}"
                           ",size=48", n_eval=4)  # fmt: skip
    assert task.patch == 16 and len(task) == 4
    _check_cifar_inputs(task, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert task.info["normalisation"]["source"] == "ImageNet"
    _explain_one(task)


# --- text classification, next-token prediction ---------------------------------------------------

REVIEWS = {
    "pos": ["a great film", "fun fun music and a great actor", "great"],
    "neg": ["a bad film", "boring " * 20 + "end", "the plot was bad and long"],
}


def _imdb(root: Path) -> None:
    for label, texts in REVIEWS.items():
        (root / "test" / label).mkdir(parents=True)
        for k, text in enumerate(texts):
            (root / "test" / label / f"{k}_7.txt").write_text(text)


@pytest.fixture(scope="module")
def imdb_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = _llama_config(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    cfg.label2id = {"NEGATIVE": 0, "POSITIVE": 1}
    return _save(transformers.LlamaForSequenceClassification(cfg), tmp_path_factory.mktemp("cls"))


def test_llama_imdb_tokens_padding_rankable(tmp_path, imdb_model):
    _imdb(tmp_path / "aclImdb")
    task = real.parse_spec(
        f"llama-imdb:model={imdb_model},data={tmp_path / 'aclImdb'},max_len=12,n_eval=none"
    )
    assert len(task) == 6 and task.kind == "tokens"
    expected = {}
    for label, texts in REVIEWS.items():
        for text in texts:
            row = [CLS, *_ids(text)[:10], SEP]  # truncated to max_len = 12 with its specials
            expected[tuple(row)] = 1 if label == "pos" else 0
    width = max(len(r) for r in expected)
    assert task.inputs.shape == (6, width)  # padded to the longest review, not to max_len
    model = task.model
    for i in range(6):
        n = int(task.hf["attention_mask"][i].sum())
        row = task.inputs[i, width - n :]
        assert (task.inputs[i, : width - n] == PAD).all()  # left padding
        assert int(task.labels[i]) == expected[tuple(row.tolist())]
        real_tok = (row != CLS) & (row != SEP)
        torch.testing.assert_close(task.rankable[i, width - n :], real_tok, rtol=0, atol=0)
        assert not task.rankable[i, : width - n].any()
        with torch.no_grad():
            ref = model(input_ids=row[None]).logits  # one unpadded review
            got = task.forward(task.to_x(task.inputs[i : i + 1]), torch.tensor([i]))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
        assert int(task.targets[i]) == int(ref.argmax())
    assert sorted(task.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert task.replacement_id == UNK and task.hf["output"] == "logits"
    assert task.info["truncated"] == 1
    _explain_one(task)


def test_llama_imdb_jsonl_and_errors(tmp_path, imdb_model):
    lines = [json.dumps({"text": t, "label": i % 2}) for i, t in enumerate(["great", "bad film"])]
    (tmp_path / "imdb.jsonl").write_text("\n".join(lines))
    task = real.build_llama_imdb(model=imdb_model, data=str(tmp_path / "imdb.jsonl"), n_eval=2)
    assert sorted(task.labels.tolist()) == [0, 1]
    with pytest.raises(FileNotFoundError, match="test/pos"):
        real.build_llama_imdb(model=imdb_model, data=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        real.build_llama_imdb(model=str(tmp_path), data=str(tmp_path / "imdb.jsonl"), n_eval=2)
    with pytest.raises(ValueError, match="n_eval=3"):
        real.build_llama_imdb(model=imdb_model, data=str(tmp_path / "imdb.jsonl"), n_eval=3)


ARTICLES = {
    "a_long.txt": " ".join(WORDS[:21]),
    "b_short.txt": "paris is great",
    "sub/c_mid.txt": " ".join(WORDS[10:22]),
}


def test_llama_wikipedia_windows(tmp_path):
    for name, text in ARTICLES.items():
        (tmp_path / "wiki" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "wiki" / name).write_text(text)
    torch.manual_seed(0)
    lm = _save(transformers.LlamaForCausalLM(_llama_config()), tmp_path / "lm")
    task = real.build_llama_wikipedia(model=lm, data=str(tmp_path / "wiki"), n_eval=None, ctx=6)
    # windows of 5 words after [BOS], followed by one more word: 4 from a_long, 2 from c_mid
    rows, gold = [], []
    for text in (ARTICLES["a_long.txt"], ARTICLES["sub/c_mid.txt"]):
        ids = _ids(text)
        for s in range(0, len(ids) - 5, 5):
            rows.append([BOS, *ids[s : s + 5]])
            gold.append(ids[s + 5])
    assert len(rows) == 4 + 2  # 21 words: starts 0, 5, 10, 15 (gold: word 20); 12: 0, 5
    assert task.inputs.tolist() == rows and task.targets.tolist() == gold
    assert task.labels.tolist() == gold and task.info["files_too_short"] == 1
    torch.testing.assert_close(task.rankable, task.inputs != BOS, rtol=0, atol=0)
    with torch.no_grad():
        ref = task.model(input_ids=task.inputs).logits[:, -1]
        got = task.forward(task.to_x(task.inputs), torch.arange(len(task)))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert task.info["accuracy"] == float((ref.argmax(-1) == task.labels).float().mean())
    assert task.hf["output"] == "last"
    half = real._hf_model("AutoModelForCausalLM", lm, "eager", "bfloat16")
    assert half.get_input_embeddings().weight.dtype == torch.bfloat16
    _explain_one(task)
    assert (
        len(real.build_llama_wikipedia(model=lm, data=str(tmp_path / "wiki"), n_eval=5, ctx=6)) == 5
    )


# --- extractive QA --------------------------------------------------------------------------------


def _squad_json(path: Path) -> dict:
    """Four answerable questions (one too long for max_len = 40), one impossible one."""
    c1 = "the eiffel tower in paris was built by gustave eiffel"
    c2 = "the river seine flows through paris and many people visit each year"
    long = " ".join(["the film was fun"] * 12) + " and music"
    qas1 = [
        {"id": "q1", "question": " who built the tower", "is_impossible": False,
         "answers": [{"text": "gustave eiffel", "answer_start": c1.index("gustave")}]},
        {"id": "q2", "question": "where is the tower", "is_impossible": False,
         "answers": [{"text": "paris", "answer_start": c1.index("paris")}]},
        {"id": "q0", "question": "what is the capital of france", "is_impossible": True,
         "answers": []},
    ]  # fmt: skip
    qas2 = [
        {"id": "q3", "question": "what flows through paris", "is_impossible": False,
         "answers": [{"text": "river seine", "answer_start": c2.index("river")},
                     {"text": "the river seine", "answer_start": 0}]},
    ]  # fmt: skip
    qas3 = [
        {"id": "q4", "question": "what was fun", "is_impossible": False,
         "answers": [{"text": "music", "answer_start": long.index("music")}]},
    ]  # fmt: skip
    doc = {"version": "v2.0", "data": [
        {"title": "A", "paragraphs": [{"context": c1, "qas": qas1}]},
        {"title": "B", "paragraphs": [{"context": c2, "qas": qas2}, {"context": long, "qas": qas3}]},
    ]}  # fmt: skip
    path.write_text(json.dumps(doc))
    return {"q1": c1, "q2": c1, "q3": c2}


def _fit_qa(model: nn.Module, path: Path) -> nn.Module:
    """A few Adam steps on the short answerable questions, so that the tiny model's predicted
    spans lie in the context (gold token spans from the words: ``[CLS] q [SEP] c [SEP]``)."""
    rows, spans = [], []
    for article in json.loads(path.read_text())["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if qa["answers"] and len(para["context"].split()) < 20:
                    a = qa["answers"][0]
                    q_ids = _ids(qa["question"])
                    start = 2 + len(q_ids) + len(para["context"][: a["answer_start"]].split())
                    spans.append([start, start + len(a["text"].split()) - 1])
                    rows.append([CLS, *q_ids, SEP, *_ids(para["context"]), SEP])
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    spans = torch.tensor(spans)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(40):
        out = model(input_ids=ids, attention_mask=(ids != PAD).long())
        loss = nn.functional.cross_entropy(out.start_logits, spans[:, 0])
        loss = loss + nn.functional.cross_entropy(out.end_logits, spans[:, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _qa_model(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "roberta":
        cfg = transformers.RobertaConfig(
            vocab_size=len(VOCAB),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=130,
            pad_token_id=PAD,
        )
        return transformers.RobertaForQuestionAnswering(cfg)
    cfg = transformers.T5Config(
        vocab_size=len(VOCAB),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        pad_token_id=PAD,
        eos_token_id=SEP,
        decoder_start_token_id=PAD,
    )
    return transformers.T5ForQuestionAnswering(cfg)


def _word_f1(pred: str, gold: str) -> float:
    """SQuAD's F1 for lower-case answers without punctuation: articles dropped, word overlap."""
    p, g = ([w for w in t.split() if w not in ("a", "an", "the")] for t in (pred, gold))
    common = sum(min(p.count(w), g.count(w)) for w in set(p))
    return 2 * common / (len(p) + len(g)) if common else 0.0


@pytest.mark.parametrize("kind", ["roberta", "t5"])
def test_squad_qa_spans_counts_scores(tmp_path, kind):
    contexts = _squad_json(tmp_path / "dev-v2.0.json")
    model_dir = _save(_fit_qa(_qa_model(kind), tmp_path / "dev-v2.0.json"), tmp_path / kind)
    task = real.parse_spec(
        f"squad-qa:model={model_dir},data={tmp_path / 'dev-v2.0.json'},max_len=40"
    )
    info = task.info
    tok = _tokenizer()
    assert info["answerable_in_file"] == 4 and info["processed"] == 4
    assert info["skipped_too_long"] == 1  # 4 + 49 context words + 3 specials > 40
    assert (
        info["kept"] + info["skipped_invalid_span"] == 3 == len(task) + info["skipped_invalid_span"]
    )
    answers = {"q1": "gustave eiffel", "q2": "paris", "q3": "river seine"}
    em, f1 = [], []
    for i in range(len(task)):
        ids = task.inputs[i]
        (s, e), (ps, pe) = task.spans[i].tolist(), task.predicted_spans[i].tolist()
        gold = tok.decode(ids[s : e + 1])
        assert gold in answers.values()  # the gold span decodes back to its answer text
        qid = next(q for q, a in answers.items() if a == gold)
        assert ids[0] == CLS and (ids == SEP).sum() == 2
        first_sep = int((ids == SEP).nonzero()[0])
        n_q = len(_ids(tok.decode(ids[1:first_sep])))
        torch.testing.assert_close(
            task.question[i], (torch.arange(len(ids)) >= 1) & (torch.arange(len(ids)) <= n_q),
            rtol=0, atol=0,
        )  # fmt: skip
        assert first_sep < ps <= pe and task.rankable[i, ps] and task.rankable[i, pe]
        pred = tok.decode(ids[ps : pe + 1])
        em.append(float(pred == answers[qid] or (qid == "q3" and pred == "the river seine")))
        f1.append(_word_f1(pred, answers[qid]))  # "the river seine" scores as well
        assert pred in contexts[qid]
        special = (ids == PAD) | (ids == CLS) | (ids == SEP)
        assert not (task.rankable[i] & (special | task.question[i])).any()
    assert info["exact_match_kept"] == pytest.approx(100 * sum(em) / len(task))
    assert info["exact_match"] == pytest.approx(100 * sum(em) / 3)  # invalid predictions score 0
    assert info["f1"] == pytest.approx(100 * sum(f1) / 3)
    # the explained score is start_logits[s] + end_logits[e] of the predicted span
    i = 0
    n = int(task.hf["attention_mask"][i].sum())
    with torch.no_grad():
        out = task.model(input_ids=task.inputs[i : i + 1, :n])
        ps, pe = task.predicted_spans[i].tolist()
        ref = out.start_logits[0, ps] + out.end_logits[0, pe]
        got = task.forward(task.to_x(task.inputs[:1]), torch.tensor([0]))
    torch.testing.assert_close(got, ref.view(1, 1), rtol=1e-4, atol=1e-5)
    assert task.score == "logit" and task.hf["output"] == "span"
    one = real.build_squad_qa(model=model_dir, data=str(tmp_path / "dev-v2.0.json"), n_eval=1)
    n = int(one.hf["attention_mask"][0].sum())
    assert len(one) == 1 and one.inputs[0, :n].tolist() == task.inputs[0, :n].tolist()
    _explain_one(task)


def test_predict_span_and_squad_scores():
    context = torch.tensor([False, False, True, True, True, False])
    start = torch.tensor([0.0, 0.0, 1.0, 3.0, 2.0, 0.0])
    end = torch.tensor([0.0, 9.0, 5.0, 1.0, 2.0, 9.0])  # best end overall is not allowed
    assert real.predict_span(start, end, context) == (3, 4)
    assert real.predict_span(torch.tensor([5.0, 0, 1, 1, 1, 0]), end, context) is None
    assert real.squad_scores("The Eiffel Tower!", ["eiffel tower"]) == (1.0, 1.0)
    em, f1 = real.squad_scores("big red house", ["red house now", "blue"])
    assert em == 0.0 and f1 == pytest.approx(2 * 2 / (3 + 3))
    assert real.squad_scores("", ["paris"]) == (0.0, 0.0)


def test_parse_spec_converts_by_signature(monkeypatch):
    seen = {}

    def fake(
        model: str,
        n_eval: int | None = 7,
        bos: bool = True,
        mean: tuple[float, ...] | None = None,
        tokenizer: str | None = None,
    ):
        seen.update(model=model, n_eval=n_eval, bos=bos, mean=mean, tokenizer=tokenizer)
        return "task"

    monkeypatch.setitem(real.REAL_TASKS, "fake", fake)
    assert real.parse_spec("fake:model=/a=b/m, bos=false,mean=0.5/0.25/1", n_eval=3) == "task"
    assert seen == {"model": "/a=b/m", "n_eval": 3, "bos": False, "mean": (0.5, 0.25, 1.0),
                    "tokenizer": None}  # fmt: skip
    real.parse_spec("fake:model=m,n_eval=none,tokenizer=/t", n_eval=3)  # the spec wins
    assert seen["n_eval"] is None and seen["tokenizer"] == "/t"
    real.parse_spec("fake:model=m")
    assert seen["n_eval"] == 7 and seen["bos"] is True
    with pytest.raises(ValueError, match="bos='maybe'"):
        real.parse_spec("fake:model=m,bos=maybe")
    with pytest.raises(ValueError, match="not key=value"):
        real.parse_spec("fake:model=m,oops")

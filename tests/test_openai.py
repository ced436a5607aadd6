"""Importing OpenAI's original iGPT TF checkpoints and pre-quantized arrays. The logits to match come from an
independent numpy forward pass of OpenAI's model maths over the same weights (fixtures/openai/make_fixtures.py)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from igpt.checkpoint import load_model
from igpt.cli import main
from igpt.errors import IgptError
from igpt.model import ImageGPTConfig, ar_inputs
from igpt.openai import OpenAIImportConfig, load_openai
from igpt.prepare import PrepareConfig, prepare
from igpt.shards import load_shards
from igpt.tfcheckpoint import TFCheckpoint

FIX = Path(__file__).parent / "fixtures" / "openai"
AR, BERT, CENTERS = FIX / "ar" / "model.ckpt-7", FIX / "bert" / "model.ckpt-3", FIX / "kmeans_centers.npy"


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(FIX / "expected.npz", allow_pickle=False))


def _logits(model, tokens, keep=None):
    x = torch.from_numpy(tokens)
    with torch.no_grad():
        if model.config.causal:
            return model(ar_inputs(x, model.config.sos_id)).numpy()
        return model(x, mask=torch.from_numpy(keep == 0)).numpy()


def test_ar_import_matches_openai_forward(expected, tmp_path):
    model, palette, heads, unused = load_openai(OpenAIImportConfig(str(AR), str(tmp_path / "c"), str(CENTERS)))
    c = model.config
    assert (c.mode, c.n_layer, c.n_embd, c.n_head, c.n_px, c.palette_size) == ("ar", 11, 12, 2, 4, 16)
    np.testing.assert_allclose(_logits(model, expected["tokens"]), expected["ar_logits"], atol=1e-5, rtol=0)
    sos = TFCheckpoint(AR).read("model/sos")
    np.testing.assert_array_equal(model.wte.weight[16].detach().numpy(), sos)  # SOS row = TF `sos`
    assert all(not p.any() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert palette.k == 16 and heads == {}
    # optimizer slots, counters and the extras are reported, not read (reading extra/flag would fail)
    assert "model/wte/Adam" in unused and "model/h10/mlp/c_fc/w/Adam_1" in unused
    assert {"global_step", "beta1_power", "extra/flag", "extra/part2d"} <= set(unused)
    assert not any(n in unused for n in ("model/wte", "model/sos", "model/h10/attn/q_proj"))


def test_bert_import_matches_openai_forward(expected, tmp_path):
    model, palette, _, unused = load_openai(OpenAIImportConfig(str(BERT), str(tmp_path / "c"), bert=True))
    c = model.config
    assert (c.mode, c.n_head, c.causal) == ("bert", 3, False) and palette is None and unused == []
    np.testing.assert_allclose(_logits(model, expected["tokens"], expected["bert_keep"]), expected["bert_logits"],
                               atol=1e-5, rtol=0)
    assert not model.wte.weight[16].any()  # no SOS in a BERT model


@pytest.mark.parametrize("kw, msg", [
    (dict(bert=True), "--bert given, but the checkpoint has model/sos"),
    (dict(n_head=4), "--n-head 4, but the attention weights have 2 heads"),
    (dict(preset="igpt-s"), "does not match preset igpt-s: n_px 4 \\(preset 32\\)"),
    (dict(palette=str(FIX / "ar" / "model.ckpt-7.index")), "not a readable .npy palette"),
])
def test_inconsistent_requests_fail_clearly(kw, msg, tmp_path):
    with pytest.raises(IgptError, match=msg):
        load_openai(OpenAIImportConfig(str(AR), str(tmp_path / "c"), **kw))


def test_palette_size_must_match(tmp_path):
    np.save(tmp_path / "k.npy", np.zeros((8, 3), np.float32))
    with pytest.raises(IgptError, match="8 colours, but .* has 16"):
        load_openai(OpenAIImportConfig(str(AR), str(tmp_path / "c"), str(tmp_path / "k.npy")))


class _Stub:
    """What infer_config sees of a checkpoint: names, dtypes and shapes."""

    def __init__(self, infos):
        self._infos = infos

    def infos(self):
        return self._infos


def _infos(drop=(), **shapes):
    from igpt.openai import expected_shapes
    from igpt.tfcheckpoint import TensorInfo

    cfg = ImageGPTConfig(n_px=4, palette_size=16, n_embd=12, n_layer=3, n_head=2)
    want = {**expected_shapes(cfg), **shapes}
    return {n: TensorInfo(n, "float32", s, False) for n, s in want.items() if n not in drop}


@pytest.mark.parametrize("infos, msg", [
    (_infos(drop=("model/wtet",)), "not an OpenAI iGPT checkpoint \\(missing model/wtet\\)"),
    (_infos(drop=[f"model/h1/{p}" for p in ("ln_1/g", "ln_2/g", "attn/q_proj", "attn/k_proj", "attn/v_proj",
                                            "attn/c_proj", "mlp/c_fc/w", "mlp/c_proj/w")]),
     "layers must be numbered h0..h\\{L-1\\}, found \\[0, 2\\]"),
    (_infos(drop=("model/h2/mlp/c_fc/w",)), "missing model/h2/mlp/c_fc/w"),
    (_infos(**{"model/wpe": (15, 12)}), "15 positions, not a square"),
    (_infos(**{"model/h1/attn/k_proj": (3, 4, 12)}), "model/h1/attn/k_proj \\(3, 4, 12\\) != \\(2, 6, 12\\)"),
    (_infos(**{"model/wte": (16, 12, 1)}), "model/wte has shape \\(16, 12, 1\\), expected 2 dimensions"),
    (_infos(**{"model/wpe": (192,)}), "model/wpe has shape \\(192,\\), expected 2 dimensions"),
    (_infos(**{"model/clf/wclf": ()}), "model/clf/wclf has shape \\(\\), expected 2 dimensions"),
])
def test_not_an_igpt_checkpoint(infos, msg):
    from igpt.openai import infer_config

    with pytest.raises(IgptError, match=msg):
        infer_config(_Stub(infos), "ck")


def test_cli_import_end_to_end(expected, tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["import-openai", str(AR), "--palette", str(CENTERS), "--out", str(out), "--n-head", "2"]) == 0
    text = capsys.readouterr().out
    assert "AR model, 11 layers" in text and "186 optimizer slot(s)" in text and "beta1_power" in text
    model, palette = load_model(out)
    np.testing.assert_allclose(_logits(model, expected["tokens"]), expected["ar_logits"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(palette.centers, np.load(CENTERS))
    assert json.loads((out / "config.json").read_text())["mode"] == "ar"
    assert main(["import-openai", str(BERT.parent), "--out", str(tmp_path / "b"), "--bert"]) == 0
    assert load_model(tmp_path / "b")[0].config.mode == "bert"
    assert main(["import-openai", str(AR), "--out", str(tmp_path / "x"), "--bert"]) == 2
    assert "igpt: error:" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_cli_corrupt_weight_fails_unless_unverified(tmp_path, capsys):
    for f in AR.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    ck = TFCheckpoint(tmp_path / AR.name)
    e = ck._entries[b"model/h3/mlp/c_fc/w"]
    shard = ck.shard_path(e.shard_id)
    data = bytearray(shard.read_bytes())
    data[e.offset + 1] ^= 0x10
    shard.write_bytes(bytes(data))
    args = ["import-openai", str(tmp_path / AR.name), "--out", str(tmp_path / "ck")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "'model/h3/mlp/c_fc/w'" in err and "checksum mismatch" in err
    assert main([*args, "--no-verify"]) == 0


# -- OpenAI's pre-quantized arrays -------------------------------------------------------------------------
def _write_arrays(d: Path, prefix: str = "", val: bool = True, rng=None):
    rng = rng or np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for s, n in (("tr", 12), ("va", 4), ("te", 5)):
        if s == "va" and not val:
            continue
        x = rng.integers(0, 16, (n, 16)).astype(np.int64)
        y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]  # one-hot, as OpenAI's
        np.save(d / f"{prefix}{s}X.npy", x, allow_pickle=False)
        np.save(d / f"{prefix}{s}Y.npy", y, allow_pickle=False)
        arrays[s] = (x, y.argmax(1))
    return arrays


def test_prepare_openai_npy_end_to_end(tmp_path, capsys):
    arrays = _write_arrays(tmp_path / "dl", prefix="imagenet_")
    out = tmp_path / "shards"
    assert main(["prepare", "--data", f"openai-npy:{tmp_path / 'dl'}", "--palette", str(CENTERS),
                 "--out", str(out)]) == 0
    assert "train 12, val 4, test 5 images at 4x4" in capsys.readouterr().out
    sh = load_shards(out)
    assert sh.n_px == 4 and sh.meta["labels"] and sh.palette.k == 16
    for split, key in (("train", "tr"), ("val", "va"), ("test", "te")):
        np.testing.assert_array_equal(sh.tokens(split), arrays[key][0])
        np.testing.assert_array_equal(sh.labels(split), arrays[key][1])
    # a prefix works too, and a missing vaX holds val out of train
    _write_arrays(tmp_path / "dl2", prefix="cifar10_", val=False)
    meta = prepare(PrepareConfig(out=str(tmp_path / "s2"), data=f"openai-npy:{tmp_path / 'dl2' / 'cifar10'}",
                                 palette=str(CENTERS), val_fraction=0.25))
    assert meta["counts"] == {"train": 9, "val": 3, "test": 5}


def test_prepare_openai_npy_rejects_bad_input(tmp_path):
    _write_arrays(tmp_path / "dl")
    cfg = dict(out=str(tmp_path / "s"), data=f"openai-npy:{tmp_path / 'dl'}")
    with pytest.raises(IgptError, match="palette ids already"):
        prepare(PrepareConfig(**cfg))
    np.save(tmp_path / "k8.npy", np.zeros((8, 3), np.float32))
    with pytest.raises(IgptError, match="ids outside 0..7"):
        prepare(PrepareConfig(**cfg, palette=str(tmp_path / "k8.npy")))
    assert not (tmp_path / "s").exists()
    with pytest.raises(IgptError, match="no .*trX.npy"):
        prepare(PrepareConfig(out=str(tmp_path / "s"), data=f"openai-npy:{tmp_path / 'none'}", palette=str(CENTERS)))


def test_eval_of_imported_model_is_the_openai_loss(expected, tmp_path):
    """`igpt eval` on imported weights and OpenAI-format arrays gives OpenAI's gen_loss (nats per token)."""
    from igpt.evaluate import EvalConfig, evaluate

    d = tmp_path / "dl"
    d.mkdir()
    for s in ("tr", "te"):
        np.save(d / f"{s}X.npy", expected["tokens"], allow_pickle=False)
    prepare(PrepareConfig(out=str(tmp_path / "s"), data=f"openai-npy:{d}", palette=str(CENTERS), val_fraction=0.5))
    assert main(["import-openai", str(AR), "--palette", str(CENTERS), "--out", str(tmp_path / "ck")]) == 0
    res = evaluate(EvalConfig(checkpoint=str(tmp_path / "ck"), data=str(tmp_path / "s"), device="cpu"))
    lg = expected["ar_logits"].astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = lse - np.take_along_axis(lg, expected["tokens"][..., None], -1)[..., 0]
    assert res["nats_per_token"] == pytest.approx(nll.mean(), abs=1e-5)


def test_one_hot_labels_are_read_in_chunks(tmp_path, monkeypatch):
    """A one-hot label file is checked and decoded a chunk of rows at a time (ImageNet's trY would otherwise
    take several times its size in temporaries); rows in a later chunk count the same."""
    import igpt.openai as O

    monkeypatch.setattr(O, "LABEL_CHUNK", 4)
    y = np.eye(5, dtype=np.uint8)[np.arange(11) % 5]
    np.save(tmp_path / "y.npy", y, allow_pickle=False)
    np.testing.assert_array_equal(O._labels(tmp_path / "y.npy", 11), np.arange(11) % 5)
    y[9, 0] = 1  # two classes in a row of the last chunk
    np.save(tmp_path / "y.npy", y, allow_pickle=False)
    with pytest.raises(IgptError, match="must be one-hot"):
        O._labels(tmp_path / "y.npy", 11)


def test_negative_dimension_in_the_index_is_a_one_line_error(tmp_path, capsys):
    """A shape with a negative dimension (model/wpe (-4, 8)) is refused where the index is parsed, naming the
    file and the tensor (infer_config's isqrt raised ValueError on it)."""
    from tf_writer import entry, write

    d = 8
    shapes = {"model/wte": (4, d), "model/wpe": (-4, d), "model/wtet": (4, d), "model/ln_f/g": (d,),
              "model/sos": (d,), "model/h0/ln_1/g": (d,), "model/h0/ln_2/g": (d,),
              "model/h0/mlp/c_fc/w": (d, 4 * d), "model/h0/mlp/c_proj/w": (4 * d, d)}
    shapes |= {f"model/h0/attn/{n}": (2, d // 2, d) for n in ("q_proj", "k_proj", "v_proj", "c_proj")}
    prefix = write(tmp_path / "tf" / "model.ckpt-1", {n.encode(): entry(dims=s) for n, s in shapes.items()}, [b""])
    assert main(["import-openai", str(prefix), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"igpt: error: {prefix}.index: tensor 'model/wpe' has shape (-4, 8), with a negative dimension")
    assert not (tmp_path / "ck").exists()


def test_prepare_openai_npy_refuses_negative_labels(tmp_path):
    """1-D labels below 0 (or uint64 ones beyond int64) are refused at prepare time, naming the file; they were
    written into shards that load_shards then refused."""
    _write_arrays(tmp_path / "dl")
    cfg = PrepareConfig(out=str(tmp_path / "s"), data=f"openai-npy:{tmp_path / 'dl'}", palette=str(CENTERS))
    for y, found in ((np.full(12, -1, np.int64), "-1"), (np.full(12, 2**63, np.uint64), str(2**63))):
        np.save(tmp_path / "dl" / "trY.npy", y, allow_pickle=False)
        with pytest.raises(IgptError) as e:
            prepare(cfg)
        assert str(e.value) == f"{tmp_path / 'dl' / 'trY.npy'}: labels must be in 0 .. 2**63 - 1, got {found} .. {found}"
    assert not (tmp_path / "s").exists()
    np.save(tmp_path / "dl" / "trY.npy", np.arange(12) % 3, allow_pickle=False)  # 1-D labels >= 0: fine
    prepare(cfg)
    np.testing.assert_array_equal(load_shards(tmp_path / "s").labels("train"), np.arange(12) % 3)

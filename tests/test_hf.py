"""Hugging Face ImageGPT checkpoints in and out, against a random-weight transformers model built locally."""

import json

import numpy as np
import pytest
import torch
from igpt_testutil import (
    PARITY_CONFIGS,
    grey_palette,
    hf_attention_scale,
    hf_model,
    require_correct_hf_scale,
    rgb_palette,
    tiny_model,
)

from igpt.checkpoint import load_heads, load_model, save_model
from igpt.errors import IgptError
from igpt.hf import export_hf, import_hf, load_hf
from igpt.model import ar_inputs
from igpt.palette import Palette
from igpt.sample import generate

transformers = pytest.importorskip("transformers")


def _save_hf(model, path, clusters=None, bin_file=False, extra_state=None):
    model.save_pretrained(path)
    if clusters is not None:
        proc = transformers.ImageGPTImageProcessorPil(clusters=clusters, size={"height": 8, "width": 8})
        proc.save_pretrained(path)
    if bin_file or extra_state:
        (path / "model.safetensors").unlink()
        state = {**model.state_dict(), **(extra_state or {})}
        torch.save(state, path / "pytorch_model.bin")
    return path


def _compare(ref, ours, idx):
    with torch.no_grad():
        out = ref(idx, output_hidden_states=True)
        logits, hidden = ours(idx), ours.hidden_states(idx)
    assert (out.logits - logits).abs().max() <= 1e-5
    for a, b in zip(hidden, out.hidden_states, strict=True):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("shape", PARITY_CONFIGS[:2] + PARITY_CONFIGS[-2:])
def test_import_matches_transformers(tmp_path, shape):
    n_px, d, L, H, K = shape
    require_correct_hf_scale(d // H)
    ref = hf_model(*shape, seed=7)
    clusters = rgb_palette(K)
    _save_hf(ref, tmp_path / "hf", clusters)
    info = import_hf(tmp_path / "hf", tmp_path / "ck")
    assert info["lm_head"] and info["palette"] == K
    ours, pal = load_model(tmp_path / "ck")
    assert np.allclose(pal.centers, clusters)
    _compare(ref, ours, ar_inputs(torch.randint(0, K, (2, n_px * n_px)), K))


def test_export_loads_in_transformers_and_round_trips(tmp_path):
    require_correct_hf_scale(6)
    ours = tiny_model(seed=4, n_px=16, n_embd=36, n_head=6, palette_size=20)
    save_model(tmp_path / "ck", ours, palette=rgb_palette(20))
    export_hf(tmp_path / "ck", tmp_path / "hf")
    ref = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.n_positions == 256 and ref.config.vocab_size == 21
    _compare(ref, ours, ar_inputs(torch.randint(0, 20, (2, 256)), 20))
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert np.allclose(np.asarray(proc.clusters), rgb_palette(20))
    import_hf(tmp_path / "hf", tmp_path / "ck2")  # and back: identical tensors
    back, pal = load_model(tmp_path / "ck2")
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert np.allclose(pal.centers, rgb_palette(20))


def test_export_replaces_an_old_export_but_not_another_hugging_face_model(tmp_path):
    """--out that holds an earlier ImageGPT export is replaced; a folder of another Hugging Face model (its
    config.json has a model_type too) is refused and left as it was."""
    save_model(tmp_path / "ck", tiny_model(seed=4, n_px=4, n_embd=12, n_head=2, palette_size=6))
    export_hf(tmp_path / "ck", tmp_path / "hf")
    export_hf(tmp_path / "ck", tmp_path / "hf")  # an old export of ours: replaced
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    (bert / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(IgptError, match="igpt did not write"):
        export_hf(tmp_path / "ck", bert)
    assert sorted(p.name for p in bert.iterdir()) == ["config.json", "model.safetensors"]


def test_a_float32_palette_survives_export_and_import_with_its_hash(tmp_path):
    """JSON stores the palette as float64; float32 values come back as float32, so the shards prepared with the
    palette still match the round-tripped checkpoint (the hash includes the dtype)."""
    pal = Palette(rgb_palette(16, seed=4))
    assert pal.centers.dtype == np.float32
    save_model(tmp_path / "ck", tiny_model(seed=1), palette=pal)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back")[1]
    assert back.hash == pal.hash and np.array_equal(back.centers, pal.centers)


def test_grey_palette_survives_export(tmp_path):
    save_model(tmp_path / "ck", tiny_model(), palette=grey_palette(16))
    export_hf(tmp_path / "ck", tmp_path / "hf")
    pc = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert np.asarray(pc["clusters"]).shape == (16, 3)  # what HF's processor can quantize
    import_hf(tmp_path / "hf", tmp_path / "ck2")
    assert load_model(tmp_path / "ck2")[1].channels == 1


def test_greedy_continuations_match_generate(tmp_path):
    n_px, d, L, H, K = 8, 27, 2, 3, 16  # head_dim 9
    ref = hf_model(n_px, d, L, H, K, seed=11)
    _save_hf(ref, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ck")
    ours, _ = load_model(tmp_path / "ck")
    prefix = torch.randint(0, K, (3, 20))
    for p in (None, prefix):
        ctx = torch.full((3, 1), K) if p is None else torch.cat([torch.full((3, 1), K), p], 1)
        with torch.no_grad():
            want = ref.generate(input_ids=ctx, max_length=n_px * n_px + 1, do_sample=False, use_cache=True)
        got = generate(ours, 3, prefix=p, top_k=1)
        assert torch.equal(got, want[:, 1:])


def test_bin_file_with_old_mask_buffers(tmp_path):
    ref = hf_model(8, 36, 2, 4, 16, seed=2)  # head_dim 9
    extra = {}
    for i in range(2):
        extra[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        extra[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    _save_hf(ref, tmp_path / "hf", extra_state=extra)
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    model, _, _, has_head = load_hf(tmp_path / "hf")
    assert has_head
    _compare(ref, model, ar_inputs(torch.randint(0, 16, (2, 64)), 16))
    # c_attn.bias is a real parameter, not a mask buffer: it was loaded, not dropped
    assert torch.equal(model.h[0].attn.c_attn.bias, ref.transformer.h[0].attn.c_attn.bias)


def test_base_model_and_classifier(tmp_path):
    require_correct_hf_scale(8)
    base = hf_model(8, 24, 2, 3, 16, seed=5, cls_name="ImageGPTModel")
    _save_hf(base, tmp_path / "base")
    info = import_hf(tmp_path / "base", tmp_path / "ck")
    assert not info["lm_head"] and "zero" in info["note"]
    ours, _ = load_model(tmp_path / "ck")
    assert not ours.lm_head.weight.any()
    idx = torch.randint(0, 17, (2, 64))
    with torch.no_grad():
        want = base(idx, output_hidden_states=True).hidden_states
    for a, b in zip(ours.hidden_states(idx), want, strict=True):
        assert (a - b).abs().max() <= 1e-5

    clf = hf_model(8, 24, 2, 3, 16, seed=6, cls_name="ImageGPTForImageClassification", num_labels=5)
    _save_hf(clf, tmp_path / "clf")
    model, _, heads, has_head = load_hf(tmp_path / "clf")
    assert not has_head and heads["score"].shape == (5, 24)
    pixels = torch.randint(0, 16, (2, 64))  # HF's classifier pools over the raw ids, without SOS
    with torch.no_grad():
        want = clf(pixels).logits
        got = model.features(pixels, [2])[2] @ heads["score"].T
    assert (want - got).abs().max() <= 1e-5
    import_hf(tmp_path / "clf", tmp_path / "ck2")
    assert torch.equal(load_heads(tmp_path / "ck2")["score"], heads["score"])
    _save_hf(clf, tmp_path / "clf-bad", extra_state={"score.weight": torch.zeros(5, 7)})  # not n_embd wide
    with pytest.raises(IgptError, match=r"score.weight has shape \(5, 7\), expected \(num_labels, 24\)"):
        load_hf(tmp_path / "clf-bad")


def test_classifier_head_exports(tmp_path):
    """The exported classifier is the head on ln_f pooled over the ids it gets: fed [SOS, x0 .. x_{T-2}] it gives
    exactly `igpt finetune`'s logits (which pool the generative pass); fed the raw pixels, other features."""
    from transformers import ImageGPTForCausalImageModeling, ImageGPTForImageClassification

    from igpt.finetune import joint_forward

    require_correct_hf_scale(8)
    model = tiny_model(seed=3)
    score = torch.randn(4, model.config.n_embd)
    save_model(tmp_path / "ck", model, heads={"score": score})
    info = export_hf(tmp_path / "ck", tmp_path / "hf")
    assert info["classifier"] and info["dropped_heads"] == [] and "ar_inputs" in info["note"]
    clf = ImageGPTForImageClassification.from_pretrained(tmp_path / "hf").eval()
    lm = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    pixels = torch.randint(0, 16, (3, 64))
    head = torch.nn.Linear(model.config.n_embd, 4, bias=False)
    head.weight.data.copy_(score)
    with torch.no_grad():
        ours = joint_forward(model, head, pixels, with_gen=False)[0]
        assert (clf(ar_inputs(pixels, 16)).logits - ours).abs().max() <= 1e-5
        assert (clf(ar_inputs(pixels, 16)).logits - clf(pixels).logits).abs().max() > 1e-3
        assert (clf(pixels).logits - model.features(pixels, [2])[2] @ score.T).abs().max() <= 1e-5
        assert (lm(pixels).logits - model(pixels)).abs().max() <= 1e-5
    import_hf(tmp_path / "hf", tmp_path / "back")  # the head comes back, next to the lm_head
    assert torch.equal(load_heads(tmp_path / "back")["score"], score)
    save_model(tmp_path / "ck-bad", model, heads={"score": torch.randn(3, 7)})  # not n_embd wide
    with pytest.raises(IgptError, match=r"score head has shape \(3, 7\), expected \(classes, 24\)"):
        export_hf(tmp_path / "ck-bad", tmp_path / "hf-bad")


def test_unknown_and_missing_keys_are_listed(tmp_path):
    ref = hf_model(8, 24, 2, 3, 16)
    _save_hf(ref, tmp_path / "hf", extra_state={"transformer.h.0.attn.rotary.inv_freq": torch.ones(3)})
    with pytest.raises(IgptError, match=r"unknown.*h\.0\.attn\.rotary\.inv_freq"):
        import_hf(tmp_path / "hf", tmp_path / "ck")
    state = dict(ref.state_dict())
    del state["transformer.h.1.mlp.c_fc.bias"]
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(IgptError, match=r"missing \['h\.1\.mlp\.c_fc\.bias'\]"):
        import_hf(tmp_path / "hf", tmp_path / "ck")
    for key in ("transformer.wte.weight", "lm_head.weight"):  # no head and no token embedding: still listed
        del state[key]
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(IgptError, match=r"missing \[.*'wte\.weight'"):
        import_hf(tmp_path / "hf", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_unsupported_configs_and_files(tmp_path):
    ref = hf_model(8, 24, 2, 3, 16)
    _save_hf(ref, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for change, msg in (({"activation_function": "gelu"}, "activation_function"),
                        ({"n_positions": 60}, "n_positions 60"),
                        ({"model_type": "gpt2"}, "gpt2")):
        (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(IgptError, match=msg):
            import_hf(tmp_path / "hf", tmp_path / "ck")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(IgptError, match="no model.safetensors or pytorch_model.bin"):
        import_hf(tmp_path / "hf", tmp_path / "ck")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(IgptError, match="pytorch_model.bin"):
        import_hf(tmp_path / "hf", tmp_path / "ck")


def test_bert_models_are_not_exported(tmp_path):
    save_model(tmp_path / "ck", tiny_model(mode="bert"))
    with pytest.raises(IgptError, match="BERT"):
        export_hf(tmp_path / "ck", tmp_path / "hf")


def test_reference_scales_attention_correctly():
    """The pinned transformers (5.24) scales by 1/sqrt(head_dim); 4.42-4.46.x (and 5.17) by 1/int(sqrt(...))."""
    if hf_attention_scale() == "int":
        pytest.skip(f"transformers {transformers.__version__} has the 1/int(sqrt(head_dim)) attention bug")
    assert hf_attention_scale() == "float"


def test_sharded_checkpoint(tmp_path):
    ref = hf_model(8, 36, 2, 4, 16, seed=9)  # head_dim 9
    ref.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, _, _, _ = load_hf(tmp_path / "hf")
    _compare(ref, model, ar_inputs(torch.randint(0, 16, (2, 64)), 16))


def _exported(tmp_path, model=None):
    """An HF directory as export_hf writes it (config.json, model.safetensors, preprocessor_config.json)."""
    save_model(tmp_path / "ck", model or tiny_model(), palette=rgb_palette(16))
    export_hf(tmp_path / "ck", tmp_path / "hf")
    return tmp_path / "hf"


def test_malformed_config_values_are_one_line_errors(tmp_path):
    """Sizes of the wrong type or sign, and a config.json that is not an object, are refused before any
    arithmetic on them (they raised TypeError / ValueError / AttributeError)."""
    hf = _exported(tmp_path)
    cfg = json.loads((hf / "config.json").read_text())
    for text, message in ((json.dumps({**cfg, "n_positions": "64"}), "n_positions must be a positive integer, got '64'"),
                          (json.dumps({**cfg, "n_positions": -4}), "n_positions must be a positive integer, got -4"),
                          (json.dumps({**cfg, "n_positions": 64.0}), "n_positions must be a positive integer, got 64.0"),
                          (json.dumps({**cfg, "vocab_size": "17"}), "vocab_size must be a positive integer, got '17'"),
                          (json.dumps({**cfg, "n_embd": None}), "n_embd must be a positive integer, got None"),
                          ("[1, 2]", "expected a JSON object, got list")):
        (hf / "config.json").write_text(text)
        with pytest.raises(IgptError) as e:
            import_hf(hf, tmp_path / "out")
        assert str(e.value) == f"{hf / 'config.json'}: {message}"
    assert not (tmp_path / "out").exists()


def test_malformed_weight_index_and_preprocessor_files_name_the_file(tmp_path):
    """A .bin entry that is not a tensor, a Conv1D weight that is not 2-D, a shard index whose weight_map values
    are not file names and a preprocessor config that is not an object (or nests too deep) are one-line errors
    naming the file; each was an AttributeError / RuntimeError / TypeError / RecursionError."""
    from safetensors.torch import load_file, save_file

    hf = _exported(tmp_path)
    st, pc = load_file(hf / "model.safetensors"), (hf / "preprocessor_config.json").read_text()

    def check(message):
        with pytest.raises(IgptError) as e:
            load_hf(hf)
        assert str(e.value) == message

    save_file({**st, "transformer.h.0.attn.c_attn.weight": torch.zeros(2, 24, 72)}, hf / "model.safetensors")
    check(f"{hf}: transformer.h.0.attn.c_attn.weight has shape (2, 24, 72), expected a 2-D (in, out) Conv1D weight")
    (hf / "model.safetensors").unlink()
    torch.save({**st, "transformer.wte.weight": 5}, hf / "pytorch_model.bin")
    check(f"{hf / 'pytorch_model.bin'}: not a state dict of named tensors (entries 'transformer.wte.weight')")
    (hf / "pytorch_model.bin").unlink()
    save_file(st, hf / "a.safetensors")
    index = hf / "model.safetensors.index.json"
    for value in (["a.safetensors"], 3):
        index.write_text(json.dumps({"weight_map": {k: value for k in st}}))
        check(f"{index}: not a shard index (expected a weight_map of tensor names to file names)")
    index.write_text(json.dumps({"weight_map": {k: "../a.safetensors" for k in st}}))
    check(f"{index}: shard names must be file names in its folder, got ../a.safetensors")
    index.write_text(json.dumps({"weight_map": {k: "a.safetensors" for k in st}}))
    assert load_hf(hf)[1].k == 16  # the well-formed index loads
    (hf / "preprocessor_config.json").write_text("[1, 2]")
    check(f"{hf / 'preprocessor_config.json'}: expected a JSON object, got list")
    (hf / "preprocessor_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IgptError, match=r"preprocessor_config.json: not readable JSON \(maximum recursion depth"):
        load_hf(hf)
    (hf / "preprocessor_config.json").write_text(pc)
    (hf / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(IgptError, match=r"config.json: not readable JSON \(maximum recursion depth"):
        load_hf(hf)


def _saved_state(tmp_path, model):
    from safetensors.torch import load_file

    save_model(tmp_path / "ck", model)
    return tmp_path / "ck" / "model.safetensors", load_file(tmp_path / "ck" / "model.safetensors")


def test_integer_checkpoint_tensors_are_refused(tmp_path):
    """An int64 tensor in model.safetensors is refused by name (it crashed in load_state_dict)."""
    from safetensors.torch import save_file

    f, st = _saved_state(tmp_path, tiny_model())
    save_file({**st, "wte.weight": st["wte.weight"].long()}, f)
    with pytest.raises(IgptError) as e:
        load_model(tmp_path / "ck")
    assert str(e.value) == f"{f}: tensors that are not float32, bfloat16, float16 or float64: wte.weight (torch.int64)"
    hf = _exported(tmp_path / "x")  # an HF file too: import-hf's .float() turned integers into weights
    from safetensors.torch import load_file

    hst = load_file(hf / "model.safetensors")
    save_file({**hst, "transformer.wte.weight": hst["transformer.wte.weight"].long()}, hf / "model.safetensors")
    with pytest.raises(IgptError, match=r"weights that are not floating point: wte.weight \(torch.int64\)"):
        load_hf(hf)


def test_mixed_float_checkpoints_are_widened_and_one_dtype_kept(tmp_path):
    """A float16 or float64 tensor among float32 ones is widened to float32, so the model runs (the mix loaded,
    then crashed in the forward pass or in sampling); a checkpoint in one dtype, a bf16 model's, keeps it, and
    an fp16 HF checkpoint still imports as float32."""
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    f, st = _saved_state(tmp_path, model)
    idx = ar_inputs(torch.randint(0, 16, (2, 64)), 16)
    with torch.no_grad():
        want = model(idx)
    for dt in (torch.float16, torch.float64):
        save_file({**st, "wte.weight": st["wte.weight"].to(dt)}, f)
        back = load_model(tmp_path / "ck")[0]
        assert {p.dtype for p in back.state_dict().values()} == {torch.float32}
        with torch.no_grad():
            assert (back(idx) - want).abs().max() < 1e-2
        assert generate(back, 1, top_k=1).shape == (1, 64)
    save_model(tmp_path / "bf16", tiny_model().to(torch.bfloat16))  # one dtype throughout: kept as it is
    back = load_model(tmp_path / "bf16")[0]
    assert {p.dtype for p in back.state_dict().values()} == {torch.bfloat16}
    with torch.no_grad():
        assert back(idx).dtype == torch.bfloat16
    hf = _exported(tmp_path / "x", model)
    save_file({k: v.half() for k, v in load_file(hf / "model.safetensors").items()}, hf / "model.safetensors")
    import_hf(hf, tmp_path / "from-fp16")
    assert {p.dtype for p in load_model(tmp_path / "from-fp16")[0].state_dict().values()} == {torch.float32}

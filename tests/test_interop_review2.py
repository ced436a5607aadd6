"""Review of the checkpoint interop (igpt.hf, igpt.palette's HF clusters): each test failed before its fix."""

import json

import numpy as np
import pytest
import torch
from igpt_testutil import grey_palette, hf_model, tiny_model

from igpt.checkpoint import load_model, save_model
from igpt.errors import IgptError
from igpt.hf import export_hf, import_hf, load_hf
from igpt.model import ar_inputs
from igpt.palette import Palette

transformers = pytest.importorskip("transformers")


def test_export_does_not_replace_a_hugging_face_imagegpt_folder_igpt_did_not_write(tmp_path):
    """`igpt export-hf CKPT --out DIR` where DIR is a user's own ImageGPT folder (save_pretrained / a hub
    download: its config.json has model_type imagegpt too) deleted it, README and pytorch_model.bin included,
    though "no output ever replaces a non-empty folder that igpt did not write"."""
    hub = tmp_path / "hub"
    hf_model(4, 16, 1, 2, 8, seed=1).save_pretrained(hub)
    (hub / "README.md").write_text("my model card")
    (hub / "pytorch_model.bin").write_bytes(b"the original weights")
    before = sorted(p.name for p in hub.iterdir())
    save_model(tmp_path / "ck", tiny_model(seed=1, n_px=4, n_embd=16, n_head=2, palette_size=8))
    with pytest.raises(IgptError, match="igpt did not write"):
        export_hf(tmp_path / "ck", hub)
    assert sorted(p.name for p in hub.iterdir()) == before
    export_hf(tmp_path / "ck", tmp_path / "ours")  # an export of ours is still replaced
    export_hf(tmp_path / "ck", tmp_path / "ours")


def test_tied_word_embeddings_are_not_imported_as_a_zero_head(tmp_path):
    """With tie_word_embeddings=true transformers' head IS the token embedding (vocab_size outputs, SOS
    included) and save_pretrained leaves lm_head.weight out of the file: igpt imported it silently as a
    features-only model with an all-zero head, logits nothing like transformers' (max diff ~5 here)."""
    ref = hf_model(4, 16, 2, 2, 8, seed=1, tie_word_embeddings=True)
    ref.save_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert ref(torch.zeros(1, 4, dtype=torch.long)).logits.shape[-1] == 9  # the tied head: 9 outputs
    with pytest.raises(IgptError, match="tie_word_embeddings"):
        load_hf(tmp_path / "hf")


def test_config_attribute_aliases_are_read_as_transformers_reads_them(tmp_path):
    """transformers' ImageGPTConfig maps num_attention_heads / hidden_size / num_hidden_layers /
    max_position_embeddings onto n_head / n_embd / n_layer / n_positions (attribute_map). igpt ignored them and
    took its defaults: a config with num_attention_heads 2 loaded with 8 heads (the weights' shapes do not
    depend on it), logits 0.01 off transformers'."""
    ref = hf_model(4, 16, 1, 2, 8, seed=1)
    ref.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_attention_heads"] = cfg.pop("n_head")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.n_head == 2
    ours = load_hf(tmp_path / "hf")[0]
    assert ours.config.n_head == 2
    idx = ar_inputs(torch.randint(0, 8, (2, 16)), 8)
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max() <= 1e-5
    cfg["n_head"] = 4  # both spellings, disagreeing: refused
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IgptError, match="n_head"):
        load_hf(tmp_path / "hf")


def test_an_exported_grey_palette_loads_as_grey_as_a_palette_file_too(tmp_path):
    """The README: the clusters of a preprocessor_config.json load as the palette, so shards made from it
    match the model. A grey palette is exported as (k, 3) greys plus igpt_channels 1; import-hf turned it back
    into (k, 1), but Palette.load (`prepare --palette HF_DIR`, `import-openai --palette`) kept (k, 3): grey
    data was refused (palette is RGB) and the hash never matched the imported checkpoint's."""
    pal = Palette(grey_palette(16))
    save_model(tmp_path / "ck", tiny_model(), palette=pal)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    for where in (tmp_path / "hf" / "preprocessor_config.json", tmp_path / "hf"):
        p = Palette.load(where)
        assert p.channels == 1 and p.hash == pal.hash
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert load_model(tmp_path / "back")[1].hash == pal.hash


def test_a_float64_palette_keeps_its_dtype_and_hash_through_export_and_import(tmp_path):
    """A float64 palette whose values happen to be float32 numbers (a black/white palette [-1, 1], any dyadic
    levels) came back from export-hf -> import-hf as float32: another hash, so the shards prepared with the
    palette no longer matched the round-tripped checkpoint (eval / sample refuse them)."""
    pal = Palette(np.array([[-1.0], [-0.5], [0.0], [0.5], [0.75], [1.0]]))
    assert pal.centers.dtype == np.float64
    save_model(tmp_path / "ck", tiny_model(palette_size=6), palette=pal)
    export_hf(tmp_path / "ck", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back = load_model(tmp_path / "back")[1]
    assert back.centers.dtype == np.float64 and back.hash == pal.hash


def test_sparse_tensors_in_a_pytorch_model_bin_are_one_line_errors(tmp_path):
    """A sparse tensor in pytorch_model.bin (weights_only allows it) passed every check and crashed writing the
    checkpoint: RuntimeError 'unsupported memory format option Contiguous', a traceback and exit status 1."""
    ref = hf_model(4, 16, 1, 2, 8, seed=1)
    ref.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    state = dict(ref.state_dict())
    state["transformer.ln_f.weight"] = state["transformer.ln_f.weight"].to_sparse()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(IgptError, match=r"pytorch_model.bin.*transformer.ln_f.weight"):
        import_hf(tmp_path / "hf", tmp_path / "ck")
    assert not (tmp_path / "ck").exists()

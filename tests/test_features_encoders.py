"""Encoders by name from local checkpoints: preprocessing, strict weight loading, precision, pooling."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from factories import lite0_checkpoint, plain_forward, random_tiles, save_tiny
from safetensors.torch import save_file

from wsi.errors import ConfigError
from wsi.features import list_encoders, load_encoder
from wsi.features.encoders import Encoder, EncoderSpec, file_sha256, resolve_spec


def test_embed_equals_plain_forward_with_resize_and_records_provenance(tiny_vit):
    enc = load_encoder("test_vit", tiny_vit)
    tiles = random_tiles(5, 64)
    feats = enc.embed(tiles, batch_size=2)
    assert feats.dtype == np.float32 and feats.shape == (5, enc.dim)
    np.testing.assert_allclose(feats, plain_forward("test_vit", tiny_vit, tiles), rtol=1e-4, atol=1e-5)
    attrs = enc.attrs
    cfg = timm.data.resolve_model_data_config(timm.create_model("test_vit", pretrained=False))
    assert attrs.input_size == tuple(cfg["input_size"]) and attrs.mean == tuple(cfg["mean"])
    assert attrs.interpolation == cfg["interpolation"] and attrs.precision == "fp32"
    assert attrs.weights_source == str(tiny_vit) and attrs.weights_sha256 == file_sha256(tiny_vit)
    assert enc.embed(tiles[:0]).shape == (0, enc.dim)


def test_tiles_at_the_model_input_size_are_not_resized(tiny_vit):
    enc = load_encoder("test_vit", tiny_vit)
    tiles = random_tiles(3, enc.input_size[-1], seed=1)
    np.testing.assert_allclose(enc.embed(tiles), plain_forward("test_vit", tiny_vit, tiles), rtol=1e-4, atol=1e-5)


def test_torch_state_dict_with_wrapper_prefix_and_head_loads(tmp_path, tiny_vit):
    from safetensors.torch import load_file

    state = load_file(str(tiny_vit))
    state = {f"module.{k}": v for k, v in state.items()}
    state["module.head.weight"] = torch.zeros(7, 64)  # a fine-tuned 7-class head: ignored for features
    state["module.head.bias"] = torch.zeros(7)
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    tiles = random_tiles(2, 32)
    np.testing.assert_allclose(load_encoder("test_vit", path).embed(tiles),
                               load_encoder("test_vit", tiny_vit).embed(tiles), rtol=1e-5, atol=1e-6)


def test_checkpoint_of_another_model_names_file_and_expected_keys(tmp_path):
    other = save_tiny(tmp_path / "effnet.safetensors", "test_efficientnet")
    with pytest.raises(ConfigError) as e:
        load_encoder("test_vit", other)
    text = str(e.value)
    assert str(other) in text and "missing" in text and "cls_token (1, 1, 64)" in text and "unexpected" in text


def test_checkpoint_with_a_wrong_shape_names_the_tensor(tmp_path, tiny_vit):
    from safetensors.torch import load_file

    state = load_file(str(tiny_vit))
    state["pos_embed"] = state["pos_embed"][:, :10].contiguous()
    path = tmp_path / "cut.safetensors"
    save_file(state, str(path))
    with pytest.raises(ConfigError, match=r"wrong shape pos_embed \(1, 10, 64\) \(expected \(1, 101, 64\)\)"):
        load_encoder("test_vit", path)


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_missing_or_unreadable_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=str(path)):
        load_encoder("test_vit", path)


def test_a_pickled_object_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": Path("/etc/passwd")}, path)  # arbitrary classes may run code when unpickled
    with pytest.raises(ConfigError, match="weights-only"):
        load_encoder("test_vit", path)


@pytest.mark.slow
def test_real_lite0_weights_load_by_order_and_equal_timm(tmp_path):
    ckpt = lite0_checkpoint()
    enc = load_encoder("tf_efficientnet_lite0", ckpt)
    assert enc.dim == 1280 and enc.attrs.mean == (0.5, 0.5, 0.5) and enc.attrs.std == (0.5, 0.5, 0.5)
    tiles = random_tiles(3, 96)
    ref = plain_forward("tf_efficientnet_lite0", ckpt, tiles, ordered=True)
    np.testing.assert_allclose(enc.embed(tiles), ref, rtol=1e-4, atol=1e-5)


def test_order_remap_is_strict_and_only_where_registered(tmp_path):
    state = torch.load(lite0_checkpoint(), weights_only=True)
    short = dict(list(state.items())[:-3])  # the head plus one BN buffer gone: counts no longer match
    path = tmp_path / "short.pth"
    torch.save(short, path)
    with pytest.raises(ConfigError, match=r"its 293 tensors do not match the 296 expected \(294 without"):
        load_encoder("tf_efficientnet_lite0", path)
    # a plain timm name never maps by order: the renamed file is refused
    with pytest.raises(ConfigError, match="missing conv_stem.weight"):
        load_encoder("tf_efficientnet_lite0.in1k", lite0_checkpoint())


@pytest.mark.slow
def test_resnet50_trunc_is_layer3_average_pooled(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("resnet50", pretrained=False).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(full.state_dict(), path)  # a full torchvision-style ResNet-50 checkpoint, head and layer4
    enc = load_encoder("resnet50_trunc", path)
    assert enc.dim == 1024 and enc.input_size == (3, 224, 224)
    tiles = random_tiles(2, 224)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - torch.tensor(enc.mean).view(1, 3, 1, 1)) \
        / torch.tensor(enc.std).view(1, 3, 1, 1)
    with torch.no_grad():
        h = full.act1(full.bn1(full.conv1(x)))
        h = full.layer3(full.layer2(full.layer1(full.maxpool(h))))
    np.testing.assert_allclose(enc.embed(tiles), h.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_names_resolve_or_fail_clearly():
    assert {"resnet50_trunc", "tf_efficientnet_lite0", "uni", "uni2-h", "virchow", "virchow2", "h-optimus-0",
            "gigapath"} <= set(list_encoders())
    assert resolve_spec("hf-hub:MahmoodLab/uni").name == "uni"
    assert resolve_spec("vit_small_patch16_224.augreg_in21k").timm_name == "vit_small_patch16_224.augreg_in21k"
    with pytest.raises(ConfigError, match="unknown encoder 'not_a_model'"):
        resolve_spec("not_a_model")
    with pytest.raises(ConfigError, match="looks like a file"):
        resolve_spec("weights/uni.bin")


def test_hub_model_from_a_bare_weights_file_needs_its_folder(tmp_path, tiny_vit):
    with pytest.raises(ConfigError, match="downloaded hub folder"):
        load_encoder("virchow2", tiny_vit)


def test_no_network_and_no_checkpoint_is_an_error_not_random_weights(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ConfigError, match="cannot load pretrained weights for encoder 'test_vit'.*--checkpoint"):
        load_encoder("test_vit")


def he_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Pink and purple tiles with texture: closer to what an encoder sees than uniform noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    texture = 25 * np.sin(xx[None, :, :, None] / rng.uniform(2, 9, (n, 1, 1, 3))) * np.cos(
        yy[None, :, :, None] / rng.uniform(2, 9, (n, 1, 1, 3)))
    return np.clip(rng.integers(130, 220, (n, 1, 1, 3)) + texture + rng.normal(0, 8, (n, size, size, 3)),
                   0, 255).astype(np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_precision_choices(tiny_vit):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        load_encoder("test_vit", tiny_vit, precision="fp16")
    tiles = he_tiles(8, 32)
    fp32 = load_encoder("test_vit", tiny_vit).embed(tiles)
    bf16 = load_encoder("test_vit", tiny_vit, precision="bf16")
    assert bf16.attrs.precision == "bf16"
    got = bf16.embed(tiles)
    assert got.dtype == np.float32 and cosines(got, fp32).min() >= 0.99


@pytest.mark.parametrize("capability,expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16")])
def test_every_registered_encoder_runs_bf16_from_compute_capability_8(monkeypatch, tiny_vit, capability,
                                                                      expected):
    """UNI, Virchow, H-optimus-0 and GigaPath once preferred fp16, a full cast, even on an H100: ViT-H/g
    activations overflow it. No GPU here: the CUDA queries are patched and the encoder is only recorded."""
    import wsi.features.encoders as encoders

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(encoders, "build_model", lambda spec, checkpoint: (None, "test", None))
    chosen = {}
    monkeypatch.setattr(encoders, "Encoder", lambda spec, model, **kw: chosen.setdefault(spec.name, kw["precision"]))
    for name in list_encoders():
        load_encoder(name, device="cuda")
    assert chosen == {name: expected for name in list_encoders()}


def test_fp16_runs_under_autocast_with_fp32_weights(tiny_vit):
    """fp16 (GPUs below compute capability 8): the weights stay fp32 and the passes autocast, so norms and the
    residual stream run in fp32. Built directly on the CPU (load_encoder refuses fp16 there), as on such a GPU."""
    from wsi.features.encoders import build_model

    model, source, digest = build_model(resolve_spec("test_vit"), tiny_vit)
    enc = Encoder(resolve_spec("test_vit"), model, device="cpu", precision="fp16", weights_source=source,
                  weights_sha256=digest)
    assert enc.attrs.precision == "fp16" and {p.dtype for p in enc.model.parameters()} == {torch.float32}
    autocast = []
    enc.model.blocks[0].register_forward_hook(lambda *_: autocast.append(torch.is_autocast_enabled("cpu")))
    tiles = he_tiles(8, 32)
    got = enc.embed(tiles)
    assert autocast and all(autocast)
    assert cosines(got, load_encoder("test_vit", tiny_vit).embed(tiles)).min() >= 0.99


def test_bf16_on_a_gpu_without_it_is_refused_before_the_model_loads(monkeypatch, tiny_vit):
    """torch says a T4 supports bf16 (it emulates it, far slower than fp16); extraction follows the compute
    capability. There is no GPU here: torch's CUDA queries are patched, the choice code is real."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ConfigError, match="extract.precision bf16 has no hardware support on Tesla T4"):
        load_encoder("test_vit", tiny_vit, device="cuda", precision="bf16")


def test_weights_are_cast_to_the_precision_not_autocast(tiny_vit):
    enc = load_encoder("test_vit", tiny_vit, precision="bf16")
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_encoder("test_vit", tiny_vit).model.parameters()} == {torch.float32}


def test_class_and_mean_patch_token_pooling_skips_registers(tiny_vit):
    torch.manual_seed(0)
    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, reg_tokens=4).eval()
    enc = Encoder(EncoderSpec("tiny-virchow", "test_vit", pooling="cls_mean"), vit, device="cpu",
                  precision="fp32", weights_source="test", weights_sha256=None)
    assert enc.dim == 2 * vit.num_features
    tiles = random_tiles(2, 160)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - torch.tensor(enc.mean).view(1, 3, 1, 1)) \
        / torch.tensor(enc.std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = vit.forward_features(x)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1).numpy()
    np.testing.assert_allclose(enc.embed(tiles), expected, rtol=1e-4, atol=1e-5)


def test_preprocessing_a_model_card_prescribes_wins_over_timm_defaults(tiny_vit):
    from wsi.features.encoders import build_model

    spec = EncoderSpec("tiny-optimus", "test_vit", data_overlay={"mean": (0.7, 0.6, 0.7), "std": (0.2, 0.2, 0.2)})
    model, source, digest = build_model(spec, tiny_vit)
    enc = Encoder(spec, model, device="cpu", precision="fp32", weights_source=source, weights_sha256=digest)
    assert enc.attrs.mean == (0.7, 0.6, 0.7) and enc.attrs.std == (0.2, 0.2, 0.2)
    tiles = random_tiles(2, 160)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.7, 0.6, 0.7]).view(1, 3, 1, 1)) \
        / 0.2
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(enc.embed(tiles), expected, rtol=1e-4, atol=1e-5)


def test_a_downloaded_hub_folder_loads_offline_with_its_own_preprocessing(tmp_path):
    """How hub models run on nodes without internet: the hub repo's folder (config.json + weights)."""
    import json

    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    save_for_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["pretrained_cfg"].update({"mean": [0.7, 0.6, 0.7], "std": [0.2, 0.25, 0.2]})
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    enc = load_encoder("hf-hub:some-lab/tiny-pathology-vit", tmp_path)
    assert enc.attrs.weights_source == f"local-dir:{tmp_path}"
    assert enc.attrs.mean == (0.7, 0.6, 0.7) and enc.attrs.std == (0.2, 0.25, 0.2)
    tiles = random_tiles(2, 160)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.7, 0.6, 0.7]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.2]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(enc.embed(tiles), expected, rtol=1e-4, atol=1e-5)
    (tmp_path / "weights-only").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_encoder("uni", tmp_path / "weights-only")


@pytest.mark.parametrize("name,params_m,dim", [("uni", 303.4, 1024), ("uni2-h", 681.4, 1536)])
def test_hub_models_built_for_a_local_file_have_their_published_size(name, params_m, dim):
    """The architecture a bare UNI/UNI2-h weights file is loaded into (built on the meta device: no memory)."""
    spec = resolve_spec(name)
    with torch.device("meta"):
        model = timm.create_model(spec.arch, pretrained=False, **spec.model_kwargs)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)
    assert model.num_features == dim and spec.data_overlay["mean"] == (0.485, 0.456, 0.406)

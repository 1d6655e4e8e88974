"""CoCa against open_clip 3.3: weights, outputs, loss and gradients, hub folders, and generated tokens.

open_clip's ``generate`` needs transformers < 4.56, so its tokens come from tests/golden/coca_tiny.pt,
made by tests/golden/make_coca_golden.py (versions in tests/golden/coca_tiny_versions.json) on a tiny
seeded open_clip CoCa whose weights the file carries; everything else is compared live.
"""
from pathlib import Path

import open_clip
import pytest
import torch

import clipforge
from clipforge.checkpoints.openclip_hub import save_openclip_dir
from clipforge.config import CLIPConfig
from clipforge.loss import CoCaLoss
from clipforge.models import CoCa, build_model
from clipforge.models.coca import CachedDecoder, FullDecoder
from clipforge.pretrained import list_pretrained_tags_by_model
from clipforge.tokenizer import CLIPTokenizer
from clipforge.train.step import forward_backward

GOLDEN = torch.load(Path(__file__).parent / "golden" / "coca_tiny.pt", weights_only=True)
SOT, EOS = GOLDEN["sot"], GOLDEN["eos"]


def _open_clip_coca(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    ref = open_clip.CoCa(**{k: v for k, v in GOLDEN["config"].items() if k != "custom_text"})
    with torch.no_grad():
        ref.text_decoder.text_projection.normal_(std=0.2)  # open_clip leaves it uninitialised
    return ref.eval()


def _ours_from(ref: torch.nn.Module) -> CoCa:
    model = clipforge.create_model(CLIPConfig.from_dict(GOLDEN["config"]))
    model.load_state_dict(ref.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def golden_model() -> CoCa:
    model = build_model(CLIPConfig.from_dict(GOLDEN["config"]))
    model.load_state_dict(GOLDEN["state_dict"])
    return model.eval()


def _texts(batch: int = 3, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    text = torch.randint(1, SOT, (batch, length), generator=g)
    text[:, 0] = SOT
    text[0, 7], text[0, 8:] = EOS, 0  # padding after the end
    text[1, 4] = 0  # a pad token inside the text: OpenCLIP's shifted pad mask must match
    return text


def test_config_makes_a_coca_and_round_trips():
    cfg = clipforge.get_model_config("coca_ViT-B-32")
    assert cfg.model_kind == "coca" and clipforge.get_model_config("ViT-B-32").model_kind == "clip"
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["multimodal_cfg"]["context_length"] == 76 == cfg.multimodal_cfg.context_length
    with pytest.raises(ValueError, match="unknown keys in multimodal_cfg"):
        CLIPConfig.from_dict({**cfg.to_dict(), "multimodal_cfg": {"widht": 3}})
    tags = list_pretrained_tags_by_model("coca_ViT-L-14")
    assert tags == ["laion2b_s13b_b90k", "mscoco_finetuned_laion2b_s13b_b90k"]


def test_forward_and_features_match_open_clip():
    ref = _open_clip_coca()
    ours = _ours_from(ref)
    assert isinstance(ours, CoCa) and list(ours.state_dict()) == list(ref.state_dict())
    images, text = torch.randn(3, 3, 32, 32), _texts()
    with torch.no_grad():
        a, b = ref(images, text), ours(images, text)
        assert set(a) == set(b)
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5, rtol=0), key
        for normalize in (True, False):
            assert torch.allclose(ref.encode_image(images, normalize=normalize),
                                  ours.encode_image(images, normalize=normalize), atol=1e-5, rtol=0)
            assert torch.allclose(ref.encode_text(text, normalize=normalize),
                                  ours.encode_text(text, normalize=normalize), atol=1e-5, rtol=0)
        assert set(ref(images)) == set(ours(images)) == {"image_features", "image_embs"}
        unlabelled = ours(images, text, output_labels=False)
        assert unlabelled["logits"].shape[1] == text.shape[1] and "labels" not in unlabelled


def test_coca_loss_and_gradients_match_open_clip():
    ref = _open_clip_coca()
    ours = _ours_from(ref).train()
    ref.train()
    images, text = torch.randn(3, 3, 32, 32), _texts()
    ref_loss = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)
    out = ref(images, text)
    ref_terms = ref_loss(out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
    sum(ref_terms).backward()
    out = ours(images, text)
    terms = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(
        out["image_features"], out["text_features"], out["logits"], out["labels"], out["logit_scale"])
    sum(terms).backward()
    for r, o in zip(ref_terms, terms):
        assert abs(r.item() - o.item()) <= 1e-5
    grads = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5, rtol=0), name
    # the training step sums the two terms; with GradCache over 2 micro-batches the gradients stay exact
    for p in ours.parameters():
        p.grad = None
    step_loss = forward_backward(ours, CoCaLoss(), [(images, text)], "fp32", torch.device("cpu"))
    whole = {n: p.grad.clone() for n, p in ours.named_parameters()}
    assert abs(step_loss.item() - sum(t.item() for t in terms)) <= 1e-5
    for p in ours.parameters():
        p.grad = None
    split = forward_backward(ours, CoCaLoss(), [(images[:2], text[:2]), (images[2:], text[2:])], "fp32",
                             torch.device("cpu"))
    assert abs(split.item() - step_loss.item()) <= 1e-5
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, whole[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("name", list(GOLDEN["settings"]))
def test_generated_tokens_equal_open_clip(golden_model, name):
    kwargs = dict(GOLDEN["settings"][name])
    seed, prompt = kwargs.pop("seed", None), kwargs.pop("prompt", None)
    if seed is not None:
        torch.manual_seed(seed)
    text = torch.tensor([prompt] * len(GOLDEN["images"])) if prompt is not None else None
    out = golden_model.generate(GOLDEN["images"], text=text, sot_token_id=SOT, eos_token_id=EOS, **kwargs)
    assert out.dtype == torch.long
    assert torch.equal(out, GOLDEN["tokens"][name])


@pytest.mark.parametrize("kwargs", [{}, {"generation_type": "top_p", "top_p": 0.9}])
def test_cached_decoding_equals_recomputation(golden_model, kwargs):
    images = GOLDEN["images"]
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(golden_model.generate(images, sot_token_id=SOT, eos_token_id=EOS, use_cache=use_cache, **kwargs))
    assert torch.equal(*runs)
    # and step by step, the logits themselves, with rows dropped and reordered on the way
    with torch.no_grad():
        _, embs = golden_model._encode_image(images)
        cached, full = CachedDecoder(golden_model, embs, 1, 32), FullDecoder(golden_model, embs, 1, 32)
        tokens = _texts(4, 10)
        for t in range(1, 10):
            assert torch.allclose(cached(tokens[:, :t]), full(tokens[:, :t]), atol=1e-5, rtol=0)
            if t == 5:
                keep = torch.tensor([3, 0, 2])
                cached.reorder(keep), full.reorder(keep)
                tokens = tokens[keep]


def test_generate_validates_and_keeps_training_mode(golden_model):
    with pytest.raises(ValueError, match="seq_len"):
        golden_model.generate(GOLDEN["images"], seq_len=4, min_seq_len=5)
    with pytest.raises(ValueError, match="generation_type"):
        golden_model.generate(GOLDEN["images"], generation_type="greedy")
    golden_model.train()
    try:
        out = golden_model.generate(GOLDEN["images"][:1], generation_type="top_k", sot_token_id=SOT,
                                    eos_token_id=EOS, seq_len=8, fixed_output_length=True)
        assert golden_model.training and out.shape == (1, 8)
    finally:
        golden_model.eval()


def test_hub_folder_round_trip_with_open_clip(tmp_path):
    ref = _open_clip_coca()
    ours = _ours_from(ref)
    save_openclip_dir(ours, tmp_path)
    images, text = torch.randn(2, 3, 32, 32), _texts(2)
    loaded = open_clip.create_model("local-dir:" + str(tmp_path)).eval()
    back = clipforge.create_model("local-dir:" + str(tmp_path))
    assert isinstance(loaded, open_clip.CoCa) and isinstance(back, CoCa)
    # and a folder written by open_clip's own hub code (what push_to_hf_hub uploads)
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    save_file(ref.state_dict(), theirs / "open_clip_model.safetensors")
    ref.visual.image_mean, ref.visual.image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # as create_model sets
    save_config_for_hf(ref, theirs / "open_clip_config.json", model_config=GOLDEN["config"])
    read, _, _ = clipforge.create_model_and_transforms("local-dir:" + str(theirs))
    assert isinstance(read, CoCa) and read.preprocess_cfg.mean == (0.5, 0.5, 0.5)
    with torch.no_grad():
        expected = ours(images, text)
        for other in (loaded(images, text), back(images, text), read(images, text)):
            assert torch.allclose(other["logits"], expected["logits"], atol=1e-5, rtol=0)
            assert torch.allclose(other["text_features"], expected["text_features"], atol=1e-5, rtol=0)


def test_decode_cleans_special_tokens():
    tok = CLIPTokenizer()
    row = tok(["a photo of a cat"])[0]  # SOT ... EOT then padding
    assert tok.decode(row) == "a photo of a cat "
    assert tok.decode(row, skip_special_tokens=False).startswith("<start_of_text>a photo")
    assert tok.decode(row) == open_clip.decode(row).split("<end_of_text>")[0].replace("<start_of_text>", "")
    assert clipforge.tokenizer.decode(row.tolist()) == "a photo of a cat "


def test_clipforge_train_trains_resumes_and_exports_a_coca(tmp_path):
    """Two epochs straight, or one and then a resume: bit-identical weights; the export loads in open_clip."""
    from train_utils import tiny_coca_config, tiny_config, write_caption_tsv

    from clipforge.checkpoints.io import read_checkpoint
    from clipforge.train.config import TrainConfig
    from clipforge.train.loop import train

    model_cfg = tiny_coca_config()
    tsv = write_caption_tsv(tmp_path / "data", n_images=8)
    # 16 pairs, 4 per micro-batch, 2 micro-batches per step (GradCache): 2 steps per epoch; a constant
    # lr so that a one-epoch run follows the same schedule as the two-epoch one
    common = dict(model={"name": None, "config": model_cfg}, accum_freq=2, batch_size=4, save_every_n_steps=2,
                  keep_last=1, optim={"schedule": "const", "warmup_steps": 1})
    straight = train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, name="straight", epochs=2, **common)))
    train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, name="split", epochs=1, **common)))
    resumed = train(TrainConfig.from_dict(tiny_config(tmp_path, tsv, name="split", epochs=2, resume="latest",
                                                      **common)))
    assert straight["steps"] == resumed["steps"] == 4 and resumed["steps_this_run"] == 2
    finals = [Path(run["final"]) for run in (straight, resumed)]
    a, b = (read_checkpoint(f / "open_clip_model.safetensors") for f in finals)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    exported = open_clip.create_model("local-dir:" + str(finals[0]))
    assert isinstance(exported, open_clip.CoCa)
    start = CoCa(CLIPConfig.from_dict(model_cfg))
    trained = clipforge.create_model("local-dir:" + str(finals[0]))
    assert isinstance(trained, CoCa)
    # the captioning term reached the decoder (a contrastive-only loss leaves it at its initialisation)
    assert not torch.equal(trained.text_decoder.text_projection, start.text_decoder.text_projection)

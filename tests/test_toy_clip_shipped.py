"""The toy CLIP shipped in ``examples/toy-clip`` loads through open_clip's own API and reads the toy world."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmstyle_ns.clip.config import TOY_CLIP_NAME, TOY_CLIP_WEIGHTS
from mmstyle_ns.clip.evaluate import attribute_accuracy, class_embeddings, retrieval_ranks
from mmstyle_ns.clip.loader import ClipModel, load_clip
from mmstyle_ns.teacher.data import WIDE_VIEWS, generate_images
from mmstyle_ns.teacher.vocab import all_specs, caption

SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "toy-clip"


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    if not (SHIPPED / TOY_CLIP_WEIGHTS).is_file():
        pytest.fail(f"the trained toy CLIP is missing from {SHIPPED}")
    return load_clip(TOY_CLIP_NAME, str(SHIPPED))


def test_shipped_clip_is_small_and_in_open_clips_layout(clip: ClipModel) -> None:
    """One open_clip model config beside one safetensors state dict, under 10 MB, readable by open_clip itself."""
    import open_clip
    import torch

    assert (SHIPPED / TOY_CLIP_WEIGHTS).stat().st_size <= 10 * 10**6
    config = json.loads((SHIPPED / f"{TOY_CLIP_NAME}.json").read_text())
    assert open_clip.get_model_config(TOY_CLIP_NAME) == config
    model, _, _ = open_clip.create_model_and_transforms(TOY_CLIP_NAME, pretrained=str(SHIPPED / TOY_CLIP_WEIGHTS))
    tokens = open_clip.get_tokenizer(TOY_CLIP_NAME)(["a red cube on grass"])
    with torch.no_grad():
        direct = torch.nn.functional.normalize(model.eval().encode_text(tokens), dim=-1)
    torch.testing.assert_close(direct, clip.encode_texts(["a red cube on grass"]), rtol=0, atol=1e-6)
    reference = open_clip.get_tokenizer("ViT-B-32")(["a red cube on grass"])[0]  # ids identical to real CLIP's
    length = int((reference != 0).sum())
    assert torch.equal(tokens[0, :length], reference[:length]) and clip.image_size == model.visual.image_size


def test_shipped_clip_classifies_held_out_pictures(clip: ClipModel) -> None:
    """Zero-shot colour, shape, style and ground of generated pictures from a seed no training used."""
    images, specs = generate_images(60_000, 0, 64, 128, WIDE_VIEWS)
    grammar = all_specs()
    texts = clip.encode_texts([caption(s) for s in grammar])
    classes = {a: class_embeddings(clip, a, grammar, texts) for a in ("colour", "shape", "style", "ground")}
    accuracy = attribute_accuracy(clip.encode_images(images), specs, classes)
    assert accuracy["colour"] >= 0.9 and accuracy["style"] >= 0.85 and accuracy["ground"] >= 0.85, accuracy
    assert accuracy["shape"] >= 0.75, accuracy


def test_shipped_clip_reads_renders_of_an_embedded_toy_scene(clip: ClipModel, tmp_path: Path) -> None:
    """Views rendered by the scene generator (not the picture generator) retrieve captions of their colour and
    ground among all 1728 captions of the grammar."""
    from PIL import Image

    from mmstyle_ns.data.scene import generate_scene

    folder = generate_scene("toy", tmp_path / "toy", num_views=8, resolution=128, caption="a green sphere on stone")
    views = []
    for path in sorted((folder / "images").glob("frame_*.png")):
        rgba = np.asarray(Image.open(path).convert("RGBA")).astype(np.float32) / 255.0
        views.append(rgba[..., :3] * rgba[..., 3:] + 1.0 - rgba[..., 3:])
    grammar = all_specs()
    texts = clip.encode_texts([caption(s) for s in grammar])
    best = (clip.encode_images(np.stack(views)) @ texts.T).argmax(dim=1)
    read = [grammar[int(b)] for b in best]
    assert sum(s.colour == "green" for s in read) >= 7 and sum(s.ground == "stone" for s in read) >= 7, read
    own = grammar.index(next(s for s in grammar if caption(s) == "a green sphere on stone"))
    assert (
        float((retrieval_ranks(clip.encode_images(np.stack(views)), texts, [own] * len(views)) < 20).float().mean())
        >= 0.5
    )

